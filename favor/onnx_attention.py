"""Block-causal attention in ONNX: the custom node ``favor.BlockCausalAttention`` and a portable form.

Two ways to put ``favor::block_causal_attention`` (favor/ops.py) into an ONNX graph:

* ``custom``: one node ``BlockCausalAttention`` in domain ``favor`` (opset 1), inputs
  q, k, v [N, H, L, Dh] and key_padding_mask [N, L] bool (True = real token; all-true when the op
  had none), attributes ``tokens_per_frame`` (int) and ``orientation`` ('past' | 'future'), output
  [N, H, L, Dh]. Its ``onnx.defs.OpSchema`` is registered here so checkers and shape inference know
  it. ONNX Runtime CPU runs it through onnxruntime-extensions' Python-kernel bridge calling our C++
  kernel (``register_ort_kernel``); TensorRT maps it to the IPluginV3 plugin of the same name and
  version (kernels/trt/). The mask is always present so every backend sees one fixed signature.
* ``portable``: standard ONNX ops only (MatMul, Softmax, Where over a mask built from Range / Div),
  for runtimes without our kernel. It computes the masked-out half of the scores and discards it.

Use ``translation_table(mode)`` as ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxscript
import torch
from onnx import TensorProto
from onnx.defs import OpSchema
from onnxscript import opset18 as op

from favor import ops

DOMAIN = "favor"
OP_TYPE = "BlockCausalAttention"
OPSET_VERSION = 1
OP_DOC = ("Block-causal attention inside one window of frames (favor/attention.py): token i of frame "
          "i // tokens_per_frame attends keys of frames <= its own ('past') or >= its own ('future') "
          "that key_padding_mask marks real; rows that see no key are zeros.")

Mode = Literal["custom", "portable"]
ORT_LOG_ERROR = 3  # onnxruntime severity: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal


@functools.cache
def register_schema() -> OpSchema:
    """Register (once) and return the OpSchema of favor.BlockCausalAttention v1."""
    schema = OpSchema(
        OP_TYPE, DOMAIN, OPSET_VERSION, doc=OP_DOC,
        inputs=[
            OpSchema.FormalParameter("q", "T", "queries [N, H, L, Dh]"),
            OpSchema.FormalParameter("k", "T", "keys [N, H, L, Dh]"),
            OpSchema.FormalParameter("v", "T", "values [N, H, L, Dh]"),
            OpSchema.FormalParameter("key_padding_mask", "B", "[N, L], true = real token"),
        ],
        outputs=[OpSchema.FormalParameter("output", "T", "[N, H, L, Dh]")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"],
                           "attention dtype (fp32 accumulation)"),
                          ("B", ["tensor(bool)"], "padding mask")],
        attributes=[
            OpSchema.Attribute("tokens_per_frame", OpSchema.AttrType.INT, "tokens per frame S; L % S == 0"),
            OpSchema.Attribute("orientation", OpSchema.AttrType.STRING, "'past' (paper) or 'future' (release)"),
        ],
    )
    try:
        onnx.defs.get_schema(OP_TYPE, OPSET_VERSION, DOMAIN)
    except onnx.defs.SchemaError:
        onnx.defs.register_schema(schema)
    return schema


register_schema()
FAVOR_OPSET = onnxscript.values.Opset(DOMAIN, OPSET_VERSION)


def _all_real_mask(q):
    shape = op.Shape(q)  # [N, H, L, Dh]
    n_l = op.Concat(op.Slice(shape, [0], [1]), op.Slice(shape, [2], [3]), axis=0)  # [N, L]
    return op.ConstantOfShape(n_l, value=onnx.helper.make_tensor("true", TensorProto.BOOL, [1], [True]))


def custom_node(q, k, v, tokens_per_frame: int, orientation: str, key_padding_mask=None):
    """Translation of favor::block_causal_attention to the single favor.BlockCausalAttention node."""
    mask = _all_real_mask(q) if key_padding_mask is None else op.Cast(key_padding_mask, to=TensorProto.BOOL)
    return FAVOR_OPSET.BlockCausalAttention(q, k, v, mask, tokens_per_frame=tokens_per_frame,
                                            orientation=orientation)


def portable(q, k, v, tokens_per_frame: int, orientation: str, key_padding_mask=None):
    """The same maths from standard opset-18 ops (dynamic N and L; Dh read from the graph)."""
    if orientation not in ("past", "future"):
        raise ValueError(f"orientation ({orientation!r}) must be 'past' or 'future'")
    shape = op.Shape(q)
    head_dim = op.CastLike(op.Slice(shape, [3], [4]), q)  # [1]
    scores = op.Div(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), op.Sqrt(head_dim))  # [N, H, L, L]
    length = op.Squeeze(op.Slice(shape, [2], [3]), [0])
    frame = op.Div(op.Range(op.Constant(value_int=0), length, op.Constant(value_int=1)),
                   op.Constant(value_int=tokens_per_frame))  # [L] frame index of each token
    q_frame, k_frame = op.Unsqueeze(frame, [1]), op.Unsqueeze(frame, [0])  # [L, 1], [1, L]
    allowed = (op.LessOrEqual(k_frame, q_frame) if orientation == "past"
               else op.GreaterOrEqual(k_frame, q_frame))  # [L, L]
    if key_padding_mask is not None:
        real = op.Unsqueeze(op.Cast(key_padding_mask, to=TensorProto.BOOL), [1, 2])  # [N, 1, 1, L]
        allowed = op.And(allowed, real)  # [N, 1, L, L]
    neg_inf = op.CastLike(op.Constant(value_float=-math.inf), q)
    probs = op.Softmax(op.Where(allowed, scores, neg_inf), axis=-1)
    # A row with no visible key is all -inf -> NaN after Softmax; masked positions become 0, so
    # such rows return zeros as the reference does.
    probs = op.Where(allowed, probs, op.CastLike(op.Constant(value_float=0.0), q))
    return op.MatMul(probs, v)


def translation_table(mode: Mode = "custom") -> dict:
    """custom_translation_table for torch.onnx.export(dynamo=True) mapping our op to ONNX."""
    if mode not in ("custom", "portable"):
        raise ValueError(f"mode ({mode!r}) must be 'custom' or 'portable'")
    return {torch.ops.favor.block_causal_attention.default: custom_node if mode == "custom" else portable}


@functools.cache
def register_ort_kernel() -> str:
    """Register the onnxruntime-extensions Python kernel for favor.BlockCausalAttention (fp32).

    Returns the extensions library path to pass to ``SessionOptions.register_custom_ops_library``.
    The kernel calls favor._C directly on the NumPy buffers ONNX Runtime hands over.
    """
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    lib = ops.extension()

    @onnx_op(op_type=f"{DOMAIN}::{OP_TYPE}",
             inputs=[PyCustomOpDef.dt_float] * 3 + [PyCustomOpDef.dt_bool],
             outputs=[PyCustomOpDef.dt_float],
             attrs={"tokens_per_frame": PyCustomOpDef.dt_int64, "orientation": PyCustomOpDef.dt_string})
    def block_causal_attention(q, k, v, key_padding_mask, tokens_per_frame, orientation):
        q, k, v = (np.ascontiguousarray(x, dtype=np.float32) for x in (q, k, v))
        out = np.empty_like(q)
        lib.block_causal_attention(q, k, v, out, int(tokens_per_frame), str(orientation),
                                   np.ascontiguousarray(key_padding_mask, dtype=np.bool_))
        return out

    return get_library_path()


def uses_kernel(graph: onnx.ModelProto) -> bool:
    """True when the graph needs our kernel: exported with fused attention (metadata
    ``favor.attention``, export/onnx.py) or importing the ``favor`` domain."""
    props = {p.key: p.value for p in graph.metadata_props}
    return props.get("favor.attention") == "fused" or any(o.domain == DOMAIN for o in graph.opset_import)


def _read_graph(model) -> tuple[onnx.ModelProto, str | bytes]:
    """(graph without external weights, what InferenceSession loads). A file that cannot be read is a
    one-line ValueError naming it, never a later 'unknown op' from a fused graph."""
    if isinstance(model, onnx.ModelProto):
        return model, model.SerializeToString()
    if isinstance(model, bytes):
        return onnx.load_from_string(model), model
    try:
        return onnx.load(str(model), load_external_data=False), str(model)
    except Exception as err:  # noqa: BLE001 - protobuf/OS errors alike: name the file, one line
        raise ValueError(f"{model}: cannot read the ONNX graph ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'unreadable'})") from None


def ort_session(model: onnx.ModelProto | str | Path | bytes, threads: int | None = None,
                providers: Sequence[str] | None = None):
    """The one ONNX Runtime session builder (bundles, verify, tests).

    ``threads``: intra-op threads (None = ORT's default); ``providers``: execution providers in order
    (runtime/selection.py's choice; default the CPU provider). Our kernel's library is registered when
    the graph uses favor.BlockCausalAttention (``uses_kernel``).
    """
    import onnxruntime as ort

    graph, source = _read_graph(model)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = ORT_LOG_ERROR  # quiet by default: ORT's graph notes are not for users
    if uses_kernel(graph):
        opts.register_custom_ops_library(register_ort_kernel())
    return ort.InferenceSession(source, opts, providers=list(providers or ["CPUExecutionProvider"]))
