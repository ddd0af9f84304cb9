"""The decoder graph built by ONNX Runtime GenAI's model builder: fused, optionally weight-only quantised.

``onnxruntime_genai.models.builder.create_model`` reads a merged Hugging Face Llama directory and emits
GroupQueryAttention (rotary inside), SkipSimplifiedLayerNormalization, a fused QKV MatMul and, for
int8 / int4, MatMulNBits weight-only kernels. With ``exclude_embeds`` the graph takes ``inputs_embeds``
(our prompt-table convention computes the embeddings) and with ``prune_lm_head`` prefill returns the
last position's logits only.

    inputs_embeds [B, L, D] f32, attention_mask [B, T] int64 (T = P + L, or the KV buffer length),
    past_key_values.{i}.key/value [B, kvh, P, hd] -> logits [B, 1, V], present.{i}.key/value

There is no ``position_ids`` input: GroupQueryAttention derives each row's positions from
``attention_mask.sum(-1)`` (``seqlens_k``), which is only right for rows without left padding
(``export.ort_decoder`` refuses padded batches).

Precisions (chosen by measurement on the trained demo model, see export/README.md):
  fp32  MatMul, no quantisation;
  int8  MatMulNBits bits=8, symmetric, block 32, accuracy level 4 (int8 activations per block);
  int4  MatMulNBits bits=4, block 32 (SmolLM2's weights come from a Q4_1 GGUF with block 32),
        accuracy level 4; the tied LM head stays int8 (``matmul_mixed_precision=last_matmul:int8``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import LlamaForCausalLM

GRAPH = "decoder.onnx"
KIND = "genai"
PRECISIONS = ("fp32", "int8", "int4")
BLOCK_SIZES = (16, 32, 64, 128, 256)  # the builder's MatMulNBits block sizes
ACCURACY_LEVELS = (1, 2, 3, 4)  # activation type of MatMulNBits: fp32, fp16, bf16, int8


@dataclass(frozen=True)
class BuilderOptions:
    """Weight-only quantisation settings; ignored for fp32."""

    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    # quant type of the LM head (the builder's "last_matmul"); None = same as the body
    lm_head: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # any other builder extra option, verbatim

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size ({self.block_size}) must be one of {list(BLOCK_SIZES)}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ValueError(f"accuracy_level ({self.accuracy_level}) must be one of {list(ACCURACY_LEVELS)}")
        if self.lm_head not in (None, "int8", "int4"):
            raise ValueError(f"lm_head ({self.lm_head!r}) must be None, 'int8' or 'int4'")


# Chosen by measurement (export/README.md, "Decoder precisions"): int4 keeps the LM head at int8.
DEFAULT_OPTIONS = {"fp32": BuilderOptions(), "int8": BuilderOptions(),
                   "int4": BuilderOptions(lm_head="int8")}


# "auto" (the default): the fastest decoder precision that passes verify, measured on the trained demo
# model (export/README.md, "Decoder"): weight-only int8 when the builder serves the model; fp32 for the
# fallback export, whose int8 is not verified (on random test models near ties flip captions).
AUTO = "auto"


def resolve_precision(model, precision: str, previous: dict | None = None) -> str:
    """``auto`` -> int8 (builder) or fp32 (fallback); a bundle only gaining targets keeps its own."""
    if precision != AUTO:
        return precision
    if model is None:
        return (previous or {}).get("precision", "fp32")
    return "int8" if unsupported(model) is None else "fp32"


# Bundle precision -> decoder precision: fp16 / bf16 are TensorRT build precisions, ONNX stays fp32.
ONNX_PRECISION = {"fp32": "fp32", "fp16": "fp32", "bf16": "fp32", "int8": "int8", "int4": "int4"}
# GroupQueryAttention's CPU kernel needs head_dim % 8 == 0 (it refuses the tiny preset's 12).
GQA_HEAD_DIM_MULTIPLE = 8


def unsupported(model) -> str | None:
    """Why the builder cannot serve ``model`` (None when it can)."""
    try:
        import onnxruntime_genai.models.builder  # noqa: F401
    except ImportError:
        return "onnxruntime-genai is not installed (pip install 'favor-rt[export]')"
    head_dim = model.cfg.llm.hidden // model.cfg.llm.heads
    if head_dim % GQA_HEAD_DIM_MULTIPLE:
        return f"head_dim {head_dim} is not a multiple of {GQA_HEAD_DIM_MULTIPLE} (GroupQueryAttention on CPU)"
    if model.tokenizer is None:
        return "the model has no tokenizer (the builder reads its special ids)"
    return None


def extra_options(precision: str, opts: BuilderOptions) -> dict[str, str]:
    """The builder's KEY=VALUE extra options for our case."""
    out = {"exclude_embeds": "true", "prune_lm_head": "true", "filename": GRAPH, "hf_token": "false"}
    if precision != "fp32":
        out |= {"block_size": str(opts.block_size), "is_symmetric": str(opts.symmetric).lower(),
                "accuracy_level": str(opts.accuracy_level)}
        if opts.lm_head and opts.lm_head != precision:
            out["matmul_mixed_precision"] = f"last_matmul:{opts.lm_head}"
    return out | opts.extra


def _save_hf(llm: LlamaForCausalLM, tokenizer, path: Path) -> None:
    if tokenizer is None:
        raise ValueError("the genai decoder needs the model's tokenizer (the builder reads its special ids); "
                         "export with --tokenizer DIR")
    llm.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))


def build_graph(llm: LlamaForCausalLM, tokenizer, out: str | Path, precision: str = "fp32",
                opts: BuilderOptions | None = None, verbose: bool = False) -> list[str]:
    """Build ``out/decoder.onnx`` (+ ``.data``) from a merged Llama; returns the files written."""
    if precision not in PRECISIONS:
        raise ValueError(f"decoder precision ({precision!r}) must be one of {list(PRECISIONS)}")
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    opts = opts or DEFAULT_OPTIONS[precision]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="favor-genai-") as tmp:
        hf, built, cache = Path(tmp, "hf"), Path(tmp, "built"), Path(tmp, "cache")
        _save_hf(llm, tokenizer, hf)
        kv = [f"{k}={v}" for k, v in extra_options(precision, opts).items()]
        sink = contextlib.nullcontext() if verbose else _quiet()
        with sink:
            parsed = parse_extra_options("", str(hf), str(built), precision, "cpu", str(cache), kv)
            create_model("", str(hf), str(built), precision, "cpu", str(cache), **parsed)
        files = sorted(p.name for p in built.iterdir() if p.name.startswith(GRAPH))
        for name in files:
            shutil.move(str(built / name), str(out / name))
    return sorted(files, key=lambda n: n != GRAPH)  # graph first


@contextlib.contextmanager
def _quiet():
    """The builder prints progress bars and INFO logs; keep them out of our CLI unless -v."""
    logging.disable(logging.CRITICAL)  # its handlers hold the real stderr, so redirecting is not enough
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def stage_entry(out: Path, files: list[str], precision: str, opts: BuilderOptions, seconds: float) -> dict:
    """The manifest's ``stages["decoder"]`` for a builder graph (``kind`` picks the runtime class)."""
    import onnx

    from export.onnx import _io

    graph = onnx.load(str(out / files[0]), load_external_data=False).graph
    return {"kind": KIND, "precision": precision, "files": files,
            "builder": asdict(opts) if precision != "fp32" else {},
            "inputs": _io(graph, "input"), "outputs": _io(graph, "output"), "export_seconds": round(seconds, 2)}


def decoder_stage(model, out: Path, precision: str, table, say) -> dict:
    """The bundle's ``decoder`` stage: the builder graph, or (when ``unsupported``) our torch-dynamo
    export (export/decoder.py, kind ``torch-dynamo``), weight-only quantised by export/quantize.py."""
    precision = ONNX_PRECISION[precision]
    reason = unsupported(model)
    if reason is None:
        say("decoder", f"GenAI model builder, {precision}")
        return export_decoder(model, out, precision)
    from export.bundle import _wrapper, example_inputs
    from export.onnx import export_stage
    from export.quantize import quantize_weights

    say("decoder", f"torch-dynamo export, {precision} ({reason})")
    wrapper = _wrapper(model, "decoder")
    st = export_stage(wrapper, example_inputs(wrapper, table), table, out, model.cfg)
    entry = {"kind": "torch-dynamo", "precision": precision, "files": st.files, "inputs": st.inputs,
             "outputs": st.outputs, "axes": st.axes, "export_seconds": round(st.seconds, 2)}
    if precision != "fp32":
        opts = DEFAULT_OPTIONS[precision]
        start = time.perf_counter()
        entry["files"] = quantize_weights(out / st.files[0], out / f"decoder.{precision}.onnx", precision,
                                          opts.block_size, opts.symmetric, opts.accuracy_level)
        for f in st.files:
            (out / f).unlink()
        entry["builder"] = asdict(opts)
        entry["export_seconds"] = round(st.seconds + time.perf_counter() - start, 2)
    return entry


def export_decoder(model, out: str | Path, precision: str, opts: BuilderOptions | None = None) -> dict:
    """Bundle entry point: merge LoRA, build the graph into ``out``, return the stage entry."""
    from export.decoder import merged_llm

    opts = opts or DEFAULT_OPTIONS[precision]
    start = time.perf_counter()
    files = build_graph(merged_llm(model), model.tokenizer, out, precision, opts)
    stamp_metadata(Path(out) / files[0], model.cfg)
    return stage_entry(Path(out), files, precision, opts, time.perf_counter() - start)


def stamp_metadata(path: Path, cfg) -> None:
    """The favor.* metadata every bundle graph carries (export/onnx.py), so load_manifest's config-hash
    check (and the bundle cache's verify step) holds for the builder's graph too; weights untouched."""
    import onnx

    from export.onnx import config_sha256
    from favor.checkpoint import MODEL_VERSION

    graph = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in graph.metadata_props}
    onnx.helper.set_model_props(graph, {**props, "favor.stage": "decoder", "favor.config_sha256": config_sha256(cfg),
                                        "favor.model_version": MODEL_VERSION, "favor.attention": "portable"})
    onnx.save(graph, str(path))
