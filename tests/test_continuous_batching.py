"""Continuous batching (favor/continuous.py): requests that join and leave the running batch between
decode steps decode exactly what each decodes alone with greedy_decode, on the PyTorch decoder
(left-padded rows) and on the GenAI builder graph (per-row lengths in the shared KV buffer).

The tiny builder model needs head_dim a multiple of 8 (GroupQueryAttention's CPU kernel): 3 heads /
1 KV head, as in tests/test_genai_decoder.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gqa_model

from favor.captions import DecodeState, TorchInference, greedy_decode
from favor.continuous import ContinuousBatch, run_alone

# Prompt lengths (odd, all different: rows of the batch hold different lengths) and length limits
# (different: rows leave at different steps).
LENGTHS = (7, 12, 5, 9)
LIMITS = (6, 3, 8, 5)
# Batched rows go through the same maths with other rows beside them. GenAI: GroupQueryAttention
# attends per row over its own length and the GEMMs are row-independent, so rows come out bit for
# bit (measured: 0 difference). Torch: left padding changes the attention reduction length, fp32
# noise measured at 6e-8 on logits of scale 0.38 (~2e-7 relative). Margins (top-1 minus top-2 logit)
# are compared at 1e-6 (17x the measured noise), and the test only counts if every reference step's
# margin exceeds 1e-4 (100x the tolerance, so that noise cannot flip a token; checked, not assumed).
MARGIN_ATOL = 1e-6
MIN_MARGIN = 1e-4


@pytest.fixture(scope="module")
def model():
    return tiny_gqa_model()


@pytest.fixture(scope="module")
def prompts(model):
    g = torch.Generator().manual_seed(3)
    scale = float(model.llm.base.get_input_embeddings().weight.std())
    D = model.cfg.llm.hidden
    return [(torch.randn(1, n, D, generator=g) * scale, torch.ones(1, n, dtype=torch.long)) for n in LENGTHS]


@pytest.fixture(scope="module")
def genai(model, tmp_path_factory):
    pytest.importorskip("onnxruntime_genai")
    from export import genai_decoder
    from export.ort_decoder import GenaiInference, decoder_session

    d = tmp_path_factory.mktemp("cb-genai")
    genai_decoder.export_decoder(model, d, "fp32")
    emb = model.llm.base.get_input_embeddings().weight.detach().float().numpy()
    return GenaiInference(decoder_session(d / genai_decoder.GRAPH), emb, model.cfg)


def inferences(model, genai_inf):
    return {"torch": TorchInference(model.llm.model), "genai": genai_inf}


def reference(inf, prompts, eos):
    out = []
    for (e, m), limit, eos_i in zip(prompts, LIMITS, eos, strict=True):
        r = greedy_decode(inf, e, m, limit, eos_i)[0]
        out.append(r)
    return out


def eos_ids(model, inf, prompts) -> list[int]:
    """Request 2 ends by EOS at its third token (its own greedy token there is declared EOS); the
    others use an id they never produce, so they end by their limit."""
    never = model.cfg.llm.vocab_size - 1
    third = greedy_decode(inf, *prompts[2], 3, never)[0].tokens[2]
    return [never, never, third, never]


@pytest.mark.parametrize("kind", ["torch", "genai"])
def test_join_and_leave_equal_alone(model, prompts, genai, kind):
    inf = inferences(model, genai)[kind]
    eos = eos_ids(model, inf, prompts)
    assert eos[2] != eos[0]
    want = reference(inf, prompts, eos)
    for r in want:
        assert min(r.margins) > MIN_MARGIN
    assert len(want[2].tokens) == 2  # ended by EOS, not reported
    sizes: list[int] = []
    batch = ContinuousBatch(inf, on_step=sizes.append)
    states = [DecodeState(eos[i], LIMITS[i]) for i in range(len(prompts))]
    done = {}

    def step():
        for req in batch.step():
            done[req.tag] = req.state.result

    batch.join(*prompts[0], states[0], tag=0)
    step()
    step()
    batch.join(*prompts[1], states[1], tag=1)  # joins a batch already two steps in
    step()
    batch.join(*prompts[2], states[2], tag=2)
    batch.join(*prompts[3], states[3], tag=3)  # two join at once
    while batch.active:
        step()
    step()
    assert sorted(done) == [0, 1, 2, 3]
    assert max(sizes) >= 3 and sizes[-1] < max(sizes)  # rows really shared steps, and left
    for i, r in enumerate(want):
        got = done[i]
        assert got.tokens == r.tokens, f"request {i}"
        torch.testing.assert_close(torch.tensor(got.margins), torch.tensor(r.margins), rtol=0, atol=MARGIN_ATOL)
        assert abs(got.score - r.score) < MARGIN_ATOL * len(r.tokens)


@pytest.mark.parametrize("kind", ["torch", "genai"])
def test_cancel_leaves_others_untouched(model, prompts, genai, kind):
    inf = inferences(model, genai)[kind]
    never = model.cfg.llm.vocab_size - 1
    want = reference(inf, prompts, [never] * 4)
    batch = ContinuousBatch(inf)
    for i in (0, 1, 3):
        batch.join(*prompts[i], DecodeState(never, LIMITS[i]), tag=i)
    batch.step()
    batch.cancel(0)
    done = {}
    while batch.active:
        for req in batch.step():
            done[req.tag] = req.state.result
    assert sorted(done) == [1, 3]
    for i in (1, 3):
        assert done[i].tokens == want[i].tokens


def test_run_alone_equals_greedy_decode(model, prompts):
    inf = TorchInference(model.llm.model)
    never = model.cfg.llm.vocab_size - 1
    for (e, m), limit in zip(prompts, LIMITS, strict=True):
        alone = run_alone(inf, e, m, DecodeState(never, limit))
        want = greedy_decode(inf, e, m, limit, never)[0]
        assert alone.tokens == want.tokens and alone.margins == want.margins  # same path: bit for bit


def test_done_at_prefill(model, prompts):
    """A request whose limit is one token finishes at its prefill and never takes a row."""
    inf = TorchInference(model.llm.model)
    batch = ContinuousBatch(inf)
    state = DecodeState(model.cfg.llm.vocab_size - 1, 1)
    batch.join(*prompts[0], state, tag="one")
    assert batch.active == 0
    finished = batch.step()
    assert [r.tag for r in finished] == ["one"] and len(state.result.tokens) == 1
