"""A whole clip's model inputs, decoded one way for training, favor-eval and ``Engine.ask``.

    decode_clip(cfg, audio=path|None, visual=path|None, is_image=False) -> (mel [M, Tm] | None,
                                                                            pixels [T, 3, S, S] | None)

The release's rules: audio is the first 30 s of the recording, zero-padded to ``min_audio_seconds``
(3 s in the release dataset) and, when cfg.audio.pad_to_30s, to 30 s as a waveform (so the release's
features are reproduced exactly); video is sampled at cfg.timing.video_fps up to cfg.timing.max_frames;
an image is one frame. training/data.py decodes every sample with it and runtime/clip.py every
question about a clip, so an answer from the runtime sees exactly the features favor-eval scores.

Notation: M mel bins, Tm mel frames (100 Hz), T frames, S image side.
"""

from __future__ import annotations

import math
import os

import torch

from favor import media
from favor.config import FavorConfig

MIN_AUDIO_SECONDS = 3.0  # release dataset: shorter audio zero-padded to 3 s


def decode_clip(cfg: FavorConfig, audio: str | os.PathLike | None = None, visual: str | os.PathLike | None = None,
                is_image: bool = False, min_audio_seconds: float = MIN_AUDIO_SECONDS
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(mel [M, Tm], pixels [T, 3, S, S]) of the recording ``audio`` and the video or image ``visual``;
    None for an input not given. media.MediaError (a ValueError naming the file) if one cannot be read."""
    timing = cfg.timing
    mel = pixels = None
    if audio is not None:
        sr = timing.sample_rate
        wave = media.load_audio(audio, sr)
        wave = wave[: timing.whisper_chunk_seconds * sr]  # release: first 30 s only
        min_samples = math.ceil(min_audio_seconds * sr)
        if wave.shape[0] < min_samples:
            wave = media.pad_or_trim(wave, min_samples)
        # pad_to_30s pads the waveform (not the mel) so the release's features are reproduced exactly
        pad = timing.whisper_chunk_seconds * sr if cfg.audio.pad_to_30s else None
        mel = media.log_mel_spectrogram(wave, cfg.audio.n_mels, timing, pad_to_samples=pad)  # [M, Tm]
    if visual is not None:
        if is_image:
            frames = media.load_image(visual)  # [H, W, 3]
        else:
            frames, _ = media.load_frames(visual, timing.video_fps, max_frames=timing.max_frames)
        pixels = media.preprocess_frames(frames, cfg.visual.image_size)  # [T, 3, S, S]
    return mel, pixels
