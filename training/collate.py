"""Collation: decoded items -> the padded batch ``FavorModel.forward`` takes, plus bookkeeping.

Notation: B batch, T frames, S image side, M mel bins, Tm mel frames (100 Hz), Ta audio tokens (50 Hz),
Li instruction tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from favor import media
from favor.config import FavorConfig
from favor.encoders import whisper_silence_level
from favor.generation import instruction_inputs
from favor.model import resolve_instruction_tokenizer
from favor.prompt import conversation_ids
from favor.sync import audio_frames
from training.window_words import window_targets, world_vocab


def first_question(conversation: Sequence[dict]) -> str:
    return conversation[0]["value"]


def first_answer(conversation: Sequence[dict]) -> str:
    return conversation[1]["value"]


class Collator:
    """Items -> the batch ``FavorModel.forward`` takes, plus bookkeeping (ids, tasks, cache keys).

    mel rows are padded to the longest with each clip's own Whisper silence level, pixels with zero
    frames; ``audio_lengths`` (tokens) and ``visual_lengths`` (frames) let the model mask the padding.
    Images batch as one frame (``is_image``) unless the batch mixes images and videos, in which case
    each image is repeated over its audio's frames here (the same maths as ``sync.repeat_image``).
    """

    def __init__(self, cfg: FavorConfig, tokenizer, instruction_tokenizer=None, max_text_tokens: int = 256):
        self.cfg = cfg
        self.tokenizer = tokenizer
        # The LLM tokenizer stands in only for a Q-Former built over its vocabulary (refused for 7B/13B).
        self.instruction_tokenizer = resolve_instruction_tokenizer(cfg, instruction_tokenizer, tokenizer)
        self.max_text_tokens = max_text_tokens
        # the word-alignment objective's vocabulary (favor/alignment.py), when the config trains it
        self.world_words, self.world_ids = world_vocab(tokenizer) if cfg.word_alignment_weight > 0 else ((), None)

    def __call__(self, items: Sequence[dict | None]) -> dict:
        kept = [it for it in items if it is not None]
        batch: dict = {"num_skipped": len(items) - len(kept), "size": len(kept)}
        if not kept:
            return batch
        cfg = self.cfg
        stride = cfg.timing.audio_conv_stride
        mel_lengths = torch.tensor([it["mel"].shape[-1] if it["mel"] is not None else 0 for it in kept])
        audio_lengths = (mel_lengths + stride - 1) // stride  # Ta = ceil(Tm / 2): 20 ms per token
        if mel_lengths.max() > 0:
            Tm = int(mel_lengths.max())
            # rows of samples without audio: digital silence (their tokens are masked by audio_lengths = 0)
            mel = torch.full((len(kept), cfg.audio.n_mels, Tm), media.SILENT_MEL)  # [B, M, Tm]
            for b, it in enumerate(kept):
                if it["mel"] is not None:
                    m = it["mel"]  # [M, tm]
                    mel[b, :, m.shape[-1]:] = whisper_silence_level(m[None]).squeeze()  # as 0-padded audio
                    mel[b, :, : m.shape[-1]] = m
            batch["mel"] = mel
        else:
            batch["mel"] = None
        batch.update(self._visual(kept, audio_lengths))
        questions = [first_question(it["conversation"]) for it in kept]
        instructions = [it.get("instruction") or q for it, q in zip(kept, questions, strict=True)]
        ids, mask = instruction_inputs(self.instruction_tokenizer, instructions, cfg.visual.max_instruction_tokens)
        batch.update({
            "instruction_ids": ids, "instruction_mask": mask,  # [B, Li]
            "modality_mask": torch.stack([it["modality_mask"] for it in kept]),  # [B, 2]
            "own_soundtrack": torch.tensor([bool(it.get("own_soundtrack")) for it in kept]),  # [B]
            "audio_lengths": audio_lengths, "mel_lengths": mel_lengths,
            "prompts": [conversation_ids(self.tokenizer, list(it["conversation"]), cfg.llm.eos_token_id,
                                         self.max_text_tokens) for it in kept],
            "questions": questions, "answers": [first_answer(it["conversation"]) for it in kept],
            "tasks": [it["task"] for it in kept], "ids": [it["id"] for it in kept],
            "lines": [it["line"] for it in kept], "audio_keys": [it["audio_key"] for it in kept],
            "visual_keys": [it["visual_key"] for it in kept],
        })
        if self.world_ids is not None:
            batch.update(self._window_words(kept))
        return batch

    def _window_words(self, kept: Sequence[dict]) -> dict:
        """[B, Wt, K] window word targets (zero rows for samples without scene ground truth)."""
        K = len(self.world_words)
        rows = [window_targets(sc["events"], sc["duration"], self.cfg, seen=sc["seen"], heard=sc["heard"],
                               words=self.world_words)
                if (sc := it.get("scene")) else torch.zeros(1, K) for it in kept]
        out = torch.zeros(len(rows), max(r.shape[0] for r in rows), K)
        for b, r in enumerate(rows):
            out[b, : r.shape[0]] = r
        return {"window_words": out, "alignment_ids": self.world_ids}

    def _visual(self, kept: Sequence[dict], audio_lengths: torch.Tensor) -> dict:
        with_pixels = [it for it in kept if it["pixels"] is not None]
        if not with_pixels:
            return {"pixels": None, "visual_lengths": None, "is_image": False}
        S = self.cfg.visual.image_size
        a_frames = [audio_frames(int(n), self.cfg) for n in audio_lengths]
        all_images = all(it["is_image"] for it in with_pixels)
        clips = []
        for it, af in zip(kept, a_frames, strict=True):
            px = it["pixels"]
            if px is not None and it["is_image"] and not all_images:
                px = px.expand(max(af, 1), -1, -1, -1)  # image as a static video: [T, 3, S, S]
            clips.append(px)
        T = max(c.shape[0] for c in clips if c is not None)
        pixels = torch.zeros(len(kept), T, 3, S, S)  # [B, T, 3, S, S]
        lengths = torch.zeros(len(kept), dtype=torch.long)
        for b, (c, af) in enumerate(zip(clips, a_frames, strict=True)):
            if c is None:
                continue
            pixels[b, : c.shape[0]] = c
            # an image batch is repeated over the batch's audio inside the model: valid up to its own audio
            lengths[b] = max(af, 1) if all_images else c.shape[0]
        return {"pixels": pixels, "visual_lengths": lengths, "is_image": all_images}


_NORMALISE = re.compile(r"[^\w\s]")


def normalise_answer(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: the exact-match comparison form."""
    return " ".join(_NORMALISE.sub(" ", text.lower()).split())
