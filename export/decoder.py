"""The LLM decoder for export: LoRA merged (peft), ``inputs_embeds`` in, logits and a flat KV cache out.

One graph serves prefill and decode: ``past.{i}.key/value`` [B, kvh, P, hd] may be empty (P = 0,
prefill) or hold the cache (decode); ``present.{i}.key/value`` [B, kvh, P+L, hd] come back. The
wrapper only rebuilds a transformers ``DynamicCache`` from the flat tensors and calls the model.

    inputs_embeds [B, L, D], attention_mask [B, P+L] int64, position_ids [B, L] int64, past.* ->
    logits [B, L, V], present.*

Notation: B batch, L new tokens, P cached tokens, D width, V vocab, kvh KV heads, hd head dim.
"""

from __future__ import annotations

import copy

import torch
from peft import PeftModel
from torch import nn
from transformers import DynamicCache, LlamaForCausalLM

from favor.config import FavorConfig
from favor.llm import merge_lora
from favor.model import FavorModel


def merged_llm(model: FavorModel) -> LlamaForCausalLM:
    """A merged copy of the model's LLM (the FavorModel itself keeps its LoRA adapters)."""
    llm = model.llm.model
    if isinstance(llm, PeftModel):
        return merge_lora(copy.deepcopy(llm)).eval()
    return llm.eval()


def cache_names(cfg: FavorConfig, prefix: str = "past") -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(cfg.llm.layers) for kv in ("key", "value")]


class DecoderFrontend(nn.Module):
    name = "decoder"

    def __init__(self, cfg: FavorConfig, llm: LlamaForCausalLM):
        super().__init__()
        self.cfg = cfg
        self.llm = llm
        self.input_names = ("inputs_embeds", "attention_mask", "position_ids", *cache_names(cfg))
        self.output_names = ("logits", *cache_names(cfg, "present"))

    @property
    def head_dim(self) -> int:
        return self.cfg.llm.hidden // self.cfg.llm.heads

    def inputs(self) -> dict[str, dict]:
        spec = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                "position_ids": {0: "batch", 1: "seq"}}
        spec.update({n: {0: "batch", 2: "past"} for n in cache_names(self.cfg)})
        return spec

    def empty_cache(self, batch: int, past: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
        shape = (batch, self.cfg.llm.kv_heads, past, self.head_dim)  # [B, kvh, P, hd]
        return [torch.zeros(shape, dtype=dtype) for _ in cache_names(self.cfg)]

    def example(self, batch: int = 2, seq: int = 3, past: int = 4) -> tuple[torch.Tensor, ...]:
        embeds = torch.randn(batch, seq, self.cfg.llm.hidden)
        mask = torch.ones(batch, past + seq, dtype=torch.long)
        pos = torch.arange(past, past + seq)[None].expand(batch, -1).contiguous()
        cache = [torch.randn_like(t) for t in self.empty_cache(batch, past)]
        return (embeds, mask, pos, *cache)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(config=self.llm.config)
        for i in range(self.cfg.llm.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]  # [B, kvh, P+L, hd] each
        return (out.logits, *present)
