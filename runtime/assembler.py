"""Window assembler: frames and audio placed on one clock by presentation time, cut into windows.

Stream time 0 is t0 = favor.media.stream_origin of the streams' starts: the earlier of the two, the
clock load_frames and load_audio use. The source's declared starts give it before any media arrives
(MediaSource.origin); without them, the first timestamp of each stream, once each has shown one. Then

    frame slot i   shows the latest decoded frame with pts - t0 <= i / fps   (favor.media.FrameGrid, the
                   rule load_frames uses: slots before the first frame show it; the last frame lasts
                   its favor.media.frame_duration)
    audio sample k plays at k / sample_rate; a chunk lands at round((pts - t0) x sample_rate)
    window w       = slots [wF, (w+1)F)  +  samples [round(wF x sr / fps), round((w+1)F x sr / fps))

so variable frame rates, dropped camera frames, audio gaps (zero-filled) and audio that starts late
or early are all placed by their timestamps, never by counting. A window closes as soon as its last
slot is known (a frame with a later pts arrived) and its audio is in; audio that stalls more than
``audio_grace`` seconds of video behind closes the window with silence. At the end of the stream the
remaining frames close a last, shorter window; the shorter stream is zero-padded, as ``sync.align``.

Cheap by design (runs on the capture thread): no model maths; RGB conversion only for picked frames.

Notation: F frames per window, n frames in a window (n <= F), H x W frame size, sr sample rate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from favor.media import TIME_EPS_S, FrameGrid, sample_index, stream_origin
from runtime.sources import AudioChunk, Frame

# A chunk whose start is this close to the end of the previous one is taken as contiguous: resampler
# timestamps are rounded to whole samples, so a 1-2 sample jitter is clock noise, not a gap.
AUDIO_JITTER_SAMPLES = 2
# Media held while stream time 0 is not known yet (no declared starts): bounded, so a stream that never
# delivers cannot grow memory without limit; the origin is then fixed from what has arrived.
MAX_EARLY_ITEMS = 4096
# Audio kept while the video stream has not delivered its first frame (windows cannot close before it).
# Bounded for the same reason; the oldest is dropped, as a full live ring drops it.
MAX_AUDIO_BEFORE_VIDEO_S = 300.0


@dataclass
class FrameSlot:
    index: int  # global frame index i: shown at i / fps seconds of stream time
    window: int  # i // F
    rgb: np.ndarray  # uint8 [H, W, 3]


@dataclass
class Window:
    index: int
    start: float  # seconds of stream time
    end: float
    first_frame: int  # global index of the window's first frame slot
    num_frames: int  # n grid frames in this window (F except the last window)
    frames: np.ndarray | None  # uint8 [n_v, H, W, 3], n_v <= n (None: no video stream)
    audio: np.ndarray | None  # float32 [samples] covering the n frames (None: no audio stream)
    closed_at: float  # time.monotonic() when the window became complete


class WindowAssembler:
    """Feed ``push(Frame | AudioChunk)``, then ``push(None)`` at the end; windows go to ``on_window``."""

    def __init__(self, fps: float, frames_per_window: int, sample_rate: int, has_video: bool,
                 has_audio: bool, on_window: Callable[[Window], None],
                 on_frame: Callable[[FrameSlot], None] | None = None, audio_grace: float = 1.0,
                 origin: float | None = None):
        """``origin``: stream time 0 on the source clock (MediaSource.origin); None = from the media."""
        if not (has_video or has_audio):
            raise ValueError("the assembler needs a video or an audio stream")
        self.fps, self.F, self.sr = fps, frames_per_window, sample_rate
        self.has_video, self.has_audio = has_video, has_audio
        self.on_window, self.on_frame, self.audio_grace = on_window, on_frame, audio_grace
        self.t0: float | None = origin
        self.early: list[Frame | AudioChunk] = []  # media that arrived before t0 was known
        # video: the held frame and the next slot to fill
        self.grid = FrameGrid(fps)  # on stream time (t0 = 0)
        self.prev: Frame | None = None
        self.size: tuple[int, int] | None = None  # (width, height) of every output frame
        self.next_slot = 0
        self.slots: dict[int, np.ndarray] = {}  # slot index -> rgb, for windows not yet closed
        # audio: samples [audio_base, audio_base + len(buf)) of stream time, zero where missing
        self.audio_base = 0
        self.buf = np.zeros(0, dtype=np.float32)
        self.audio_end = 0  # one past the last sample written
        self.audio_done = not has_audio
        self.next_window = 0
        self.finished = False

    # -- time grid -----------------------------------------------------------------------------
    @property
    def last_video_t(self) -> float:  # stream time of the held frame (-inf before the first)
        return self.grid.held_t

    def slot_time(self, i: int) -> float:
        return self.grid.time(i)

    def sample_at(self, frame_index: int) -> int:  # first audio sample of frame slot i
        return round(frame_index * self.sr / self.fps)

    # -- input ------------------------------------------------------------------------------------
    def push(self, item: Frame | AudioChunk | None) -> None:
        if item is None:
            self.finish()
            return
        if self.t0 is None:
            self.early.append(item)
            if not self._fix_origin(at_end=False):
                return
        else:
            self._place(item)
        self._close_ready()

    def _place(self, item: Frame | AudioChunk) -> None:
        if isinstance(item, Frame):
            self._video(item)
        else:
            self._audio(item)

    def _fix_origin(self, at_end: bool) -> bool:
        """No declared origin: stream_origin of each stream's first timestamp, once every stream has
        shown one (or the other has run ``audio_grace`` s ahead, or the stream ended: a stream that has
        not delivered by then starts later). Places the held media; False while still waiting."""
        first_v = next((x.t for x in self.early if isinstance(x, Frame)), None)
        first_a = next((x.t for x in self.early if isinstance(x, AudioChunk)), None)
        waiting = (self.has_video and first_v is None) or (self.has_audio and first_a is None)
        if waiting and not at_end and len(self.early) < MAX_EARLY_ITEMS:
            seen = first_v if first_v is not None else first_a
            if self.early[-1].t - seen <= self.audio_grace:
                return False
        self.t0 = stream_origin(first_v, first_a)
        if self.t0 is None:  # nothing arrived
            return False
        early, self.early = self.early, []
        for x in early:
            self._place(x)
        return True

    def _pick(self, frame: Frame) -> None:
        if self.size is None:
            self.size = (frame.frame.width, frame.frame.height)
        same = (frame.frame.width, frame.frame.height) == self.size
        rgb = frame.rgb(None if same else self.size)
        i = self.next_slot
        self.slots[i] = rgb
        self.next_slot += 1
        if self.on_frame is not None:
            self.on_frame(FrameSlot(i, i // self.F, rgb))

    def _video(self, frame: Frame) -> None:
        n = self.grid.push(frame.t - self.t0, frame.duration)
        if n is None:  # out-of-order or duplicate pts: keep the frame already held
            return
        for _ in range(n):
            self._pick(self.prev if self.prev is not None else frame)
        self.prev = frame

    def _audio(self, chunk: AudioChunk) -> None:
        start = sample_index(chunk.t, self.t0, self.sr)  # the index load_audio gives the first sample
        # (the first chunk is placed exactly: nothing precedes it to be contiguous with)
        if self.audio_end > 0 and abs(start - self.audio_end) <= AUDIO_JITTER_SAMPLES:
            start = self.audio_end
        x = chunk.samples
        if start < self.audio_base:  # before stream time 0 or in an already closed window
            x = x[self.audio_base - start:]
            start = self.audio_base
        if x.size == 0:
            return
        need = start + x.size - self.audio_base
        if need > self.buf.size:
            self.buf = np.concatenate([self.buf, np.zeros(need - self.buf.size, np.float32)])
        self.buf[start - self.audio_base: start - self.audio_base + x.size] = x
        self.audio_end = max(self.audio_end, start + x.size)
        excess = self.buf.size - round(MAX_AUDIO_BEFORE_VIDEO_S * self.sr)
        if self.has_video and self.prev is None and excess > 0:  # video has not started: drop oldest
            self.buf, self.audio_base = self.buf[excess:], self.audio_base + excess

    # -- windows ----------------------------------------------------------------------------------
    def _audio_ready(self, end_sample: int, end_time: float) -> bool:
        if self.audio_done or self.audio_end >= end_sample:
            return True
        # audio stalled behind video by more than the grace period: close with silence
        return self.has_video and self.last_video_t > end_time + self.audio_grace

    def _close_ready(self) -> None:
        while True:
            w = self.next_window
            last = (w + 1) * self.F  # one past the window's last slot
            if self.has_video and self.next_slot < last:
                return
            if not self._audio_ready(self.sample_at(last), self.slot_time(last)):
                return
            self._emit(w, self.F)

    def _emit(self, w: int, n: int) -> None:
        first = w * self.F
        frames = None
        if self.has_video:
            picked = [self.slots.pop(i) for i in range(first, first + n) if i in self.slots]
            frames = np.stack(picked) if picked else None  # [n_v, H, W, 3]
        audio = None
        if self.has_audio:
            a, b = self.sample_at(first), self.sample_at(first + n)
            audio = np.zeros(b - a, np.float32)  # [samples]: zeros where nothing arrived
            lo, hi = max(a, self.audio_base), min(b, self.audio_base + self.buf.size)
            if hi > lo:
                audio[lo - a: hi - a] = self.buf[lo - self.audio_base: hi - self.audio_base]
            # keep only what later windows can use
            cut = min(max(b - self.audio_base, 0), self.buf.size)
            self.buf, self.audio_base = self.buf[cut:], max(self.audio_base + cut, b)
        self.next_window = w + 1
        self.on_window(Window(w, self.slot_time(first), self.slot_time(first + n), first, n, frames,
                              audio, time.monotonic()))

    def finish(self) -> None:
        """End of stream: fill the tail slots, then close every window that holds media."""
        if self.finished:
            return
        self.finished = True
        self.audio_done = True
        if self.t0 is None and not self._fix_origin(at_end=True):
            return  # no media at all
        for _ in range(self.grid.finish()):  # the last frame, until it ends
            self._pick(self.prev)
        video_frames = self.next_slot if self.has_video else 0
        audio_frames = math.ceil(self.audio_end * self.fps / self.sr - TIME_EPS_S) if self.has_audio else 0
        total = max(video_frames, audio_frames)
        while self.next_window * self.F < total:
            w = self.next_window
            self._emit(w, min(self.F, total - w * self.F))
