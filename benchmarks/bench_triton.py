"""favor-rt over Triton Inference Server (cpu repository, nvidia-pytriton's server) vs in-process ONNX
Runtime, on the same bundle and clip: wall time of an offline run, caption latency, caption identity.

    .venv/bin/python -m benchmarks.bench_triton                       # the demo model on the demo clip
    .venv/bin/python -m benchmarks.bench_triton --model BUNDLE --clip a.mp4 --repeats 3

Protocol: the repository is written from the bundle once and served by one server for the whole run
(its start-up, ~30 s of Python stubs importing torch, is reported apart). Each repeat runs
``favor-rt run --offline`` once per backend, alternating (round-robin), as separate processes, so both
see the same machine; medians over repeats. Both paths run every stage on ONNX Runtime on this
machine's cores: the difference is the server's process boundary (one request per stage call, one per
decode step) against in-process calls. The 1-min load average is recorded at start and end: numbers
taken on a loaded machine are not results.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, append_jsonl, git_commit, machine, machine_line, markdown_table

DEMO_CLIP = REPO / "favor" / "assets" / "demo" / "demo_clip.mp4"


def bundle_of(model: Path) -> Path:
    """A bundle directory as is; a checkpoint through the bundle cache (what favor-rt run uses)."""
    if (model / "manifest.json").is_file():
        return model
    from runtime.backends import make_backend

    return make_backend("onnxruntime", model).path


def run_once(backend: str, bundle: Path, clip: Path, url: str | None, out: Path) -> dict:
    args = [sys.executable, "-m", "runtime", "run", str(clip), "--model", str(bundle), "--backend", backend,
            "--offline", "--no-live", "--jsonl", str(out)]
    args += ["--url", url] if url else []
    t0 = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{backend}: favor-rt run failed ({done.returncode}): {done.stderr[-800:]}")
    caps = [json.loads(line) for line in out.read_text().splitlines()]
    lat = sorted(c["latency"] for c in caps if c.get("latency") is not None)
    return {"backend": backend, "wall_s": wall, "captions": [c["text"] for c in caps],
            "latency_p50_s": statistics.median(lat) if lat else None, "latency_max_s": lat[-1] if lat else None}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from export.triton.repository import write_repository
    from export.triton.server import TritonServer
    from runtime.cli import default_model_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="checkpoint or bundle (default: the demo model)")
    p.add_argument("--clip", type=Path, default=DEMO_CLIP)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "triton")
    a = p.parse_args(argv)
    bundle = bundle_of(a.model or default_model_path())
    info = machine() | {"commit": git_commit(), "load_start": os.getloadavg()[0]}
    a.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {"triton": [], "onnxruntime": []}
    with tempfile.TemporaryDirectory(prefix="favor-triton-bench-") as tmp:
        write_repository(bundle, Path(tmp) / "repo", "cpu")
        t0 = time.perf_counter()
        with TritonServer(Path(tmp) / "repo") as server:
            info["server_start_s"] = round(time.perf_counter() - t0, 1)
            for _ in range(a.repeats):
                for backend in rows:
                    url = server.http_url if backend == "triton" else None
                    rows[backend].append(run_once(backend, bundle, a.clip, url, Path(tmp) / f"{backend}.jsonl"))
    info["load_end"] = os.getloadavg()[0]
    identical = all(r["captions"] == rows["onnxruntime"][0]["captions"] for rs in rows.values() for r in rs)
    table = []
    for backend, rs in rows.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "latency_p50_s", "latency_max_s")}
        table.append([backend, f"{med['wall_s']:.1f}", f"{med['latency_p50_s']:.2f}", f"{med['latency_max_s']:.2f}",
                      len(rs[0]["captions"])])
        append_jsonl(a.out / "triton.jsonl", info | {"backend": backend, "bundle": str(bundle), "clip": str(a.clip),
                                                     "identical_captions": identical, "runs": rs, **med})
    print(machine_line(info) + f" | load {info['load_start']:.1f} -> {info['load_end']:.1f}")
    print(f"server start {info['server_start_s']} s; captions identical across backends and repeats: {identical}")
    print(markdown_table(["backend", "offline run s", "latency p50 s", "latency max s", "captions"], table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
