"""Media writers for the synthetic world, all through PyAV: mp4 (H.264 + AAC), PNG, WAV.

Notation:
    T frames [T, H, W, 3] uint8 RGB;  audio [C, N] float32 in [-1, 1] (C = 1 mono, 2 stereo)
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import av
import numpy as np

# First available wins. libx264 ships in PyAV's wheels; the others are fallbacks for custom ffmpeg builds.
H264_ENCODERS = ("libx264", "libopenh264", "h264_v4l2m2m")
X264_OPTIONS = {
    "crf": "18",  # near-transparent: 5x7 glyphs scaled x3 must survive 4:2:0 and quantisation
    "preset": "veryfast",  # ~3x faster than 'medium' at this size; quality is set by crf
    "threads": "1",  # parallelism comes from clip workers; one thread also keeps the bitstream stable
}
AAC_BITRATE_PER_CHANNEL = 64_000  # bit/s; transparent enough for tones and espeak speech
AAC_OPTIONS = {"aac_coder": "fast"}  # ~2x faster than the default 'twoloop' search; audibly the same here
PCM_MAX = 32767  # int16 full scale


@lru_cache(maxsize=1)
def h264_encoder() -> str:
    """Name of the best available H.264 encoder in PyAV's ffmpeg."""
    for name in H264_ENCODERS:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # PyAV raises UnknownCodecError / ValueError depending on version
            continue
    raise RuntimeError(f"no H.264 encoder in PyAV's ffmpeg (tried {', '.join(H264_ENCODERS)})")


def _layout(channels: int) -> str:
    if channels not in (1, 2):
        raise ValueError(f"audio must have 1 or 2 channels, got {channels}")
    return "mono" if channels == 1 else "stereo"


def _check(frames: np.ndarray, audio: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be [T, H, W, 3] uint8, got {frames.shape} {frames.dtype}")
    if audio.ndim != 2:
        raise ValueError(f"audio must be [C, N], got shape {audio.shape}")


def write_mp4(path: Path | str, frames: np.ndarray, audio: np.ndarray, fps: float, sample_rate: int) -> None:
    """Mux frames [T, H, W, 3] (H.264, yuv420p) and audio [C, N] (AAC) into one mp4, interleaved by time."""
    _check(frames, audio)
    num_frames, height, width, _ = frames.shape
    channels, num_samples = audio.shape
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w", format="mp4") as container:
        codec = h264_encoder()
        vs = container.add_stream(codec, rate=rate, options=X264_OPTIONS if codec == "libx264" else {})
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        aus = container.add_stream("aac", rate=sample_rate, options=AAC_OPTIONS)
        aus.layout = _layout(channels)
        aus.bit_rate = AAC_BITRATE_PER_CHANNEL * channels
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        sent = 0  # audio samples handed to the encoder so far
        for k in range(num_frames):
            # contiguous copy: callers may pass cropped views (e.g. frames[:, :h2, :w2])
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[k]), format="rgb24")
            vf.pts = k
            for packet in vs.encode(vf):
                container.mux(packet)
            # audio up to the end of frame k, so packets of both streams arrive in time order
            upto = min(num_samples, int(round((k + 1) / fps * sample_rate)))
            if upto > sent:
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[:, sent:upto]), format="fltp",
                                                layout=_layout(channels))
                af.sample_rate, af.pts = sample_rate, sent
                for packet in aus.encode(af):
                    container.mux(packet)
                sent = upto
        for stream in (vs, aus):
            for packet in stream.encode(None):
                container.mux(packet)


def write_png(path: Path | str, image: np.ndarray) -> None:
    """A lossless RGB still: image [H, W, 3] uint8."""
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be [H, W, 3] uint8, got {image.shape} {image.dtype}")
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = image.shape[1], image.shape[0], "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def write_wav(path: Path | str, audio: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM WAV from audio [C, N] float32."""
    if audio.ndim != 2:
        raise ValueError(f"audio must be [C, N], got shape {audio.shape}")
    channels = audio.shape[0]
    # pcm: [1, N*C] interleaved int16, the packed layout PyAV expects for 's16'
    pcm = np.round(np.clip(audio, -1, 1) * PCM_MAX).astype(np.int16).T.reshape(1, -1)
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=sample_rate)
        stream.layout = _layout(channels)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout=_layout(channels))
        frame.sample_rate, frame.pts = sample_rate, 0
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
