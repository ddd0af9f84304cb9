"""Inference backends for the streaming runtime: the model's stages on one stream (batch 1).

Every backend satisfies ``Backend``:

    set_instruction(prompt)               the visual Q-Former's instruction (fixed per run)
    encode_frames(pixels [n, 3, S, S])    -> visual tokens [n, Qv, Dv]     (n = 1 when incremental)
    encode_audio(mel [M, Tm])             -> audio tokens  [Ta, Da]
    fuse(visual [n_v, Qv, Dv] | None, audio [Ta, Da] | None, num_frames)
                                          -> AV embeddings [Nq, D]          (one window)
    caption(prompt, av [A, D], max_new_tokens, on_token=None)
                                          -> favor.captions.CaptionResult  (ids, text, prompt length,
                                             prefill / decode seconds; on_token(0, id) per decided token)

Captions are decoded by ``favor.captions.caption`` (the one prompt assembly and the one decode loop, the
same as training eval, favor-eval and favor-export verify) through ``TimedInference``, which splits LLM
time into prefill and decode for the stage breakdown (``StepwiseCaptioner``).

- ``TorchBackend``: eager PyTorch on a checkpoint (LoRA merged into the LLM for speed).
- ``BundleBackend``: an exported bundle's manifest, config, tokenizers, instruction, embedding table and
  the encoder / fusion calls, over one method an engine implements, ``run(stage, feeds)``; the fusion
  feed is ``export.frontend.fusion_feed`` (the one place it is built).
- ``OnnxRuntimeBackend``: a bundle on ONNX Runtime (``run`` = its sessions; decoder by the manifest's
  decoder kind, ``export.ort_inference.DECODERS``).
- ``TensorRTBackend`` (runtime/trt_backend.py): the bundle's TensorRT engines + the TensorRT-LLM decoder.
  TensorRT-LLM keeps its own decode loop (KV cache in its paged buffers inside the engine, no
  step-wise logits API worth calling per token), so it overrides ``caption`` only.

Notation: n frames, S image size, Qv visual tokens per frame, Ta audio tokens, M mel bins,
Tm mel frames, Nq queries per window, A AV rows, V vocabulary, D LLM width.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from favor import captions
from favor.captions import CaptionResult, GenerationSettings, OnToken, TorchInference
from favor.checkpoint import load_model
from favor.config import FavorConfig
from favor.generation import instruction_inputs

if TYPE_CHECKING:  # favor.model pulls in peft / transformers (seconds): the bundle path never needs it
    from favor.model import FavorModel

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt", "triton")  # triton: a server at --url (triton_backend.py)
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


class Backend(Protocol):
    name: str
    cfg: FavorConfig
    tokenizer: Any

    def set_instruction(self, prompt: str) -> None: ...

    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def encode_audio(self, mel: torch.Tensor) -> torch.Tensor: ...

    def fuse(self, visual: torch.Tensor | None, audio: torch.Tensor | None, num_frames: int) -> torch.Tensor: ...

    def caption(self, prompt: str, av: torch.Tensor, max_new_tokens: int,
                on_token: OnToken | None = None) -> CaptionResult: ...


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


class StepwiseCaptioner:
    """``caption`` for backends with a step-wise decoder: needs ``cfg``, ``tokenizer``, ``embedding``
    [V, D] and ``inference()`` (a favor.captions.Inference)."""

    def caption(self, prompt: str, av: torch.Tensor, max_new_tokens: int,
                on_token: OnToken | None = None) -> CaptionResult:
        """Greedy caption of ``prompt`` around AV rows av [A, D] (one stream: batch 1, no padding)."""
        av = torch.as_tensor(av)
        timed = TimedInference(self.inference())
        result = captions.caption(timed, self.embedding, self.tokenizer, self.cfg.llm, [prompt], av[None],
                                  torch.ones(1, av.shape[0], dtype=torch.bool),
                                  GenerationSettings(max_new_tokens=max_new_tokens), on_token)[0]
        result.prefill_s, result.decode_s = timed.prefill_s, timed.decode_s
        return result


class TorchBackend(StepwiseCaptioner):
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
        self.embedding = self.lm.get_input_embeddings().weight.detach()  # [V, D]
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

    def inference(self) -> TorchInference:
        return TorchInference(self.lm)


def bundle_tokenizer(bundle: Path):
    """bundle/tokenizer/ (written by favor-export from a model with a tokenizer)."""
    path = bundle / "tokenizer"
    if not path.is_dir():
        raise ValueError(f"{path}: the bundle has no tokenizer (export from a model with one)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


class BundleBackend(StepwiseCaptioner):
    """What every engine over an exported bundle shares; a subclass implements ``run(stage, feeds)``
    (named torch inputs -> named torch outputs) and its decoder (``inference()`` or ``caption``)."""

    name = "bundle"

    def __init__(self, path: str | Path, manifest: dict):
        self.path, self.manifest = Path(path), manifest
        self.cfg = FavorConfig.from_dict(manifest["config"])
        self.tokenizer = bundle_tokenizer(self.path)
        from favor.generation import resolve_instruction_tokenizer

        own_dir = self.path / "instruction_tokenizer"  # written by favor-export (BERT's, for 7B/13B)
        own_dir = own_dir if own_dir.is_dir() else self.cfg.visual.instruction_tokenizer
        own = None
        if own_dir:
            from favor.build import load_tokenizer  # favor.build imports the encoders: only when needed

            own = load_tokenizer(str(own_dir))
        self.instruction_tokenizer = resolve_instruction_tokenizer(self.cfg, own, self.tokenizer)
        self._instruction: tuple[torch.Tensor, torch.Tensor] | None = None
        self._embedding: np.ndarray | None = None

    def run(self, stage: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement run(stage, feeds)")

    @property
    def embedding(self) -> np.ndarray:
        """The LLM's input embeddings [V, D] (embed_tokens.safetensors), for ids and the prompt table."""
        if self._embedding is None:
            from safetensors.numpy import load_file

            from export.manifest import EMBED_FILE

            self._embedding = load_file(str(self.path / EMBED_FILE))["weight"]
        return self._embedding

    def set_instruction(self, prompt: str) -> None:
        self._instruction = instruction_inputs(self.instruction_tokenizer, [prompt],
                                               self.cfg.visual.max_instruction_tokens)

    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._instruction is None:
            raise ValueError("set_instruction(prompt) must be called before encode_frames")
        ids, mask = self._instruction
        out = self.run("visual_encoder", {"pixels": pixels[None].float(), "instruction_ids": ids.long(),
                                          "instruction_mask": mask.long()})
        return out["visual_tokens"][0].float()  # [n, Qv, Dv]

    def encode_audio(self, mel: torch.Tensor) -> torch.Tensor:
        return self.run("audio_encoder", {"mel": mel[None].float()})["audio_tokens"][0].float()  # [Ta, Da]

    def fuse(self, visual: torch.Tensor | None, audio: torch.Tensor | None, num_frames: int) -> torch.Tensor:
        from export.frontend import fusion_feed

        feed = fusion_feed(self.cfg, None if visual is None else visual[None], None if audio is None else audio[None],
                           num_frames=num_frames)
        out = self.run("fusion", feed)
        return out["av_embeds"][0][out["av_mask"][0].bool()].float()  # [Nq, D]: the window's rows


class OnnxRuntimeBackend(BundleBackend):
    """An exported bundle (manifest + ONNX graphs) on ONNX Runtime (providers from runtime/selection.py)."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | dict[str, int] | None = None, int8: bool = False,
                 providers: tuple[str, ...] | None = None, check_hashes: bool = True):
        from export.ort_inference import OrtBundle

        self.bundle = OrtBundle(path, int8=int8, threads=threads, providers=providers, check_hashes=check_hashes)
        super().__init__(path, self.bundle.manifest)
        self._inference = None

    def run(self, stage: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.bundle.run(stage, feeds)

    @property
    def embedding(self) -> np.ndarray:
        return self.bundle.embedding  # one copy, shared with the decoder

    def inference(self):
        if self._inference is None:
            self._inference = self.bundle.inference()
        return self._inference


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
                 frames_per_window: int | None = None, threads: int | str | None = None, policy=None,
                 url: str | None = None):
    """Backend by name over a checkpoint or an exported bundle (runtime/selection.py decides).

    'auto': a checkpoint is exported once into the bundle cache (runtime/bundle_cache.py, ``policy``),
    then TensorRT if the bundle holds engines and TensorRT is usable, else ONNX Runtime with the CUDA
    provider when onnxruntime-gpu offers it, else the CPU provider. 'torch': eager PyTorch.
    'triton': the stages on the Triton server at ``url`` (runtime/triton_backend.py)."""
    if name == "triton":
        if threads is not None:
            raise ValueError("--threads sets local ONNX Runtime threads; a Triton server runs the threads its "
                             "repository records (favor-export --targets triton)")
        from runtime.triton_backend import open_triton

        return open_triton(model_path, url, fps, frames_per_window, policy)
    from runtime.selection import open_backend

    return open_backend(name, model_path, fps, frames_per_window, threads, policy)

