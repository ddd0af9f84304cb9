"""Live and file media sources through PyAV, and the capture thread that never waits for compute.

    open_source(spec) -> MediaSource: iterates Frame / AudioChunk in demux order
    Capture(source, assembler, ...): a thread: decode -> (pace) -> assembler -> bounded rings

A spec is a media file, a camera (``/dev/video0`` or an index such as ``0``), a network stream
(``rtsp://``, ``rtmp://``, ``http(s)://``, ``udp://``, ``tcp://``, ``srt://``), an ffmpeg lavfi graph
written ``lavfi:<graph>`` (a test source standing in for a camera), a microphone (ALSA ``hw:0``,
``plughw:1,0`` or ``alsa:<pcm>``; PulseAudio ``pulse:<source>`` where this PyAV build has it), or a
GStreamer pipeline string ``gst:<pipeline>`` (Jetson CSI cameras; needs OpenCV built with GStreamer,
runtime/gst_source.py).

``open_source(spec, sample_rate, audio=...)`` adds a second input for the sound (a microphone beside a
camera): runtime/merged_source.py puts both on one clock.

Audio leaves here as float32 mono at ``sample_rate`` (favor.media's down-mix graph, so the maths is
the one offline decoding uses); frames stay as decoded ``av.VideoFrame`` objects, converted to RGB only
when the assembler picks one for the frame grid (a 30 FPS camera sampled at 2 FPS converts 2 frames/s).

Notation: n audio samples; H x W source frame size.
"""

from __future__ import annotations

import errno
import io
import os
import re
import select
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import av
import numpy as np

from favor.media import declared_start, frame_duration, mono_resampler, stream_origin

NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt", "rtp")
# A stream or pipe that stays silent this long is treated as lost: opening it, or mid-stream
# (ffmpeg's socket timeout is in us). Long enough for a slow RTSP handshake, short enough to notice.
NETWORK_TIMEOUT_S = 10.0
# An open that failed after this fraction of the timeout failed because nothing arrived in time
# (ffmpeg reports it as "Immediate exit requested" or "Invalid data", not as a timeout).
TIMED_OUT_FRACTION = 0.9
_PIPE_READ_BYTES = 1 << 16
_US_PER_S = 1_000_000
# Consecutive undecodable packets tolerated before the stream counts as broken: a few corrupt packets
# are normal on lossy links and in damaged files; a run this long means the data is garbage.
MAX_CONSECUTIVE_DECODE_ERRORS = 25


class SourceError(ValueError):
    """The input cannot be opened or broke mid-stream. The message names the input."""


@dataclass
class Frame:
    t: float  # presentation time, seconds on the source clock
    frame: av.VideoFrame  # decoded, not yet converted
    duration: float = 0.0  # seconds on screen (favor.media.frame_duration); 0 = not known

    def rgb(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 [H, W, 3]; ``size`` = (width, height) rescales (a resolution change mid-stream)."""
        if size is None:
            return self.frame.to_ndarray(format="rgb24")
        return self.frame.to_ndarray(format="rgb24", width=size[0], height=size[1])


@dataclass
class AudioChunk:
    t: float  # presentation time of samples[0], seconds on the source clock
    samples: np.ndarray  # float32 [n] mono at the source's sample_rate


# ALSA capture devices written bare (``hw:0``, ``plughw:1,0``); any other ALSA PCM as ``alsa:<name>``.
ALSA_DEVICE = re.compile(r"(plug)?hw:[\w=,.]+")
# Where the PyAV wheel's own libasound looks for its configuration is a build path that does not exist
# on the user's machine; without a configuration no PCM name (not even ``null``) resolves. The system's
# file is used instead unless $ALSA_CONFIG_PATH says otherwise.
SYSTEM_ALSA_CONF = "/usr/share/alsa/alsa.conf"
DEVICE_FORMATS = {"alsa": "alsa", "pulse": "pulse"}
# A capture device's samples are contiguous unless it overran, but each period is stamped with the wall
# time it was read (scheduling jitter of a few ms): chunks within this of the previous end are contiguous.
DEVICE_AUDIO_SLACK_S = 0.05


def source_kind(spec: str) -> str:
    """'lavfi', 'camera', 'alsa', 'pulse', 'gst', 'stream', 'pipe' (a FIFO) or 'file'."""
    if spec.startswith("lavfi:"):
        return "lavfi"
    if spec.startswith(("alsa:", "pulse:", "gst:")):
        return spec.split(":", 1)[0]
    if ALSA_DEVICE.fullmatch(spec):
        return "alsa"
    if re.fullmatch(r"\d+", spec) or spec.startswith("/dev/video"):
        return "camera"
    if "://" in spec and spec.split("://", 1)[0].lower() in NETWORK_SCHEMES:
        return "stream"
    try:
        if stat.S_ISFIFO(os.stat(spec).st_mode):
            return "pipe"
    except OSError:
        pass
    return "file"


class PipeReader(io.RawIOBase):
    """A FIFO read with a timeout: PyAV reads through it, so a writer that never comes (or goes
    silent) ends the run with a message instead of a read() that blocks forever.

    A timeout or Ctrl-C ends the data (read returns b"") and is kept in ``error`` / ``interrupted``
    for the caller to raise: PyAV prints and drops an exception raised inside its read callback."""

    def __init__(self, spec: str, timeout: float):
        self.spec, self.timeout = spec, timeout
        self.interrupted = False  # Ctrl-C while waiting
        self.error: SourceError | None = None
        self.received = 0  # bytes read so far: no data at all means no writer ever came
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer without limit.
        self.fd = os.open(spec, os.O_RDONLY | os.O_NONBLOCK)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while self.error is None and not self.interrupted:
            try:
                ready, _, _ = select.select([self.fd], [], [], self.timeout)
            except KeyboardInterrupt:
                self.interrupted = True
                break
            if not ready:
                why = "mid-stream" if self.received else "(nothing is writing to the pipe)"
                self.error = SourceError(f"{self.spec}: timed out: no data for {self.timeout:g} s {why}")
                break
            try:
                data = os.read(self.fd, size if size > 0 else _PIPE_READ_BYTES)
            except BlockingIOError:  # readable, then emptied: wait again
                continue
            self.received += len(data)
            return data
        return b""

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


def _open_stream(spec: str, timeout: float) -> av.container.InputContainer:
    timeout_us = str(int(timeout * _US_PER_S))
    options = {"timeout": timeout_us, "rw_timeout": timeout_us}
    if spec.lower().startswith("rtsp"):
        options = {"timeout": timeout_us, "rtsp_transport": "tcp"}  # UDP drops packets on busy links
    return av.open(spec, options=options, timeout=timeout)


_ALSA_ERROR_HANDLER = None  # kept alive: libasound calls it for every message


def _quiet_alsa() -> None:
    """libasound prints its own diagnostics ("ALSA lib ... Unknown PCM") straight to stderr; the open's
    one-line SourceError already says what failed, so they are silenced (FAVOR_VERBOSE_ALSA=1 keeps them).
    The handler is set on the libasound PyAV loaded (its wheel bundles one), else the system's."""
    global _ALSA_ERROR_HANDLER
    if _ALSA_ERROR_HANDLER is not None or os.environ.get("FAVOR_VERBOSE_ALSA"):
        return
    import ctypes
    import ctypes.util
    import glob

    bundled = glob.glob(os.path.join(os.path.dirname(os.path.dirname(av.__file__)), "av.libs", "libasound*"))
    name = bundled[0] if bundled else ctypes.util.find_library("asound")
    if name is None:
        return
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return
    handler_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                    ctypes.c_char_p)
    _ALSA_ERROR_HANDLER = handler_type(lambda *args: None)
    lib.snd_lib_error_set_handler(_ALSA_ERROR_HANDLER)


def _open_device(spec: str, kind: str, timeout: float) -> av.container.InputContainer:
    """A microphone through libavdevice (ALSA or PulseAudio); its timestamps are wall-clock capture times."""
    fmt = DEVICE_FORMATS[kind]
    if fmt not in av.formats_available:
        raise SourceError(f"{spec}: this PyAV build has no {fmt} input (libavdevice without {fmt})")
    name = spec.split(":", 1)[1] if spec.startswith(f"{kind}:") else spec
    if not name:
        raise SourceError(f"{spec}: name a device after '{kind}:' (e.g. {kind}:default)")
    if kind == "alsa" and "ALSA_CONFIG_PATH" not in os.environ and os.path.isfile(SYSTEM_ALSA_CONF):
        os.environ["ALSA_CONFIG_PATH"] = SYSTEM_ALSA_CONF
    if kind == "alsa":
        _quiet_alsa()
    return av.open(name, format=fmt, timeout=timeout)


def _open_container(spec: str, kind: str, timeout: float = NETWORK_TIMEOUT_S
                    ) -> tuple[av.container.InputContainer, PipeReader | None]:
    t0 = time.monotonic()
    pipe = None
    try:
        if kind == "lavfi":
            return av.open(spec[len("lavfi:"):], format="lavfi"), None
        if kind == "camera":
            device = f"/dev/video{spec}" if spec.isdigit() else spec
            if not os.path.exists(device):
                raise SourceError(f"{spec}: camera device {device} not found")
            return av.open(device, format="v4l2", timeout=timeout), None
        if kind == "stream":
            return _open_stream(spec, timeout), None
        if kind in DEVICE_FORMATS:
            return _open_device(spec, kind, timeout), None
        if kind == "gst":
            raise SourceError(f"{spec}: a GStreamer pipeline is opened by runtime.gst_source, not PyAV")
        if kind == "pipe":
            pipe = PipeReader(spec, timeout)
            return av.open(pipe, timeout=timeout), pipe
        if not os.path.exists(spec):
            raise SourceError(f"{spec}: no such file")
        if os.path.isdir(spec):
            raise SourceError(f"{spec}: expected a media file, got a directory")
        return av.open(spec), None
    except (av.FFmpegError, SourceError, OSError) as e:
        if pipe is not None:
            pipe.close()
        if getattr(e, "errno", None) == errno.EINTR or (pipe is not None and pipe.interrupted):
            raise KeyboardInterrupt from None  # Ctrl-C during a blocking open: the caller exits 130
        if pipe is not None and pipe.error is not None:
            raise pipe.error from None
        if isinstance(e, SourceError):
            raise
        reason = getattr(e, "strerror", None) or str(e)
        if kind in ("stream", "camera", *DEVICE_FORMATS) and time.monotonic() - t0 >= TIMED_OUT_FRACTION * timeout:
            raise SourceError(f"{spec}: timed out: no data within {timeout:g} s (--timeout)") from None
        hint = ""
        if kind == "alsa" and spec.startswith("hw:"):  # hw: takes only the card's own rates and layouts
            hint = f"; plug{spec} converts rate and channels (list cards with arecord -l)"
        raise SourceError(f"{spec}: cannot open as {kind} input ({reason}){hint}") from None


class MediaSource:
    """One opened input: its first video and first audio stream, decoded in demux order.

    ``streams`` keeps only those kinds ("video", "audio"): a camera whose sound comes from a separate
    microphone is opened for its video alone; ``own_audio`` still says whether it had a sound track."""

    def __init__(self, spec: str, sample_rate: int, timeout: float = NETWORK_TIMEOUT_S,
                 streams: tuple[str, ...] = ("video", "audio")):
        self.spec, self.kind, self.sample_rate = spec, source_kind(spec), sample_rate
        self.timeout = timeout
        self.container, self._pipe = _open_container(spec, self.kind, timeout)
        c = self.container
        self.own_audio = bool(c.streams.audio)
        self.video = c.streams.video[0] if c.streams.video and "video" in streams else None
        self.audio = c.streams.audio[0] if c.streams.audio and "audio" in streams else None
        if self.video is None and self.audio is None:
            kinds = ", ".join(s.type for s in c.streams) or "none"
            wanted = " or ".join(streams)
            self.close()
            raise SourceError(f"{spec}: no {wanted} stream to caption (streams: {kinds})")
        if self.video is not None:
            self.video.thread_type = "AUTO"
        self.skipped_packets = 0  # undecodable packets skipped (corrupt data)
        self._graph = None
        self._graph_key = None
        self._next_t: float | None = None  # source time where the last audio chunk ended

    @property
    def live(self) -> bool:
        """Cameras, microphones and network streams arrive at their own pace; files and lavfi need pacing."""
        return self.kind in ("camera", "stream", *DEVICE_FORMATS)

    @property
    def origin(self) -> float | None:
        """Stream time 0 on the source clock: favor.media.stream_origin of the streams' declared starts,
        the clock load_frames / load_audio use. None when a stream declares no start: the assembler then
        takes each stream's first timestamp (offline decoding takes an undeclared stream's first decoded
        timestamp too; the two agree wherever the declared start is the first timestamp)."""
        starts = {s.type: declared_start(s) for s in (self.video, self.audio) if s is not None}
        if None in starts.values():
            return None
        return stream_origin(starts.get("video"), starts.get("audio"))

    @property
    def frame_rate(self) -> float | None:
        """The video stream's average frame rate (frames per second), if the container states one."""
        rate = self.video.average_rate if self.video is not None else None
        return float(rate) if rate else None

    def close(self) -> None:
        self.container.close()
        if self._pipe is not None:
            self._pipe.close()

    def _audio_out(self, frame: av.AudioFrame | None) -> Iterator[AudioChunk]:
        if frame is not None:
            key = (frame.format.name, frame.layout.name, frame.sample_rate)
            if self._graph is None or key != self._graph_key:
                # Input format changed mid-stream (concatenated files, renegotiated streams): flush.
                if self._graph is not None:
                    yield from self._audio_out(None)
                self._graph, self._graph_key = mono_resampler(self.audio, self.sample_rate), key
        if self._graph is None:
            return
        self._graph.push(frame)
        while True:
            try:
                out = self._graph.pull()
            except (av.BlockingIOError, av.EOFError):
                break
            if out.pts is None:
                raise SourceError(f"{self.spec}: audio without presentation timestamps")
            samples = out.to_ndarray().reshape(-1).astype(np.float32)
            yield AudioChunk(self._contiguous(float(out.time)), samples)
            self._next_t += samples.size / self.sample_rate
        if frame is None:
            self._graph = None

    def _contiguous(self, t: float) -> float:
        """A chunk's start time, snapped to where the previous chunk ended when it is within one tick
        of the audio stream's time base (+ one sample) of it: containers round timestamps to their time
        base (1 ms in Matroska, 16 samples at 16 kHz), which is not a gap; offline decoding, which
        concatenates the samples, sees none either. A larger difference is a real gap or overlap.
        A microphone's periods are stamped when read, jittering by milliseconds: DEVICE_AUDIO_SLACK_S."""
        tick = float(self.audio.time_base) if self.audio.time_base else 0.0
        slack = tick + 1.0 / self.sample_rate
        if self.kind in DEVICE_FORMATS:  # capture periods are stamped with the time they were read
            slack = max(slack, DEVICE_AUDIO_SLACK_S)
        if self._next_t is None or abs(t - self._next_t) > slack:
            self._next_t = t
        return self._next_t

    def __iter__(self) -> Iterator[Frame | AudioChunk]:
        streams = [s for s in (self.video, self.audio) if s is not None]
        errors = 0
        try:
            for packet in self.container.demux(streams):
                try:
                    decoded = packet.decode()
                    errors = 0
                except av.FFmpegError:  # one bad packet: skip it; a run of them is fatal
                    errors += 1
                    self.skipped_packets += 1
                    if errors >= MAX_CONSECUTIVE_DECODE_ERRORS:
                        raise SourceError(f"{self.spec}: {errors} consecutive undecodable packets; "
                                          "the data is corrupt") from None
                    continue
                for f in decoded:
                    if isinstance(f, av.VideoFrame):
                        if f.pts is not None:  # a frame without a time cannot be placed on the grid
                            yield Frame(float(f.time), f, frame_duration(f, self.video))
                    else:
                        yield from self._audio_out(f)
            if self._pipe is not None and self._pipe.error is not None:  # the data ended by a timeout
                raise self._pipe.error
            yield from self._audio_out(None)
        except av.ExitError:  # the read timeout's interrupt: nothing arrived for `timeout` seconds
            raise SourceError(f"{self.spec}: timed out: no data for {self.timeout:g} s mid-stream") from None
        except av.FFmpegError as e:
            if self._pipe is not None and self._pipe.error is not None:  # a cut-off packet after a timeout
                raise self._pipe.error from None
            reason = getattr(e, "strerror", None) or str(e)
            what = {"camera": "camera lost", "alsa": "microphone lost", "pulse": "microphone lost"
                    }.get(self.kind, "read error")
            raise SourceError(f"{self.spec}: {what} mid-stream ({reason})") from None


def open_source(spec: str, sample_rate: int, *, audio: str | None = None, realtime: bool = True,
                timeout: float = NETWORK_TIMEOUT_S):
    """The input(s) to caption: ``spec`` alone (MediaSource; a ``gst:`` pipeline: GstSource), or its video
    with the sound of ``audio`` (MergedSource, both on one clock; runtime/merged_source.py).
    SourceError (a ValueError, one line naming the input) when either cannot be opened."""
    if audio is None:
        if source_kind(spec) == "gst":
            from runtime.gst_source import GstSource

            return GstSource(spec, sample_rate, timeout=timeout)
        return MediaSource(spec, sample_rate, timeout=timeout)
    from runtime.merged_source import MergedSource

    return MergedSource(spec, audio, sample_rate, realtime=realtime, timeout=timeout)


class Ring:
    """A bounded FIFO shared by one producer and one consumer.

    ``block=False`` (live): a full ring drops its oldest item (latest wins) and counts it, so the
    producer never waits. ``block=True`` (offline): the producer waits for room instead (nothing lost).
    """

    def __init__(self, maxlen: int, cond: threading.Condition, block: bool):
        if maxlen < 1:
            raise ValueError(f"ring size ({maxlen}) must be >= 1")
        self.maxlen, self.cond, self.block = maxlen, cond, block
        self.items: list = []
        self.dropped: list = []  # items evicted by latest-wins (the consumer accounts for them)
        self.high_water = 0

    def put(self, item, stop: threading.Event) -> None:
        with self.cond:
            while self.block and len(self.items) >= self.maxlen and not stop.is_set():
                self.cond.wait(0.05)
            if len(self.items) >= self.maxlen:
                self.dropped.append(self.items.pop(0))
            self.items.append(item)
            self.high_water = max(self.high_water, len(self.items))
            self.cond.notify_all()


class Capture(threading.Thread):
    """Decode thread: source -> optional real-time pacing -> ``on_media`` (the window assembler).

    ``on_media(item)`` must be cheap (no model compute); it pushes into Rings. ``done`` is set at the
    end of the stream, after an error (``error``), or when ``stop`` is set.
    """

    def __init__(self, source: MediaSource, on_media: Callable[[Frame | AudioChunk | None], None],
                 pace: bool, stop: threading.Event, cond: threading.Condition):
        super().__init__(name="favor-capture", daemon=True)
        self.source, self.on_media, self.pace = source, on_media, pace
        self.stop, self.cond = stop, cond
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.wall_start: float | None = None  # wall clock of media time ``media_start``
        self.media_start: float | None = None

    def _wait_until(self, t: float) -> None:
        if self.media_start is None:
            self.media_start, self.wall_start = t, time.monotonic()
            return
        delay = self.wall_start + (t - self.media_start) - time.monotonic()
        if delay > 0:
            self.stop.wait(delay)

    def run(self) -> None:
        try:
            for item in self.source:
                if self.stop.is_set():
                    break
                if self.pace:
                    self._wait_until(item.t)
                self.on_media(item)
            self.on_media(None)  # end of stream: the assembler closes the last window
        except BaseException as e:  # reported by the consumer, which owns the exit code
            self.error = e
        finally:
            self.done.set()
            with self.cond:
                self.cond.notify_all()
