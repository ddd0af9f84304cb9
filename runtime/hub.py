"""StreamHub: many live streams on one engine, one worker thread.

    per stream:  capture thread -> WindowAssembler -> window ring / frame-hint ring   (runtime/sources.py,
                 never waits for compute)                                              runtime/assembler.py)
                 DeadlineScheduler (its own latency bound, drop / merge decisions, drop counts)
    one worker:  gathers every stream's rings, asks each scheduler what is due, then
                 1. the due windows of all streams through the encoders and fusion as batches
                    (runtime/hub_batch.py: frames of every stream in one visual call, windows with the
                    same shapes in one audio / fusion call when the graphs take a batch axis);
                 2. their captions join the running decode batch (favor/continuous.py: continuous
                    batching, requests join and leave between decode steps);
                 3. one decode step for every active caption; tokens and captions go out as events;
                 4. when idle, pre-encodes the frames of open windows (frames of all streams batched).

Fairness: due windows are served oldest deadline first across streams, one caption per stream per
round, so a stream never starves; a saturated device shows up as late drops in each stream's
scheduler (its bound is checked against the hub-wide cost it observes), and each stream's rings and
pending list are bounded (overflow drops counted per stream). Memory is bounded by max_streams x
(rings + pending windows + one decode row).

Events (``subscribe``): {"type": "caption", "stream": id, ...Caption.as_dict()},
{"type": "token", "stream": id, "text": piece}, {"type": "end", "stream": id, "reason": "eof" |
"removed" | "error", "error": message | None}. A subscriber that joins late first receives the
stream's recent captions (bounded) and, if it ended, its end event.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from favor.prompt import CAPTION_PROMPT
from runtime.assembler import FrameSlot, Window, WindowAssembler
from runtime.scheduler import DeadlineScheduler
from runtime.sources import NETWORK_TIMEOUT_S, Capture, MediaSource, Ring
from runtime.stream import FRAME_HINT_WINDOWS, MAX_PENDING_WINDOWS, Caption, StreamingCaptioner

DEFAULT_PROMPT = CAPTION_PROMPT
# Events a subscriber may hold before the oldest is dropped: a client that stops reading must not
# grow the hub's memory (a few minutes of captions and their tokens at 8 streams).
SUBSCRIPTION_EVENTS = 4096
# Captions a late subscriber is replayed, and ended streams kept for hub.streams() / late subscribers.
REPLAY_CAPTIONS = 32
KEEP_ENDED_STREAMS = 64
# The worker re-checks its streams at least this often while idle (seconds): stop / remove latency.
IDLE_WAIT_S = 0.05
# close() waits this long per stream for its capture thread (a network read may block until its timeout;
# such a source is left to the daemon thread rather than holding up shutdown).
CLOSE_JOIN_S = 1.0


class Subscription:
    """A thread-safe, bounded event queue of one stream; iterate it (blocking) until the end event, or
    ``await sub.get_async()`` from an asyncio loop (never blocks the loop)."""

    def __init__(self, hub: StreamHub, sid: str, maxlen: int = SUBSCRIPTION_EVENTS):
        self.hub, self.stream = hub, sid
        self._items: collections.deque[dict] = collections.deque()
        self._maxlen = maxlen
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self.dropped = 0  # events lost because the subscriber did not keep up
        self.closed = False

    def put(self, event: dict) -> None:
        with self._cond:
            if self.closed:
                return
            if len(self._items) >= self._maxlen:
                self._items.popleft()
                self.dropped += 1
            self._items.append(event)
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_wake, fut)

    def get(self, timeout: float | None = None) -> dict | None:
        """The next event, or None on timeout / when closed with nothing left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items and not self.closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
            return self._items.popleft() if self._items else None

    async def get_async(self, timeout: float | None = None) -> dict | None:
        """``get`` for asyncio: waits on a future woken by the hub's thread, never on a thread."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            with self._cond:
                if self._items:
                    return self._items.popleft()
                if self.closed:
                    return None
                fut = loop.create_future()
                self._waiters.append((loop, fut))
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return None
            try:
                await asyncio.wait_for(fut, left)
            except TimeoutError:
                return None

    def __iter__(self):
        while True:
            event = self.get()
            if event is None:
                return
            yield event
            if event["type"] == "end":
                return

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_wake, fut)
        self.hub._unsubscribe(self)


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass
class _Stream:
    """One stream's capture side (rings filled by its capture thread) and worker side (pending windows,
    frame hints, scheduler, captioner state)."""

    id: str
    source: MediaSource
    spec: str
    name: str
    prompt: str
    realtime: bool
    scheduler: DeadlineScheduler
    captioner: StreamingCaptioner | None  # None until the worker first sees the stream
    stop: threading.Event
    windows: Ring
    frames: Ring
    capture: Capture
    pending: list[Window] = field(default_factory=list)
    hints: list[FrameSlot] = field(default_factory=list)
    settled: int = -1  # highest window index captioned or dropped
    state: str = "running"  # running | ended
    end_reason: str | None = None
    error: str | None = None
    in_flight: int = 0  # captions being decoded
    subscribers: list[Subscription] = field(default_factory=list)
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=REPLAY_CAPTIONS))
    end_event: dict | None = None
    max_pending_seen: int = 0
    added_at: float = field(default_factory=time.monotonic)
    # the worker's view of the rings this round (runtime/hub_worker.py)
    _new: list[Window] = field(default_factory=list)
    _overflow: list[Window] = field(default_factory=list)
    _finished: bool = False

    def info(self) -> dict:
        s = self.scheduler.stats
        return {"id": self.id, "source": self.spec, "name": self.name, "state": self.state,
                "realtime": self.realtime, "prompt": self.prompt, "captions": s.captions,
                "windows": s.windows, "dropped": s.dropped, "dropped_late": s.dropped_late,
                "dropped_overflow": s.dropped_overflow, "queue_depth": len(self.pending) + len(self.windows.items),
                "end_reason": self.end_reason, "error": self.error}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


class StreamHub:
    """One engine (a runtime.backends Backend, or an object with ``.backend``), one worker thread,
    up to ``max_streams`` live streams. See the module docstring."""

    def __init__(self, engine, *, max_streams: int = 8, max_latency: float | None = None, max_merge: int = 2,
                 max_new_tokens: int = 32, context: int = 1, prompt: str = DEFAULT_PROMPT,
                 batch: bool = True, timeout: float = NETWORK_TIMEOUT_S):
        if max_streams < 1:
            raise ValueError(f"max_streams ({max_streams}) must be >= 1")
        if max_latency is not None and not max_latency > 0:
            raise ValueError(f"max_latency ({max_latency}) must be > 0 seconds")
        if max_new_tokens < 1 or context < 0:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 1 and context ({context}) >= 0")
        self.backend = getattr(engine, "backend", engine)
        self.cfg = self.backend.cfg
        self.max_streams, self.max_latency, self.max_merge = max_streams, max_latency, max_merge
        self.max_new_tokens, self.context, self.prompt = max_new_tokens, context, prompt
        self.batch, self.timeout = batch, timeout  # timeout: seconds a source may stay silent
        self.cond = threading.Condition()  # every ring of every stream, the job queue, closing
        self.engine_lock = threading.Lock()  # held by the worker around engine calls (the one user)
        self.lock = threading.RLock()  # the stream table and event delivery
        self._streams: dict[str, _Stream] = {}
        self._ended: collections.OrderedDict[str, _Stream] = collections.OrderedDict()
        self._ids = itertools.count(1)
        self._jobs: collections.deque[tuple[Callable, Future]] = collections.deque()
        self._closing = threading.Event()
        self._instruction: str | None = None
        self.warm = False
        self.started = time.monotonic()
        self.steps = 0  # decode steps run
        self.batch_rows = 0  # sum of active rows over decode steps (mean batch = rows / steps)
        self._worker = threading.Thread(target=self._run, name="favor-hub", daemon=True)
        self._worker.start()

    # -- public API -------------------------------------------------------------------------------
    def add(self, source: str, *, audio: str | None = None, prompt: str | None = None, realtime: bool = True,
            name: str | None = None) -> str:
        """Open ``source`` and start capturing it; returns the stream id. ValueError (one line) when the
        source cannot be opened or the hub is full."""
        if self._closing.is_set():
            raise ValueError("the hub is closed")
        with self.lock:
            if len(self._streams) >= self.max_streams:
                raise ValueError(f"the hub is full ({self.max_streams} streams): remove one first")
        self._check_prompt(prompt or self.prompt)
        media = self._open(source, audio, realtime)
        try:
            s = self._make_stream(source, media, prompt or self.prompt, realtime, name)
        except BaseException:
            media.close()
            raise
        with self.lock:
            if len(self._streams) >= self.max_streams:  # filled meanwhile
                media.close()
                raise ValueError(f"the hub is full ({self.max_streams} streams): remove one first")
            self._streams[s.id] = s
        s.capture.start()
        with self.cond:
            self.cond.notify_all()
        return s.id

    def remove(self, sid: str) -> None:
        """Stop a stream now: its subscribers get {"type": "end", "reason": "removed"}; pending windows
        and an unfinished caption are dropped. KeyError on an unknown id."""
        with self.lock:
            s = self._streams.get(sid)
            if s is None:
                if self._ended.pop(sid, None) is not None:
                    return
                raise KeyError(sid)
            self._finish(s, "removed", None)
            self._ended.pop(sid, None)  # removed streams are forgotten
        with self.cond:
            self.cond.notify_all()

    def subscribe(self, sid: str) -> Subscription:
        """Events of stream ``sid`` from now on, after a replay of its recent captions (and its end
        event if it already ended). KeyError on an unknown id."""
        with self.lock:
            s = self._streams.get(sid) or self._ended.get(sid)
            if s is None:
                raise KeyError(sid)
            sub = Subscription(self, sid)
            for event in s.recent:
                sub.put(event)
            if s.end_event is not None:
                sub.put(s.end_event)
            else:
                s.subscribers.append(sub)
            return sub

    def ask(self, source: str, question: str, max_new_tokens: int = 48, *,
            on_token: Callable[[str], None] | None = None, timeout: float | None = None) -> str:
        """The answer to ``question`` about a whole clip (runtime/clip.py's glue, shared with the API).
        The clip is encoded on the worker between batches; its answer then decodes in the running
        decode batch beside the streams' captions. ``on_token(piece)`` gets each token's text as it is
        decided (called on the worker thread). ValueError (one line) for an unusable clip or question."""
        if not question or not question.strip():
            raise ValueError(f"{source}: the question is empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 1")
        answer: Future = self.call(lambda backend: self._server.ask(source, question, max_new_tokens, on_token),
                                   timeout=timeout)
        return answer.result(timeout)

    def call(self, fn: Callable, timeout: float | None = None):
        """Run ``fn(backend)`` on the worker thread between batches; returns its result (raises its error)."""
        if self._closing.is_set():
            raise ValueError("the hub is closed")
        fut: Future = Future()
        with self.cond:
            self._jobs.append((fn, fut))
            self.cond.notify_all()
        return fut.result(timeout)

    def streams(self) -> list[dict]:
        with self.lock:
            return [s.info() for s in [*self._streams.values(), *self._ended.values()]]

    def metrics(self) -> dict:
        """Per stream: latency p50 / p95 / max (seconds, window close -> caption), captions, drops by
        reason, queue depth; totals over every stream."""
        with self.lock:
            every = [*self._streams.values(), *self._ended.values()]
            per = {}
            for s in every:
                st, lat = s.scheduler.stats, s.scheduler.stats.latencies
                per[s.id] = {**s.info(), "latency_p50": percentile(lat, 50), "latency_p95": percentile(lat, 95),
                             "latency_max": max(lat) if lat else None,
                             "bound": s.scheduler.max_latency, "merged": st.merged}
            lat_all = [x for s in every for x in s.scheduler.stats.latencies]
        totals = {"streams": len(self._streams), "captions": sum(p["captions"] for p in per.values()),
                  "dropped_late": sum(p["dropped_late"] for p in per.values()),
                  "dropped_overflow": sum(p["dropped_overflow"] for p in per.values()),
                  "windows": sum(p["windows"] for p in per.values()),
                  "latency_p50": percentile(lat_all, 50), "latency_p95": percentile(lat_all, 95),
                  "decode_steps": self.steps,
                  "mean_decode_batch": self.batch_rows / self.steps if self.steps else None,
                  "uptime_s": time.monotonic() - self.started}
        return {"streams": per, "totals": totals}

    def close(self) -> None:
        """Stop every stream (end reason "removed"), then the worker."""
        if self._closing.is_set():
            return
        with self.lock:
            for s in list(self._streams.values()):
                self._finish(s, "removed", None)
        self._closing.set()
        with self.cond:
            self.cond.notify_all()
        self._worker.join()
        for s in list(self._ended.values()):  # sources the worker had no round left to close
            if s.source is not None:
                s.capture.join(CLOSE_JOIN_S)
                if not s.capture.is_alive():
                    s.source.close()
                    s.source = None
        while self._jobs:
            _, fut = self._jobs.popleft()
            fut.set_exception(ValueError("the hub is closed"))

    def __enter__(self) -> StreamHub:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- streams ----------------------------------------------------------------------------------
    def _check_prompt(self, prompt: str) -> None:
        """The longest LLM prompt this stream can build must fit the position table (runtime.api's
        check): refused at add, not discovered by the worker mid-stream."""
        from runtime.api import StreamOptions, check_prompt_fits

        check_prompt_fits(self.backend, StreamOptions(prompt=prompt, max_new_tokens=self.max_new_tokens,
                                                      context=self.context, max_merge=self.max_merge))

    def _open(self, spec: str, audio: str | None, realtime: bool) -> MediaSource:
        """runtime.sources.open_source when present (a separate live audio input, GStreamer), else the
        plain MediaSource (then a separate audio input is refused in one line)."""
        from runtime import sources

        sr = self.cfg.timing.sample_rate
        opener = getattr(sources, "open_source", None)
        if opener is not None:
            return opener(spec, sr, audio=audio, realtime=realtime, timeout=self.timeout)
        if audio is not None:
            raise ValueError(f"{audio}: a separate live audio input is not supported by runtime.sources here")
        return MediaSource(spec, sr, timeout=self.timeout)

    def _make_stream(self, spec: str, media: MediaSource, prompt: str, realtime: bool, name: str | None) -> _Stream:
        t = self.cfg.timing
        sid = f"s{next(self._ids)}"
        bound = (self.max_latency or t.window_seconds) if realtime else None
        scheduler = DeadlineScheduler(bound, self.max_merge, adaptive=self.max_latency is None)
        if self._baseline is not None:
            scheduler.calibrate(*self._baseline)
        captioner = None  # made by the worker (its set_instruction must not land mid-batch)
        stop = threading.Event()
        block = not realtime
        windows = Ring(MAX_PENDING_WINDOWS, self.cond, block)
        frames = Ring(FRAME_HINT_WINDOWS * t.frames_per_window, self.cond, block)
        assembler = WindowAssembler(t.video_fps, t.frames_per_window, t.sample_rate, media.video is not None,
                                    media.audio is not None, on_window=lambda w: windows.put(w, stop),
                                    on_frame=lambda f: frames.put(f, stop), origin=media.origin)
        capture = Capture(media, assembler.push, realtime and not media.live, stop, self.cond)
        capture.name = f"favor-capture-{sid}"
        return _Stream(sid, media, spec, name or spec, prompt, realtime, scheduler, captioner, stop, windows,
                       frames, capture)

    _baseline: tuple[float, float] | None = None  # (per-window, per-caption) seconds from the warm-up

    def _emit(self, s: _Stream, event: dict) -> None:
        with self.lock:
            if s.state != "running" and event["type"] != "end":
                return
            if event["type"] == "caption":
                s.recent.append(event)
            for sub in list(s.subscribers):
                sub.put(event)

    def _finish(self, s: _Stream, reason: str, error: str | None) -> None:
        """End ``s`` (under self.lock): stop its capture, send the end event, move it to the ended table."""
        if s.state != "running":
            return
        s.stop.set()
        event = {"type": "end", "stream": s.id, "reason": reason, "error": error}
        self._emit(s, event)
        s.state, s.end_reason, s.error, s.end_event = "ended", reason, error, event
        s.subscribers.clear()
        self._streams.pop(s.id, None)
        self._ended[s.id] = s
        while len(self._ended) > KEEP_ENDED_STREAMS:
            self._ended.popitem(last=False)

    def _unsubscribe(self, sub: Subscription) -> None:
        with self.lock:
            s = self._streams.get(sub.stream)
            if s is not None and sub in s.subscribers:
                s.subscribers.remove(sub)

    # -- the worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        from runtime.hub_worker import Worker

        worker = Worker(self)
        self._server = worker.server  # the worker thread's; hub.ask's job reaches it there
        worker.loop()


__all__ = ["StreamHub", "Subscription", "Caption"]
