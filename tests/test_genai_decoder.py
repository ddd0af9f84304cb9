"""The GenAI-builder decoder (export/genai_decoder.py), its IO-binding Inference (export/ort_decoder.py)
and the per-precision accuracy report (export/decoder_precisions.py), on a tiny model.

The tiny preset's head_dim (48 / 4 = 12) is refused by GroupQueryAttention's CPU kernel (multiple of
8 required), so the builder model here has 3 heads / 1 KV head: head_dim 16, GQA ratio 3, and the odd
sizes of the tiny preset elsewhere (FFN 37, vocab 101).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_tokenizer, tiny_gqa_model

from export import decoder_precisions, genai_decoder
from export.ort_decoder import GenaiInference, decoder_session
from favor.build import build_model
from favor.captions import TorchInference
from favor.config import get_config

pytest.importorskip("onnxruntime_genai")

STEPS = 6


@pytest.fixture(scope="module")
def model():
    return tiny_gqa_model()


@pytest.fixture(scope="module")
def graphs(model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("genai")
    out = {}
    for precision in genai_decoder.PRECISIONS:
        genai_decoder.export_decoder(model, root / precision, precision)
        out[precision] = root / precision / genai_decoder.GRAPH
    return out


def _embedding(model) -> np.ndarray:
    return model.llm.base.get_input_embeddings().weight.detach().float().numpy()


def _prompts(model, n: int = 3) -> list[decoder_precisions.Prompt]:
    g = torch.Generator().manual_seed(2)
    D = model.cfg.llm.hidden
    # embeddings at the scale of the LLM's own token embeddings
    scale = float(model.llm.base.get_input_embeddings().weight.std())
    return [decoder_precisions.Prompt(f"p{i}", torch.randn(1, 7 + 4 * i, D, generator=g) * scale,
                                  torch.ones(1, 7 + 4 * i, dtype=torch.long)) for i in range(n)]


def _run(inf, prompt, tokens):
    logits, cache = inf.prefill(prompt.embeds, prompt.attention_mask)
    out = [logits.clone()]
    for t in tokens:
        logits, cache = inf.decode(torch.tensor([t] * prompt.embeds.shape[0]), cache)
        out.append(logits.clone())
    return torch.stack(out)  # [steps + 1, B, V]


def test_builder_emits_fused_graph(graphs, model):
    g = onnx.load(str(graphs["fp32"]), load_external_data=False).graph
    ops = {n.op_type for n in g.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    assert "Softmax" not in ops and "Pow" not in ops  # attention and RMSNorm are not decomposed
    names = [i.name for i in g.input]
    assert "inputs_embeds" in names and "input_ids" not in names and "position_ids" not in names
    for precision, bits in (("int8", {8}), ("int4", {4, 8})):
        nodes = [n for n in onnx.load(str(graphs[precision]), load_external_data=False).graph.node
                 if n.op_type == "MatMulNBits"]
        attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
        # fused qkv, o, gate, up, down per layer, plus the LM head
        assert len(nodes) == 5 * model.cfg.llm.layers + 1
        assert {a["bits"] for a in attrs} == bits and {a["block_size"] for a in attrs} == {32}
        head = next(a for n, a in zip(nodes, attrs, strict=True) if "lm_head" in n.name)
        assert head["bits"] == 8  # int4 keeps the tied LM head at int8 (DEFAULT_OPTIONS)


def test_fp32_matches_torch(graphs, model):
    # Same maths, fused and reordered fp32 reductions: the ~1e-7 relative noise of a few dot
    # products of length <= 48 through 2 layers; 1e-5 leaves 50x headroom and still catches a wrong
    # position (RoPE) or a missing LoRA merge (both move logits by > 1e-2 of their scale).
    inf = GenaiInference(decoder_session(graphs["fp32"]), _embedding(model), model.cfg)
    ref = TorchInference(model.llm.model)  # LoRA unmerged
    tokens = list(range(5, 5 + STEPS))
    for p in _prompts(model):
        got, want = _run(inf, p, tokens), _run(ref, p, tokens)
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_io_binding_equals_plain_run(graphs, model):
    sess = decoder_session(graphs["int8"])
    tokens = [7, 3, 9, 11, 4, 8, 20, 1]
    p = _prompts(model, 2)[1]
    # reserve=2 forces the shared KV buffers to grow (reallocate + rebind) mid-caption
    bound = _run(GenaiInference(sess, _embedding(model), model.cfg, reserve=2), p, tokens)
    plain = _run(GenaiInference(sess, _embedding(model), model.cfg, share_buffer=False), p, tokens)
    torch.testing.assert_close(bound, plain, rtol=0, atol=1e-6)


def test_batch_rows_and_reorder(graphs, model):
    inf = GenaiInference(decoder_session(graphs["fp32"]), _embedding(model), model.cfg)
    p = _prompts(model, 1)[0]
    single = _run(inf, p, [5, 6])[:, 0]
    two = decoder_precisions.Prompt("b2", p.embeds.expand(2, -1, -1), p.attention_mask.expand(2, -1))
    logits, cache = inf.prefill(two.embeds, two.attention_mask)
    cache = inf.reorder(cache, torch.tensor([1, 1]))  # beam search picks rows
    out = [logits]
    for t in (5, 6):
        logits, cache = inf.decode(torch.tensor([t, t]), cache)
        out.append(logits)
    batched = torch.stack(out)  # [3, 2, V]
    for b in range(2):
        torch.testing.assert_close(batched[:, b], single, rtol=0, atol=1e-5)


def test_left_padded_batch_is_refused(graphs, model):
    inf = GenaiInference(decoder_session(graphs["fp32"]), _embedding(model), model.cfg)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    with pytest.raises(ValueError, match="left-padded"):
        inf.prefill(torch.zeros(2, 6, model.cfg.llm.hidden), mask)


def test_precision_report(graphs, model):
    prompts = _prompts(model)
    eos = model.cfg.llm.eos_token_id
    refs = [decoder_precisions.reference(model.llm.model, p, 10, eos) for p in prompts]
    rows = {}
    for precision, path in graphs.items():
        inf = GenaiInference(decoder_session(path), _embedding(model), model.cfg)
        rows[precision] = decoder_precisions.measure(inf, precision, prompts, refs, 10, eos)
    assert all(r.steps == sum(len(x[1]) for x in refs) for r in rows.values())
    assert rows["fp32"].passes and rows["fp32"].top1_agreement == 1.0
    # int8 weight-only must keep greedy captions token-identical (issue 10)
    assert rows["int8"].captions_identical == len(prompts) and rows["int8"].top1_agreement == 1.0
    assert 0.0 < rows["int8"].max_rel_logit_err < 0.1  # quantised, so not exact, but close
    # int4: reported, not required; its error exceeds int8's
    assert rows["int4"].max_rel_logit_err > rows["int8"].max_rel_logit_err
    assert 0.0 <= rows["int4"].top1_agreement <= 1.0
    table = decoder_precisions.markdown(decoder_precisions.as_dicts(list(rows.values())))
    assert "| int4 |" in table and "| int8 |" in table
    assert decoder_precisions.fastest_passing(decoder_precisions.as_dicts(list(rows.values()))) in ("int4", "int8")


def test_builder_options_validated():
    with pytest.raises(ValueError, match="block_size"):
        genai_decoder.BuilderOptions(block_size=48)
    with pytest.raises(ValueError, match="precision"):
        genai_decoder.build_graph(None, None, "/nonexistent", "int3")
    assert genai_decoder.extra_options("int4", genai_decoder.BuilderOptions(lm_head="int8"))[
        "matmul_mixed_precision"] == "last_matmul:int8"
    assert "block_size" not in genai_decoder.extra_options("fp32", genai_decoder.BuilderOptions())


def test_unsupported_model_names_why():
    # the bundle then falls back to our torch-dynamo export, weight-only quantised: exported and
    # verified end to end in tests/test_export.py (tiny preset, --precision int8)
    tiny = build_model(get_config("tiny"), pretrained=False, tokenizer=make_tokenizer())
    assert "head_dim 12" in genai_decoder.unsupported(tiny)
    tiny16 = build_model(get_config("tiny").replace(**{"llm.heads": 3, "llm.kv_heads": 1}), pretrained=False)
    assert "tokenizer" in genai_decoder.unsupported(tiny16)


@pytest.mark.slow
def test_demo_model_int8_disagrees_only_at_near_ties(tmp_path):
    """The trained demo model on the committed demo clip, weight-only int8 vs PyTorch, teacher-forced on
    PyTorch's greedy caption: at every step where int8's top-1 differs, PyTorch's own top-1/top-2 margin is
    below int8's measured logit noise -- the bundle verify rule's near-tie clause, applied step by step
    rather than only where the greedy captions first part. (Its 0.99 agreement threshold is meant for the
    420-step verify set, not one 48-step caption.) History on this clip: session-5 weights token-identical;
    session 6 and 7 one near-tie flip each (0.12 % / 0.08 % of the logit scale against int8's 4.7 % / 4.6 %);
    the session-12 weights three flips, the first at 0.05 % against 4.9 %."""
    from export.verify import load_clips
    from favor.checkpoint import load_model

    assets = Path(__file__).resolve().parents[1] / "favor" / "assets" / "demo"
    demo = load_model(assets / "favor-demo.safetensors").eval()
    media = load_clips([assets / "demo_clip.mp4"], demo, demo.cfg.timing.max_frames)
    (prompt,) = decoder_precisions.clip_prompts(demo, media, "Describe what you see and hear in this video.")
    tokens, ref_logits = decoder_precisions.reference(demo.llm.model, prompt, 48, demo.cfg.llm.eos_token_id)
    genai_decoder.export_decoder(demo, tmp_path, "int8")
    inf = GenaiInference(decoder_session(tmp_path / genai_decoder.GRAPH), _embedding(demo), demo.cfg)
    errs, agree = decoder_precisions.teacher_forced(inf, prompt, tokens, ref_logits)
    noise = max(errs)
    assert 0 < noise < 0.1  # int8 perturbs the logits, by a few percent of their scale
    flips = [step for step, ok in enumerate(agree) if not ok]
    assert len(flips) <= 0.1 * len(agree), flips  # mostly agreeing: one caption, not the verify set
    margins = {step: decoder_precisions.relative_margin(ref_logits[step]) for step in flips}
    assert all(m <= noise for m in margins.values()), (margins, noise)  # near ties: int8 may pick either


def test_auto_precision_resolves_by_model(model):
    # auto = the fastest precision that passes verify: weight-only int8 on the builder graph,
    # fp32 on the fallback export (tiny: head_dim 12), the kept one when no model is given
    assert genai_decoder.resolve_precision(model, "auto") == "int8"
    tiny = build_model(get_config("tiny"), pretrained=False, tokenizer=make_tokenizer())
    assert genai_decoder.resolve_precision(tiny, "auto") == "fp32"
    assert genai_decoder.resolve_precision(None, "auto", {"precision": "int4"}) == "int4"
    assert genai_decoder.resolve_precision(tiny, "int4") == "int4"


def test_bundle_pipeline_is_judged_by_its_decoder_precision():
    # favor-export verify: an fp32 bundle decoder must reproduce PyTorch's captions bit for bit; an int8 /
    # int4 one is held to its precision row (agreement, near-tie divergences), never to bit identity.
    from export.verify import captions_pass

    assert captions_pass([{"ort-fp32_identical": True}], "fp32", {})
    assert not captions_pass([{"ort-fp32_identical": True}, {"ort-fp32_identical": False}], "fp32", {})
    rows = {"rows": [{"precision": "int8", "passes": True}, {"precision": "int4", "passes": False}]}
    flipped = [{"ort-int8_identical": False}]
    assert captions_pass(flipped, "int8", rows)
    assert not captions_pass(flipped, "int4", rows)
    assert not captions_pass(flipped, "int8", {"rows": []})  # not measured: not passed


def test_verdict_allows_divergence_only_at_near_ties():
    # A quantised caption may leave the reference only where the reference itself was within the
    # precision's measured logit noise (a near tie); anywhere else it fails, as does low agreement.
    row = decoder_precisions.PrecisionRow("int8", max_rel_logit_err=0.03, top1_agreement=0.995, steps=200,
                                          captions_identical=1, captions=2)
    row.first_divergence["clip"], row.divergence_margin_rel["clip"] = 14, 0.002
    assert row.near_tie_divergences and row.passes
    row.divergence_margin_rel["clip"] = 0.2  # a confident reference token was flipped
    assert not row.near_tie_divergences and not row.passes
    row.divergence_margin_rel["clip"], row.top1_agreement = 0.002, 0.85  # int4-like agreement
    assert not row.passes
    fp32 = decoder_precisions.PrecisionRow("fp32", max_rel_logit_err=3e-6, captions_identical=1, captions=2)
    assert not fp32.passes  # fp32 must be identical: its noise is reordering only
