"""Seconds from `favor-rt run` starting to the first caption on screen, warm (and cold) bundle cache.

    PYTHONPATH=. python benchmarks/bench_startup.py [--repeats 3] [--cold] [--backend auto]

Runs `python -m runtime run <demo clip> --no-live` (the `make demo` command, realtime: paced like a
live camera) as a subprocess and timestamps its output lines as they arrive:

    ready          launch -> the "favor-rt: ..." header on stderr (imports, bundle lookup, sessions, warm-up)
    first caption  launch -> the first "[mm:ss.sss --> ...]" caption line on stdout

With a realtime source the first caption cannot come before the first window has been filmed
(frames_per_window / fps seconds: 5 s for the demo model), so first caption = ready + window + latency.
Warm runs first run once untimed so the cache holds the bundle; --cold also times one run into an
empty temporary cache (the export, with its progress view). Target (issue 10): first caption <= 10 s
warm. Writes one JSON line per run to benchmarks/results/results_startup.jsonl with the load average
before and after (discard runs whose load exceeded 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CLIP = REPO / "favor" / "assets" / "demo" / "demo_clip.mp4"
CAPTION_PREFIX = "["  # caption lines: "[00:00.000 --> 00:05.000] text"
HEADER_PREFIX = "favor-rt: "


def timed_run(cmd: list[str], env: dict[str, str], timeout_s: float) -> dict:
    """Launch ``cmd``; seconds to the header and to the first caption, then stop the process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            bufsize=1)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    ready = first = None
    stderr_lines: list[str] = []
    while first is None and time.perf_counter() - t0 < timeout_s and sel.get_map():
        for key, _ in sel.select(timeout=0.5):
            line = key.fileobj.readline()
            if not line:
                sel.unregister(key.fileobj)
                continue
            now = time.perf_counter() - t0
            if key.data == "err":
                stderr_lines.append(line.rstrip())
                if ready is None and line.startswith(HEADER_PREFIX):
                    ready = now
            elif line.startswith(CAPTION_PREFIX):
                first = now
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    return {"ready_s": ready, "first_caption_s": first, "stderr_tail": stderr_lines[-3:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="also time one run into an empty cache")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--clip", type=Path, default=DEMO_CLIP)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run (a cold export is minutes)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "results_startup.jsonl")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "runtime", "run", str(args.clip), "--no-live", "--backend", args.backend]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rows = []
    if args.cold:
        with tempfile.TemporaryDirectory(prefix="favor-cold-cache-") as cold:
            load = os.getloadavg()[0]
            rows.append({"cache": "cold", "load_before": load, **timed_run(cmd, {**env, "FAVOR_CACHE": cold},
                                                                           args.timeout),
                         "load_after": os.getloadavg()[0]})
    timed_run(cmd, env, args.timeout)  # fills the cache if needed; not timed
    for _ in range(args.repeats):
        load = os.getloadavg()[0]
        rows.append({"cache": "warm", "load_before": load, **timed_run(cmd, env, args.timeout),
                     "load_after": os.getloadavg()[0]})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as fh:
        for r in rows:
            fh.write(json.dumps({**r, "backend": args.backend, "clip": args.clip.name, "commit": commit,
                                 "cores": os.cpu_count()}) + "\n")
    for r in rows:
        print(f"{r['cache']:4s}: ready {r['ready_s']} s, first caption {r['first_caption_s']} s "
              f"(load {r['load_before']:.2f} -> {r['load_after']:.2f})")
    warm = [r["first_caption_s"] for r in rows if r["cache"] == "warm" and r["first_caption_s"] is not None]
    if warm:
        print(f"warm first caption: median {statistics.median(warm):.2f} s over {len(warm)} runs (target <= 10 s)")


if __name__ == "__main__":
    main()
