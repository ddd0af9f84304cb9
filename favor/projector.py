"""Projector: causal Q-Former outputs into the LLM's embedding space (the release's ``llama_proj``)."""

from __future__ import annotations

import torch
from torch import nn

from favor.config import FavorConfig


class Projector(nn.Module):
    """[..., H] -> [..., D_llm] (768 -> 5120 for favor-13b)."""

    def __init__(self, cfg: FavorConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.qformer.hidden, cfg.llm.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)
