"""Model configs (``config.pbtxt`` contents) of the Triton repository, derived from a bundle manifest.

One model per stage plus the window pipeline (export/triton/repository.py lays them out):

    favor_audio_encoder, favor_visual_encoder, favor_fusion
        gpu variant: ``onnxruntime`` backend on the stage's ONNX graph, or ``tensorrt`` on
                     bundle/tensorrt/<stage>.plan when it was built (KIND_GPU instances)
        cpu variant: ``python`` backend, the same graph on ONNX Runtime (export/triton/python_models.py)
    favor_decoder
        ``tensorrtllm`` (gpu variant, when bundle/trtllm/engine/ holds a built engine): the prompt-table
                     convention, AV rows sent as ``prompt_embedding_table`` and addressed by ids >= vocab
        ``python`` otherwise: the bundle's ONNX decoder stepped by ``favor.captions`` (the one decode
                     loop) from the caller; KV caches live server-side, one per sequence (Triton's
                     sequence batcher: correlation id, START / END control inputs)
    favor_pipeline
        ``python`` BLS model: mel + frames + prompt -> caption (encoders, fusion and decoder called as
        the models above, the decode loop is favor.captions)

Shapes come from the manifest's stage I/O (``[batch, ...]``; symbolic dims -> -1), ``max_batch_size``
from its ``limits.max_batch`` (the exported batch axis). Notation: M mel bins, S image size, D LLM
width, V vocabulary, A AV rows.
"""

from __future__ import annotations

from export.triton.pbtxt import Enum, parameters

VARIANTS = ("gpu", "cpu")
ENCODER_STAGES = ("audio_encoder", "visual_encoder", "fusion")
PREFIX = "favor_"
DECODER, PIPELINE = f"{PREFIX}decoder", f"{PREFIX}pipeline"
# ONNX dtype names (manifest) -> Triton data types
DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
          "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
# Requests wait at most this long for others to batch with: 2 ms against windows of seconds (2 FPS x 10
# frames = 5 s) costs nothing in latency and lets frames of concurrent streams share one call.
QUEUE_DELAY_US = 2000
# Sequences (streams decoding a caption) one decoder instance keeps KV caches for; a ninth waits.
MAX_SEQUENCES = 8
# A caption's KV cache is dropped when its stream sends nothing for this long (a client that died).
SEQUENCE_IDLE_US = 60_000_000
# BLS pipeline instances of the gpu variant: windows of this many streams in flight at once (the stage
# models' dynamic batcher merges their calls up to --max-batch); the cpu variant has one (on 2 cores a
# second would only contend for the same cores).
PIPELINE_INSTANCES = 2


def model_name(stage: str) -> str:
    return PREFIX + stage


def _dims(shape: list, batched: bool) -> list[int]:
    """Manifest shape -> Triton dims (batch axis dropped when batched; symbolic -> -1)."""
    dims = shape[1:] if batched else shape
    return [d if isinstance(d, int) else -1 for d in dims]


def _tensor(t: dict, batched: bool) -> dict:
    if t["dtype"] not in DTYPES:
        raise ValueError(f"tensor {t['name']}: dtype {t['dtype']} has no Triton data type")
    dims = _dims(t["shape"], batched)
    entry = {"name": t["name"], "data_type": Enum(DTYPES[t["dtype"]]), "dims": dims or [1]}
    if not dims:  # a per-sample scalar ([B] in the graph): sent as [B, 1], reshaped to [B]
        entry["reshape"] = {"shape": []}
    return entry


def _instances(kind: str, count: int = 1) -> list[dict]:
    return [{"count": count, "kind": Enum(kind)}]


def _common(name: str, backend: str, max_batch: int) -> dict:
    return {"name": name, "backend": backend, "max_batch_size": max_batch}


def stage_config(stage: str, entry: dict, max_batch: int, variant: str, engine: bool, threads: int | None,
                 config_sha: str) -> dict:
    """An encoder / fusion stage: I/O exactly the graph's (the engine keeps the ONNX names)."""
    batched = max_batch > 0
    cfg = _common(model_name(stage), "python", max_batch)
    params = {"favor.config_sha256": config_sha, "favor.stage": stage}
    if variant == "gpu":
        cfg["backend"] = "tensorrt" if engine else "onnxruntime"
        if engine:
            cfg["platform"] = "tensorrt_plan"
        cfg["default_model_filename"] = "model.plan" if engine else entry["files"][0]
    else:
        params["favor.onnx_file"] = entry["files"][0]
        if threads:
            params["favor.threads"] = str(threads)
    cfg["input"] = [_tensor(t, batched) for t in entry["inputs"]]
    cfg["output"] = [_tensor(t, batched) for t in entry["outputs"]]
    cfg["dynamic_batching"] = {"max_queue_delay_microseconds": QUEUE_DELAY_US}
    cfg["instance_group"] = _instances("KIND_GPU" if variant == "gpu" else "KIND_CPU")
    cfg["parameters"] = parameters(params)
    return cfg


def _sequence_batching() -> dict:
    """Triton's sequence batcher: every step of one caption reaches the instance holding its KV cache."""
    return {
        "max_sequence_idle_microseconds": SEQUENCE_IDLE_US,
        "oldest": {"max_candidate_sequences": MAX_SEQUENCES, "max_queue_delay_microseconds": 0},
        "control_input": [
            {"name": "START", "control": [{"kind": Enum("CONTROL_SEQUENCE_START"), "int32_false_true": [0, 1]}]},
            {"name": "END", "control": [{"kind": Enum("CONTROL_SEQUENCE_END"), "int32_false_true": [0, 1]}]},
            {"name": "CORRID", "control": [{"kind": Enum("CONTROL_SEQUENCE_CORRID"),
                                            "data_type": Enum("TYPE_UINT64")}]},
        ],
    }


def decoder_config(manifest: dict, variant: str, threads: int | None, config_sha: str) -> dict:
    """The step-wise decoder (Python backend): prefill ``inputs_embeds`` [B, L, D] at START, then one
    ``input_ids`` [B] per step; returns ``logits`` [B, V] of the last position."""
    llm = manifest["config"]["llm"]
    cfg = _common(DECODER, "python", max(1, manifest["limits"]["max_batch"]))
    cfg["input"] = [
        {"name": "inputs_embeds", "data_type": Enum("TYPE_FP32"), "dims": [-1, llm["hidden"]], "optional": True},
        {"name": "input_ids", "data_type": Enum("TYPE_INT64"), "dims": [1], "reshape": {"shape": []},
         "optional": True},
    ]
    cfg["output"] = [{"name": "logits", "data_type": Enum("TYPE_FP32"), "dims": [llm["vocab_size"]]}]
    cfg["sequence_batching"] = _sequence_batching()
    cfg["instance_group"] = _instances("KIND_GPU" if variant == "gpu" else "KIND_CPU")
    params = {"favor.config_sha256": config_sha, "favor.stage": "decoder", "favor.decoder": "stepwise",
              "favor.onnx_file": manifest["stages"]["decoder"]["files"][0]}
    if threads:
        params["favor.threads"] = str(threads)
    cfg["parameters"] = parameters(params)
    return cfg


def trtllm_decoder_config(limits, engine_dir: str, config_sha: str) -> dict:
    """TensorRT-LLM's ``tensorrt_llm`` model (inflight batching) with the prompt table enabled: the
    caller sends prompt-table ids (favor.prompt_table), the AV rows as ``prompt_embedding_table``
    [A, D] fp16 and ``prompt_vocab_size`` A. ``limits``: runtime.trt_backend.LlmLimits of the engine."""
    def scalar(name, dtype, optional=True):
        return {"name": name, "data_type": Enum(dtype), "dims": [1], "reshape": {"shape": []}, "optional": optional}

    cfg = _common(DECODER, "tensorrtllm", limits.max_batch)
    cfg["model_transaction_policy"] = {"decoupled": False}
    cfg["dynamic_batching"] = {"preferred_batch_size": [limits.max_batch],
                               "max_queue_delay_microseconds": QUEUE_DELAY_US}
    cfg["input"] = [
        {"name": "input_ids", "data_type": Enum("TYPE_INT32"), "dims": [-1], "allow_ragged_batch": True},
        scalar("input_lengths", "TYPE_INT32", optional=False),
        {"name": "request_output_len", "data_type": Enum("TYPE_INT32"), "dims": [1]},
        scalar("end_id", "TYPE_INT32"), scalar("pad_id", "TYPE_INT32"), scalar("runtime_top_k", "TYPE_INT32"),
        {"name": "prompt_embedding_table", "data_type": Enum("TYPE_FP16"), "dims": [-1, -1], "optional": True,
         "allow_ragged_batch": True},
        scalar("prompt_vocab_size", "TYPE_INT32"),
    ]
    cfg["output"] = [{"name": "output_ids", "data_type": Enum("TYPE_INT32"), "dims": [-1, -1]},
                     {"name": "sequence_length", "data_type": Enum("TYPE_INT32"), "dims": [-1]}]
    cfg["instance_group"] = _instances("KIND_CPU")  # the backend places the engine on the GPU itself
    cfg["parameters"] = parameters({
        "favor.config_sha256": config_sha, "favor.stage": "decoder", "favor.decoder": "tensorrtllm",
        "favor.max_prompt_table_rows": limits.max_table_rows,
        "gpt_model_type": "inflight_fused_batching", "gpt_model_path": engine_dir, "max_beam_width": 1,
        "batch_scheduler_policy": "guaranteed_no_evict", "exclude_input_in_output": "true",
        "kv_cache_free_gpu_mem_fraction": 0.9, "FORCE_CPU_ONLY_INPUT_TENSORS": "no"})
    return cfg


def pipeline_config(manifest: dict, variant: str, decoder: str, config_sha: str) -> dict:
    """The BLS window pipeline: one request = one window (batch 0: the caller's shapes as they are).

    inputs  mel [1, M, Tm] (optional: no audio), pixels [1, n, 3, S, S] (optional: no video),
            prompt [1] (the question, BYTES), max_new_tokens [1] (optional, default 32)
    outputs text [1] (BYTES), tokens [n_new] (INT64)"""
    c = manifest["config"]
    size = c["visual"]["image_size"]
    cfg = _common(PIPELINE, "python", 0)
    cfg["input"] = [
        {"name": "mel", "data_type": Enum("TYPE_FP32"), "dims": [1, c["audio"]["n_mels"], -1], "optional": True},
        {"name": "pixels", "data_type": Enum("TYPE_FP32"), "dims": [1, -1, 3, size, size], "optional": True},
        {"name": "prompt", "data_type": Enum("TYPE_STRING"), "dims": [1]},
        {"name": "max_new_tokens", "data_type": Enum("TYPE_INT32"), "dims": [1], "optional": True},
    ]
    cfg["output"] = [{"name": "text", "data_type": Enum("TYPE_STRING"), "dims": [1]},
                     {"name": "tokens", "data_type": Enum("TYPE_INT64"), "dims": [-1]}]
    cfg["instance_group"] = _instances("KIND_CPU", PIPELINE_INSTANCES if variant == "gpu" else 1)
    cfg["parameters"] = parameters({"favor.config_sha256": config_sha, "favor.stage": "pipeline",
                                    "favor.variant": variant, "favor.decoder": decoder})
    return cfg
