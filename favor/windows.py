"""Non-overlapping windows of F frames (the paper's "sliding windows").

T frames are zero-padded to W x F (W = ceil(T / F)); padded frames get mask 0. Each window is
flattened to F x S tokens and becomes an independent row for the causal Q-Former.

Notation: B batch, T frames, W windows, F frames per window, S tokens per frame, D width.
"""

from __future__ import annotations

import torch


def split_windows(x: torch.Tensor, frames_per_window: int, frame_mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, T, S, D] -> (windows [B, W, F*S, D], token mask [B, W, F*S] bool)."""
    B, T, S, D = x.shape
    F = frames_per_window
    W = -(-T // F)  # ceil(T / F)
    pad = W * F - T
    if frame_mask is None:
        frame_mask = torch.ones(B, T, dtype=torch.bool, device=x.device)
    if frame_mask.shape != (B, T):
        raise ValueError(f"frame_mask must be [{B}, {T}], got {list(frame_mask.shape)}")
    if pad:
        x = torch.cat([x, x.new_zeros(B, pad, S, D)], dim=1)  # [B, W*F, S, D]
        frame_mask = torch.cat([frame_mask.bool(), frame_mask.new_zeros(B, pad, dtype=torch.bool)], 1)
    windows = x.reshape(B, W, F * S, D)  # [B, W, F*S, D]: frame-major inside a window
    token_mask = frame_mask.bool().reshape(B, W, F, 1).expand(B, W, F, S).reshape(B, W, F * S)
    return windows, token_mask
