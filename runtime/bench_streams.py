"""``favor-rt bench --streams 1,2,4,8``: how many live streams one engine sustains through the StreamHub.

For each (FPS, window, backend) cell and each stream count N, N copies of the clip are added to one
StreamHub (runtime/hub.py) as live streams, paced by their timestamps, with a fixed latency bound
(``--max-latency``, default one window; not raised on a slow device, so saturation shows as drops).
Reported per N (formulas):

    captioned share     windows captioned / windows that closed, over all N streams (1 = nothing dropped)
    throughput x        captioned media seconds / wall seconds from the first add to the last end event
                        (N streams kept up with = about N x; the paced clip bounds it from above)
    latency p50 / p95   seconds from a window's close to its caption, over every caption of every
                        stream; ``worst p95`` is the largest of the per-stream p95s
    sustained           share == 1 and worst p95 <= the bound
    mean decode batch   rows per decode step (continuous batching at work)
    peak RSS            VmHWM of this process during the cell

A stream count the batch axis of a bundle cannot take in one call is still run (calls are split).
With ``--model`` and auto / onnxruntime, the bundle is exported with ``max_batch`` = the largest N
(bundle cache key ``max_batch``), so audio encoder and fusion see whole batches.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from runtime.bench import _peak_rss_mb, _quantile, _reset_peak_rss

# Seconds to wait for the last stream's end event past the clip's own length (model start-up, the
# last caption's decode): a hub that loses an end event fails the cell instead of hanging.
END_GRACE_S = 120.0


@dataclass
class StreamsCell:
    preset: str
    backend: str
    fps: float
    frames_per_window: int
    streams: int
    bound_s: float
    windows: int = 0  # closed, over all streams
    captioned: int = 0
    dropped_late: int = 0
    dropped_overflow: int = 0
    share: float = math.nan
    throughput: float = math.nan
    latency_p50: float = math.nan
    latency_p95: float = math.nan
    worst_stream_p95: float = math.nan
    latency_max: float = math.nan
    mean_decode_batch: float = math.nan
    wall_s: float = math.nan
    peak_rss_mb: float = math.nan
    sustained: bool = False
    errors: list[str] = field(default_factory=list)
    engine: str = ""


def run_hub(backend, clip: Path, n: int, bound: float, max_new_tokens: int, preset: str, label: str,
            realtime: bool = True) -> StreamsCell:
    """N copies of ``clip`` through one StreamHub; waits for every end event."""
    from runtime.hub import StreamHub
    from runtime.selection import describe

    t = backend.cfg.timing
    cell = StreamsCell(preset, label, t.video_fps, t.frames_per_window, n, bound, engine=describe(backend))
    _reset_peak_rss()
    t0 = time.monotonic()
    with StreamHub(backend, max_streams=n, max_latency=bound, max_merge=1, max_new_tokens=max_new_tokens) as hub:
        subs = [hub.subscribe(hub.add(str(clip), realtime=realtime, name=f"bench{i}")) for i in range(n)]
        deadline = t0 + END_GRACE_S + _clip_seconds(clip)
        caps: list[list[dict]] = [[] for _ in range(n)]
        for i, sub in enumerate(subs):
            while True:
                event = sub.get(timeout=max(deadline - time.monotonic(), 0.01))
                if event is None:
                    cell.errors.append(f"stream {i}: no end event in time")
                    break
                if event["type"] == "caption":
                    caps[i].append(event)
                elif event["type"] == "end":
                    if event["reason"] != "eof":
                        cell.errors.append(f"stream {i}: {event['reason']} {event['error'] or ''}".strip())
                    break
        cell.wall_s = time.monotonic() - t0
        m = hub.metrics()
    cell.peak_rss_mb = _peak_rss_mb()
    return summarise(cell, caps, m)


def summarise(cell: StreamsCell, caps: list[list[dict]], metrics: dict) -> StreamsCell:
    per = list(metrics["streams"].values())
    cell.windows = sum(p["windows"] for p in per)
    cell.dropped_late = sum(p["dropped_late"] for p in per)
    cell.dropped_overflow = sum(p["dropped_overflow"] for p in per)
    cell.captioned = sum(len(c["windows"]) for stream in caps for c in stream)
    cell.share = cell.captioned / cell.windows if cell.windows else math.nan
    media = sum(c["end"] - c["start"] for stream in caps for c in stream)
    cell.throughput = media / cell.wall_s if cell.wall_s else math.nan
    lat = [c["latency"] for stream in caps for c in stream if c["latency"] is not None]
    if lat:
        cell.latency_p50, cell.latency_p95, cell.latency_max = statistics.median(lat), _quantile(lat, 0.95), max(lat)
        cell.worst_stream_p95 = max(_quantile([c["latency"] for c in s], 0.95) for s in caps if s)
    cell.mean_decode_batch = metrics["totals"]["mean_decode_batch"] or math.nan
    cell.sustained = (not cell.errors and cell.share == 1.0 and cell.worst_stream_p95 <= cell.bound_s)
    return cell


def _clip_seconds(clip: Path) -> float:
    import av

    with av.open(str(clip)) as c:
        return float(c.duration or 0) / 1e6


def streams_clip(out: Path, seconds: float) -> Path:
    """The generated clip every stream plays (``seconds`` long: --max-windows shortens it)."""
    from runtime.synthclip import write_clip

    path = out / f"streams_{seconds:g}s.mp4"
    if not path.exists():
        from runtime.bench import CLIP_FPS, CLIP_SIZE

        write_clip(path, seconds, fps=CLIP_FPS, size=CLIP_SIZE)
    return path


def summary_line(c: StreamsCell) -> str:
    state = "sustained" if c.sustained else "NOT sustained"
    err = f"; errors: {'; '.join(c.errors)}" if c.errors else ""
    return (f"  {c.backend} {c.fps:g} FPS x {c.frames_per_window} - {c.streams} streams: {state}, captioned "
            f"{c.captioned}/{c.windows} windows, throughput {c.throughput:.2f}x, latency p50 {c.latency_p50:.2f} s "
            f"p95 {c.latency_p95:.2f} s (worst stream {c.worst_stream_p95:.2f} s, bound {c.bound_s:g} s), "
            f"mean decode batch {c.mean_decode_batch:.2f}{err}")


def write_outputs(cells: list[StreamsCell], stem: Path, info: dict, clip: Path) -> None:
    import csv
    import json
    import os
    from dataclasses import asdict

    header = ["preset", "backend", "fps", "frames_per_window", "streams", "bound_s", "windows", "captioned",
              "dropped_late", "dropped_overflow", "share", "throughput_x", "latency_p50_s", "latency_p95_s",
              "worst_stream_p95_s", "latency_max_s", "mean_decode_batch", "wall_s", "peak_rss_mb", "sustained",
              "engine"]
    with open(stem.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for c in cells:
            w.writerow([c.preset, c.backend, f"{c.fps:g}", c.frames_per_window, c.streams, f"{c.bound_s:g}",
                        c.windows, c.captioned, c.dropped_late, c.dropped_overflow, f"{c.share:.3f}",
                        f"{c.throughput:.3f}", *(f"{x:.3f}" for x in (c.latency_p50, c.latency_p95,
                                                                       c.worst_stream_p95, c.latency_max)),
                        f"{c.mean_decode_batch:.2f}", f"{c.wall_s:.1f}", f"{c.peak_rss_mb:.0f}", c.sustained,
                        c.engine])
    with open(stem.with_suffix(".jsonl"), "w") as fh:
        for c in cells:
            fh.write(json.dumps({**asdict(c), "machine": info, "clip": str(clip)}) + "\n")
    md = [f"Machine: {info['cpu']}, {info['cores']} cores, commit {info['commit']}, 1-min load average "
          f"{info['load_avg_1m']:.2f} at start, {os.getloadavg()[0]:.2f} at the end. Clip: {clip.name}, paced "
          "live; every stream through one StreamHub (batched encoders, continuous-batched decoder).", "",
          "| backend | FPS | F | streams | captioned / windows | drops late / overflow | throughput x | "
          "latency p50 / p95 / worst-stream p95 / max s | bound s | mean decode batch | peak RSS MB | sustained |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        md.append(f"| {c.backend} | {c.fps:g} | {c.frames_per_window} | {c.streams} | {c.captioned} / {c.windows} | "
                  f"{c.dropped_late} / {c.dropped_overflow} | {c.throughput:.2f} | {c.latency_p50:.2f} / "
                  f"{c.latency_p95:.2f} / {c.worst_stream_p95:.2f} / {c.latency_max:.2f} | {c.bound_s:g} | "
                  f"{c.mean_decode_batch:.2f} | {c.peak_rss_mb:.0f} | {'yes' if c.sustained else 'no'} |")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    plot(cells, stem.with_suffix(".png"))


def plot(cells: list[StreamsCell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_thr, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key in sorted({(c.backend, c.fps, c.frames_per_window) for c in cells}):
        row = sorted((c for c in cells if (c.backend, c.fps, c.frames_per_window) == key), key=lambda c: c.streams)
        label = f"{key[0]}, {key[1]:g} FPS x {key[2]}"
        n = [c.streams for c in row]
        ax_thr.plot(n, [c.throughput for c in row], "-o", label=label)
        ax_lat.plot(n, [c.worst_stream_p95 for c in row], "-o", label=label)
    top = max((c.streams for c in cells), default=1)
    ax_thr.plot([1, top], [1, top], color="grey", lw=0.8, ls="--", label="every stream kept up")
    bounds = sorted({c.bound_s for c in cells})
    for b in bounds:
        ax_lat.axhline(b, color="grey", lw=0.8, ls="--")
    ax_thr.set(xlabel="live streams", ylabel="captioned media s per wall s", title="total throughput")
    ax_lat.set(xlabel="live streams", ylabel="worst per-stream p95 latency (s)",
               title="window close to caption (dashed: bound)")
    for ax in (ax_thr, ax_lat):
        ax.grid(True, alpha=0.3)
        ax.set_xticks(sorted({c.streams for c in cells}))
    ax_thr.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep(backends_for, streams: list[int], fps_values: list[float], window_values: list[int], clip: Path,
          max_new_tokens: int, max_latency: float | None, name: str, out: Path, console, info: dict
          ) -> list[StreamsCell]:
    """Every cell x stream count; ``backends_for(fps, F)`` -> [(label, backend)] loaded for the cell.
    Stream counts of a cell run in the order given, each backend in turn (round-robin)."""
    cells: list[StreamsCell] = []
    for fps in fps_values:
        for F in window_values:
            ready = backends_for(fps, F)
            for n in streams:
                for label, backend in ready:
                    bound = max_latency or backend.cfg.timing.window_seconds
                    cell = run_hub(backend, clip, n, bound, max_new_tokens, name, label)
                    console.print(summary_line(cell))
                    cells.append(cell)
            del ready
    stem = out / f"bench_streams_{name}"
    write_outputs(cells, stem, info, clip)
    console.print(f"wrote {stem}.md (table), {stem}.png (plot), {stem}.csv and {stem}.jsonl")
    return cells
