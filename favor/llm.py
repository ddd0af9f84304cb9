"""The LLM stage: a Llama/Vicuna decoder (transformers) with LoRA (peft), fed spliced embeddings.

``splice`` places each sample's AV embeddings between its prompt chunks and pads the batch:
training pads on the right (labels IGNORE), generation on the left (so every row ends at its
``ASSISTANT:`` and decoding continues from there).

Notation: B batch, A AV tokens of a sample (W x Nq), P text tokens, D LLM width.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from favor.config import FavorConfig, LLMConfig
from favor.prompt import IGNORE, PromptIds


def llama_config(cfg: LLMConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        rms_norm_eps=cfg.rms_eps, max_position_embeddings=cfg.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.eos_token_id,
    )


def check_llama_matches(model: LlamaForCausalLM, cfg: LLMConfig, source: str) -> None:
    """Fail with the first field where a loaded model disagrees with the FAVOR config."""
    c = model.config
    pairs = {"hidden": c.hidden_size, "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
             "kv_heads": c.num_key_value_heads, "ffn_dim": c.intermediate_size, "vocab_size": c.vocab_size}
    for name, found in pairs.items():
        if getattr(cfg, name) != found:
            raise ValueError(f"{source}: LLM {name} is {found}, the FAVOR config expects {getattr(cfg, name)}")


def build_llama(cfg: LLMConfig, pretrained: bool = True, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Base decoder: from ``cfg.pretrained`` (HF dir, optionally a GGUF file in it) or random init.

    ``dtype`` is what the weights load as (fp16 halves a 13B export's host RAM: 26 GB, not 52 GB)."""
    if pretrained and cfg.pretrained:
        path = Path(cfg.pretrained)
        if not path.exists():
            raise FileNotFoundError(f"{path}: LLM base model not found")
        kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                 **kwargs)
        check_llama_matches(model, cfg, str(path))
        return model
    return LlamaForCausalLM(llama_config(cfg)).to(dtype)


def add_lora(model: LlamaForCausalLM, cfg: LLMConfig) -> PeftModel:
    """Wrap with peft LoRA (release: r=32, alpha=32, dropout 0.1 on q/k/v/o); base weights frozen."""
    lora = LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_targets))
    return get_peft_model(model, lora)


def merge_lora(model: PeftModel) -> LlamaForCausalLM:
    """Fold LoRA into the base weights (before export); refuses non-finite results."""
    merged = model.merge_and_unload(safe_merge=True)  # safe_merge checks isfinite per layer
    return merged


@dataclass
class Spliced:
    embeds: torch.Tensor  # [B, L, D]
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L] (IGNORE outside answers)
    position_ids: torch.Tensor  # [B, L]


class LLM(nn.Module):
    """Decoder + embedding splice. ``model`` is a LlamaForCausalLM, possibly peft-wrapped."""

    def __init__(self, cfg: FavorConfig, model: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.model = model

    @property
    def base(self) -> LlamaForCausalLM:
        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base.get_input_embeddings()(ids)

    def splice(self, prompts: list[PromptIds], av: torch.Tensor, av_mask: torch.Tensor,
               left_pad: bool = False) -> Spliced:
        """Per sample [BOS] + pre + AV (its valid tokens) + post; padded into one batch."""
        device = av.device
        rows, labels = [], []
        bos = torch.tensor([self.cfg.llm.bos_token_id], device=device)
        for b, p in enumerate(prompts):
            pre = self.embed(torch.cat([bos, torch.tensor(p.pre, dtype=torch.long, device=device)]))
            post = self.embed(torch.tensor(p.post, dtype=torch.long, device=device))
            sample_av = av[b][av_mask[b].bool()]  # [A, D]: drop padded windows
            rows.append(torch.cat([pre, sample_av.to(pre.dtype), post]))  # [1+P1+A+P2, D]
            labels.append([IGNORE] * (pre.shape[0] + sample_av.shape[0]) + list(p.labels))
        L = max(r.shape[0] for r in rows)
        D = rows[0].shape[-1]
        embeds = rows[0].new_zeros(len(rows), L, D)
        mask = torch.zeros(len(rows), L, dtype=torch.long, device=device)
        lab = torch.full((len(rows), L), IGNORE, dtype=torch.long, device=device)
        for b, (r, y) in enumerate(zip(rows, labels, strict=True)):
            n = r.shape[0]
            sl = slice(L - n, L) if left_pad else slice(0, n)
            embeds[b, sl], mask[b, sl] = r, 1
            lab[b, sl] = torch.tensor(y, device=device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift RoPE
        return Spliced(embeds, mask, lab, position_ids)

    def forward(self, s: Spliced, per_sample: bool = False) -> torch.Tensor:
        """Cross-entropy over answer tokens: the mean over the batch's tokens, or with ``per_sample`` the
        mean over rows of each row's token mean (a 2-token answer then weighs as much as a 60-token caption).

        The LM head runs only where a label is predicted (the position before each answer token):
        prompt and AV positions are ~2/3 of a training row, and their [L, V] logits (V = 49,152 for
        SmolLM2) cost head FLOPs and fp32 memory traffic for nothing. The token mean is HF's
        ``labels=`` loss (mean over shifted, non-IGNORE targets); tests/test_model.py checks both."""
        hidden = self.base.model(inputs_embeds=s.embeds, attention_mask=s.attention_mask,
                                 position_ids=s.position_ids, use_cache=False).last_hidden_state  # [B, L, D]
        targets = s.labels[:, 1:]  # [B, L-1]: position t predicts token t+1
        keep = targets != IGNORE
        logits = self.base.lm_head(hidden[:, :-1][keep])  # [K, V], K answer tokens in the batch
        if not per_sample:
            return F.cross_entropy(logits.float(), targets[keep])
        token_ce = F.cross_entropy(logits.float(), targets[keep], reduction="none")  # [K]
        rows = keep.nonzero()[:, 0]  # [K] the row of each answer token (row-major, as the mask indexes)
        counts = keep.sum(1)  # [B] answer tokens per row
        row_ce = token_ce.new_zeros(len(counts)).index_add_(0, rows, token_ce) / counts.clamp(min=1)
        return row_ce[counts > 0].mean()
