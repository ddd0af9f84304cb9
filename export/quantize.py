"""Weight-only quantisation of our own decoder export (the fallback when the GenAI builder cannot serve
a model, see export/genai_decoder.py): every MatMul with a constant weight becomes ``MatMulNBits``
(ONNX Runtime's ``MatMulNBitsQuantizer``), int8 or int4, with the builder's block size, symmetry and
accuracy level so both decoder kinds quantise alike.

The former dynamic int8 decoder (``quantize_dynamic``: int8 weights per channel, activations per call)
is gone: on the trained demo model its activation outliers changed the greedy captions (issue 10).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import onnx

BITS = {"int8": 8, "int4": 4}
# Graphs above this size go to external data: protobuf's hard limit is 2 GiB.
_PROTOBUF_LIMIT_BYTES = 2 * 1024**3
_EXTERNAL_DATA_MARGIN = 0.75


def quantize_weights(src: str | Path, dst: str | Path, precision: str, block_size: int = 32,
                     symmetric: bool = True, accuracy_level: int = 4) -> list[str]:
    """Weight-only ``precision`` (int8 | int4) of ``src`` into ``dst``; returns the files written."""
    if precision not in BITS:
        raise ValueError(f"weight-only precision ({precision!r}) must be one of {sorted(BITS)}")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    logging.disable(logging.ERROR)  # the quantizer logs every node at INFO
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            q = MatMulNBitsQuantizer(model, bits=BITS[precision], block_size=block_size, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level)
            q.process()
    finally:
        logging.disable(logging.NOTSET)
    out = q.model.model
    onnx.helper.set_model_props(out, dict(props, **{"favor.precision": precision}))
    external = out.ByteSize() > _EXTERNAL_DATA_MARGIN * _PROTOBUF_LIMIT_BYTES
    data = dst.name + ".data"
    onnx.save(out, str(dst), save_as_external_data=external, location=data)
    return [dst.name] + ([data] if external else [])
