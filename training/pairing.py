"""Pairing (FAVOR-SPEC.md section 6.3, video-SALMONN's dataset rules, training only).

    video + audio  mask [1, 1]; with p = av_match_prob the question becomes "does the audio match?" and
                   with p = mismatch_prob the audio is swapped for another sample's -> "No." else "Yes."
    video only     a random sample's audio; p = video_combine_prob: both Q/As joined, mask [1, 1];
                   otherwise the video's Q/A with the audio masked, mask [1, 0]
    image only     a random sample's audio, mask [1, 1]; p = image_combine_prob: both Q/As joined with
                   the image question prefixed "In the image, ", order random; otherwise one of the two
                   Q/As at random
    audio only     mask [0, 1]; image + audio from the manifest: mask [1, 1]
A streamed window (task stream_caption, training/synth/windows.py) is asked as favor-rt asks: its question
is rebuilt from meta (prompt, previous), with p = context_noise_prob the previous caption swapped for
another window's, and the visual encoder's instruction is the bare prompt (what the runtime gives it).
The caller passes the random generator (training/data.py seeds it by stream position).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from favor.prompt import stream_prompt
from training.manifest import Entry

MATCH_QUESTIONS = (
    "Is the audio compatible with the video?",
    "Does the sound match what is shown in the video?",
    "Do the audio and the video come from the same clip?",
)
MATCH_YES, MATCH_NO = "Yes.", "No."
MATCH_TASK = "av_matching"
STREAM_TASK = "stream_caption"
IMAGE_PREFIX = "In the image, "


@dataclass(frozen=True)
class PairingOptions:
    enabled: bool = True  # False: every sample as written (evaluation)
    av_match_prob: float = 0.1  # release: p = 0.1 AV-matching question on paired video + audio
    mismatch_prob: float = 0.5  # of those, audio swapped for another sample's -> "No."
    video_combine_prob: float = 0.2  # video without audio: both Q/As joined, mask [1, 1]
    image_combine_prob: float = 0.5  # image without audio: both Q/As joined
    # Ours, not the release's: a served window's context is the model's own previous caption, which may
    # name objects no longer (or never) on screen; trained with another window's caption there, the model
    # learns to describe the window rather than copy its context.
    context_noise_prob: float = 0.0


@dataclass(frozen=True)
class Plan:
    """What one draw of a sample decodes and asks."""

    entry: Entry
    visual: Path | None
    is_image: bool
    audio: Path | None
    modality_mask: tuple[float, float]  # (visual, audio)
    conversation: tuple[dict, ...]
    task: str
    instruction: str | None = None  # the visual encoder's instruction; None = the first question


def _strip_end(text: str) -> str:
    return text.strip().rstrip("?.!,;:").rstrip()


def _lower_first(text: str) -> str:
    text = text.strip()
    return text[:1].lower() + text[1:]


def join_qa(first: tuple[dict, ...], second: tuple[dict, ...], sep: str = ", and ") -> tuple[dict, ...]:
    """Two single-turn Q/As as one: "{Q1}, and {q2}" / "{A1}, and {a2}" (the release's combination)."""
    q = _strip_end(first[0]["value"]) + sep + _lower_first(second[0]["value"])
    a = _strip_end(first[1]["value"]) + sep + _lower_first(second[1]["value"])
    return ({"from": "human", "value": q}, {"from": "gpt", "value": a})


def _single_turn(conv: tuple[dict, ...]) -> bool:
    return len(conv) == 2


def window_prompt(entry: Entry) -> str | None:
    """A streamed window's bare prompt -- what favor-rt tells the visual encoder -- or None for any other
    sample (whose question is its instruction)."""
    return entry.meta.get("prompt") if entry.task == STREAM_TASK else None


def stream_turns(entry: Entry, prompt: str, rng: np.random.Generator, captions: Sequence[str],
                 opts: PairingOptions) -> tuple[dict, ...]:
    """A streamed window's conversation, its context maybe swapped (module docstring).

    ``captions``: the answers of the manifest's streamed windows, where a swapped context comes from."""
    previous = list(entry.meta.get("previous", ()))
    if previous and captions and opts.context_noise_prob > 0 and rng.random() < opts.context_noise_prob:
        previous = [captions[int(rng.integers(len(captions)))]]
    return ({"from": "human", "value": stream_prompt(prompt, previous)}, *entry.conversation[1:])


def own_soundtrack(plan: Plan) -> bool:
    """Picture and soundtrack of one recording, both shown: a video entry whose own audio pairing kept (an
    av_matching row answered "no" carries another clip's). favor/synchrony.py trains on these rows."""
    e = plan.entry
    if plan.is_image or plan.modality_mask != (1.0, 1.0) or e.video is None or plan.visual != e.video \
            or plan.audio != e.audio:
        return False
    return plan.task != MATCH_TASK or plan.conversation[1]["value"].strip().lower().startswith("yes")


def pair(entry: Entry, rng: np.random.Generator, audio_pool: Sequence[Entry],
         opts: PairingOptions, stream_captions: Sequence[str] = ()) -> Plan:
    """Apply the release's random audio/visual pairing to one sample (see the module docstring)."""
    conv, task, instruction = entry.conversation, entry.task, window_prompt(entry)
    if instruction is not None:
        conv = stream_turns(entry, instruction, rng, stream_captions, opts)
    has_v, has_a = entry.visual is not None, entry.audio is not None
    base = Plan(entry, entry.visual, entry.image is not None, entry.audio,
                (float(has_v), float(has_a)), conv, task, instruction)
    if not opts.enabled or not has_v or not audio_pool:
        return base
    if has_a:
        if entry.video is None or task == MATCH_TASK or rng.random() >= opts.av_match_prob:
            return base
        question = MATCH_QUESTIONS[int(rng.integers(len(MATCH_QUESTIONS)))]
        audio, answer = entry.audio, MATCH_YES
        others = [e for e in audio_pool if e.audio != entry.audio]
        if others and rng.random() < opts.mismatch_prob:
            audio, answer = others[int(rng.integers(len(others)))].audio, MATCH_NO
        match = ({"from": "human", "value": question}, {"from": "gpt", "value": answer})
        return Plan(entry, entry.visual, False, audio, (1.0, 1.0), match, MATCH_TASK)
    other = audio_pool[int(rng.integers(len(audio_pool)))]
    can_join = _single_turn(conv) and _single_turn(other.conversation)
    if entry.video is not None:
        if can_join and rng.random() < opts.video_combine_prob:
            joined = join_qa(conv, other.conversation)
            return Plan(entry, entry.video, False, other.audio, (1.0, 1.0), joined, f"{task}+{other.task}")
        return Plan(entry, entry.video, False, other.audio, (1.0, 0.0), conv, task)
    # image without audio: always paired, both modalities visible
    if can_join and rng.random() < opts.image_combine_prob:
        img = ({"from": "human", "value": IMAGE_PREFIX + _lower_first(conv[0]["value"])}, conv[1])
        parts = [img, other.conversation]
        if rng.random() < 0.5:
            parts.reverse()
        return Plan(entry, entry.image, True, other.audio, (1.0, 1.0), join_qa(*parts),
                    f"{task}+{other.task}")
    if rng.random() < 0.5:
        return Plan(entry, entry.image, True, other.audio, (1.0, 1.0), conv, task)
    return Plan(entry, entry.image, True, other.audio, (1.0, 1.0), other.conversation, other.task)
