"""Fused block-causal attention: the ``favor::block_causal_attention`` op over the C++ kernel.

The op computes exactly ``favor.attention.reference_attention`` (see kernels/README.md for the maths
and limits) on CPU tensors, fp32/fp16/bf16 in, same dtype out, fp32 accumulation. bf16 runs on the
CPU's bf16 dot-product instruction (vdpbf16ps) where the CPU has avx512_bf16, about 1.8x the fp32
speed; ``extension().build_info()["micro_kernels"]`` names the paths in use. It is a
``torch.library.custom_op`` with a fake (meta) implementation, so torch.compile, torch.export and
torch.onnx.export trace it as one node; favor/onnx_attention.py maps that node to the ONNX op
``favor.BlockCausalAttention``. Forward only: training uses the reference path.

Shapes: q, k, v [N, H, L, Dh] with L = frames x tokens_per_frame; key_padding_mask [N, L]
(True = real token); output [N, H, L, Dh].

The extension ``favor._C`` is imported lazily: this module imports without it, ``available()``
says whether it was built.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from favor.config import Orientation

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _load() -> ModuleType | ImportError:
    try:
        from favor import _C
    except ImportError as err:
        return err
    return _C


def extension() -> ModuleType:
    """The compiled module ``favor._C``; ImportError (with the reason) when it was not built."""
    lib = _load()
    if isinstance(lib, ImportError):
        raise ImportError(f"favor._C is not built ({lib}); run `pip install -e .` in the repo root")
    return lib


def available() -> bool:
    """True when the compiled kernel can be imported."""
    return not isinstance(_load(), ImportError)


def _numpy(t: torch.Tensor):
    """Zero-copy NumPy view; bf16 (no NumPy dtype) travels as its uint16 bits."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy()
    return t.numpy()


def _head_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernel takes any strides except in the head dim, so views of a fused QKV pass uncopied.
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _verify(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens_per_frame: int,
            orientation: str, key_padding_mask: torch.Tensor | None) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [N, H, L, Dh], got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal q shape {tuple(q.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} must equal q dtype {q.dtype}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q dtype must be one of {_DTYPES}, got {q.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor for the fused CPU kernel, got {t.device}")
    if orientation not in ("past", "future"):
        raise ValueError(f"orientation ({orientation!r}) must be 'past' or 'future'")
    if tokens_per_frame < 1 or q.shape[2] % tokens_per_frame:
        raise ValueError(f"window length ({q.shape[2]}) must be a multiple of tokens per frame "
                         f"({tokens_per_frame})")
    if key_padding_mask is not None:
        expected = (q.shape[0], q.shape[2])
        if tuple(key_padding_mask.shape) != expected:
            raise ValueError(f"key_padding_mask must be [N, L] = {list(expected)}, got "
                             f"{list(key_padding_mask.shape)}")
        if key_padding_mask.device.type != "cpu":
            raise ValueError(f"key_padding_mask must be a CPU tensor, got {key_padding_mask.device}")


@torch.library.custom_op("favor::block_causal_attention", mutates_args=(), device_types="cpu")
def _block_causal_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens_per_frame: int,
                               orientation: str, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    q, k, v = (_head_contiguous(t.detach()) for t in (q, k, v))
    out = torch.empty(q.shape, dtype=q.dtype)  # contiguous [N, H, L, Dh]
    mask = None if key_padding_mask is None else _numpy(key_padding_mask.detach().bool())
    extension().block_causal_attention(
        _numpy(q), _numpy(k), _numpy(v), _numpy(out), tokens_per_frame, orientation, mask,
        dtype="bfloat16" if q.dtype == torch.bfloat16 else "auto",
        num_threads=torch.get_num_threads())  # follow torch's intra-op thread setting
    return out


@_block_causal_attention_op.register_fake
def _(q, k, v, tokens_per_frame, orientation, key_padding_mask):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens_per_frame: int,
                           orientation: Orientation = "past",
                           key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fused block-causal attention; same contract as ``favor.attention.reference_attention``.

    q, k, v: [N, H, L, Dh] CPU tensors (fp32, fp16 or bf16; head dim <= 256); tokens_per_frame
    divides L; key_padding_mask: [N, L] bool (True = real) or None. Returns [N, H, L, Dh].
    """
    _verify(q, k, v, tokens_per_frame, orientation, key_padding_mask)
    return torch.ops.favor.block_causal_attention(q, k, v, tokens_per_frame, orientation, key_padding_mask)
