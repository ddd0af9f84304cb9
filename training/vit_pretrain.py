"""Pretrain the demo's visual encoder on the synthetic world: the stand-in for EVA-CLIP + InstructBLIP.

No vision weights can be downloaded, so the demo's small ViT + instruction Q-Former would otherwise learn
from scratch inside the full model, slowly and without ever being cacheable. Here they learn first, in
minutes, from frames rendered with the scene's ground truth (training.vit_targets: per grid cell the
colour, shape, pulse flag and centre, per frame the printed word), in two phases:

    1. ViT      loss = labels from the patch tokens, read twice (ProbeHeads.patches): per patch, pooled
                over each cell (local), and from the mean of all patches (global)
    2. Q-Former the ViT frozen and its tokens cached; loss = labels from the Qv query outputs -- the very
                tokens the causal Q-Former and the LLM see (ProbeHeads.queries)

    each readout: CE(colour) + CE(shape) + BCE(pulse) [+ CE(text) + CENTRE_WEIGHT * MSE(centre, occupied)]

A shape pulses only while its sound plays (~0.5-0.8 s of a clip), so pulse labels are rare (1 cell in
30 of the pool, 1 in 11 occupied ones); unweighted, the BCE is met by predicting "no pulse", and the
session-7 encoder found a pulse on a decoded frame with recall 0.67. The pulse term's positives are
weighted by (negatives / positives in the frame pool) ** pulse_balance (0.5: x5.4): AV matching and
sound source hinge on the pulse reaching the fusion. The default 0 is the committed demo model's setting
(its recipe must reproduce it); benchmarks/RESULTS.md 1e measures 0.5 and the decoded train frames.

Trained end to end from the query readout alone, the query tokens stayed at the empty-cell prior (the
Q-Former's cross-attention cannot yet pick a cell, so no gradient says what is in one); the two phases
reach it in minutes (MODEL.md, "visual encoder"). The encoder is then frozen and its features cached by
the recipe (``train.init_visual_from`` + ``model.embedded_visual``).

Run directory (``output_dir``):
    step_000100/state.pt    encoder, heads, optimiser, scheduler, RNG (resume continues bit for bit:
                            batch s is a function of (seed, s) alone)
    curve.json              one record per logged step and per evaluation
    vit.safetensors         the encoder (VisualEncoder names) + metadata: visual config, held-out accuracy

Training draws clips from the "train" split's seed space only; held-out accuracy is measured on the
"heldout" seed space (rendered) and, optionally, on a generated split's decoded mp4 frames.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from favor.config import FavorConfig, get_config
from favor.encoders import VisualEncoder
from favor.fileio import atomic_write, write_step_dir
from favor.generation import instruction_inputs
from training.recipe import warmup_cosine
from training.vit_data import FrameBatch, decoded_batches, rendered_batch
from training.vit_targets import CELLS, EMPTY, NUM_COLOURS, NUM_SHAPES, NUM_TEXTS, region_pool

FORMAT = "favor-visual-pretrain"
ENCODER_FILE = "vit.safetensors"
CURVE_FILE = "curve.json"
STATE_FILE = "state.pt"
STEP_DIR = "step_{:06d}"
# Centres are fractions of the frame: a 3 px error on 160 px is an MSE of ~4e-4, so x10 keeps the term
# from vanishing beside the cross-entropies (~0.1-2) without letting it dominate them.
CENTRE_WEIGHT = 10.0
HELDOUT_SEED_OFFSET = 1  # heldout batches use their own RNG stream, never a training step's
BOOKKEEPING_FIELDS = ("output_dir", "log_every", "eval_every", "ckpt_every", "keep_checkpoints", "heldout_frames",
                      "heldout_manifest", "heldout_clips")
# Visual fields that change the encoder's computation; a pretrained file must match all of them.
ARCHITECTURE_FIELDS = ("image_size", "patch_size", "vit_width", "vit_layers", "vit_heads", "vit_mlp_dim",
                       "vit_ln_eps", "qformer_width", "qformer_layers", "qformer_heads", "qformer_ffn_dim",
                       "qformer_cross_attention_freq", "num_query_tokens", "qformer_vocab_size",
                       "max_instruction_tokens")


@dataclass
class PretrainConfig:
    preset: str = "demo"  # favor.config preset whose visual encoder is pretrained
    output_dir: str = "runs/demo_vit"
    steps: int = 2400  # both phases
    qformer_fraction: float = 0.25  # the last quarter of the steps trains the Q-Former over the frozen ViT
    batch_size: int = 64  # frames per step
    frame_pool: int = 4096  # train frames rendered once and reused (FramePool)
    frames_per_scene: int = 4
    lr: float = 1e-3  # encoder: the ViT in its phase, the Q-Former in its phase
    head_lr: float = 1e-3  # linear heads
    min_lr_ratio: float = 0.05
    warmup_steps: int = 20  # per phase
    weight_decay: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0  # training clips: the "train" split under this seed
    clip_pool: int = 1_000_000  # clip indices drawn from [0, clip_pool) of the train split
    codec: bool = True  # 4:2:0 chroma, as the H.264 clips the recipe decodes
    log_every: int = 10
    eval_every: int = 300  # steps; 0 = at the end only
    ckpt_every: int = 100  # steps; 0 = none (no resume point)
    keep_checkpoints: int = 2
    heldout_frames: int = 256  # rendered frames from the heldout seed space per evaluation
    heldout_manifest: str | None = None  # a generated heldout split: its mp4 frames, decoded, at the end
    train_manifest: str | None = None  # a generated train split: its mp4 frames, decoded, join the pool
    train_clips: int = 1200  # clips of train_manifest decoded into the pool
    heldout_clips: int = 40  # x ~16 frames at 2 FPS
    # pulse BCE pos_weight = (neg / pos in the pool) ** this; 0 = unweighted (the committed demo model's
    # encoder), 1 = balanced; 0.5 measured in benchmarks/RESULTS.md 1e
    pulse_balance: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "frame_pool", "frames_per_scene", "clip_pool", "heldout_frames",
                     "heldout_clips"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.pulse_balance <= 1.0:
            raise ValueError(f"pulse_balance must be in [0, 1], got {self.pulse_balance}")
        if not 0.0 <= self.qformer_fraction < 1.0:
            raise ValueError(f"qformer_fraction must be in [0, 1), got {self.qformer_fraction}")


def vit_phase_steps(pc: PretrainConfig) -> int:
    """Steps [0, n) train the ViT; [n, steps) the Q-Former."""
    return max(1, round(pc.steps * (1.0 - pc.qformer_fraction)))


def phase_schedule(pc: PretrainConfig, step: int) -> float:
    """LR multiplier: a warm-up + cosine per phase (the Q-Former starts its own from peak lr)."""
    n = vit_phase_steps(pc)
    if step < n:
        return warmup_cosine(step, pc.warmup_steps, n, pc.min_lr_ratio)
    return warmup_cosine(step - n, pc.warmup_steps, pc.steps - n, pc.min_lr_ratio)


class ProbeHeads(nn.Module):
    """Linear readouts of the scene labels, for the two phases (see the module docstring).

    ViT phase, from the patch tokens [B, Np, Dvit]:
        local   one linear map per patch, log-sum-exp pooled over each cell's patches: "is there a red
                square in this cell" is answered where the square is (learns in a few hundred steps)
        global  the mean of ALL patch tokens -> every cell's labels and the printed word: the ViT must carry
                each cell's content into every token, which is what the Q-Former's cross-attention, near
                uniform when it starts, can pass on (measured: a Q-Former over a ViT trained with the
                local readout alone stayed at pair accuracy 0.16 after 300 steps, over one trained with both
                it reached 0.39 after 50)
    Q-Former phase, from the query outputs [B, Qv, Dv] (the tokens the LLM sees), as slots: the queries
    are split into CELLS consecutive groups, cell c is read from the mean of group c, and the printed word
    from the mean of all, by heads shared across groups. A label then lives in the tokens themselves, in
    one direction for every token -- what the causal Q-Former downstream can take in, since its attention
    projects every token alike. (Measured over the same frozen ViT: this readout reached a 0.90 pair
    accuracy in 300 steps where a linear map of the flattened 32 x 192 outputs, which may read every
    token differently, reached 0.65 in 600.)"""

    def __init__(self, cfg: FavorConfig):
        super().__init__()
        v = cfg.visual
        if v.num_query_tokens < CELLS:
            raise ValueError(f"the query readout needs at least one query per cell: num_query_tokens "
                             f"({v.num_query_tokens}) < {CELLS}")
        self.cells = nn.Linear(v.qformer_width, CELL_OUTPUTS)
        self.text = nn.Linear(v.qformer_width, NUM_TEXTS)
        # slot[c] = the queries cell c reads: CELLS near-equal consecutive groups of the Qv queries
        self.register_buffer("slot", torch.arange(v.num_query_tokens) * CELLS // v.num_query_tokens,
                             persistent=False)
        self.local = nn.Linear(v.vit_width, LOCAL_OUTPUTS)
        self.scene = nn.Linear(v.vit_width, CELLS * CELL_OUTPUTS)
        self.scene_text = nn.Linear(v.vit_width, NUM_TEXTS)
        regions = torch.from_numpy(region_pool(v.image_size, v.patch_size))  # [CELLS + 1, Np]
        self.register_buffer("in_cell", regions[:CELLS] > 0, persistent=False)  # [CELLS, Np]

    def queries(self, queries: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, Qv, Dv] -> per-cell colour / shape / pulse / centre and the printed word."""
        groups = nn.functional.one_hot(self.slot, CELLS).to(queries.dtype)  # [Qv, CELLS]
        slots = torch.einsum("bqd,qc->bcd", queries, groups / groups.sum(0))  # [B, CELLS, Dv]
        return _cell_outputs(self.cells(slots).flatten(1)) | {"text": self.text(queries.mean(1))}

    def patches(self, patches: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """[B, Np, Dvit] -> {"local": per-cell colour / shape / pulse, "global": as the query heads}."""
        per_patch = self.local(patches)[:, None]  # [B, 1, Np, K]
        inside = self.in_cell[None, :, :, None]  # [1, CELLS, Np, 1]
        pooled = torch.logsumexp(per_patch.masked_fill(~inside, float("-inf")), dim=2)  # [B, CELLS, K]
        pooled = torch.where(inside.any(2), pooled, 0.0)  # a cell no patch centre falls in (tiny grids)
        colour, shape, pulse = pooled.split([NUM_COLOURS, NUM_SHAPES, 1], dim=-1)
        mean = patches.mean(1)  # [B, Dvit]
        return {"local": {"colour": colour, "shape": shape, "pulse": pulse[..., 0]},
                "global": _cell_outputs(self.scene(mean)) | {"text": self.scene_text(mean)}}


CELL_OUTPUTS = NUM_COLOURS + NUM_SHAPES + 1 + 2  # colour and shape logits, pulse logit, centre (x, y)
LOCAL_OUTPUTS = NUM_COLOURS + NUM_SHAPES + 1


def _cell_outputs(flat: torch.Tensor) -> dict[str, torch.Tensor]:
    cells = flat.view(flat.shape[0], CELLS, CELL_OUTPUTS)
    colour, shape, pulse, centre = cells.split([NUM_COLOURS, NUM_SHAPES, 1, 2], dim=-1)
    return {"colour": colour, "shape": shape, "pulse": pulse[..., 0], "centre": centre}


def probe_losses(outs: dict[str, dict[str, torch.Tensor]], t: dict[str, torch.Tensor],
                 pulse_pos_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-head losses of every readout given ({"queries": ..., "local": ..., "global": ...}, any subset),
    each readout's total under its name, and their sum ("loss"). ``pulse_pos_weight`` weighs the pulse
    BCE's positives (FramePool.pulse_pos_weight)."""
    parts: dict[str, torch.Tensor] = {}
    for name, out in outs.items():
        terms = _losses(out, t, pulse_pos_weight)
        parts |= {f"{name}_{k}": v for k, v in terms.items()}
        parts[name] = sum(v * (CENTRE_WEIGHT if k == "centre" else 1.0) for k, v in terms.items())
    parts["loss"] = sum(parts[name] for name in outs)
    return parts


def _losses(out: dict[str, torch.Tensor], t: dict[str, torch.Tensor],
            pulse_pos_weight: float) -> dict[str, torch.Tensor]:
    ce = nn.functional.cross_entropy
    bce = nn.functional.binary_cross_entropy_with_logits
    parts = {"colour": ce(out["colour"].flatten(0, 1), t["colour"].flatten()),
             "shape": ce(out["shape"].flatten(0, 1), t["shape"].flatten()),
             "pulse": bce(out["pulse"], t["pulse"], pos_weight=out["pulse"].new_tensor(pulse_pos_weight))}
    if "text" in out:
        parts["text"] = ce(out["text"], t["text"])
    if "centre" in out:
        occupied = (t["colour"] != EMPTY).float()  # [B, CELLS]
        err = ((out["centre"] - t["centre"]) ** 2).sum(-1)  # [B, CELLS]
        parts["centre"] = (err * occupied).sum() / occupied.sum().clamp(min=1.0)
    return parts


def instructions(batch: FrameBatch, tokenizer, encoder: VisualEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    return instruction_inputs(tokenizer, batch.questions, encoder.max_instruction_tokens)


def encode_frames(encoder: VisualEncoder, batch: FrameBatch, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames as single-frame clips through the encoder: [B, 3, S, S] -> queries [B, Qv, Dv] and the ViT's
    patch tokens [B, Np, Dvit] (class token dropped)."""
    image = encoder.vision_model(pixel_values=batch.pixels).last_hidden_state  # [B, Np+1, Dvit]
    return encoder.read(image, *instructions(batch, tokenizer, encoder)), image[:, 1:]


def all_outputs(heads: ProbeHeads, queries: torch.Tensor, patches: torch.Tensor) -> dict[str, dict]:
    return {"queries": heads.queries(queries)} | heads.patches(patches)


@torch.no_grad()
def accuracy(encoder: VisualEncoder, heads: ProbeHeads, batches: list[FrameBatch], tokenizer,
             frame_width: int) -> dict[str, float]:
    """Per-head held-out accuracy of the query readout (what the LLM sees): colour / shape over all cells
    (empty included), pair = both right on occupied cells, pulse on occupied cells, text per frame, centre
    error in frame pixels; and the pair accuracy of the ViT's local and global readouts."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}

    def add(name: str, hits: torch.Tensor, where: torch.Tensor) -> None:
        sums[name] = sums.get(name, 0.0) + float((hits & where).sum())
        counts[name] = counts.get(name, 0.0) + float(where.sum())

    def pair(out: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> torch.Tensor:
        return (out["colour"].argmax(-1) == t["colour"]) & (out["shape"].argmax(-1) == t["shape"])

    was = encoder.training, heads.training
    encoder.eval(), heads.eval()
    for batch in batches:
        outs, t = all_outputs(heads, *encode_frames(encoder, batch, tokenizer)), batch.targets
        out = outs["queries"]
        occ = t["colour"] != EMPTY
        add("local_pair", pair(outs["local"], t), occ), add("patch_pair", pair(outs["global"], t), occ)
        colour, shape = out["colour"].argmax(-1) == t["colour"], out["shape"].argmax(-1) == t["shape"]
        every = torch.ones_like(occ)
        add("colour", colour, every), add("shape", shape, every), add("pair", colour & shape, occ)
        add("pulse", (out["pulse"] > 0) == (t["pulse"] > 0.5), occ)
        add("pulse_recall", out["pulse"] > 0, t["pulse"] > 0.5)
        add("pulse_precision", t["pulse"] > 0.5, (out["pulse"] > 0) & occ)
        add("text", out["text"].argmax(-1) == t["text"], torch.ones_like(t["text"], dtype=torch.bool))
        add("text_shown", out["text"].argmax(-1) == t["text"], t["text"] != EMPTY)
        err = (out["centre"] - t["centre"]).norm(dim=-1) * frame_width  # [B, CELLS] px
        sums["centre_px"] = sums.get("centre_px", 0.0) + float((err * occ).sum())
        counts["centre_px"] = counts.get("centre_px", 0.0) + float(occ.sum())
    encoder.train(was[0]), heads.train(was[1])
    return {k: sums[k] / counts[k] for k in sums if counts[k]} | {"frames": sum(len(b.questions) for b in batches)}


@torch.no_grad()
def init_cross_attention(qformer: nn.Module) -> None:
    """Xavier-uniform weights for the Q-Former's cross-attention projections (BERT's 0.02 elsewhere).

    At BERT's 0.02, value x output projections pass ~1e-3 of the image into the queries' residual stream
    (measured: the query outputs of two random frames differ by 0.003 at a scale of 0.8), so the heads see
    almost nothing of the picture for hundreds of steps. BLIP-2 starts these layers fresh too, but trains
    on 129 M images; Xavier keeps the path's variance at one from the start."""
    for layer in qformer.encoder.layer:
        if getattr(layer, "has_cross_attention", False):
            cross = layer.crossattention
            for lin in (cross.attention.query, cross.attention.key, cross.attention.value, cross.output.dense):
                nn.init.xavier_uniform_(lin.weight)


class FramePool:
    """``pc.frame_pool`` train frames rendered once (a pure function of the seed, so a resumed run renders
    the same ones) and drawn from again each step: rendering is ~3 ms a frame, the ViT's step ~5 ms a frame,
    and 4096 frames from ~1000 scenes generalise to the held-out scenes (measured in the section of
    MODEL.md on the visual encoder). Pixels are kept in float16 (0.3 GB for 4096 frames at 112 px): the
    rounding, ~1e-3, is a tenth of one 8-bit level after the CLIP normalisation.

    With ``pc.train_manifest``, the frames of a generated train split's mp4 clips, decoded at the model's
    fps exactly as the recipe decodes them, join the pool: H.264 blurs a pulse's thin white outline more
    than 4:2:0 chroma alone does (session 8: pulse recall 0.90 on rendered held-out frames, 0.73 on
    decoded ones, with the frames' timing checked to match their labels)."""

    def __init__(self, pc: PretrainConfig, image_size: int, video_fps: float):
        rng = np.random.default_rng([pc.seed, POOL_STREAM])
        parts = [rendered_batch(rng, min(POOL_CHUNK, pc.frame_pool - i), split="train", seed=pc.seed,
                                clip_pool=pc.clip_pool, frames_per_scene=pc.frames_per_scene,
                                image_size=image_size, codec=pc.codec)
                 for i in range(0, pc.frame_pool, POOL_CHUNK)]
        if pc.train_manifest:
            parts += decoded_batches(pc.train_manifest, image_size, video_fps, pc.train_clips, POOL_CHUNK,
                                     split="train")
        self.pixels = torch.cat([b.pixels for b in parts]).half()  # [N, 3, S, S]
        self.targets = {k: torch.cat([b.targets[k] for b in parts]) for k in parts[0].targets}
        self.questions = [q for b in parts for q in b.questions]
        self.image: torch.Tensor | None = None  # the frozen ViT's tokens [N, Np+1, Dvit], Q-Former phase
        positives = float(self.targets["pulse"].sum())
        negatives = self.targets["pulse"].numel() - positives
        # a pool with no pulse at all (tiny test pools) leaves the term unweighted
        self.pulse_pos_weight = (negatives / positives) ** pc.pulse_balance if positives else 1.0

    def indices(self, pc: PretrainConfig, step: int) -> torch.Tensor:
        """Batch ``step``'s frames: a function of (seed, step) alone, so resume needs no data state."""
        rng = np.random.default_rng([pc.seed, 0, step])
        return torch.from_numpy(rng.integers(len(self.questions), size=pc.batch_size))

    def batch(self, idx: torch.Tensor) -> FrameBatch:
        return FrameBatch(self.pixels[idx].float(), {k: v[idx] for k, v in self.targets.items()},
                          [self.questions[i] for i in idx.tolist()])

    @torch.no_grad()
    def cache_image(self, encoder: VisualEncoder) -> None:
        was = encoder.vision_model.training
        encoder.vision_model.eval()
        self.image = torch.cat([encoder.vision_model(pixel_values=x.float()).last_hidden_state
                                for x in self.pixels.split(POOL_CHUNK)])
        encoder.vision_model.train(was)


POOL_STREAM = 2  # the pool's RNG stream (0: batch indices, 1: held-out frames)
POOL_CHUNK = 256  # frames rendered / encoded at a time


def instruction_tokenizer_for(cfg: FavorConfig):
    """The instruction tokenizer the model will use: visual.instruction_tokenizer, else the LLM's."""
    from favor.build import load_tokenizer, resolve_llm
    from favor.model import resolve_instruction_tokenizer

    if cfg.visual.instruction_tokenizer:
        return load_tokenizer(cfg.visual.instruction_tokenizer)
    llm = resolve_llm(cfg.llm)
    if not llm.pretrained:
        raise ValueError(f"preset {cfg.preset}: no instruction tokenizer (set visual.instruction_tokenizer or "
                         "llm.pretrained)")
    return resolve_instruction_tokenizer(cfg, None, load_tokenizer(llm.pretrained, llm.gguf_file))


class VitPretrainer:
    """setup() -> train() -> finish(); ``resume=True`` continues from the newest step_* in output_dir."""

    def __init__(self, pc: PretrainConfig, cfg: FavorConfig | None = None, tokenizer=None, resume: bool = False):
        self.pc, self.cfg = pc, cfg or get_config(pc.preset)
        self.tokenizer, self.resume = tokenizer, resume
        self.out = Path(pc.output_dir)
        self.step, self.curve = 0, []

    def setup(self) -> None:
        pc = self.pc
        if self.tokenizer is None:
            self.tokenizer = instruction_tokenizer_for(self.cfg)
        torch.manual_seed(pc.seed)
        self.encoder = VisualEncoder(self.cfg)
        init_cross_attention(self.encoder.qformer)
        v = self.cfg.visual
        # The instruction word table (49152 x 192 in the demo: 3/4 of the encoder) stays at its random init:
        # no label depends on the prompt, so training it would only cost an AdamW pass over 9.4 M weights a
        # step; distinct random rows still tell the Q-Former's text tokens apart.
        self.encoder.qformer.embeddings.word_embeddings.requires_grad_(False)
        self.heads = ProbeHeads(self.cfg)
        groups = []
        for params, lr in ((self.encoder.parameters(), pc.lr), (self.heads.parameters(), pc.head_lr)):
            params = [p for p in params if p.requires_grad]
            groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": pc.weight_decay, "lr": lr},
                       {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": lr}]
        self.optimizer = torch.optim.AdamW(groups, lr=pc.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(phase_schedule, pc))
        self.pool = FramePool(pc, v.image_size, self.cfg.timing.video_fps)
        rng = np.random.default_rng([pc.seed, HELDOUT_SEED_OFFSET])
        self.heldout = [rendered_batch(rng, min(pc.batch_size, pc.heldout_frames - i), split="heldout",
                                       seed=pc.seed, clip_pool=pc.clip_pool, frames_per_scene=pc.frames_per_scene,
                                       image_size=v.image_size, codec=pc.codec)
                        for i in range(0, pc.heldout_frames, pc.batch_size)]
        if self.resume:
            self._load_state()

    def _training_settings(self) -> str:
        """The settings that decide the weights (not where or how often things are written)."""
        keep = {k: v for k, v in dataclasses.asdict(self.pc).items() if k not in BOOKKEEPING_FIELDS}
        return json.dumps(keep, sort_keys=True)

    def _latest(self) -> Path | None:
        steps = sorted(p for p in self.out.glob("step_*") if (p / STATE_FILE).is_file())
        return steps[-1] if steps else None

    def _load_state(self) -> None:
        found = self._latest()
        if found is None:
            raise ValueError(f"{self.out}: --resume found no step_* checkpoint to resume from")
        state = torch.load(found / STATE_FILE, map_location="cpu", weights_only=True)
        if state["config"] != self._training_settings():
            raise ValueError(f"{found}: made with other pretraining settings; resume needs the same ones")
        self.encoder.load_state_dict(state["encoder"])
        self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        curve = self.out / CURVE_FILE
        self.curve = [r for r in json.loads(curve.read_text()) if r["step"] <= self.step] if curve.is_file() else []

    def _save_state(self) -> None:
        state = {"step": self.step, "config": self._training_settings(),
                 "encoder": self.encoder.state_dict(), "heads": self.heads.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "torch_rng": torch.get_rng_state()}
        final = self.out / STEP_DIR.format(self.step)
        write_step_dir(final, lambda tmp: torch.save(state, tmp / STATE_FILE), self.pc.keep_checkpoints)
        self._save_curve()

    def _save_curve(self) -> None:
        text = json.dumps(self.curve, indent=1)
        atomic_write(self.out / CURVE_FILE, lambda tmp: Path(tmp).write_text(text))

    def evaluate(self) -> dict[str, float]:
        acc = accuracy(self.encoder, self.heads, self.heldout, self.tokenizer, SCENE_WIDTH)
        self.curve.append({"kind": "heldout", "step": self.step, **acc})
        return acc

    def train_step(self) -> dict[str, float]:
        """One step of the phase ``self.step`` is in: ViT (local + global patch readouts) or Q-Former (query
        readout over the frozen ViT's cached tokens)."""
        idx = self.pool.indices(self.pc, self.step)
        batch = self.pool.batch(idx)
        self.heads.train()
        if self.step < vit_phase_steps(self.pc):
            self.encoder.vision_model.train()
            patches = self.encoder.vision_model(pixel_values=batch.pixels).last_hidden_state[:, 1:]
            parts = probe_losses(self.heads.patches(patches), batch.targets, self.pool.pulse_pos_weight)
        else:
            if self.pool.image is None:
                self.encoder.vision_model.requires_grad_(False)
                self.pool.cache_image(self.encoder)
            self.encoder.qformer.train()
            queries = self.encoder.read(self.pool.image[idx], *instructions(batch, self.tokenizer, self.encoder))
            parts = probe_losses({"queries": self.heads.queries(queries)}, batch.targets,
                                 self.pool.pulse_pos_weight)
        self.optimizer.zero_grad(set_to_none=True)  # AdamW skips the other phase's weights (no gradient)
        parts["loss"].backward()
        if self.pc.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.pc.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {k: float(v.detach()) for k, v in parts.items()}

    def train(self, progress=None) -> list[dict]:
        pc = self.pc
        self.out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        while self.step < pc.steps:
            parts = self.train_step()
            if self.step % pc.log_every == 0 or self.step == pc.steps:
                self.curve.append({"kind": "train", "step": self.step, "lr": self.scheduler.get_last_lr()[0],
                                   "seconds": round(time.perf_counter() - t0, 2), **parts})
            if pc.eval_every and self.step % pc.eval_every == 0 and self.step < pc.steps:
                self.evaluate()
            if pc.ckpt_every and self.step % pc.ckpt_every == 0:
                self._save_state()
            if progress is not None:
                progress(self.step, parts["loss"])
        return self.curve

    def finish(self) -> dict:
        """Held-out accuracy (rendered heldout frames, plus the decoded mp4 clips when a manifest is given),
        then the encoder file and the curve, written atomically."""
        report = {"rendered": self.evaluate()}
        if self.pc.heldout_manifest:
            v = self.cfg.visual
            batches = decoded_batches(self.pc.heldout_manifest, v.image_size, self.cfg.timing.video_fps,
                                      self.pc.heldout_clips, self.pc.batch_size)
            report["decoded"] = accuracy(self.encoder, self.heads, batches, self.tokenizer, SCENE_WIDTH)
            self.curve.append({"kind": "heldout_decoded", "step": self.step, **report["decoded"]})
        self._save_curve()
        save_encoder(self.encoder, self.cfg, self.out / ENCODER_FILE,
                     {"steps": self.step, "heldout": report, "pretrain": dataclasses.asdict(self.pc)})
        return report


SCENE_WIDTH = 160  # px: SceneOptions' default frame side, the unit of the centre error


def save_encoder(encoder: VisualEncoder, cfg: FavorConfig, path: str | Path, info: dict) -> Path:
    """The encoder's tensors (VisualEncoder names, as VisualEncoder.from_pretrained reads a .safetensors)
    with the visual config and ``info`` in the metadata; atomic."""
    path = Path(path)
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in encoder.state_dict().items()}
    meta = {"format": FORMAT, "visual_config": json.dumps(dataclasses.asdict(cfg.visual)),
            "info": json.dumps(info)}
    atomic_write(path, lambda tmp: save_file(weights, tmp, metadata=meta))
    return path


def load_encoder(cfg: FavorConfig, path: str | Path) -> VisualEncoder:
    """A pretrained encoder file -> VisualEncoder for ``cfg``; every architecture field must match."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: pretrained visual encoder not found (favor-train pretrain-vit writes it)")
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for foreign files
        raise ValueError(f"{path}: not a safetensors file ({str(err).splitlines()[0]})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a pretrained visual encoder (metadata format is not {FORMAT!r})")
    theirs = json.loads(meta["visual_config"])
    ours = dataclasses.asdict(cfg.visual)
    differ = [f"{k} {theirs.get(k)} != {ours[k]}" for k in ARCHITECTURE_FIELDS if theirs.get(k) != ours[k]]
    if differ:
        raise ValueError(f"{path}: pretrained for another visual encoder ({'; '.join(differ)})")
    return VisualEncoder.from_pretrained(cfg, path)


def describe(report: dict) -> str:
    """One line per evaluation set: the per-head accuracies."""
    lines = []
    for name, acc in report.items():
        parts = [f"{k} {acc[k]:.3f}" for k in ("colour", "shape", "pair", "pulse", "pulse_recall",
                                             "pulse_precision", "text", "text_shown") if k in acc]
        lines.append(f"{name} ({acc['frames']} frames): " + ", ".join(parts) + f", centre {acc['centre_px']:.1f} px")
    return "\n".join(lines)
