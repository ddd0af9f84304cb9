"""Non-overlapping windows of F frames (the paper's "sliding windows"), and their inverse.

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


def merge_windows(windows: torch.Tensor, num_frames: int, tokens_per_frame: int) -> torch.Tensor:
    """Inverse of split_windows: [B, W, F*S, D] -> [B, T, S, D] (padding frames dropped)."""
    B, W, FS, D = windows.shape
    S = tokens_per_frame
    if FS % S:
        raise ValueError(f"window length ({FS}) is not a multiple of tokens per frame ({S})")
    x = windows.reshape(B, W * (FS // S), S, D)  # [B, W*F, S, D]
    return x[:, :num_frames]


def window_spans(num_frames: int, frames_per_window: int, fps: float) -> list[tuple[float, float]]:
    """(start, end) seconds of each window: window w covers frames [wF, (w+1)F)."""
    W = -(-num_frames // frames_per_window)
    return [(w * frames_per_window / fps, min((w + 1) * frames_per_window, num_frames) / fps)
            for w in range(W)]
