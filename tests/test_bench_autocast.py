"""benchmarks/bench_autocast.py runs both modes on the demo LLM's MLP shapes and prints a two-row table."""

from __future__ import annotations

import re

import torch
import typer
from typer.testing import CliRunner

from benchmarks.bench_autocast import llm_mlp, main, step_seconds


def test_llm_mlp_backward_reaches_the_input_in_both_modes():
    block = llm_mlp(6, 13)  # even width: LlamaConfig refuses an odd rotary head dim, though the MLP has none
    for bf16 in (False, True):
        x = torch.randn(5, 6, requires_grad=True)
        assert step_seconds(block, x, bf16) > 0
        assert x.grad is not None and x.grad.shape == (5, 6) and x.grad.abs().sum() > 0


def test_cli_prints_fp32_and_bf16_rows():
    app = typer.Typer()
    app.command()(main)
    result = CliRunner().invoke(app, ["--repeats", "1", "--warmup", "0", "--threads", "1", "--tokens", "8"])
    assert result.exit_code == 0, result.output
    assert re.search(r"\| fp32 \| [\d.]+ \| 1\.00x \|", result.output)
    assert re.search(r"\| bf16 autocast \| [\d.]+ \| [\d.]+x \|", result.output)
    assert "native_bf16" in result.output and "1-min load" in result.output
