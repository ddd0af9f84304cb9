"""Import the authors' released delta checkpoint (``pytorch_model_*.pt``) into a FavorModel.

The release saves only trainable tensors (FAVOR-SPEC.md section 9). Depending on the DeepSpeed path
that wrote it, shared modules appear once (``video_*``, ``llama_proj``) or again under every Python
alias (``speech_*``, ``joint_*``, ``llama_proj_speech`` ...), and persistent buffers of every module
may be present (``*.position_ids``). The release loaded it with ``strict=False``; we are stricter:
every key is used, dropped as a known alias/buffer (checked equal to its canonical copy), or reported
unknown, and a missing trainable weight is an error.

Base models (Whisper, InstructBLIP, Vicuna) come from local paths in the config, as for any FAVOR
checkpoint. Use the ``favor-13b`` / ``favor-7b`` presets (orientation 'future' = the release's mask).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from favor.checkpoint import apply_weights

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
            if canon in state and not torch.equal(state[canon], value):
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
