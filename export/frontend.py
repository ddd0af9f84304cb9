"""Exportable stage wrappers: thin nn.Modules over FavorModel's own methods, with named I/O.

No maths lives here: each ``forward`` calls the method the model itself uses (``encode_audio``,
``encode_visual``, ``fuse``), so ONNX graphs and PyTorch compute the same function by construction.

    AudioFrontend   mel [B, n_mels, Tm]                                  -> audio_tokens [B, Ta, Da]
    VisualFrontend  pixels [B, T, 3, S, S], instruction_ids/mask [B, Li] -> visual_tokens [B, T, Qv, Dv]
    FusionFrontend  visual [B, W*F, Qv, Dv], audio [B, Ta, Da],
                    modality_mask [B, 2], frame_lengths [B]              -> av_embeds [B, W*Nq, D],
                                                                            av_mask [B, W*Nq] bool

The fusion graph takes whole windows of frames (T = W x F, the real length in ``frame_lengths``):
``pad_frames`` pads on the caller's side. This keeps the window count a clean symbolic W; with a
free T, ``windows.split_windows``'s ``if pad:`` is a data-dependent branch torch.export cannot keep
dynamic. Padding frames with zeros and masking them by length is exactly what ``split_windows``
does, so results are identical (tested).

Each wrapper declares ``inputs``: name -> {dim: axis} with axis names from export/profiles.py; an
axis written ``("windows", F)`` means F x windows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from favor.config import FavorConfig

if TYPE_CHECKING:  # annotations only: ort_inference imports fusion_feed without the model stack
    from favor.model import FavorModel

AxisSpec = dict[int, "str | tuple[str, int]"]


def pad_frames(visual: torch.Tensor, frames_per_window: int) -> torch.Tensor:
    """visual [B, T, Qv, Dv] zero-padded to whole windows: [B, ceil(T/F)*F, Qv, Dv]."""
    B, T = visual.shape[:2]
    pad = -(-T // frames_per_window) * frames_per_window - T
    if pad == 0:
        return visual
    return torch.cat([visual, visual.new_zeros(B, pad, *visual.shape[2:])], dim=1)  # [B, W*F, Qv, Dv]


def fusion_frames(cfg: FavorConfig, num_visual_frames: int, num_audio_tokens: int) -> int:
    """Frames the fusion covers, T = max(Tv, audio frames), as ``sync.align`` decides."""
    from favor import sync

    return max(num_visual_frames, sync.audio_frames(num_audio_tokens, cfg))


class AudioFrontend(nn.Module):
    name = "audio_encoder"
    input_names = ("mel",)
    output_names = ("audio_tokens",)

    def __init__(self, model: FavorModel):
        super().__init__()
        self.model = model

    def inputs(self) -> dict[str, AxisSpec]:
        return {"mel": {0: "batch", 2: "mel_frames"}}

    def example(self, batch: int = 2, mel_frames: int = 7) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, self.model.cfg.audio.n_mels, mel_frames),)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.model.encode_audio(mel)


class VisualFrontend(nn.Module):
    name = "visual_encoder"
    input_names = ("pixels", "instruction_ids", "instruction_mask")
    output_names = ("visual_tokens",)

    def __init__(self, model: FavorModel):
        super().__init__()
        self.model = model

    def inputs(self) -> dict[str, AxisSpec]:
        return {"pixels": {0: "batch", 1: "frames"}, "instruction_ids": {0: "batch", 1: "instruction"},
                "instruction_mask": {0: "batch", 1: "instruction"}}

    def example(self, batch: int = 2, frames: int = 3, instruction: int = 5) -> tuple[torch.Tensor, ...]:
        v = self.model.cfg.visual
        ids = torch.randint(0, v.qformer_vocab_size, (batch, instruction))
        return (torch.randn(batch, frames, 3, v.image_size, v.image_size), ids, torch.ones_like(ids))

    def forward(self, pixels: torch.Tensor, instruction_ids: torch.Tensor,
                instruction_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_visual(pixels, instruction_ids, instruction_mask)


class FusionFrontend(nn.Module):
    name = "fusion"
    input_names = ("visual_tokens", "audio_tokens", "modality_mask", "frame_lengths")
    output_names = ("av_embeds", "av_mask")

    def __init__(self, model: FavorModel):
        super().__init__()
        self.model = model

    def inputs(self) -> dict[str, AxisSpec]:
        F = self.model.cfg.timing.frames_per_window
        return {"visual_tokens": {0: "batch", 1: ("windows", F)}, "audio_tokens": {0: "batch", 1: "audio_tokens"},
                "modality_mask": {0: "batch"}, "frame_lengths": {0: "batch"}}

    def example(self, batch: int = 2, windows: int = 2, audio_tokens: int | None = None
                ) -> tuple[torch.Tensor, ...]:
        cfg = self.model.cfg
        T = windows * cfg.timing.frames_per_window
        Ta = audio_tokens or max(2, int(T * cfg.timing.audio_tokens_per_frame) - 1)
        return (torch.randn(batch, T, cfg.visual.num_query_tokens, cfg.visual_width),
                torch.randn(batch, Ta, cfg.audio_proj_dim), torch.ones(batch, 2),
                torch.full((batch,), T, dtype=torch.long))

    def forward(self, visual_tokens: torch.Tensor, audio_tokens: torch.Tensor, modality_mask: torch.Tensor,
                frame_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # num_frames = W*F: audio never reaches past the real frames (frame_lengths masks the rest).
        av = self.model.fuse(visual_tokens, audio_tokens, modality_mask, frame_lengths,
                             num_frames=visual_tokens.shape[1])
        return av.embeds, av.mask


def fusion_feed(cfg: FavorConfig, visual: torch.Tensor | None, audio: torch.Tensor | None,
                modality_mask: torch.Tensor | None = None, num_frames: int | None = None) -> dict[str, torch.Tensor]:
    """The fusion graph's feed for what ``FavorModel.fuse(visual, audio, modality_mask, num_frames=...)``
    takes: the one place the fusion input is built (verify, ``OrtBundle.fuse``, every bundle backend).

    visual [B, Tv, Qv, Dv] or None, audio [B, Ta, Da] or None. T = ``num_frames`` when given (one
    streaming window; a video that ended inside it is zero-padded, audio past it is cut), else
    max(Tv, audio frames), exactly as ``sync.align`` decides. Visual frames are zero-padded to whole
    windows (``pad_frames``; ``frame_lengths`` = T masks the rest). A missing stream enters as zeros
    with its modality flag at 0, which is what ``sync.align`` does with None: for audio one zero token
    (it covers one frame, so it never lengthens T), not ``round(T x tokens per frame)`` tokens, which
    at rates like 12.5 tokens/frame could cover one frame more than T.
    Returns visual_tokens [B, W*F, Qv, Dv], audio_tokens [B, Ta', Da], modality_mask [B, 2],
    frame_lengths [B] (int64), keyed by ``FusionFrontend.input_names``.
    """
    from favor import sync

    if visual is None and audio is None:
        raise ValueError("fuse needs visual or audio tokens, got neither")
    B = (visual if visual is not None else audio).shape[0]
    present = torch.tensor([[float(visual is not None), float(audio is not None)]]).expand(B, 2)
    mm = present if modality_mask is None else modality_mask.float() * present  # [B, 2]
    if num_frames is not None:
        T = num_frames
    else:
        T = fusion_frames(cfg, 0 if visual is None else visual.shape[1], 0 if audio is None else audio.shape[1])
    if visual is None:
        visual = torch.zeros(B, T, cfg.visual.num_query_tokens, cfg.visual_width)
    visual = visual[:, :T]
    visual = torch.cat([visual, visual.new_zeros(B, T - visual.shape[1], *visual.shape[2:])], 1)  # [B, T, ...]
    if audio is None:
        audio = torch.zeros(B, 1, cfg.audio_proj_dim)  # [B, 1, Da], masked out by modality_mask
    else:
        audio = audio[:, : int(sync.audio_frame_starts(T, cfg)[-1])]  # the tokens of frames < T only
    return {"visual_tokens": pad_frames(visual, cfg.timing.frames_per_window).float(),  # [B, W*F, Qv, Dv]
            "audio_tokens": audio.float(), "modality_mask": mm.contiguous(),
            "frame_lengths": torch.full((B,), T, dtype=torch.long)}
