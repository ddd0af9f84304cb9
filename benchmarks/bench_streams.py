"""Live streams on one machine: one StreamHub (batched) vs N independent `favor-rt run` processes.

    .venv/bin/python -m benchmarks.bench_streams compare                          # 1,2,4,8 streams, demo
    .venv/bin/python -m benchmarks.bench_streams compare --streams 2 --max-windows 2  # smoke: one cell

Setting (issue 13's target): the demo model (favor/assets/demo/favor-demo.safetensors), 2 FPS x
10-frame windows (5 s), every stream a live-paced copy of the same generated clip (camera-like
320x240 at 25 FPS, with sound), the latency bound fixed at one window (``--max-latency 5`` for both
arms: never raised, so an arm that cannot keep up shows it as drops), no merging of late windows
(``--max-merge 1`` for both: a caption covers one window, so captioned windows compare directly).

Arms, per stream count N, run round-robin in the same invocation (each repeat alternates which arm
goes first), each in its own process(es) so neither inherits the other's warm caches or threads:
  hub         one process: the auto backend (as favor.load picks it) over the demo's compiled bundle
              exported with max_batch 8
              (audio encoder and fusion take a batch axis), a StreamHub with N streams: windows of all
              streams through the encoders as batches, captions continuous-batched in the decoder
  processes   N concurrent `favor-rt run CLIP --fps 2 --window 10 --max-latency 5 --max-merge 1 --jsonl ...`
              processes on the default compiled bundle (batch 1), as a user would start them
  hub-serial  (with --arms hub-serial) the hub with batching off: streams interleaved, one caption
              at a time through Backend.caption; isolates what batching buys from sharing one process

Both bundles are exported into the bundle cache before anything is timed.

Reported per (arm, N) (formulas):
  captioned share    windows captioned / windows in the N paced clips (1 = nothing dropped)
  throughput x       captioned media seconds / the clip's media seconds = streams kept up with (N at most):
                     every stream plays the clip in real time, so the clip length is the wall time
                     of the streaming part (start-up excluded; reported separately as wall s)
  latency            seconds from a window's close to its caption (each caption's ``latency``):
                     p50 / p95 over all captions, and the worst per-stream p95
  sustained          share == 1 and worst per-stream p95 <= bound
  mean decode batch  (hub) rows per decode step
Records: <out>/bench_streams.{jsonl,md,csv,png}, machine, commit and the 1-min load average before
and after each cell. Do not trust numbers taken while other jobs load the machine.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from benchmarks.common import machine, machine_line

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEMO = REPO / "favor" / "assets" / "demo" / "favor-demo.safetensors"
PY = sys.executable
ARMS = ("hub", "processes", "hub-serial")
HUB_MAX_BATCH = 8  # the hub's bundle: batch axis up to the largest stream count measured
app = typer.Typer(add_completion=False, no_args_is_help=False)


@dataclass
class Result:
    arm: str
    streams: int
    repeat: int
    windows: int = 0
    captioned: int = 0
    share: float = math.nan
    throughput: float = math.nan
    latency_p50: float = math.nan
    latency_p95: float = math.nan
    worst_stream_p95: float = math.nan
    latency_max: float = math.nan
    mean_decode_batch: float | None = None
    wall_s: float = math.nan  # launch to the last stream's end, start-up included
    load_before: float = math.nan
    load_after: float = math.nan
    sustained: bool = False
    errors: list[str] = field(default_factory=list)


def quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def score(r: Result, per_stream: list[list[dict]], media_s: float, windows_per_stream: int, bound: float) -> Result:
    """Fill the derived numbers from each stream's captions (dicts with windows, start, end, latency)."""
    r.windows = windows_per_stream * r.streams
    r.captioned = sum(len(c["windows"]) for s in per_stream for c in s)
    r.share = r.captioned / r.windows if r.windows else math.nan
    r.throughput = sum(c["end"] - c["start"] for s in per_stream for c in s) / media_s
    lat = [c["latency"] for s in per_stream for c in s if c.get("latency") is not None]
    if lat:
        r.latency_p50, r.latency_p95, r.latency_max = statistics.median(lat), quantile(lat, 0.95), max(lat)
        r.worst_stream_p95 = max(quantile([c["latency"] for c in s if c.get("latency") is not None], 0.95)
                                 for s in per_stream if s)
    r.sustained = not r.errors and r.captioned == r.windows and r.worst_stream_p95 <= bound
    return r


# -- the arms ----------------------------------------------------------------------------------------
def run_processes(clip: Path, n: int, model: Path, fps: float, window: int, bound: float, tokens: int,
                  work: Path, threads: str | None) -> tuple[list[list[dict]], float, list[str]]:
    """N concurrent `favor-rt run` processes; their JSON lines are the captions."""
    cmd = [PY, "-m", "runtime", "run", str(clip), "--model", str(model), "--fps", f"{fps:g}", "--window",
           str(window), "--max-latency", f"{bound:g}", "--max-merge", "1", "--max-new-tokens", str(tokens), "--no-live"]
    if threads:
        cmd += ["--threads", threads]
    outs = [work / f"proc{i}.jsonl" for i in range(n)]
    for o in outs:
        o.unlink(missing_ok=True)
    t0 = time.monotonic()
    procs = [subprocess.Popen([*cmd, "--jsonl", str(o)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, cwd=REPO) for o in outs]
    errors = []
    for i, p in enumerate(procs):
        _, err = p.communicate()
        if p.returncode not in (0, 3):  # 3: every window dropped (counted as such, not an error)
            errors.append(f"process {i}: exit {p.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}")
    wall = time.monotonic() - t0
    per_stream = [[json.loads(line) for line in o.read_text().splitlines() if line.strip()] if o.exists() else []
                  for o in outs]
    return per_stream, wall, errors


def run_hub_child(clip: Path, n: int, model: Path, fps: float, window: int, bound: float, tokens: int,
                  work: Path, batch: bool) -> tuple[list[list[dict]], float, list[str], float | None]:
    """The hub arm in its own process (this script's `hub` command); returns what it recorded."""
    out = work / f"hub_{n}_{int(batch)}.json"
    out.unlink(missing_ok=True)
    cmd = [PY, "-m", "benchmarks.bench_streams", "hub", str(clip), "--streams", str(n), "--model", str(model),
           "--fps", f"{fps:g}", "--window", str(window), "--max-latency", f"{bound:g}", "--max-new-tokens",
           str(tokens), "--result", str(out), "--batch" if batch else "--no-batch"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.monotonic() - t0
    if p.returncode != 0 or not out.exists():
        tail = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
        return [[] for _ in range(n)], wall, [f"hub: exit {p.returncode}: {tail}"], None
    rec = json.loads(out.read_text())
    return rec["captions"], wall, rec["errors"], rec["mean_decode_batch"]


def open_engine(model: Path, fps: float, window: int, max_batch: int):
    """favor.load's backend selection over a bundle with a batch axis (bundle cache key max_batch)."""
    from export.options import ExportOptions
    from runtime.backends import make_backend
    from runtime.bundle_cache import Policy

    options = ExportOptions(max_batch=max_batch) if max_batch > 1 else None
    return make_backend("auto", model, fps, window, policy=Policy(options=options))


@app.command("hub", hidden=True)
def hub_command(clip: Path, streams: Annotated[int, typer.Option()], model: Annotated[Path, typer.Option()],
                fps: Annotated[float, typer.Option()], window: Annotated[int, typer.Option()],
                max_latency: Annotated[float, typer.Option()], max_new_tokens: Annotated[int, typer.Option()],
                result: Annotated[Path, typer.Option()],
                batch: Annotated[bool, typer.Option("--batch/--no-batch")] = True) -> None:
    """(child process) N paced streams through one StreamHub; writes the captions as JSON."""
    from favor.quiet import quiet_libraries

    quiet_libraries(False)
    from runtime.hub import StreamHub

    engine = open_engine(model, fps, window, HUB_MAX_BATCH)
    caps: list[list[dict]] = [[] for _ in range(streams)]
    errors: list[str] = []
    with StreamHub(engine, max_streams=streams, max_latency=max_latency, max_merge=1,
                   max_new_tokens=max_new_tokens, batch=batch) as hub:
        subs = [hub.subscribe(hub.add(str(clip), realtime=True)) for _ in range(streams)]
        for i, sub in enumerate(subs):
            for event in sub:
                if event["type"] == "caption":
                    caps[i].append(event)
                elif event["type"] == "end" and event["reason"] != "eof":
                    errors.append(f"stream {i}: {event['reason']}: {event['error']}")
        mean_batch = hub.metrics()["totals"]["mean_decode_batch"]
    result.write_text(json.dumps({"captions": caps, "errors": errors, "mean_decode_batch": mean_batch}))


# -- the comparison ------------------------------------------------------------------------------------
def prepare(model: Path, fps: float, window: int, clip_s: float, out: Path) -> Path:
    """The clip, and both bundles in the bundle cache (exported here, untimed)."""
    from runtime.bench import CLIP_FPS, CLIP_SIZE
    from runtime.synthclip import write_clip

    clip = out / f"streams_clip_{clip_s:g}s.mp4"
    if not clip.exists():
        write_clip(clip, clip_s, fps=CLIP_FPS, size=CLIP_SIZE)
    for max_batch in (1, HUB_MAX_BATCH):
        open_engine(model, fps, window, max_batch)
    return clip


def count_windows(clip: Path, fps: float, window: int) -> tuple[int, float]:
    """Windows one stream of ``clip`` closes: the runtime's own assembler over the clip (the last frame
    lasts its duration, so a clip a little longer than whole windows has a short last one)."""
    from favor.config import FavorConfig
    from runtime.bench import assemble

    windows, _, _ = assemble(clip, fps, window, FavorConfig().timing.sample_rate)
    return len(windows), sum(w.end - w.start for w in windows)  # (windows, media seconds they span)


def write(results: list[Result], out: Path, info: dict, clip: Path, bound: float) -> None:
    with open(out / "bench_streams.jsonl", "a") as fh:
        for r in results:
            fh.write(json.dumps({**asdict(r), "machine": info, "clip": clip.name, "bound_s": bound}) + "\n")
    rows = []
    for arm in ARMS:
        for n in sorted({r.streams for r in results}):
            rs = [r for r in results if r.arm == arm and r.streams == n]
            if rs:
                rows.append(_median_row(rs))
    header = ["arm", "streams", "repeats", "captioned / windows", "throughput x", "latency p50 s", "latency p95 s",
              "worst stream p95 s", "max s", "mean decode batch", "wall s", "load before / after", "sustained"]
    with open(out / "bench_streams.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    md = [machine_line(info) + f" Clip {clip.name}, paced live; bound {bound:g} s; medians over repeats.", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    (out / "bench_streams.md").write_text("\n".join(md) + "\n")
    plot(results, out / "bench_streams.png", bound)


def _median_row(rs: list[Result]) -> list:
    def med(xs):
        xs = [x for x in xs if x is not None and not math.isnan(x)]
        return statistics.median(xs) if xs else math.nan

    r = rs[0]
    return [r.arm, r.streams, len(rs), f"{med([x.captioned for x in rs]):.0f} / {r.windows}",
            f"{med([x.throughput for x in rs]):.2f}", f"{med([x.latency_p50 for x in rs]):.2f}",
            f"{med([x.latency_p95 for x in rs]):.2f}", f"{med([x.worst_stream_p95 for x in rs]):.2f}",
            f"{med([x.latency_max for x in rs]):.2f}",
            "" if r.mean_decode_batch is None else f"{med([x.mean_decode_batch for x in rs]):.2f}",
            f"{med([x.wall_s for x in rs]):.0f}",
            f"{med([x.load_before for x in rs]):.2f} / {med([x.load_after for x in rs]):.2f}",
            "yes" if all(x.sustained for x in rs) else "no"]


def plot(results: list[Result], path: Path, bound: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_thr, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm, style in zip(ARMS, ("-o", "--s", ":^"), strict=True):
        ns = sorted({r.streams for r in results if r.arm == arm})
        if not ns:
            continue
        thr = [statistics.median([r.throughput for r in results if r.arm == arm and r.streams == n]) for n in ns]
        lat = [statistics.median([r.worst_stream_p95 for r in results if r.arm == arm and r.streams == n]) for n in ns]
        ax_thr.plot(ns, thr, style, label=arm)
        ax_lat.plot(ns, lat, style, label=arm)
    top = max(r.streams for r in results)
    ax_thr.plot([1, top], [1, top], color="grey", lw=0.8, ls="--", label="every stream kept up")
    ax_lat.axhline(bound, color="grey", lw=0.8, ls="--", label="bound")
    ax_thr.set(xlabel="live streams", ylabel="captioned media s / one clip's media s", title="total throughput")
    ax_lat.set(xlabel="live streams", ylabel="worst per-stream p95 latency (s)", title="window close to caption")
    for ax in (ax_thr, ax_lat):
        ax.grid(True, alpha=0.3)
        ax.set_xticks(sorted({r.streams for r in results}))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@app.command("compare")
def compare(
    streams: Annotated[str, typer.Option(help="comma-separated stream counts")] = "1,2,4,8",
    arms: Annotated[str, typer.Option(help=f"comma-separated, from {', '.join(ARMS)}")] = "hub,processes",
    model: Annotated[Path, typer.Option(help="checkpoint (default: the demo model)")] = DEMO,
    fps: Annotated[float, typer.Option()] = 2.0,
    window: Annotated[int, typer.Option(help="frames per window")] = 10,
    seconds: Annotated[float, typer.Option(help="clip length (every stream plays it live)")] = 60.0,
    max_windows: Annotated[int | None, typer.Option(help="shorten the clip to this many windows")] = None,
    max_new_tokens: Annotated[int, typer.Option()] = 32,
    repeats: Annotated[int, typer.Option()] = 1,
    proc_threads: Annotated[str | None, typer.Option(help="--threads for each favor-rt run (default: "
                                                          "the bundle's tuned counts, as a user gets)")] = None,
    out: Annotated[Path, typer.Option()] = HERE / "out" / "streams",
) -> None:
    counts = [int(x) for x in streams.split(",") if x]
    chosen = [a for a in arms.split(",") if a]
    bad = [a for a in chosen if a not in ARMS] + [str(n) for n in counts if not 1 <= n <= HUB_MAX_BATCH]
    if bad:
        raise typer.BadParameter(f"unknown arm or stream count outside 1..{HUB_MAX_BATCH}: {bad}")
    window_s = window / fps
    clip_s = min(seconds, max_windows * window_s) if max_windows else seconds
    bound = window_s
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    print(f"preparing clip ({clip_s:g} s) and bundles (batch 1 and {HUB_MAX_BATCH}) ...", flush=True)
    clip = prepare(model, fps, window, clip_s, out)
    windows_per_stream, media_s = count_windows(clip, fps, window)
    info = machine()
    print(machine_line(info), flush=True)
    results: list[Result] = []
    for rep in range(repeats):
        for k, n in enumerate(counts):
            order = chosen if (rep + k) % 2 == 0 else chosen[::-1]
            for arm in order:
                r = Result(arm, n, rep, load_before=os.getloadavg()[0])
                if arm == "processes":
                    caps, r.wall_s, r.errors = run_processes(clip, n, model, fps, window, bound, max_new_tokens,
                                                             work, proc_threads)
                else:
                    caps, r.wall_s, r.errors, r.mean_decode_batch = run_hub_child(
                        clip, n, model, fps, window, bound, max_new_tokens, work, batch=arm == "hub")
                r.load_after = os.getloadavg()[0]
                score(r, caps, media_s, windows_per_stream, bound)
                results.append(r)
                print(f"  {arm:10s} {n} streams: captioned {r.captioned}/{r.windows}, throughput "
                      f"{r.throughput:.2f}x, p95 {r.latency_p95:.2f} s (worst stream {r.worst_stream_p95:.2f} s), "
                      f"wall {r.wall_s:.0f} s{'; ' + '; '.join(r.errors) if r.errors else ''}", flush=True)
    write(results, out, info, clip, bound)
    print(f"wrote {out}/bench_streams.md, .csv, .png and .jsonl (appended)")


if __name__ == "__main__":
    app()
