"""Deadline scheduler: keep end-of-window-to-caption latency under a bound by dropping or merging.

A window that closed at wall time c must be captioned by c + max_latency. The worker asks
``plan(pending, now)`` before each step; the scheduler

1. drops every pending window that cannot make its deadline even alone (now + cost(1) > deadline);
2. merges the oldest k <= max_merge pending windows into one caption when it is behind (one by one
   would miss a later deadline, or one caption costs more than a window lasts) and together they
   fit the oldest deadline: encoders scale with k, the LLM runs once;
3. otherwise takes the oldest window alone (no merge when keeping up, so captions match offline).

Costs are learnt from measurements: per-window work (audio + remaining visual encoding + fusion) and
per-caption work (LLM prefill + decode), each the maximum of the last few observations times a safety
factor, so one fast step never talks the scheduler into a late caption. Observations expire after
``COST_MEMORY_S``; with none left the estimate falls back to the warm-up baseline (the cost measured
before the stream started), so one slow outlier cannot keep the scheduler dropping forever. Every
drop is counted by reason; the pending queue itself is bounded (overflow drops counted by the worker).

``max_latency=None`` (offline) disables dropping and merging: every window is captioned in order.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from runtime.assembler import Window

# How many recent measurements the cost estimate remembers (a few windows: adapts within seconds
# when load changes, yet one outlier does not vanish immediately).
COST_HISTORY = 8
# Estimates are inflated by this factor: timing jitter on a busy CPU is ~10 %.
COST_SAFETY = 1.15
# Seconds an observation counts for: long enough to span several captions, short enough that a
# stall (another process hogging the CPU) is forgotten soon after it ends.
COST_MEMORY_S = 10.0


@dataclass
class SchedulerStats:
    windows: int = 0  # windows that reached the scheduler (or were evicted before it)
    captioned: int = 0  # windows that contributed to a caption
    captions: int = 0
    merged: int = 0  # windows captioned together with an earlier one
    dropped_late: int = 0  # could not make the deadline
    dropped_overflow: int = 0  # evicted from the full pending ring (latest wins)
    latencies: list[float] = field(default_factory=list)  # per caption: caption time - oldest close
    raised_bound: float | None = None  # the default bound, raised to what the device needs (seconds)

    @property
    def dropped(self) -> int:
        return self.dropped_late + self.dropped_overflow

    def as_dict(self) -> dict:
        return {"windows": self.windows, "captioned": self.captioned, "captions": self.captions,
                "merged": self.merged, "dropped_late": self.dropped_late,
                "dropped_overflow": self.dropped_overflow, "dropped": self.dropped}


class DeadlineScheduler:
    """``adaptive``: ``max_latency`` is a default, not the user's word. When the estimated cost of one
    window alone exceeds it (no window could ever make its deadline: a slow or loaded device), it is
    raised to that cost plus one window of queueing, so captions keep coming at a lower rate instead
    of none. A bound the user set is never raised."""

    def __init__(self, max_latency: float | None, max_merge: int = 2, adaptive: bool = False):
        if max_latency is not None and not max_latency > 0:
            raise ValueError(f"max_latency ({max_latency}) must be > 0 seconds or None")
        if max_merge < 1:
            raise ValueError(f"max_merge ({max_merge}) must be >= 1")
        self.max_latency, self.max_merge, self.adaptive = max_latency, max_merge, adaptive
        self.history: deque[tuple[float, float, float]] = deque(maxlen=COST_HISTORY)  # (t, window, caption)
        self.baseline: tuple[float, float] | None = None
        self.stats = SchedulerStats()

    # -- costs ------------------------------------------------------------------------------------
    def calibrate(self, window_seconds: float, caption_seconds: float) -> None:
        """The warm-up measurement (one window, one caption): the estimate when nothing is recent."""
        self.baseline = (window_seconds, caption_seconds)

    def observe(self, window_seconds: float, caption_seconds: float, num_windows: int,
                now: float | None = None) -> None:
        """Record one step: ``window_seconds`` of per-window work over ``num_windows`` windows, and
        ``caption_seconds`` of LLM work."""
        now = time.monotonic() if now is None else now
        self.history.append((now, window_seconds / max(num_windows, 1), caption_seconds))

    def cost(self, k: int, now: float | None = None) -> float:
        """Estimated seconds to caption k merged windows (0 until something was measured)."""
        now = time.monotonic() if now is None else now
        recent = [(w, c) for t, w, c in self.history if now - t <= COST_MEMORY_S]
        if recent:
            w, c = max(r[0] for r in recent), max(r[1] for r in recent)
        elif self.baseline is not None:
            w, c = self.baseline
        elif self.history:
            w, c = self.history[-1][1:]
        else:
            w = c = 0.0
        return COST_SAFETY * (k * w + c)

    def deadline(self, window: Window) -> float:
        return window.closed_at + self.max_latency

    # -- decisions --------------------------------------------------------------------------------
    def plan(self, pending: list[Window], now: float) -> tuple[list[Window], list[Window]]:
        """(windows to drop, windows to caption together now); both taken from the front of
        ``pending`` (oldest first). The rest stays pending."""
        if not pending:
            return [], []
        if self.max_latency is None:
            return [], pending[:1]
        self._adapt(pending[0], now)
        drop: list[Window] = []
        i = 0
        while i < len(pending) and now + self.cost(1, now) > self.deadline(pending[i]):
            drop.append(pending[i])
            i += 1
        rest = pending[i:]
        if not rest:
            return drop, []
        take = 1
        # A device slower than real time (one caption costs more than a window lasts) can only
        # fall further behind one window at a time: merging shares the LLM cost across windows.
        slower_than_real_time = self.cost(1, now) > rest[0].end - rest[0].start
        while take < min(self.max_merge, len(rest)):
            behind = now + self.cost(take, now) + self.cost(1, now) > self.deadline(rest[take])
            fits = now + self.cost(take + 1, now) <= self.deadline(rest[0])
            if not ((behind or slower_than_real_time) and fits):
                break
            take += 1
        return drop, rest[:take]

    def _adapt(self, window: Window, now: float) -> None:
        one = self.cost(1, now)
        if self.adaptive and one > self.max_latency:
            self.max_latency = one + (window.end - window.start)
            self.stats.raised_bound = self.max_latency

    def record_drops(self, windows: list[Window], overflow: bool) -> None:
        if overflow:
            self.stats.dropped_overflow += len(windows)
            return
        self.stats.dropped_late += len(windows)

    def record_caption(self, windows: list[Window], now: float) -> float:
        """Count a caption of ``windows``; returns its latency, measured from the close of the oldest
        window it covers (the one that waited longest)."""
        latency = now - windows[0].closed_at
        self.stats.captions += 1
        self.stats.captioned += len(windows)
        self.stats.merged += len(windows) - 1
        self.stats.latencies.append(latency)
        return latency
