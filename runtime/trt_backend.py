"""TensorRT backend: the bundle's encoder and fusion engines on TensorRT 10, the decoder on TensorRT-LLM 0.12.

Unverified on hardware: TensorRT and TensorRT-LLM cannot be installed on our machines (no GPU, NVIDIA's
index unreachable). Everything that does not need the libraries is a plain function below and unit
tested (tests/test_runtime_trt.py): which files must exist, engine I/O names against the manifest,
input shapes against the build profiles, the decoder request and its limits,
and every error message. ``TensorRTBackend`` itself is the documented-API path, import-guarded.

    bundle/tensorrt/<stage>.plan   tensorrt/build_engines.sh (export/tensorrt.py), one profile each
    bundle/trtllm/engine/          trtllm/build_engine.sh (export/trtllm.py), prompt table enabled

``TensorRTBackend`` is a ``runtime.backends.BundleBackend``: manifest, config, tokenizers, instruction,
embedding table, encode_frames / encode_audio / fuse (``export.frontend.fusion_feed``) are shared with
the ONNX Runtime backend; this file implements ``run(stage, feeds)`` on the engines
(visual_encoder.plan, audio_encoder.plan, fusion.plan) and the decoder.

The decoder is the one place this backend differs: TensorRT-LLM owns its decode loop (KV cache in
its own paged buffers, sampling inside the engine; its Python API offers no per-step logits worth a
round trip per token), so there is no step-wise ``inference()`` and favor.captions' loop does not
run here. ``caption`` feeds ``favor.prompt_table.build_inputs`` ids (the one prompt convention: AV rows
addressed as vocab_size + row) and the AV rows as ``prompt_table``, greedy (top_k 1), streaming so
prefill and decode are timed apart and each new token reaches ``on_token`` as it is decided.

Notation: n frames, S image size, Qv/Dv visual tokens/width, Ta/Da audio tokens/width, M mel bins,
Tm mel frames, Nq queries per window, A AV rows (windows x Nq), L prompt ids, D LLM width.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from export.tensorrt import ENGINE_STAGES, PLUGIN_ENV, profile_shapes
from favor import captions, prompt_table
from favor.captions import CaptionResult, OnToken
from favor.config import FavorConfig
from favor.prompt import inference_ids
from runtime.backends import BundleBackend

ENGINE_DIR = "tensorrt"  # <stage>.plan, written by tensorrt/build_engines.sh
LLM_ENGINE_DIR = "trtllm/engine"  # written by trtllm/build_engine.sh
REQUIRED_MODULES = ("tensorrt", "tensorrt_llm")
# TensorRT DataType names -> torch dtypes for the I/O buffers (engine I/O keeps the ONNX types).
TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}


def unavailable_reason() -> str | None:
    """None when tensorrt, tensorrt_llm and a CUDA device are all here, else what is missing."""
    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install favor-rt[trt,trtllm] on an NVIDIA GPU)"
    if not torch.cuda.is_available():
        return "no CUDA device (TensorRT engines run on an NVIDIA GPU)"
    return None


# -- bundle files ---------------------------------------------------------------------------------
def engine_paths(bundle: Path, manifest: dict) -> dict[str, Path]:
    """Stage -> tensorrt/<stage>.plan for every engine stage the manifest has; ValueError on a missing one."""
    paths = {}
    for stage in ENGINE_STAGES:
        if stage not in manifest["stages"]:
            raise ValueError(f"{bundle / 'manifest.json'}: the bundle has no {stage} stage "
                             f"(has {sorted(manifest['stages'])}); re-export with every stage")
        p = bundle / ENGINE_DIR / f"{stage}.plan"
        if not p.is_file():
            raise ValueError(f"{p}: engine missing (run {ENGINE_DIR}/build_engines.sh on the target GPU)")
        paths[stage] = p
    return paths


@dataclass(frozen=True)
class LlmLimits:
    """What the TensorRT-LLM engine was built for (its config.json ``build_config``)."""

    max_batch: int
    max_input_len: int
    max_seq_len: int
    max_table_rows: int  # max_prompt_embedding_table_size: 0 = no prompt table


def llm_limits(engine_dir: Path) -> LlmLimits:
    """Read and check trtllm/engine/config.json: the engine must exist and accept a prompt table."""
    path = engine_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: no TensorRT-LLM engine (run trtllm/build_engine.sh on the target GPU)")
    try:
        build = json.loads(path.read_text())["build_config"]
        limits = LlmLimits(int(build["max_batch_size"]), int(build["max_input_len"]), int(build["max_seq_len"]),
                           int(build.get("max_prompt_embedding_table_size", 0)))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a TensorRT-LLM engine config ({type(err).__name__}: {err})") from None
    if limits.max_table_rows < 1:
        raise ValueError(f"{path}: engine built without a prompt table (max_prompt_embedding_table_size 0); "
                         "rebuild with trtllm/build_engine.sh")
    return limits


def plugin_library(manifest: dict, environ: dict[str, str] | None = None) -> str | None:
    """The block-causal attention plugin to load: needed only for a bundle exported with fused attention."""
    if manifest.get("attention") != "fused":
        return None
    environ = os.environ if environ is None else environ
    lib = environ.get(PLUGIN_ENV)
    if not lib:
        raise ValueError(f"the bundle was exported with fused attention: set {PLUGIN_ENV} to "
                         "libfavor_trt_plugin.so (kernels/, built against TensorRT)")
    if not Path(lib).is_file():
        raise ValueError(f"{lib}: {PLUGIN_ENV} names no file (expected libfavor_trt_plugin.so)")
    return lib


# -- engines against the manifest -----------------------------------------------------------------
def check_engine_io(engine_file: Path, stage: dict, inputs: list[str], outputs: list[str]) -> None:
    """The engine's I/O tensor names must be the manifest stage's, in any order; says which differ."""
    for kind, found in (("inputs", inputs), ("outputs", outputs)):
        expected = [t["name"] for t in stage[kind]]
        if sorted(found) != sorted(expected):
            missing = sorted(set(expected) - set(found))
            extra = sorted(set(found) - set(expected))
            raise ValueError(f"{engine_file}: engine {kind} {sorted(found)} differ from the manifest's "
                             f"{sorted(expected)} (missing {missing}, unexpected {extra}); rebuild the engine "
                             "from this bundle")


def check_input_shapes(stage_name: str, stage: dict, axes: dict, shapes: dict[str, tuple[int, ...]]
                       ) -> dict[str, tuple[int, ...]]:
    """Input shapes checked against the engine's profile (min..max per dimension); returns them."""
    bounds = profile_shapes(stage, axes)  # name -> (min, opt, max)
    if sorted(shapes) != sorted(bounds):
        raise ValueError(f"{stage_name}: inputs {sorted(shapes)} given, the engine takes {sorted(bounds)}")
    for name, shape in shapes.items():
        lo, _, hi = bounds[name]
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(lo) or any(not a <= d <= b for d, a, b in zip(shape, lo, hi, strict=True)):
            raise ValueError(f"{stage_name}: input {name} has shape {list(shape)}, the engine's profile takes "
                             f"{list(lo)} .. {list(hi)} (re-export with larger --max-frames / --max-batch)")
        shapes[name] = shape
    return shapes


def torch_dtype(trt_dtype_name: str) -> torch.dtype:
    if trt_dtype_name not in TORCH_DTYPES:
        raise ValueError(f"engine tensor type {trt_dtype_name} has no torch buffer type "
                         f"(expected one of {sorted(TORCH_DTYPES)})")
    return TORCH_DTYPES[trt_dtype_name]


# -- the decoder request ------------------------------------------------------------------------
@dataclass
class DecoderRequest:
    ids: torch.Tensor  # [L] int32; ids >= vocab_size address rows of ``table``
    table: torch.Tensor  # [A, D] the AV rows, passed as ModelRunner.generate(prompt_table=...)


def decoder_request(tokenizer, cfg: FavorConfig, prompt: str, av: torch.Tensor) -> DecoderRequest:
    """[BOS] "USER: <Img>" AV "</Img> {prompt}\\nASSISTANT:" as prompt-table ids plus the table."""
    if av.dim() != 2 or av.shape[1] != cfg.llm.hidden:
        raise ValueError(f"AV embeddings must be [A, {cfg.llm.hidden}], got {list(av.shape)}")
    llm = cfg.llm
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else llm.eos_token_id
    inputs = prompt_table.build_inputs([inference_ids(tokenizer, prompt)], av[None],
                                       torch.ones(1, av.shape[0], dtype=torch.bool), llm.vocab_size,
                                       llm.bos_token_id, pad)
    return DecoderRequest(inputs.ids[0].to(torch.int32), inputs.table)  # batch 1: no padding to strip


def check_request(req: DecoderRequest, limits: LlmLimits, max_new_tokens: int) -> None:
    """The request fits the engine: table rows, prompt length and prompt + new tokens."""
    L, A = req.ids.shape[0], req.table.shape[0]
    if A > limits.max_table_rows:
        raise ValueError(f"{A} AV rows exceed the engine's prompt table ({limits.max_table_rows} rows); "
                         "rebuild trtllm/engine for more windows or caption fewer windows at once")
    if L > limits.max_input_len:
        raise ValueError(f"prompt of {L} tokens exceeds the engine's max_input_len ({limits.max_input_len})")
    if L + max_new_tokens > limits.max_seq_len:
        raise ValueError(f"prompt ({L}) + max_new_tokens ({max_new_tokens}) exceeds the engine's "
                         f"max_seq_len ({limits.max_seq_len})")


def generated_tokens(output_ids: torch.Tensor, input_len: int, seq_len: int, end_id: int) -> list[int]:
    """ModelRunner output row [max_seq_len] (prompt + answer) -> the answer's ids, EOS and after dropped."""
    new = output_ids[input_len:seq_len].tolist()
    return new[:new.index(end_id)] if end_id in new else new


def _synchronize() -> None:
    """Wait for the GPU before reading the clock (a no-op where CUDA is absent, e.g. unit tests)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- the backend ----------------------------------------------------------------------------------
class TrtEngine:
    """One deserialized engine and its execution context (TensorRT 10 named-tensor API)."""

    def __init__(self, trt, runtime, path: Path, stage_name: str, stage: dict, axes: dict):
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ValueError(f"{path}: TensorRT could not deserialize the engine (built by another TensorRT "
                             "version or GPU? rebuild it with tensorrt/build_engines.sh)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        check_engine_io(path, stage, self.inputs, self.outputs)
        self.dtypes = {n: torch_dtype(engine.get_tensor_dtype(n).name) for n in names}
        self.engine, self.context = engine, engine.create_execution_context()
        self.stage_name, self.stage, self.axes = stage_name, stage, axes

    def __call__(self, stream: torch.cuda.Stream, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_input_shapes(self.stage_name, self.stage, self.axes, {n: tuple(t.shape) for n, t in feeds.items()})
        # Buffers must outlive execute_async_v3: keep the device copies referenced until synchronised.
        bufs = {n: t.to("cuda", self.dtypes[n]).contiguous() for n, t in feeds.items()}
        for name, t in bufs.items():
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        for name in self.outputs:  # output shapes are known once every input shape is set
            shape = tuple(self.context.get_tensor_shape(name))
            bufs[name] = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
            self.context.set_tensor_address(name, bufs[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.stage_name}: TensorRT execution failed (see the TensorRT log)")
        stream.synchronize()
        return {n: bufs[n].cpu() for n in self.outputs}


class TensorRTBackend(BundleBackend):
    """An exported bundle's TensorRT engines (encoders, fusion) and TensorRT-LLM decoder engine."""

    name = "tensorrt"

    def __init__(self, bundle_dir: str | Path, engine_dir: str | Path | None = None):
        reason = unavailable_reason()
        if reason:
            raise ValueError(f"backend 'tensorrt' is not available: {reason}")
        import tensorrt as trt
        from tensorrt_llm.runtime import ModelRunner

        from export.manifest import load_manifest

        super().__init__(bundle_dir, load_manifest(Path(bundle_dir)))
        paths = engine_paths(self.path, self.manifest)
        llm_dir = Path(engine_dir) if engine_dir is not None else self.path / LLM_ENGINE_DIR
        self.limits = llm_limits(llm_dir)
        logger = trt.Logger(trt.Logger.WARNING)
        plugin = plugin_library(self.manifest)
        if plugin:  # the plugin registers its creator on load; engines that use it need it first
            ctypes.CDLL(plugin, mode=ctypes.RTLD_GLOBAL)
        trt.init_libnvinfer_plugins(logger, "")
        runtime = trt.Runtime(logger)
        axes = self.manifest["dynamic_axes"]
        self.engines = {s: TrtEngine(trt, runtime, p, s, self.manifest["stages"][s], axes) for s, p in paths.items()}
        self.stream = torch.cuda.Stream()
        self.runner = ModelRunner.from_dir(str(llm_dir))

    def run(self, stage: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.engines[stage](self.stream, feeds)

    def caption(self, prompt: str, av: torch.Tensor, max_new_tokens: int,
                on_token: OnToken | None = None) -> CaptionResult:
        """Greedy caption of ``prompt`` around AV rows [A, D] decoded inside TensorRT-LLM."""
        req = decoder_request(self.tokenizer, self.cfg, prompt, av)
        check_request(req, self.limits, max_new_tokens)
        eos, L = self.cfg.llm.eos_token_id, req.ids.shape[0]
        t0 = time.perf_counter()
        first, tokens = None, []
        # prompt_tasks stays None: one 2-D table, task 0, so id v >= vocab reads table row v - vocab.
        steps = self.runner.generate([req.ids], prompt_table=req.table, max_new_tokens=max_new_tokens,
                                     end_id=eos, pad_id=eos, top_k=1, num_beams=1, streaming=True,
                                     return_dict=True, output_sequence_lengths=True)
        for step in steps:  # one dict per generated token; the last holds the whole answer
            if first is None:
                _synchronize()
                first = time.perf_counter()  # the first step is the context phase plus one token
            seq_len = int(step["sequence_lengths"][0, 0])
            now = generated_tokens(step["output_ids"][0, 0].cpu(), L, seq_len, eos)
            for t in now[len(tokens):] if on_token is not None else ():
                on_token(0, t)
            tokens = now
        _synchronize()
        end = time.perf_counter()
        first = end if first is None else first
        result = captions.decode_text([CaptionResult(tokens, prompt_tokens=L)], self.tokenizer)[0]
        result.prefill_s, result.decode_s = first - t0, end - first
        return result
