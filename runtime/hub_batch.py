"""What the StreamHub's worker does with due windows: encoders, fusion and decoding across streams.

First version: each due caption through its stream's StreamingCaptioner in turn (oldest deadline
first), tokens streamed as events.
"""

from __future__ import annotations

import time

from runtime.assembler import Window
from runtime.stream import StreamingCaptioner

WARMUP_ROUNDS = 2  # as favor-rt run: the first pays one-off costs, the second is the measurement


class BatchServer:
    def __init__(self, hub, worker):
        self.hub, self.worker = hub, worker
        self.backend = hub.backend

    def _instruction(self, prompt: str) -> None:
        if self.hub._instruction != prompt:
            self.backend.set_instruction(prompt)
            self.hub._instruction = prompt

    def busy(self) -> bool:
        return False

    def abort_all(self) -> None:
        pass

    def forget(self, s) -> None:
        pass

    def warmup(self) -> None:
        """One black, silent window captioned WARMUP_ROUNDS times: the baseline cost every realtime
        stream's scheduler starts from."""
        from runtime.scheduler import DeadlineScheduler

        cap = StreamingCaptioner(self.backend, self.hub.prompt, self.hub.max_new_tokens, self.hub.context)
        self.hub._instruction = self.hub.prompt
        probe = DeadlineScheduler(1.0)
        cap.warmup(probe, rounds=WARMUP_ROUNDS)
        self.hub._baseline = probe.baseline
        with self.hub.lock:
            for s in self.hub._streams.values():
                if s.scheduler.baseline is None:
                    s.scheduler.calibrate(*probe.baseline)

    def pre_encode(self, work) -> None:
        for s, slots in work:
            self._instruction(s.prompt)
            for slot in slots:
                s.captioner.on_frame(slot)

    def serve(self, due: list[tuple[object, list[Window]]]) -> None:
        if self.hub._baseline is None and any(s.realtime for s, _ in due):
            self.warmup()
        for s, windows in due:
            self._instruction(s.prompt)
            text = self.worker_text(s)
            s.captioner.on_token = lambda token, s=s, text=text: self.worker.token(s, text.push(token))
            s.in_flight += 1
            t0 = time.perf_counter()
            try:
                cap = s.captioner.caption(windows)
            finally:
                s.in_flight -= 1
                s.captioner.on_token = None
            work = sum(cap.stages[k] for k in ("visual", "audio", "fusion"))
            self.worker.deliver(s, cap, windows, work, time.perf_counter() - t0 - work)

    def worker_text(self, s):
        from runtime.hub_worker import TokenText

        return TokenText(self.backend.tokenizer)
