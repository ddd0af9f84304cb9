"""Write a Triton model repository from an exported bundle (``favor-export --targets triton``).

    repo/
      favor-triton.json                  variant, config hash, models (ignored by Triton: not a directory)
      favor_audio_encoder/ config.pbtxt  1/ audio_encoder.onnx (+ .onnx.data) [+ model.py] | 1/model.plan
      favor_visual_encoder/ ...          the same per encoder / fusion stage
      favor_fusion/ ...
      favor_decoder/ config.pbtxt        1/ model.py decoder.onnx (+ data) embed_tokens.safetensors manifest.json
                                         | 1/engine/ (tensorrtllm: bundle/trtllm/engine)
      favor_pipeline/ config.pbtxt       1/ model.py bundle/{manifest.json, tokenizer/, instruction_tokenizer/,
                                                            embed_tokens.safetensors}

``variant`` gpu: native backends (onnxruntime, tensorrt where the bundle has engines, tensorrtllm where
it has a built TensorRT-LLM engine; the Python decoder otherwise). cpu: every stage in the Python
backend on ONNX Runtime (the only backend the nvidia-pytriton wheel ships; export/triton/server.py
starts it). Python models import favor-rt: it must be installed in the server's Python environment.

Graphs and weights are hard-linked from the bundle when on the same file system (else copied). The
repository is built beside ``out`` and renamed into place: a server pointed at ``out`` sees the old
repository or the new one whole, never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from export.manifest import EMBED_FILE, MANIFEST, load_manifest
from export.triton import configs
from export.triton.pbtxt import to_pbtxt

MARKER = "favor-triton.json"
CONFIG = "config.pbtxt"
VERSION = "1"
TRTLLM_ENGINE = "trtllm/engine"  # bundle dir holding the built TensorRT-LLM engine (config.json + rank*.engine)
MODEL_PY = '''"""{model}: written by favor-export --targets triton; runs in Triton's Python backend
(favor-rt must be importable in the backend's Python environment)."""

from export.triton.python_models import {cls} as TritonPythonModel  # noqa: F401
'''


def _place(src: Path, dst: Path) -> None:
    """Hard link (no copy of multi-GB weights) when possible, else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _place_tree(src: Path, dst: Path) -> None:
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        _place(f, dst / f.relative_to(src))


def _write_model(root: Path, config: dict, files: dict[str, Path], python_class: str | None = None) -> None:
    """<root>/<name>/config.pbtxt and its version directory (files placed, model.py for Python models)."""
    model = root / config["name"]
    version = model / VERSION
    version.mkdir(parents=True)
    (model / CONFIG).write_text(to_pbtxt(config))
    for name, src in files.items():
        (_place_tree if src.is_dir() else _place)(src, version / name)
    if python_class:
        (version / "model.py").write_text(MODEL_PY.format(model=config["name"], cls=python_class))


def _stage_files(bundle: Path, entry: dict) -> dict[str, Path]:
    return {f: bundle / f for f in entry["files"]}


def _engine(bundle: Path, stage: str) -> Path | None:
    p = bundle / "tensorrt" / f"{stage}.plan"
    return p if p.is_file() else None


def _threads(manifest: dict, stage: str) -> int | None:
    return (manifest.get("runtime") or {}).get("threads", {}).get(stage)


def _encoders(root: Path, bundle: Path, manifest: dict, variant: str, sha: str) -> None:
    max_batch = manifest["limits"]["max_batch"]
    for stage in configs.ENCODER_STAGES:
        if stage not in manifest["stages"]:
            raise ValueError(f"{bundle / MANIFEST}: the bundle has no {stage} stage; export every stage")
        entry = manifest["stages"][stage]
        engine = _engine(bundle, stage) if variant == "gpu" else None
        if variant == "gpu" and engine is None and manifest.get("attention") == "fused":
            raise ValueError(f"{bundle}: {stage}.onnx uses favor.BlockCausalAttention, which Triton's onnxruntime "
                             "backend cannot load; build TensorRT engines, write --triton-variant cpu, or re-export "
                             "with --portable-attention")
        config = configs.stage_config(stage, entry, max_batch, variant, engine is not None,
                                      _threads(manifest, stage), sha)
        files = {"model.plan": engine} if engine else _stage_files(bundle, entry)
        _write_model(root, config, files, "OnnxStageModel" if variant == "cpu" else None)


def _decoder(root: Path, final: Path, bundle: Path, manifest: dict, variant: str, sha: str) -> str:
    """The decoder model; returns its kind (stepwise | tensorrtllm)."""
    engine_dir = bundle / TRTLLM_ENGINE
    if variant == "gpu" and (engine_dir / "config.json").is_file():
        from runtime.trt_backend import llm_limits

        where = final.resolve() / configs.DECODER / VERSION / "engine"  # the backend takes an absolute path
        config = configs.trtllm_decoder_config(llm_limits(engine_dir), str(where), sha)
        _write_model(root, config, {"engine": engine_dir})
        return "tensorrtllm"
    if "decoder" not in manifest["stages"]:
        raise ValueError(f"{bundle / MANIFEST}: the bundle has no decoder stage; export every stage")
    config = configs.decoder_config(manifest, variant, _threads(manifest, "decoder"), sha)
    files = _stage_files(bundle, manifest["stages"]["decoder"]) | {EMBED_FILE: bundle / EMBED_FILE,
                                                                   MANIFEST: bundle / MANIFEST}
    _write_model(root, config, files, "DecoderModel")
    return "stepwise"


def _pipeline(root: Path, bundle: Path, manifest: dict, variant: str, decoder: str, sha: str) -> None:
    files = {f"bundle/{MANIFEST}": bundle / MANIFEST, f"bundle/{EMBED_FILE}": bundle / EMBED_FILE}
    for sub in ("tokenizer", "instruction_tokenizer"):
        if (bundle / sub).is_dir():
            files[f"bundle/{sub}"] = bundle / sub
    _write_model(root, configs.pipeline_config(manifest, variant, decoder, sha), files, "PipelineModel")


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished repository into place (replacing an earlier FAVOR repository only)."""
    if not out.exists():
        tmp.rename(out)
        return
    if not (out / MARKER).is_file() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not a FAVOR Triton repository (no {MARKER}); choose another path")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    out.rename(old / out.name)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def write_repository(bundle: str | Path, out: str | Path, variant: str = "gpu") -> dict:
    """Write the repository of ``bundle`` at ``out``; returns what ``favor-triton.json`` records."""
    from export.onnx import config_sha256
    from favor.config import FavorConfig

    if variant not in configs.VARIANTS:
        raise ValueError(f"triton variant ({variant!r}) must be one of {', '.join(configs.VARIANTS)}")
    bundle, out = Path(bundle), Path(out)
    manifest = load_manifest(bundle)
    sha = config_sha256(FavorConfig.from_dict(manifest["config"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        _encoders(tmp, bundle, manifest, variant, sha)
        decoder = _decoder(tmp, out, bundle, manifest, variant, sha)
        _pipeline(tmp, bundle, manifest, variant, decoder, sha)
        record = {"format": "favor-triton", "variant": variant, "decoder": decoder, "config_sha256": sha,
                  "bundle": str(bundle.resolve()),
                  "models": sorted(p.name for p in tmp.iterdir() if (p / CONFIG).is_file())}
        (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record
