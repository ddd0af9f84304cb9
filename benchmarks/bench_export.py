"""Export size and time per stage for a preset (random weights: shapes, sizes and export time equal
those of the trained model; parity on trained weights is favor-export verify's job).

    PYTHONPATH=. python benchmarks/bench_export.py --presets demo small --out /tmp/bench_export

Writes one JSON line per stage (preset, stage, seconds, MB, device, torch, commit) to
benchmarks/results/results_export.jsonl and prints a markdown table. Time = wall clock of
torch.onnx.export(dynamo=True) incl. decompositions and ONNX optimisation, on this machine's CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from export.bundle import ExportOptions, export_bundle
from favor.build import build_model
from favor.config import get_config

MB = 1e6


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def bench(preset: str, out: Path) -> list[dict]:
    torch.manual_seed(0)
    cfg = get_config(preset)
    model = build_model(cfg, pretrained=False).eval()
    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    manifest = export_bundle(model, out / preset, ExportOptions(precision="int8"))
    total = time.perf_counter() - start
    rows = []
    for stage, s in manifest["stages"].items():
        size = sum((out / preset / f).stat().st_size for f in s["files"]) / MB
        rows.append({"preset": preset, "stage": stage, "seconds": s["export_seconds"], "MB": round(size, 1),
                     "params_M": round(params / 1e6, 1), "total_seconds": round(total, 1),
                     "device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "commit": commit()})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["demo", "small"])
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_export"))
    ap.add_argument("--jsonl", type=Path, default=Path(__file__).parent / "results" / "results_export.jsonl")
    args = ap.parse_args()
    rows = []
    for preset in args.presets:
        rows += bench(preset, args.out)
    with open(args.jsonl, "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    print("| preset | stage | export s | size MB |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['stage']} | {r['seconds']} | {r['MB']} |")


if __name__ == "__main__":
    main()
