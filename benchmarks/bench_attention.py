"""Block-causal window attention: fused kernel (fp32, bf16) vs torch SDPA + mask, round-robin.

    .venv/bin/python -m benchmarks.bench_attention                     # quiet machine: refuses if load > 0.5
    .venv/bin/python -m benchmarks.bench_attention --windows 1 --repeats 5 --force   # smoke run, marked

Shapes: q, k, v [W, H, F*S, Dh], the release's causal Q-Former self-attention (H = 12 heads of
Dh = 128 at encoder width 1536, S = 32 tokens per frame slot, F = 10 frames per window) taken from
FavorConfig('favor-13b'). The sweep varies F.

Protocol: per thread count, every backend is warmed up, then timed round-robin (one call of each
per round, `repeats` rounds) so they share whatever the machine does; medians are reported, and
ratios are taken between medians of the same run. Besides wall time, each call's CPU time on the
calling thread is recorded: at 1 thread every backend runs on that thread, so it is a load-
independent cross-check of the wall-clock ratios.

Quiet-machine guard: the run is refused when the 1-min load average exceeds --max-load before it
starts (--force runs anyway). During each timed block the CPU time of *other* processes is measured
from /proc/stat minus this process's own CPU time; records carry it as `foreign_cpus` (average CPUs
busy with other work) and are marked `quiet: false` when it exceeds the limit (the load average
itself is only recorded: after the first section it counts this run's own threads).

Work formula (counts only unmasked work): with orientation 'past' frame f sees f + 1 frames, so a
window has S^2 F (F + 1) / 2 visible (query, key) pairs per head; each costs 2 Dh FLOPs for q.k and
2 Dh for p.v:  FLOPs = 4 W H Dh S^2 F (F + 1) / 2. Every backend is credited with this same useful
work, so GFLOP/s compare like with like (SDPA also computes the masked half and discards it).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
import typer

from benchmarks.common import append_jsonl, machine, machine_line, markdown_table
from favor import ops
from favor.attention import block_causal_mask, reference_attention
from favor.config import get_config

HERE = Path(__file__).resolve().parent
app = typer.Typer(add_completion=False)

SDPA = "torch SDPA + bool mask"
SDPA_BF16 = "torch SDPA + bool mask, bf16"
FUSED = "fused fp32 (favor._C)"
FUSED_BF16 = "fused bf16 (favor._C)"
REFERENCE = "reference (favor.attention)"
FLEX = "FlexAttention + block mask"


def attention_flops(windows: int, heads: int, frames: int, tokens_per_frame: int, head_dim: int) -> int:
    """Useful FLOPs of block-causal attention (the module docstring's formula)."""
    visible_pairs = tokens_per_frame ** 2 * frames * (frames + 1) // 2
    return 4 * windows * heads * head_dim * visible_pairs


class ForeignLoad:
    """CPU time other processes used while the block ran, in CPUs (0 = machine to ourselves)."""

    def __enter__(self) -> ForeignLoad:
        self.load_before = os.getloadavg()[0]
        self._busy0, self._own0, self._t0 = _busy_seconds(), _own_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t0
        busy, own = _busy_seconds(), _own_seconds()
        self.load_after = os.getloadavg()[0]
        self.foreign_cpus = None if busy is None or self._busy0 is None else max(
            0.0, (busy - self._busy0 - (own - self._own0)) / wall)


def _busy_seconds() -> float | None:
    """Non-idle CPU seconds of the whole machine (including steal: another VM took our CPU)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def round_robin(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median / min / p90 wall ms and median calling-thread CPU ms per backend, round-robin."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, t0 = time.thread_time(), time.perf_counter()
            fn()
            wall[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.thread_time() - c0) * 1e3)
    out = {}
    for name, ts in wall.items():
        ts.sort()
        out[name] = {"median_ms": statistics.median(ts), "min_ms": ts[0], "p90_ms": ts[int(0.9 * (len(ts) - 1))],
                     "thread_cpu_ms": statistics.median(cpu[name]), "repeats": len(ts)}
    return out


def _flex(frames: int, tpf: int):
    """Compiled FlexAttention with a block mask; None (and why) when it cannot run here."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:
        return None, f"flex_attention missing ({err})"
    L = frames * tpf

    def past(b, h, q_idx, kv_idx):
        return kv_idx // tpf <= q_idx // tpf

    try:
        mask = create_block_mask(past, None, None, L, L, device="cpu")
        compiled = torch.compile(flex_attention, dynamic=False)
        return (lambda q, k, v: compiled(q, k, v, block_mask=mask)), "torch.compile(flex_attention)"
    except Exception as err:  # noqa: BLE001 - report any backend failure in the table, not crash
        return None, f"unavailable: {type(err).__name__}: {str(err).splitlines()[0][:80]}"


def _backends(q, k, v, tpf: int, mask, extra: set[str]) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    fns = {
        SDPA: lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        FUSED: lambda: ops.block_causal_attention(q, k, v, tpf, "past"),
        FUSED_BF16: lambda: ops.block_causal_attention(qb, kb, vb, tpf, "past"),
        SDPA_BF16: lambda: F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask),
    }
    notes = {FUSED_BF16: ops.extension().build_info()["micro_kernels"].split("bf16: ")[-1]}
    if "reference" in extra:
        fns[REFERENCE] = lambda: reference_attention(q, k, v, tpf, "past")
    if "flex" in extra:
        flex, notes[FLEX] = _flex(q.shape[2] // tpf, tpf)
        if flex is not None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    flex(q, k, v)  # compile outside the timed region
                fns[FLEX] = lambda: flex(q, k, v)
            except Exception as err:  # noqa: BLE001
                notes[FLEX] = f"unavailable: {type(err).__name__}"
    return fns, notes


def bench_shape(windows: int, frames: int, tpf: int, heads: int, head_dim: int, repeats: int,
                extra: set[str]) -> list[dict]:
    L = frames * tpf
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(windows, heads, L, head_dim, generator=g) for _ in range(3))
    mask = block_causal_mask(L, tpf, "past")  # [L, L] bool, True = attend
    flops = attention_flops(windows, heads, frames, tpf, head_dim)
    ref64 = reference_attention(q.double(), k.double(), v.double(), tpf, "past")
    fns, notes = _backends(q, k, v, tpf, mask, extra)
    with ForeignLoad() as load:
        timings = round_robin(fns, warmup=3, repeats=repeats)
    records = []
    for name, fn in fns.items():
        err = (fn().double() - ref64).abs().max().item()  # every backend computes the same thing
        t = timings[name]
        records.append({"backend": name, "windows": windows, "heads": heads, "frames": frames, "tokens_per_frame": tpf,
                        "head_dim": head_dim, "dtype": "bfloat16" if "bf16" in name else "float32", **t,
                        "gflops": flops / t["median_ms"] / 1e6, "x_sdpa": timings[SDPA]["median_ms"] / t["median_ms"],
                        "x_sdpa_thread_cpu": timings[SDPA]["thread_cpu_ms"] / t["thread_cpu_ms"],
                        "x_fused_fp32": timings[FUSED]["median_ms"] / t["median_ms"],
                        "max_abs_err_vs_fp64": err, "note": notes.get(name, ""),
                        "load_before": round(load.load_before, 2), "load_after": round(load.load_after, 2),
                        "foreign_cpus": None if load.foreign_cpus is None else round(load.foreign_cpus, 3)})
    for name, note in notes.items():
        if name not in fns:
            records.append({"backend": name, "frames": frames, "median_ms": None, "note": note})
    return records


def _release_table(records: list[dict], show_cpu: bool) -> str:
    header = ["backend", "median ms", "min ms", "ms / window", "useful GFLOP/s", "x SDPA+mask fp32",
              "x fused fp32", "max |err| vs fp64"] + (["thread CPU ms", "x SDPA (CPU time)"] if show_cpu else [])
    rows = []
    for r in records:
        if r["median_ms"] is None:
            rows.append([r["backend"]] + ["-"] * (len(header) - 2) + [r["note"]])
            continue
        row = [r["backend"], r["median_ms"], r["min_ms"], r["median_ms"] / r["windows"], r["gflops"], r["x_sdpa"],
               r["x_fused_fp32"], f"{r['max_abs_err_vs_fp64']:.1e}"]
        rows.append(row + ([r["thread_cpu_ms"], r["x_sdpa_thread_cpu"]] if show_cpu else []))
    return markdown_table(header, rows)


def _sweep_table(records: list[dict]) -> str:
    rows = []
    for f in sorted({r["frames"] for r in records}):
        by = {r["backend"]: r for r in records if r["frames"] == f}
        fused, bf16, sdpa = by[FUSED], by[FUSED_BF16], by[SDPA]
        rows.append([f, f * fused["tokens_per_frame"], fused["median_ms"], fused["gflops"], bf16["median_ms"],
                     sdpa["median_ms"], fused["x_sdpa"], bf16["x_fused_fp32"]])
    return markdown_table(["frames", "tokens", "fused fp32 ms", "fused fp32 GFLOP/s", "fused bf16 ms", "SDPA+mask ms",
                           "fused fp32 x SDPA", "bf16 x fused fp32"], rows)


def _quiet(r: dict, max_load: float) -> bool:
    """Other processes stayed under max_load CPUs during the timed rounds.

    The load average is not used here: after the first section it includes this run's own threads.
    """
    foreign = r.get("foreign_cpus")
    return (foreign if foreign is not None else r.get("load_before", 0.0)) <= max_load


def _load_line(records: list[dict], max_load: float) -> str:
    r = next(x for x in records if x.get("median_ms") is not None)
    quiet = _quiet(r, max_load)
    return (f"Load: 1-min average {r['load_before']} before, {r['load_after']} after (includes this run's own "
            f"threads); other processes used {r['foreign_cpus']} CPUs on average during the timed rounds. "
            + ("Quiet run." if quiet else f"**Not a quiet run** (limit {max_load}): treat absolute times as "
               "inflated; the round-robin ratios and the 1-thread CPU-time ratios are the robust figures."))


@app.command()
def main(windows: Annotated[int, typer.Option(help="windows per call (the Q-Former's batch)")] = 4,
         repeats: Annotated[int, typer.Option(help="timed rounds (median reported)")] = 25,
         threads: Annotated[str, typer.Option(help="thread counts, one section each")] = "1,2",
         sweep: Annotated[str, typer.Option(help="frames per window (first thread count only; '' = none)")]
         = "1,2,5,10,15,20",
         flex: Annotated[bool, typer.Option(help="include compiled FlexAttention (slow compile)")] = False,
         reference: Annotated[bool, typer.Option(help="include the readable PyTorch reference")] = True,
         max_load: Annotated[float, typer.Option(help="refuse to start above this 1-min load average")] = 0.5,
         force: Annotated[bool, typer.Option(help="run on a loaded machine anyway (records marked)")] = False,
         out: Annotated[Path, typer.Option(help="Markdown results section")] = HERE / "out" / "RESULTS_attention.md",
         jsonl: Annotated[Path, typer.Option(help="JSON-lines log")] = HERE / "results" / "bench_attention.jsonl",
         ) -> None:
    load = os.getloadavg()[0]
    if load > max_load and not force:
        print(f"error: 1-min load average {load:.2f} > {max_load}: wait for a quiet machine or pass --force "
              "(the records are then marked quiet: false)", file=sys.stderr)
        raise typer.Exit(2)
    if not ops.available():
        print("error: favor._C is not built; run `make setup` (or pip install -e .)", file=sys.stderr)
        raise typer.Exit(2)
    cfg = get_config("favor-13b")
    heads = cfg.qformer.encoder_heads
    head_dim = cfg.fused_width // heads  # 1536 / 12 = 128
    tpf, frames = cfg.tokens_per_frame, cfg.timing.frames_per_window
    extra = {name for name, on in (("flex", flex), ("reference", reference)) if on}
    sections = ["## Block-causal window attention (CPU, fp32 and bf16)", ""]
    for i, nt in enumerate(int(x) for x in threads.split(",")):
        torch.set_num_threads(nt)  # the fused op follows torch's thread count
        info = machine()
        info["kernel"] = ops.extension().build_info()
        release = bench_shape(windows, frames, tpf, heads, head_dim, repeats, extra)
        sections += [
            f"### {nt} thread{'s' if nt > 1 else ''}", "",
            f"Machine: {machine_line(info)}. Kernel: {info['kernel']['micro_kernels']} "
            f"({info['kernel']['isa_dispatch']}).", "",
            f"Release shape: {windows} windows x {heads} heads x {frames * tpf} tokens x head dim {head_dim}, {tpf} "
            f"tokens per frame, {frames} frames, orientation 'past'; median of {repeats} round-robin rounds after 3 "
            "warm-up calls. GFLOP/s = 4 W H Dh S^2 F(F+1)/2 / median time (unmasked work only, the same for every "
            "backend). Errors against a float64 reference from the same (fp32) inputs; the bf16 rows' inputs are "
            "those rounded to bf16.", "",
            _release_table(release, show_cpu=nt == 1), "",
            _load_line(release, max_load), "",
        ]
        records = list(release)
        if i == 0 and sweep:
            swept = [r for f in (int(x) for x in sweep.split(","))
                     for r in bench_shape(windows, f, tpf, heads, head_dim, repeats, set())]
            records += swept
            sections += [f"Sweep over frames per window ({windows} windows, {heads} heads, head dim {head_dim}, "
                         f"{tpf} tokens per frame, {nt} thread{'s' if nt > 1 else ''}):", "", _sweep_table(swept), "",
                         _load_line(swept, max_load), ""]
        for r in records:
            quiet = r.get("median_ms") is not None and _quiet(r, max_load)
            append_jsonl(jsonl, {"bench": "attention", "machine": info, "quiet": quiet, "max_load": max_load, **r})
    text = "\n".join(sections)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)  # a section to paste into benchmarks/RESULTS.md
    print(text)


if __name__ == "__main__":
    app()
