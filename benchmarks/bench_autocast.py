"""bf16 autocast vs fp32 for a training step's matmuls on this CPU: what `train.bf16: auto` decides on.

A CPU with avx512_bf16 or AMX multiplies bf16 in hardware; an AVX2-only CPU (AMD Zen 3, many laptops)
does not, and there autocast converts and emulates. This times forward + backward of the demo LLM's MLP
block (SmolLM2-135M: hidden 576, FFN 1536, SiLU-gated) on one micro-batch of tokens, fp32 and bf16
autocast round-robin in one run (warm-up, median of repeats), and prints the machine, its bf16 features
and the 1-minute load before and after.

    python benchmarks/bench_autocast.py --repeats 7
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Annotated

import torch
import typer
from torch import nn

from favor.config import get_config
from training.recipe import native_bf16

TOKENS = 4 * 256  # one demo micro-batch: 4 samples x ~256 positions (AV tokens + prompt + answer)


def llm_mlp(hidden: int, ffn: int) -> nn.Module:
    """The LLaMA / SmolLM2 MLP block as transformers builds it: down(silu(gate(x)) * up(x))."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    # one head: the config checks heads divide the width, and the MLP never reads them
    return LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=ffn, hidden_act="silu",
                                num_attention_heads=1, num_key_value_heads=1))


def step_seconds(block: nn.Module, x: torch.Tensor, bf16: bool) -> float:
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = block(x)
    y.float().square().mean().backward()
    return time.perf_counter() - t0


def main(repeats: Annotated[int, typer.Option(min=1, help="timed steps per mode")] = 7,
         warmup: Annotated[int, typer.Option(min=0, help="untimed steps per mode first")] = 2,
         threads: Annotated[int, typer.Option(min=1, help="torch threads")] = 2,
         tokens: Annotated[int, typer.Option(min=1, help="rows per micro-batch")] = TOKENS) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    llm = get_config("demo").llm
    block = llm_mlp(llm.hidden, llm.ffn_dim)
    x = torch.randn(tokens, llm.hidden, requires_grad=True)
    times: dict[bool, list[float]] = {False: [], True: []}
    load0 = os.getloadavg()[0]
    for i in range(warmup + repeats):
        for bf16 in (False, True):  # round-robin: drift in the machine's load hits both modes alike
            t = step_seconds(block, x, bf16)
            if i >= warmup:
                times[bf16].append(t)
    load1 = os.getloadavg()[0]
    flags = sorted({f for f in open("/proc/cpuinfo").read().split() if "bf16" in f or f.startswith("amx")}) \
        if os.path.exists("/proc/cpuinfo") else []
    fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
    print(f"machine: {torch.backends.cpu.get_cpu_capability()}, bf16 features {flags or 'none'}, "
          f"native_bf16 {native_bf16(torch.device('cpu'))}; {threads} threads; 1-min load {load0:.2f} -> {load1:.2f}")
    print(f"demo LLM MLP block, [{tokens}, {llm.hidden}] -> {llm.ffn_dim} -> {llm.hidden}, forward + backward, "
          f"median of {repeats}")
    print("| mode | ms per step | vs fp32 |")
    print("| --- | ---: | ---: |")
    print(f"| fp32 | {1e3 * fp32:.1f} | 1.00x |")
    print(f"| bf16 autocast | {1e3 * bf16:.1f} | {fp32 / bf16:.2f}x |")


if __name__ == "__main__":
    typer.run(main)
