"""Continuous batching of decode steps: requests join and leave one running batch between steps.

Each request is prefilled alone (batch 1: no padding, so every backend's prefill is the one the
single-request loop runs), its first token decided from the prefill logits, and its cache rows
joined to the running batch before the next step. Every step decodes all active rows at once; a row
whose request ended (EOS, its length limit, or cancelled) leaves the batch before the next step.

Token decisions are ``favor.captions.advance`` over one ``DecodeState`` per request, the same code
``greedy_decode`` runs, so a request decodes exactly as it would alone up to the numerical noise of
batched arithmetic (rows of different lengths are padded inside the backend's cache).

The ``Inference`` needs one call beyond favor.captions' three:

    merge(caches: list[cache]) -> cache     the rows of several caches as one batch; rows may hold
                                            different lengths (TorchInference left-pads,
                                            export.ort_decoder.GenaiInference keeps per-row lengths)
    reorder(cache, rows) -> cache           (as in beam search) keeps the rows that stay

Notation: B active rows, L prompt length, V vocab, D LLM width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from favor.captions import CaptionResult, DecodeState, advance


@dataclass
class Request:
    state: DecodeState
    tag: Any  # the caller's handle (returned with the finished result)
    prompt_tokens: int = 0
    cancelled: bool = False


class ContinuousBatch:
    """The running batch. ``join`` prefills a request (and decides its first token); ``step`` runs one
    decode step for every active row and returns the requests that finished (in any call)."""

    def __init__(self, inference, on_step: Callable[[int], None] | None = None):
        self.inference = inference
        self.cache = None  # the running batch's cache (None when empty)
        self.rows: list[Request] = []  # row b of ``cache``
        self.next_ids = torch.zeros(0, dtype=torch.long)  # [B] the ids to feed at the next step
        self.joining: list[tuple[Request, Any, int]] = []  # prefilled, joining before the next step
        self.finished: list[Request] = []
        self.on_step = on_step  # called with the batch size of each decode step (metrics)

    @property
    def active(self) -> int:
        return len(self.rows) + len(self.joining)

    def join(self, embeds: torch.Tensor, attention_mask: torch.Tensor, state: DecodeState, tag: Any = None
             ) -> Request:
        """Prefill one request (embeds [1, L, D], attention_mask [1, L]) and decide its first token."""
        req = Request(state, tag, int(torch.as_tensor(attention_mask).sum()))
        logits, cache = self.inference.prefill(embeds, attention_mask)
        ids = advance(logits, [state])
        if state.done:
            self.finished.append(req)
        else:
            self.joining.append((req, cache, int(ids[0])))
        return req

    def cancel(self, tag: Any) -> None:
        """Requests with ``tag`` stop now: they leave at the next step and are not returned."""
        for req in [*self.rows, *(j[0] for j in self.joining)]:
            if req.tag is tag or req.tag == tag:
                req.cancelled = True
                req.state.done = True

    def _admit(self) -> None:
        joining = [j for j in self.joining if not j[0].cancelled]
        self.joining = []
        if not joining:
            return
        caches = ([self.cache] if self.rows else []) + [c for _, c, _ in joining]
        self.cache = caches[0] if len(caches) == 1 else self.inference.merge(caches)
        self.rows += [r for r, _, _ in joining]
        self.next_ids = torch.cat([self.next_ids[: len(self.rows) - len(joining)],
                                   torch.tensor([i for _, _, i in joining], dtype=torch.long)])

    def _leave(self) -> None:
        keep = [b for b, r in enumerate(self.rows) if not r.state.done]
        if len(keep) == len(self.rows):
            return
        self.finished += [r for r in self.rows if r.state.done and not r.cancelled]
        self.rows = [self.rows[b] for b in keep]
        if not keep:
            self.cache, self.next_ids = None, torch.zeros(0, dtype=torch.long)
            return
        rows = torch.tensor(keep, dtype=torch.long)
        self.cache = self.inference.reorder(self.cache, rows)
        self.next_ids = self.next_ids[rows]

    def step(self) -> list[Request]:
        """Admit joining requests, run one decode step over every active row, let finished rows leave.
        Returns every request finished since the last call (including those done at their prefill)."""
        self._leave()  # cancelled rows go before paying for a step
        self._admit()
        if self.rows:
            logits, self.cache = self.inference.decode(self.next_ids, self.cache)
            if self.on_step is not None:
                self.on_step(len(self.rows))
            self.next_ids = advance(logits, [r.state for r in self.rows])
            self._leave()
        out, self.finished = self.finished, []
        return out


def run_alone(inference, embeds: torch.Tensor, attention_mask: torch.Tensor, state: DecodeState) -> CaptionResult:
    """One request through a ContinuousBatch of its own (the reference the batched runs are tested
    against: it must equal ``greedy_decode``)."""
    batch = ContinuousBatch(inference)
    batch.join(embeds, attention_mask, state)
    while batch.active or batch.finished:
        if batch.step():
            break
    return state.result
