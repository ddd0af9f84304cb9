"""What the StreamHub's worker does with due windows: encoders and fusion batched across streams, then
continuous batching of the decode steps.

    start(due)     windows due from several streams, in one pass:
                   visual   every frame not encoded yet, of every stream with the same prompt, in ONE
                            visual-encoder call (frames are independent: the graph's frame axis is the
                            batch; no batch axis needed)
                   audio    each window's log-mel chunks; chunks of equal length in one call on the
                            batch axis (ONNX graphs exported with --max-batch >= 2; else one call each)
                   fusion   windows of equal shapes in one call on the batch axis (same rule)
                   prefill  each caption alone (batch 1), its first token decided, then it JOINS the
                            running decode batch (favor/continuous.py)
    step()         one decode step for every running caption; finished ones leave and are delivered
    pre_encode()   idle frames of open windows, every stream's in one visual call

Decoders without ``merge`` (the plain ONNX decoder, TensorRT-LLM's own loop) caption one at a time
through ``Backend.caption`` (still after the batched encoders). ``batch_limits`` reads what each
graph accepts: a bundle's manifest ``dynamic_axes`` (batch, frames); eager PyTorch takes any batch.

Notation: B rows of a call, n frames, M mel bins, Tm mel frames, Ta audio tokens, Nq queries, D width.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from favor import captions
from favor.captions import GREEDY, CaptionResult, DecodeState
from favor.continuous import ContinuousBatch
from favor.media import preprocess_frames
from runtime.assembler import FrameSlot, Window
from runtime.stream import STAGES, StreamingCaptioner

WARMUP_ROUNDS = 2  # as favor-rt run: the first pays one-off costs, the second is the measurement
# Eager PyTorch takes any batch; this caps one call's rows so a burst cannot allocate without bound.
TORCH_MAX_BATCH = 16
TORCH_MAX_FRAMES = 64


@dataclass
class Limits:
    audio: int  # rows per audio-encoder call
    fusion: int  # rows per fusion call
    frames: int  # frames per visual-encoder call


def batch_limits(backend) -> Limits:
    """What one call of each stage accepts: a bundle's exported axes, eager PyTorch's cap, else 1."""
    manifest = getattr(backend, "manifest", None)
    if manifest is not None and hasattr(backend, "run"):
        axes = manifest.get("dynamic_axes", {})
        rows = int(axes.get("batch", {}).get("max", 1))
        return Limits(rows, rows, int(axes.get("frames", {}).get("max", 1)))
    if hasattr(backend, "model") and hasattr(backend.model, "encode_audio"):
        return Limits(TORCH_MAX_BATCH, TORCH_MAX_BATCH, TORCH_MAX_FRAMES)
    return Limits(1, 1, 1)


def _chunks(items: list, n: int) -> list[list]:
    return [items[i: i + n] for i in range(0, len(items), max(n, 1))]


def encode_audio_rows(backend, mels: list[torch.Tensor], limit: int) -> list[torch.Tensor]:
    """mels: equal-shaped [M, Tm] -> audio tokens [Ta, Da] each, ``limit`` rows per call."""
    if limit <= 1:
        return [backend.encode_audio(m) for m in mels]
    out = []
    for part in _chunks(mels, limit):
        x = torch.stack(part)  # [B, M, Tm]
        if hasattr(backend, "run"):
            y = backend.run("audio_encoder", {"mel": x.float()})["audio_tokens"].float()
        else:
            with torch.inference_mode():
                y = backend.model.encode_audio(x)
        out += list(y)  # [Ta, Da] each
    return out


def fuse_rows(backend, visual: list[torch.Tensor] | None, audio: list[torch.Tensor] | None, num_frames: int,
              limit: int) -> list[torch.Tensor]:
    """Windows of equal shapes (visual [n_v, Qv, Dv] each or None, audio [Ta, Da] each or None) ->
    AV embeddings [Nq, D] each, ``limit`` rows per call."""
    n = len(visual if visual is not None else audio)
    if limit <= 1:
        return [backend.fuse(None if visual is None else visual[i], None if audio is None else audio[i], num_frames)
                for i in range(n)]
    out = []
    for rows in _chunks(list(range(n)), limit):
        v = None if visual is None else torch.stack([visual[i] for i in rows])  # [B, n_v, Qv, Dv]
        a = None if audio is None else torch.stack([audio[i] for i in rows])  # [B, Ta, Da]
        if hasattr(backend, "run"):
            from export.frontend import fusion_feed

            res = backend.run("fusion", fusion_feed(backend.cfg, v, a, num_frames=num_frames))
            out += [res["av_embeds"][b][res["av_mask"][b].bool()].float() for b in range(len(rows))]
        else:
            with torch.inference_mode():
                out += list(backend.model.fuse(v, a, num_frames=num_frames).embeds)  # [Nq, D] each
    return out


@dataclass
class _Ask:
    """hub.ask's answer in the decode batch: its future, token sink and timings."""

    answer: Future
    on_token: object = None
    t_llm: float = 0.0
    prefill_s: float = 0.0


@dataclass
class _Job:
    """One caption in progress: its stream, windows, AV rows, timings, and the streamed text."""

    stream: object
    windows: list[Window]
    av: torch.Tensor | None = None  # [A, D]
    stages: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    window_work: float = 0.0  # seconds of the encoder pass this caption waited for
    t_llm: float = 0.0  # perf_counter when its prefill started
    prefill_s: float = 0.0
    text: object = None  # TokenText
    cancelled: bool = False


class BatchServer:
    def __init__(self, hub, worker):
        self.hub, self.worker = hub, worker
        self.backend = hub.backend
        self.cfg = self.backend.cfg
        self.limits = batch_limits(self.backend) if hub.batch else Limits(1, 1, 1)
        self.batch = self._continuous() if hub.batch else None
        self.running: list[_Job] = []
        self.asks: list[_Ask] = []

    def _continuous(self) -> ContinuousBatch | None:
        """A ContinuousBatch over the backend's step-wise decoder, if it can merge caches and the backend
        decodes through the shared loop (TensorRT-LLM keeps its own)."""
        from runtime.backends import StepwiseCaptioner

        if not isinstance(self.backend, StepwiseCaptioner) or \
                type(self.backend).caption is not StepwiseCaptioner.caption:
            return None
        inference = self.backend.inference()
        if not hasattr(inference, "merge"):
            return None
        return ContinuousBatch(inference, on_step=self._stepped)

    def _stepped(self, rows: int) -> None:
        self.hub.steps += 1
        self.hub.batch_rows += rows

    def _instruction(self, prompt: str) -> None:
        if self.hub._instruction != prompt:
            self.backend.set_instruction(prompt)
            self.hub._instruction = prompt

    def busy(self) -> bool:
        return bool(self.running or self.asks)

    def abort_all(self) -> None:
        for job in list(self.running):
            self._cancel(job)
        for ask in self.asks:
            ask.answer.set_exception(ValueError("the hub is closed"))
        self.asks = []

    def forget(self, s) -> None:
        for job in [j for j in self.running if j.stream is s]:
            self._cancel(job)

    def streams_in_flight(self) -> list:
        return [j.stream for j in self.running]

    def reset(self) -> None:
        """After an engine failure: no caption or answer in progress, a fresh decode batch."""
        for ask in self.asks:
            ask.answer.set_exception(RuntimeError("the engine failed while this answer was decoding"))
        self.asks, self.running = [], []
        if self.batch is not None:
            self.batch = ContinuousBatch(self.batch.inference, on_step=self._stepped)

    def _cancel(self, job: _Job) -> None:
        if job.cancelled:
            return
        job.cancelled = True
        if self.batch is not None:
            self.batch.cancel(job)
        self.running.remove(job)
        job.stream.in_flight -= 1

    # -- warm-up ------------------------------------------------------------------------------------
    def warmup(self) -> None:
        """One black, silent window captioned WARMUP_ROUNDS times: the baseline cost each realtime
        stream's scheduler starts from (then refined by what it observes in the hub)."""
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

    # -- frames ---------------------------------------------------------------------------------------
    def _encode_slots(self, items: list[tuple[object, FrameSlot]]) -> float:
        """Encode frame slots of several streams (grouped by prompt, the visual Q-Former's instruction)
        into each stream's ``captioner.encoded``; returns the seconds spent."""
        t0 = time.perf_counter()
        S = self.cfg.visual.image_size
        by_prompt: dict[str, list[tuple[object, FrameSlot]]] = {}
        for s, slot in items:
            by_prompt.setdefault(s.prompt, []).append((s, slot))
        for prompt, group in by_prompt.items():
            self._instruction(prompt)
            for part in _chunks(group, self.limits.frames):
                pixels = torch.cat([preprocess_frames(torch.from_numpy(slot.rgb), S) for _, slot in part])
                tokens = self.backend.encode_frames(pixels)  # [n, Qv, Dv]
                for (s, slot), tok in zip(part, tokens, strict=True):
                    s.captioner.encoded[slot.index] = tok
        return time.perf_counter() - t0

    def pre_encode(self, work: list[tuple[object, list[FrameSlot]]]) -> None:
        items = [(s, slot) for s, slots in work for slot in slots]
        seconds = self._encode_slots(items)
        for s, slot in items:  # the share of the call each frame's window is credited with
            s.captioner.ahead_seconds[slot.window] = s.captioner.ahead_seconds.get(slot.window, 0.0) + \
                seconds / len(items)

    # -- due windows --------------------------------------------------------------------------------
    def start(self, due: list[tuple[object, list[Window]]]) -> None:
        """Encode and fuse every due window (batched across streams), then prefill each caption and
        join it to the decode batch (or caption it alone when the decoder cannot batch)."""
        jobs = [_Job(s, windows) for s, windows in due]
        t0 = time.perf_counter()
        visual = self._visual(jobs)
        t1 = time.perf_counter()
        audio = self._audio(jobs)
        t2 = time.perf_counter()
        self._fuse(jobs, visual, audio)
        t3 = time.perf_counter()
        for job in jobs:
            job.stages.update(visual=t1 - t0, audio=t2 - t1, fusion=t3 - t2)
            job.window_work = t3 - t0
            job.stream.in_flight += 1
            self.running.append(job)
            self._decode_start(job)

    def _visual(self, jobs: list[_Job]) -> dict[tuple[int, int], torch.Tensor | None]:
        missing = [(j.stream, FrameSlot(w.first_frame + k, w.index, w.frames[k]))
                   for j in jobs for w in j.windows if w.frames is not None
                   for k in range(w.frames.shape[0]) if w.first_frame + k not in j.stream.captioner.encoded]
        if missing:
            self._encode_slots(missing)
        return {(id(j), w.index): j.stream.captioner._visual(w) for j in jobs for w in j.windows}

    def _audio(self, jobs: list[_Job]) -> dict[tuple[int, int], torch.Tensor | None]:
        mels = {(id(j), w.index): j.stream.captioner.audio_mels(w) if w.audio is not None else None
                for j in jobs for w in j.windows}
        flat = [(key, i, m) for key, ms in mels.items() if ms is not None for i, m in enumerate(ms)]
        by_shape: dict[tuple, list] = {}
        for item in flat:
            by_shape.setdefault(tuple(item[2].shape), []).append(item)
        encoded: dict[tuple, torch.Tensor] = {}
        for group in by_shape.values():
            for (key, i, _), tok in zip(group, encode_audio_rows(self.backend, [m for _, _, m in group],
                                                                 self.limits.audio), strict=True):
                encoded[(key, i)] = tok
        return {key: None if ms is None else torch.cat([encoded[(key, i)] for i in range(len(ms))])
                for key, ms in mels.items()}  # [Ta, Da]

    def _fuse(self, jobs: list[_Job], visual: dict, audio: dict) -> None:
        groups: dict[tuple, list[tuple[int, int]]] = {}
        windows = {(id(j), w.index): w for j in jobs for w in j.windows}
        for key, w in windows.items():
            v, a = visual[key], audio[key]
            shape = (None if v is None else tuple(v.shape), None if a is None else tuple(a.shape), w.num_frames)
            groups.setdefault(shape, []).append(key)
        fused = {}
        for (vs, as_, n), keys in groups.items():
            out = fuse_rows(self.backend, None if vs is None else [visual[k] for k in keys],
                            None if as_ is None else [audio[k] for k in keys], n, self.limits.fusion)
            fused.update(zip(keys, out, strict=True))
        for j in jobs:
            j.av = torch.cat([torch.as_tensor(fused[(id(j), w.index)]) for w in j.windows])  # [A, D]

    # -- decoding -----------------------------------------------------------------------------------
    def _decode_start(self, job: _Job) -> None:
        from runtime.hub_worker import TokenText

        s, b = job.stream, self.backend
        job.text = TokenText(b.tokenizer)

        def on_token(token: int, s=s, text=job.text) -> None:
            self.worker.token(s, text.push(token))

        prompt = s.captioner.llm_prompt()
        job.t_llm = time.perf_counter()
        if self.batch is None:  # one at a time: the backend's own caption (TensorRT-LLM, plain ONNX)
            out = b.caption(prompt, job.av, self.hub.max_new_tokens, on_token=lambda row, t: on_token(t))
            self._deliver(job, out)
            return
        embeds, mask = captions.prompt_inputs(b.embedding, b.tokenizer, self.cfg.llm, [prompt], job.av[None],
                                              torch.ones(1, job.av.shape[0], dtype=torch.bool))
        state = DecodeState(self.cfg.llm.eos_token_id, self.hub.max_new_tokens, GREEDY, None, on_token)
        self.batch.join(embeds, mask, state, tag=job)
        job.prefill_s = time.perf_counter() - job.t_llm

    def ask(self, source: str, question: str, max_new_tokens: int, on_token) -> Future:
        """A whole-clip question: encode the clip now (runtime/clip.py), decode its answer in the running
        batch (or alone when the decoder cannot batch). Returns the answer's future."""
        from runtime.clip import clip_embeddings, load_clip
        from runtime.hub_worker import TokenText

        b = self.backend
        clip = load_clip(Path(source), self.cfg)
        with torch.inference_mode():
            av = clip_embeddings(b, clip, question)  # [A, D]
        self.hub._instruction = None  # the question was the visual instruction meanwhile
        ask = _Ask(Future(), on_token, time.perf_counter())
        text = TokenText(b.tokenizer)

        def sink(token: int) -> None:
            piece = text.push(token)
            if on_token is not None:
                on_token(piece)

        if self.batch is None:
            ask.answer.set_result(b.caption(question, av, max_new_tokens, on_token=lambda row, t: sink(t)).text)
            return ask.answer
        embeds, mask = captions.prompt_inputs(b.embedding, b.tokenizer, self.cfg.llm, [question], av[None],
                                              torch.ones(1, av.shape[0], dtype=torch.bool))
        self.batch.join(embeds, mask, DecodeState(self.cfg.llm.eos_token_id, max_new_tokens, GREEDY, None, sink),
                        tag=ask)
        self.asks.append(ask)
        return ask.answer

    def step(self) -> None:
        """One decode step of the running batch; deliver what finished."""
        for job in [j for j in self.running if j.stream.state != "running"]:
            self._cancel(job)
        if self.batch is None:
            return
        for req in self.batch.step():
            result = req.state.result
            result.prompt_tokens = req.prompt_tokens
            captions.decode_text([result], self.backend.tokenizer)
            if isinstance(req.tag, _Ask):
                self.asks.remove(req.tag)
                req.tag.answer.set_result(result.text)
                continue
            result.prefill_s = req.tag.prefill_s
            result.decode_s = time.perf_counter() - req.tag.t_llm - req.tag.prefill_s
            self._deliver(req.tag, result)

    def _deliver(self, job: _Job, out: CaptionResult) -> None:
        if job.cancelled:
            return
        self.running.remove(job)
        s = job.stream
        s.in_flight -= 1
        cap = s.captioner.finish(job.windows, job.av, out, job.stages)
        self.worker.deliver(s, cap, job.windows, job.window_work, time.perf_counter() - job.t_llm)
