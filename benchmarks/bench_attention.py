"""Block-causal window attention: fused kernel vs torch SDPA + mask vs FlexAttention vs reference.

    .venv/bin/python -m benchmarks.bench_attention            # release shape + frames sweep
    .venv/bin/python -m benchmarks.bench_attention --windows 1 --repeats 5

Shapes: q, k, v [W, H, F*S, Dh], the release's causal Q-Former self-attention (H = 12 heads of
Dh = 128 at encoder width 1536, S = 32 tokens per frame slot, F = 10 frames per window) taken from
FavorConfig('favor-13b'). The sweep varies F.

Work formula (counts only unmasked work): with orientation 'past' frame f sees f + 1 frames, so a
window has S^2 F (F + 1) / 2 visible (query, key) pairs per head; each costs 2 Dh FLOPs for q.k and
2 Dh for p.v:  FLOPs = 4 W H Dh S^2 F (F + 1) / 2. Every backend is credited with this same useful
work, so GFLOP/s compare like with like (SDPA also computes the masked half and discards it).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
import typer

from benchmarks.common import append_jsonl, machine, machine_line, markdown_table, measure_interleaved
from favor import ops
from favor.attention import block_causal_mask, reference_attention
from favor.config import get_config

HERE = Path(__file__).resolve().parent
app = typer.Typer(add_completion=False)


def attention_flops(windows: int, heads: int, frames: int, tokens_per_frame: int, head_dim: int) -> int:
    """Useful FLOPs of block-causal attention (the module docstring's formula)."""
    visible_pairs = tokens_per_frame ** 2 * frames * (frames + 1) // 2
    return 4 * windows * heads * head_dim * visible_pairs


def _flex(frames: int, tpf: int, windows: int, heads: int):
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


def bench_shape(windows: int, frames: int, tpf: int, heads: int, head_dim: int, repeats: int,
                with_flex: bool) -> list[dict]:
    L = frames * tpf
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(windows, heads, L, head_dim, generator=g) for _ in range(3))
    mask = block_causal_mask(L, tpf, "past")  # [L, L] bool, True = attend
    flops = attention_flops(windows, heads, frames, tpf, head_dim)
    ref = reference_attention(q, k, v, tpf, "past")
    backends = {
        "fused (favor._C)": lambda: ops.block_causal_attention(q, k, v, tpf, "past"),
        "torch SDPA + bool mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "reference (favor.attention)": lambda: reference_attention(q, k, v, tpf, "past"),
    }
    notes = {}
    if with_flex:
        flex, note = _flex(frames, tpf, windows, heads)
        notes["FlexAttention + block mask"] = note
        if flex is not None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    flex(q, k, v)  # compile outside the timed region
                backends["FlexAttention + block mask"] = lambda: flex(q, k, v)
            except Exception as err:  # noqa: BLE001
                notes["FlexAttention + block mask"] = f"unavailable: {type(err).__name__}"
    records = []
    timings = measure_interleaved(backends, warmup=3, repeats=repeats)
    for name, fn in backends.items():
        err = (fn().float() - ref).abs().max().item()  # sanity: every backend computes the same thing
        t = timings[name]
        records.append({"backend": name, "windows": windows, "heads": heads, "frames": frames,
                        "tokens_per_frame": tpf, "head_dim": head_dim, "dtype": "float32",
                        "median_ms": t.median_ms, "min_ms": t.min_ms, "p90_ms": t.p90_ms, "repeats": t.repeats,
                        "gflops": flops / t.median_ms / 1e6, "max_abs_err_vs_ref": err,
                        "note": notes.get(name, "")})
    for name, note in notes.items():
        if name not in backends:
            records.append({"backend": name, "frames": frames, "median_ms": None, "note": note})
    return records


def _release_table(records: list[dict]) -> str:
    sdpa = next(r["median_ms"] for r in records if r["backend"].startswith("torch SDPA"))
    rows = []
    for r in records:
        if r["median_ms"] is None:
            rows.append([r["backend"], "-", "-", "-", "-", "-", r["note"]])
            continue
        rows.append([r["backend"], r["median_ms"], r["min_ms"], r["median_ms"] / r["windows"], r["gflops"],
                     sdpa / r["median_ms"], f"{r['max_abs_err_vs_ref']:.1e}"])
    return markdown_table(["backend", "median ms", "min ms", "ms / window", "useful GFLOP/s",
                           "x SDPA+mask (median)", "max |err| vs ref"], rows)


def _sweep_table(records: list[dict]) -> str:
    rows = []
    for f in sorted({r["frames"] for r in records}):
        by = {r["backend"]: r for r in records if r["frames"] == f}
        fused, sdpa, ref = (by[k] for k in ("fused (favor._C)", "torch SDPA + bool mask",
                                            "reference (favor.attention)"))
        rows.append([f, f * fused["tokens_per_frame"], fused["median_ms"], fused["gflops"], sdpa["median_ms"],
                     sdpa["gflops"], ref["median_ms"], sdpa["median_ms"] / fused["median_ms"]])
    return markdown_table(["frames", "tokens", "fused ms", "fused GFLOP/s", "SDPA+mask ms", "SDPA GFLOP/s",
                           "reference ms", "fused speed-up vs SDPA"], rows)


@app.command()
def main(windows: Annotated[int, typer.Option(help="windows per call (the Q-Former's batch)")] = 4,
         repeats: Annotated[int, typer.Option(help="timed repeats per backend (median reported)")] = 15,
         threads: Annotated[str, typer.Option(help="torch/kernel thread counts, one section each")] = "2,1",
         sweep: Annotated[str, typer.Option(help="frames per window (first thread count only)")] = "1,2,5,10,15,20",
         flex: Annotated[bool, typer.Option(help="include compiled FlexAttention (slow compile)")] = True,
         out: Annotated[Path, typer.Option(help="Markdown results section")] = HERE / "out" / "RESULTS_attention.md",
         jsonl: Annotated[Path, typer.Option(help="JSON-lines log")] = HERE / "results" / "bench_attention.jsonl",
         ) -> None:
    cfg = get_config("favor-13b")
    heads = cfg.qformer.encoder_heads
    head_dim = cfg.fused_width // heads  # 1536 / 12 = 128
    tpf, frames = cfg.tokens_per_frame, cfg.timing.frames_per_window
    sections = ["## Block-causal window attention (CPU, fp32)", ""]
    for i, nt in enumerate(int(x) for x in threads.split(",")):
        torch.set_num_threads(nt)  # the fused op follows torch's thread count
        info = machine()
        info["kernel"] = ops.extension().build_info()
        release = bench_shape(windows, frames, tpf, heads, head_dim, repeats, flex)
        sections += [
            f"### {nt} thread{'s' if nt > 1 else ''}",
            "",
            f"Machine: {machine_line(info)}. Kernel build: {info['kernel']['isa_dispatch']}, "
            f"OpenMP {info['kernel']['openmp']}.",
            "",
            f"Release shape: {windows} windows x {heads} heads x {frames * tpf} tokens x head dim {head_dim}, "
            f"{tpf} tokens per frame, {frames} frames, orientation 'past'; median of {repeats} repeats after "
            "3 warm-up calls, backends timed round-robin (one call each per round) so they share the "
            "machine's load. GFLOP/s = 4 W H Dh S^2 F(F+1)/2 / median time (unmasked work only, the same "
            "for every backend).",
            "",
            _release_table(release),
            "",
        ]
        load, cpus = info.get("load_avg_1min"), info["logical_cpus"] or 1
        if load is not None and load > 1.5 * cpus:
            sections += [f"Note: other processes shared the machine during this run (load {load} on {cpus} "
                         "CPUs): absolute times are inflated and noisy; the ratios of round-robin medians "
                         "are the robust figure.", ""]
        records = list(release)
        if i == 0 and sweep:
            swept = [r for f in (int(x) for x in sweep.split(","))
                     for r in bench_shape(windows, f, tpf, heads, head_dim, repeats, with_flex=False)]
            records += swept
            sections += [f"Sweep over frames per window ({windows} windows, {heads} heads, head dim "
                         f"{head_dim}, {tpf} tokens per frame, {nt} threads; FlexAttention omitted to bound "
                         "compile time):", "", _sweep_table(swept), ""]
        for r in records:
            append_jsonl(jsonl, {"bench": "attention", "machine": info, **r})
    text = "\n".join(sections)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)  # a section to paste into benchmarks/RESULTS.md
    print(text)


if __name__ == "__main__":
    app()
