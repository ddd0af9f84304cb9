"""Feature caches for frozen encoders: encode each input once, serve it from memory or disk.

On 2 CPU cores the frozen Whisper encoder dominates a training step; its outputs only change with
its weights, so they are cached per (weights fingerprint, input key). Each sample is encoded alone
at its true length, so a cached feature never depends on the batch it was first seen in.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from pathlib import Path

import torch
from torch import nn

from favor.fileio import atomic_write


class FeatureCache:
    """Frozen-encoder outputs keyed by input identity, in memory and optionally on disk (atomic files)."""

    def __init__(self, fingerprint: str, directory: str | os.PathLike | None = None):
        self.fingerprint = fingerprint
        self.directory = Path(directory) if directory else None
        self.memory: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    def _name(self, key: str) -> str:
        return hashlib.sha1(f"{self.fingerprint}|{key}".encode()).hexdigest()

    def get(self, key: str) -> torch.Tensor | None:
        name = self._name(key)
        if name in self.memory:
            self.hits += 1
            return self.memory[name]
        if self.directory is not None and (self.directory / f"{name}.pt").is_file():
            value = torch.load(self.directory / f"{name}.pt", weights_only=True)
            self.memory[name] = value
            self.hits += 1
            return value
        self.misses += 1
        return None

    def put(self, key: str, value: torch.Tensor) -> None:
        name = self._name(key)
        value = value.detach().cpu().clone()
        self.memory[name] = value
        if self.directory is not None:
            atomic_write(self.directory / f"{name}.pt", lambda tmp: torch.save(value, tmp))


def module_fingerprint(module: nn.Module, extra: str = "") -> str:
    """sha1 of a module's weights (names, shapes, bytes): cached features die with the weights."""
    h = hashlib.sha1(extra.encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha1()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _Cached(nn.Module):
    """Drop-in for a frozen encoder that serves per-sample outputs from a FeatureCache.

    The encoder is held outside the module tree (frozen, so it needs no gradients, no DDP sync and no
    place in the trainable checkpoint). Keys are given per batch with ``using(keys, lengths)``; without
    keys the call goes straight to the encoder. Each sample is encoded alone at its true length, so a
    cached feature never depends on which batch it was first seen in.
    """

    def __init__(self, encoder: nn.Module, cache: FeatureCache):
        super().__init__()
        self.__dict__["inner"] = encoder
        self.cache = cache
        self._keys: list | None = None
        self._lengths: list[int] | None = None

    @contextlib.contextmanager
    def using(self, keys, lengths):
        self._keys, self._lengths = list(keys), [int(n) for n in lengths]
        try:
            yield
        finally:
            self._keys = self._lengths = None

    def _features(self, b: int, compute, length: int | None = None, suffix: str = "") -> torch.Tensor | None:
        """Sample b's features: from the cache, else ``compute()`` (then cached).

        ``length``: the leading size this sample encodes to, when the caller knows it. A cached entry of
        another length was written under an older decode rule for the same file (the fingerprint covers
        weights, not code: stills were once cached after repeating to the audio's frames); it is recomputed
        and replaced rather than served."""
        key, n = self._keys[b], self._lengths[b]
        if key is None or n == 0:
            return None
        key += suffix
        out = self.cache.get(key)
        if out is None or (length is not None and out.shape[0] != length):
            with torch.no_grad():
                out = compute()
            self.cache.put(key, out)
        return out


class CachedAudioEncoder(_Cached):
    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, M, Tm] -> [B, Ta, Da]; row b encoded from mel[b, :, :length_b] (or the cache)."""
        if self._keys is None:
            return self.inner(mel)
        feats = [self._features(b, lambda b=b: self.inner(mel[b:b + 1, :, : self._lengths[b]])[0])
                 for b in range(mel.shape[0])]
        stride = self.inner.encoder.conv2.stride[0]
        Ta = max([math.ceil(mel.shape[-1] / stride)] + [f.shape[0] for f in feats if f is not None])
        width = next((f.shape[-1] for f in feats if f is not None), self.inner.width)
        out = mel.new_zeros(mel.shape[0], Ta, width)  # [B, Ta, Da]; padded tokens are masked downstream
        return _fill(out, feats)


def _fill(out: torch.Tensor, feats: list[torch.Tensor | None]) -> torch.Tensor:
    """Copy each clip's features [n_b, ...] into the zero batch ``out`` [B, N, ...] (left-aligned)."""
    for b, f in enumerate(feats):
        if f is not None:
            out[b, : f.shape[0]] = f.to(out.device, out.dtype)
    return out


class CachedVisualEncoder(_Cached):
    def forward(self, pixels: torch.Tensor, instruction_ids: torch.Tensor,
                instruction_mask: torch.Tensor) -> torch.Tensor:
        """pixels [B, T, 3, S, S] -> [B, T, Qv, Dv]; keyed by file and instruction text."""
        if self._keys is None:
            return self.inner(pixels, instruction_ids, instruction_mask)
        B, T = pixels.shape[:2]
        feats = []
        for b in range(B):
            t = min(self._lengths[b], T)
            n = int(instruction_mask[b].sum())
            ids, mask = instruction_ids[b:b + 1, :n], instruction_mask[b:b + 1, :n]  # [1, Li_b]
            feats.append(self._features(b, lambda b=b, t=t, ids=ids, mask=mask:
                                        self.inner(pixels[b:b + 1, :t], ids, mask)[0],
                                        t, suffix=f"|{ids.tolist()}"))  # features depend on the prompt
        ref = next(f for f in feats if f is not None)
        return _fill(pixels.new_zeros(B, T, *ref.shape[1:]), feats)  # [B, T, Qv, Dv]
