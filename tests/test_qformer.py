"""Causal Q-Former: shapes, release parameter names, causality through the whole stage."""

import torch

from favor.config import get_config
from favor.qformer import CausalQFormer


def test_shapes_and_release_names(tiny_cfg):
    qf = CausalQFormer(tiny_cfg).eval()
    N, L = 4, tiny_cfg.tokens_per_window
    out = qf(torch.randn(N, L, tiny_cfg.fused_width), torch.ones(N, L, dtype=torch.bool))
    assert out.shape == (N, tiny_cfg.qformer.num_queries, tiny_cfg.qformer.hidden)
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


def test_past_orientation_ignores_later_frames_in_causal_block():
    """With 'past', the causal block's output for frame f does not depend on frames > f."""
    cfg = get_config("tiny")
    qf = CausalQFormer(cfg).eval()
    x, m = _window_inputs(cfg)
    layer = qf.bert.encoder.layer[0].encoder_causal_attention
    S = cfg.tokens_per_frame
    h = qf.ln(x) + qf.position_embedding(torch.arange(x.shape[1]))[None]
    base = layer(h, m)
    h2 = h.clone()
    h2[:, 2 * S:] += 1.0  # change the last frame only
    out = layer(h2, m)
    torch.testing.assert_close(out[:, : 2 * S], base[:, : 2 * S])
    assert not torch.allclose(out[:, 2 * S:], base[:, 2 * S:])


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
