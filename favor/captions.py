"""The one decode loop: every caption and answer (training eval, favor-eval, favor-export verify, every
runtime backend) is decoded here, over ``Inference``.

A backend (PyTorch here, ONNX Runtime in export/ort_inference.py, TensorRT in runtime/) implements
three calls and never its own loop (whisper/decoding.py's ``Inference`` split):

    prefill(embeds [B, L, D], attention_mask [B, L]) -> (logits [B, V] at the last position, cache)
    decode(ids [B], cache)                           -> (logits [B, V] for the new token, cache)
    reorder(cache, rows [B'])                        -> cache with batch rows picked (beam search)

Inputs are left padded (``prompt_table.build_inputs``) so every row continues from its
``ASSISTANT:``; position ids are the running count of attended tokens, as in ``LLM.splice``, so
padding never shifts RoPE. ``caption`` is the one prompt assembly: prompt-table ids, then
``embed_with_prompt_table`` over the backend's embedding matrix, then ``decode``.

``GenerationSettings`` selects greedy, sampling or beam search; repetition penalty, temperature and
top-p are small logits-processing steps inside the loop (transformers' processors, same formulas),
and sampling draws from a ``torch.Generator`` seeded by ``settings.seed``, so answers repeat.

Notation: B batch (x beams), K beams, L prompt length, P cached length, V vocab, D LLM width.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from favor import prompt_table
from favor.config import LLMConfig
from favor.prompt import clean_answer, inference_ids

OnToken = Callable[[int, int], None]  # (batch row, token id), called as each token is decided


class Inference(Protocol):
    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Any]: ...

    def decode(self, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]: ...

    def reorder(self, cache: Any, rows: torch.Tensor) -> Any: ...


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 64
    num_beams: int = 1
    do_sample: bool = False
    top_p: float = 1.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    seed: int = 0  # sampling draws from torch.Generator().manual_seed(seed)

    def __post_init__(self):
        for name, value, lo in (("max_new_tokens", self.max_new_tokens, 1), ("num_beams", self.num_beams, 1)):
            if value < lo:
                raise ValueError(f"{name} ({value}) must be >= {lo}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p ({self.top_p}) must be in (0, 1]")
        for name, value in (("temperature", self.temperature), ("repetition_penalty", self.repetition_penalty)):
            if value <= 0:
                raise ValueError(f"{name} ({value}) must be > 0")


GREEDY = GenerationSettings()


@dataclass
class CaptionResult:
    tokens: list[int]  # generated ids, EOS excluded
    text: str = ""
    margins: list[float] = field(default_factory=list)  # top-1 minus top-2 logit at each step
    score: float = 0.0  # sum of log-probabilities (beam search ranks by this / length penalty)
    prompt_tokens: int = 0  # attended prompt length (set by ``caption``)
    prefill_s: float = 0.0  # seconds in prefill / decode steps (set by timed backends)
    decode_s: float = 0.0


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
        # transformers 5: ``cache=`` / ``out.cache`` (``past_key_values`` warns, removed in 5.40)
        out = self.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                         cache=kv, use_cache=True)
        return out.logits[:, -1].float(), TorchCache(out.cache, attention_mask)

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, TorchCache]:
        mask = attention_mask.long()
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]: left padding must not shift RoPE
        return self._step(embeds, mask, position_ids, None)

    def decode(self, ids: torch.Tensor, cache: TorchCache) -> tuple[torch.Tensor, TorchCache]:
        position_ids = cache.attention_mask.sum(-1, keepdim=True)  # [B, 1] next position
        mask = torch.cat([cache.attention_mask, cache.attention_mask.new_ones(ids.shape[0], 1)], 1)
        device = cache.attention_mask.device
        return self._step(self._embed(ids[:, None].to(device)), mask, position_ids, cache.kv)

    def reorder(self, cache: TorchCache, rows: torch.Tensor) -> TorchCache:
        rows = rows.to(cache.attention_mask.device)
        cache.kv.reorder_cache(rows)
        return TorchCache(cache.kv, cache.attention_mask[rows])

    def merge(self, caches: list[TorchCache]) -> TorchCache:
        """The rows of several caches as one batch (continuous batching, favor/continuous.py): left
        padded to the longest, padding masked; positions come from the mask, so it never shifts RoPE.
        Columns that are padding in every row are cut."""
        from transformers import DynamicCache

        P = max(c.attention_mask.shape[1] for c in caches)
        mask = torch.cat([torch.nn.functional.pad(c.attention_mask, (P - c.attention_mask.shape[1], 0))
                          for c in caches])  # [B, P]
        start = int(mask.any(0).long().argmax())  # first column some row attends
        layers = []
        for i in range(len(caches[0].kv.layers)):
            kv = [[torch.nn.functional.pad(t, (0, 0, P - c.attention_mask.shape[1], 0))
                   for t in (c.kv.layers[i].keys, c.kv.layers[i].values)] for c in caches]  # [b, h, P, hd]
            layers.append(tuple(torch.cat([x[j] for x in kv])[:, :, start:] for j in (0, 1)))
        return TorchCache(DynamicCache(layers), mask[:, start:])


# -- logits processing (transformers' RepetitionPenalty / Temperature / TopP, same formulas) ----------
def penalise_repeats(logits: torch.Tensor, history: list[list[int]], penalty: float) -> torch.Tensor:
    """logits [B, V]: each token already generated in row b is divided by ``penalty`` (multiplied when
    negative), so repeating it gets less likely (CTRL, Keskar et al. 2019)."""
    if penalty == 1.0 or not any(history):
        return logits
    out = logits.clone()
    for b, seen in enumerate(history):
        if seen:
            idx = torch.tensor(sorted(set(seen)), dtype=torch.long)
            s = out[b, idx]
            out[b, idx] = torch.where(s < 0, s * penalty, s / penalty)
    return out


def warp(scores: torch.Tensor, temperature: float, top_p: float, min_keep: int = 1) -> torch.Tensor:
    """scores [N, V] / temperature, then the nucleus: keep the smallest set of tokens whose
    probability reaches ``top_p`` (at least ``min_keep``), the rest to -inf."""
    scores = scores / temperature if temperature != 1.0 else scores
    if top_p >= 1.0:
        return scores
    ascending, order = scores.sort(-1)  # [N, V]
    drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[..., -min_keep:] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def _margin(logits: torch.Tensor) -> torch.Tensor:
    top2 = logits.topk(2, dim=-1).values  # [B, 2]
    return top2[:, 0] - top2[:, 1]


def _choose(logits: torch.Tensor, results: list[CaptionResult], settings: GenerationSettings,
            generator: torch.Generator | None) -> torch.Tensor:
    """Next id per row [B]: argmax of the (penalised) logits, or a draw from the warped distribution."""
    scores = penalise_repeats(logits, [r.tokens for r in results], settings.repetition_penalty)
    if not settings.do_sample:
        return scores.argmax(-1)
    probs = warp(scores, settings.temperature, settings.top_p).softmax(-1)  # [B, V]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# -- one request's decode state: shared by the step loop and continuous batching ---------------------
@dataclass
class DecodeState:
    """What one request carries through the step loop: its token choice (settings, generator), its
    result so far (tokens, margins, score: the repetition penalty reads the tokens), its EOS and
    length limit, and its ``on_token(id)`` sink. ``greedy_decode`` keeps one per batch row;
    favor/continuous.py keeps one per request while requests join and leave the running batch."""

    eos_token_id: int
    max_new_tokens: int
    settings: GenerationSettings = GREEDY
    generator: torch.Generator | None = None
    on_token: Callable[[int], None] | None = None
    result: CaptionResult = field(default_factory=lambda: CaptionResult([]))
    done: bool = False

    def accept(self, token: int, margin: float, logp: float) -> None:
        """Record the token decided for this request (EOS ends it, unreported; so does the limit)."""
        if self.done:
            return
        if token == self.eos_token_id:
            self.done = True
            return
        r = self.result
        r.tokens.append(token)
        r.margins.append(margin)
        r.score += logp
        if self.on_token is not None:
            self.on_token(token)
        if len(r.tokens) >= self.max_new_tokens:
            self.done = True


@contextmanager
def _one_thread():
    """torch on one thread for the step's bookkeeping: these ops split over rows only (each row's
    softmax / argmax / top-k is computed by one thread either way, so results are identical), and a
    parallel region over a few rows costs more in thread wake-ups than it saves: measured 20-50 ms per
    step beside ONNX Runtime's spinning workers on a loaded 2-core machine, 0.8 ms on one thread."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def advance(logits: torch.Tensor, states: list[DecodeState]) -> torch.Tensor:
    """One decode step's token decisions: logits [B, V] for ``states`` (one per row) -> the ids to feed
    next [B] (EOS for rows that are done). Rows sharing settings and generator are chosen in one
    ``_choose`` call (the batch draw of the step loop, so sampled answers repeat exactly); the top-1 /
    top-2 margin and log-probability are of the raw logits."""
    with _one_thread():
        return _advance(torch.as_tensor(logits).float().cpu(), states)  # the bookkeeping stays on the CPU


def _advance(logits: torch.Tensor, states: list[DecodeState]) -> torch.Tensor:
    logp = torch.log_softmax(logits, -1)  # [B, V]
    ids = torch.empty(len(states), dtype=torch.long)
    groups: dict[tuple[int, int], list[int]] = {}
    for b, s in enumerate(states):
        groups.setdefault((id(s.settings), id(s.generator)), []).append(b)
    for rows in groups.values():
        first = states[rows[0]]
        chosen = _choose(logits[rows], [states[b].result for b in rows], first.settings, first.generator)
        ids[rows] = chosen
    margin = _margin(logits)
    for b, s in enumerate(states):
        s.accept(int(ids[b]), float(margin[b]), float(logp[b, ids[b]]))
    done = torch.tensor([s.done for s in states])
    return torch.where(done, torch.full_like(ids, states[0].eos_token_id if states else 0), ids)


# -- the loops -----------------------------------------------------------------------------------
def greedy_decode(inference: Inference, embeds: torch.Tensor, attention_mask: torch.Tensor,
                  max_new_tokens: int, eos_token_id: int, on_token: OnToken | None = None, *,
                  settings: GenerationSettings = GREEDY, generator: torch.Generator | None = None
                  ) -> list[CaptionResult]:
    """Token by token until EOS or ``max_new_tokens``: argmax (or a draw when ``settings.do_sample``).

    Records each step's top-1/top-2 margin of the raw logits; ``on_token(row, id)`` is called as soon
    as a row's token is decided (EOS is not reported), so a caller can show the text growing.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 1")
    states = [DecodeState(eos_token_id, max_new_tokens, settings, generator,
                          None if on_token is None else (lambda t, b=b: on_token(b, t)))
              for b in range(embeds.shape[0])]
    logits, cache = inference.prefill(embeds, attention_mask)
    for step in range(max_new_tokens):
        ids = advance(logits, states)  # finished rows feed EOS
        if all(s.done for s in states) or step == max_new_tokens - 1:
            break
        logits, cache = inference.decode(ids, cache)
    return [s.result for s in states]


def _beam_candidates(total: torch.Tensor, K: int, settings: GenerationSettings,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """total [B, K*V] running log-probs -> 2K candidates per row (scores, flat indices), best first.

    Beam search takes the top 2K (spares replace beams that end in EOS); beam sampling draws them
    from softmax(warp(total)) without replacement (as transformers' beam sample), then ranks the
    draws by their unwarped score."""
    if not settings.do_sample:
        return total.topk(2 * K, dim=-1)
    B = total.shape[0]
    probs = warp(total, settings.temperature, settings.top_p, min_keep=2).softmax(-1)  # [B, K*V]
    scores = torch.full((B, 2 * K), float("-inf"))
    idx = torch.zeros(B, 2 * K, dtype=torch.long)
    for b in range(B):
        n = min(2 * K, int((probs[b] > 0).sum()))
        drawn = torch.multinomial(probs[b], n, generator=generator)  # [n]
        s, order = total[b, drawn].sort(descending=True)
        scores[b, :n], idx[b, :n] = s, drawn[order]
    return scores, idx


def _beam_step(top: torch.Tensor, idx: torch.Tensor, seqs: list[list[list[int]]], V: int, K: int,
               eos_token_id: int, length_penalty: float, finished: list[list[tuple]]):
    """Keep the K best non-EOS candidates per row; candidates ending in EOS become finished hypotheses."""
    B = top.shape[0]
    scores = torch.full((B, K), float("-inf"))
    src = torch.zeros(B, K, dtype=torch.long)
    tok = torch.full((B, K), eos_token_id, dtype=torch.long)
    new_seqs: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(B)]
    for b in range(B):
        k = 0
        for s, i in zip(top[b].tolist(), idx[b].tolist(), strict=False):
            beam, t = divmod(i, V)
            if s == float("-inf") or k == K:
                break
            if t == eos_token_id:
                hyp = seqs[b][beam]
                finished[b].append((s / max(len(hyp), 1) ** length_penalty, hyp, s))
                continue
            scores[b, k], src[b, k], tok[b, k] = s, beam, t
            new_seqs[b][k] = seqs[b][beam] + [t]
            k += 1
    return scores, src, tok, new_seqs


def beam_decode(inference: Inference, embeds: torch.Tensor, attention_mask: torch.Tensor,
                max_new_tokens: int, eos_token_id: int, num_beams: int = 4, length_penalty: float = 1.0,
                *, settings: GenerationSettings | None = None, generator: torch.Generator | None = None
                ) -> list[CaptionResult]:
    """Beam search (or beam sampling) per sample, batch rows expanded to beams; hypotheses ranked by
    sum log p / length ** length_penalty, as transformers' beam search does. The repetition penalty
    acts on each beam's own tokens before the log-softmax."""
    if num_beams < 1:
        raise ValueError(f"num_beams ({num_beams}) must be >= 1")
    settings = settings or GenerationSettings(num_beams=num_beams, length_penalty=length_penalty)
    B, K = embeds.shape[0], num_beams
    rows = torch.arange(B).repeat_interleave(K)  # [B*K]
    logits, cache = inference.prefill(embeds[rows], attention_mask[rows])
    scores = torch.full((B, K), float("-inf"))
    scores[:, 0] = 0.0  # identical beams at the start: only beam 0 may expand
    seqs: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(B)]
    finished: list[list[tuple[float, list[int], float]]] = [[] for _ in range(B)]
    for step in range(max_new_tokens):
        history = [seqs[b][k] for b in range(B) for k in range(K)]
        logits = penalise_repeats(torch.as_tensor(logits).float().cpu(), history, settings.repetition_penalty)
        logp = torch.log_softmax(logits, -1)  # [B*K, V]
        V = logp.shape[-1]
        total = (scores.reshape(-1, 1) + logp).reshape(B, K * V)  # [B, K*V]
        top, idx = _beam_candidates(total, K, settings, generator)
        scores, src, tok, seqs = _beam_step(top, idx, seqs, V, K, eos_token_id, length_penalty, finished)
        if all(len(f) >= K for f in finished) or step == max_new_tokens - 1:
            break
        cache = inference.reorder(cache, (torch.arange(B)[:, None] * K + src).reshape(-1))
        logits, cache = inference.decode(tok.reshape(-1), cache)
    return [_best(finished[b], scores[b], seqs[b], length_penalty) for b in range(B)]


def _best(finished: list[tuple], scores: torch.Tensor, seqs: list[list[int]], length_penalty: float
          ) -> CaptionResult:
    pool = list(finished) + [(float(s) / max(len(q), 1) ** length_penalty, q, float(s))
                             for s, q in zip(scores, seqs, strict=True) if s > float("-inf")]
    _, best, raw = max(pool, key=lambda h: h[0])
    return CaptionResult(list(best), score=raw)


def decode(inference: Inference, embeds: torch.Tensor, attention_mask: torch.Tensor, eos_token_id: int,
           settings: GenerationSettings = GREEDY, on_token: OnToken | None = None) -> list[CaptionResult]:
    """``settings`` -> the step loop (greedy / sampling) or beam search. Beam search decides its tokens
    only at the end, so ``on_token`` then reports the chosen hypothesis after the search."""
    generator = torch.Generator().manual_seed(settings.seed) if settings.do_sample else None
    if settings.num_beams == 1:
        return greedy_decode(inference, embeds, attention_mask, settings.max_new_tokens, eos_token_id, on_token,
                             settings=settings, generator=generator)
    results = beam_decode(inference, embeds, attention_mask, settings.max_new_tokens, eos_token_id,
                          settings.num_beams, settings.length_penalty, settings=settings, generator=generator)
    for b, r in enumerate(results):
        for t in r.tokens if on_token is not None else ():
            on_token(b, t)
    return results


def decode_text(results: list[CaptionResult], tokenizer) -> list[CaptionResult]:
    """Fill ``text`` with the release's post-processing (``favor.prompt.clean_answer``)."""
    for r in results:
        r.text = clean_answer(tokenizer.decode(r.tokens, skip_special_tokens=True))
    return results


def prompt_inputs(embedding: torch.Tensor, tokenizer, llm: LLMConfig, prompts: list[str], av_embeds: torch.Tensor,
                  av_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one prompt assembly for torch, ONNX Runtime and TensorRT: ``prompt_table.build_inputs`` ids
    (AV rows addressed as vocab_size + row), embedded through ``embedding`` [V, D] (the LLM's input
    embedding matrix), left padded. Returns (embeds [B, L, D], attention_mask [B, L])."""
    inputs = prompt_table.build_inputs([inference_ids(tokenizer, p) for p in prompts], av_embeds,
                                       av_mask.bool(), llm.vocab_size, llm.bos_token_id, llm.eos_token_id)
    embedding = torch.as_tensor(embedding)  # NumPy for ONNX Runtime, a (CUDA) tensor for torch
    ids, mask = inputs.ids.to(embedding.device), inputs.attention_mask.to(embedding.device)
    return prompt_table.embed_with_prompt_table(ids, embedding, inputs.table.to(embedding.device), mask), mask


def caption(inference: Inference, embedding: torch.Tensor, tokenizer, llm: LLMConfig, prompts: list[str],
            av_embeds: torch.Tensor, av_mask: torch.Tensor, settings: GenerationSettings = GREEDY,
            on_token: OnToken | None = None) -> list[CaptionResult]:
    """Answers to ``prompts`` about AV rows av_embeds [B, A, D] (av_mask [B, A], False = padded window):
    ``prompt_inputs``, then ``decode``; text post-processed like the release.
    """
    embeds, mask = prompt_inputs(embedding, tokenizer, llm, prompts, av_embeds, av_mask)
    results = decode(inference, embeds, mask, llm.eos_token_id, settings, on_token)
    for r, n in zip(results, mask.sum(-1).tolist(), strict=True):
        r.prompt_tokens = int(n)
    return decode_text(results, tokenizer)
