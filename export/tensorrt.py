"""TensorRT engines for the encoder and fusion graphs (x86 GPUs and Jetson Orin, TensorRT >= 10.3).

Unverified on hardware here: TensorRT cannot be installed on our machines (NVIDIA's index is
unreachable, no GPU). Everything that does not need the library is computed in plain Python and
unit tested: optimisation profiles from the manifest's min/opt/max axes, precision flags, the
equivalent ``trtexec`` command lines (written into the bundle, handy on a Jetson where trtexec ships
with JetPack). ``build_engine`` is the real tensorrt Python API path, import-guarded.

Per graph: the block-causal plugin library (``favor.BlockCausalAttention``, IPluginV3) is loaded
before parsing when the bundle was exported with fused attention (the ONNX parser maps an unknown
op to a registered plugin of the same name); one optimisation profile spans min/opt/max of every
dynamic axis. The decoder is not built here: TensorRT-LLM builds it (export/trtllm.py).

Precision: fp16 and bf16 set the builder flag (Orin has no bf16: use fp16 there). int8 builds the
encoders in fp16; the decoder's int8 is TensorRT-LLM's weight-only int8, because these graphs carry
no Q/DQ scales and TensorRT 10 deprecates implicit (calibrated) int8.
"""

from __future__ import annotations

import ast
import ctypes
import json
import operator
import os
from pathlib import Path

ENGINE_STAGES = ("audio_encoder", "visual_encoder", "fusion")
PLUGIN_ENV = "FAVOR_TRT_PLUGIN"  # path to libfavor_trt_plugin.so (kernels/, built with TensorRT)
UNAVAILABLE = "TensorRT cannot be installed on this machine (NVIDIA index unreachable, no GPU)"
WORKSPACE_BYTES = 4 << 30  # 4 GiB: enough tactic scratch for the encoders; Orin Nano may need less

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def available() -> str | None:
    """None when the tensorrt module imports, else the reason it does not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return UNAVAILABLE
    return None


def eval_dim(dim: int | str, values: dict[str, int]) -> int:
    """A graph dimension (int, axis name, or an exporter expression like ``3*windows`` or
    ``(((mel_frames - 1)//2)) + 1``) evaluated at the given axis sizes."""
    if isinstance(dim, int):
        return dim

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in values:
                raise ValueError(f"dimension {dim!r} uses axis {node.id!r}, which has no profile")
            return values[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"dimension {dim!r} is not a linear expression of axes")

    return ev(ast.parse(str(dim), mode="eval"))


def profile_shapes(stage: dict, axes: dict[str, dict[str, int]]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Input name -> (min shape, opt shape, max shape) for one manifest stage."""
    out = {}
    for inp in stage["inputs"]:
        shapes = tuple(tuple(eval_dim(d, {a: v[k] for a, v in axes.items()}) for d in inp["shape"])
                       for k in ("min", "opt", "max"))
        out[inp["name"]] = shapes
    return out


def builder_flags(precision: str) -> list[str]:
    """tensorrt.BuilderFlag names for a bundle precision (see module docstring for int8)."""
    table = {"fp32": [], "fp16": ["FP16"], "bf16": ["BF16"], "int8": ["FP16"], "int4": ["FP16"]}
    if precision not in table:
        raise ValueError(f"precision ({precision!r}) must be one of {sorted(table)}")
    return table[precision]


def _shape_arg(shapes: dict[str, tuple], which: int) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, s[which]))}" for name, s in shapes.items())


def trtexec_command(onnx_file: str, engine_file: str, shapes: dict[str, tuple], precision: str,
                    plugin: str | None = None) -> list[str]:
    """The trtexec equivalent of ``build_engine`` (same profile, flags and plugin)."""
    cmd = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={engine_file}",
           f"--minShapes={_shape_arg(shapes, 0)}", f"--optShapes={_shape_arg(shapes, 1)}",
           f"--maxShapes={_shape_arg(shapes, 2)}", f"--memPoolSize=workspace:{WORKSPACE_BYTES >> 20}M"]
    cmd += [f"--{flag.lower()}" for flag in builder_flags(precision)]
    if plugin:
        cmd.append(f"--staticPlugins={plugin}")
    return cmd


def build_engine(onnx_path: str | Path, engine_path: str | Path, shapes: dict[str, tuple], precision: str,
                 plugin: str | None = None) -> Path:
    """Parse ``onnx_path`` and write a serialized engine with one optimisation profile."""
    reason = available()
    if reason:
        raise RuntimeError(reason)
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    if plugin:  # the plugin registers its creator on load; it must exist before parsing
        ctypes.CDLL(plugin, mode=ctypes.RTLD_GLOBAL)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"{onnx_path}: TensorRT could not parse the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    for flag in builder_flags(precision):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"{onnx_path}: TensorRT engine build failed (see the log above)")
    engine_path = Path(engine_path)
    engine_path.write_bytes(bytes(engine))
    return engine_path


def build_bundle_engines(bundle: Path, manifest: dict, precision: str, say=lambda s, m: None) -> str:
    """Write tensorrt/profiles.json and tensorrt/build_engines.sh; build the engines if TensorRT is here.

    Returns the target status for the manifest ("built" or "skipped: <reason>")."""
    out = bundle / "tensorrt"
    out.mkdir(exist_ok=True)
    plugin = os.environ.get(PLUGIN_ENV) if manifest["attention"] == "fused" else None
    if manifest["attention"] == "fused" and not plugin:
        plugin = "$FAVOR_TRT_PLUGIN"  # the script expects it; the Python build below needs it set
    profiles, lines = {}, ["#!/bin/sh", "# TensorRT engines for this bundle (written by favor-export).", "set -e",
                           'cd "$(dirname "$0")/.."']
    for stage in ENGINE_STAGES:
        if stage not in manifest["stages"]:
            continue
        shapes = profile_shapes(manifest["stages"][stage], manifest["dynamic_axes"])
        profiles[stage] = {n: {"min": s[0], "opt": s[1], "max": s[2]} for n, s in shapes.items()}
        graph = manifest["stages"][stage]["files"][0]
        lines.append(" ".join(trtexec_command(graph, f"tensorrt/{stage}.plan", shapes, precision, plugin)))
    (out / "profiles.json").write_text(json.dumps({"precision": precision, "flags": builder_flags(precision),
                                                   "profiles": profiles}, indent=2) + "\n")
    (out / "build_engines.sh").write_text("\n".join(lines) + "\n")
    reason = available()
    if reason:
        say("tensorrt", f"skipped: {reason}; wrote tensorrt/build_engines.sh")
        return f"skipped: {reason}"
    for stage, prof in profiles.items():
        shapes = {n: (tuple(p["min"]), tuple(p["opt"]), tuple(p["max"])) for n, p in prof.items()}
        build_engine(bundle / manifest["stages"][stage]["files"][0], out / f"{stage}.plan", shapes, precision,
                     plugin if plugin and not plugin.startswith("$") else None)
        say("tensorrt", f"built {stage}.plan")
    return "built"
