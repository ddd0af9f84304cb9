"""Shared benchmark plumbing: a timer, the machine's name, JSON-lines records and Markdown tables.

Every benchmark here follows one protocol: warm up (caches, thread pools, lazy compilation), then
time each repeat separately with the device synchronised, and report the median (robust to the
scheduler hiccups a 2-core machine sees). Records carry the commit, the machine and the settings so
a number can always be traced to what produced it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call wall time of `repeats` timed calls after `warmup` untimed ones (milliseconds)."""

    median_ms: float
    min_ms: float
    p90_ms: float
    repeats: int
    warmup: int


def _sync(device: str | torch.device | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 15, min_seconds: float = 0.0,
            device: str | torch.device | None = None) -> Timing:
    """Time fn(): `warmup` untimed calls, then at least `repeats` timed calls (and `min_seconds`)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats ({repeats}) must be >= 1 and warmup ({warmup}) >= 0")
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return Timing(median_ms=statistics.median(times), min_ms=times[0],
                  p90_ms=times[min(len(times) - 1, int(0.9 * len(times)))], repeats=len(times), warmup=warmup)


def measure_interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int = 3, repeats: int = 15,
                        device: str | torch.device | None = None) -> dict[str, Timing]:
    """Time several callables round-robin, one call each per round.

    On a shared machine the load changes over seconds; interleaving gives every backend the same
    mix of quiet and busy moments, so their ratio stays meaningful even when absolute times drift.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats ({repeats}) must be >= 1 and warmup ({warmup}) >= 0")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        ts.sort()
        out[name] = Timing(median_ms=statistics.median(ts), min_ms=ts[0],
                           p90_ms=ts[min(len(ts) - 1, int(0.9 * len(ts)))], repeats=len(ts), warmup=warmup)
    return out


def cpu_model() -> str:
    """The CPU's marketing name (lscpu 'Model name', else /proc/cpuinfo, else platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, threads torch uses, GPU if any, library versions."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        # Other processes competing for the cores inflate medians; record how busy the machine was.
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One line naming the machine, for the line above a results table."""
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    load = f", 1-min load average {info['load_avg_1min']}" if info.get("load_avg_1min") is not None else ""
    return (f"{info['cpu']}, {info['logical_cpus']} logical CPUs, {info['torch_threads']} threads used"
            f"{gpu}; {info['os']}, Python {info['python']}, torch {info['torch']}{load}")


def git_commit() -> str:
    """Commit of the working tree ('+dirty' when it has changes), or 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record (stamped with commit and UTC time) as a JSON line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stamped = {"commit": git_commit(), "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               **record}
    with path.open("a") as f:
        f.write(json.dumps(stamped, default=str) + "\n")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats to 3 significant figures."""
    def cell(x: Any) -> str:
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
