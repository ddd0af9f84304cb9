"""Temporal synchroniser: audio and visual tokens placed side by side on one frame grid.

For video frame t (shown at t / fps seconds) the slot holds S = tokens_per_frame rows:

    row j = [ visual_token_j(t)            (zero for j >= Qv),
              audio_token_{start(t) + j}   (zero for j >= count(t)) ]      concatenated on features

where audio tokens arrive at 50 Hz, start(t) = floor(t x 50 / fps) and count(t) = start(t+1) - start(t)
(25 at 2 FPS, as the release's `sequence_align_v2`; at rates that do not divide evenly the count
alternates, e.g. 12/13 at 4 FPS). The shorter stream is zero-padded to T = max(Tv, ceil(Ta / 25)) and
those frames stay valid (mask 1), as in the release. Modality masks [B, 2] (visual, audio) zero a
missing stream *before* concatenation.

Images are one frame; an image with audio is repeated over the audio's frames (``repeat_image``).

Notation: B batch, T frames, Qv visual tokens per frame, Ta audio tokens, S tokens per frame slot,
Dv visual width, Da projected audio width.
"""

from __future__ import annotations

import math

import torch

from favor.config import WHOLE_EPS, FavorConfig


def audio_frame_starts(num_frames: int, cfg: FavorConfig) -> torch.Tensor:
    """start(t) for t = 0..T (inclusive end), in audio tokens: [T + 1] int64."""
    per_frame = cfg.timing.audio_tokens_per_frame  # 25.0 tokens = 50 Hz x 0.5 s
    t = torch.arange(num_frames + 1, dtype=torch.float64)
    # + WHOLE_EPS absorbs float error when the product is whole (3 x 12.5 must give 37, not 36.999...)
    return torch.floor(t * per_frame + WHOLE_EPS).to(torch.int64)


def audio_frames(num_audio_tokens: int, cfg: FavorConfig) -> int:
    """Frames the audio covers: ceil(Ta / tokens per frame) (60 frames for 1500 tokens at 2 FPS)."""
    return math.ceil(num_audio_tokens / cfg.timing.audio_tokens_per_frame - WHOLE_EPS)


def repeat_image(visual: torch.Tensor, num_frames: int) -> torch.Tensor:
    """An image's tokens as a static video: [B, 1, Qv, Dv] -> [B, T, Qv, Dv]."""
    if visual.shape[1] != 1:
        raise ValueError(f"repeat_image expects one frame, got {visual.shape[1]}")
    return visual.expand(-1, num_frames, -1, -1)


def align(visual: torch.Tensor | None, audio: torch.Tensor | None, cfg: FavorConfig,
          modality_mask: torch.Tensor | None = None, num_frames: int | None = None) -> torch.Tensor:
    """Place visual [B, Tv, Qv, Dv] and projected audio [B, Ta, Da] on the frame grid.

    Either stream may be None (treated as all-zero, like a masked modality). ``num_frames`` forces T
    (e.g. a streaming window); otherwise T = max(Tv, audio_frames(Ta)).
    Returns fused tokens [B, T, S, Dv + Da].
    """
    if visual is None and audio is None:
        raise ValueError("align needs at least one of visual or audio")
    ref = visual if visual is not None else audio
    B, device, dtype = ref.shape[0], ref.device, ref.dtype
    Qv, S = cfg.visual.num_query_tokens, cfg.tokens_per_frame
    Dv, Da = cfg.visual_width, cfg.audio_proj_dim
    if visual is not None and tuple(visual.shape[2:]) != (Qv, Dv):
        raise ValueError(f"visual tokens must be [B, T, {Qv}, {Dv}], got {list(visual.shape)}")
    if audio is not None and audio.shape[-1] != Da:
        raise ValueError(f"audio tokens must be [B, Ta, {Da}], got {list(audio.shape)}")
    Tv = visual.shape[1] if visual is not None else 0
    Ta = audio.shape[1] if audio is not None else 0
    T = num_frames if num_frames is not None else max(Tv, audio_frames(Ta, cfg))

    vis_rows = torch.zeros(B, T, S, Dv, device=device, dtype=dtype)  # [B, T, S, Dv]
    if visual is not None:
        n = min(Tv, T)
        vis_rows[:, :n, :Qv] = visual[:, :n]

    aud_rows = torch.zeros(B, T, S, Da, device=device, dtype=dtype)  # [B, T, S, Da]
    if audio is not None and Ta > 0:
        starts = audio_frame_starts(T, cfg).to(device)  # [T + 1]
        j = torch.arange(S, device=device)
        idx = starts[:-1, None] + j[None, :]  # [T, S] audio token for row j of frame t
        valid = (j[None, :] < (starts[1:] - starts[:-1])[:, None]) & (idx < Ta)  # [T, S]
        gathered = audio[:, idx.clamp(max=Ta - 1)]  # [B, T, S, Da]
        aud_rows = gathered * valid[None, :, :, None].to(dtype)

    if modality_mask is not None:
        m = modality_mask.to(dtype)  # [B, 2]: (visual, audio)
        vis_rows = vis_rows * m[:, 0, None, None, None]
        aud_rows = aud_rows * m[:, 1, None, None, None]
    return torch.cat([vis_rows, aud_rows], dim=-1)  # [B, T, S, Dv + Da]


def frame_mask(lengths: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Valid-frame mask [B, T] from per-sample frame counts [B] (batch padding only)."""
    return torch.arange(num_frames, device=lengths.device)[None, :] < lengths[:, None]
