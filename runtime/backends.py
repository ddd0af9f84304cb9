"""Inference backends for the streaming runtime, and the one greedy decode loop they share.

A backend runs the model's stages on one stream (batch 1), tensors in and out:

    set_instruction(prompt)               the visual Q-Former's instruction (fixed per run)
    encode_frames(pixels [n, 3, S, S])    -> visual tokens [n, Qv, Dv]     (n = 1 when incremental)
    encode_audio(mel [M, Tm])             -> audio tokens  [Ta, Da]
    fuse(visual [n_v, Qv, Dv] | None, audio [Ta, Da] | None, num_frames)
                                          -> AV embeddings [Nq, D]          (one window)
    embed_tokens(ids [L])                 -> [L, D]
    prefill(embeds [L, D]) -> logits [V];  step(token) -> logits [V]        (KV cache inside)

``TorchBackend`` is the eager reference (LoRA merged into the LLM for speed). ``greedy_decode`` is
the only decode loop, so every backend produces text the same way. TensorRT is import-guarded:
``make_backend('tensorrt')`` explains what is missing. An ONNX Runtime backend needs the exported
bundle (export/); it is selected here only when that code is importable.

Notation: n frames, S image size, Qv visual tokens per frame, Ta audio tokens, M mel bins,
Tm mel frames, Nq queries per window, L prompt length, V vocabulary, D LLM width.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from favor.checkpoint import load_model
from favor.generation import instruction_inputs
from favor.model import FavorModel
from favor.prompt import inference_ids

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
# Tokenizer directories looked for beside a checkpoint whose config names no base LLM (tests, tiny).
TOKENIZER_DIRS = ("{stem}.tokenizer", "tokenizer")


def find_tokenizer(checkpoint: Path):
    """A tokenizer saved beside ``checkpoint`` (``<stem>.tokenizer/`` or ``tokenizer/``), or None."""
    from transformers import AutoTokenizer

    for pattern in TOKENIZER_DIRS:
        d = checkpoint.parent / pattern.format(stem=checkpoint.stem)
        if d.is_dir():
            return AutoTokenizer.from_pretrained(str(d))
    return None


def load_runtime_model(path: str | Path, fps: float | None = None, frames_per_window: int | None = None
                       ) -> FavorModel:
    """A FAVOR checkpoint -> FavorModel in eval mode, with the timing overridden if asked.

    The tokenizer comes from the config's base LLM, else from a directory beside the checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: model checkpoint not found (expected a .safetensors or .pt file)")
    overrides = {}
    if fps is not None:
        overrides["timing.video_fps"] = float(fps)
    if frames_per_window is not None:
        overrides["timing.frames_per_window"] = int(frames_per_window)
    tokenizer = find_tokenizer(path)
    model = load_model(path, tokenizer=tokenizer, **overrides)
    if model.tokenizer is None:
        raise ValueError(f"{path}: no tokenizer: the checkpoint names no base LLM and no "
                         f"{TOKENIZER_DIRS[0].format(stem=path.stem)}/ or tokenizer/ directory is beside it")
    return model


class TorchBackend:
    """Eager PyTorch on the model's own stages (the reference every other backend must match)."""

    name = "torch"

    def __init__(self, model: FavorModel, merge_lora: bool = True):
        from peft import PeftModel

        self.model = model.eval()
        self.cfg = model.cfg
        self.tokenizer = model.tokenizer
        if merge_lora and isinstance(model.llm.model, PeftModel):
            from favor.llm import merge_lora as merge

            model.llm.model = merge(model.llm.model)  # one matmul per projection instead of three
        self.lm = model.llm.base
        self._instruction: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cache = None
        self._pos = 0

    def set_instruction(self, prompt: str) -> None:
        self._instruction = instruction_inputs(self.model.instruction_tokenizer, [prompt],
                                               self.cfg.visual.max_instruction_tokens)

    @torch.inference_mode()
    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._instruction is None:
            raise ValueError("set_instruction(prompt) must be called before encode_frames")
        ids, mask = self._instruction
        return self.model.encode_visual(pixels[None], ids, mask)[0]  # [n, Qv, Dv]

    @torch.inference_mode()
    def encode_audio(self, mel: torch.Tensor) -> torch.Tensor:
        return self.model.encode_audio(mel[None])[0]  # [Ta, Da]

    @torch.inference_mode()
    def fuse(self, visual: torch.Tensor | None, audio: torch.Tensor | None, num_frames: int) -> torch.Tensor:
        av = self.model.fuse(None if visual is None else visual[None], None if audio is None else audio[None],
                             num_frames=num_frames)
        return av.embeds[0]  # [Nq, D]: one window, never padding

    @torch.inference_mode()
    def embed_tokens(self, ids: list[int]) -> torch.Tensor:
        return self.model.llm.embed(torch.tensor(ids, dtype=torch.long))  # [L, D]

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        self._cache = DynamicCache()
        out = self.lm(inputs_embeds=embeds[None], past_key_values=self._cache, use_cache=True)
        self._pos = embeds.shape[0]
        return out.logits[0, -1]  # [V]

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        ids = torch.tensor([[token]], dtype=torch.long)
        pos = torch.tensor([[self._pos]], dtype=torch.long)
        out = self.lm(input_ids=ids, position_ids=pos, past_key_values=self._cache, use_cache=True)
        self._pos += 1
        return out.logits[0, -1]  # [V]


@dataclass
class Decoded:
    ids: list[int]
    prefill_s: float
    decode_s: float


def greedy_decode(backend, embeds: torch.Tensor, max_new_tokens: int, eos_id: int,
                  ignore_eos: bool = False) -> Decoded:
    """Greedy tokens after the prompt embeds [L, D]; stops at EOS unless ``ignore_eos`` (benchmarks
    decode a fixed number of tokens so random-weight models are timed like trained ones)."""
    t0 = time.perf_counter()
    logits = backend.prefill(embeds)
    t1 = time.perf_counter()
    ids: list[int] = []
    for _ in range(max_new_tokens):
        token = int(torch.as_tensor(logits).argmax())
        if token == eos_id and not ignore_eos:
            break
        ids.append(token)
        if len(ids) == max_new_tokens:
            break
        logits = backend.step(token)
    return Decoded(ids, t1 - t0, time.perf_counter() - t1)


def prompt_embeds(backend, prompt: str, av: torch.Tensor) -> torch.Tensor:
    """[BOS] "USER: <Img>" AV "</Img> {prompt}\\nASSISTANT:" as embeddings [L, D] (favor.prompt)."""
    p = inference_ids(backend.tokenizer, prompt)
    pre = backend.embed_tokens([backend.cfg.llm.bos_token_id, *p.pre])
    post = backend.embed_tokens(p.post)
    return torch.cat([pre, torch.as_tensor(av).to(pre.dtype), post])  # [L, D]


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None and \
        importlib.util.find_spec("export.runtime_bundle") is not None


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def make_backend(name: str, model_path: str | Path, fps: float | None = None,
                 frames_per_window: int | None = None):
    """Backend by name; 'auto' picks TensorRT, then ONNX Runtime (for an exported bundle), then torch."""
    if name not in BACKENDS:
        raise ValueError(f"backend ({name!r}) must be one of {', '.join(BACKENDS)}")
    path = Path(model_path)
    if name == "tensorrt" or (name == "auto" and tensorrt_available() and path.is_dir()):
        raise ValueError("backend 'tensorrt' is not available in this build: the runtime's TensorRT path "
                         "is not implemented (and TensorRT is not installed here); use torch")
    if name == "onnxruntime" or (name == "auto" and path.is_dir()):
        raise ValueError(f"{path}: backend 'onnxruntime' needs an exported bundle and export/ support, "
                         "which this build lacks; use --backend torch with a checkpoint")
    return TorchBackend(load_runtime_model(path, fps, frames_per_window))
