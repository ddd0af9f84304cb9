"""Media: decode audio, video frames and images from files, and turn them into model inputs.

This is the only model-side module that opens files. Everything after it takes tensors.

Notation:
    T frames, H x W source frame size, S model image size (config.visual.image_size),
    n audio samples at the target rate, B batch, M mel bins, N mel frames (n // hop).

    stream_origin(v0, a0)        -> stream time 0 on the container clock: the earlier stream start
    load_audio(path, sr)         -> float32 [n] mono in [-1, 1], sample k at k / sr s of stream time
    load_frames(path, fps)       -> (uint8 [T, H, W, 3] RGB, float64 [T] seconds of stream time)
    FrameGrid(fps).push(pts, s)  -> slots that close before a frame (the one sampling rule, also the
                                    runtime's); frame_duration(frame, stream) -> seconds on screen
    load_image(path)             -> uint8 [H, W, 3] RGB
    preprocess_frames(frames, S) -> float32 [T, 3, S, S], CLIP-normalised
    log_mel_spectrogram(audio)   -> float32 [M, N] or [B, M, N], Whisper's recipe

Deviations from the release (authors' code), on purpose:
- Audio comes from any container PyAV opens, the audio track of a video included; the release needed a
  separate 16 kHz wav. It is resampled to the requested rate; the release required 16 kHz already.
- Multi-channel audio is down-mixed, not reduced to channel 0. The mix is ffmpeg's channel matrix
  normalised so each output row sums to 1 (``rematrix_maxval=1``): for stereo that is (L + R) / 2, the
  same as ``ffmpeg -ac 1 -f s16le`` in openai-whisper's load_audio, i.e. what Whisper was trained on.
  PyAV's plain ``AudioResampler(layout="mono")`` leaves the matrix unnormalised for float output
  ((L + R) / sqrt(2), which clips correlated loud stereo), so a filter graph sets the option.
- Frames are sampled on a uniform presentation-time grid t_i = start + i / fps (latest frame with
  pts <= t_i), which also handles variable frame rate. Audio and video share one clock whose time 0 is
  the earlier stream's first timestamp (``stream_origin``), so a video that starts 0.3 s after its
  audio keeps that offset; the release read audio from a separate wav, each stream from its own start.
  The release cut 1-s clips and took the first and last frame of each (e.g. frames 0 and 29 at 30 fps),
  which is not 0.5 s spacing.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np
import torch
import torch.nn.functional as F

from favor.config import TimingConfig

# CLIP / EVA-CLIP pixel statistics (RGB, on [0, 1] values), as in the release's video transform.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Whisper's log-mel normalisation (whisper/audio.py): power floored at 1e-10 (log10 -10), values clamped
# to an 8-decade (80 dB) dynamic range below the clip's peak, then mapped by (x + 4) / 4.
LOG10_FLOOR = -10.0  # log10 units
DYNAMIC_RANGE = 8.0  # log10 units (decades) = 80 dB
LOG_OFFSET, LOG_SCALE = 4.0, 4.0
SILENT_MEL = (LOG10_FLOOR + LOG_OFFSET) / LOG_SCALE  # normalised log-mel of digital silence: -1.5

# Grid times and frame times are compared with this slack: fps is a float, so i / fps can land one ulp
# before a frame whose pts is exactly on the grid. One microsecond is far below any frame interval.
TIME_EPS_S = 1e-6
# Frames are resized in chunks of this many so a long high-resolution clip never needs a full
# float32 copy at source size (120 frames of 1080p would be 3 GB).
_PREPROCESS_CHUNK_FRAMES = 16

PathLike = str | os.PathLike


class MediaError(ValueError):
    """A media file is missing, unreadable, or lacks the stream asked for. Message names the file."""


@dataclass(frozen=True)
class MediaInfo:
    """What a container holds. Durations and start times in seconds; None when the file does not say."""

    has_audio: bool
    has_video: bool
    duration: float | None
    video_fps: float | None  # average frame rate of the first video stream
    width: int | None
    height: int | None
    audio_sample_rate: int | None  # Hz, of the first audio stream
    audio_channels: int | None
    audio_start: float | None  # first audio pts; audio sample 0 plays at this time
    video_start: float | None  # first video pts


# ----------------------------------------------------------------------------------------------- files


@contextlib.contextmanager
def _open(path: PathLike) -> Iterator[av.container.InputContainer]:
    """av.open with the two common failures turned into one-line MediaErrors."""
    if not os.path.exists(path):
        raise MediaError(f"{path}: no such file")
    if os.path.isdir(path):
        raise MediaError(f"{path}: expected a media file, got a directory")
    try:
        container = av.open(os.fspath(path), mode="r")
    except av.FFmpegError as e:
        raise MediaError(f"{path}: not a readable media file ({_reason(e)})") from None
    try:
        yield container
    finally:
        container.close()


def _reason(e: Exception) -> str:
    # FFmpegError's str repeats the file name; the strerror alone is the useful part.
    return getattr(e, "strerror", None) or str(e)


def _seconds(stream: av.stream.Stream, ticks: int | None) -> float | None:
    return None if ticks is None or stream.time_base is None else float(ticks * stream.time_base)


def media_info(path: PathLike) -> MediaInfo:
    """Describe the first audio and first video stream of a file (no decoding)."""
    with _open(path) as c:
        a = c.streams.audio[0] if c.streams.audio else None
        v = c.streams.video[0] if c.streams.video else None
        duration = c.duration / av.time_base if c.duration is not None else None
        if duration is None:  # some demuxers only know per-stream durations
            spans = [_seconds(s, s.duration) for s in (a, v) if s is not None]
            duration = max((d for d in spans if d is not None), default=None)
        return MediaInfo(
            has_audio=a is not None,
            has_video=v is not None,
            duration=duration,
            video_fps=float(v.average_rate) if v is not None and v.average_rate else None,
            width=v.codec_context.width if v is not None else None,
            height=v.codec_context.height if v is not None else None,
            audio_sample_rate=a.codec_context.sample_rate if a is not None else None,
            audio_channels=a.codec_context.channels if a is not None else None,
            audio_start=_seconds(a, a.start_time) if a is not None else None,
            video_start=_seconds(v, v.start_time) if v is not None else None,
        )


# ----------------------------------------------------------------------------------------------- clock


def stream_origin(video_start: float | None, audio_start: float | None) -> float | None:
    """Stream time 0 on the container clock (seconds): the earlier of the two streams' first timestamps.

    The one origin rule of offline decoding (``load_frames``, ``load_audio``) and the runtime's window
    assembler. The earlier start, because then nothing of either stream is cut: the later stream is
    placed by its own start (audio padded with silence in front, frame slots before the first frame
    show that frame, the ``FrameGrid`` rule). Not container time 0: an MPEG-TS or live stream starting
    at pts 1.4 s (or 10^5 s) would get that much invented silence. Not the video's start: the audio
    before it would be lost. Clips whose streams both start at 0 keep container time unchanged.
    A stream that is absent or has no known start is None and does not count; None if neither counts.
    """
    starts = [t for t in (video_start, audio_start) if t is not None]
    return min(starts) if starts else None


def sample_index(t: float, origin: float, sample_rate: int) -> int:
    """Index of the audio sample that plays at container time ``t`` (s) on the clock ``origin``."""
    return round((t - origin) * sample_rate)


def declared_start(stream: av.stream.Stream | None) -> float | None:
    """The start time (seconds, container clock) a stream's header declares; None if absent or unknown."""
    return None if stream is None else _seconds(stream, stream.start_time)


def _first_time(path: PathLike, kind: str) -> float | None:
    """Time of the first decoded frame of the first ``kind`` stream with a timestamp (a second open,
    so the caller's decoding is untouched). For streams whose header declares no start."""
    with _open(path) as c:
        try:
            for frame in c.decode(**{kind: 0}):
                if frame.pts is not None:
                    return float(frame.time)
        except av.FFmpegError:
            return None
    return None


def _origin(c: av.container.InputContainer, path: PathLike) -> float:
    """``stream_origin`` of a file's first video and audio stream: each stream's declared start, else
    its first decoded timestamp (what the runtime's assembler then sees); 0 when neither is known."""
    starts = {}
    for kind, streams in (("video", c.streams.video), ("audio", c.streams.audio)):
        start = declared_start(streams[0]) if streams else None
        starts[kind] = _first_time(path, kind) if streams and start is None else start
    origin = stream_origin(starts["video"], starts["audio"])
    return 0.0 if origin is None else origin


# ----------------------------------------------------------------------------------------------- audio


def mono_resampler(stream: av.audio.stream.AudioStream, sample_rate: int) -> av.filter.Graph:
    """abuffer -> aresample (normalised down-mix matrix) -> flt mono at sample_rate -> sink."""
    graph = av.filter.Graph()
    src = graph.add_abuffer(template=stream)
    # rematrix_maxval=1 normalises ffmpeg's matrix so no output row sums above 1: stereo -> (L+R)/2.
    resample = graph.add("aresample", f"{sample_rate}:rematrix_maxval=1.0")
    fmt = graph.add("aformat", f"sample_fmts=flt:channel_layouts=mono:sample_rates={sample_rate}")
    sink = graph.add("abuffersink")
    src.link_to(resample)
    resample.link_to(fmt)
    fmt.link_to(sink)
    graph.configure()
    return graph


def _drain(graph: av.filter.Graph, out: list[np.ndarray], times: list[float | None]) -> None:
    while True:
        try:
            frame = graph.pull()
        except (av.BlockingIOError, av.EOFError):
            return
        out.append(frame.to_ndarray().reshape(-1))  # flt packed mono: [1, n] -> [n]
        times.append(float(frame.time) if frame.pts is not None else None)


def _on_clock(audio: np.ndarray, first_t: float | None, origin: float, sample_rate: int) -> np.ndarray:
    """Place decoded audio [n] on stream time: silence before its first sample, nothing before 0.

    The first resampled chunk lands at ``sample_index(first_t, origin, sr)``, as the runtime's assembler
    places it; later chunks follow contiguously. No timestamp: it starts at stream time 0.
    """
    lead = 0 if first_t is None else sample_index(first_t, origin, sample_rate)
    if lead > 0:
        return np.concatenate([np.zeros(lead, np.float32), audio])
    return audio[-lead:] if lead < 0 else audio


def load_audio(path: PathLike, sample_rate: int) -> torch.Tensor:
    """Decode the first audio stream of any container, down-mixed to mono and resampled.

    Returns float32 [n] in [-1, 1] at ``sample_rate`` Hz. Sample k plays at k / sample_rate seconds of
    stream time (``stream_origin``): audio that starts after the video is preceded by silence.
    """
    if not isinstance(sample_rate, numbers.Integral) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive int (Hz), got {sample_rate!r}")
    with _open(path) as c:
        if not c.streams.audio:
            raise MediaError(f"{path}: no audio stream (streams: {_stream_kinds(c)})")
        stream = c.streams.audio[0]
        origin = _origin(c, path)
        chunks: list[np.ndarray] = []
        times: list[float | None] = []
        graph = None
        layout = None
        try:
            for frame in c.decode(stream):
                key = (frame.format.name, frame.layout.name, frame.sample_rate)
                if graph is None or key != layout:
                    # Input format changed mid-stream (rare, e.g. concatenated files): flush, rebuild.
                    if graph is not None:
                        graph.push(None)
                        _drain(graph, chunks, times)
                    graph, layout = mono_resampler(stream, sample_rate), key
                graph.push(frame)
                _drain(graph, chunks, times)
            if graph is not None:
                graph.push(None)
                _drain(graph, chunks, times)
        except av.FFmpegError as e:
            decoded = sum(len(x) for x in chunks) / sample_rate
            raise MediaError(f"{path}: audio decode error after {decoded:.2f} s ({_reason(e)})") from None
    if not chunks or sum(len(x) for x in chunks) == 0:
        raise MediaError(f"{path}: audio stream decoded to no samples")
    audio = torch.from_numpy(_on_clock(np.concatenate(chunks), times[0], origin, sample_rate))
    # Lossy decoders and float sources can overshoot full scale slightly; the model expects [-1, 1].
    return audio.clamp_(-1.0, 1.0)


def _stream_kinds(c: av.container.InputContainer) -> str:
    return ", ".join(s.type for s in c.streams) or "none"


def pad_or_trim(audio: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad or cut the last axis to exactly ``length`` samples (Whisper's 30-s block, etc.)."""
    if length < 0:
        raise ValueError(f"length must be >= 0 samples, got {length}")
    n = audio.shape[-1]
    if n > length:
        return audio[..., :length]
    if n < length:
        return F.pad(audio, (0, length - n))
    return audio


@functools.lru_cache(maxsize=8)
def _mel_filters(n_mels: int, sample_rate: int, n_fft: int) -> torch.Tensor:
    """Whisper's mel filter bank, float32 [M, n_fft // 2 + 1] (slaney scale and norm, 0 Hz..Nyquist)."""
    from transformers.audio_utils import mel_filter_bank

    fb = mel_filter_bank(
        num_frequency_bins=1 + n_fft // 2,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=sample_rate / 2,  # Nyquist: 8000 Hz at Whisper's 16 kHz
        sampling_rate=sample_rate,
        norm="slaney",
        mel_scale="slaney",
    )  # fb: [n_fft // 2 + 1, M] float64
    return torch.from_numpy(fb.T.astype(np.float32)).contiguous()


def log_mel_spectrogram(
    audio: torch.Tensor, n_mels: int, timing: TimingConfig, pad_to_samples: int | None = None
) -> torch.Tensor:
    """Whisper's log-mel: float32 [n] -> [M, N] or [B, n] -> [B, M, N], N = n // hop_length.

    ``audio`` must already be mono at ``timing.sample_rate``. With ``pad_to_samples`` the audio is first
    zero-padded or cut to that length (the release always used 30 s: ``timing.whisper_chunk_seconds``).
    The dynamic-range floor (max - 8) is taken per example, as WhisperFeatureExtractor does.
    """
    if not torch.is_tensor(audio) or audio.dim() not in (1, 2):
        shape = tuple(audio.shape) if torch.is_tensor(audio) else type(audio).__name__
        raise ValueError(f"audio must be a tensor [n] or [B, n], got {shape}")
    if pad_to_samples is not None:
        audio = pad_or_trim(audio, pad_to_samples)
    n_fft, hop = timing.n_fft, timing.hop_length
    if audio.shape[-1] <= n_fft // 2:  # reflect padding of the centred STFT needs more than this
        raise ValueError(f"audio must have more than {n_fft // 2} samples, got {audio.shape[-1]}")
    x = audio.to(torch.float32)
    window = torch.hann_window(n_fft, device=x.device)
    stft = torch.stft(x, n_fft, hop, window=window, return_complex=True)  # [(B,) F, N + 1]
    power = stft[..., :-1].abs().pow(2).contiguous()  # drop the last frame: [(B,) F, N]
    filters = _mel_filters(n_mels, timing.sample_rate, n_fft).to(x.device)
    mel = filters @ power  # [(B,) M, N]
    log_spec = mel.clamp(min=10.0**LOG10_FLOOR).log10()
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)  # per example
    log_spec = torch.maximum(log_spec, peak - DYNAMIC_RANGE)
    return (log_spec + LOG_OFFSET) / LOG_SCALE


# ----------------------------------------------------------------------------------------------- video


def _video_stream(c: av.container.InputContainer, path: PathLike) -> av.video.stream.VideoStream:
    if not c.streams.video:
        raise MediaError(f"{path}: no video stream (streams: {_stream_kinds(c)})")
    stream = c.streams.video[0]
    stream.thread_type = "AUTO"  # frame + slice threads: both cores decode
    return stream


def _frame_time(frame: av.VideoFrame) -> float | None:
    return frame.time if frame.pts is not None else None


def _decoded(c: av.container.InputContainer, stream, start: float) -> Iterator[av.VideoFrame]:
    """Decoded frames in presentation order, from the last keyframe at or before ``start``.

    Seeking skips decoding the part before ``start``. If the demuxer lands after ``start`` (imprecise
    index), decode from the beginning instead, so the frame shown at ``start`` is never missed.
    """
    if start > 0 and stream.time_base is not None:
        c.seek(math.floor(start / stream.time_base), stream=stream, backward=True)
        frames = c.decode(stream)
        first = next(frames, None)
        if first is not None and (_frame_time(first) is None or _frame_time(first) <= start + TIME_EPS_S):
            yield first
            yield from frames
            return
        c.seek(0, stream=stream, backward=True)  # also flushes the decoder
    yield from c.decode(stream)


def frame_duration(frame: av.VideoFrame, stream: av.video.stream.VideoStream) -> float:
    """Seconds ``frame`` stays on screen: its own duration, else one source frame interval, else 0.

    A frame without a duration is shown until the source's next frame would be, so it lasts one frame
    interval of the source (1 / the stream's average rate). Not one interval of the sampling grid: that
    is the model's rate and says nothing about the media; at 2 FPS over a 30 FPS source it would stretch
    a 10-s clip to 10.47 s and add a 21st slot that the audio and the container duration do not have.
    With no average rate either (e.g. VFR in NUT), 0: the last frame fills only the slots up to its own
    pts, and nothing is invented past the last timestamp seen.
    """
    if frame.duration and frame.time_base is not None:
        return float(frame.duration * frame.time_base)
    rate = stream.average_rate
    return 1.0 / float(rate) if rate else 0.0


class FrameGrid:
    """Frame sampling by presentation time, on timestamps alone: ``load_frames`` and the runtime's
    window assembler both pick frames through this one rule.

    Slot i of the grid is at t_i = start + i / fps and shows the latest frame with pts <= t_i; slots
    before the first frame show the first frame (a video that starts after its audio, ``stream_origin``,
    opens on its first picture, as ffmpeg's fps filter pads a late start; not on an invented black one).
    Times are stream time, computed as ``pts - origin`` by every caller. Push frames in decode order;
    ``finish`` then gives the slots the last frame fills until it ends (pts + duration, and at least the
    slot at its own pts).
    Variable frame rate works because only pts matter, never frame counts.
    """

    def __init__(self, fps: float, start: float = 0.0):
        if not fps > 0:
            raise ValueError(f"fps must be > 0 frames per second, got {fps}")
        self.fps, self.start = fps, start
        self.next = 0  # first slot not yet given a frame
        self.held_t = -math.inf  # pts (seconds) of the frame on screen: the last one accepted
        self.held_duration = 0.0  # its duration (seconds; favor.media.frame_duration)

    def time(self, i: int) -> float:
        """Seconds at which slot ``i`` is sampled."""
        return self.start + i / self.fps

    def push(self, t: float, duration: float) -> int | None:
        """A frame with pts ``t`` arrived: the number of slots that close before it.

        Those slots show the frame held so far (this one, when none is held yet); then this frame is
        held. None: ``t`` is not after the held frame's pts (out of order or duplicate), so the frame
        is dropped and the held one kept.
        """
        if t <= self.held_t:
            return None
        n = self._fill(lambda s: s < t - TIME_EPS_S)
        self.held_t, self.held_duration = t, duration
        return n

    def finish(self) -> int:
        """End of stream: the number of slots the held frame fills until it ends (0 if none held)."""
        if self.held_t == -math.inf:
            return 0
        end, held = self.held_t + self.held_duration, self.held_t
        return self._fill(lambda s: s < end - TIME_EPS_S or s <= held + TIME_EPS_S)

    def _fill(self, before) -> int:
        first = self.next
        while before(self.time(self.next)):
            self.next += 1
        return self.next - first


def load_frames(
    path: PathLike, fps: float, max_frames: int | None = None, start: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample RGB frames at ``fps`` by presentation time (the ``FrameGrid`` rule), from ``start`` s.

    ``start`` and the returned times are stream time: seconds after ``stream_origin`` of the file's
    streams (container time when both start at 0). Sampling stops at the end of the stream (last pts +
    that frame's duration, see ``frame_duration``) or after ``max_frames``. Returns frames uint8
    [T, H, W, 3] and timestamps float64 [T]: the pts of the frame picked for each slot (repeated when
    fps exceeds the source rate). Frames that change size mid-stream are scaled to the first picked
    frame's size.
    """
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
    if start < 0:
        raise ValueError(f"start must be >= 0 seconds, got {start}")
    grid = FrameGrid(fps, start)
    picker = _Picker(math.inf if max_frames is None else max_frames)
    with _open(path) as c:
        stream = _video_stream(c, path)
        origin = _origin(c, path)
        try:
            for frame in _decoded(c, stream, origin + start if start > 0 else 0.0):
                t = _frame_time(frame)
                if t is None:
                    raise MediaError(f"{path}: video frame without a presentation timestamp")
                t -= origin  # stream time, the same subtraction as the runtime's assembler
                n = grid.push(t, frame_duration(frame, stream))
                if n is not None and picker.show(frame, t, n):
                    break
        except av.FFmpegError as e:
            n = len(picker.picked)
            raise MediaError(f"{path}: video decode error after {n} sampled frames ({_reason(e)})") from None
        if picker.held is None:
            raise MediaError(f"{path}: video stream decoded to no frames")
        if not picker.full():
            picker.take(grid.finish())
        if not picker.picked:
            end = grid.held_t + grid.held_duration
            raise MediaError(f"{path}: start ({start} s) is at or past the end of the video ({end:.3f} s)")
    frames = torch.from_numpy(np.stack(picker.picked))  # [T, H, W, 3]
    return frames, torch.tensor(picker.times, dtype=torch.float64)


class _Picker:
    """The RGB frames ``load_frames`` collects: the held frame, converted once however often picked."""

    def __init__(self, limit: float):
        self.limit = limit
        self.picked: list[np.ndarray] = []  # uint8 [H, W, 3] each
        self.times: list[float] = []
        self.held: av.VideoFrame | None = None
        self.held_t = 0.0
        self.rgb: np.ndarray | None = None  # rgb of held, once converted
        self.size: tuple[int, int] | None = None  # (width, height) of the output

    def full(self) -> bool:
        return len(self.picked) >= self.limit

    def show(self, frame: av.VideoFrame, t: float, n: int) -> bool:
        """``n`` slots close before ``frame`` (pts ``t``): the held frame fills them; True when full."""
        if self.held is None:
            self.held, self.held_t = frame, t
        self.take(n)
        if self.full():
            return True
        if self.held is not frame:
            self.held, self.held_t, self.rgb = frame, t, None
        return False

    def take(self, n: int) -> None:
        for _ in range(int(min(n, self.limit - len(self.picked)))):
            if self.rgb is None:
                if self.size is None:
                    self.size = (self.held.width, self.held.height)
                self.rgb = self.held.to_ndarray(format="rgb24", width=self.size[0], height=self.size[1])
            self.picked.append(self.rgb)
            self.times.append(self.held_t)


def load_image(path: PathLike) -> torch.Tensor:
    """Decode a still image (png, jpg, bmp, webp, ...; first frame of anything else) to uint8 [H, W, 3] RGB.

    PyAV decodes images too, so no imaging library is needed. Alpha is dropped; EXIF rotation is not
    applied (as in the release's PIL path, which did not apply it either).
    """
    with _open(path) as c:
        stream = _video_stream(c, path)
        try:
            frame = next(c.decode(stream), None)
        except av.FFmpegError as e:
            raise MediaError(f"{path}: image decode error ({_reason(e)})") from None
        if frame is None:
            raise MediaError(f"{path}: image decoded to no frame")
        return torch.from_numpy(frame.to_ndarray(format="rgb24"))  # [H, W, 3]


def preprocess_frames(frames: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] or [H, W, 3] RGB -> float32 [T, 3, S, S] for the visual encoder.

    As the release: values / 255, bicubic resize to S x S (aspect ratio not kept, no crop, no antialias,
    no clamping of bicubic overshoot), then CLIP mean/std normalisation. A single image gives T = 1.
    """
    if frames.dtype != torch.uint8 or frames.dim() not in (3, 4) or frames.shape[-1] != 3:
        raise ValueError(
            f"frames must be uint8 [T, H, W, 3] or [H, W, 3] RGB, got {frames.dtype} {tuple(frames.shape)}"
        )
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1 pixel, got {image_size}")
    if frames.dim() == 3:
        frames = frames.unsqueeze(0)  # [1, H, W, 3]
    mean = torch.tensor(CLIP_MEAN, device=frames.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=frames.device).view(1, 3, 1, 1)
    out = []
    for chunk in frames.split(_PREPROCESS_CHUNK_FRAMES):
        x = chunk.permute(0, 3, 1, 2).to(torch.float32) / 255.0  # x: [t, 3, H, W]
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False,
                          antialias=False)  # x: [t, 3, S, S]
        out.append((x - mean) / std)
    return torch.cat(out)
