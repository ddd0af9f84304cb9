"""Synthetic A/V clips for the benchmark and the runtime tests, written with PyAV.

    write_clip(path, seconds, ...) -> path

Video: a coloured square moving over a background whose hue changes every second (frames differ,
so encoders do real work and any frame mix-up changes the output). Audio: a tone whose pitch changes
every second, plus a little noise. Options produce the awkward inputs the runtime must survive:
variable frame rate (pts jitter), odd sample rates, stereo / 5.1 layouts, a missing track.

The container follows the suffix: .mp4 (mpeg4 + AAC), .mkv (mpeg4 + PCM), .wav (PCM only).

Notation: T frames, H x W frame size, C audio channels, n samples.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# Timestamps in milliseconds: fine enough for any frame rate used here and for jittered (VFR) pts.
TIME_BASE = Fraction(1, 1000)
_MS_PER_S = 1000
LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}
AUDIO_FRAME_SAMPLES = 1024  # AAC's frame size; PCM accepts any
TONE_HZ = (220.0, 330.0, 440.0, 550.0, 660.0)  # one per second, cycling
TONE_LEVEL, NOISE_LEVEL = 0.3, 0.02


def _frames(seconds: float, fps: float, size: tuple[int, int], vfr: bool, rng) -> list[tuple[int, np.ndarray]]:
    """(pts in ms, rgb [H, W, 3]) for each frame; VFR alternates short and long frame intervals."""
    w, h = size
    out, t = [], 0.0
    k = 0
    while t < seconds - 1e-9:
        rgb = np.empty((h, w, 3), np.uint8)
        second = int(t)
        rgb[:] = ((second * 60) % 256, (second * 100 + 80) % 256, (255 - second * 40) % 256)
        side = max(2, min(w, h) // 4)
        x = int((t / max(seconds, 1e-9)) * (w - side))
        y = (h - side) // 2
        rgb[y:y + side, x:x + side] = (255, 255, 255)
        out.append((round(t * _MS_PER_S), rgb))
        step = 1.0 / fps
        if vfr:
            step *= 0.5 if k % 3 else 2.0  # irregular: two short intervals, then one long one
        t += step
        k += 1
    return out


def _audio(seconds: float, sample_rate: int, channels: int, rng) -> np.ndarray:
    n = round(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    pitch = np.asarray(TONE_HZ)[(t.astype(int)) % len(TONE_HZ)]
    mono = TONE_LEVEL * np.sin(2 * np.pi * pitch * t) + NOISE_LEVEL * rng.standard_normal(n)
    gains = np.linspace(1.0, 0.5, channels)[:, None]  # channels differ, so the down-mix matters
    return (gains * mono[None]).astype(np.float32)  # [C, n]


def write_clip(path: str | Path, seconds: float, fps: float = 25.0, sample_rate: int = 16_000,
               channels: int = 1, video: bool = True, audio: bool = True, size: tuple[int, int] = (64, 48),
               vfr: bool = False, seed: int = 0) -> Path:
    path = Path(path)
    if not (video or audio):
        raise ValueError("a clip needs video or audio")
    if channels not in LAYOUTS:
        raise ValueError(f"channels ({channels}) must be one of {sorted(LAYOUTS)}")
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".mkv", ".wav"):
        raise ValueError(f"{path}: suffix must be .mp4, .mkv or .wav")
    if suffix == ".wav" and video:
        raise ValueError(f"{path}: a .wav clip cannot hold video")
    rng = np.random.default_rng(seed)
    frames = _frames(seconds, fps, size, vfr, rng) if video else []
    pcm = _audio(seconds, sample_rate, channels, rng) if audio else None
    with av.open(str(path), "w") as c:
        vs = aus = None
        if video:
            vs = c.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(1000))
            vs.width, vs.height, vs.pix_fmt = size[0], size[1], "yuv420p"
            vs.time_base = TIME_BASE
            vs.codec_context.time_base = TIME_BASE
        if audio:
            codec = "aac" if suffix == ".mp4" else "pcm_s16le"
            aus = c.add_stream(codec, rate=sample_rate)
            aus.layout = LAYOUTS[channels]
        sent = 0
        for pts, rgb in frames + [(None, None)]:
            if rgb is not None:
                vf = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                vf.pts, vf.time_base = pts, TIME_BASE
                for packet in vs.encode(vf):
                    c.mux(packet)
            if aus is None:
                continue
            # audio up to this frame's time (all of it after the last frame), interleaved by time
            upto = pcm.shape[1] if pts is None else min(pcm.shape[1], round(pts / _MS_PER_S * sample_rate))
            while sent < upto:
                n = min(AUDIO_FRAME_SAMPLES, upto - sent)
                if n < AUDIO_FRAME_SAMPLES and pts is not None:
                    break
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, sent:sent + n]), format="fltp",
                                                layout=LAYOUTS[channels])
                af.sample_rate, af.pts, af.time_base = sample_rate, sent, Fraction(1, sample_rate)
                for packet in aus.encode(af):
                    c.mux(packet)
                sent += n
        for s in (vs, aus):
            if s is not None:
                for packet in s.encode(None):
                    c.mux(packet)
    return path
