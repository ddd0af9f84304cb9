"""Block-causal window attention: the one operator the causal Q-Former adds to a transformer.

Inside one window of F frames x S tokens per frame (L = F*S tokens), token i belongs to frame
i // S. With orientation

    'past'   (the paper): a token of frame f attends every token of frames <= f;
    'future' (the release's triu mask): a token of frame f attends every token of frames >= f.

An optional key padding mask (True/1 = real token) removes padded keys as well. A query row whose
keys are all masked returns zeros (it can only be a padding row; callers mask it downstream).

``window_attention`` is the single entry point. The reference below is the specification; a fused
kernel (favor.ops, built from kernels/) replaces it behind ``use_fused`` and must match it.

Shapes: q, k, v [N, H, L, Dh] with N = B*W windows; key_padding_mask [N, L].
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import torch

from favor.config import Orientation

_USE_FUSED = False
_WARNED = False


def block_causal_mask(num_tokens: int, tokens_per_frame: int, orientation: Orientation,
                      device: torch.device | None = None) -> torch.Tensor:
    """Boolean [L, L] mask, True where query i may attend key j."""
    if num_tokens % tokens_per_frame:
        raise ValueError(f"window length ({num_tokens}) must be a multiple of tokens per frame "
                         f"({tokens_per_frame})")
    frame = torch.arange(num_tokens, device=device) // tokens_per_frame  # [L]
    q_frame, k_frame = frame[:, None], frame[None, :]
    if orientation == "past":
        return k_frame <= q_frame
    if orientation == "future":
        return k_frame >= q_frame
    raise ValueError(f"orientation ({orientation!r}) must be 'past' or 'future'")


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens_per_frame: int,
                        orientation: Orientation, key_padding_mask: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """Readable PyTorch block-causal attention (the spec the kernels are tested against)."""
    L = q.shape[-2]
    allowed = block_causal_mask(L, tokens_per_frame, orientation, q.device)  # [L, L]
    allowed = allowed[None, None]  # [1, 1, L, L]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool()[:, None, None, :]  # [N, 1, L, L]
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # [N, H, L, L]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows -> zeros, not NaN
    return (probs.to(v.dtype) @ v)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens_per_frame: int,
                     orientation: Orientation, key_padding_mask: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Block-causal attention over one window per batch row; fused kernel when enabled and built."""
    global _WARNED
    if _USE_FUSED and not (torch.is_grad_enabled() and q.requires_grad):
        from favor import ops  # imports without the extension; available() says whether it is built

        if ops.available() and q.device.type == "cpu":
            return ops.block_causal_attention(q, k, v, tokens_per_frame, orientation, key_padding_mask)
        if not _WARNED:  # say why once, then keep using the reference
            reason = (f"{q.device.type} tensors (the fused kernel runs on CPU)" if ops.available()
                      else f"favor._C is not built ({ops._load()})")
            warnings.warn(f"fused block-causal attention unavailable for {reason}; using the "
                          "PyTorch reference", stacklevel=2)
            _WARNED = True
    return reference_attention(q, k, v, tokens_per_frame, orientation, key_padding_mask)


@contextlib.contextmanager
def fused_attention(enabled: bool = True) -> Iterator[None]:
    """Context manager switching window_attention to the fused kernel (inference only)."""
    global _USE_FUSED
    previous, _USE_FUSED = _USE_FUSED, enabled
    try:
        yield
    finally:
        _USE_FUSED = previous
