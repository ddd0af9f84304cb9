"""The fused block-causal attention kernel (favor._C via favor.ops) against the reference.

Tolerance policy (STYLE.md point 9): the kernel's error against a float64 reference computed from
the same inputs may be at most twice the error PyTorch's own reference path makes in the kernel's
input precision, plus 4 fp32 ulps of the output's scale (a floor for cases where PyTorch happens to
be exact, e.g. one visible key, while our different summation order is not).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from favor import attention, ops
from favor.attention import reference_attention

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
EPS32 = torch.finfo(torch.float32).eps


def _inputs(n, h, frames, tpf, d, dtype=torch.float32, pad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = frames * tpf
    q, k, v = (torch.randn(n, h, L, d, generator=g).to(dtype) for _ in range(3))
    mask = None
    if pad:
        mask = torch.rand(n, L, generator=g) > 0.3
        mask[0, -tpf:] = False  # a whole padded frame, so some query rows may see nothing
    return q, k, v, mask


def _check(out, q, k, v, tpf, orientation, mask):
    ref64 = reference_attention(q.double(), k.double(), v.double(), tpf, orientation, mask)
    ref_lowp = reference_attention(q, k, v, tpf, orientation, mask)
    torch_err = (ref_lowp.double() - ref64).abs().max().item()
    err = (out.double() - ref64).abs().max().item()
    floor = 4 * EPS32 * max(ref64.abs().max().item(), 1.0)
    assert torch.isfinite(out).all(), "kernel left NaN/inf (unwritten or poisoned elements)"
    assert err <= 2 * torch_err + floor, f"kernel err {err:.3g} > 2 x torch err {torch_err:.3g} + {floor:.3g}"


def _random_cases(count, seed=1234):
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        frames, tpf = rng.randint(1, 20), rng.randint(1, 64)
        while frames * tpf > 640:  # keep the float64 reference fast; the long end is covered below
            frames = max(1, frames // 2)
        cases.append((rng.randint(1, 3), rng.randint(1, 16), frames, tpf, rng.randint(32, 128),
                      rng.choice(["past", "future"]), rng.random() < 0.5, i))
    return cases


FIXED = [  # edge shapes: one token, one frame, the release shape, the longest window, odd everything
    (1, 1, 1, 1, 32, "past", False, 0),
    (2, 3, 1, 7, 33, "future", True, 1),
    (1, 12, 10, 32, 128, "past", True, 2),
    (1, 12, 10, 32, 128, "future", False, 3),
    (1, 2, 20, 64, 96, "past", True, 4),
    (3, 5, 13, 25, 71, "future", True, 5),
    (1, 2, 20, 64, 256, "future", True, 6),  # longest window at the largest head dim
]


@pytest.mark.parametrize("n,h,frames,tpf,d,orientation,pad,seed", FIXED + _random_cases(24))
def test_parity_fp32_poisoned(n, h, frames, tpf, d, orientation, pad, seed):
    q, k, v, mask = _inputs(n, h, frames, tpf, d, pad=pad, seed=seed)
    out = torch.full_like(q, float("nan"))  # poison: any element the kernel skips stays NaN
    ops.extension().block_causal_attention(q.numpy(), k.numpy(), v.numpy(), out.numpy(), tpf, orientation,
                                           None if mask is None else mask.numpy())
    _check(out, q, k, v, tpf, orientation, mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("orientation", ["past", "future"])
def test_parity_low_precision(dtype, orientation):
    q, k, v, mask = _inputs(2, 3, 7, 11, 40, dtype=dtype, pad=True, seed=7)
    out = ops.block_causal_attention(q, k, v, 11, orientation, mask)
    assert out.dtype == dtype
    _check(out, q, k, v, 11, orientation, mask)


def test_strided_views_and_no_stray_writes():
    """q, k, v as views of one fused projection; out as a view inside a poisoned buffer."""
    n, h, frames, tpf, d = 2, 3, 5, 9, 48
    L = frames * tpf
    qkv = torch.randn(n, L, 3, h, d)  # the layout a fused QKV linear produces
    q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))  # [N, H, L, D], non-contiguous
    big = torch.full((n, h, L, d + 5), float("nan"))
    out = big[..., 2:2 + d]  # row stride d + 5: writes past a row would hit the NaN margin
    ops.extension().block_causal_attention(q.numpy(), k.numpy(), v.numpy(), out.numpy(), tpf, "past")
    _check(out, q, k, v, tpf, "past", None)
    assert torch.isnan(big[..., :2]).all() and torch.isnan(big[..., 2 + d:]).all(), "wrote outside out"


def test_fully_masked_rows_are_zero():
    q, k, v, _ = _inputs(2, 2, 4, 5, 32, seed=3)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0] = False  # window 0 entirely padding
    mask[1, :5] = False  # 'past': frame 0 of window 1 sees only padded keys
    out = ops.block_causal_attention(q, k, v, 5, "past", mask)
    assert (out[0] == 0).all() and (out[1, :, :5] == 0).all()
    _check(out, q, k, v, 5, "past", mask)


@pytest.mark.parametrize("orientation", ["past", "future"])
def test_invisible_blocks_are_never_read(orientation):
    """NaN keys/values a whole query tile cannot see leave its rows finite (block skipping).

    The reference itself would turn NaN values into NaN rows (0 * NaN in its P @ V), so this is a
    property of the kernel's block walk, checked on frame-aligned 32-row tiles.
    """
    tpf, frames = 32, 4
    q, k, v, _ = _inputs(1, 2, frames, tpf, 64, seed=5)
    hidden = slice(tpf, None) if orientation == "past" else slice(0, tpf * (frames - 1))
    k[:, :, hidden], v[:, :, hidden] = float("nan"), float("nan")
    out = ops.block_causal_attention(q, k, v, tpf, orientation)
    seen = slice(0, tpf) if orientation == "past" else slice(tpf * (frames - 1), None)
    assert torch.isfinite(out[:, :, seen]).all()
    ref = reference_attention(q[:, :, seen], k[:, :, seen], v[:, :, seen], tpf, orientation)
    torch.testing.assert_close(out[:, :, seen], ref, rtol=0, atol=1e-5)  # fp32 rounding only


def test_threads_and_head_split_do_not_change_result():
    q, k, v, mask = _inputs(2, 5, 6, 13, 64, pad=True, seed=9)
    outs = []
    # head_split=4 runs each head's 3 query tiles as separate items, each packing its own keys.
    for threads, split in ((1, 0), (2, 0), (2, 4), (1, 2)):
        out = torch.full_like(q, float("nan"))
        ops.extension().block_causal_attention(q.numpy(), k.numpy(), v.numpy(), out.numpy(), 13, "future",
                                               mask.numpy(), num_threads=threads, head_split=split)
        outs.append(out)
    _check(outs[0], q, k, v, 13, "future", mask)
    for out in outs[1:]:  # each query tile is computed by one thread in one fixed order
        assert torch.equal(outs[0], out)


def _run_with_isa(isa: str, script: str) -> str:
    import sys

    env = {**os.environ, "FAVOR_CPU_ISA": isa}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("isa,expected", [("avx512", "kAvx512 "), ("avx2", "kAvx2"), ("baseline", "kPortable")])
def test_narrower_isa_paths_match(isa, expected):
    """The AVX-512, AVX2 and baseline fp32 paths (chosen once per process) on this machine's CPU."""
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("ISA dispatch exists only on x86-64")
    if isa == "avx512" and "avx512f" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX-512")
    script = (
        "import torch; from favor import ops; from favor.attention import reference_attention\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v = (torch.randn(2, 3, 45, 72, generator=g) for _ in range(3))\n"
        "m = torch.rand(2, 45, generator=g) > 0.3\n"
        "out = ops.block_causal_attention(q, k, v, 9, 'past', m)\n"
        "ref = reference_attention(q.double(), k.double(), v.double(), 9, 'past', m)\n"
        "print(ops.extension().build_info()['micro_kernels'], '|', (out.double() - ref).abs().max().item())\n")
    name, err = _run_with_isa(isa, script).split("|")
    assert name.startswith(expected)
    if isa != "avx512":
        assert "bf16: via fp32" in name  # no bf16 dot-product path below AVX-512
    assert float(err) < 1e-5  # fp32 kernel vs float64 on O(1) outputs (same policy as above: ~1e-6 seen)


def _has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx512_bf16(), reason="the CPU has no avx512_bf16 (vdpbf16ps)")
@pytest.mark.parametrize("n,h,frames,tpf,d,orientation,pad,seed", [
    (1, 2, 10, 32, 128, "past", False, 0),    # release tile geometry
    (2, 3, 7, 11, 40, "future", True, 1),     # odd everything, padding
    (1, 2, 5, 9, 33, "past", True, 2),        # odd head dim: the last bf16 pair is half padding
    (1, 1, 3, 13, 256, "future", False, 3),   # largest head dim
])
def test_bf16_dot_product_path(n, h, frames, tpf, d, orientation, pad, seed):
    """bf16 inputs run on vdpbf16ps (fp32 accumulation, P rounded to bf16 for P.V).

    Policy: max |kernel - ref64| <= 2 x max |torch bf16 reference - ref64| (+ the fp32 floor). The
    torch bf16 reference rounds q.k, the scores and P to bf16 and multiplies in bf16, so its error
    is at least the bf16 rounding of the output; ours adds only the rounding of P (relative 2^-9
    per weight, averaging out over the keys) and of the output, so twice torch's error bounds it.
    """
    assert "vdpbf16ps" in ops.extension().build_info()["micro_kernels"]
    q, k, v, mask = _inputs(n, h, frames, tpf, d, dtype=torch.bfloat16, pad=pad, seed=seed)
    out = ops.block_causal_attention(q, k, v, tpf, orientation, mask)
    assert out.dtype == torch.bfloat16
    _check(out, q, k, v, tpf, orientation, mask)


@pytest.mark.skipif(not _has_avx512_bf16(), reason="the CPU has no avx512_bf16 (vdpbf16ps)")
def test_bf16_paths_agree_with_and_without_dot_product():
    """FAVOR_CPU_ISA=avx512 turns vdpbf16ps off: bf16 is then widened to fp32. Both pass the policy."""
    script = (
        "import torch; from favor import ops\n"
        "from favor.attention import reference_attention as ref\n"
        "g = torch.Generator().manual_seed(4)\n"
        "q, k, v = (torch.randn(2, 3, 60, 64, generator=g).bfloat16() for _ in range(3))\n"
        "out = ops.block_causal_attention(q, k, v, 12, 'past')\n"
        "r64 = ref(q.double(), k.double(), v.double(), 12, 'past')\n"
        "tb = (ref(q, k, v, 12, 'past').double() - r64).abs().max().item()\n"
        "print(ops.extension().build_info()['micro_kernels'], '|', (out.double() - r64).abs().max().item(), '|', tb)\n")
    for isa, path in (("avx512", "bf16: via fp32"), ("", "vdpbf16ps")):
        name, err, torch_err = _run_with_isa(isa, script).split("|")
        assert path in name
        assert float(err) <= 2 * float(torch_err), (isa, err, torch_err)  # the bf16 policy above


def _bind(q, k, v, out, tpf=4, orientation="past", mask=None, **kw):
    ops.extension().block_causal_attention(q, k, v, out, tpf, orientation, mask, **kw)


def test_binding_rejects_bad_inputs_with_clear_messages():
    q = torch.randn(2, 3, 8, 16).numpy()
    k, v, out = q.copy(), q.copy(), q.copy()
    with pytest.raises(ValueError, match=r"k shape \[2, 3, 8, 15\] must equal q shape \[2, 3, 8, 16\]"):
        _bind(q, k[..., :15], v, out)
    with pytest.raises(ValueError, match="v dtype float16 must equal q dtype float32"):
        _bind(q, k, v.astype("float16"), out)
    with pytest.raises(ValueError, match=r"must be 4-D \[B, H, L, D\], got shape \[3, 8, 16\]"):
        _bind(q[0], k, v, out)
    with pytest.raises(ValueError, match=r"window length \(8\) must be a multiple of tokens_per_frame \(3\)"):
        _bind(q, k, v, out, tpf=3)
    with pytest.raises(ValueError, match="orientation must be 'past' or 'future', got 'up'"):
        _bind(q, k, v, out, orientation="up")
    with pytest.raises(ValueError, match=r"key_padding_mask must be \[B, L\] = \[2, 8\], got \[2, 7\]"):
        _bind(q, k, v, out, mask=torch.ones(2, 7, dtype=torch.bool).numpy())
    with pytest.raises(ValueError, match="key_padding_mask must be bool or uint8, got float32"):
        _bind(q, k, v, out, mask=torch.ones(2, 8).numpy())
    with pytest.raises(ValueError, match="out must not overlap q"):
        _bind(q, k, v, q)
    with pytest.raises(ValueError, match="q must be float32 or float16"):
        _bind(*(a.astype("float64") for a in (q, k, v, out)))
    with pytest.raises(ValueError, match="head dim must be <= 256, got 300"):
        big = torch.randn(1, 1, 4, 300).numpy()
        _bind(big, big.copy(), big.copy(), big.copy())


def test_non_head_contiguous_rejected():
    q = torch.randn(1, 2, 4, 8).numpy()
    qt = q.transpose(0, 1, 3, 2).copy().transpose(0, 1, 3, 2)  # same values, D stride != 1
    with pytest.raises(ValueError, match=r"must be contiguous in the head dim \(stride 4 bytes\), got 16"):
        _bind(qt, q.copy(), q.copy(), q.copy())


def test_python_wrapper_checks():
    q = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match=r"window length \(6\) must be a multiple of tokens per frame \(4\)"):
        ops.block_causal_attention(q, q, q, 4, "past")
    with pytest.raises(ValueError, match=r"key_padding_mask must be \[N, L\] = \[1, 6\], got \[1, 5\]"):
        ops.block_causal_attention(q, q, q, 3, "past", torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="orientation \\('sideways'\\) must be 'past' or 'future'"):
        ops.block_causal_attention(q, q, q, 3, "sideways")


def test_custom_op_registration_and_export():
    q, k, v, mask = _inputs(1, 2, 3, 5, 32, pad=True)
    torch.library.opcheck(torch.ops.favor.block_causal_attention.default, (q, k, v, 5, "past", mask),
                          test_utils=("test_schema", "test_faketensor"))

    class M(torch.nn.Module):
        def forward(self, q, k, v, m):
            return ops.block_causal_attention(q, k, v, 5, "past", m)

    ep = torch.export.export(M(), (q, k, v, mask))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert "favor.block_causal_attention.default" in targets
    torch.testing.assert_close(ep.module()(q, k, v, mask), M()(q, k, v, mask), rtol=0, atol=0)


def test_window_attention_switch():
    q, k, v, mask = _inputs(2, 3, 4, 6, 32, pad=True, seed=11)
    ref = attention.window_attention(q, k, v, 6, "future", mask)
    with attention.fused_attention():
        fused = attention.window_attention(q, k, v, 6, "future", mask)
        q_grad = q.clone().requires_grad_()
        trained = attention.window_attention(q_grad, k, v, 6, "future", mask)
    assert trained.grad_fn is not None  # training keeps the differentiable reference path
    _check(fused, q, k, v, 6, "future", mask)
    assert not torch.equal(fused, ref)  # the fused path really ran (summation order differs)


def test_window_attention_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(ops, "_load", lambda: ImportError("not built (test)"))
    monkeypatch.setattr(attention, "_WARNED", False)
    q, k, v, _ = _inputs(1, 2, 3, 4, 32)
    with attention.fused_attention(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = attention.window_attention(q, k, v, 4, "past")
        b = attention.window_attention(q, k, v, 4, "past")
    assert len([w for w in caught if "fused block-causal attention unavailable" in str(w.message)]) == 1
    ref = reference_attention(q, k, v, 4, "past")
    assert torch.equal(a, ref) and torch.equal(b, ref)


def test_causal_qformer_fused_matches_reference():
    qformer = pytest.importorskip("favor.qformer")
    from favor.config import get_config

    for orientation in ("past", "future"):
        cfg = get_config("tiny")
        cfg.qformer.orientation = orientation
        cfg.qformer.mask_padding_in_causal = True  # exercise the kernel's padding path too
        torch.manual_seed(0)
        model = qformer.CausalQFormer(cfg).eval()
        tokens_per_window = cfg.tokens_per_window
        n = 3
        x = torch.randn(n, tokens_per_window, cfg.fused_width)
        token_mask = torch.ones(n, tokens_per_window, dtype=torch.bool)
        token_mask[1, tokens_per_window // 2:] = False
        with torch.no_grad():
            ref = model(x, token_mask)
            with attention.fused_attention():
                fused = model(x, token_mask)
        # Two layers of fp32 attention differing only in summation order: errors of a few ulps
        # propagate through LayerNorms and FFNs; 1e-5 is ~100 ulps at the O(1) output scale.
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_cuda_sources_compile_for_orin_and_hopper(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA kernel is only compiled where the CUDA toolkit exists")
    for arch in ("87", "90"):
        obj = tmp_path / f"bca_sm{arch}.o"
        cmd = [nvcc, "-std=c++17", "-O3", "-c", f"-I{KERNELS}",
               f"-gencode=arch=compute_{arch},code=sm_{arch}",
               str(KERNELS / "block_causal_attention.cu"), "-o", str(obj)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        # The fatbinary names its target; cuobjdump is not in every toolkit, so read the bytes.
        assert f"sm_{arch}".encode() in obj.read_bytes()

def test_flop_formula_counts_only_visible_pairs():
    from benchmarks.bench_attention import attention_flops

    # 'past', 10 frames: frame f sees f + 1 frames -> 55 of 100 frame pairs.
    assert attention_flops(1, 1, 10, 32, 128) == 4 * 55 * 32 * 32 * 128
    assert math.isclose(attention_flops(2, 12, 10, 32, 128) / (4 * 2 * 12 * 320 ** 2 * 128), 0.55)


def test_bench_refuses_a_loaded_machine(tmp_path):
    """The attention benchmark's quiet-machine guard: above --max-load it exits 2 with one line."""
    from typer.testing import CliRunner

    from benchmarks.bench_attention import app

    # A negative limit is below any load average, so the guard must refuse before timing anything.
    result = CliRunner().invoke(app, ["--max-load", "-1", "--out", str(tmp_path / "r.md"),
                                      "--jsonl", str(tmp_path / "r.jsonl")])
    assert result.exit_code == 2
    assert "error: 1-min load average" in result.output
    assert not (tmp_path / "r.jsonl").exists()


def test_bench_round_robin_and_foreign_load():
    from benchmarks.bench_attention import ForeignLoad, round_robin

    calls = []
    with ForeignLoad() as load:
        t = round_robin({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up each, then strictly alternating rounds
    assert set(t) == {"a", "b"} and all(r["repeats"] == 3 and r["median_ms"] >= 0 for r in t.values())
    assert load.foreign_cpus is None or load.foreign_cpus >= 0
