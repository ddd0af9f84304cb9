"""The one ONNX Runtime session builder (favor.onnx_attention.ort_session) and the one place the
bundle's decoder implementation is chosen (export.ort_inference.DECODERS)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from export.ort_inference import DECODERS, DYNAMO, OrtInference, decoder_class
from favor import onnx_attention as oa


def _identity(path, metadata: dict[str, str] | None = None):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    for k, v in (metadata or {}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return model


def test_session_threads_providers_and_kernel_detection(tmp_path):
    plain = _identity(tmp_path / "plain.onnx", {"favor.attention": "portable"})
    fused = _identity(tmp_path / "fused.onnx", {"favor.attention": "fused"})
    assert not oa.uses_kernel(plain) and oa.uses_kernel(fused)
    sess = oa.ort_session(tmp_path / "plain.onnx", threads=1, providers=["CPUExecutionProvider"])
    assert sess.get_providers() == ["CPUExecutionProvider"] and sess.get_session_options().intra_op_num_threads == 1
    (y,) = oa.ort_session(tmp_path / "fused.onnx").run(None, {"x": np.ones(2, np.float32)})  # kernel registered
    assert y.tolist() == [1.0, 1.0]


def test_unreadable_graph_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "fusion.onnx"
    bad.write_bytes(b"\x08\x07 this is not a protobuf \xff\xff")
    with pytest.raises(ValueError, match=r"fusion\.onnx: cannot read the ONNX graph") as e:
        oa.ort_session(bad)
    assert "\n" not in str(e.value)


def test_decoder_implementation_is_chosen_by_the_manifest_kind(tmp_path):
    def bundle(stage: dict):
        return SimpleNamespace(path=tmp_path, manifest={"stages": {"decoder": stage}})

    assert decoder_class(bundle({"files": ["decoder.onnx"]}), "decoder") is OrtInference  # no kind: our export
    assert decoder_class(bundle({"kind": DYNAMO}), "decoder") is OrtInference and DYNAMO in DECODERS
    with pytest.raises(ValueError, match=r"manifest\.json: decoder stage decoder has kind 'other', this runtime "
                                         r"knows \["):
        decoder_class(bundle({"kind": "other"}), "decoder")
