"""Word alignment: each window's AV tokens point at the LLM's own embeddings of the words it shows or sounds.

A demo-only auxiliary objective (``FavorConfig.word_alignment_weight``; the release has none). Trained
from scratch on 2 cores, the causal Q-Former and projector get their only signal through a 30-layer
decoder, and the LLM learns the captions' language long before it learns to read new tokens: after 300
steps every clip got the same caption (benchmarks/RESULTS.md 1b). This loss gives the fusion stages a
direct signal instead: for every word w of the synthetic world (colours, shapes, sounds, spoken and printed
words) that a window holds, some AV token of that window should be nearer, in cosine, to w's input
embedding than to the embeddings of the world's words the window does not hold (training/window_words.py
builds the targets). Objects are their two words: also aligning each window to the sum of its objects'
colour and shape embeddings (to bind the two) scored the same after 300 steps (benchmarks/RESULTS.md 1b),
so the simpler form stays. A pretrained LLM copies
words it has been shown into its answer readily, so tokens that look like "purple" and "diamond" are ones it
can already use.

    score[b, w, k] = max over the window's Nq tokens of cos(token, E[k]) / TEMPERATURE
    loss = mean over (b, w, k positive) of  -log( e^score_k / (e^score_k + sum_{j negative} e^score_j) )
"""

from __future__ import annotations

import torch
from torch import nn

TEMPERATURE = 0.07  # CLIP's initial softmax temperature for cosine similarities


def word_alignment_loss(tokens: torch.Tensor, window_mask: torch.Tensor, table: torch.Tensor,
                        targets: torch.Tensor) -> torch.Tensor:
    """tokens [B, W, Nq, D] projected AV tokens; window_mask [B, W]; table [K, D] the LLM's input
    embeddings of the world's K words; targets [B, Wt, K] in {0, 1}: the words each window holds (Wt may
    differ from W: windows past either end carry no target). Windows without a positive word add nothing;
    a batch without any returns 0."""
    B, W = tokens.shape[:2]
    t = targets.new_zeros(B, W, targets.shape[-1])
    n = min(W, targets.shape[1])
    t[:, :n] = targets[:, :n]
    t = t * window_mask[..., None].to(t.dtype)  # [B, W, K]
    pos = t > 0
    if not pos.any():
        return tokens.new_zeros(())
    sim = nn.functional.normalize(tokens.float(), dim=-1) @ nn.functional.normalize(table.float(), dim=-1).T
    score = sim.amax(dim=2) / TEMPERATURE  # [B, W, K]: the best-matching token per word
    negatives = score.masked_fill(pos, float("-inf"))  # [B, W, K]
    neg_lse = torch.logsumexp(negatives, dim=-1, keepdim=True)  # [B, W, 1]; -inf when all are positive
    per_word = torch.logaddexp(score, neg_lse) - score  # -log softmax of the positive against the negatives
    return per_word[pos].mean()
