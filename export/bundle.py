"""Write a deployable bundle from a FavorModel: ONNX graphs, embedding table, tokenizer,
TensorRT / TensorRT-LLM artefacts when asked, and the manifest that pins them all.

    bundle/
      manifest.json                       export/manifest.py
      audio_encoder.onnx (+ .onnx.data)   mel -> audio tokens
      visual_encoder.onnx                 frames + instruction -> visual tokens
      fusion.onnx                         sync + windows + causal Q-Former + projector
      decoder.onnx (+ .onnx.data)         merged-LoRA LLM, inputs_embeds + KV cache (export/genai_decoder.py:
                                          GenAI builder graph, fp32 / weight-only int8 / int4)
      embed_tokens.safetensors            LLM input embeddings [V, D] for ids and the prompt table
      tokenizer/                          when the model has a tokenizer
      instruction_tokenizer/              the visual Q-Former's own tokenizer (BERT for 7B/13B)
      tensorrt/, trtllm/                  --targets tensorrt / trtllm

Exporting into an existing bundle adds targets and keeps the others (the README's three-step
recipe: onnx, then tensorrt, then trtllm). The bundle must come from the same checkpoint (sha256)
and config, else it is refused. New files are written in a staging directory beside the bundle,
moved in, and the manifest is replaced last (atomically): until then the old manifest, whose
files are untouched when a target is only added, still describes a valid bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.numpy import save_file

from export import profiles
from export.decoder import DecoderFrontend, merged_llm
from export.frontend import AudioFrontend, FusionFrontend, VisualFrontend
from export.genai_decoder import decoder_stage, resolve_precision
from export.manifest import BUNDLE_VERSION, EMBED_FILE, FORMAT, MANIFEST, load_manifest, toolchain_versions
from export.onnx import OPSET, ExportedStage, example_size, export_stage
from export.options import PRECISIONS, STAGES, TARGETS, ExportOptions  # noqa: F401 (re-exported)
from favor.checkpoint import MODEL_VERSION
from favor.fileio import atomic_write, sha256_file
from favor.model import FavorModel

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


def export_bundle(model: FavorModel | None, out: str | Path, options: ExportOptions = ExportOptions(),  # noqa: B008
                  checkpoint: str | Path | None = None, progress: Progress | None = None) -> dict:
    """Export the requested targets of ``model`` into ``out`` (kept targets stay) and write the manifest.

    ``model`` may be None when no requested target needs it (``needs_model``)."""
    say = progress or (lambda stage, msg: None)
    out = Path(out)
    source = checkpoint_record(checkpoint)
    previous = previous_manifest(out, model.cfg if model is not None else None, source)
    options = replace(options, precision=resolve_precision(model, options.precision, previous))
    onnx = "onnx" in options.targets or not _has_onnx(previous, options)
    if model is None and (onnx or "trtllm" in options.targets):
        raise ValueError(f"{out}: the requested targets need the model (no compatible ONNX graphs to reuse)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        if onnx:
            manifest = _export_onnx(model.eval(), staging, options, source, say)
        else:
            manifest = {k: v for k, v in previous.items() if k not in ("format", "bundle_version")}
            for name in _onnx_files(previous):  # the engine builder reads the kept graphs from here
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                os.symlink((out / name).resolve(), staging / name)
        kept = previous["targets"] if previous else {}
        rebuilt = _rebuilt(options, onnx)
        manifest["targets"] = {t: state for t, state in kept.items() if t not in rebuilt}
        manifest["target_options"] = {t: o for t, o in manifest.get("target_options", {}).items()
                                      if t not in rebuilt}
        if onnx:
            manifest["targets"]["onnx"] = "built"
            manifest.pop("verified", None)  # new graphs: verify again
        _build_targets(model, staging, manifest, options, say)
        _commit(staging, out, manifest, previous, rebuilt=rebuilt)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_manifest(out, check_hashes=False)


def needs_model(out: str | Path, options: ExportOptions) -> bool:
    """False when only TensorRT engines are asked for and the bundle's ONNX graphs can be reused."""
    if "onnx" in options.targets or "trtllm" in options.targets:
        return True
    try:
        previous = load_manifest(out, check_hashes=False)
    except ValueError:
        return True
    return not _has_onnx(previous, options)


def checkpoint_record(checkpoint: str | Path | None) -> dict | None:
    """What a manifest keeps of its checkpoint: absolute path and sha256 (found again when moved)."""
    if checkpoint is None:
        return None
    path = Path(checkpoint).resolve()
    return {"path": str(path), "sha256": sha256_file(path)}


def previous_manifest(out: Path, cfg, source: dict | None) -> dict | None:
    """The existing bundle's manifest, checked; refuses one made from another checkpoint or config."""
    if not out.exists():
        return None
    if not (out / MANIFEST).is_file():
        if any(out.iterdir()):
            raise ValueError(f"{out}: exists, is not empty and holds no {MANIFEST}; export into a new directory")
        return None
    try:
        previous = load_manifest(out)
    except ValueError as err:
        raise ValueError(f"cannot add to the existing bundle: {err}") from None
    old = previous.get("checkpoint") or {}
    if source and old.get("sha256") and old["sha256"] != source["sha256"]:
        raise ValueError(f"{out}: exported from another checkpoint ({old.get('path')}, sha256 "
                         f"{old['sha256'][:12]}...), not {source['path']} ({source['sha256'][:12]}...); "
                         f"export into a new directory")
    if cfg is not None and previous["config"] != json.loads(json.dumps(cfg.to_dict())):
        raise ValueError(f"{out}: exported with a different model config (preset, timing or overrides such "
                         f"as --window); export into a new directory")
    return previous


def locate_checkpoint(bundle: Path, manifest: dict, given: Path | None) -> Path:
    """The checkpoint a bundle was exported from: ``given``, else the manifest's absolute path; a file
    whose sha256 differs from the manifest's is refused, and a moved checkpoint is named as such."""
    record = manifest.get("checkpoint")
    if given is None:
        if not record:
            raise ValueError(f"{bundle}: the manifest names no checkpoint; pass --ckpt")
        given = Path(record["path"])
        if not given.is_file():
            raise ValueError(f"{bundle}: its checkpoint has moved or been deleted: {given} not found "
                             f"(sha256 {record['sha256'][:12]}...); pass --ckpt NEW_PATH")
    if record and record.get("sha256") and Path(given).is_file() and sha256_file(given) != record["sha256"]:
        raise ValueError(f"{given}: not the checkpoint {bundle} was exported from (sha256 differs from the "
                         f"manifest's {record['sha256'][:12]}..., recorded at {record['path']})")
    return Path(given)


def manifest_base_dirs(manifest: dict) -> list[Path]:
    """Directories holding the base models the bundle's config names (for re-importing a release)."""
    c = manifest["config"]
    paths = (c["audio"]["pretrained"], c["visual"]["pretrained"], c["visual"].get("instruction_tokenizer"),
             c["llm"]["pretrained"])
    dirs = [Path(p).parent for p in paths if p and not str(p).startswith("pypi:") and Path(p).exists()]
    return list(dict.fromkeys(dirs))


def _has_onnx(previous: dict | None, options: ExportOptions) -> bool:
    """The bundle holds ONNX graphs the requested targets can reuse (same attention form)."""
    if not previous or previous.get("targets", {}).get("onnx") != "built":
        return False
    return previous.get("attention") == ("fused" if options.fused_attention else "portable")


def _onnx_files(manifest: dict) -> list[str]:
    return sorted(f for entry in manifest["stages"].values() for f in entry["files"])


def _rebuilt(options: ExportOptions, onnx: bool) -> set[str]:
    """Targets whose old files go: the requested ones, and TensorRT's engines when the ONNX graphs
    they were built from are replaced."""
    return {t for t in options.targets if t != "onnx"} | ({"onnx", "tensorrt"} if onnx else set())


def _export_onnx(model: FavorModel, out: Path, options: ExportOptions, source: dict | None, say: Progress) -> dict:
    """ONNX graphs, embedding table, tokenizers -> a manifest dict (files listed, not yet hashed)."""
    cfg = model.cfg
    limits = profiles.Limits(max_batch=options.max_batch, max_frames=options.max_frames)
    table = profiles.axes(cfg, limits)
    stages: dict[str, dict] = {}
    files: list[str] = []
    for stage in options.stages:
        say(stage, "exporting")
        if stage == "decoder":  # the GenAI builder graph, or our export as fallback (export/genai_decoder.py)
            stages[stage] = decoder_stage(model, out, options.precision, table, say)
            files += stages[stage]["files"]
            say(stage, f"done in {stages[stage]['export_seconds']:.1f} s")
            continue
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
    for sub, tok in (("tokenizer", model.tokenizer), ("instruction_tokenizer", model._instruction_tokenizer)):
        if tok is not None:
            tok.save_pretrained(str(out / sub))
            files += [str(p.relative_to(out)) for p in sorted((out / sub).rglob("*")) if p.is_file()]
    return {
        "model_version": MODEL_VERSION,
        "config": cfg.to_dict(),
        "checkpoint": source,
        "precision": options.precision,
        "attention": "fused" if options.fused_attention else "portable",
        "opset": OPSET,
        "limits": asdict(limits) | {"max_frames": limits.frames(cfg)},
        "dynamic_axes": profiles.as_dict(table),
        "stages": stages,
        "toolchain": toolchain_versions(),
        "files": {f: "" for f in files},
    }


def _build_targets(model: FavorModel | None, staging: Path, manifest: dict, options: ExportOptions,
                   say: Progress) -> None:
    """TensorRT engines / TensorRT-LLM checkpoint into ``staging`` (tensorrt/, trtllm/)."""
    targets, opts = manifest["targets"], manifest["target_options"]
    if "tensorrt" in options.targets:
        from export import tensorrt

        say("tensorrt", "building engines")
        targets["tensorrt"] = tensorrt.build_bundle_engines(staging, manifest, options.precision, say)
        opts["tensorrt"] = {"precision": options.precision}
    if "trtllm" in options.targets and "decoder" in options.stages:
        from export import trtllm

        say("trtllm", "converting the decoder checkpoint")
        table = profiles.axes(model.cfg, profiles.Limits(max_batch=options.max_batch, max_frames=options.max_frames))
        with tempfile.TemporaryDirectory(dir=staging.parent, prefix=f".{staging.name}.hf-") as work:
            targets["trtllm"], _ = trtllm.write_bundle_checkpoint(
                model, staging, options.precision, options.max_batch, table["windows"].max,
                lora=options.trtllm_lora, work_dir=Path(work))
        opts["trtllm"] = {"precision": options.precision, "lora": options.trtllm_lora}


def _target_of(name: str) -> str:
    top = name.split("/", 1)[0]
    return top if top in ("tensorrt", "trtllm") else "onnx"


def _commit(staging: Path, out: Path, manifest: dict, previous: dict | None, rebuilt: set[str]) -> None:
    """Move the staged targets into ``out``, then replace the manifest atomically (the commit point)."""
    out.mkdir(parents=True, exist_ok=True)
    staged = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file() and not p.is_symlink())
    old_files = dict(previous["files"]) if previous else {}
    kept = {f: h for f, h in old_files.items() if _target_of(f) not in rebuilt and f != MANIFEST}
    new = {f: sha256_file(staging / f) for f in staged}
    for f in staged:
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / f, out / f)
    manifest = dict(manifest, format=FORMAT, bundle_version=BUNDLE_VERSION, files=dict(sorted({**kept, **new}.items())))
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(text))
    for f in old_files:  # files of a rebuilt target that the new export no longer has
        if f not in manifest["files"] and f != MANIFEST and _target_of(f) in rebuilt:
            (out / f).unlink(missing_ok=True)
