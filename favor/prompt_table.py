"""The prompt-table input convention: AV embeddings addressed by fake token ids >= vocab_size.

TensorRT-LLM's multimodal path (``PromptTuningEmbedding``) takes token ids plus a per-request table
of embeddings; an id ``v >= vocab_size`` means "row ``v - vocab_size`` of the table". FAVOR's prompt

    [BOS] "USER: <Img>" [AV rows] "</Img> {prompt}\\nASSISTANT:"

becomes one id row per sample, the AV chunk written as ``vocab_size + row``. Rows of a batch are
concatenated into one table (sample b owns rows [b*A, (b+1)*A), A = W*Nq), as TensorRT-LLM's
multimodal runner does; rows of padded windows are never addressed. The torch and ONNX Runtime
backends use the same two functions, so this convention is tested without TensorRT-LLM, and
``embed_with_prompt_table`` equals ``favor.llm.LLM.splice`` on every attended position.

Notation: B batch, A AV rows per sample (W x Nq), L prompt length, V vocab size, R table rows, D width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from favor.prompt import PromptIds


@dataclass
class PromptTableInputs:
    ids: torch.Tensor  # [B, L] int64; ids >= vocab_size address rows of ``table``
    attention_mask: torch.Tensor  # [B, L] int64, 0 on batch padding
    table: torch.Tensor  # [R, D] = [B*A, D] the AV embeddings of every request, concatenated


def prompt_ids(prompt: PromptIds, av_rows: list[int], vocab_size: int, bos_token_id: int) -> list[int]:
    """[BOS] + pre + fake ids (vocab_size + row for each table row) + post, for one sample."""
    return [bos_token_id, *prompt.pre, *(vocab_size + r for r in av_rows), *prompt.post]


def build_inputs(prompts: list[PromptIds], av_embeds: torch.Tensor, av_mask: torch.Tensor,
                 vocab_size: int, bos_token_id: int, pad_token_id: int, left_pad: bool = True
                 ) -> PromptTableInputs:
    """Prompt ids with the AV chunk as table references, padded into one batch.

    av_embeds [B, A, D], av_mask [B, A] (False rows = padded windows, skipped like ``splice`` does).
    ``left_pad`` for generation (every row ends at its ``ASSISTANT:``), right padding for training.
    """
    B, A, D = av_embeds.shape
    if len(prompts) != B or tuple(av_mask.shape) != (B, A):
        raise ValueError(f"expected {B} prompts and av_mask [{B}, {A}], got {len(prompts)} prompts and "
                         f"av_mask {list(av_mask.shape)}")
    rows = []
    for b, p in enumerate(prompts):
        valid = torch.nonzero(av_mask[b].bool()).flatten().tolist()
        rows.append(prompt_ids(p, [b * A + i for i in valid], vocab_size, bos_token_id))
    L = max(len(r) for r in rows)
    ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(L - len(r), L) if left_pad else slice(0, len(r))
        ids[b, sl] = torch.tensor(r, dtype=torch.long)
        mask[b, sl] = 1
    table = av_embeds.reshape(B * A, D)  # [B*A, D]: request b's rows start at b*A
    return PromptTableInputs(ids, mask, table)


def embed_with_prompt_table(ids: torch.Tensor | np.ndarray, embedding: torch.Tensor | np.ndarray,
                            table: torch.Tensor | np.ndarray,
                            attention_mask: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
    """ids [B, L] -> embeddings [B, L, D]: ``embedding[id]`` below V, ``table[id - V]`` from V on.

    embedding [V, D] is the LLM's input embedding matrix, table [R, D] the prompt table. Positions
    where ``attention_mask`` is 0 come out as zeros (as ``LLM.splice`` pads). NumPy inputs are
    accepted so the ONNX Runtime backend shares this function.
    """
    ids, embedding, table = (torch.as_tensor(x) for x in (ids, embedding, table))
    V, R = embedding.shape[0], table.shape[0]
    if ids.dim() != 2 or embedding.dim() != 2 or table.dim() != 2 or embedding.shape[1] != table.shape[1]:
        raise ValueError(f"expected ids [B, L], embedding [V, D] and table [R, D], got "
                         f"{list(ids.shape)}, {list(embedding.shape)}, {list(table.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V + R):
        raise ValueError(f"token ids must lie in [0, {V + R}) (vocab {V} + table rows {R}), got "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    is_row = ids >= V
    text = embedding[torch.where(is_row, 0, ids)]  # [B, L, D]
    av = table.to(embedding.dtype)[torch.where(is_row, ids - V, 0)]  # [B, L, D]
    out = torch.where(is_row[..., None], av, text)
    if attention_mask is not None:
        out = out * torch.as_tensor(attention_mask)[..., None].to(out.dtype)
    return out


def max_prompt_table_rows(max_batch: int, max_windows: int, queries_per_window: int) -> int:
    """Rows the engine's table must hold: batch x windows x queries (``--max_multimodal_len``)."""
    for name, v in (("max_batch", max_batch), ("max_windows", max_windows),
                    ("queries_per_window", queries_per_window)):
        if v < 1:
            raise ValueError(f"{name} ({v}) must be >= 1")
    return max_batch * max_windows * queries_per_window
