"""CPU edge precision: int8 dynamic quantisation of exported graphs (onnxruntime.quantization).

Weights of every MatMul/Gemm with a constant weight become int8 (per output channel, symmetric);
activations are quantised per call (``DynamicQuantizeLinear``), so no calibration data is needed.
The decoder holds almost all the weights and dominates decode time, so it is the default target;
the accuracy change is measured by ``export.verify`` (logit error, top-1 agreement, caption identity)
and bounded in tests/test_export.py.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import onnx

# Graphs above this size go to external data: protobuf's hard limit is 2 GiB.
_PROTOBUF_LIMIT_BYTES = 2 * 1024**3
_EXTERNAL_DATA_MARGIN = 0.75


def quantize_graph(src: str | Path, dst: str | Path) -> list[str]:
    """int8 dynamic quantisation of ``src`` into ``dst``; returns the files written (graph first)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    size = src.stat().st_size + sum(p.stat().st_size for p in src.parent.glob(src.name + ".data"))
    external = size > _EXTERNAL_DATA_MARGIN * _PROTOBUF_LIMIT_BYTES
    logging.getLogger().setLevel(logging.ERROR)  # the "run pre-processing first" hint is for CNNs
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         use_external_data_format=external)
    src_props = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    model = onnx.load(str(dst), load_external_data=False)
    props = dict(src_props, **{"favor.precision": "int8"})
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(dst))
    files = [dst.name] + sorted({e.value for t in model.graph.initializer for e in t.external_data
                                 if e.key == "location"})
    return files
