"""Text generation from AV embeddings: greedy, beam and sampling, plus the release's settings.

The torch path uses transformers' ``generate`` on spliced ``inputs_embeds`` (left padded, so every
row continues from its ``ASSISTANT:``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from favor.model import AVEmbeddings, FavorModel
from favor.prompt import clean_answer, inference_ids


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 64
    num_beams: int = 1
    do_sample: bool = False
    top_p: float = 1.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0


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

    Truncated from the left like the release's BERT tokenizer (the question sits at the end)."""
    rows = [list(tokenizer(p, add_special_tokens=False)["input_ids"])[-max_tokens:] or [0]
            for p in prompts]
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate(model: FavorModel, av: AVEmbeddings, prompts: list[str],
             settings: GenerationSettings = GENERATION_PRESETS["greedy"]) -> list[str]:
    """Answers for each prompt given that sample's AV embeddings (release post-processing applied)."""
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer; build it with favor.build.build_model")
    tok = model.tokenizer
    spliced = model.llm.splice([inference_ids(tok, p) for p in prompts], av.embeds, av.mask,
                               left_pad=True)
    eos = model.cfg.llm.eos_token_id
    out = model.llm.model.generate(
        inputs_embeds=spliced.embeds, attention_mask=spliced.attention_mask,
        max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams,
        do_sample=settings.do_sample, top_p=settings.top_p, temperature=settings.temperature,
        repetition_penalty=settings.repetition_penalty, length_penalty=settings.length_penalty,
        eos_token_id=eos, pad_token_id=eos,
    )
    # With inputs_embeds only, generate returns just the new tokens.
    return [clean_answer(tok.decode(row, skip_special_tokens=True)) for row in out]
