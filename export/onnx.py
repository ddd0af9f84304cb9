"""ONNX export of one stage wrapper with ``torch.onnx.export(dynamo=True)``.

Dynamic axes come from export/profiles.py (``torch.export.Dim`` with the profile's min/max). An axis
whose max is 1 stays static: torch.export specialises sizes 0/1, so it cannot be symbolic. Example
inputs use size >= 2 on every dynamic axis for the same reason.

Attention: ``portable`` (default) exports the reference block-causal attention as standard ops;
``fused`` routes ``window_attention`` through ``favor.ops`` and maps it to the custom node
``favor.BlockCausalAttention`` via favor/onnx_attention.py (ONNX Runtime runs it through
onnxruntime-extensions; TensorRT through the plugin library).

Every graph carries metadata ``favor.stage``, ``favor.config_sha256`` and ``favor.model_version``, so a
manifest whose config was edited no longer matches its graphs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn
from torch.export import Dim

from export.profiles import Axis
from favor.checkpoint import MODEL_VERSION
from favor.config import FavorConfig

# Opset 18: the dynamo exporter's native opset, and within TensorRT 10.3's ONNX parser (JetPack 6.x).
OPSET = 18


def config_sha256(cfg: FavorConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()


@dataclass
class ExportedStage:
    name: str
    files: list[str]  # graph first, then its external-data file if any
    inputs: list[dict]  # {"name", "dtype", "shape": [int | axis name]}
    outputs: list[dict]
    axes: list[str]  # dynamic axes this graph uses
    seconds: float


def _dims(spec: dict[str, dict], table: dict[str, Axis]) -> tuple[dict, dict[str, Dim]]:
    """Wrapper axis spec -> torch.export dynamic_shapes (shared Dim objects per axis name)."""
    dims: dict[str, Dim] = {}

    def dim(axis: str) -> Dim | None:
        a = table[axis]
        if a.max < 2:
            return None  # static (see module docstring)
        if axis not in dims:
            dims[axis] = Dim(axis, min=a.min, max=a.max)
        return dims[axis]

    shapes = {}
    for name, axes_of in spec.items():
        entry = {}
        for d, axis in axes_of.items():
            if isinstance(axis, tuple):  # ("windows", F): F x windows
                base = dim(axis[0])
                if base is not None:
                    entry[d] = axis[1] * base
            else:
                got = dim(axis)
                if got is not None:
                    entry[d] = got
        shapes[name] = entry or None
    return shapes, dims


def example_size(a: Axis) -> int:
    """A size inside the profile that torch.export keeps symbolic (>= 2 when allowed)."""
    return max(min(2, a.max), a.min) if a.max < 2 else min(max(2, a.min), a.max)


def _fused_table() -> dict:
    try:
        from favor import onnx_attention
    except ImportError as err:
        raise ValueError("fused attention export needs favor/onnx_attention.py (the ONNX mapping of "
                         f"favor.BlockCausalAttention), which is not available ({err}); "
                         "use --portable-attention") from None
    from favor import ops

    if not ops.available():  # without the kernel the op would silently fall back to the reference maths
        raise ValueError("fused attention export needs the compiled kernel favor._C (pip install -e . in the "
                         "repo root); use --portable-attention")
    onnx_attention.register_schema()  # without a schema the exporter assumes the node has no outputs
    return onnx_attention.translation_table("custom")


def _io(graph: onnx.GraphProto, kind: str) -> list[dict]:
    items = graph.input if kind == "input" else graph.output
    out = []
    for v in items:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                    "shape": shape})
    return out


def export_stage(wrapper: nn.Module, example: tuple[torch.Tensor, ...], table: dict[str, Axis],
                 out_dir: str | Path, cfg: FavorConfig, fused_attention: bool = False) -> ExportedStage:
    """Export ``wrapper`` (a frontend/decoder wrapper) to ``out_dir/<name>.onnx``."""
    from favor.attention import fused_attention as use_fused

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{wrapper.name}.onnx"
    wrapper = wrapper.eval()
    shapes, dims = _dims(wrapper.inputs(), table)
    extra = [n for n in wrapper.input_names if n not in shapes]
    if extra:
        raise ValueError(f"{wrapper.name}: inputs without an axis spec: {extra}")
    args = dict(zip(wrapper.input_names, example, strict=False))
    # The decoder's cache arrives as *past: group it the way forward receives it.
    n_named = wrapper.forward.__code__.co_argcount - 1
    named = list(wrapper.input_names[:n_named])
    rest = list(wrapper.input_names[n_named:])
    ds = {n: shapes[n] for n in named}
    if rest:
        ds["past"] = tuple(shapes[n] for n in rest)
    table_kw = {"custom_translation_table": _fused_table()} if fused_attention else {}
    start = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad(), use_fused(fused_attention), \
            contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(args[n] for n in wrapper.input_names), str(path), dynamo=True,
                          dynamic_shapes=ds, input_names=list(wrapper.input_names),
                          output_names=list(wrapper.output_names), opset_version=OPSET,
                          external_data=True, verbose=False, **table_kw)
    seconds = time.perf_counter() - start
    model = onnx.load(str(path), load_external_data=False)
    meta = {"favor.stage": wrapper.name, "favor.config_sha256": config_sha256(cfg),
            "favor.model_version": MODEL_VERSION, "favor.attention": "fused" if fused_attention else "portable"}
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, str(path))
    files = [path.name] + sorted({e.value for t in model.graph.initializer for e in t.external_data
                                  if e.key == "location"})
    used = sorted({a if isinstance(a, str) else a[0] for spec in wrapper.inputs().values()
                   for a in spec.values()} & {k for k in dims})
    return ExportedStage(wrapper.name, files, _io(model.graph, "input"), _io(model.graph, "output"),
                         used, seconds)
