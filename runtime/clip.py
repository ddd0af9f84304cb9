"""A whole clip -> one answer: the glue ``Engine.ask``, the server's chat endpoint and the stream hub
share (written once, here), giving favor-eval's answers (same decode, same AV embeddings; tested).

    load_clip(path, cfg)                  media as training and favor-eval decode it (favor.clip_media:
                                          the first 30 s of audio, frames at cfg.timing.video_fps up to
                                          cfg.timing.max_frames)
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

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from favor.clip_media import decode_clip
from favor.config import FavorConfig


@dataclass
class ClipMedia:
    mel: torch.Tensor | None  # [M, Tm] log-mel of the first 30 s; None: no audio stream
    pixels: torch.Tensor | None  # [T, 3, S, S] preprocessed frames; None: no video stream


def _streams(path: str) -> set[str]:
    import av

    try:
        with av.open(path) as c:
            return {s.type for s in c.streams}
    except av.FFmpegError as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ValueError(f"{path}: cannot open as a media file ({reason})") from None


def load_clip(path: str | os.PathLike, cfg: FavorConfig) -> ClipMedia:
    """The clip's audio and frames, decoded by favor.clip_media.decode_clip: exactly as favor-eval
    decodes a video sample whose sound is its own track."""
    path = str(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such media file" + (" (a directory)" if os.path.isdir(path) else ""))
    kinds = _streams(path)
    if not kinds & {"audio", "video"}:
        raise ValueError(f"{path}: no audio or video stream to answer about")
    mel, pixels = decode_clip(cfg, path if "audio" in kinds else None, path if "video" in kinds else None)
    return ClipMedia(mel, pixels)  # [M, Tm], [T, 3, S, S]


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
