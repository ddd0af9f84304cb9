"""Decoder tokens/s per graph and precision vs the machine's GEMV bandwidth bound, round-robin.

    .venv/bin/python -m benchmarks.bench_decoder                         # the trained demo model
    .venv/bin/python -m benchmarks.bench_decoder --steps 4 --repeats 2 --threads 1   # smoke run

Graphs, all built from the same checkpoint (LoRA merged) into a temporary directory:
  baseline      our torch-dynamo fp32 export (export/decoder.py), run by export.ort_inference.OrtInference
  genai-fp32    the ONNX Runtime GenAI builder graph (export/genai_decoder.py), export.ort_decoder
  genai-int8    the same, weight-only int8 (MatMulNBits, the bundle's options)
  genai-int4    the same, weight-only int4

Protocol: per thread count, one session per graph; a prompt of --prompt-len tokens (a window's AV rows
plus the text) is prefilled, warm-up steps run, then decode steps are timed round-robin per repeat
(each graph decodes --steps steps as a block, graphs alternate, the order reversing every repeat;
--repeats repeats, each graph keeping its own growing cache), so every graph sees the same machine and
no session's spinning workers overlap another's step. tokens/s = 1 / median step time.

Bandwidth bound: a decode step reads every weight once (the KV cache of a ~100-token caption is
< 1 % of it), so tokens/s <= GEMV bandwidth / weight bytes. The GEMV bandwidth is measured here: a
fp32 matrix-vector product on a matrix larger than the last-level cache (--gemv-mb), torch at the
same thread count, bytes read / median time. Weight bytes = the graph's initializers.

Records: JSON lines in benchmarks/results/bench_decoder.jsonl and a Markdown table in
benchmarks/results/bench_decoder.md, with the 1-minute load average before and after.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from benchmarks.common import append_jsonl, machine, machine_line, markdown_table

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "favor" / "assets" / "demo" / "favor-demo.safetensors"
VARIANTS = ("baseline", "genai-fp32", "genai-int8", "genai-int4")
app = typer.Typer(add_completion=False)


def weight_bytes(graph: Path) -> int:
    """Bytes of the graph's initializers (the weights a decode step reads)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        total += int(ext["length"]) if "length" in ext else len(t.raw_data) or (
            int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize)
    return total


def gemv_bandwidth(threads: int, megabytes: int, repeats: int = 15) -> float:
    """GB/s of a fp32 matrix-vector product on a ``megabytes`` matrix (larger than the caches)."""
    torch.set_num_threads(threads)
    cols = 4096
    rows = megabytes * 2**20 // (4 * cols)
    a = torch.randn(rows, cols)  # [rows, cols] fp32
    x = torch.randn(cols)
    for _ in range(3):
        torch.mv(a, x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mv(a, x)
        times.append(time.perf_counter() - t0)
    return a.numel() * 4 / statistics.median(times) / 1e9


def build_graphs(model, root: Path) -> dict[str, Path]:
    from export import genai_decoder
    from export.bundle import example_inputs
    from export.decoder import DecoderFrontend, merged_llm
    from export.onnx import export_stage
    from export.profiles import Limits, axes

    table = axes(model.cfg, Limits())
    wrapper = DecoderFrontend(model.cfg, merged_llm(model))
    st = export_stage(wrapper, example_inputs(wrapper, table), table, root / "baseline", model.cfg)
    out = {"baseline": root / "baseline" / st.files[0]}
    for precision in genai_decoder.PRECISIONS:
        genai_decoder.export_decoder(model, root / precision, precision)
        out[f"genai-{precision}"] = root / precision / genai_decoder.GRAPH
    return out


def inference(variant: str, graph: Path, threads: int, model, embedding: np.ndarray):
    from export.ort_decoder import GenaiInference, decoder_session
    from export.ort_inference import OrtInference
    from favor.onnx_attention import ort_session

    if variant == "baseline":
        return OrtInference(ort_session(graph, threads), embedding, model.cfg)
    return GenaiInference(decoder_session(graph, threads), embedding, model.cfg)


def time_steps(infs: dict, prompt: torch.Tensor, steps: int, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Round-robin decode steps; per graph the list of step times (s)."""
    mask = torch.ones(1, prompt.shape[1], dtype=torch.long)
    state = {}
    for name, inf in infs.items():
        logits, cache = inf.prefill(prompt, mask)
        for _ in range(warmup):
            logits, cache = inf.decode(logits.argmax(-1), cache)
        state[name] = (logits, cache)
    times: dict[str, list[float]] = {name: [] for name in infs}
    names = list(infs)
    for r in range(repeats):
        # Round-robin per repeat, not per step: ONNX Runtime's idle intra-op workers spin for a while
        # after a run, so interleaving single steps of several multi-thread sessions makes each step
        # compete with the previous session's spinning worker (2-thread steps measured 2x slower than
        # one session decoding alone, which is what the runtime does). The order reverses every repeat.
        for name in (names if r % 2 == 0 else names[::-1]):
            inf = infs[name]
            for _ in range(steps):
                logits, cache = state[name]
                ids = logits.argmax(-1)
                t0 = time.perf_counter()
                state[name] = inf.decode(ids, cache)
                times[name].append(time.perf_counter() - t0)
        for name, inf in infs.items():  # fresh caches so every repeat decodes at the same lengths
            logits, cache = inf.prefill(prompt, mask)
            state[name] = (logits, cache)
    return times


@app.command()
def main(model_path: Annotated[Path, typer.Option("--model", help="FAVOR checkpoint")] = DEMO,
         threads: Annotated[str, typer.Option(help="comma list of thread counts")] = "1,2",
         steps: Annotated[int, typer.Option(help="decode steps per repeat")] = 32,
         repeats: Annotated[int, typer.Option(help="repeats (each from a fresh prefill)")] = 5,
         warmup: Annotated[int, typer.Option(help="untimed decode steps after each prefill")] = 4,
         prompt_len: Annotated[int, typer.Option(help="prompt tokens (one window + text ~ 60-110)")] = 96,
         gemv_mb: Annotated[int, typer.Option(help="GEMV matrix size, MB (above the last-level cache)")] = 256,
         out: Annotated[Path, typer.Option(help="results directory")] = HERE / "results",
         verbose: Annotated[bool, typer.Option("-v", "--verbose", help="library warnings and logs")] = False,
         ) -> None:
    from favor.quiet import quiet_libraries

    quiet_libraries(verbose)
    from favor.checkpoint import load_model

    load_before = os.getloadavg()[0]
    model = load_model(model_path).eval()
    embedding = model.llm.base.get_input_embeddings().weight.detach().float().numpy()  # [V, D]
    g = torch.Generator().manual_seed(0)
    scale = float(embedding.std())
    prompt = torch.randn(1, prompt_len, model.cfg.llm.hidden, generator=g) * scale  # [1, L, D]
    records = []
    with tempfile.TemporaryDirectory(prefix="bench-decoder-") as tmp:
        graphs = build_graphs(model, Path(tmp))
        wbytes = {v: weight_bytes(p) for v, p in graphs.items()}
        for n in (int(x) for x in threads.split(",")):
            bw = gemv_bandwidth(n, gemv_mb)
            infs = {v: inference(v, graphs[v], n, model, embedding) for v in VARIANTS}
            times = time_steps(infs, prompt, steps, repeats, warmup)
            base = 1 / statistics.median(times["baseline"])
            for v in VARIANTS:
                tps = 1 / statistics.median(times[v])
                bound = bw * 1e9 / wbytes[v]
                records.append({"bench": "decoder", "variant": v, "threads": n, "tokens_per_s": round(tps, 2),
                                "step_ms_median": round(1e3 / tps, 3), "vs_baseline": round(tps / base, 2),
                                "weight_mb": round(wbytes[v] / 1e6, 1), "gemv_gb_s": round(bw, 2),
                                "bound_tokens_per_s": round(bound, 1), "fraction_of_bound": round(tps / bound, 3),
                                "steps": len(times[v]), "prompt_len": prompt_len})
    load_after = os.getloadavg()[0]
    info = machine() | {"load_avg_1min": load_before}
    for r in records:
        append_jsonl(out / "bench_decoder.jsonl", r | {"model": str(model_path), "load_before": load_before,
                                                      "load_after": load_after, "machine": info})
    table = markdown_table(["graph", "threads", "tok/s", "ms/step", "x baseline", "weights MB", "GEMV GB/s",
                            "bound tok/s", "of bound"],
                           [[r["variant"], r["threads"], r["tokens_per_s"], r["step_ms_median"], r["vs_baseline"],
                             r["weight_mb"], r["gemv_gb_s"], r["bound_tokens_per_s"], r["fraction_of_bound"]]
                            for r in records])
    text = (f"{machine_line(info)}; load {load_before:.2f} before, {load_after:.2f} after; "
            f"{model_path.name}, prompt {prompt_len}, {repeats}x{steps} steps\n\n{table}\n")
    (out / "bench_decoder.md").write_text(text)
    print(text)


if __name__ == "__main__":
    app()
