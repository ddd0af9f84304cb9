"""Causal Q-Former: shapes, release parameter names, window independence, block causality in both
orientations, and through the whole fusion stage (streaming == offline)."""

import pytest
import torch

from favor.config import get_config
from favor.qformer import CausalQFormer


def test_shapes_and_release_names(tiny_cfg):
    qf = CausalQFormer(tiny_cfg).eval()
    N, L = 4, tiny_cfg.tokens_per_window
    x, m = torch.randn(N, L, tiny_cfg.fused_width), torch.ones(N, L, dtype=torch.bool)
    out = qf(x, m)
    assert out.shape == (N, tiny_cfg.qformer.num_queries, tiny_cfg.qformer.hidden)
    x2 = x.clone()
    x2[0] += torch.randn_like(x2[0])  # windows are rows of the batch: changing window 0 moves it only
    out2 = qf(x2, m)
    assert torch.equal(out2[1:], out[1:]) and not torch.allclose(out2[0], out[0])
    names = set(dict(qf.named_parameters()))
    for expected in ["bert.embeddings.LayerNorm.weight",
                     "bert.encoder.layer.1.encoder_causal_attention.self.query.weight",
                     "bert.encoder.layer.0.encoder_causal_attention.output.LayerNorm.bias",
                     "bert.encoder.layer.0.crossattention.self.key.weight",
                     "bert.encoder.layer.0.intermediate_query.dense.weight",
                     "bert.encoder.layer.0.output_query.dense.weight",
                     "bert.encoder.layer.0.output_query.LayerNorm.weight",
                     "ln.weight", "position_embedding.weight", "query_tokens"]:
        assert expected in names, expected


def test_release_13b_parameter_count():
    cfg = get_config("favor-13b")
    with torch.device("meta"):
        qf = CausalQFormer(cfg)
    layer = sum(p.numel() for p in qf.bert.encoder.layer[0].parameters())
    assert layer == 20_077_824  # FAVOR-SPEC section 4
    bert = sum(p.numel() for p in qf.bert.parameters())
    assert bert == 40_157_184
    assert qf.query_tokens.numel() + qf.ln.weight.numel() * 2 + qf.position_embedding.weight.numel() \
        == 24_576 + 3_072 + 6_291_456


def _window_inputs(cfg, n=1):
    L = cfg.tokens_per_window
    return torch.randn(n, L, cfg.fused_width), torch.ones(n, L, dtype=torch.bool)


@pytest.mark.parametrize("orientation", ["past", "future"])
def test_causal_block_ignores_the_frames_it_may_not_see(orientation):
    """'past': frame f's causal-block output does not depend on frames > f (change the last frame);
    'future' (the release's triu): not on frames < f (change the first frame)."""
    cfg = get_config("tiny").replace(**{"qformer.orientation": orientation})
    qf = CausalQFormer(cfg).eval()
    x, m = _window_inputs(cfg)
    layer = qf.bert.encoder.layer[0].encoder_causal_attention
    S = cfg.tokens_per_frame
    h = qf.ln(x) + qf.position_embedding(torch.arange(x.shape[1]))[None]
    base = layer(h, m)
    changed = slice(2 * S, None) if orientation == "past" else slice(0, S)
    kept = slice(0, 2 * S) if orientation == "past" else slice(S, None)
    h2 = h.clone()
    h2[:, changed] += 1.0
    out = layer(h2, m)
    torch.testing.assert_close(out[:, kept], base[:, kept])
    assert not torch.allclose(out[:, changed], base[:, changed])


@torch.no_grad()
def test_past_windows_do_not_see_later_frames_so_streaming_equals_offline():
    """The whole fusion stage ('past'): changing frames of the last window leaves every earlier
    window's queries bit-identical, and a prefix of whole windows fuses to the same rows (up to fp32
    blocking), which is what lets the runtime caption window by window."""
    from favor.build import build_model

    cfg = get_config("tiny")
    torch.manual_seed(4)
    model = build_model(cfg, pretrained=False).eval()
    F, Nq = cfg.timing.frames_per_window, cfg.qformer.num_queries
    T = 3 * F
    visual = torch.randn(1, T, cfg.visual.num_query_tokens, cfg.visual_width)
    audio = torch.randn(1, round(T * cfg.timing.audio_tokens_per_frame), cfg.audio_proj_dim)
    base = model.fuse(visual, audio).embeds  # [1, 3*Nq, D]
    later = visual.clone()
    later[:, 2 * F:] += 1.0  # the third window's frames only
    moved = model.fuse(later, audio).embeds
    assert torch.equal(moved[:, : 2 * Nq], base[:, : 2 * Nq])
    assert not torch.allclose(moved[:, 2 * Nq:], base[:, 2 * Nq:])
    A = round(2 * F * cfg.timing.audio_tokens_per_frame)
    prefix = model.fuse(visual[:, : 2 * F], audio[:, :A], num_frames=2 * F).embeds
    # Same maths on fewer windows: only the GEMM row count changes, which can move the BLAS blocking of
    # fp32 reductions by a few ulp (measured 3.6e-7 on O(1) values), so 1e-5 and nothing looser.
    torch.testing.assert_close(prefix, base[:, : 2 * Nq], rtol=1e-5, atol=1e-5)


def test_padding_masked_out_of_cross_attention(tiny_cfg):
    qf = CausalQFormer(tiny_cfg).eval()
    x, m = _window_inputs(tiny_cfg)
    S = tiny_cfg.tokens_per_frame
    m[:, 2 * S:] = False
    base = qf(x, m)
    x2 = x.clone()
    x2[:, 2 * S:] = 5.0  # padded frame content changes: with 'past', nothing may move
    torch.testing.assert_close(qf(x2, m), base)


def test_ablation_without_causal_encoder(tiny_cfg):
    cfg = tiny_cfg.replace(**{"qformer.causal_encoder": False})
    qf = CausalQFormer(cfg)
    assert not any("encoder_causal_attention" in n for n, _ in qf.named_parameters())
    x, m = _window_inputs(cfg, 2)
    assert qf(x, m).shape == (2, 3, 36)


def _input_sensitivity(cfg) -> float:
    """How much the queries move between two random windows, relative to their scale (1 after LayerNorm)."""
    torch.manual_seed(0)
    q = CausalQFormer(cfg).eval()
    frames = cfg.timing.frames_per_window
    a, b = (torch.randn(1, frames * cfg.tokens_per_frame, cfg.fused_width) * 3 for _ in range(2))
    mask = torch.ones(a.shape[:2], dtype=torch.bool)
    with torch.no_grad():
        return float((q(a, mask) - q(b, mask)).std() / q(a, mask).std())


def test_xavier_window_init_lets_the_window_through_and_bert_draws_as_before():
    bert = get_config("demo", **{"qformer.window_init": "bert"})
    xavier = get_config("demo")  # the demo preset's choice
    assert xavier.qformer.window_init == "xavier"
    # measured 0.011 (bert) and 0.22 (xavier) on the demo preset's widths
    assert _input_sensitivity(bert) < 0.03 and _input_sensitivity(xavier) > 0.1
    torch.manual_seed(3)
    a = CausalQFormer(bert).state_dict()
    torch.manual_seed(3)
    b = CausalQFormer(xavier).state_dict()
    readers = ("crossattention.self.", "crossattention.output.dense", "encoder_causal_attention.self.",
               "encoder_causal_attention.output.dense")
    for k, v in a.items():  # xavier re-draws only the window readers' weights, after BERT's draws
        same = torch.equal(v, b[k])
        assert same != (any(r in k for r in readers) and k.endswith("weight")), k
    with pytest.raises(ValueError, match="window_init"):
        get_config("demo", **{"qformer.window_init": "kaiming"})
