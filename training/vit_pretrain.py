"""Pretrain the demo's visual encoder on the synthetic world: the stand-in for EVA-CLIP + InstructBLIP.

No vision weights can be downloaded, so the demo's small ViT + instruction Q-Former would otherwise learn
from scratch inside the full model, slowly and without ever being cacheable. Here they learn first, in
minutes, from frames rendered in memory with the scene's ground truth (training.vit_targets): linear
heads read the Qv query outputs -- the very tokens the causal Q-Former and the LLM see -- and predict per
grid cell the colour, shape, pulse flag and centre, and per frame the printed word. The encoder is then
frozen and its features cached by the recipe (``train.init_visual_from`` + ``model.embedded_visual``).

    loss = CE(colour) + CE(shape) + BCE(pulse) + CE(text) + CENTRE_WEIGHT * MSE(centre of occupied cells)
           + the same classification terms from the ViT's patch tokens pooled per cell / text band
             (a short gradient path into the ViT; the query heads are the ones reported)

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
    steps: int = 1200
    batch_size: int = 16  # frames per step: more updates per frame rendered beat bigger batches here
    frames_per_scene: int = 4
    lr: float = 3e-4  # encoder (ViT + instruction Q-Former)
    head_lr: float = 2e-3  # linear heads: a fast probe on slowly moving features
    min_lr_ratio: float = 0.05
    warmup_steps: int = 30
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
    heldout_clips: int = 40  # x ~16 frames at 2 FPS

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "frames_per_scene", "clip_pool", "heldout_frames", "heldout_clips"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class ProbeHeads(nn.Module):
    """Linear heads over the flattened query outputs [B, Qv * Dv] (the information must be in the tokens the
    LLM sees) and, as a short gradient path into the ViT, over its patch tokens mean-pooled per cell and
    text band. Reading all queries, a cell's labels need no query to attend to that cell alone: while the
    Q-Former's cross-attention is still near uniform, position-dependent ViT features already carry them."""

    def __init__(self, cfg: FavorConfig):
        super().__init__()
        v = cfg.visual
        d = v.num_query_tokens * v.qformer_width
        self.cells = nn.Linear(d, CELLS * CELL_OUTPUTS)
        self.text = nn.Linear(d, NUM_TEXTS)
        self.patch_colour = nn.Linear(v.vit_width, NUM_COLOURS)
        self.patch_shape = nn.Linear(v.vit_width, NUM_SHAPES)
        self.patch_pulse = nn.Linear(v.vit_width, 1)
        self.patch_text = nn.Linear(v.vit_width, NUM_TEXTS)
        self.register_buffer("pool", torch.from_numpy(region_pool(v.image_size, v.patch_size)), persistent=False)

    def query_heads(self) -> tuple[nn.Linear, ...]:
        return self.cells, self.text

    def forward(self, queries: torch.Tensor, patches: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """queries [B, Qv, Dv], patches [B, Np, Dvit] -> logits per head, for "queries" and "patches"."""
        x = queries.flatten(1)  # x: [B, Qv*Dv]
        cells = self.cells(x).view(x.shape[0], CELLS, CELL_OUTPUTS)
        colour, shape, pulse, centre = cells.split([NUM_COLOURS, NUM_SHAPES, 1, 2], dim=-1)
        q = {"colour": colour, "shape": shape, "pulse": pulse[..., 0], "centre": centre, "text": self.text(x)}
        regions = self.pool @ patches  # regions: [B, CELLS + 1, Dvit]
        cells, band = regions[:, :CELLS], regions[:, CELLS]
        p = {"colour": self.patch_colour(cells), "shape": self.patch_shape(cells),
             "pulse": self.patch_pulse(cells)[..., 0], "text": self.patch_text(band)}
        return {"queries": q, "patches": p}


CELL_OUTPUTS = NUM_COLOURS + NUM_SHAPES + 1 + 2  # colour and shape logits, pulse logit, centre (x, y)


def probe_losses(out: dict[str, dict[str, torch.Tensor]], t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-head losses of the query heads, the patch heads' total ("patches"), and their sum ("loss")."""
    parts = _losses(out["queries"], t)
    parts["patches"] = sum(_losses(out["patches"], t).values())
    parts["loss"] = sum(v * (CENTRE_WEIGHT if k == "centre" else 1.0) for k, v in parts.items())
    return parts


def _losses(out: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ce = nn.functional.cross_entropy
    parts = {"colour": ce(out["colour"].flatten(0, 1), t["colour"].flatten()),
             "shape": ce(out["shape"].flatten(0, 1), t["shape"].flatten()),
             "pulse": nn.functional.binary_cross_entropy_with_logits(out["pulse"], t["pulse"]),
             "text": ce(out["text"], t["text"])}
    if "centre" in out:
        occupied = (t["colour"] != EMPTY).float()  # [B, CELLS]
        err = ((out["centre"] - t["centre"]) ** 2).sum(-1)  # [B, CELLS]
        parts["centre"] = (err * occupied).sum() / occupied.sum().clamp(min=1.0)
    return parts


def encode_frames(encoder: VisualEncoder, batch: FrameBatch, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames as single-frame clips through the encoder: [B, 3, S, S] -> queries [B, Qv, Dv] and the ViT's
    patch tokens [B, Np, Dvit] (caught on their way into the Q-Former)."""
    seen = []
    hook = encoder.vision_model.register_forward_hook(lambda m, i, o: seen.append(o.last_hidden_state))
    try:
        ids, mask = instruction_inputs(tokenizer, batch.questions, encoder.max_instruction_tokens)
        queries = encoder(batch.pixels[:, None], ids, mask)[:, 0]
    finally:
        hook.remove()
    return queries, seen[0][:, 1:]  # drop the class token


@torch.no_grad()
def accuracy(encoder: VisualEncoder, heads: ProbeHeads, batches: list[FrameBatch], tokenizer,
             frame_width: int) -> dict[str, float]:
    """Per-head held-out accuracy: colour / shape over all cells (empty included), pair = both right on
    occupied cells, pulse on occupied cells, text per frame, centre error in frame pixels."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}

    def add(name: str, hits: torch.Tensor, where: torch.Tensor) -> None:
        sums[name] = sums.get(name, 0.0) + float((hits & where).sum())
        counts[name] = counts.get(name, 0.0) + float(where.sum())

    was = encoder.training, heads.training
    encoder.eval(), heads.eval()
    for batch in batches:
        both, t = heads(*encode_frames(encoder, batch, tokenizer)), batch.targets
        out, patch = both["queries"], both["patches"]
        occ = t["colour"] != EMPTY
        add("patch_pair", (patch["colour"].argmax(-1) == t["colour"]) & (patch["shape"].argmax(-1) == t["shape"]), occ)
        colour, shape = out["colour"].argmax(-1) == t["colour"], out["shape"].argmax(-1) == t["shape"]
        every = torch.ones_like(occ)
        add("colour", colour, every), add("shape", shape, every), add("pair", colour & shape, occ)
        add("pulse", (out["pulse"] > 0) == (t["pulse"] > 0.5), occ)
        add("pulse_recall", out["pulse"] > 0, t["pulse"] > 0.5)
        add("text", out["text"].argmax(-1) == t["text"], torch.ones_like(t["text"], dtype=torch.bool))
        add("text_shown", out["text"].argmax(-1) == t["text"], t["text"] != EMPTY)
        err = (out["centre"] - t["centre"]).norm(dim=-1) * frame_width  # [B, CELLS] px
        sums["centre_px"] = sums.get("centre_px", 0.0) + float((err * occ).sum())
        counts["centre_px"] = counts.get("centre_px", 0.0) + float(occ.sum())
    encoder.train(was[0]), heads.train(was[1])
    return {k: sums[k] / counts[k] for k in sums if counts[k]} | {"frames": sum(len(b.questions) for b in batches)}


# transformers' InstructBlipVisionConfig.initializer_range is 1e-10: made for loading EVA weights, it leaves
# a ViT built from a config all but zero -- a constant function of the pixels, whose gradients vanish
# (measured: query outputs differ by 1e-7 between two random images). From scratch, ViTs start at 0.02.
VIT_INIT_STD = 0.02


@torch.no_grad()
def init_vit(vit: nn.Module, std: float = VIT_INIT_STD) -> None:
    """ViT (timm / BERT) initialisation: truncated-normal weights and embeddings, zero biases, LayerNorm 1 / 0."""
    for m in vit.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    emb = vit.embeddings
    nn.init.trunc_normal_(emb.position_embedding, std=std)
    nn.init.trunc_normal_(emb.class_embedding, std=std)


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


class _StepBatches(torch.utils.data.Dataset):
    """Training batch s, a pure function of (seed, s): resume needs no data state."""

    def __init__(self, pc: PretrainConfig, image_size: int):
        self.pc, self.image_size = pc, image_size

    def __len__(self) -> int:
        return self.pc.steps

    def __getitem__(self, step: int) -> FrameBatch:
        pc = self.pc
        return rendered_batch(np.random.default_rng([pc.seed, 0, step]), pc.batch_size, split="train", seed=pc.seed,
                              clip_pool=pc.clip_pool, frames_per_scene=pc.frames_per_scene,
                              image_size=self.image_size, codec=pc.codec)


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

    def __init__(self, pc: PretrainConfig, cfg: FavorConfig | None = None, tokenizer=None, resume: bool = False,
                 num_workers: int = 1):
        self.pc, self.cfg = pc, cfg or get_config(pc.preset)
        self.tokenizer, self.resume, self.num_workers = tokenizer, resume, num_workers
        self.out = Path(pc.output_dir)
        self.step, self.curve = 0, []

    def setup(self) -> None:
        pc = self.pc
        if self.tokenizer is None:
            self.tokenizer = instruction_tokenizer_for(self.cfg)
        torch.manual_seed(pc.seed)
        self.encoder = VisualEncoder(self.cfg)
        init_vit(self.encoder.vision_model)
        init_cross_attention(self.encoder.qformer)
        v = self.cfg.visual
        # The instruction word table (49152 x 192 in the demo: 3/4 of the encoder) stays at its random init:
        # no label depends on the prompt, so training it would only cost an AdamW pass over 9.4 M weights a
        # step; distinct random rows still tell the Q-Former's text tokens apart.
        self.encoder.qformer.embeddings.word_embeddings.requires_grad_(False)
        self.heads = ProbeHeads(self.cfg)
        # Adam moves every weight by ~lr a step; summed over a layer's inputs with mixed signs, a logit read
        # from Qv x Dv query features moves ~sqrt(Qv) times more than one read from Dv features (the patch
        # heads), so the query heads get head_lr / sqrt(Qv).
        wide = [p for m in self.heads.query_heads() for p in m.parameters()]
        narrow = [p for p in self.heads.parameters() if all(p is not w for w in wide)]
        groups = []
        for params, lr in ((self.encoder.parameters(), pc.lr), (narrow, pc.head_lr),
                           (wide, pc.head_lr / v.num_query_tokens ** 0.5)):
            params = [p for p in params if p.requires_grad]
            groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": pc.weight_decay, "lr": lr},
                       {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": lr}]
        self.optimizer = torch.optim.AdamW(groups, lr=pc.lr)
        schedule = functools.partial(warmup_cosine, warmup=pc.warmup_steps, total=pc.steps, min_ratio=pc.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
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

    def train_step(self, batch: FrameBatch) -> dict[str, float]:
        self.encoder.train(), self.heads.train()
        parts = probe_losses(self.heads(*encode_frames(self.encoder, batch, self.tokenizer)), batch.targets)
        self.optimizer.zero_grad(set_to_none=True)
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
        loader = torch.utils.data.DataLoader(_StepBatches(pc, self.cfg.visual.image_size), batch_size=None,
                                             sampler=range(self.step, pc.steps), num_workers=self.num_workers,
                                             collate_fn=lambda b: b)
        t0 = time.perf_counter()
        for batch in loader:
            parts = self.train_step(batch)
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
        parts = [f"{k} {acc[k]:.3f}" for k in ("colour", "shape", "pair", "pulse", "pulse_recall", "text",
                                             "text_shown") if k in acc]
        lines.append(f"{name} ({acc['frames']} frames): " + ", ".join(parts) + f", centre {acc['centre_px']:.1f} px")
    return "\n".join(lines)
