"""StreamingCaptioner: capture thread -> window assembler -> scheduler -> one worker -> captions.

    capture thread   decode, pace files as live, assemble windows       (never waits for compute)
        | frame ring (hints: frames to pre-encode)   | window ring (closed windows, bounded)
    worker (caller's thread)
        idle:   encode each new frame's visual tokens (incremental; the ViT is the heavy stage)
        window: scheduler.plan -> drop / merge / take;
                encode audio (each window's chunk on its own), any frames still missing,
                fuse (sync -> window -> causal Q-Former -> projector), LLM greedy decode

Realtime vs offline differ only in pacing, ring policy (latest-wins vs back-pressure) and the
deadline; the maths per window is the same, frame by frame, so without drops both modes give the
same AV embeddings and captions bit for bit (tested).

Context: the LLM prompt carries the last ``context`` captions as earlier chat turns (favor.prompt's
release format), so captions read as a story; bounded, so the prompt does not grow with the stream.
The visual encoder's instruction stays the bare prompt, so frames can be encoded before a window
closes.

Notation: F frames per window, n frames in a window, Qv visual tokens per frame, Dv visual width,
Ta audio tokens, Nq queries per window, D LLM width, A AV tokens of a caption (k windows x Nq).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np
import torch

from favor.media import log_mel_spectrogram, preprocess_frames
from favor.prompt import stream_prompt
from runtime.assembler import FrameSlot, Window, WindowAssembler
from runtime.scheduler import DeadlineScheduler, SchedulerStats
from runtime.sources import Capture, MediaSource, Ring

STAGES = ("visual", "audio", "fusion", "llm_prefill", "llm_decode")
# Pending closed windows the worker may hold; older ones are evicted (latest wins) and counted.
MAX_PENDING_WINDOWS = 4
# Frame hints kept for pre-encoding: two windows' worth, so a busy worker loses hints, not memory.
FRAME_HINT_WINDOWS = 2


@dataclass
class Caption:
    index: int
    start: float  # seconds of stream time
    end: float
    text: str
    windows: list[int]  # window indices covered (more than one when merged)
    latency: float | None = None  # wall seconds from the (oldest) window's close to this caption
    llm_input_tokens: int = 0
    new_tokens: int = 0
    stages: dict[str, float] = field(default_factory=dict)  # seconds spent after the window closed
    visual_ahead: float = 0.0  # seconds of visual encoding done before the window closed
    embeds: torch.Tensor | None = None  # [A, D] the AV embeddings fed to the LLM

    def as_dict(self) -> dict:
        return {"index": self.index, "start": round(self.start, 3), "end": round(self.end, 3),
                "text": self.text, "windows": self.windows,
                "latency": None if self.latency is None else round(self.latency, 4),
                "llm_input_tokens": self.llm_input_tokens, "new_tokens": self.new_tokens,
                "stages": {k: round(v, 5) for k, v in self.stages.items()}}


class StreamingCaptioner:
    """Captions windows of one stream with a backend (see runtime.backends)."""

    def __init__(self, backend, prompt: str, max_new_tokens: int = 32, context: int = 1,
                 incremental: bool = True):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 1")
        if context < 0:
            raise ValueError(f"context ({context}) must be >= 0 previous captions")
        self.backend, self.cfg = backend, backend.cfg
        self.prompt, self.max_new_tokens, self.context = prompt, max_new_tokens, context
        self.incremental = incremental
        self.history: list[str] = []
        self.encoded: dict[int, torch.Tensor] = {}  # frame index -> [Qv, Dv]
        self.ahead_seconds: dict[int, float] = {}  # window index -> visual seconds spent early
        self.captions = 0
        # Called with each token id of a caption as the decoder decides it (the live view shows the
        # caption growing); files get only finished captions, through run()'s on_caption.
        self.on_token: Callable[[int], None] | None = None
        backend.set_instruction(prompt)
        t = self.cfg.timing
        # Whisper sees at most 30 s: longer windows are encoded in whole-frame chunks of <= 30 s.
        self.chunk_frames = math.floor(t.whisper_chunk_seconds * t.video_fps + 1e-9)
        if self.chunk_frames < 1:
            raise ValueError(f"fps ({t.video_fps}) too low: one frame spans more than Whisper's "
                             f"{t.whisper_chunk_seconds} s")

    # -- per-frame work ---------------------------------------------------------------------------
    def _encode_frame(self, index: int, rgb: np.ndarray) -> None:
        pixels = preprocess_frames(torch.from_numpy(rgb), self.cfg.visual.image_size)  # [1, 3, S, S]
        self.encoded[index] = self.backend.encode_frames(pixels)[0]  # [Qv, Dv]

    def on_frame(self, slot: FrameSlot) -> None:
        """Encode one frame ahead of its window's close (incremental mode)."""
        if not self.incremental or slot.index in self.encoded:
            return
        t0 = time.perf_counter()
        self._encode_frame(slot.index, slot.rgb)
        self.ahead_seconds[slot.window] = self.ahead_seconds.get(slot.window, 0.0) + time.perf_counter() - t0

    def forget_before(self, frame_index: int) -> None:
        for i in [i for i in self.encoded if i < frame_index]:
            del self.encoded[i]

    # -- per-window work --------------------------------------------------------------------------
    def _visual(self, w: Window) -> torch.Tensor | None:
        if w.frames is None:
            return None
        n_v = w.frames.shape[0]
        if self.incremental:  # frame by frame, exactly as ahead of time, so results never depend on timing
            for k in range(n_v):
                if w.first_frame + k not in self.encoded:
                    self._encode_frame(w.first_frame + k, w.frames[k])
            return torch.stack([self.encoded[w.first_frame + k] for k in range(n_v)])  # [n_v, Qv, Dv]
        pixels = preprocess_frames(torch.from_numpy(w.frames), self.cfg.visual.image_size)  # [n_v, 3, S, S]
        return self.backend.encode_frames(pixels)  # [n_v, Qv, Dv]

    def audio_mels(self, w: Window) -> list[torch.Tensor]:
        """The window's audio as log-mel chunks of whole frames, each within Whisper's 30 s: [M, Tm] each."""
        t = self.cfg.timing
        mels = []
        for f0 in range(0, w.num_frames, self.chunk_frames):
            a = round(f0 * t.sample_rate / t.video_fps)
            b = round(min(f0 + self.chunk_frames, w.num_frames) * t.sample_rate / t.video_fps)
            chunk = torch.from_numpy(w.audio[a:b])
            if chunk.shape[0] <= t.n_fft // 2:  # the centred STFT needs more than half a window
                chunk = torch.nn.functional.pad(chunk, (0, t.n_fft // 2 + 1 - chunk.shape[0]))
            mels.append(log_mel_spectrogram(chunk, self.cfg.audio.n_mels, t))  # [M, Tm]
        return mels

    def _audio(self, w: Window) -> torch.Tensor | None:
        if w.audio is None:
            return None
        return torch.cat([self.backend.encode_audio(mel) for mel in self.audio_mels(w)])  # [Ta, Da]

    def llm_prompt(self) -> str:
        return stream_prompt(self.prompt, self.history[-self.context:] if self.context else [])

    def caption(self, windows: list[Window]) -> Caption:
        """One caption for ``windows`` (consecutive; more than one when the scheduler merged)."""
        stages = dict.fromkeys(STAGES, 0.0)
        embeds = []
        for w in windows:
            t0 = time.perf_counter()
            visual = self._visual(w)
            t1 = time.perf_counter()
            audio = self._audio(w)
            t2 = time.perf_counter()
            embeds.append(self.backend.fuse(visual, audio, w.num_frames))  # [Nq, D]
            t3 = time.perf_counter()
            stages["visual"] += t1 - t0
            stages["audio"] += t2 - t1
            stages["fusion"] += t3 - t2
        av = torch.cat([torch.as_tensor(e) for e in embeds])  # [A, D]
        sink = self.on_token
        out = self.backend.caption(self.llm_prompt(), av, self.max_new_tokens,  # runtime.backends.Backend
                                   on_token=None if sink is None else lambda row, token: sink(token))
        return self.finish(windows, av, out, stages)

    def finish(self, windows: list[Window], av: torch.Tensor, out, stages: dict[str, float]) -> Caption:
        """The Caption of ``windows`` from the decoder's result ``out`` (favor.captions.CaptionResult):
        context history, frame bookkeeping, numbering (runtime/hub.py decodes in batches, then calls this)."""
        ids, n_in, text = out.tokens, out.prompt_tokens, out.text
        stages["llm_prefill"], stages["llm_decode"] = out.prefill_s, out.decode_s
        if self.context:
            self.history = (self.history + [text])[-self.context:]
        ahead = sum(self.ahead_seconds.pop(w.index, 0.0) for w in windows)
        self.forget_before(windows[-1].first_frame + windows[-1].num_frames)
        cap = Caption(self.captions, windows[0].start, windows[-1].end, text, [w.index for w in windows],
                      llm_input_tokens=n_in, new_tokens=len(ids), stages=stages,
                      visual_ahead=ahead, embeds=av)
        self.captions += 1
        return cap

    def warmup(self, scheduler: DeadlineScheduler, rounds: int = 3) -> None:
        """Caption a black, silent window ``rounds`` times, frames pre-encoded as in streaming, and
        give the scheduler the cheapest later round as its baseline cost (the first round pays
        one-off costs; the minimum is what the device does when nothing else interferes)."""
        t = self.cfg.timing
        F, S = t.frames_per_window, self.cfg.visual.image_size
        samples = round(F * t.sample_rate / t.video_fps)
        costs = []
        for _ in range(rounds):
            w = Window(-1, 0.0, t.window_seconds, -F, F, np.zeros((F, S, S, 3), np.uint8),
                       np.zeros(samples, np.float32), time.monotonic())
            self.encoded.clear()
            for k in range(F):
                self.on_frame(FrameSlot(-F + k, -1, w.frames[k]))
            t0 = time.perf_counter()
            cap = self.caption([w])
            work = sum(cap.stages[s] for s in ("visual", "audio", "fusion"))
            costs.append((work, time.perf_counter() - t0 - work))
        later = costs[1:] or costs
        scheduler.calibrate(min(c[0] for c in later), min(c[1] for c in later))
        self.history.clear()
        self.captions = 0
        self.encoded.clear()
        self.ahead_seconds.clear()

    # -- the stream loop --------------------------------------------------------------------------
    def run(self, source: MediaSource, realtime: bool, scheduler: DeadlineScheduler,
            on_caption: Callable[[Caption], None], stop: threading.Event | None = None,
            max_pending: int = MAX_PENDING_WINDOWS, before_first: Callable[[], None] | None = None
            ) -> StreamReport:
        """Caption ``source`` until it ends, fails (``report.error``) or ``stop`` is set.

        ``realtime``: files are paced by their timestamps, rings drop the oldest item when full,
        and ``scheduler`` enforces its deadline. Otherwise nothing is dropped and nothing waits.
        Runs the worker on the calling thread, so Ctrl-C lands here; the capture thread is always
        stopped and joined before returning or raising.

        ``before_first`` runs on this thread once capture has started (the realtime warm-up): the
        first window is being filmed meanwhile, so start-up costs overlap it instead of preceding it.
        """
        captions = self.iterate(source, realtime, scheduler, stop, max_pending, before_first)
        try:
            while True:
                try:
                    cap = next(captions)
                except StopIteration as done:
                    return done.value
                on_caption(cap)
        finally:
            captions.close()  # on_caption raised (an output failed) or Ctrl-C: capture stopped and joined

    def iterate(self, source: MediaSource, realtime: bool, scheduler: DeadlineScheduler,
                stop: threading.Event | None = None, max_pending: int = MAX_PENDING_WINDOWS,
                before_first: Callable[[], None] | None = None) -> Generator[Caption, None, StreamReport]:
        """``run`` as a generator: yields each caption as it is produced, returns the StreamReport.
        Closing it early (or an exception in the consumer) stops and joins the capture thread."""
        loop = _Loop(self, source, realtime, scheduler, stop or threading.Event(), max_pending)
        loop.capture.start()
        done: list[Caption] = []
        try:
            if before_first is not None:
                before_first()
            while loop.step(done.append):
                yield from done
                done.clear()
        finally:
            loop.stop.set()
            loop.capture.join()
            source.close()
        loop.report.error = loop.capture.error
        loop.report.skipped_packets = source.skipped_packets
        return loop.report


class _Loop:
    """One run's state: the rings the capture thread fills, the worker's pending windows and frame
    hints, and the bookkeeping of what was settled (captioned or dropped)."""

    def __init__(self, captioner: StreamingCaptioner, source: MediaSource, realtime: bool,
                 scheduler: DeadlineScheduler, stop: threading.Event, max_pending: int):
        t = captioner.cfg.timing
        self.captioner, self.scheduler, self.stop = captioner, scheduler, stop
        self.realtime, self.max_pending = realtime, max_pending
        self.cond = threading.Condition()
        block = not realtime
        self.windows = Ring(max_pending, self.cond, block)
        self.hint_cap = FRAME_HINT_WINDOWS * t.frames_per_window
        self.frames = Ring(self.hint_cap, self.cond, block)
        assembler = WindowAssembler(
            t.video_fps, t.frames_per_window, t.sample_rate, source.video is not None,
            source.audio is not None, on_window=lambda w: self.windows.put(w, stop),
            on_frame=(lambda s: self.frames.put(s, stop)) if captioner.incremental else None,
            origin=source.origin)
        self.capture = Capture(source, assembler.push, realtime and not source.live, stop, self.cond)
        self.report = StreamReport(scheduler.stats)
        self.pending: list[Window] = []
        self.hints: list[FrameSlot] = []
        self.settled = -1  # highest window index captioned or dropped: its frames need no pre-encoding

    def _gather(self) -> tuple[list[Window], list[Window], bool]:
        """Wait for work, then take it from the rings: (new windows, evicted windows, finished)."""
        with self.cond:
            while not (self.pending or self.hints or self.windows.items or self.frames.items
                       or self.capture.done.is_set()):
                self.cond.wait(0.1)
            # Offline: take from a ring only when the worker has nothing of that kind, so the
            # blocked ring back-pressures the decoder (memory stays bounded).
            new: list[Window] = []
            if self.realtime or not self.pending:
                new, self.windows.items = self.windows.items, []
            overflow, self.windows.dropped = self.windows.dropped, []
            if self.realtime or not self.hints:
                self.hints += self.frames.items
                self.frames.items = []
            self.frames.dropped.clear()
            self.cond.notify_all()
            finished = self.capture.done.is_set() and not self.windows.items and not self.frames.items
        return new, overflow, finished

    def _drop(self, windows: list[Window], overflow: bool) -> None:
        self.scheduler.record_drops(windows, overflow=overflow)
        self.report.dropped_windows += [w.index for w in windows]
        for w in windows:
            self.settled = max(self.settled, w.index)
            self.captioner.ahead_seconds.pop(w.index, None)
            if not overflow:
                self.captioner.forget_before(w.first_frame + w.num_frames)

    def _caption(self, take: list[Window], on_caption: Callable[[Caption], None]) -> None:
        self.settled = max(self.settled, take[-1].index)
        t0 = time.perf_counter()
        cap = self.captioner.caption(take)
        now = time.monotonic()
        window_work = sum(cap.stages[s] for s in ("visual", "audio", "fusion"))
        self.scheduler.observe(window_work, time.perf_counter() - t0 - window_work, len(take))
        cap.latency = self.scheduler.record_caption(take, now)
        on_caption(cap)

    def step(self, on_caption: Callable[[Caption], None]) -> bool:
        """One worker step: account for new and evicted windows, then caption or drop due windows,
        else pre-encode one frame. False when the stream is over and nothing is left."""
        new, overflow, finished = self._gather()
        self.scheduler.stats.windows += len(new) + len(overflow)
        self.pending += new
        if len(self.pending) > self.max_pending:  # latest wins: the worker's backlog is bounded too
            overflow += self.pending[:-self.max_pending]
            self.pending = self.pending[-self.max_pending:]
        del self.hints[:-self.hint_cap]
        self.report.max_pending = max(self.report.max_pending, len(self.pending))
        if overflow:
            self._drop(overflow, overflow=True)
        if self.pending:
            drop, take = self.scheduler.plan(self.pending, time.monotonic())
            self.pending = self.pending[len(drop) + len(take):]
            if drop:
                self._drop(drop, overflow=False)
            if take:
                self._caption(take, on_caption)
            return True
        if self.hints:  # idle: pre-encode one frame, then look for due windows again
            s = self.hints.pop(0)
            if s.window > self.settled:
                self.captioner.on_frame(s)
            return True
        return not finished


@dataclass
class StreamReport:
    stats: SchedulerStats
    error: BaseException | None = None
    dropped_windows: list[int] = field(default_factory=list)
    max_pending: int = 0
    skipped_packets: int = 0
