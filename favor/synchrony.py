"""Synchrony: the fused tokens should know whether the soundtrack belongs to the picture.

A demo-only auxiliary objective (``FavorConfig.sync_loss_weight``; the release has none). AV matching stayed
at chance in every demo model, while a linear probe of the causal Q-Former's outputs told a clip's own
soundtrack from another clip's 70 % of the time (benchmarks/RESULTS.md 1e): the information is weakly in the
fused tokens, and one yes/no answer token every few hundred samples is too faint a signal to strengthen it.
This objective gives the fusion stages that signal directly, on every sample whose picture and soundtrack
are one recording's: the sample is fused twice, with its own audio and with another sample's in the same
batch (a different recording, whole, at its own length -- what an AV-matching negative is), and a linear
head on the pooled projected tokens (what the LLM reads) tells the two apart.

Why not the clip's own audio rotated in time (same sounds, wrong moments)? Rotating the cached Whisper
features also rotates the positions Whisper encoded into them, so a rotated soundtrack is told apart without
looking at the picture: the head learnt it within 50 steps and judged other clips' soundtracks no better
than chance (benchmarks/RESULTS.md 1f).

    pooled[b] = [mean_w, max_w] over valid windows of (mean over the window's Nq tokens)     [2D]
    loss = BCE(head(pooled(own)), 1) / 2 + BCE(head(pooled(other)), 0) / 2
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class SyncHead(nn.Module):
    """[B, W, Nq, D] projected tokens -> [B] logit that the soundtrack belongs to the picture."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(2 * width, 1)

    def forward(self, tokens: torch.Tensor, window_mask: torch.Tensor) -> torch.Tensor:
        per_window = tokens.float().mean(2)  # [B, W, D]
        m = window_mask[..., None]  # [B, W, 1]
        mean = (per_window * m).sum(1) / m.sum(1).clamp(min=1)
        peak = per_window.masked_fill(~m, float("-inf")).amax(1)
        return self.proj(torch.cat([mean, peak], -1)).squeeze(-1)  # [B]


def partners(own: Sequence[bool], audio_keys: Sequence[str | None]) -> list[tuple[int, int]]:
    """(row, partner): each row playing its own soundtrack with the next row, cyclically, whose audio is
    another recording (a different, known audio key). Rows with no such partner are left out."""
    out = []
    n = len(audio_keys)
    for i in range(n):
        if not own[i] or audio_keys[i] is None:
            continue
        j = next((j % n for j in range(i + 1, i + n) if audio_keys[j % n] not in (None, audio_keys[i])), None)
        if j is not None:
            out.append((i, j))
    return out


def synchrony_loss(own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Mean BCE of the head's logits: own soundtrack 1, another recording's 0 (each [N])."""
    bce = nn.functional.binary_cross_entropy_with_logits
    return (bce(own, torch.ones_like(own)) + bce(other, torch.zeros_like(other))) / 2
