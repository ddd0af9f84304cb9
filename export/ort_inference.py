"""The bundle run by ONNX Runtime: stage calls named like FavorModel's, and ``OrtInference`` for
``favor.captions`` (the same greedy / beam loops as PyTorch).

    bundle = OrtBundle("out/")                      # refuses a bundle whose manifest/hashes mismatch
    audio = bundle.encode_audio(mel)                # [B, Ta, Da]
    visual = bundle.encode_visual(pixels, ids, mask)  # [B, T, Qv, Dv]
    embeds, mask = bundle.fuse(visual, audio)       # [B, W*Nq, D], [B, W*Nq]
    inputs = prompt_table.build_inputs(...)         # fake ids >= vocab address the AV rows
    greedy_decode(bundle.inference(), bundle.embed(inputs), inputs.attention_mask, ...)

Tensors in and out are torch tensors (converted at the session boundary) so backends are
interchangeable in ``favor.captions``.

Notation: B batch, L new tokens, P cached tokens, V vocab, D LLM width.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from export.bundle import EMBED_FILE
from export.frontend import fusion_frames, pad_frames
from export.manifest import load_manifest
from favor import prompt_table
from favor.config import FavorConfig


def session(path: Path, threads: int | None = None, providers: tuple[str, ...] | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    props = {}
    try:
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # noqa: BLE001 - metadata is advisory here; the manifest check already ran
        pass
    if props.get("favor.attention") == "fused":
        from favor import onnx_attention

        opts.register_custom_ops_library(onnx_attention.register_ort_kernel())
    # providers: runtime/selection.py's choice (CUDA first when onnxruntime-gpu offers it), else CPU
    return ort.InferenceSession(str(path), opts, providers=list(providers or ["CPUExecutionProvider"]))


@dataclass
class OrtCache:
    kv: list[np.ndarray]  # past.{i}.key/value [B, kvh, P, hd]
    attention_mask: np.ndarray  # [B, P] int64


class OrtInference:
    """``favor.captions.Inference`` over the exported decoder graph."""

    def __init__(self, decoder, embedding: np.ndarray, cfg: FavorConfig):
        self.session = decoder
        self.embedding = embedding  # [V, D]
        self.cfg = cfg
        self.cache_names = [i.name for i in decoder.get_inputs()][3:]
        self.head_dim = cfg.llm.hidden // cfg.llm.heads

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


class OrtBundle:
    """An exported bundle, checked against its manifest, with sessions opened on first use."""

    def __init__(self, path: str | Path, int8: bool = False, threads: int | dict[str, int] | None = None,
                 check_hashes: bool = True, providers: tuple[str, ...] | None = None):
        self.path = Path(path)
        self.manifest = load_manifest(self.path, check_hashes=check_hashes)
        self.cfg = FavorConfig.from_dict(self.manifest["config"])
        self.int8 = int8
        self.threads = threads  # one count for every stage, or {stage: n} (export/threads.py)
        self.providers = providers
        self._sessions: dict[str, object] = {}
        self._embedding: np.ndarray | None = None
        if int8 and "decoder.int8" not in self.manifest["stages"]:
            raise ValueError(f"{self.path}: no int8 decoder in this bundle (export with --precision int8)")

    def stage(self, name: str):
        if name not in self._sessions:
            if name not in self.manifest["stages"]:
                raise ValueError(f"{self.path}: the bundle has no {name} stage "
                                 f"(has {sorted(self.manifest['stages'])})")
            threads = (self.threads.get(name.split(".")[0]) if isinstance(self.threads, dict)
                       else self.threads)  # "decoder.int8" takes the decoder's count
            self._sessions[name] = session(self.path / self.manifest["stages"][name]["files"][0],
                                           threads, self.providers)
        return self._sessions[name]

    def _run(self, name: str, *args: torch.Tensor) -> list[torch.Tensor]:
        s = self.stage(name)
        feed = {i.name: a.detach().cpu().numpy() for i, a in zip(s.get_inputs(), args, strict=False)}
        return [torch.from_numpy(o) for o in s.run(None, feed)]

    def encode_audio(self, mel: torch.Tensor) -> torch.Tensor:
        return self._run("audio_encoder", mel.float())[0]

    def encode_visual(self, pixels: torch.Tensor, instruction_ids: torch.Tensor,
                      instruction_mask: torch.Tensor) -> torch.Tensor:
        return self._run("visual_encoder", pixels.float(), instruction_ids.long(), instruction_mask.long())[0]

    def fuse(self, visual: torch.Tensor, audio: torch.Tensor, modality_mask: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """visual [B, Tv, Qv, Dv], audio [B, Ta, Da] -> (av_embeds [B, W*Nq, D], av_mask [B, W*Nq])."""
        B = visual.shape[0]
        T = fusion_frames(self.cfg, visual.shape[1], audio.shape[1])
        v = torch.cat([visual, visual.new_zeros(B, T - visual.shape[1], *visual.shape[2:])], 1)
        v = pad_frames(v, self.cfg.timing.frames_per_window)  # [B, W*F, Qv, Dv]
        mm = torch.ones(B, 2) if modality_mask is None else modality_mask.float()
        embeds, mask = self._run("fusion", v.float(), audio.float(), mm, torch.full((B,), T))
        return embeds, mask

    @property
    def embedding(self) -> np.ndarray:
        if self._embedding is None:
            self._embedding = load_file(str(self.path / EMBED_FILE))["weight"]  # [V, D]
        return self._embedding

    def embed(self, inputs: prompt_table.PromptTableInputs) -> torch.Tensor:
        return prompt_table.embed_with_prompt_table(inputs.ids, self.embedding, inputs.table,
                                                    inputs.attention_mask)

    def inference(self) -> OrtInference:
        return OrtInference(self.stage("decoder.int8" if self.int8 else "decoder"), self.embedding, self.cfg)

    def tokenizer(self):
        from transformers import AutoTokenizer

        path = self.path / "tokenizer"
        if not path.is_dir():
            raise ValueError(f"{path}: the bundle has no tokenizer (export from a model with one)")
        return AutoTokenizer.from_pretrained(str(path))

    def report(self) -> dict | None:
        p = self.path / "parity.json"
        return json.loads(p.read_text()) if p.is_file() else None
