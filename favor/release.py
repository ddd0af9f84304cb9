"""Import the authors' released delta checkpoint (``pytorch_model_*.pt``) into a FavorModel.

The release saves only trainable tensors (FAVOR-SPEC.md section 9). Depending on the DeepSpeed path
that wrote it, shared modules appear once (``video_*``, ``llama_proj``) or again under every Python
alias (``speech_*``, ``joint_*``, ``llama_proj_speech`` ...), and persistent buffers of every module
may be present (``*.position_ids``). The release loaded it with ``strict=False``; we are stricter:
every key is used, dropped as a known alias/buffer (checked equal to its canonical copy), or reported
unknown, and a missing trainable weight is an error.

Base models (Whisper, InstructBLIP, Vicuna) come from local paths in the config, as for any FAVOR
checkpoint. Use the ``favor-13b`` / ``favor-7b`` presets (orientation 'future' = the release's mask).

``release_config`` + ``import_release_checkpoint`` are the one-command path (``favor-export --ckpt
pytorch_model_1_101.pt --base-models DIR``): the preset is read off the delta (``llama_proj`` width),
the release's behaviour is forced (RELEASE_BEHAVIOUR), and each base model is found by the names the
release and its README use (RELEASE_BASE_NAMES) inside the given directories.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from favor.checkpoint import apply_weights
from favor.config import FavorConfig, get_config

# Release prefix -> FAVOR prefix (STYLE: one explicit table). Order matters: first match wins.
WEIGHT_MAP: list[tuple[str, str]] = [
    ("speech_pre_qformer_proj.", "audio_proj."),
    ("ln_video.", "qformer.ln."),
    ("video_frame_position_embedding.", "qformer.position_embedding."),
    ("video_query_tokens", "qformer.query_tokens"),
    ("video_Qformer.", "qformer."),
    ("llama_proj.", "projector.proj."),
    ("llama_model.", "llm.model."),
]

# Python aliases of the modules above (alignmode=2, speech_qformer=false): duplicates under ZeRO-3.
ALIASES: list[tuple[str, str]] = [
    ("ln_speech.", "ln_video."), ("ln_joint.", "ln_video."),
    ("joint_frame_position_embedding.", "video_frame_position_embedding."),
    ("speech_query_tokens", "video_query_tokens"), ("joint_query_tokens", "video_query_tokens"),
    ("speech_Qformer.", "video_Qformer."), ("joint_Qformer.", "video_Qformer."),
    ("llama_proj_speech.", "llama_proj."), ("llama_proj_joint.", "llama_proj."),
]

# Buffers the ZeRO-3 save path writes for every module; none is a weight we need.
KNOWN_BUFFERS = re.compile(r"(^|\.)(position_ids|inv_freq|token_type_ids|_float_tensor)$")


@dataclass
class ImportReport:
    used: list[str] = field(default_factory=list)  # release key -> loaded
    aliases: list[str] = field(default_factory=list)  # dropped: duplicate of a canonical key
    buffers: list[str] = field(default_factory=list)  # dropped: known persistent buffer
    unknown: list[str] = field(default_factory=list)  # not understood

    def summary(self) -> str:
        return (f"{len(self.used)} used, {len(self.aliases)} aliases dropped, "
                f"{len(self.buffers)} buffers dropped, {len(self.unknown)} unknown")


def _canonical(key: str) -> str | None:
    for alias, canon in ALIASES:
        if key.startswith(alias):
            return canon + key[len(alias):]
    return None


def _favor_name(key: str) -> str | None:
    for src, dst in WEIGHT_MAP:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def load_release_state(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: release checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, no code
    except Exception as err:  # weights_only refuses anything but plain containers of tensors
        raise ValueError(f"{path}: cannot be read as a plain tensor checkpoint ({err})") from None
    if isinstance(state, dict) and "module" in state and isinstance(state["module"], dict):
        state = state["module"]  # DeepSpeed engine wrapper
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a flat dict of tensors (the release's delta checkpoint)")
    return state


def convert_release_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """Release keys -> FAVOR keys, with a report of every key's fate."""
    report = ImportReport()
    weights: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if KNOWN_BUFFERS.search(key):
            report.buffers.append(key)
            continue
        canon = _canonical(key)
        if canon is not None:
            if canon in state and state[canon] is not value and not torch.equal(state[canon], value):
                raise ValueError(f"alias {key} differs from its canonical {canon}")
            if canon not in state:  # only the alias was saved: it carries the weight
                weights[_favor_name(canon)] = value
                report.used.append(key)
            else:
                report.aliases.append(key)
            continue
        name = _favor_name(key)
        if name is None:
            report.unknown.append(key)
            continue
        weights[name] = value
        report.used.append(key)
    return weights, report


def import_release(model, path: str | Path, allow_unknown: bool = False) -> ImportReport:
    """Load a release delta checkpoint into ``model`` (a FavorModel built with a matching preset)."""
    weights, report = convert_release_state(load_release_state(path))
    if report.unknown and not allow_unknown:
        raise ValueError(f"{path}: {len(report.unknown)} key(s) not understood, e.g. {report.unknown[:3]}")
    apply_weights(model, weights, str(path), require_trainable=True)
    return report


# ----------------------------------------------------------------------------- one-command import

# What the release computes, whatever preset carries the widths (FAVOR-SPEC.md sections 2.2 and 4).
RELEASE_BEHAVIOUR: dict[str, Any] = {"audio.pad_to_30s": True, "qformer.orientation": "future",
                                     "qformer.mask_padding_in_causal": False}
# LLM width (llama_proj rows) -> preset.
PRESET_BY_WIDTH = {5120: "favor-13b", 4096: "favor-7b"}
# Config key -> names the base model goes by (release code, its README, HF hub), first found wins.
_COMMON = {"audio.pretrained": ("whisper-large-v2", "large-v2.pt"),
           "visual.instruction_tokenizer": ("bert-base-uncased",)}
RELEASE_BASE_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "favor-13b": {**_COMMON,
                  "visual.pretrained": ("instruct_blip_vicuna13b_trimmed.pth", "instructblip-vicuna-13b"),
                  "llm.pretrained": ("vicuna-13b-v1.5", "vicuna.13b", "vicuna-13b-v1.1", "vicuna-13b")},
    "favor-7b": {**_COMMON,
                 "visual.pretrained": ("instruct_blip_vicuna7b_trimmed.pth", "instructblip-vicuna-7b"),
                 "llm.pretrained": ("vicuna-7b-v1.5", "vicuna.7b", "vicuna-7b-v1.1", "vicuna-7b")},
}


def is_release_checkpoint(path: str | Path) -> bool:
    """True for the authors' delta format: a plain tensor dict with release key names (no FAVOR meta)."""
    path = Path(path)
    if path.suffix not in (".pt", ".bin", ".pth") or not path.is_file():
        return False
    try:
        state = torch.load(path, map_location="meta", weights_only=True)  # names and shapes only
    except Exception:  # not loadable as plain tensors: not the release format
        return False
    if isinstance(state, dict) and isinstance(state.get("module"), dict):
        state = state["module"]
    if not isinstance(state, dict) or "meta" in state:
        return False
    return any(_favor_name(k) or _canonical(k) for k in state)


def infer_preset(state: dict[str, torch.Tensor]) -> str:
    """favor-13b / favor-7b from the width of ``llama_proj`` (or an alias of it)."""
    for key in ("llama_proj.weight", "llama_proj_joint.weight", "llama_proj_speech.weight"):
        if key in state:
            width = int(state[key].shape[0])
            if width in PRESET_BY_WIDTH:
                return PRESET_BY_WIDTH[width]
            raise ValueError(f"llama_proj has {width} rows, no release preset has that LLM width "
                             f"({sorted(PRESET_BY_WIDTH)}); pass the preset explicitly")
    raise ValueError("the delta has no llama_proj weight: not the release's FAVOR checkpoint")


def find_base_models(preset: str, base_dirs: list[Path], given: frozenset[str] = frozenset()) -> dict[str, str]:
    """Config overrides pointing each base model (except those in ``given``) at the first matching
    name inside ``base_dirs``; a missing one is an error (never a silently random base model)."""
    names = RELEASE_BASE_NAMES.get(preset, RELEASE_BASE_NAMES["favor-13b"])
    found: dict[str, str] = {}
    missing = []
    for key, candidates in names.items():
        if key in given:
            continue
        hits = [d / n for d in base_dirs for n in candidates if (d / n).exists()]
        if hits:
            found[key] = str(hits[0].resolve())
        else:
            missing.append(f"{key} ({' or '.join(candidates)})")
    if missing:
        where = ", ".join(str(d) for d in base_dirs) or "no --base-models given"
        raise ValueError(f"base model(s) not found in {where}: {'; '.join(missing)}")
    return found


def release_config(state: dict[str, torch.Tensor], base_dirs: list[Path] | None = None,
                   preset: str | None = None, **overrides: Any) -> FavorConfig:
    """The FavorConfig that computes what the release computes, base models resolved from ``base_dirs``.

    ``overrides`` (dotted keys) win over everything, e.g. an explicit ``llm.pretrained`` path."""
    preset = preset or infer_preset(state)
    bases = find_base_models(preset, list(base_dirs or []), frozenset(overrides))
    return get_config(preset, **{**RELEASE_BEHAVIOUR, **bases, **overrides})


def import_release_checkpoint(path: str | Path, base_dirs: list[Path] | None = None, preset: str | None = None,
                              *, config: FavorConfig | None = None, pretrained: bool = True, tokenizer=None,
                              instruction_tokenizer=None, llm_dtype: torch.dtype = torch.float32,
                              **overrides: Any):
    """Delta checkpoint + base models -> (FavorModel in eval mode, ImportReport, FAVOR weights).

    ``config`` (e.g. from a bundle's manifest) replaces the derived release config.

    ``pretrained=False`` builds the model on the meta device: every name and shape is checked, no base
    weight is read and no memory is allocated for them (all ``import-release`` needs)."""
    from favor.build import build_model

    state = load_release_state(path)
    if config is not None:  # e.g. the config a bundle was exported with
        cfg = config.replace(**overrides) if overrides else config
    else:
        cfg = release_config(state, base_dirs, preset, **overrides)
    weights, report = convert_release_state(state)
    if report.unknown:
        raise ValueError(f"{path}: {len(report.unknown)} key(s) not understood, e.g. {report.unknown[:3]}")
    if pretrained:
        model = build_model(cfg, tokenizer=tokenizer, instruction_tokenizer=instruction_tokenizer,
                            llm_dtype=llm_dtype)
    else:
        with torch.device("meta"):
            model = build_model(cfg, pretrained=False)
    apply_weights(model, weights, str(path), require_trainable=True)
    return model.eval(), report, weights


def write_imported_checkpoint(path: str | Path, out: str | Path, base_dirs: list[Path] | None = None,
                              preset: str | None = None, **overrides: Any) -> tuple[Path, ImportReport]:
    """``favor-export import-release``: the delta as one of our checkpoints (config + trainable weights
    + hashed base-model references), written once and reused. Base weights are not loaded."""
    from favor.checkpoint import Checkpoint, base_model_refs, save_checkpoint, sha256_path

    model, report, weights = import_release_checkpoint(path, base_dirs, preset, pretrained=False, **overrides)
    extra = {"imported_from": {"path": str(Path(path).resolve()), "sha256": sha256_path(path),
                               "report": report.summary()}}
    ckpt = Checkpoint(model.cfg, weights, base_model_refs(model.cfg), False, extra)
    return save_checkpoint(ckpt, out), report
