"""Build a FavorModel from a config: every stage constructed once, base weights loaded if named.

Base models come from local paths in the config (``audio.pretrained``, ``visual.pretrained``,
``llm.pretrained``): HF directories, openai-whisper / CTranslate2 checkpoints, LAVIS ``.pth`` or a GGUF
file. Nothing is downloaded. Without paths, stages are randomly initialised (tests, benchmarks).
"""

from __future__ import annotations

from pathlib import Path

from favor.config import FavorConfig
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


def build_model(cfg: FavorConfig, pretrained: bool = True, tokenizer=None,
                instruction_tokenizer=None) -> FavorModel:
    """All stages from ``cfg``; ``pretrained=False`` skips base weights (random init everywhere)."""
    if pretrained and cfg.audio.pretrained:
        audio = AudioEncoder.from_pretrained(cfg, cfg.audio.pretrained)
    else:
        audio = AudioEncoder(cfg)
    if pretrained and cfg.visual.pretrained:
        visual = VisualEncoder.from_pretrained(cfg, cfg.visual.pretrained)
    else:
        visual = VisualEncoder(cfg)
    if cfg.audio.frozen:
        freeze(audio)
    if cfg.visual.frozen and not cfg.trainable_visual:
        freeze(visual)
    llm = LLM(cfg, add_lora(build_llama(cfg.llm, pretrained), cfg.llm))
    if tokenizer is None and cfg.llm.pretrained:
        tokenizer = load_tokenizer(cfg.llm.pretrained, cfg.llm.gguf_file)
    if instruction_tokenizer is None and cfg.visual.instruction_tokenizer:
        instruction_tokenizer = load_tokenizer(cfg.visual.instruction_tokenizer)
    return FavorModel(cfg, audio, visual, CausalQFormer(cfg), Projector(cfg), llm,
                      tokenizer=tokenizer, instruction_tokenizer=instruction_tokenizer)
