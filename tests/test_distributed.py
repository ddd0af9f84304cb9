"""training.distributed: the recipe under torchrun with 2 processes on gloo (DDP and FSDP), plus helpers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_data import make_world

from favor.build import build_model
from favor.checkpoint import load_checkpoint
from training import distributed as D
from training.features import weights_digest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "tiny.yaml"
STEPS = 3
TIMEOUT_S = 300  # ~10 s on 2 idle cores; the margin is for a loaded CI machine, not for a hang


def torchrun(out: Path, world, tok_dir: Path, strategy: str, *extra: str, steps: int = STEPS,
             timeout_s: float = TIMEOUT_S) -> list[dict]:
    """Run ``python -m training`` in 2 gloo processes; returns the run's metrics.jsonl records."""
    train, heldout = world
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training", "--config", str(TINY), f"train.train_manifest={train}",
           f"train.eval_manifest={heldout}", f"train.output_dir={out}", f"train.tokenizer={tok_dir}",
           f"train.steps={steps}", "train.ckpt_every=2", "train.eval_every=0", "train.eval_generate=1",
           "train.progress=false", f"train.distributed={strategy}", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "_TYPER_STANDARD_TRACEBACK": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stdout, stderr = dump_stacks_and_kill(proc)
        pytest.fail(f"torchrun still running after {timeout_s} s; the ranks' stacks:\n"
                    f"{stack_dumps(stderr)}\n{stdout[-2000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def stack_dumps(stderr: str) -> str:
    """stderr from the first faulthandler header on: whole, as two ranks' stacks outgrow any fixed tail."""
    first = re.search(r"^(Current thread|Thread) 0x", stderr, re.MULTILINE)
    return stderr[first.start():] if first else stderr[-8000:]


def descendants(pid: int) -> list[int]:
    """Child processes, recursively (torchrun starts each rank in its own session, so no process group)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [p for c in map(int, out) for p in (c, *descendants(c))]


def dump_stacks_and_kill(proc: subprocess.Popen) -> tuple[str, str]:
    """A hung run's diagnosis: every rank prints its threads' stacks on SIGUSR1 (training.distributed)."""
    ranks = descendants(proc.pid)
    for pid in ranks:
        # One rank at a time: faulthandler writes each frame unbuffered to the shared stderr, so ranks
        # signalled together interleave their stacks mid-line (seen in CI: one "Current thread" survived).
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
        time.sleep(1)
    for pid in (*ranks, proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return proc.communicate()


@pytest.fixture(scope="module")
def gloo_runs(tmp_path_factory):
    from conftest import make_tokenizer

    root = tmp_path_factory.mktemp("dist")
    world = make_world(root / "train"), make_world(root / "heldout", n_av=2)
    tok_dir = root / "tok"
    make_tokenizer().save_pretrained(tok_dir)
    return root, world, tok_dir


@pytest.mark.slow
def test_ddp_two_processes_end_with_identical_weights(gloo_runs):
    root, world, tok_dir = gloo_runs
    records = torchrun(root / "ddp", world, tok_dir, "ddp")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(r["samples"] == 2 * 2 * 2 for r in train)  # 2 ranks x batch 2 x accumulation 2
    digests = next(r for r in records if r["kind"] == "replicas")["digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks hold the same weights
    final = load_checkpoint(root / "ddp" / "final.safetensors")
    assert weights_digest(final.weights) == digests[0]
    state = torch.load(root / "ddp" / "step_000002" / "train_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["position"] == 2 * 2 * 2 * 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # per-rank dropout streams
    assert any(r["kind"] == "eval" for r in records)


@pytest.mark.slow
def test_a_stuck_run_shows_every_ranks_stack(gloo_runs):
    # A run far longer than its time limit stands in for a hang: each rank answers SIGUSR1 with its stacks.
    root, world, tok_dir = gloo_runs
    with pytest.raises(pytest.fail.Exception) as failure:
        torchrun(root / "stuck", world, tok_dir, "ddp", steps=10_000, timeout_s=20)
    message = str(failure.value)
    # One main-thread stack per rank, told by its bottom frame. Not by "Current thread": the kernel may hand
    # SIGUSR1 to any thread (a gloo or OpenMP one, seen in CI), and then faulthandler names none current.
    assert message.count('training/__main__.py", line') == 2, message[-3000:]
    assert "training/recipe.py" in message


@pytest.mark.slow
def test_fsdp_two_processes_match_ddp(gloo_runs):
    root, world, tok_dir = gloo_runs
    if not (root / "ddp" / "final.safetensors").exists():
        torchrun(root / "ddp", world, tok_dir, "ddp")
    records = torchrun(root / "fsdp", world, tok_dir, "fsdp")
    ddp = [r for r in map(json.loads, (root / "ddp" / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "train"]
    fsdp = [r for r in records if r["kind"] == "train"]
    # Same data, same maths; only the gradient reduction differs (all-reduce vs reduce-scatter), which
    # can change the last bit of a sum of two fp32 numbers divided by 2.
    for a, b in zip(ddp, fsdp, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    wa = load_checkpoint(root / "ddp" / "final.safetensors").weights
    wb = load_checkpoint(root / "fsdp" / "final.safetensors").weights
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)
    state = torch.load(root / "fsdp" / "step_000002" / "train_state.pt", weights_only=True)
    assert state["step"] == 2 and state["optimizer"]["state"]  # full (unsharded) optimiser state


def test_single_process_helpers(tiny_cfg, tokenizer):
    info = D.init_distributed()
    assert info.world_size == 1 and info.is_main and not info.enabled
    model = build_model(tiny_cfg, pretrained=False, tokenizer=tokenizer)
    assert D.wrap_model(model, "ddp", info) is model  # one process: nothing to wrap
    assert D.unwrap(model) is model
    with pytest.raises(ValueError, match="distributed strategy must be one of"):
        D.wrap_model(model, "zero3", info)
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(D.all_reduce_mean(x), x) and D.gather_objects("a") == ["a"]
    assert len(D.decoder_layers(model)) == tiny_cfg.llm.layers
    state = D.trainable_state(model, "none")
    assert set(state) == set(model.trainable_state_dict())
