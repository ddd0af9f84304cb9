"""Inference backends for the streaming runtime: the model's stages on one stream (batch 1).

    set_instruction(prompt)               the visual Q-Former's instruction (fixed per run)
    encode_frames(pixels [n, 3, S, S])    -> visual tokens [n, Qv, Dv]     (n = 1 when incremental)
    encode_audio(mel [M, Tm])             -> audio tokens  [Ta, Da]
    fuse(visual [n_v, Qv, Dv] | None, audio [Ta, Da] | None, num_frames)
                                          -> AV embeddings [Nq, D]          (one window)
    embed_tokens(ids)                     -> [L, D]
    inference()                           -> favor.captions.Inference (prefill / decode / reorder)

Text is decoded by ``favor.captions.greedy_decode`` for every backend (one loop), through
``TimedInference``, which splits LLM time into prefill and decode for the stage breakdown.

- ``TorchBackend``: eager PyTorch on a checkpoint (LoRA merged into the LLM for speed).
- ``OnnxRuntimeBackend``: an exported bundle (export/, ``favor-export``) run by ONNX Runtime CPU.
- ``TensorRTBackend`` (runtime/trt_backend.py): the bundle's TensorRT engines + TensorRT-LLM decoder, built
  only when tensorrt, tensorrt_llm and CUDA are all present (unverified on hardware). TensorRT-LLM owns
  its decode loop, so that backend has ``generate`` instead of ``inference``; ``caption_tokens`` picks.

Notation: n frames, S image size, Qv visual tokens per frame, Ta audio tokens, M mel bins,
Tm mel frames, Nq queries per window, L prompt length, V vocabulary, D LLM width.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from favor.captions import TorchInference
from favor.captions import greedy_decode as captions_greedy_decode
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

    def inference(self) -> TorchInference:
        return TorchInference(self.lm)


class OnnxRuntimeBackend:
    """An exported bundle (manifest + ONNX graphs) on ONNX Runtime's CPU provider."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | dict[str, int] | None = None, int8: bool = False,
                 providers: tuple[str, ...] | None = None, check_hashes: bool = True):
        from export.ort_inference import OrtBundle

        self.bundle = OrtBundle(path, int8=int8, threads=threads, providers=providers, check_hashes=check_hashes)
        self.cfg = self.bundle.cfg
        self.tokenizer = self.bundle.tokenizer()
        self.instruction_tokenizer = self.tokenizer
        if self.cfg.visual.instruction_tokenizer:
            from favor.build import load_tokenizer

            self.instruction_tokenizer = load_tokenizer(self.cfg.visual.instruction_tokenizer)
        self._instruction: tuple[torch.Tensor, torch.Tensor] | None = None
        self._inference = None

    def set_instruction(self, prompt: str) -> None:
        self._instruction = instruction_inputs(self.instruction_tokenizer, [prompt],
                                               self.cfg.visual.max_instruction_tokens)

    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._instruction is None:
            raise ValueError("set_instruction(prompt) must be called before encode_frames")
        return self.bundle.encode_visual(pixels[None], *self._instruction)[0]  # [n, Qv, Dv]

    def encode_audio(self, mel: torch.Tensor) -> torch.Tensor:
        return self.bundle.encode_audio(mel[None])[0]  # [Ta, Da]

    def fuse(self, visual: torch.Tensor | None, audio: torch.Tensor | None, num_frames: int) -> torch.Tensor:
        cfg = self.cfg
        present = torch.tensor([[float(visual is not None), float(audio is not None)]])  # [1, 2]
        # The graph takes both streams: a missing one enters as zeros with its modality mask at 0,
        # which is what sync.align does with None.
        if visual is None:
            visual = torch.zeros(num_frames, cfg.visual.num_query_tokens, cfg.visual_width)
        if visual.shape[0] < num_frames:  # video ended inside this window: zero frames, as align pads
            visual = torch.cat([visual, visual.new_zeros(num_frames - visual.shape[0], *visual.shape[1:])])
        if audio is None:
            audio = torch.zeros(round(num_frames * cfg.timing.audio_tokens_per_frame), cfg.audio_proj_dim)
        embeds, mask = self.bundle.fuse(visual[None], audio[None], present)
        return embeds[0][mask[0].bool()]  # [Nq, D]: the window's rows

    def embed_tokens(self, ids: list[int]) -> torch.Tensor:
        rows = self.bundle.embedding[np.asarray(ids, dtype=np.int64)]  # [L, D]
        return torch.from_numpy(np.ascontiguousarray(rows))

    def inference(self):
        if self._inference is None:
            self._inference = self.bundle.inference()
        return self._inference


class TimedInference:
    """Wraps an ``Inference`` and adds up the seconds spent in prefill and in decode steps."""

    def __init__(self, inner):
        self.inner = inner
        self.prefill_s = self.decode_s = 0.0

    def prefill(self, embeds, attention_mask):
        t0 = time.perf_counter()
        out = self.inner.prefill(embeds, attention_mask)
        self.prefill_s += time.perf_counter() - t0
        return out

    def decode(self, ids, cache):
        t0 = time.perf_counter()
        out = self.inner.decode(ids, cache)
        self.decode_s += time.perf_counter() - t0
        return out

    def reorder(self, cache, rows):
        return self.inner.reorder(cache, rows)


def greedy_caption(backend, embeds: torch.Tensor, max_new_tokens: int) -> tuple[list[int], float, float]:
    """favor.captions' greedy loop on prompt embeds [L, D]: (token ids, prefill s, decode s)."""
    timed = TimedInference(backend.inference())
    mask = torch.ones(1, embeds.shape[0], dtype=torch.long)  # [1, L]: one stream, no padding
    eos = backend.cfg.llm.eos_token_id
    result = captions_greedy_decode(timed, embeds[None], mask, max_new_tokens, eos)[0]
    return result.tokens, timed.prefill_s, timed.decode_s


def prompt_embeds(backend, prompt: str, av: torch.Tensor) -> torch.Tensor:
    """[BOS] "USER: <Img>" AV "</Img> {prompt}\\nASSISTANT:" as embeddings [L, D] (favor.prompt)."""
    p = inference_ids(backend.tokenizer, prompt)
    pre = backend.embed_tokens([backend.cfg.llm.bos_token_id, *p.pre])
    post = backend.embed_tokens(p.post)
    return torch.cat([pre, torch.as_tensor(av).to(pre.dtype), post])  # [L, D]


def caption_tokens(backend, prompt: str, av: torch.Tensor, max_new_tokens: int
                   ) -> tuple[list[int], int, float, float]:
    """Greedy caption of one prompt around AV rows [A, D]: (ids, prompt length, prefill s, decode s).

    TensorRT-LLM decodes inside its engine (``backend.generate``); every other backend runs
    favor.captions' loop on the spliced prompt embeddings."""
    if hasattr(backend, "generate"):
        return backend.generate(prompt, av, max_new_tokens)
    full = prompt_embeds(backend, prompt, av)  # [L, D]
    ids, prefill_s, decode_s = greedy_caption(backend, full, max_new_tokens)
    return ids, full.shape[0], prefill_s, decode_s


def is_bundle(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file()


def _check_bundle_timing(backend, path: Path, fps: float | None, frames_per_window: int | None):
    """A bundle's timing is baked in at export: refuse a different --fps / --window."""
    t = backend.cfg.timing
    for flag, asked, baked in (("--fps", fps, t.video_fps), ("--window", frames_per_window, t.frames_per_window)):
        if asked is not None and asked != baked:
            raise ValueError(f"{path}: the bundle was exported for {flag} {baked:g}, got {asked:g}; "
                             "re-export, or run the checkpoint on the torch backend")
    return backend


def make_backend(name: str, model_path: str | Path, fps: float | None = None,
                 frames_per_window: int | None = None, threads: int | str | None = None, policy=None):
    """Backend by name over a checkpoint or an exported bundle (runtime/selection.py decides).

    'auto': a checkpoint is exported once into the bundle cache (runtime/bundle_cache.py, ``policy``),
    then TensorRT if the bundle holds engines and TensorRT is usable, else ONNX Runtime with the CUDA
    provider when onnxruntime-gpu offers it, else the CPU provider. 'torch': eager PyTorch."""
    from runtime.selection import open_backend

    return open_backend(name, model_path, fps, frames_per_window, threads, policy)

