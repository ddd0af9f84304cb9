"""A whole clip -> one answer: the glue favor-eval's question answering, ``Engine.ask``, the server's
chat endpoint and the stream hub share (written once, here).

    load_clip(path, cfg)                  media as training/eval decode it (training/data.py ``_decode``):
                                          audio = the first 30 s (zero-padded to MIN_AUDIO_SECONDS, to 30 s
                                          when cfg.audio.pad_to_30s), frames at cfg.timing.video_fps up to
                                          cfg.timing.max_frames
    clip_embeddings(backend, clip, q)     -> AV embeddings [A, D]: every window of the clip in one fusion call
    ask_clip(backend, path, q)            -> the answer text (greedy, the runtime's one decode loop)

Unlike streaming (a caption per window), the whole clip is ONE prompt: its windows' AV tokens in order,
then the question, as favor-eval asks every AVEB question. The visual Q-Former's instruction is the
question (eval does the same); the backend's previous instruction is restored afterwards, so a stream
captioning on the same engine is unaffected.

Notation: M mel bins, Tm mel frames, T frames, S image size, Qv visual tokens per frame, Ta audio tokens,
A AV rows (windows x Nq), D LLM width.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from favor import media
from favor.config import FavorConfig

# The release dataset's rule (training/data.py DataOptions.min_audio_seconds): shorter audio is
# zero-padded to this many seconds before the mel, so eval and ask see the same features.
MIN_AUDIO_SECONDS = 3.0


@dataclass
class ClipMedia:
    mel: torch.Tensor | None  # [M, Tm] log-mel of the first 30 s; None: no audio stream
    pixels: torch.Tensor | None  # [T, 3, S, S] preprocessed frames; None: no video stream


def _has_stream(path: str, kind: str) -> bool:
    import av

    try:
        with av.open(path) as c:
            return bool(getattr(c.streams, kind))
    except av.FFmpegError as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ValueError(f"{path}: cannot open as a media file ({reason})") from None


def load_clip(path: str | os.PathLike, cfg: FavorConfig, min_audio_seconds: float = MIN_AUDIO_SECONDS
              ) -> ClipMedia:
    """The clip's audio and frames, decoded exactly as favor-eval decodes a video sample."""
    path = str(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such media file" + (" (a directory)" if os.path.isdir(path) else ""))
    t = cfg.timing
    mel = pixels = None
    if _has_stream(path, "audio"):
        sr = t.sample_rate
        audio = media.load_audio(path, sr)[: t.whisper_chunk_seconds * sr]  # release: first 30 s only
        min_samples = math.ceil(min_audio_seconds * sr)
        if audio.shape[0] < min_samples:
            audio = media.pad_or_trim(audio, min_samples)
        pad = t.whisper_chunk_seconds * sr if cfg.audio.pad_to_30s else None
        mel = media.log_mel_spectrogram(audio, cfg.audio.n_mels, t, pad_to_samples=pad)  # [M, Tm]
    if _has_stream(path, "video"):
        frames, _ = media.load_frames(path, t.video_fps, max_frames=t.max_frames)  # [T, H, W, 3]
        pixels = media.preprocess_frames(frames, cfg.visual.image_size)  # [T, 3, S, S]
    if mel is None and pixels is None:
        raise ValueError(f"{path}: no audio or video stream to answer about")
    return ClipMedia(mel, pixels)


def clip_embeddings(backend, clip: ClipMedia, question: str) -> torch.Tensor:
    """AV embeddings [A, D] of the whole clip, the question as the visual Q-Former's instruction."""
    saved = getattr(backend, "_instruction", None)  # the running stream's instruction, put back below
    try:
        backend.set_instruction(question)
        visual = None if clip.pixels is None else backend.encode_frames(clip.pixels)  # [T, Qv, Dv]
        audio = None if clip.mel is None else backend.encode_audio(clip.mel)  # [Ta, Da]
    finally:
        if saved is not None:
            backend._instruction = saved
    return torch.as_tensor(backend.fuse(visual, audio, None))  # [A, D]: all windows, in order


def ask_clip(backend, source: str | os.PathLike, question: str, *, max_new_tokens: int = 48) -> str:
    """The answer to ``question`` about the whole clip at ``source`` (a media file), one greedy decode.

    ValueError (one line naming the file) when the clip cannot be read or the question is empty."""
    if not question or not question.strip():
        raise ValueError(f"{source}: the question is empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 1")
    clip = load_clip(Path(source), backend.cfg)
    with torch.inference_mode():
        av = clip_embeddings(backend, clip, question)
        return backend.caption(question, av, max_new_tokens).text
