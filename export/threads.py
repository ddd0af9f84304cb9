"""Intra-op threads per stage, chosen by measurement at export time and recorded in the manifest.

Why per stage: the decoder's single-token steps are memory- and overhead-bound (on our 2-core
machines 2 threads decoded slower than 1), while the encoders and the prefill are GEMM-bound and gain
from every core. ONNX Runtime fixes a session's intra-op pool when it is created, so each stage gets
its own count:

    manifest["runtime"]["threads"]  = {stage: n}         what the runtime uses unless overridden
    manifest["runtime"]["autotune"] = {cores, candidates, median_ms {stage: {n: ms}},
                                       decoder_ms {n: {prefill, decode_step}}, seconds, load_avg_1m}

How: for each stage, one session per candidate count (1..cores; powers of two and cores above 4),
one warm-up call each, then repetitions taken round-robin over the counts (so a load change on a
shared machine hits every count alike), and the median per count. The decoder is timed as one
caption: prefill of a window's prompt + CAPTION_TOKENS decode steps, each part measured. The whole
tune stops at ``budget_s``; a stage whose counts were not all measured keeps ONNX Runtime's default.
Thread counts change only how work is split, never the result (tests/test_bundle_cache.py checks the
stage outputs at 1 and 2 threads are equal), so a choice skewed by a loaded machine costs speed only.

    --threads N                          every stage N threads (runtime override)
    --threads decoder=1,audio_encoder=2  those stages; the others keep the manifest's choice

Notation: F frames per window, S image size, M mel bins, Tm mel frames per window, Ta audio tokens,
Qv/Dv visual tokens/width, Nq queries per window, L prompt length, D LLM width.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from favor.fileio import atomic_write

# The decoder first: its choice matters most (memory-bound steps) and the budget may not reach the last.
TUNED_STAGES = ("decoder", "audio_encoder", "visual_encoder", "fusion")
BUDGET_S = 8.0  # whole autotune, session creation included: "a few seconds" at export
REPEATS = 5  # timed calls per (stage, count) when the budget allows; the median is kept
CAPTION_TOKENS = 30  # decode steps per caption (~30-token captions, issue 10) weighed against one prefill
DECODE_STEPS = 4  # decode steps timed per repetition (their median is the step cost)
PROMPT_TEXT_TOKENS = 24  # BOS + chat template + default prompt around the AV rows (SmolLM2 tokenizer)
INSTRUCTION_TOKENS = 12  # the default prompt as the visual Q-Former's instruction


def candidates(cores: int) -> list[int]:
    """1..cores for small machines; 1, 2, 4, ... and cores itself above 4 (bounded tune time)."""
    if cores <= 4:
        return list(range(1, cores + 1))
    return sorted({2 ** k for k in range(cores.bit_length()) if 2 ** k <= cores} | {cores})


def _workloads(bundle, rng: np.random.Generator) -> dict[str, Callable[[], dict[str, float]]]:
    """Per stage, one runtime-shaped call returning its timed parts in seconds."""
    cfg, t = bundle.cfg, bundle.cfg.timing
    F, v = t.frames_per_window, cfg.visual

    def rand(*shape) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))

    pixels = rand(1, 1, 3, v.image_size, v.image_size)  # [1, n=1, 3, S, S]: one frame per call, as live
    k = min(INSTRUCTION_TOKENS, v.max_instruction_tokens)
    ids, mask = torch.ones(1, k, dtype=torch.long), torch.ones(1, k, dtype=torch.long)  # [1, k]
    mel = rand(1, cfg.audio.n_mels, round(t.window_seconds * t.mel_rate))  # [1, M, Tm]
    visual = rand(1, F, v.num_query_tokens, cfg.visual_width)  # [1, F, Qv, Dv]
    audio = rand(1, round(F * t.audio_tokens_per_frame), cfg.audio_proj_dim)  # [1, Ta, Da]
    prompt = rand(1, PROMPT_TEXT_TOKENS + cfg.qformer.num_queries, cfg.llm.hidden)  # [1, L, D]

    def timed(fn) -> Callable[[], dict[str, float]]:
        def call() -> dict[str, float]:
            t0 = time.perf_counter()
            fn()
            return {"total": time.perf_counter() - t0}
        return call

    def caption() -> dict[str, float]:
        inf = bundle.inference()
        t0 = time.perf_counter()
        _, cache = inf.prefill(prompt, torch.ones(1, prompt.shape[1], dtype=torch.long))
        prefill = time.perf_counter() - t0
        steps = []
        for i in range(DECODE_STEPS):
            t0 = time.perf_counter()
            _, cache = inf.decode(torch.tensor([i + 3]), cache)
            steps.append(time.perf_counter() - t0)
        step = statistics.median(steps)
        return {"prefill": prefill, "decode_step": step, "total": prefill + CAPTION_TOKENS * step}

    return {"audio_encoder": timed(lambda: bundle.encode_audio(mel)),
            "visual_encoder": timed(lambda: bundle.encode_visual(pixels, ids, mask)),
            "fusion": timed(lambda: bundle.fuse(visual, audio)),
            "decoder": caption}


def _measure(runs: dict[int, Callable[[], dict[str, float]]], deadline: float
             ) -> dict[int, list[dict[str, float]]] | None:
    """One warm-up call per count (session creation, arenas, first-run kernels), then up to REPEATS
    rounds over the counts in turn; None if the deadline came before every count had a sample."""
    samples: dict[int, list[dict[str, float]]] = {n: [] for n in runs}
    for call in runs.values():
        if time.perf_counter() >= deadline:
            return None
        call()
    for _ in range(REPEATS):
        if time.perf_counter() >= deadline:
            break
        for n, call in runs.items():
            samples[n].append(call())
    return samples if all(samples.values()) else None


def autotune(bundle_dir: str | Path, budget_s: float = BUDGET_S, cores: int | None = None,
             stages: tuple[str, ...] = TUNED_STAGES) -> dict:
    """Time each stage at each candidate thread count; {"threads": {stage: n}, "autotune": {...}}."""
    from export.ort_inference import OrtBundle

    start = time.perf_counter()
    deadline = start + budget_s
    cores = cores or os.cpu_count() or 1
    counts = candidates(cores)
    rng = np.random.default_rng(0)
    present = [s for s in stages if s in OrtBundle(bundle_dir, check_hashes=False).manifest["stages"]]
    chosen: dict[str, int] = {}
    medians: dict[str, dict[str, float]] = {}
    decoder_ms: dict[str, dict[str, float]] = {}
    for stage in present:
        if len(counts) == 1:  # one core: nothing to choose, nothing to time
            chosen[stage] = counts[0]
            continue
        if time.perf_counter() >= deadline:
            break
        runs = {n: _workloads(OrtBundle(bundle_dir, threads=n, check_hashes=False), rng)[stage] for n in counts}
        samples = _measure(runs, deadline)
        del runs  # free this stage's sessions before the next stage's are made
        if samples is None:
            continue  # out of time before every count was measured: ORT's default for this stage
        med = {n: statistics.median(x["total"] for x in s) for n, s in samples.items()}
        chosen[stage] = min(med, key=med.get)
        medians[stage] = {str(n): round(v * 1e3, 3) for n, v in med.items()}
        if stage == "decoder":
            decoder_ms = {str(n): {part: round(statistics.median(x[part] for x in s) * 1e3, 3)
                                   for part in ("prefill", "decode_step")} for n, s in samples.items()}
    return {"threads": chosen,
            "autotune": {"cores": cores, "candidates": counts, "median_ms": medians, "decoder_ms": decoder_ms,
                         "caption_tokens": CAPTION_TOKENS, "budget_s": budget_s,
                         "seconds": round(time.perf_counter() - start, 2), "load_avg_1m": os.getloadavg()[0]}}


def record(bundle_dir: str | Path, runtime: dict) -> None:
    """Set manifest["runtime"] (no file the manifest hashes changes); written atomically."""
    path = Path(bundle_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["runtime"] = runtime
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def tune_bundle(bundle_dir: str | Path, budget_s: float = BUDGET_S) -> dict[str, int]:
    """autotune + record; returns the chosen {stage: threads}."""
    runtime = autotune(bundle_dir, budget_s)
    record(bundle_dir, runtime)
    return runtime["threads"]


# -- runtime side: the manifest's choice and the --threads override ------------------------------

def parse_threads(spec: str | int | None) -> dict[str, int]:
    """'--threads' value -> {stage: n}; 'N' -> {'*': N}; '' / None -> {}. ValueError on nonsense."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, int) or str(spec).strip().isdigit():
        n = int(spec)
        if n < 1:
            raise ValueError(f"--threads ({spec}) must be >= 1")
        return {"*": n}
    out: dict[str, int] = {}
    for part in str(spec).split(","):
        stage, sep, value = part.strip().partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--threads ({spec!r}) must be N or stage=N,... with N >= 1 "
                             f"(stages: {', '.join(TUNED_STAGES)})")
        if stage.strip() not in TUNED_STAGES:
            raise ValueError(f"--threads: unknown stage {stage.strip()!r} (stages: {', '.join(TUNED_STAGES)})")
        out[stage.strip()] = int(value)
    return out


def stage_threads(manifest: dict, override: dict[str, int]) -> dict[str, int]:
    """{stage: n} the runtime uses: the override ('*' = all), else the manifest's tuned choice.
    Stages absent from the result run with ONNX Runtime's default."""
    if "*" in override:
        return {s: override["*"] for s in TUNED_STAGES}
    tuned = (manifest.get("runtime") or {}).get("threads") or {}
    out = {s: int(n) for s, n in tuned.items() if s in TUNED_STAGES and int(n) >= 1}
    out.update(override)
    return out
