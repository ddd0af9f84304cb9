"""Video from one input, sound from another (a camera and a microphone), on one clock.

    MergedSource(video_spec, audio_spec, sample_rate, realtime=...)   iterates Frame / AudioChunk like a
                                                                      MediaSource (runtime/sources.py)

Two ways to merge, picked by what the inputs are:

- **live** (realtime, or either input is a device or a network stream): one reader thread per input
  (their reads block independently), both feeding one bounded queue. Timestamps are brought onto the
  wall clock (``time.time()`` seconds), the clock capture devices already stamp: libavdevice's v4l2
  (monotonic timestamps are converted), ALSA and PulseAudio inputs stamp each packet with its capture
  time. An input whose timestamps are not wall-clock times (lavfi, a file, an RTSP stream's own clock) is
  mapped onto it: a file or lavfi graph is paced by its own timestamps from a start instant shared by
  both readers (so two generated inputs stay aligned to the sample), a network stream is anchored at the
  arrival of its first packet. The origin is then left to the window assembler (``origin`` None): the
  earlier of the two inputs' first timestamps, favor.media.stream_origin's rule, as for one source.
- **ordered** (offline, files / lavfi / FIFOs only): no threads; each input on its own media clock from
  its own start (a separate narration track starts with the video), merged in timestamp order, so the
  capture thread's back-pressure and the offline pacing rule work unchanged.

A full queue drops the oldest item (counted in ``dropped``), as a live ring does: a slow consumer loses
media, never stalls a device. Capture-device audio arrives in periods whose timestamps jitter by a few
milliseconds; chunks within ``DEVICE_AUDIO_SLACK_S`` of where the last one ended are placed contiguously (the
samples of a capture device are contiguous unless it overran; a larger jump is kept as a real gap).

The video input's own sound track, if it has one, is not used: the user named the sound explicitly
(``--audio``); ``ignored_audio`` says so and the CLI prints it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator

from runtime.sources import DEVICE_AUDIO_SLACK_S, NETWORK_TIMEOUT_S, AudioChunk, Frame, MediaSource, source_kind

# A first timestamp within this many seconds of time.time() is taken as a wall-clock capture time
# (device inputs); media clocks start near 0 and network clocks are arbitrary, never this close to now.
WALL_CLOCK_TOLERANCE_S = 60.0
# Items in flight between the reader threads and the capture thread: ~2 s of a 30 FPS camera plus its
# audio periods; the consumer only hands them to the window assembler, so a full queue means it stalled.
QUEUE_ITEMS = 256
# Live: the stream ends with its video (a microphone never ends); audio for the last window may arrive
# up to one capture period after the last frame, so it is awaited this long (seconds).
END_AUDIO_WAIT_S = 1.0
_POLL_S = 0.1  # the consumer and paced readers wake this often to notice close()


class _Clock:
    """One input's timestamps -> the merged clock (wall seconds); paces a generated input."""

    def __init__(self, anchor: float, pace: bool, stop: threading.Event):
        self.anchor, self.pace, self.stop = anchor, pace, stop
        self.offset: float | None = None  # merged = own + offset
        self.audio_end: float | None = None  # merged time where the last audio chunk ended

    def place(self, item: Frame | AudioChunk, sample_rate: int) -> Frame | AudioChunk:
        if self.offset is None:
            now = time.time()
            if abs(item.t - now) <= WALL_CLOCK_TOLERANCE_S:
                self.offset = 0.0  # a device's capture time already
            else:  # generated: from the shared start; a network stream: from its first packet's arrival
                self.offset = (self.anchor if self.pace else now) - item.t
        t = item.t + self.offset
        if self.pace:
            delay = t - time.time()
            if delay > 0:
                self.stop.wait(delay)
        if isinstance(item, AudioChunk):
            if self.audio_end is not None and abs(t - self.audio_end) <= DEVICE_AUDIO_SLACK_S:
                t = self.audio_end
            self.audio_end = t + item.samples.size / sample_rate
        item.t = t
        return item


class _Reader(threading.Thread):
    """Reads one input to the end (or ``stop``), handing each placed item to ``put``."""

    def __init__(self, source: MediaSource, clock: _Clock, put, stop: threading.Event):
        super().__init__(name=f"favor-read-{source.kind}", daemon=True)
        self.source, self.clock, self.put, self.stop = source, clock, put, stop
        self.error: BaseException | None = None
        self.done = False

    def run(self) -> None:
        try:
            for item in self.source:
                if self.stop.is_set():
                    break
                self.put(self.clock.place(item, self.source.sample_rate))
        except BaseException as e:  # raised on the consumer's thread
            self.error = e
        finally:
            self.done = True
            self.put(None)


class MergedSource:
    """``video_spec``'s video and ``audio_spec``'s audio as one source (see the module docstring)."""

    def __init__(self, video_spec: str, audio_spec: str, sample_rate: int, *, realtime: bool = True,
                 timeout: float = NETWORK_TIMEOUT_S):
        self.spec, self.audio_spec, self.sample_rate, self.timeout = video_spec, audio_spec, sample_rate, timeout
        if source_kind(video_spec) == "gst":  # a Jetson CSI camera through OpenCV (runtime/gst_source.py)
            from runtime.gst_source import GstSource

            self._video_in = GstSource(video_spec, sample_rate, timeout)
        else:
            self._video_in = MediaSource(video_spec, sample_rate, timeout, streams=("video",))
        try:
            self._audio_in = MediaSource(audio_spec, sample_rate, timeout, streams=("audio",))
        except BaseException:
            self._video_in.close()
            raise
        self.kind, self.audio_kind = self._video_in.kind, self._audio_in.kind
        self.video, self.audio = self._video_in.video, self._audio_in.audio
        self.ignored_audio = self._video_in.own_audio
        self.threaded = realtime or self._video_in.live or self._audio_in.live
        self.dropped = 0  # items evicted from the full queue (the consumer fell behind)
        self._stop = threading.Event()
        self._readers: list[_Reader] = []

    # -- what MediaSource offers ------------------------------------------------------------------
    @property
    def live(self) -> bool:
        """Threaded: the readers pace themselves, so the capture thread must not pace again."""
        return self.threaded

    @property
    def origin(self) -> float | None:
        """Live: None (the assembler takes the earlier first timestamp on the wall clock). Ordered: 0,
        each input having been shifted to start at its own origin."""
        return None if self.threaded else 0.0

    @property
    def frame_rate(self) -> float | None:
        return self._video_in.frame_rate

    @property
    def skipped_packets(self) -> int:
        return self._video_in.skipped_packets + self._audio_in.skipped_packets

    def close(self) -> None:
        self._stop.set()
        for r in self._readers:  # a reader blocked in a read returns within the input's timeout
            r.join(self.timeout + 1.0)
        for src, r in zip((self._video_in, self._audio_in), self._readers or [None, None], strict=True):
            if r is None or not r.is_alive():  # never close a container another thread still reads
                src.close()

    def __iter__(self) -> Iterator[Frame | AudioChunk]:
        return self._threaded() if self.threaded else self._ordered()

    # -- ordered: both inputs on their own media clocks, merged by time ------------------------------
    def _ordered(self) -> Iterator[Frame | AudioChunk]:
        heads: list[list] = []  # [time, shift, item, iterator] per input still running
        for src in (self._video_in, self._audio_in):
            it = iter(src)
            item = next(it, None)
            if item is not None:
                shift = src.origin if src.origin is not None else item.t
                heads.append([item.t - shift, shift, item, it])
        while heads:
            head = min(heads, key=lambda h: h[0])
            item = head[2]
            item.t -= head[1]
            yield item
            nxt = next(head[3], None)
            if nxt is None:
                heads.remove(head)
            else:
                head[0], head[2] = nxt.t - head[1], nxt

    # -- live: one reader thread per input, one bounded queue ----------------------------------------
    def _threaded(self) -> Iterator[Frame | AudioChunk]:
        cond = threading.Condition()
        queue: deque = deque()

        def put(item) -> None:
            with cond:
                if len(queue) >= QUEUE_ITEMS:  # latest wins: drop the oldest media item
                    for k, x in enumerate(queue):
                        if x is not None:
                            del queue[k]
                            self.dropped += 1
                            break
                queue.append(item)
                cond.notify_all()

        anchor = time.time()  # the generated inputs' shared start
        self._readers = [_Reader(src, _Clock(anchor, not src.live, self._stop), put, self._stop)
                         for src in (self._video_in, self._audio_in)]
        for r in self._readers:
            r.start()
        try:
            video, audio = self._readers
            frames, last_frame_end = False, float("-inf")
            video_end: float | None = None  # merged time where the last frame stops showing
            deadline = float("inf")  # wall time after which audio for the last window is not awaited
            while not (audio.done and video.done and not queue) and time.monotonic() < deadline:
                with cond:
                    if not queue:
                        cond.wait(_POLL_S)
                        continue
                    item = queue.popleft()
                failed = next((r.error for r in self._readers if r.error is not None), None)
                if failed is not None:
                    raise failed
                if item is None:
                    if video.done and video_end is None:  # the video ended: so does the stream
                        video_end = last_frame_end if frames else float("-inf")
                        deadline = time.monotonic() + END_AUDIO_WAIT_S
                    continue
                if isinstance(item, Frame):
                    frames, last_frame_end = True, item.t + item.duration
                elif video_end is not None and item.t >= video_end:
                    break  # audio has reached the end of the video
                yield item
        finally:
            self._stop.set()  # the readers stop at their next item
