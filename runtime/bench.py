"""``favor-rt bench``: what this machine sustains, per FPS x window size x backend.

For each cell the clip is decoded and assembled once (timed: the "decode" stage), then every window
goes through the runtime's own code path, exactly as in a stream that keeps up:

    frames of window w are encoded as they "arrive" (StreamingCaptioner.on_frame, timed, not latency)
    the window closes -> caption([w]) (timed: this is the end-of-window-to-caption latency)

Reported per cell (formulas):
    latency p50 / p95 / max   seconds from window close to caption (incremental visual encoding)
    throughput                media seconds / wall seconds of all work (decode + visual + caption)
                              = 1 / real-time factor; >= 1 means the stream is sustainable
    LLM input tokens          prompt text + Nq AV tokens per window (+ carried previous caption)
    stage seconds per window  decode (media), visual (all frames), audio, fusion, LLM prefill, decode
    peak RSS                  VmHWM after resetting it at the start of the cell (/proc/self/clear_refs);
                              with several backends, the process's peak with all of them loaded

Several backends in one cell run round-robin over the same windows (window w on each backend in
turn, the order alternating), so a load change on a shared machine hits them alike and their ratio
is meaningful even when absolute numbers are not.

    favor-rt bench --model CKPT --backends torch,auto   eager vs the compiled bundle of one checkpoint

With --model, torch runs the checkpoint eagerly and auto / onnxruntime run its compiled bundle,
exported once through the bundle cache (runtime/bundle_cache.py) and reused by `favor-rt run`; the
cell's ``engine`` says what auto picked (provider, threads per stage). With a preset (random
weights; timing does not depend on weight values, the number of decoded tokens does, so it is
reported): torch, onnxruntime (the exported bundle), onnxruntime-int8; preset bundles are exported
once per cell into <out>/bundles. Outputs: <out>/bench_<name>.{md,csv,jsonl,png}.

Notation: F frames per window, W windows, Nq queries per window.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from runtime.assembler import FrameSlot, Window, WindowAssembler
from runtime.sources import MediaSource
from runtime.stream import StreamingCaptioner
from runtime.synthclip import write_clip

BENCH_PROMPT = "Describe what happens in the video and the audio."
CLIP_SIZE = (320, 240)  # camera-like frames: resizing to the model's input is part of the work
CLIP_FPS = 25.0
_KB_PER_MB = 1024


@dataclass
class Cell:
    preset: str
    backend: str
    fps: float
    frames_per_window: int
    window_seconds: float
    windows: int = 0
    latency_p50: float = math.nan
    latency_p95: float = math.nan
    latency_max: float = math.nan
    # window close -> first caption token decided (audio + fusion + LLM prefill): what a viewer waits
    # before the caption starts growing
    ttft_p50: float = math.nan
    ttft_p95: float = math.nan
    decode_tok_s: float = math.nan  # new tokens / LLM decode seconds (the steps after the first token)
    throughput: float = math.nan  # media s per wall s
    llm_input_tokens: float = math.nan  # mean per window
    new_tokens: float = math.nan  # mean per caption
    stages: dict[str, float] = field(default_factory=dict)  # mean seconds per window
    peak_rss_mb: float = math.nan
    note: str = ""
    engine: str = ""  # what ran: e.g. "onnxruntime (CPU; threads decoder 1, ...)" for auto


def machine() -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "commit": commit,
            "load_avg_1m": os.getloadavg()[0], "dtype": "float32"}


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / _KB_PER_MB
    except OSError:
        pass
    return math.nan


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer sized to a random-weight LLM (no hub: nothing to download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + sorted(set((BENCH_PROMPT + " USER : < Img > / ASSISTANT").lower()
                                                   .replace(".", " . ").split()))
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")


def retimed(model, fps: float, frames_per_window: int):
    """The same weights on another frame grid: only the causal Q-Former's block size depends on it."""
    from favor.model import FavorModel
    from favor.qformer import CausalQFormer

    cfg = model.cfg.replace(**{"timing.video_fps": float(fps), "timing.frames_per_window": frames_per_window})
    qformer = CausalQFormer(cfg)
    qformer.load_state_dict(model.qformer.state_dict())
    new = FavorModel(cfg, model.audio_encoder, model.visual_encoder, qformer, model.projector, model.llm,
                     tokenizer=model.tokenizer, instruction_tokenizer=model.instruction_tokenizer)
    new.audio_proj.load_state_dict(model.audio_proj.state_dict())
    return new.eval()


def assemble(clip: Path, fps: float, frames_per_window: int, sample_rate: int
             ) -> tuple[list[Window], list[FrameSlot], float]:
    """Decode + assemble the whole clip; returns windows, frame slots and the seconds it took."""
    windows: list[Window] = []
    slots: list[FrameSlot] = []
    t0 = time.perf_counter()
    source = MediaSource(str(clip), sample_rate)
    a = WindowAssembler(fps, frames_per_window, sample_rate, source.video is not None,
                        source.audio is not None, windows.append, slots.append, origin=source.origin)
    try:
        for item in source:
            a.push(item)
        a.push(None)
    finally:
        source.close()
    return windows, slots, time.perf_counter() - t0


class _CellRun:
    """One backend's measurements over the windows of one (FPS, window) cell."""

    def __init__(self, backend, label: str, preset: str, slots: list[FrameSlot], first: Window | None,
                 max_new_tokens: int):
        from runtime.selection import describe

        t = backend.cfg.timing
        self.cell = Cell(preset, label, t.video_fps, t.frames_per_window, t.window_seconds, engine=describe(backend))
        self.cap = StreamingCaptioner(backend, BENCH_PROMPT, max_new_tokens=max_new_tokens, context=1)
        self.by_window: dict[int, list[FrameSlot]] = {}
        for s in slots:
            self.by_window.setdefault(s.window, []).append(s)
        if first is not None:  # warm-up: one caption (allocations, lazy init), then forget it
            for s in self.by_window.get(first.index, []):
                self.cap.on_frame(s)
            self.cap.caption([first])
            self.cap.history.clear()
            self.cap.encoded.clear()
            self.cap.ahead_seconds.clear()
        self.latencies: list[float] = []
        self.ttft: list[float] = []
        self.stage_sums: dict[str, float] = {}
        self.ahead_total = self.caption_total = 0.0
        self.tokens_in: list[int] = []
        self.tokens_out: list[int] = []

    def step(self, w: Window) -> None:
        """Window w as a stream that keeps up: its frames encoded as they arrive, then the caption."""
        t0 = time.perf_counter()
        for s in self.by_window.get(w.index, []):
            self.cap.on_frame(s)
        t1 = time.perf_counter()
        c = self.cap.caption([w])
        t2 = time.perf_counter()
        self.ahead_total += t1 - t0
        self.caption_total += t2 - t1
        self.latencies.append(t2 - t1)
        self.ttft.append(t2 - t1 - c.stages.get("llm_decode", 0.0))
        for k, v in c.stages.items():
            self.stage_sums[k] = self.stage_sums.get(k, 0.0) + v
        self.stage_sums["visual"] = self.stage_sums.get("visual", 0.0) + c.visual_ahead
        self.tokens_in.append(c.llm_input_tokens)
        self.tokens_out.append(c.new_tokens)

    def finish(self, media_s: float, decode_share: float, peak_rss_mb: float) -> Cell:
        cell, n, lat = self.cell, len(self.latencies), self.latencies
        cell.windows = n
        cell.latency_p50, cell.latency_p95, cell.latency_max = statistics.median(lat), _quantile(lat, 0.95), max(lat)
        cell.ttft_p50, cell.ttft_p95 = statistics.median(self.ttft), _quantile(self.ttft, 0.95)
        decode_s = self.stage_sums.get("llm_decode", 0.0)
        # each caption's first token comes from prefill; the decode steps produce the rest
        steps = sum(max(t - 1, 0) for t in self.tokens_out)
        cell.decode_tok_s = steps / decode_s if decode_s > 0 else math.nan
        cell.throughput = media_s / (decode_share + self.ahead_total + self.caption_total)
        cell.llm_input_tokens = statistics.mean(self.tokens_in)
        cell.new_tokens = statistics.mean(self.tokens_out)
        cell.stages = {"decode": decode_share / n, **{k: v / n for k, v in self.stage_sums.items()}}
        cell.peak_rss_mb = peak_rss_mb
        return cell


def run_cells(backends: list[tuple[str, object]], preset: str, clip: Path, max_new_tokens: int,
              max_windows: int | None) -> list[Cell]:
    """Every backend over the same windows, round-robin: window w runs on each backend in turn (the
    order alternating per window), so a load change on the machine hits every backend alike.

    The clip is decoded and assembled once; each backend's "decode" share is that time. Peak RSS is
    the process's over the round, every backend loaded (one number for the whole round)."""
    t = backends[0][1].cfg.timing
    windows, slots, decode_s = assemble(clip, t.video_fps, t.frames_per_window, t.sample_rate)
    runs = [_CellRun(b, label, preset, slots, windows[0] if windows else None, max_new_tokens)
            for label, b in backends]
    _reset_peak_rss()
    use = windows[:max_windows] if max_windows else windows
    for i, w in enumerate(use):
        for r in (runs if i % 2 == 0 else runs[::-1]):
            r.step(w)
    media_s = sum(w.end - w.start for w in use)
    decode_share = decode_s * len(use) / max(len(windows), 1)  # decode time of the windows measured
    peak = _peak_rss_mb()
    return [r.finish(media_s, decode_share, peak) for r in runs]


def run_cell(backend, preset: str, clip: Path, max_new_tokens: int, max_windows: int | None) -> Cell:
    """One backend alone (run_cells with one backend)."""
    return run_cells([(backend.name, backend)], preset, clip, max_new_tokens, max_windows)[0]


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default 'linear' method)."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


# -- the sweep ------------------------------------------------------------------------------------

STAGE_COLUMNS = ("decode", "visual", "audio", "fusion", "llm_prefill", "llm_decode")


def _preset_model(preset: str):
    from favor.build import build_model
    from favor.config import get_config

    cfg = get_config(preset)
    torch.manual_seed(0)
    return build_model(cfg, pretrained=False, tokenizer=synthetic_tokenizer(cfg.llm.vocab_size))


def _backend(name: str, base, model_path: Path | None, fps: float, frames_per_window: int, out: Path,
             console=None, threads: int | None = None, max_batch: int = 1):
    """``max_batch`` > 1: bundles with a batch axis (--streams: one StreamHub batches across streams)."""
    from export.options import ExportOptions
    from runtime.backends import TorchBackend, make_backend

    if model_path is not None:  # a checkpoint: auto / onnxruntime export it through the bundle cache
        from runtime.bundle_cache import ExportView, Policy

        view = ExportView(console) if console is not None else None
        options = ExportOptions(max_batch=max_batch) if max_batch > 1 else None
        try:
            return make_backend(name, model_path, fps, frames_per_window, threads=threads,
                                policy=Policy(say=view, options=options))
        finally:
            if view is not None:
                view.close()
    model = retimed(base, fps, frames_per_window)
    if name == "torch":
        return TorchBackend(model)
    if name in ("onnxruntime", "onnxruntime-int8"):
        from export.bundle import export_bundle
        from runtime.backends import OnnxRuntimeBackend

        int8 = name.endswith("int8")
        batch = f"_b{max_batch}" if max_batch > 1 else ""
        bundle = out / "bundles" / f"{base.cfg.preset}_{fps:g}fps_{frames_per_window}f{'_int8' if int8 else ''}{batch}"
        if not (bundle / "manifest.json").is_file():
            export_bundle(model, bundle, ExportOptions(precision="int8" if int8 else "fp32", max_batch=max_batch))
        backend = OnnxRuntimeBackend(bundle, threads=torch.get_num_threads())  # int8: the bundle's decoder
        backend.name = name
        return backend
    return make_backend(name, out, fps, frames_per_window)  # names what is missing in one line


def main(preset: str, model: Path | None, backends: list[str], fps_values: list[float],
         window_values: list[int], clip: Path | None, seconds: float, max_new_tokens: int, out: Path,
         max_windows: int | None, console, threads: int | None = None, streams: list[int] | None = None,
         max_latency: float | None = None) -> list:
    if not backends or not fps_values or not window_values:
        raise ValueError("bench needs at least one backend, one --fps and one --window value")
    if streams:  # the --streams axis: live streams through one StreamHub (runtime/bench_streams.py)
        if max_windows:  # every stream ends after that many windows of the longest window asked
            seconds = min(seconds, max_windows * max(F / f for f in fps_values for F in window_values))
        return _streams_main(preset, model, backends, fps_values, window_values, clip, seconds, max_new_tokens,
                             out, console, threads, streams, max_latency)
    out.mkdir(parents=True, exist_ok=True)
    if clip is None:
        clip = out / f"synthetic_{seconds:g}s.mp4"
        if not clip.exists():
            write_clip(clip, seconds, fps=CLIP_FPS, size=CLIP_SIZE)
    elif not clip.is_file():
        raise ValueError(f"{clip}: clip not found")
    name = model.stem if model is not None else preset
    base = None if model is not None else _preset_model(preset)
    info = machine()
    console.print(f"bench {name} on {info['cpu']} ({info['cores']} cores, {info['torch_threads']} torch threads), "
                  f"clip {clip}")
    cells: list[Cell] = []
    progress = CellProgress(len(fps_values) * len(window_values), console)
    for fps in fps_values:
        for F in window_values:
            progress.next(f"{fps:g} FPS x {F} frames")
            ready, failed = [], []
            for backend_name in backends:  # every backend of the cell loaded, then measured round-robin
                try:
                    ready.append((backend_name, _backend(backend_name, base, model, fps, F, out, console, threads)))
                except ValueError as e:  # e.g. a window longer than the Q-Former's position table
                    failed.append(Cell(name, backend_name, fps, F, F / fps, note=str(e).split(";")[0]))
            done = run_cells(ready, name, clip, max_new_tokens, max_windows) if ready else []
            for cell in done + failed:
                cells.append(cell)
                console.print(_summary(cell))
            del ready  # free this cell's models before the next cell loads its own
    stem = out / f"bench_{name}"
    write_outputs(cells, stem, info, clip)
    console.print(f"wrote {stem}.md (table), {stem}.png (plot), {stem}.csv and {stem}.jsonl")
    return cells


def _streams_main(preset, model, backends, fps_values, window_values, clip, seconds, max_new_tokens, out,
                  console, threads, streams: list[int], max_latency: float | None) -> list:
    from runtime import bench_streams

    out.mkdir(parents=True, exist_ok=True)
    if clip is None:
        clip = bench_streams.streams_clip(out, seconds)
    elif not clip.is_file():
        raise ValueError(f"{clip}: clip not found")
    name = model.stem if model is not None else preset
    base = None if model is not None else _preset_model(preset)
    info = machine()
    console.print(f"bench {name}: {','.join(map(str, streams))} live streams through one StreamHub on "
                  f"{info['cpu']} ({info['cores']} cores), clip {clip}")

    def backends_for(fps: float, F: int) -> list:
        return [(b, _backend(b, base, model, fps, F, out, console, threads, max_batch=max(streams)))
                for b in backends]

    return bench_streams.sweep(backends_for, streams, fps_values, window_values, clip, max_new_tokens,
                               max_latency, name, out, console, info)


class CellProgress:
    """'cell k/N ... elapsed, ~t left' before each cell; time left = mean time per cell so far x cells left."""

    def __init__(self, total: int, console):
        self.total, self.console, self.done = total, console, 0
        self.t0 = time.monotonic()

    def next(self, what: str) -> None:
        elapsed = time.monotonic() - self.t0
        left = f", ~{elapsed / self.done * (self.total - self.done):.0f} s left" if self.done else ""
        self.done += 1
        self.console.print(f"cell {self.done}/{self.total}: {what} ({elapsed:.0f} s elapsed{left})")


def _label(c: Cell) -> str:
    """'auto = onnxruntime (CPU; threads ...)' when the name asked for is not what ran."""
    return c.backend if not c.engine or c.engine == c.backend else f"{c.backend} = {c.engine}"


def _summary(c: Cell) -> str:
    if c.note:
        return f"  {c.backend:11s} {c.fps:g} FPS x {c.frames_per_window:2d}: n/a ({c.note})"
    return (f"  {_label(c):11s} {c.fps:g} FPS x {c.frames_per_window:2d} ({c.window_seconds:g} s): "
            f"p50 {c.latency_p50:.3f} s, p95 {c.latency_p95:.3f} s, max {c.latency_max:.3f} s, "
            f"first token p95 {c.ttft_p95:.3f} s, {c.decode_tok_s:.0f} tok/s, "
            f"throughput {c.throughput:.2f}x real time, {c.llm_input_tokens:.0f} LLM tokens in, "
            f"peak RSS {c.peak_rss_mb:.0f} MB")


def write_outputs(cells: list[Cell], stem: Path, info: dict, clip: Path) -> None:
    header = ["preset", "backend", "fps", "frames_per_window", "window_s", "windows", "latency_p50_s",
              "latency_p95_s", "latency_max_s", "ttft_p50_s", "ttft_p95_s", "decode_tok_s", "throughput_x",
              "llm_input_tokens", "new_tokens",
              *[f"{s}_s" for s in STAGE_COLUMNS], "peak_rss_mb", "note", "engine"]
    rows = []
    for c in cells:
        rows.append([c.preset, c.backend, f"{c.fps:g}", c.frames_per_window, f"{c.window_seconds:g}", c.windows,
                     *(f"{x:.4f}" for x in (c.latency_p50, c.latency_p95, c.latency_max, c.ttft_p50, c.ttft_p95)),
                     f"{c.decode_tok_s:.1f}", f"{c.throughput:.3f}", f"{c.llm_input_tokens:.1f}", f"{c.new_tokens:.1f}",
                     *(f"{c.stages.get(s, math.nan):.4f}" for s in STAGE_COLUMNS),
                     f"{c.peak_rss_mb:.0f}", c.note, c.engine])
    with open(stem.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    with open(stem.with_suffix(".jsonl"), "w") as fh:
        for c in cells:
            fh.write(json.dumps({**asdict(c), "machine": info, "clip": str(clip)}) + "\n")
    md = [f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
          f"({info['torch_threads']} threads, {info['dtype']}), commit {info['commit']}, "
          f"1-min load average {info['load_avg_1m']:.2f} at start, {os.getloadavg()[0]:.2f} at the end. "
          f"Clip: {clip.name}.", "",
          "| backend | FPS | F | window s | latency p50 / p95 / max s | first token p50 / p95 s | decode tok/s | "
          "throughput x | LLM tokens in | "
          "decode / visual / audio / fusion / prefill / LLM decode s per window | peak RSS MB |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        if c.note:
            md.append(f"| {c.backend} | {c.fps:g} | {c.frames_per_window} | {c.window_seconds:g} | n/a: {c.note} "
                      "| | | | | | |")
            continue
        stages = " / ".join(f"{c.stages.get(s, math.nan):.3f}" for s in STAGE_COLUMNS)
        md.append(f"| {_label(c)} | {c.fps:g} | {c.frames_per_window} | {c.window_seconds:g} | "
                  f"{c.latency_p50:.3f} / {c.latency_p95:.3f} / {c.latency_max:.3f} | "
                  f"{c.ttft_p50:.3f} / {c.ttft_p95:.3f} | {c.decode_tok_s:.0f} | {c.throughput:.2f} | "
                  f"{c.llm_input_tokens:.0f} | {stages} | {c.peak_rss_mb:.0f} |")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    plot(cells, stem.with_suffix(".png"))


def plot(cells: list[Cell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [c for c in cells if not c.note]
    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {b: s for b, s in zip(sorted({c.backend for c in ok}), ("-o", "--s", ":^"), strict=False)}
    for (backend, F) in sorted({(c.backend, c.frames_per_window) for c in ok}):
        row = sorted((c for c in ok if c.backend == backend and c.frames_per_window == F), key=lambda c: c.fps)
        fps = [c.fps for c in row]
        label = f"{backend}, F={F}"
        ax_lat.plot(fps, [c.latency_p95 for c in row], styles[backend], label=label)
        ax_thr.plot(fps, [c.throughput for c in row], styles[backend], label=label)
    ax_lat.set(xscale="log", yscale="log", xlabel="FPS", ylabel="p95 window latency (s)",
               title="end-of-window to caption")
    ax_thr.set(xscale="log", yscale="log", xlabel="FPS", ylabel="media s per wall s",
               title="throughput (1 / real-time factor)")
    ax_thr.axhline(1.0, color="grey", lw=0.8)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ticks = sorted({c.fps for c in ok})
    for ax in (ax_lat, ax_thr):
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax_lat.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
