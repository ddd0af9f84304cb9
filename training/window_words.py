"""Window word targets of the word-alignment objective (favor/alignment.py): which of the synthetic world's
words each causal Q-Former window shows or sounds, read from the scene ground truth in a manifest's
``meta.events``.

A window of F frames at ``video_fps`` covers [w F / fps, (w + 1) F / fps) s of stream time. It holds:
  seen   the colour and shape of every object visible in it (grounding.objects_in_window), and the word
         of every text shown in it (digits as their word: captions say "the number four")
  heard  the words of every sound kind and spoken word whose onset falls in it
Seen words count only when the sample's video is the clip's own, heard words only when its audio is
(pairing swaps audio for AV matching and paired samples: their events are another clip's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from favor.config import FavorConfig
from training.eval.grounding import objects_in_window
from training.synth.scene import COLOURS, DIGIT_WORDS, PRINTED_WORDS, SHAPES, SOUNDS

SEEN_KINDS = frozenset({"appear", "disappear", "text"})
HEARD_KINDS = frozenset({"sound", "speech"})
WORLD_WORDS: tuple[str, ...] = tuple(dict.fromkeys(
    [*COLOURS, *SHAPES, *(w for kind in SOUNDS for w in kind.split()), *DIGIT_WORDS, *PRINTED_WORDS]))


def world_vocab(tokenizer, words: Sequence[str] = WORLD_WORDS) -> tuple[tuple[str, ...], torch.Tensor]:
    """The world words the tokenizer can spell and [K] their LLM tokens as they appear mid-sentence
    (leading space). A word the tokenizer splits is represented by its first piece; a word it maps to its
    unknown token (a word-level vocabulary built from a small manifest) has no embedding of its own and is
    left out; two kept words sharing one token would be one target, refused."""
    unk = getattr(tokenizer, "unk_token_id", None)
    pairs = [(w, tokenizer.encode(" " + w, add_special_tokens=False)[0]) for w in words]
    pairs = [(w, i) for w, i in pairs if i != unk]
    ids = [i for _, i in pairs]
    if len(set(ids)) != len(ids):
        clash = sorted(w for w, i in pairs if ids.count(i) > 1)
        raise ValueError(f"the tokenizer gives these world words one first token: {clash}")
    return tuple(w for w, _ in pairs), torch.tensor(ids, dtype=torch.long)


def text_word(text: str) -> str:
    return DIGIT_WORDS[int(text)] if text.isdigit() else text


def window_words(events: Sequence[dict], start: float, end: float, *, seen: bool, heard: bool) -> set[str]:
    """The world words a window [start, end) s holds (module docstring)."""
    words: set[str] = set()
    if seen:
        for colour, shape in objects_in_window(events, start, end):
            words.update((colour, shape))
    for e in events:
        if not start <= e["t"] < end:
            continue
        if seen and e["kind"] == "text":
            words.add(text_word(e["what"]))
        elif heard and e["kind"] in HEARD_KINDS:
            words.update(e["what"].split())
    return words


def window_targets(events: Sequence[dict], duration: float, cfg: FavorConfig, *, seen: bool, heard: bool,
                   words: Sequence[str] = WORLD_WORDS) -> torch.Tensor:
    """[W, K] multi-hot over ``words`` for the ceil(duration / window length) windows of a clip."""
    window_s = cfg.timing.frames_per_window / cfg.timing.video_fps  # seconds per window (5 s at 10 / 2 FPS)
    n = max(1, math.ceil(duration / window_s))
    index = {w: k for k, w in enumerate(words)}
    out = torch.zeros(n, len(words))
    for w in range(n):
        for word in window_words(events, w * window_s, (w + 1) * window_s, seen=seen, heard=heard):
            if word in index:
                out[w, index[word]] = 1.0
    return out
