"""The bundle run by ONNX Runtime: stage calls named like FavorModel's, and ``OrtInference`` for
``favor.captions`` (the same decode loop as PyTorch).

    bundle = OrtBundle("out/")                        # refuses a bundle whose manifest/hashes mismatch
    audio = bundle.encode_audio(mel)                  # [B, Ta, Da]
    visual = bundle.encode_visual(pixels, ids, mask)  # [B, T, Qv, Dv]
    embeds, mask = bundle.fuse(visual, audio)         # [B, W*Nq, D], [B, W*Nq]  (export.frontend.fusion_feed)
    captions.caption(bundle.inference(), bundle.embedding, tokenizer, cfg.llm, prompts, embeds, mask)

Tensors in and out are torch tensors (converted at the session boundary) so backends are
interchangeable in ``favor.captions``. Sessions come from the one builder,
``favor.onnx_attention.ort_session`` (threads, providers, our kernel when the graph needs it).

The decoder implementation is chosen in one place, ``DECODERS``, by the manifest's decoder stage
``"kind"`` (absent = ``"torch-dynamo"``, our own export, export/decoder.py). Each entry names a class
with ``from_bundle(bundle, stage_name) -> favor.captions.Inference``; another export kind (e.g. the
ONNX Runtime GenAI builder graph) registers itself with one line there.

Notation: B batch, L new tokens, P cached tokens, V vocab, D LLM width.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from export.frontend import fusion_feed
from export.manifest import EMBED_FILE, load_manifest
from favor.config import FavorConfig

DYNAMO = "torch-dynamo"  # the decoder kind when the manifest's stage names none
# Decoder kind (manifest stages[decoder]["kind"]) -> "module:Class" with from_bundle(bundle, stage_name).
DECODERS = {
    DYNAMO: "export.ort_inference:OrtInference",
    "genai": "export.ort_decoder:GenaiInference",  # ONNX Runtime GenAI builder graph (export/genai_decoder.py)
}


@dataclass
class OrtCache:
    kv: list[np.ndarray]  # past.{i}.key/value [B, kvh, P, hd]
    attention_mask: np.ndarray  # [B, P] int64


class OrtInference:
    """``favor.captions.Inference`` over the exported decoder graph (export/decoder.py)."""

    def __init__(self, decoder, embedding: np.ndarray, cfg: FavorConfig):
        self.session = decoder
        self.embedding = embedding  # [V, D]
        self.cfg = cfg
        self.cache_names = [i.name for i in decoder.get_inputs()][3:]
        self.head_dim = cfg.llm.hidden // cfg.llm.heads

    @classmethod
    def from_bundle(cls, bundle: OrtBundle, stage_name: str) -> OrtInference:
        return cls(bundle.stage(stage_name), bundle.embedding, bundle.cfg)

    def _run(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray, kv: list[np.ndarray]
             ) -> tuple[torch.Tensor, OrtCache]:
        feed = {"inputs_embeds": embeds.astype(np.float32), "attention_mask": mask.astype(np.int64),
                "position_ids": positions.astype(np.int64)}
        feed.update(zip(self.cache_names, kv, strict=False))
        logits, *present = self.session.run(None, feed)
        return torch.from_numpy(logits[:, -1]).float(), OrtCache(present, mask)

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, OrtCache]:
        mask = attention_mask.long().numpy()
        positions = np.clip(mask.cumsum(-1) - 1, 0, None)  # [B, L]: left padding must not shift RoPE
        B = mask.shape[0]
        empty = np.zeros((B, self.cfg.llm.kv_heads, 0, self.head_dim), np.float32)  # [B, kvh, 0, hd]
        return self._run(embeds.detach().float().numpy(), mask, positions,
                         [empty] * len(self.cache_names))

    def decode(self, ids: torch.Tensor, cache: OrtCache) -> tuple[torch.Tensor, OrtCache]:
        B = ids.shape[0]
        positions = cache.attention_mask.sum(-1, keepdims=True)  # [B, 1] next position
        mask = np.concatenate([cache.attention_mask, np.ones((B, 1), np.int64)], 1)
        embeds = self.embedding[ids.numpy()][:, None]  # [B, 1, D]
        return self._run(embeds, mask, positions, cache.kv)

    def reorder(self, cache: OrtCache, rows: torch.Tensor) -> OrtCache:
        r = rows.numpy()
        return OrtCache([t[r] for t in cache.kv], cache.attention_mask[r])


def decoder_class(bundle: OrtBundle, stage_name: str):
    """The class registered in ``DECODERS`` for this decoder stage's ``kind``; ValueError naming it."""
    kind = bundle.manifest["stages"][stage_name].get("kind", DYNAMO)
    if kind not in DECODERS:
        raise ValueError(f"{bundle.path / 'manifest.json'}: decoder stage {stage_name} has kind {kind!r}, "
                         f"this runtime knows {sorted(DECODERS)} (update favor-rt, or re-export)")
    module, name = DECODERS[kind].split(":")
    return getattr(importlib.import_module(module), name)


class OrtBundle:
    """An exported bundle, checked against its manifest, with sessions opened on first use."""

    def __init__(self, path: str | Path, int8: bool = False, threads: int | dict[str, int] | None = None,
                 check_hashes: bool = True, providers: tuple[str, ...] | None = None):
        self.path = Path(path)
        self.manifest = load_manifest(self.path, check_hashes=check_hashes)
        self.cfg = FavorConfig.from_dict(self.manifest["config"])
        self.int8 = int8
        self.threads = threads  # one count for every stage, or {stage: n} (export/threads.py)
        self.providers = providers  # runtime/selection.py's choice (CUDA first when offered), else CPU
        self._sessions: dict[str, object] = {}
        self._embedding: np.ndarray | None = None
        if int8 and "decoder.int8" not in self.manifest["stages"]:
            raise ValueError(f"{self.path}: no int8 decoder in this bundle (export with --precision int8)")

    def stage(self, name: str):
        if name not in self._sessions:
            if name not in self.manifest["stages"]:
                raise ValueError(f"{self.path}: the bundle has no {name} stage "
                                 f"(has {sorted(self.manifest['stages'])})")
            # imported here, not at module level: onnx + onnxscript cost ~1 s, which a realtime run
            # pays inside its warm-up (overlapping the first window) instead of before capture starts
            from favor.onnx_attention import ort_session

            threads = (self.threads.get(name.split(".")[0]) if isinstance(self.threads, dict)
                       else self.threads)  # "decoder.int8" takes the decoder's count
            self._sessions[name] = ort_session(self.path / self.manifest["stages"][name]["files"][0],
                                               threads, self.providers)
        return self._sessions[name]

    def run(self, name: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One stage on named torch inputs -> named torch outputs."""
        s = self.stage(name)
        out = s.run(None, {k: v.detach().cpu().numpy() for k, v in feeds.items()})
        return {o.name: torch.from_numpy(x) for o, x in zip(s.get_outputs(), out, strict=True)}

    def encode_audio(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, n_mels, Tm] -> audio tokens [B, Ta, Da]."""
        return self.run("audio_encoder", {"mel": mel.float()})["audio_tokens"]

    def encode_visual(self, pixels: torch.Tensor, instruction_ids: torch.Tensor,
                      instruction_mask: torch.Tensor) -> torch.Tensor:
        """pixels [B, T, 3, S, S], instruction [B, Li] -> visual tokens [B, T, Qv, Dv]."""
        return self.run("visual_encoder", {"pixels": pixels.float(), "instruction_ids": instruction_ids.long(),
                                           "instruction_mask": instruction_mask.long()})["visual_tokens"]

    def fuse(self, visual: torch.Tensor | None, audio: torch.Tensor | None,
             modality_mask: torch.Tensor | None = None, num_frames: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``FavorModel.fuse``: visual [B, Tv, Qv, Dv], audio [B, Ta, Da] (either may be None)
        -> (av_embeds [B, W*Nq, D], av_mask [B, W*Nq] bool)."""
        out = self.run("fusion", fusion_feed(self.cfg, visual, audio, modality_mask, num_frames))
        return out["av_embeds"], out["av_mask"].bool()

    @property
    def embedding(self) -> np.ndarray:
        if self._embedding is None:
            self._embedding = load_file(str(self.path / EMBED_FILE))["weight"]  # [V, D]
        return self._embedding

    def inference(self):
        """The decoder as ``favor.captions.Inference``, by the stage's kind (``DECODERS``)."""
        name = "decoder.int8" if self.int8 else "decoder"
        if name not in self.manifest["stages"]:
            raise ValueError(f"{self.path}: the bundle has no {name} stage (has {sorted(self.manifest['stages'])})")
        return decoder_class(self, name).from_bundle(self, name)

    def report(self) -> dict | None:
        p = self.path / "parity.json"
        return json.loads(p.read_text()) if p.is_file() else None
