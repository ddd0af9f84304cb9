"""The one decode loop (favor.captions): greedy equals transformers' generate (kept here only as the
reference), streaming reports every token, the presets' logits processing matches transformers'
processors, and sampling repeats with its seed."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from favor.build import build_model
from favor.captions import (
    GenerationSettings,
    TorchInference,
    beam_decode,
    caption,
    decode,
    greedy_decode,
    penalise_repeats,
    warp,
)
from favor.generation import generate, get_settings
from favor.model import AVEmbeddings
from favor.prompt import clean_answer, inference_ids


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


def _spliced(model, tokenizer, av, prompts):
    return model.llm.splice([inference_ids(tokenizer, p) for p in prompts], av.embeds, av.mask, left_pad=True)


def test_greedy_matches_hf_generate(model, tokenizer):
    """HF generate is the reference only here: our loop (prompt-table assembly) must pick the same ids."""
    av = _av(model)
    prompts = ["describe the video", "what sound is it"]
    n = 7
    s = _spliced(model, tokenizer, av, prompts)
    eos = model.cfg.llm.eos_token_id
    with torch.inference_mode():
        ref = model.llm.model.generate(inputs_embeds=s.embeds, attention_mask=s.attention_mask, max_new_tokens=n,
                                       do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=eos)
    want = [clean_answer(tokenizer.decode(row, skip_special_tokens=True)) for row in ref]
    assert generate(model, av, prompts, GenerationSettings(max_new_tokens=n)) == want
    out = greedy_decode(TorchInference(model.llm.model), s.embeds, s.attention_mask, n, eos)
    assert [[t for t in row.tolist() if t != eos] for row in ref] == [r.tokens for r in out]
    assert all(len(r.margins) == len(r.tokens) and min(r.margins) >= 0 for r in out)


def test_streamed_tokens_concatenate_to_the_result(model, tokenizer):
    av = _av(model)
    streamed: dict[int, list[int]] = {0: [], 1: []}
    emb = model.llm.base.get_input_embeddings().weight.detach()
    out = caption(TorchInference(model.llm.model), emb, tokenizer, model.cfg.llm, ["describe", "what is it"],
                  av.embeds, av.mask, GenerationSettings(max_new_tokens=6),
                  on_token=lambda b, t: streamed[b].append(t))
    assert [streamed[0], streamed[1]] == [r.tokens for r in out] and out[0].tokens
    assert [r.text for r in out] == generate(model, av, ["describe", "what is it"], get_settings("greedy",
                                                                                                max_new_tokens=6))
    assert out[1].prompt_tokens < out[0].prompt_tokens  # sample 1 has one window of AV rows, sample 0 two


def test_beam_one_equals_greedy_and_beams_score_higher(model, tokenizer):
    av = _av(model, B=1, W=1)
    s = _spliced(model, tokenizer, av, ["describe"])
    inf = TorchInference(model.llm.model)
    eos = model.cfg.llm.eos_token_id
    greedy = greedy_decode(inf, s.embeds, s.attention_mask, 6, eos)[0]
    beam1 = beam_decode(inf, s.embeds, s.attention_mask, 6, eos, num_beams=1)[0]
    assert beam1.tokens == greedy.tokens
    beam4 = beam_decode(inf, s.embeds, s.attention_mask, 6, eos, num_beams=4, length_penalty=0.0)[0]
    assert beam4.score >= greedy.score - 1e-5  # beam search never finds a worse sum log-prob


def test_logits_processing_matches_transformers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, generator=g) * 3
    history = [[1, 4, 4], [], [10, 0]]
    ids = torch.tensor([[1, 4, 4], [7, 7, 7], [10, 0, 0]])  # row 1: HF needs ids; ours has no history
    want = RepetitionPenaltyLogitsProcessor(1.5)(ids, logits.clone())
    got = penalise_repeats(logits, history, 1.5)
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], rtol=0, atol=0)  # same formula, same floats
    assert torch.equal(got[1], logits[1])
    for top_p in (0.01, 0.5, 0.9):
        ref = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(0.7)(None, logits.clone()))
        assert torch.equal(torch.isinf(warp(logits, 0.7, top_p)), torch.isinf(ref))
    assert int(torch.isfinite(warp(logits, 1.0, 0.01)).sum(-1).max()) == 1  # a tiny nucleus keeps the argmax


def test_sampling_repeats_with_its_seed_and_presets_run(model, tokenizer):
    av = _av(model)
    s = _spliced(model, tokenizer, av, ["a", "b"])
    inf, eos = TorchInference(model.llm.model), model.cfg.llm.eos_token_id
    sample = get_settings("sample", max_new_tokens=6, temperature=5.0, top_p=1.0)  # flat: draws differ by seed
    runs = [[r.tokens for r in decode(inf, s.embeds, s.attention_mask, eos, sample)] for _ in range(2)]
    assert runs[0] == runs[1]
    others = [[r.tokens for r in decode(inf, s.embeds, s.attention_mask, eos, get_settings(
        "sample", max_new_tokens=6, temperature=5.0, top_p=1.0, seed=k))] for k in range(1, 4)]
    assert any(o != runs[0] for o in others)
    release = get_settings("release", max_new_tokens=5)
    a = decode(inf, s.embeds, s.attention_mask, eos, release)
    b = decode(inf, s.embeds, s.attention_mask, eos, release)
    assert [r.tokens for r in a] == [r.tokens for r in b] and all(len(r.tokens) <= 5 for r in a)
    for r in a:  # repetition penalty 1.5 with a 1 % nucleus: no token repeats in 5 steps of a tiny model
        assert len(set(r.tokens)) == len(r.tokens) or len(r.tokens) <= 1


def test_decode_rejects_bad_settings(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_decode(TorchInference(model.llm.model), torch.zeros(1, 2, model.cfg.llm.hidden),
                      torch.ones(1, 2), 0, 2)
    for bad in ({"top_p": 0.0}, {"temperature": 0.0}, {"num_beams": 0}, {"repetition_penalty": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GenerationSettings(**bad)
