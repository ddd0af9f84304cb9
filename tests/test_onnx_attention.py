"""favor.BlockCausalAttention in ONNX: schema, dynamo export, ORT (custom node and portable form).

Tolerances: ORT and PyTorch both run fp32 attention with different summation orders (and the
portable graph's Softmax differs from torch's), so outputs of O(1) agree to a few fp32 ulps per
reduction over <= 100 keys; 1e-5 absolute leaves ~10x headroom over the ~1e-6 observed.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from favor import attention, ops
from favor import onnx_attention as oa
from favor.attention import reference_attention

ATOL = 1e-5  # see module docstring


class _Attn(torch.nn.Module):
    """Projections around the op, so the exported graph has real work before and after the node."""

    def __init__(self, width=24, heads=3, tokens_per_frame=5, orientation="past", with_mask=True):
        super().__init__()
        self.qkv, self.proj = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.heads, self.tpf, self.orientation, self.with_mask = heads, tokens_per_frame, orientation, with_mask

    def forward(self, x, mask):
        N, L, E = x.shape
        qkv = self.qkv(x).reshape(N, L, 3, self.heads, E // self.heads)  # [N, L, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N, H, L, Dh]
        out = ops.block_causal_attention(q, k, v, self.tpf, self.orientation, mask if self.with_mask else None)
        return self.proj(out.transpose(1, 2).reshape(N, L, E))  # [N, L, E]


def _export(module, args, mode):
    dims = torch.export.Dim("windows"), torch.export.Dim("frames", max=64)
    length = 5 * dims[1]  # L stays a multiple of tokens per frame
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, input_names=["x", "mask"],
                                    custom_translation_table=oa.translation_table(mode),
                                    dynamic_shapes=({0: dims[0], 1: length}, {0: dims[0], 1: length}))
    return program.model_proto


def test_schema_registered_and_checked():
    schema = onnx.defs.get_schema("BlockCausalAttention", 1, "favor")
    assert [i.name for i in schema.inputs] == ["q", "k", "v", "key_padding_mask"]
    assert set(schema.attributes) == {"tokens_per_frame", "orientation"}
    node = helper.make_node("BlockCausalAttention", ["q", "k", "v", "m"], ["y"], domain="favor",
                            tokens_per_frame=4, orientation="future")
    qi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, 8, 16]) for n in "qkv"]
    graph = helper.make_graph([node], "g", qi + [helper.make_tensor_value_info("m", TensorProto.BOOL, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8, 16])])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18),
                                                                   helper.make_opsetid("favor", 1)])
    onnx.checker.check_model(model, full_check=True)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 8, 16, generator=g) for _ in range(3))
    m = torch.tensor([[1] * 8, [1] * 5 + [0] * 3], dtype=torch.bool)
    (y,) = oa.ort_session(model).run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "m": m.numpy()})
    np.testing.assert_allclose(y, reference_attention(q, k, v, 4, "future", m).numpy(), rtol=0, atol=ATOL)


@pytest.mark.parametrize("mode", ["custom", "portable"])
@pytest.mark.parametrize("orientation,with_mask", [("past", True), ("future", False)])
def test_dynamo_export_runs_in_ort_and_matches_torch(mode, orientation, with_mask):
    torch.manual_seed(0)
    module = _Attn(orientation=orientation, with_mask=with_mask).eval()
    x, mask = torch.randn(2, 15, 24), torch.rand(2, 15) > 0.3
    model = _export(module, (x, mask), mode)
    node_types = {(n.domain, n.op_type) for n in model.graph.node}
    assert (("favor", "BlockCausalAttention") in node_types) == (mode == "custom")
    sess = oa.ort_session(model) if mode == "custom" else ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"])
    # Run at a different window count and length than exported: the axes are dynamic.
    x2, mask2 = torch.randn(3, 35, 24), torch.rand(3, 35) > 0.3
    mask2[0, :10] = False  # 'past': the first two frames of window 0 see only padding -> zero rows
    feeds = {"x": x2.numpy(), "mask": mask2.numpy()}
    feeds = {i.name: feeds[i.name] for i in sess.get_inputs()}  # an unused mask input is dropped
    (y,) = sess.run(None, feeds)
    with torch.no_grad():
        expected = module(x2, mask2)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, expected.numpy(), rtol=0, atol=ATOL)


def test_translation_table_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode \\('fast'\\) must be 'custom' or 'portable'"):
        oa.translation_table("fast")


def test_causal_qformer_exports_with_custom_node():
    """End to end: the tiny causal Q-Former with the fused path exports to a graph holding the
    custom node, and ORT CPU (our kernel via onnxruntime-extensions) reproduces PyTorch."""
    qformer = pytest.importorskip("favor.qformer")
    from favor.config import get_config

    cfg = get_config("tiny")
    cfg.qformer.mask_padding_in_causal = True
    torch.manual_seed(0)
    model = qformer.CausalQFormer(cfg).eval()
    L = cfg.tokens_per_window
    x = torch.randn(2, L, cfg.fused_width)
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[1, L // 2:] = False
    # no_grad: with parameters requiring grad, window_attention keeps the differentiable reference.
    with attention.fused_attention(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x, mask), dynamo=True, input_names=["tokens", "token_mask"],
                                    custom_translation_table=oa.translation_table("custom"),
                                    dynamic_shapes=({0: torch.export.Dim("windows")},
                                                    {0: torch.export.Dim("windows")}))
    onnx_model = program.model_proto
    assert any(n.domain == "favor" and n.op_type == "BlockCausalAttention" for n in onnx_model.graph.node)
    x3, mask3 = torch.randn(3, L, cfg.fused_width), torch.ones(3, L, dtype=torch.bool)
    mask3[2, 3:] = False
    (y,) = oa.ort_session(onnx_model).run(None, {"tokens": x3.numpy(), "token_mask": mask3.numpy()})
    with torch.no_grad():
        expected = model(x3, mask3)  # the reference path
    np.testing.assert_allclose(y, expected.numpy(), rtol=0, atol=ATOL)
