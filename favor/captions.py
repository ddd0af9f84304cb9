"""Caption decoding shared by every backend: one greedy loop and one beam search over ``Inference``.

A backend (PyTorch here, ONNX Runtime in export/ort_inference.py, TensorRT in runtime/) implements
three calls and never its own loop (whisper/decoding.py's ``Inference`` split):

    prefill(embeds [B, L, D], attention_mask [B, L]) -> (logits [B, V] at the last position, cache)
    decode(ids [B], cache)                           -> (logits [B, V] for the new token, cache)
    reorder(cache, rows [B'])                        -> cache with batch rows picked (beam search)

Inputs are left padded (``LLM.splice(left_pad=True)`` or ``prompt_table.build_inputs``) so every row
continues from its ``ASSISTANT:``; position ids are the running count of attended tokens, as in
``LLM.splice``, so padding never shifts RoPE.

Notation: B batch (x beams), L prompt length, P cached length, V vocab, D LLM width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class Inference(Protocol):
    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Any]: ...

    def decode(self, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]: ...

    def reorder(self, cache: Any, rows: torch.Tensor) -> Any: ...


@dataclass
class CaptionResult:
    tokens: list[int]  # generated ids, EOS excluded
    text: str = ""
    margins: list[float] = field(default_factory=list)  # top-1 minus top-2 logit at each greedy step
    score: float = 0.0  # sum of log-probabilities (beam search ranks by this / length penalty)


@dataclass
class TorchCache:
    kv: Any  # transformers Cache
    attention_mask: torch.Tensor  # [B, P] int64


class TorchInference:
    """``Inference`` over a transformers causal LM (``FavorModel.llm.model``, LoRA merged or not)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    @torch.inference_mode()
    def _step(self, embeds, attention_mask, position_ids, kv) -> tuple[torch.Tensor, TorchCache]:
        out = self.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=kv, use_cache=True)
        return out.logits[:, -1].float(), TorchCache(out.past_key_values, attention_mask)

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, TorchCache]:
        mask = attention_mask.long()
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]: left padding must not shift RoPE
        return self._step(embeds, mask, position_ids, None)

    def decode(self, ids: torch.Tensor, cache: TorchCache) -> tuple[torch.Tensor, TorchCache]:
        position_ids = cache.attention_mask.sum(-1, keepdim=True)  # [B, 1] next position
        mask = torch.cat([cache.attention_mask, cache.attention_mask.new_ones(ids.shape[0], 1)], 1)
        return self._step(self._embed(ids[:, None]), mask, position_ids, cache.kv)

    def reorder(self, cache: TorchCache, rows: torch.Tensor) -> TorchCache:
        cache.kv.reorder_cache(rows)
        return TorchCache(cache.kv, cache.attention_mask[rows])


def _margin(logits: torch.Tensor) -> torch.Tensor:
    top2 = logits.topk(2, dim=-1).values  # [B, 2]
    return top2[:, 0] - top2[:, 1]


def greedy_decode(inference: Inference, embeds: torch.Tensor, attention_mask: torch.Tensor,
                  max_new_tokens: int, eos_token_id: int) -> list[CaptionResult]:
    """Argmax decoding until EOS or ``max_new_tokens``; records each step's top-1/top-2 margin."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 1")
    B = embeds.shape[0]
    results = [CaptionResult([]) for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    logits, cache = inference.prefill(embeds, attention_mask)
    for step in range(max_new_tokens):
        logits = torch.as_tensor(logits).float()
        logp = torch.log_softmax(logits, -1)
        ids = logits.argmax(-1)  # [B]
        margin = _margin(logits)
        for b in range(B):
            if done[b]:
                continue
            if int(ids[b]) == eos_token_id:
                done[b] = True
                continue
            results[b].tokens.append(int(ids[b]))
            results[b].margins.append(float(margin[b]))
            results[b].score += float(logp[b, ids[b]])
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        ids = torch.where(done, torch.full_like(ids, eos_token_id), ids)  # finished rows feed EOS
        logits, cache = inference.decode(ids, cache)
    return results


def beam_decode(inference: Inference, embeds: torch.Tensor, attention_mask: torch.Tensor,
                max_new_tokens: int, eos_token_id: int, num_beams: int = 4,
                length_penalty: float = 1.0) -> list[CaptionResult]:
    """Beam search per sample (batch rows expanded to beams); hypotheses ranked by
    sum log p / length ** length_penalty, as transformers' beam search does."""
    if num_beams < 1:
        raise ValueError(f"num_beams ({num_beams}) must be >= 1")
    B, K = embeds.shape[0], num_beams
    rows = torch.arange(B).repeat_interleave(K)  # [B*K]
    logits, cache = inference.prefill(embeds[rows], attention_mask[rows])
    scores = torch.full((B, K), float("-inf"))
    scores[:, 0] = 0.0  # identical beams at the start: only beam 0 may expand
    seqs: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(B)]
    finished: list[list[tuple[float, list[int], float]]] = [[] for _ in range(B)]
    for step in range(max_new_tokens):
        logp = torch.log_softmax(torch.as_tensor(logits).float(), -1)  # [B*K, V]
        V = logp.shape[-1]
        total = (scores.reshape(-1, 1) + logp).reshape(B, K * V)  # [B, K*V]
        top, idx = total.topk(2 * K, dim=-1)  # spare candidates replace beams that end in EOS
        new_scores = torch.full((B, K), float("-inf"))
        src = torch.zeros(B, K, dtype=torch.long)
        tok = torch.full((B, K), eos_token_id, dtype=torch.long)
        new_seqs: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(B)]
        for b in range(B):
            k = 0
            for s, i in zip(top[b].tolist(), idx[b].tolist(), strict=False):
                beam, t = divmod(i, V)
                if s == float("-inf"):
                    break
                if t == eos_token_id:
                    hyp = seqs[b][beam]
                    finished[b].append((s / max(len(hyp), 1) ** length_penalty, hyp, s))
                    continue
                new_scores[b, k], src[b, k], tok[b, k] = s, beam, t
                new_seqs[b][k] = seqs[b][beam] + [t]
                k += 1
                if k == K:
                    break
        scores, seqs = new_scores, new_seqs
        if all(len(f) >= K for f in finished) or step == max_new_tokens - 1:
            break
        cache = inference.reorder(cache, (torch.arange(B)[:, None] * K + src).reshape(-1))
        logits, cache = inference.decode(tok.reshape(-1), cache)
    results = []
    for b in range(B):
        pool = list(finished[b]) + [(float(scores[b, k]) / max(len(seqs[b][k]), 1) ** length_penalty,
                                     seqs[b][k], float(scores[b, k]))
                                    for k in range(K) if scores[b, k] > float("-inf")]
        _, best, raw = max(pool, key=lambda h: h[0])
        results.append(CaptionResult(list(best), score=raw))
    return results


def decode_text(results: list[CaptionResult], tokenizer) -> list[CaptionResult]:
    """Fill ``text`` with the release's post-processing (``favor.prompt.clean_answer``)."""
    from favor.prompt import clean_answer

    for r in results:
        r.text = clean_answer(tokenizer.decode(r.tokens, skip_special_tokens=True))
    return results
