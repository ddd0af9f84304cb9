"""``favor.captions.Inference`` over the GenAI builder decoder (export/genai_decoder.py), with IO binding.

Per step Python only writes the new token's embedding into a preallocated buffer and calls
``run_with_iobinding``: the KV cache lives in preallocated buffers [B, kvh, C, hd] (C = capacity)
bound as both ``past_key_values.*`` and ``present.*`` (GroupQueryAttention's shared past/present
buffer: it appends the new keys in place at each row's ``seqlens_k``), the logits land in a bound
[B, 1, V] buffer, and the all-ones attention mask [B, T] is a view of one preallocated buffer. When a
caption outgrows C the buffers are reallocated with twice the room (rare: C starts at the prompt
length + ``reserve`` tokens).

The graph has no ``position_ids``: GroupQueryAttention derives row b's positions from
``attention_mask[b].sum()``, so a left-padded row would get shifted RoPE positions and attend to its
padding. Batches whose mask is not all ones are refused (beam search expands one prompt, so its rows
never carry padding; the runtime captions one window at a time).

Continuous batching (favor/continuous.py): ``merge`` copies the rows of several caches (each prefilled
alone) into one buffer; rows then hold different lengths, right aligned in the KV buffer (row b
valid for its first L_b positions). The mask row b is ones over its first L_b + 1 positions and zero
after, so the builder graph's ``seqlens_k = mask.sum(-1) - 1`` is L_b: GroupQueryAttention writes
row b's new keys at position L_b, rotates them to position L_b and attends to positions <= L_b,
which is what row b computed alone. ``reorder`` keeps rows (a request leaving the batch).

Caches are mutated in place by ``decode`` (the decode loops in favor.captions never reuse an old one);
``reorder`` returns a new cache. ``share_buffer=False`` runs the plain path (present outputs allocated
by ORT, fed back as the next step's past) for the parity test.

Notation: B batch, L new tokens, P cached tokens, C cache capacity, V vocab, D width, kvh KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from favor.config import FavorConfig

RESERVE_TOKENS = 64  # decode room allocated with the prompt; captions are ~30 tokens


@dataclass
class GenaiCache:
    kv: list[np.ndarray]  # [B, kvh, C, hd] each, valid up to ``length`` (share_buffer) or exactly P long
    length: int  # P: tokens held by the longest row
    binding: object | None = None  # onnxruntime IOBinding with the buffers bound (share_buffer)
    values: list | None = None  # OrtValues wrapping ``kv`` (zero-copy views)
    lengths: np.ndarray | None = None  # [B] tokens held by each row, when they differ (merge)


def decoder_session(path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # the builder graph's initializer-sharing notes are not for users
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class GenaiInference:
    """Greedy / beam decoding over the builder graph (``favor.captions.Inference``)."""

    def __init__(self, session, embedding: np.ndarray, cfg: FavorConfig, share_buffer: bool = True,
                 reserve: int = RESERVE_TOKENS):
        self.session = session
        self.embedding = np.ascontiguousarray(embedding, dtype=np.float32)  # [V, D]
        self.cfg = cfg
        self.share_buffer = share_buffer
        self.reserve = reserve
        n = cfg.llm.layers
        self.past = [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        self.present = [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        self.head_dim = cfg.llm.hidden // cfg.llm.heads
        self.vocab = session.get_outputs()[0].shape[-1]
        if not isinstance(self.vocab, int):
            self.vocab = cfg.llm.vocab_size
        self._ones = np.ones(0, np.int64)

    @classmethod
    def from_bundle(cls, bundle, stage_name: str) -> GenaiInference:
        """export.ort_inference's ``DECODERS`` hook: the bundle's session (its threads) and embedding."""
        return cls(bundle.stage(stage_name), bundle.embedding, bundle.cfg)

    # -- buffers ---------------------------------------------------------------------------------
    def _mask(self, B: int, T: int) -> np.ndarray:
        """An all-ones [B, T] int64 view of a buffer grown only when a longer mask is needed."""
        if self._ones.size < B * T:
            self._ones = np.ones(max(B * T, 2 * self._ones.size), np.int64)
        return self._ones[: B * T].reshape(B, T)

    def _ragged_mask(self, lengths: np.ndarray, L: int) -> np.ndarray:
        """[B, max + L] int64: row b ones over its first lengths[b] + L positions (right padding)."""
        T = int(lengths.max()) + L
        return (np.arange(T)[None, :] < (lengths[:, None] + L)).astype(np.int64)

    def _bind_cache(self, kv: list[np.ndarray], length: int, lengths: np.ndarray | None = None) -> GenaiCache:
        from onnxruntime import OrtValue

        binding = self.session.io_binding()
        values = [OrtValue.ortvalue_from_numpy(t) for t in kv]  # views: ORT writes into ``kv``
        for past, present, v in zip(self.past, self.present, values, strict=True):
            binding.bind_ortvalue_input(past, v)
            binding.bind_ortvalue_output(present, v)
        return GenaiCache(kv, length, binding, values, lengths)

    def _alloc(self, B: int, capacity: int) -> list[np.ndarray]:
        shape = (B, self.cfg.llm.kv_heads, capacity, self.head_dim)  # [B, kvh, C, hd]
        return [np.zeros(shape, np.float32) for _ in self.past]

    def _ensure_room(self, cache: GenaiCache, L: int) -> GenaiCache:
        C = cache.kv[0].shape[2]
        if cache.length + L <= C:
            return cache
        B = cache.kv[0].shape[0]
        grown = self._alloc(B, max(2 * C, cache.length + L + self.reserve))
        for new, old in zip(grown, cache.kv, strict=True):
            new[:, :, : cache.length] = old[:, :, : cache.length]
        return self._bind_cache(grown, cache.length, cache.lengths)

    # -- steps -----------------------------------------------------------------------------------
    def _run_shared(self, embeds: np.ndarray, cache: GenaiCache) -> tuple[torch.Tensor, GenaiCache]:
        from onnxruntime import OrtValue

        B, L, _ = embeds.shape
        cache = self._ensure_room(cache, L)
        io = cache.binding
        io.bind_ortvalue_input("inputs_embeds", OrtValue.ortvalue_from_numpy(embeds))
        if cache.lengths is None:
            mask = self._mask(B, cache.length + L)
        else:
            mask = self._ragged_mask(cache.lengths, L)
            cache.lengths = cache.lengths + L
        io.bind_input("attention_mask", "cpu", 0, np.int64, list(mask.shape), mask.ctypes.data)
        logits = np.empty((B, 1, self.vocab), np.float32)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(io)
        cache.length += L
        return torch.from_numpy(logits[:, -1]), cache

    def _run_plain(self, embeds: np.ndarray, cache: GenaiCache) -> tuple[torch.Tensor, GenaiCache]:
        B, L, _ = embeds.shape
        if cache.lengths is not None:
            raise ValueError("rows of different lengths need the shared KV buffer (share_buffer=True)")
        feed = {"inputs_embeds": embeds, "attention_mask": np.ones((B, cache.length + L), np.int64)}
        feed.update(zip(self.past, cache.kv, strict=True))
        logits, *present = self.session.run(["logits", *self.present], feed)
        return torch.from_numpy(logits[:, -1]), GenaiCache(present, cache.length + L)

    def _run(self, embeds: np.ndarray, cache: GenaiCache) -> tuple[torch.Tensor, GenaiCache]:
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        return (self._run_shared if self.share_buffer else self._run_plain)(embeds, cache)

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, GenaiCache]:
        """embeds [B, L, D], attention_mask [B, L] (all ones) -> logits [B, V] at position L - 1."""
        B, L, _ = embeds.shape
        if not bool(torch.as_tensor(attention_mask).bool().all()):
            raise ValueError("the genai decoder cannot run left-padded batches (GroupQueryAttention takes "
                             "positions from the mask sum); caption rows one at a time or unpadded")
        if L + 1 > self.cfg.llm.max_positions:
            raise ValueError(f"prompt of {L} tokens leaves no room within max_positions "
                             f"({self.cfg.llm.max_positions})")
        if self.share_buffer:
            cap = min(L + self.reserve, self.cfg.llm.max_positions)
            cache = self._bind_cache(self._alloc(B, cap), 0)
        else:
            cache = GenaiCache(self._alloc(B, 0), 0)
        return self._run(embeds.detach().float().cpu().numpy(), cache)

    def decode(self, ids: torch.Tensor, cache: GenaiCache) -> tuple[torch.Tensor, GenaiCache]:
        """ids [B] -> logits [B, V] for the new token; ``cache`` is advanced in place."""
        if cache.length + 1 > self.cfg.llm.max_positions:
            raise ValueError(f"caption reached max_positions ({self.cfg.llm.max_positions})")
        embeds = self.embedding[np.asarray(ids, dtype=np.int64)][:, None]  # [B, 1, D]
        return self._run(embeds, cache)

    def reorder(self, cache: GenaiCache, rows: torch.Tensor) -> GenaiCache:
        r = np.asarray(rows, dtype=np.int64)
        if cache.lengths is None:
            kv = [np.ascontiguousarray(t[r]) for t in cache.kv]
            return self._bind_cache(kv, cache.length) if self.share_buffer else GenaiCache(kv, cache.length)
        lengths = cache.lengths[r]
        P = int(lengths.max())
        kv = [np.ascontiguousarray(t[r, :, : P + self.reserve]) for t in cache.kv]  # drop the longest's room
        return self._bind_cache(kv, P, None if (lengths == P).all() else lengths)

    def merge(self, caches: list[GenaiCache]) -> GenaiCache:
        """The rows of several (shared-buffer) caches as one batch with per-row lengths, in a buffer with
        ``reserve`` positions of room past the longest row (continuous batching)."""
        if not self.share_buffer:
            raise ValueError("merging caches needs the shared KV buffer (share_buffer=True)")
        lengths = np.concatenate([np.full(c.kv[0].shape[0], c.length, np.int64) if c.lengths is None
                                  else c.lengths for c in caches])  # [B]
        P = int(lengths.max())
        kv = self._alloc(len(lengths), min(P + self.reserve, self.cfg.llm.max_positions))
        b = 0
        for c in caches:
            n = c.kv[0].shape[0]
            for new, old in zip(kv, c.kv, strict=True):
                new[b: b + n, :, : c.length] = old[:, :, : c.length]
            b += n
        return self._bind_cache(kv, P, None if (lengths == P).all() else lengths)
