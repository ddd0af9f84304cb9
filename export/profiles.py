"""Dynamic-axis profiles (min / opt / max) derived from the FAVOR config and the export limits.

One table serves three consumers: ``torch.export.Dim`` ranges for the ONNX export, the manifest's
``dynamic_axes``, and TensorRT optimisation profiles. Every bound comes from the config's timing
(frames per window, frame rate, mel rate, Whisper's 30 s context) and the LLM's position table.

Axes (names used in the ONNX graphs):
    batch            requests per call
    frames           video frames T into the visual encoder
    windows          W = T / F windows into the fusion graph (its frame axis is F x W)
    mel_frames       Tm log-mel frames (100 Hz) into the audio encoder, <= Whisper's 30 s context
    audio_tokens     Ta projected audio tokens (50 Hz) into the fusion graph
    instruction      Li instruction tokens into the visual encoder's Q-Former
    seq / past / total   new decoder tokens, cached tokens, their sum (<= LLM positions)

opt is the streaming case: one window at a time and a one-window prompt.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from favor.config import FavorConfig

# Text tokens around the AV chunk in a typical prompt ("USER: <Img>" ... "\nASSISTANT:"), used
# only for TensorRT's opt shape (kernel selection), never as a bound.
TYPICAL_TEXT_TOKENS = 32


@dataclass(frozen=True)
class Axis:
    name: str
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (0 <= self.min <= self.opt <= self.max):
            raise ValueError(f"axis {self.name}: need 0 <= min <= opt <= max, got "
                             f"{self.min}/{self.opt}/{self.max}")


@dataclass(frozen=True)
class Limits:
    """What the bundle must accept; defaults come from the config."""

    max_batch: int = 1
    max_frames: int | None = None  # None = cfg.timing.max_frames

    def frames(self, cfg: FavorConfig) -> int:
        n = self.max_frames if self.max_frames is not None else cfg.timing.max_frames
        if n < 1:
            raise ValueError(f"max_frames ({n}) must be >= 1")
        return n


def axes(cfg: FavorConfig, limits: Limits = Limits()) -> dict[str, Axis]:
    t = cfg.timing
    F = t.frames_per_window
    max_frames = limits.frames(cfg)
    max_windows = t.num_windows(max_frames)
    mel_per_frame = t.mel_rate / t.video_fps  # 50 mel frames = 100 Hz x 0.5 s at 2 FPS
    # Whisper's encoder sees at most its 30 s context; longer audio goes in as several calls.
    max_mel = min(t.whisper_mel_frames, math.ceil(max_frames * mel_per_frame))
    window_mel = min(max_mel, math.ceil(F * mel_per_frame))
    max_audio = math.ceil(max_frames * t.audio_tokens_per_frame)  # tokens the fusion graph can place
    window_audio = math.ceil(F * t.audio_tokens_per_frame)
    av_window = cfg.qformer.num_queries  # LLM tokens per window
    P = cfg.llm.max_positions
    prompt_opt = min(P, av_window + TYPICAL_TEXT_TOKENS)
    table = [
        Axis("batch", 1, 1, limits.max_batch),
        Axis("frames", 1, min(F, max_frames), max_frames),
        Axis("windows", 1, 1, max_windows),
        Axis("mel_frames", 1, window_mel, max_mel),
        Axis("audio_tokens", 1, min(window_audio, max_audio), max_audio),
        Axis("instruction", 1, min(TYPICAL_TEXT_TOKENS, cfg.visual.max_instruction_tokens),
             cfg.visual.max_instruction_tokens),
        Axis("seq", 1, prompt_opt, P),
        Axis("past", 0, prompt_opt, P - 1),
        Axis("total", 1, prompt_opt + 1, P),
    ]
    return {a.name: a for a in table}


def as_dict(table: dict[str, Axis]) -> dict[str, dict[str, int]]:
    return {name: {k: v for k, v in asdict(a).items() if k != "name"} for name, a in table.items()}
