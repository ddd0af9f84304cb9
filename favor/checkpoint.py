"""FAVOR checkpoints: config + format version + trainable weights + base-model references.

Two containers, same content:
- ``.safetensors``: tensors, with config / references as JSON strings in the metadata;
- ``.pt``: a dict of plain tensors and strings, loadable with ``torch.load(weights_only=True)``.
Pickled objects are never written nor executed. Writes are atomic (temp file + fsync + rename), so a
crash mid-save leaves the previous checkpoint intact. ``self_contained=True`` embeds every weight
(frozen bases included) so the file needs no base models. A frozen visual encoder with no base-model
file (``embedded_visual``: the demo's synthetic-pretrained ViT) is always carried, like trainable weights.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from favor import __version__
from favor.config import FORMAT_VERSION, FavorConfig
from favor.fileio import atomic_write, sha256_path

MAGIC = "favor-checkpoint"
VISUAL_PREFIX = "visual_encoder."  # FavorModel's name for the visual encoder
MODEL_VERSION = __version__


@dataclass
class Checkpoint:
    config: FavorConfig
    weights: dict[str, torch.Tensor]
    base_models: dict[str, dict] = field(default_factory=dict)  # stage -> {"path", "sha256"}
    self_contained: bool = False
    extra: dict = field(default_factory=dict)  # e.g. training step, metrics (JSON-serialisable)


def base_model_refs(cfg: FavorConfig, hash_files: bool = True) -> dict[str, dict]:
    refs = {}
    for stage, path in (("audio", cfg.audio.pretrained), ("visual", cfg.visual.pretrained),
                        ("llm", cfg.llm.pretrained)):
        if path and path.startswith("pypi:"):  # pinned wheel; favor.pretrained verifies its hash on use
            refs[stage] = {"path": path, "sha256": "verified-by-favor.pretrained"}
        elif path:
            target = Path(path) / cfg.llm.gguf_file if stage == "llm" and cfg.llm.gguf_file else Path(path)
            refs[stage] = {"path": str(path),
                           "sha256": sha256_path(target) if hash_files and target.exists() else None}
    return refs


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    path = Path(path)
    # clone: tied weights (embeddings = lm_head) share storage, which safetensors refuses
    weights = {k: v.detach().cpu().clone().contiguous() for k, v in ckpt.weights.items()}
    meta = {"format": MAGIC, "format_version": str(FORMAT_VERSION), "model_version": MODEL_VERSION,
            "config": json.dumps(ckpt.config.to_dict()), "base_models": json.dumps(ckpt.base_models),
            "self_contained": json.dumps(ckpt.self_contained), "extra": json.dumps(ckpt.extra)}
    if path.suffix == ".safetensors":
        atomic_write(path, lambda tmp: save_file(weights, tmp, metadata=meta))
    elif path.suffix == ".pt":
        atomic_write(path, lambda tmp: torch.save({"meta": meta, "weights": weights}, tmp))
    else:
        raise ValueError(f"{path}: checkpoint must end in .safetensors or .pt")
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
            weights = load_file(str(path))
        elif path.suffix == ".pt":
            blob = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
            if not isinstance(blob, dict) or "meta" not in blob:
                raise ValueError("not a FAVOR checkpoint (no 'meta'); for the authors' release use "
                                 "favor.release.import_release")
            meta, weights = blob["meta"], blob.get("weights")
        else:
            raise ValueError("checkpoint must end in .safetensors or .pt")
    except pickle.UnpicklingError:  # torch's own message is six lines and suggests weights_only=False
        raise ValueError(f"{path}: refused: it holds pickled objects other than tensors and strings "
                         "(not a FAVOR checkpoint; nothing in it was run)") from None
    except (OSError, RuntimeError, ValueError, KeyError, EOFError) as err:
        raise ValueError(f"{path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    try:
        return _from_metadata(meta, weights)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _from_metadata(meta, weights) -> Checkpoint:
    """Checkpoint from its (untrusted) metadata: every field's type and range checked first."""
    from favor.validate import json_object

    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"metadata must be a mapping of strings, got {type(meta).__name__}")
    if meta.get("format") != MAGIC:
        raise ValueError("not a FAVOR checkpoint (metadata format is not 'favor-checkpoint')")
    version = meta.get("format_version", "")
    if not version.isdigit():
        raise ValueError(f"metadata format_version ({version!r}) must be a whole number")
    if int(version) > FORMAT_VERSION:
        raise ValueError(f"format version {version} is newer than this favor ({FORMAT_VERSION})")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError("weights must be a mapping of names to tensors")
    config = FavorConfig.from_dict(json_object(meta.get("config"), "metadata 'config'"))
    base_models = json_object(meta.get("base_models", "{}"), "metadata 'base_models'")
    extra = json_object(meta.get("extra", "{}"), "metadata 'extra'")
    self_contained = meta.get("self_contained", "false")
    if self_contained not in ("true", "false"):
        raise ValueError(f"metadata self_contained ({self_contained!r}) must be true or false")
    return Checkpoint(config, weights, base_models, self_contained == "true", extra)


def apply_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str,
                  require_trainable: bool = True) -> None:
    """Load weights into ``model``, naming every mismatch: unknown key, wrong shape, missing trainable."""
    params = dict(model.named_parameters())
    state = model.state_dict()
    unknown = sorted(k for k in weights if k not in state)
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} unknown weight(s), e.g. {unknown[:3]}")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise ValueError(f"{source}: {k} has shape {list(v.shape)}, the model expects "
                             f"{list(state[k].shape)} (config mismatch?)")
    if require_trainable:
        missing = sorted(k for k, p in params.items() if p.requires_grad and k not in weights)
        if missing:
            raise ValueError(f"{source}: {len(missing)} trainable weight(s) missing, e.g. {missing[:3]}")
    if getattr(getattr(model, "cfg", None), "embedded_visual", False):
        missing = sorted(k for k in state if k.startswith(VISUAL_PREFIX) and k not in weights)
        if missing:
            raise ValueError(f"{source}: the config says the checkpoint carries its visual encoder "
                             f"(embedded_visual) but {len(missing)} of its weights are missing, e.g. {missing[:3]}")
    with torch.no_grad():
        for k, v in weights.items():
            state[k].copy_(v.to(state[k].dtype))


def embedded_visual_weights(model) -> dict[str, torch.Tensor]:
    """The visual encoder's weights under their model names when the config embeds them (a frozen encoder
    with no base-model file, ``embedded_visual``), else nothing. A feature-caching wrapper (training) is
    looked through: it keeps the encoder outside the module tree."""
    if not model.cfg.embedded_visual:
        return {}
    encoder = getattr(model.visual_encoder, "inner", model.visual_encoder)
    return {VISUAL_PREFIX + k: v.detach() for k, v in encoder.state_dict().items()}


def checkpoint_from_model(model, extra: dict | None = None, self_contained: bool = False,
                          hash_base_models: bool = True) -> Checkpoint:
    weights = model.state_dict() if self_contained else {**model.trainable_state_dict(),
                                                         **embedded_visual_weights(model)}
    return Checkpoint(model.cfg, dict(weights), base_model_refs(model.cfg, hash_base_models),
                      self_contained, extra or {})


def load_model(path: str | Path, tokenizer=None, instruction_tokenizer=None, **cfg_overrides):
    """Checkpoint -> FavorModel with its base models (from the recorded local paths) and weights."""
    from favor.build import build_model

    ckpt = load_checkpoint(path)
    cfg = ckpt.config.replace(**cfg_overrides) if cfg_overrides else ckpt.config
    model = build_model(cfg, pretrained=not ckpt.self_contained, tokenizer=tokenizer,
                        instruction_tokenizer=instruction_tokenizer)
    apply_weights(model, ckpt.weights, str(path))
    return model.eval()
