"""One decode loop for every backend: greedy over TorchInference equals transformers' generate."""

from __future__ import annotations

import pytest
import torch

from favor.build import build_model
from favor.captions import TorchInference, beam_decode, decode_text, greedy_decode
from favor.generation import GenerationSettings, generate
from favor.model import AVEmbeddings
from favor.prompt import inference_ids


@pytest.fixture
def model(tiny_cfg, tokenizer):
    torch.manual_seed(3)
    return build_model(tiny_cfg, pretrained=False, tokenizer=tokenizer).eval()


def _av(model, B=2, W=2):
    cfg = model.cfg
    Nq = cfg.qformer.num_queries
    embeds = torch.randn(B, W * Nq, cfg.llm.hidden)
    mask = torch.ones(B, W * Nq, dtype=torch.bool)
    if B > 1:
        mask[1, Nq:] = False  # unequal lengths: left padding is exercised
    return AVEmbeddings(embeds, mask, torch.zeros(B, W, Nq, cfg.qformer.hidden), mask.view(B, W, Nq)[..., 0])


def test_greedy_matches_hf_generate(model, tokenizer):
    av = _av(model)
    prompts = ["describe the video", "what sound is it"]
    n = 7
    ref = generate(model, av, prompts, GenerationSettings(max_new_tokens=n))
    spliced = model.llm.splice([inference_ids(tokenizer, p) for p in prompts], av.embeds, av.mask, left_pad=True)
    out = greedy_decode(TorchInference(model.llm.model), spliced.embeds, spliced.attention_mask, n,
                        model.cfg.llm.eos_token_id)
    assert [r.text for r in decode_text(out, tokenizer)] == ref
    assert all(len(r.margins) == len(r.tokens) and min(r.margins) >= 0 for r in out)


def test_beam_one_equals_greedy_and_beams_score_higher(model, tokenizer):
    av = _av(model, B=1, W=1)
    s = model.llm.splice([inference_ids(tokenizer, "describe")], av.embeds, av.mask, left_pad=True)
    inf = TorchInference(model.llm.model)
    eos = model.cfg.llm.eos_token_id
    greedy = greedy_decode(inf, s.embeds, s.attention_mask, 6, eos)[0]
    beam1 = beam_decode(inf, s.embeds, s.attention_mask, 6, eos, num_beams=1)[0]
    assert beam1.tokens == greedy.tokens
    beam4 = beam_decode(inf, s.embeds, s.attention_mask, 6, eos, num_beams=4, length_penalty=0.0)[0]
    assert beam4.score >= greedy.score - 1e-5  # beam search never finds a worse sum log-prob


def test_decode_rejects_bad_lengths(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_decode(TorchInference(model.llm.model), torch.zeros(1, 2, model.cfg.llm.hidden),
                      torch.ones(1, 2), 0, 2)
