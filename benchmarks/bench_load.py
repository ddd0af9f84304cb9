"""The default realtime run under CPU load: captions kept and windows dropped per minute of media.

    PYTHONPATH=. python benchmarks/bench_load.py [--loads 0,1,2] [--passes 3] [-- extra favor-rt options]

For each load level n, n busy processes (one tight Python loop each, the "CPU hog" of issue 15) spin on
the machine while `python -m runtime run <demo clip> --no-live --jsonl ...` runs with every default
(realtime, the default latency bound, the default backend) ``--passes`` times. Per pass the JSON lines
give the captions and the windows they cover; the run's summary line gives the drops (late /
overflow), merges and the latency bound it ended with (the default bound is raised when the device
needs longer: runtime/scheduler.py). Rates are per minute of media:

    captions/min = captions / (media seconds / 60)     drops/min = dropped windows / (media seconds / 60)

One untimed pass first fills the bundle cache (the default path compiles the checkpoint once). The
load average is recorded before each level. Writes benchmarks/results/bench_load.jsonl (one line per
pass) and benchmarks/results/bench_load.md (one row per load level). Run it on an otherwise quiet
machine: the lead's job, not a helper's.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_jsonl, git_commit, machine, machine_line, markdown_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_CLIP = REPO / "favor" / "assets" / "demo" / "demo_clip.mp4"
RESULTS = REPO / "benchmarks" / "results"
SUMMARY = re.compile(r"(\d+) captions over (\d+) windows; dropped (\d+) \((\d+) late, (\d+) overflow\); "
                     r"merged (\d+)")
RAISED = re.compile(r"latency bound raised to ([\d.]+) s")
SECONDS_PER_MINUTE = 60.0


def hog(stop: mp.Event) -> None:
    """One core's worth of pure-Python busy work until ``stop``."""
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def media_seconds(clip: Path) -> float:
    import av

    with av.open(str(clip)) as c:
        return float(c.duration) / av.time_base


def one_pass(clip: Path, extra: list[str], timeout_s: float) -> dict:
    """Run favor-rt once; its captions, drops and exit code."""
    with tempfile.TemporaryDirectory() as d:
        jsonl = Path(d) / "captions.jsonl"
        cmd = [sys.executable, "-m", "runtime", "run", str(clip), "--no-live", "--jsonl", str(jsonl), *extra]
        t0 = time.monotonic()
        p = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                           text=True, timeout=timeout_s)
        wall = time.monotonic() - t0
        rows = [ln for ln in jsonl.read_text().splitlines() if ln.strip()] if jsonl.exists() else []
    m = SUMMARY.search(p.stderr)
    if m is None:
        raise RuntimeError(f"favor-rt printed no summary (exit {p.returncode}): {p.stderr.strip()[-500:]}")
    captions, windows, dropped, late, overflow, merged = map(int, m.groups())
    raised = RAISED.search(p.stderr)
    return {"exit_code": p.returncode, "captions": captions, "jsonl_rows": len(rows), "windows": windows,
            "dropped": dropped, "dropped_late": late, "dropped_overflow": overflow, "merged": merged,
            "raised_bound_s": float(raised.group(1)) if raised else None, "wall_s": round(wall, 2)}


def run_level(n: int, clip: Path, passes: int, extra: list[str], timeout_s: float) -> list[dict]:
    stop = mp.Event()
    hogs = [mp.Process(target=hog, args=(stop,), daemon=True) for _ in range(n)]
    for h in hogs:
        h.start()
    try:
        return [one_pass(clip, extra, timeout_s) for _ in range(passes)]
    finally:
        stop.set()
        for h in hogs:
            h.join()


def summarise(n: int, runs: list[dict], seconds: float, load_before: float) -> list:
    minutes = seconds * len(runs) / SECONDS_PER_MINUTE
    caps = sum(r["captions"] for r in runs)
    drops = sum(r["dropped"] for r in runs)
    raised = [r["raised_bound_s"] for r in runs if r["raised_bound_s"]]
    return [n, f"{load_before:.2f}", len(runs), f"{caps / minutes:.1f}", f"{drops / minutes:.1f}",
            sum(r["merged"] for r in runs), f"{max(raised):.2f}" if raised else "-",
            ",".join(str(r["exit_code"]) for r in runs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loads", default="0,1,2", help="comma-separated numbers of CPU-hog processes")
    ap.add_argument("--passes", type=int, default=3, help="runs of the clip per load level")
    ap.add_argument("--clip", type=Path, default=DEMO_CLIP)
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed pass that fills the bundle cache")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds one pass may take")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_load")
    ap.add_argument("extra", nargs="*", help="options passed to favor-rt run (after --)")
    args = ap.parse_args()
    loads = [int(x) for x in args.loads.split(",") if x]
    seconds = media_seconds(args.clip)
    info = {**machine(), "commit": git_commit()}
    if not args.no_warmup:
        one_pass(args.clip, args.extra, args.timeout)
    rows = []
    for n in loads:
        load_before = os.getloadavg()[0]
        runs = run_level(n, args.clip, args.passes, args.extra, args.timeout)
        for i, r in enumerate(runs):
            append_jsonl(args.out.with_suffix(".jsonl"), {"hogs": n, "pass": i, "media_s": seconds,
                                                          "load_before": load_before, "extra": args.extra,
                                                          **r, **info})
        rows.append(summarise(n, runs, seconds, load_before))
        print(f"{n} hog(s): {rows[-1][3]} captions/min, {rows[-1][4]} drops/min", flush=True)
    table = markdown_table(["CPU hogs", "load before", "passes", "captions / min", "drops / min", "merged",
                            "bound raised to (s)", "exit codes"], rows)
    text = (f"Default `favor-rt run {args.clip.name}` (realtime) under CPU hogs; {seconds:.1f} s of media per "
            f"pass. {machine_line(info)}, commit {info['commit']}.\n\n{table}\n")
    args.out.with_suffix(".md").write_text(text)
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.jsonl')}")


if __name__ == "__main__":
    main()
