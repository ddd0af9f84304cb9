"""Write a deployable bundle from a FavorModel: ONNX graphs, embedding table, tokenizer, int8 decoder,
TensorRT / TensorRT-LLM artefacts when asked, and the manifest that pins them all.

    bundle/
      manifest.json                       export/manifest.py
      audio_encoder.onnx (+ .onnx.data)   mel -> audio tokens
      visual_encoder.onnx                 frames + instruction -> visual tokens
      fusion.onnx                         sync + windows + causal Q-Former + projector
      decoder.onnx                        merged-LoRA LLM, inputs_embeds + KV cache
      decoder.int8.onnx                   --precision int8 (ORT CPU)
      embed_tokens.safetensors            LLM input embeddings [V, D] for ids and the prompt table
      tokenizer/                          when the model has a tokenizer
      tensorrt/, trtllm/                  --targets tensorrt / trtllm
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.numpy import save_file

from export import profiles
from export.decoder import DecoderFrontend, merged_llm
from export.frontend import AudioFrontend, FusionFrontend, VisualFrontend
from export.manifest import sha256_file, toolchain_versions, write_manifest
from export.onnx import OPSET, ExportedStage, example_size, export_stage
from favor.checkpoint import MODEL_VERSION
from favor.model import FavorModel

TARGETS = ("onnx", "tensorrt", "trtllm")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
STAGES = ("audio_encoder", "visual_encoder", "fusion", "decoder")
EMBED_FILE = "embed_tokens.safetensors"


@dataclass(frozen=True)
class ExportOptions:
    targets: tuple[str, ...] = ("onnx",)
    # ONNX graphs stay fp32 (ORT CPU gains nothing from fp16); fp16/bf16 set the TensorRT and
    # TensorRT-LLM build precision, int8 adds the dynamically quantised ORT decoder (and TensorRT int8).
    precision: str = "fp32"
    max_frames: int | None = None
    max_batch: int = 1
    fused_attention: bool = False
    stages: tuple[str, ...] = STAGES

    def __post_init__(self) -> None:
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise ValueError(f"unknown target(s) {bad}; choose from {list(TARGETS)} or 'all'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision ({self.precision!r}) must be one of {list(PRECISIONS)}")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch ({self.max_batch}) must be >= 1")


Progress = Callable[[str, str], None]  # (stage, message)


def _wrapper(model: FavorModel, stage: str):
    if stage == "audio_encoder":
        return AudioFrontend(model)
    if stage == "visual_encoder":
        return VisualFrontend(model)
    if stage == "fusion":
        return FusionFrontend(model)
    return DecoderFrontend(model.cfg, merged_llm(model))


def example_inputs(wrapper, table: dict[str, profiles.Axis]) -> tuple[torch.Tensor, ...]:
    size = {name: example_size(a) for name, a in table.items()}
    b = size["batch"]
    if wrapper.name == "audio_encoder":
        return wrapper.example(b, mel_frames=max(size["mel_frames"], 4))
    if wrapper.name == "visual_encoder":
        return wrapper.example(b, frames=size["frames"], instruction=size["instruction"])
    if wrapper.name == "fusion":
        return wrapper.example(b, windows=size["windows"], audio_tokens=size["audio_tokens"])
    return wrapper.example(b, seq=size["seq"], past=size["past"])


def export_bundle(model: FavorModel, out: str | Path, options: ExportOptions = ExportOptions(),
                  checkpoint: str | Path | None = None, progress: Progress | None = None) -> dict:
    """Export every requested stage of ``model`` into ``out`` and write the manifest; returns it."""
    say = progress or (lambda stage, msg: None)
    out = Path(out)
    if (out / "manifest.json").exists():
        shutil.rmtree(out)  # a re-export replaces the whole bundle, never mixes two exports
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    cfg = model.cfg
    limits = profiles.Limits(max_batch=options.max_batch, max_frames=options.max_frames)
    table = profiles.axes(cfg, limits)
    stages: dict[str, dict] = {}
    files: list[str] = []
    for stage in options.stages:
        say(stage, "exporting")
        wrapper = _wrapper(model, stage)
        exported: ExportedStage = export_stage(wrapper, example_inputs(wrapper, table), table, out, cfg,
                                               options.fused_attention and stage == "fusion")
        stages[stage] = {"files": exported.files, "inputs": exported.inputs, "outputs": exported.outputs,
                         "axes": exported.axes, "export_seconds": round(exported.seconds, 2)}
        files += exported.files
        say(stage, f"done in {exported.seconds:.1f} s")
    if "decoder" in options.stages:
        emb = model.llm.base.get_input_embeddings().weight.detach().float().cpu().numpy()
        save_file({"weight": emb}, str(out / EMBED_FILE))
        files.append(EMBED_FILE)
        if options.precision == "int8":
            from export.quantize import quantize_graph

            say("decoder.int8", "quantising")
            start = time.perf_counter()
            q = quantize_graph(out / "decoder.onnx", out / "decoder.int8.onnx")
            stages["decoder.int8"] = dict(stages["decoder"], files=q, precision="int8",
                                          export_seconds=round(time.perf_counter() - start, 2))
            files += q
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out / "tokenizer"))
        files += [str(p.relative_to(out)) for p in sorted((out / "tokenizer").rglob("*")) if p.is_file()]
    manifest = {
        "model_version": MODEL_VERSION,
        "config": cfg.to_dict(),
        "checkpoint": ({"path": str(checkpoint), "sha256": sha256_file(checkpoint)}
                       if checkpoint is not None else None),
        "precision": options.precision,
        "attention": "fused" if options.fused_attention else "portable",
        "opset": OPSET,
        "limits": asdict(limits) | {"max_frames": limits.frames(cfg)},
        "dynamic_axes": profiles.as_dict(table),
        "stages": stages,
        "targets": {"onnx": "built"},
        "toolchain": toolchain_versions(),
        "files": {f: "" for f in files},
    }
    write_manifest(out, manifest)
    targets = manifest["targets"]
    if "tensorrt" in options.targets:
        from export import tensorrt

        say("tensorrt", "building engines")
        targets["tensorrt"] = tensorrt.build_bundle_engines(out, manifest, options.precision, say)
    if "trtllm" in options.targets and "decoder" in options.stages:
        from export import trtllm

        say("trtllm", "converting the decoder checkpoint")
        targets["trtllm"], written = trtllm.write_bundle_checkpoint(
            merged_llm(model), cfg, out, options.precision, options.max_batch,
            table["windows"].max)
        files += written
    manifest["files"] = {f: "" for f in files + _target_files(out)}
    write_manifest(out, manifest)
    return manifest


def _target_files(out: Path) -> list[str]:
    return [str(p.relative_to(out)) for sub in ("tensorrt", "trtllm") if (out / sub).is_dir()
            for p in sorted((out / sub).rglob("*")) if p.is_file()]
