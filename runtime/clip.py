"""A whole clip -> one answer: the glue ``Engine.ask``, favor-eval, the server's chat endpoint and the
stream hub share (written once, here).

    load_media(cfg, source=, video=, audio=, image=)  the inputs as training and favor-eval decode them
                                          (favor.clip_media: the first 30 s of audio, frames at
                                          cfg.timing.video_fps up to cfg.timing.max_frames, an image as one frame)
    load_clip(path, cfg)                  load_media(cfg, source=path): a clip with its own sound
    clip_embeddings(backend, clip, q)     -> AV embeddings [A, D]: every window of the clip in one fusion call
    ask_clip(backend, path, q, ...)       -> the answer text (greedy, the runtime's one decode loop)

The inputs an eval sample can have (training/manifest.py Entry): ``source`` is a video with its own
sound (either stream may be missing); ``video`` (frames only), ``image`` (a still: one frame, repeated
over the audio's frames as FavorModel.encode_av does) and ``audio`` (a recording or any file's audio
track) name separate files. ``source`` with ``audio``: the source's frames with that sound instead.

Unlike streaming (a caption per window), the whole clip is ONE prompt: its windows' AV tokens in order,
then the question, as favor-eval asks every AVEB question. The visual Q-Former's instruction is the
question (eval does the same); the backend's previous instruction is restored afterwards, so a stream
captioning on the same engine is unaffected.

Notation: M mel bins, Tm mel frames, T frames, S image size, Qv visual tokens per frame, Dv their width,
Ta audio tokens, A AV rows (windows x Nq), D LLM width.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from favor.clip_media import decode_clip
from favor.config import FavorConfig

Media = str | os.PathLike | None


@dataclass
class ClipMedia:
    mel: torch.Tensor | None  # [M, Tm] log-mel of the first 30 s; None: no audio
    pixels: torch.Tensor | None  # [T, 3, S, S] preprocessed frames ([1, 3, S, S] for an image); None: no picture
    is_image: bool = False  # pixels are one still, shown for the whole of the audio


def _streams(path: str) -> set[str]:
    import av

    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such media file" + (" (a directory)" if os.path.isdir(path) else ""))
    try:
        with av.open(path) as c:
            return {s.type for s in c.streams}
    except av.FFmpegError as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ValueError(f"{path}: cannot open as a media file ({reason})") from None


def _check_combination(source: Media, video: Media, audio: Media, image: Media) -> None:
    if video is not None and image is not None:
        raise ValueError("pass video= or image=, not both (a sample has a video or a still)")
    if source is not None and (video is not None or image is not None):
        raise ValueError("source is a video with its own sound: pass video=/image= (with audio=) instead, not both")
    if source is None and video is None and audio is None and image is None:
        raise ValueError("no media: pass a source, or video=, image= and/or audio=")


def load_media(cfg: FavorConfig, *, source: Media = None, video: Media = None, audio: Media = None,
               image: Media = None) -> ClipMedia:
    """The inputs' audio and frames, decoded by favor.clip_media.decode_clip exactly as training/data.py
    decodes a manifest sample with those fields. ValueError (one line naming the file) for a missing
    file or a file without the stream it is asked for."""
    _check_combination(source, video, audio, image)
    if source is not None:
        source = os.fspath(source)
        kinds = _streams(source)
        if not kinds & {"audio", "video"}:
            raise ValueError(f"{source}: no audio or video stream to answer about")
        if audio is None and "audio" in kinds:
            audio = source
        video = source if "video" in kinds else None
        if video is None and audio is not source:
            raise ValueError(f"{source}: no video stream to show with the audio {os.fspath(audio)}")
    for path, kind in ((video, "video"), (image, "video"), (audio, "audio")):
        if path is not None and kind not in _streams(os.fspath(path)):
            what = "picture" if path is image else kind
            raise ValueError(f"{os.fspath(path)}: no {what} stream")
    visual = video if video is not None else image
    mel, pixels = decode_clip(cfg, audio, visual, is_image=image is not None)
    return ClipMedia(mel, pixels, image is not None)  # [M, Tm], [T, 3, S, S]


def load_clip(path: str | os.PathLike, cfg: FavorConfig) -> ClipMedia:
    """The clip's audio and frames: exactly as favor-eval decodes a video sample whose sound is its own track."""
    return load_media(cfg, source=path)


def clip_embeddings(backend, clip: ClipMedia, instruction: str) -> torch.Tensor:
    """AV embeddings [A, D] of the whole clip, ``instruction`` (the question) as the visual Q-Former's."""
    from favor.sync import audio_frames, repeat_image

    saved = getattr(backend, "_instruction", None)  # the running stream's instruction, put back below
    try:
        backend.set_instruction(instruction)
        visual = None if clip.pixels is None else backend.encode_frames(clip.pixels)  # [T, Qv, Dv]
        audio = None if clip.mel is None else backend.encode_audio(clip.mel)  # [Ta, Da]
    finally:
        if saved is not None:
            backend._instruction = saved
    if clip.is_image and visual is not None and audio is not None:
        # the model's rule (FavorModel.encode_av): a still is shown for every frame its audio covers
        visual = repeat_image(torch.as_tensor(visual)[None], audio_frames(audio.shape[0], backend.cfg))[0]
    return torch.as_tensor(backend.fuse(visual, audio, None))  # [A, D]: all windows, in order


def ask_clip(backend, source: Media, question: str, *, video: Media = None, audio: Media = None,
             image: Media = None, max_new_tokens: int = 48, instruction: str | None = None) -> str:
    """The answer to ``question`` about the whole clip, one greedy decode. ``source`` is a media file
    with its own sound; ``video`` / ``image`` / ``audio`` name separate inputs (module docstring).
    ``instruction``: the visual Q-Former's instruction when it is not the question (a streamed window's
    question carries earlier captions; favor-rt gives the visual encoder the bare prompt).

    ValueError (one line) when the media cannot be read, they do not combine, or the question is empty."""
    name = next((os.fspath(p) for p in (source, video, image, audio) if p is not None), "ask")
    if not question or not question.strip():
        raise ValueError(f"{name}: the question is empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 1")
    clip = load_media(backend.cfg, source=source, video=video, audio=audio, image=image)
    with torch.inference_mode():
        av = clip_embeddings(backend, clip, instruction or question)
        return backend.caption(question, av, max_new_tokens).text
