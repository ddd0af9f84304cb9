"""Text generation from AV embeddings: the presets (greedy, beam, sample, the release's settings) run
through the one decode loop, ``favor.captions`` (the same loop every runtime backend uses).

transformers' ``generate`` is not called here; tests/test_captions.py keeps it as the reference that
greedy decoding must equal.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from favor.captions import GenerationSettings, TorchInference, caption

if TYPE_CHECKING:  # annotations only: importing favor.model costs seconds (peft, transformers)
    from favor.config import FavorConfig
    from favor.model import AVEmbeddings, FavorModel

__all__ = ["GENERATION_PRESETS", "GenerationSettings", "generate", "get_settings", "instruction_inputs",
           "resolve_instruction_tokenizer"]

def resolve_instruction_tokenizer(cfg: FavorConfig, instruction_tokenizer, tokenizer):
    """The tokenizer for the visual Q-Former's instruction text.

    The LLM tokenizer stands in only when the Q-Former's word table was built for it (same size: the
    demo, tiny and small presets). For 7B/13B the InstructBLIP Q-Former has BERT's 30,523-row table
    while Llama ids reach 31,999: those ids would address the wrong rows (or none), so a missing
    ``visual.instruction_tokenizer`` is an error instead of a silent fallback.
    """
    if instruction_tokenizer is not None or tokenizer is None:
        return instruction_tokenizer
    v, llm = cfg.visual.qformer_vocab_size, cfg.llm.vocab_size
    if v != llm:
        raise ValueError(f"visual.instruction_tokenizer is not set and the LLM tokenizer cannot stand in: "
                         f"the visual Q-Former's word table has {v} rows, the LLM vocabulary {llm} ids; "
                         f"set visual.instruction_tokenizer to the Q-Former's tokenizer directory "
                         f"(bert-base-uncased for InstructBLIP)")
    return tokenizer


GENERATION_PRESETS = {
    "greedy": GenerationSettings(),
    "beam": GenerationSettings(num_beams=4),
    "sample": GenerationSettings(do_sample=True, top_p=0.9, temperature=0.7),
    # inference.py after commit c1a0c90: beam-sample, top_p 0.01, repetition penalty 1.5, 512 tokens.
    "release": GenerationSettings(max_new_tokens=512, num_beams=5, do_sample=True, top_p=0.01,
                                  temperature=1.0, repetition_penalty=1.5, length_penalty=1.0),
}


def get_settings(name: str, **overrides) -> GenerationSettings:
    if name not in GENERATION_PRESETS:
        raise ValueError(f"unknown generation preset {name!r}; choose one of {sorted(GENERATION_PRESETS)}")
    return dataclasses.replace(GENERATION_PRESETS[name], **overrides)


def instruction_inputs(tokenizer, prompts: list[str], max_tokens: int, device=None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt as the visual Q-Former's instruction: ids and mask [B, Li], padded to the longest.

    With the tokenizer's own special tokens, as the release and InstructBLIP feed BERT
    (``[CLS] text [SEP]``); truncated from the left like the release's ``truncation_side="left"``
    tokenizer, keeping the special tokens (the question sits at the end). Tokenizers that add no
    special tokens (the demo's SmolLM2, the tests' word-level one) give the bare text, as before."""
    rows = [_with_special_tokens(tokenizer, p, max_tokens) or [0] for p in prompts]
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _with_special_tokens(tokenizer, prompt: str, max_tokens: int) -> list[int]:
    """``tokenizer(prompt)`` ids, left-truncated to ``max_tokens`` with its special tokens kept."""
    full = list(tokenizer(prompt)["input_ids"])  # add_special_tokens=True: [CLS] ... [SEP] for BERT
    if len(full) <= max_tokens:
        return full
    special = tokenizer.get_special_tokens_mask(full, already_has_special_tokens=True)
    head = next((i for i, s in enumerate(special) if not s), len(full))  # leading specials
    tail = next((i for i, s in enumerate(reversed(special)) if not s), 0)  # trailing specials
    body = full[head:len(full) - tail][-(max_tokens - head - tail):] if max_tokens > head + tail else []
    return full[:head] + body + full[len(full) - tail:]


@torch.inference_mode()
def generate(model: FavorModel, av: AVEmbeddings, prompts: list[str],
             settings: GenerationSettings = GENERATION_PRESETS["greedy"]) -> list[str]:
    """Answers for each prompt given that sample's AV embeddings (release post-processing applied)."""
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer; build it with favor.build.build_model")
    embedding = model.llm.base.get_input_embeddings().weight.detach()  # [V, D]
    results = caption(TorchInference(model.llm.model), embedding, model.tokenizer, model.cfg.llm, prompts,
                      av.embeds, av.mask, settings)
    return [r.text for r in results]
