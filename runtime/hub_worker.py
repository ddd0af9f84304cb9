"""The StreamHub's one worker thread (runtime/hub.py): gather every stream's rings, plan with each
stream's scheduler, serve due windows oldest deadline first, pre-encode frames when idle.

    round:  jobs (hub.ask / hub.call) -> gather rings -> account new / overflow windows per stream
            -> end streams whose capture finished and whose work is done (eof / error)
            -> per stream scheduler.plan (late drops) -> due captions, oldest deadline first
            -> serve them (runtime/hub_batch.py: batched encoders + continuous-batched decode)
            -> idle: pre-encode frame hints of every stream
"""

from __future__ import annotations

import time

from runtime.assembler import Window
from runtime.hub import IDLE_WAIT_S, StreamHub, _Stream
from runtime.stream import Caption, StreamingCaptioner


class TokenText:
    """Token ids -> the text pieces a viewer sees appear (decoded as a whole and diffed, so multi-token
    characters and the tokenizer's spacing come out right)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for the next token
            return ""
        piece, self.text = text[len(self.text):], text
        return piece


class Worker:
    def __init__(self, hub: StreamHub):
        from runtime.hub_batch import BatchServer

        self.hub = hub
        self.server = BatchServer(hub, self)

    # -- one round ----------------------------------------------------------------------------------
    def loop(self) -> None:
        hub = self.hub
        if not hasattr(hub.backend, "model"):  # the stages run in ONNX Runtime / TensorRT, not torch
            # torch does only small work here (frame resizing, log-mel, the token step over [B, V]
            # logits); a 2-thread torch region beside ONNX Runtime's spinning workers measured ~50 ms
            # per decode step on a loaded 2-core machine, 0.5 ms on one thread.
            import torch

            torch.set_num_threads(1)
        while True:
            self._run_jobs()
            self._reap()
            if hub._closing.is_set():
                self.server.abort_all()
                break
            streams = self._gather()
            for s in streams:
                self._account(s)
            if hub._baseline is None and any(s.realtime for s in streams):
                with hub.engine_lock:  # while the first windows are being filmed, as favor-rt run does
                    self.server.warmup()
            due = self._plan(streams)
            hints = self._hints(streams)
            if due or hints or self.server.busy():
                try:
                    with hub.engine_lock:
                        if due:  # new captions join the running batch before its next step
                            self.server.start(due)
                        if self.server.busy():
                            self.server.step()
                        if hints:  # frames of open windows, so their windows close with little left to do
                            self.server.pre_encode(hints)
                except Exception as e:  # noqa: BLE001 - the engine failed: end what it touched, keep serving
                    self._engine_failed(e, [s for s, _ in due])
                continue
            self._wait()

    def _engine_failed(self, error: Exception, due: list[_Stream]) -> None:
        """An engine call raised (a bad input the checks missed, an engine fault): the streams whose
        windows or captions were in it end with an error event; the others go on; the decode batch
        starts empty."""
        hit = {id(s): s for s in [*due, *self.server.streams_in_flight()]}
        self.server.reset()
        message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        with self.hub.lock:
            for s in hit.values():
                s.in_flight = 0
                self.hub._finish(s, "error", message)

    def _run_jobs(self) -> None:
        hub = self.hub
        while hub._jobs:
            with hub.cond:
                if not hub._jobs:
                    break
                fn, fut = hub._jobs.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                with hub.engine_lock:
                    hub._instruction = None  # the job may set its own instruction
                    fut.set_result(fn(hub.backend))
            except BaseException as e:  # noqa: BLE001 - handed to the caller of hub.call
                fut.set_exception(e)

    def _reap(self) -> None:
        """Close the sources of ended streams once their capture thread has stopped."""
        with self.hub.lock:
            ended = [s for s in self.hub._ended.values() if s.source is not None]
        for s in ended:
            if not s.capture.is_alive():
                s.source.close()
                s.source = None
                self.server.forget(s)

    def _has_work(self, streams: list[_Stream]) -> bool:
        hub = self.hub
        return bool(hub._jobs or hub._closing.is_set() or self.server.busy() or any(
            s.pending or s.hints or s.windows.items or s.frames.items or s.windows.dropped
            or s.capture.done.is_set() for s in streams))

    def _wait(self) -> None:
        with self.hub.cond:
            if not self._has_work(self._running()):
                self.hub.cond.wait(IDLE_WAIT_S)

    def _running(self) -> list[_Stream]:
        with self.hub.lock:
            return list(self.hub._streams.values())

    def _gather(self) -> list[_Stream]:
        """Take what each stream's capture produced (offline: only when the worker has none of that
        kind, so a blocked ring back-pressures the capture)."""
        streams = self._running()
        hub = self.hub
        for s in [s for s in streams if s.captioner is None]:  # new: its state, made on the engine's thread
            try:
                s.captioner = StreamingCaptioner(hub.backend, s.prompt, hub.max_new_tokens, hub.context)
            except ValueError as e:  # the engine's timing cannot be captioned (checked per stream)
                with hub.lock:
                    hub._finish(s, "error", str(e))
                streams.remove(s)
                continue
            hub._instruction = s.prompt  # StreamingCaptioner set it
        with self.hub.cond:
            for s in streams:
                s._new = []
                if s.realtime or not s.pending:
                    s._new, s.windows.items = s.windows.items, []
                s._overflow, s.windows.dropped = s.windows.dropped, []
                if s.realtime or not s.hints:
                    s.hints += s.frames.items
                    s.frames.items = []
                s.frames.dropped.clear()
                s._finished = s.capture.done.is_set() and not s.windows.items and not s.frames.items
            self.hub.cond.notify_all()
        return streams

    def _account(self, s: _Stream) -> None:
        s.scheduler.stats.windows += len(s._new) + len(s._overflow)
        s.pending += s._new
        overflow = s._overflow
        if len(s.pending) > s.windows.maxlen:  # latest wins: the backlog is bounded too
            overflow += s.pending[:-s.windows.maxlen]
            s.pending = s.pending[-s.windows.maxlen:]
        del s.hints[:-s.frames.maxlen]
        s.max_pending_seen = max(s.max_pending_seen, len(s.pending))
        if overflow:
            self.drop(s, overflow, overflow=True)
        if s._finished and not s.pending and not s.in_flight:
            error = s.capture.error
            with self.hub.lock:
                if error is None:
                    self.hub._finish(s, "eof", None)
                else:
                    self.hub._finish(s, "error", str(error) or type(error).__name__)

    def _plan(self, streams: list[_Stream]) -> list[tuple[_Stream, list[Window]]]:
        """Each running stream's scheduler decides (late drops, merges); one caption per stream per
        round and none while the stream's previous caption is still decoding (captions of a stream
        stay in order and carry the previous one as context); oldest deadline first."""
        now = time.monotonic()
        due = []
        for s in streams:
            if s.state != "running" or not s.pending or s.in_flight:
                continue
            drop, take = s.scheduler.plan(s.pending, now)
            s.pending = s.pending[len(drop) + len(take):]
            if drop:
                self.drop(s, drop, overflow=False)
            if take:
                s.settled = max(s.settled, take[-1].index)
                due.append((s, take))
        due.sort(key=lambda st: st[1][0].closed_at)
        return due

    def drop(self, s: _Stream, windows: list[Window], overflow: bool) -> None:
        s.scheduler.record_drops(windows, overflow=overflow)
        for w in windows:
            s.settled = max(s.settled, w.index)
            s.captioner.ahead_seconds.pop(w.index, None)
            if not overflow:
                s.captioner.forget_before(w.first_frame + w.num_frames)

    def _hints(self, streams: list[_Stream]) -> list:
        """Frames of open windows to pre-encode (every stream's; the server batches them)."""
        work = []
        for s in streams:
            keep = [h for h in s.hints if h.window > s.settled and h.index not in s.captioner.encoded]
            s.hints = []
            if keep and s.state == "running":
                work.append((s, keep))
        return work

    # -- results ------------------------------------------------------------------------------------
    def deliver(self, s: _Stream, cap: Caption, windows: list[Window], window_work: float,
                caption_work: float) -> None:
        """A finished caption: scheduler accounting (costs as this stream saw them), latency, event."""
        s.scheduler.observe(window_work, caption_work, len(windows))
        cap.latency = s.scheduler.record_caption(windows, time.monotonic())
        self.hub._emit(s, {"type": "caption", "stream": s.id, **cap.as_dict()})

    def token(self, s: _Stream, piece: str) -> None:
        if piece:
            self.hub._emit(s, {"type": "token", "stream": s.id, "text": piece})
