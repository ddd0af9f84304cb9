"""Training data: JSONL manifest -> decoded media -> padded batches for ``FavorModel.forward``.

    manifest line -> Entry -> pair() -> Plan (paths, modality mask, conversation) -> decode -> Collator

One manifest line is one sample (schema from training/synth):
    {"id", "task", "video", "audio", "image", "conversation": [{"from": "human"|"gpt", "value"}, ...], "meta"}
Paths are relative to the manifest's directory; null or absent means the modality is absent; "audio"
may name a video file (its audio track is used).

Pairing (FAVOR-SPEC.md section 6.3, video-SALMONN's dataset rules, training only):
    video + audio  mask [1, 1]; with p = av_match_prob the question becomes "does the audio match?" and
                   with p = mismatch_prob the audio is swapped for another sample's -> "No." else "Yes."
    video only     a random sample's audio; p = video_combine_prob: both Q/As joined, mask [1, 1];
                   otherwise the video's Q/A with the audio masked, mask [1, 0]
    image only     a random sample's audio, mask [1, 1]; p = image_combine_prob: both Q/As joined with
                   the image question prefixed "In the image, ", order random; otherwise one of the two
                   Q/As at random
    audio only     mask [0, 1]; image + audio from the manifest: mask [1, 1]
Every random draw comes from a generator seeded by (seed, stream position), so the data a step sees is a
pure function of the train state, whatever the number of loader workers.

Notation: B batch, T frames, S image side, M mel bins, Tm mel frames (100 Hz), Ta audio tokens (50 Hz),
Li instruction tokens.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from favor import media
from favor.config import FavorConfig
from favor.encoders import whisper_silence_level
from favor.generation import instruction_inputs
from favor.prompt import conversation_ids
from favor.sync import audio_frames

MATCH_QUESTIONS = (
    "Is the audio compatible with the video?",
    "Does the sound match what is shown in the video?",
    "Do the audio and the video come from the same clip?",
)
MATCH_YES, MATCH_NO = "Yes.", "No."
MATCH_TASK = "av_matching"
IMAGE_PREFIX = "In the image, "



# ------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Entry:
    """One manifest line, paths resolved. ``line`` is 1-based, for error messages."""

    line: int
    id: str
    task: str
    video: Path | None
    audio: Path | None
    image: Path | None
    conversation: tuple[dict, ...]
    meta: dict = field(default_factory=dict)

    @property
    def visual(self) -> Path | None:
        return self.video or self.image

    def where(self, manifest: Path) -> str:
        return f"{manifest}:{self.line}"


def _path(value, key: str, root: Path, where: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: '{key}' must be a path string or null, got {value!r}")
    return root / value


def _conversation(turns, where: str) -> tuple[dict, ...]:
    if not isinstance(turns, list) or len(turns) < 2:
        raise ValueError(f"{where}: 'conversation' must be a list of at least one human and one gpt turn, "
                         f"got {turns!r:.80}")
    for i, turn in enumerate(turns):
        want = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != want or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: turn {i} must be {{'from': '{want}', 'value': str}}, got {turn!r:.80}")
    if turns[-1]["from"] != "gpt":
        raise ValueError(f"{where}: the conversation must end with a gpt turn")
    return tuple({"from": t["from"], "value": t["value"]} for t in turns)


def parse_manifest(path: str | os.PathLike) -> list[Entry]:
    """Read a JSONL manifest; any malformed line raises ValueError naming ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    root = path.parent
    entries = []
    with open(path, encoding="utf-8") as fh:
        for n, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                d = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(d, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
            video, audio, image = (_path(d.get(k), k, root, where) for k in ("video", "audio", "image"))
            if video is not None and image is not None:
                raise ValueError(f"{where}: a sample has a video or an image, not both")
            if video is None and audio is None and image is None:
                raise ValueError(f"{where}: no media (video, audio and image are all null)")
            task = d.get("task")
            if not isinstance(task, str) or not task:
                raise ValueError(f"{where}: 'task' must be a non-empty string, got {task!r}")
            meta = d.get("meta") or {}
            entries.append(Entry(n, str(d.get("id", n)), task, video, audio, image,
                                 _conversation(d.get("conversation"), where),
                                 meta if isinstance(meta, dict) else {"value": meta}))
    if not entries:
        raise ValueError(f"{path}: manifest has no samples")
    return entries


def check_media(entry: Entry) -> str | None:
    """Why an entry's media cannot be used (missing file, missing stream), or None. No decoding."""
    wants = [(entry.video, "video", "has_video"), (entry.image, "image", "has_video"),
             (entry.audio, "audio", "has_audio")]
    for p, kind, flag in wants:
        if p is None:
            continue
        try:
            info = media.media_info(p)
        except media.MediaError as e:
            return f"{kind}: {e}"
        if not getattr(info, flag):
            return f"{kind}: {p}: no {'audio' if kind == 'audio' else 'video/image'} stream"
    return None


# -------------------------------------------------------------------------------------------- pairing


@dataclass(frozen=True)
class PairingOptions:
    enabled: bool = True  # False: every sample as written (evaluation)
    av_match_prob: float = 0.1  # release: p = 0.1 AV-matching question on paired video + audio
    mismatch_prob: float = 0.5  # of those, audio swapped for another sample's -> "No."
    video_combine_prob: float = 0.2  # video without audio: both Q/As joined, mask [1, 1]
    image_combine_prob: float = 0.5  # image without audio: both Q/As joined


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


def pair(entry: Entry, rng: np.random.Generator, audio_pool: Sequence[Entry],
         opts: PairingOptions) -> Plan:
    """Apply the release's random audio/visual pairing to one sample (see the module docstring)."""
    conv, task = entry.conversation, entry.task
    has_v, has_a = entry.visual is not None, entry.audio is not None
    base = Plan(entry, entry.visual, entry.image is not None, entry.audio,
                (float(has_v), float(has_a)), conv, task)
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


# -------------------------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class DataOptions:
    skip_bad: bool = False  # True: unusable samples are skipped and counted instead of raising
    validate: bool = True  # probe every file's streams when the dataset is built (no decoding)
    min_audio_seconds: float = 3.0  # release dataset: shorter audio zero-padded to 3 s
    pairing: PairingOptions = field(default_factory=PairingOptions)


class ManifestDataset(torch.utils.data.Dataset):
    """Manifest samples decoded through favor.media. Index with ``i`` or ``(stream_position, i)``.

    An item is a dict: mel [M, Tm] | None, pixels [T, 3, S, S] | None, is_image, modality_mask [2],
    conversation, task, id, line, audio_key (cache key of the audio file) and visual_key. With
    ``skip_bad`` an item whose media fails to decode is None (the collator drops and counts it).
    """

    def __init__(self, manifest: str | os.PathLike, cfg: FavorConfig, options: DataOptions | None = None,
                 seed: int = 0):
        self.manifest = Path(manifest)
        self.cfg = cfg
        self.options = options or DataOptions()
        self.seed = seed
        entries = parse_manifest(self.manifest)
        self.skipped: list[tuple[int, str]] = []  # (line, reason) of entries dropped at load
        if self.options.validate:
            kept = []
            for e in entries:
                reason = check_media(e)
                if reason is None:
                    kept.append(e)
                elif self.options.skip_bad:
                    self.skipped.append((e.line, reason))
                else:
                    raise ValueError(f"{e.where(self.manifest)}: {reason} (set skip_bad: true to skip)")
            entries = kept
        if not entries:
            raise ValueError(f"{self.manifest}: every sample was skipped as bad ({len(self.skipped)})")
        self.entries = entries
        self.audio_pool = [e for e in entries if e.audio is not None]

    def __len__(self) -> int:
        return len(self.entries)

    def plan(self, key: int | tuple[int, int]) -> Plan:
        position, index = key if isinstance(key, tuple) else (key, key)
        rng = np.random.default_rng([self.seed, position])
        return pair(self.entries[index], rng, self.audio_pool, self.options.pairing)

    def __getitem__(self, key: int | tuple[int, int]) -> dict | None:
        plan = self.plan(key)
        try:
            return self._decode(plan)
        except media.MediaError as e:
            if self.options.skip_bad:
                return None
            raise ValueError(f"{plan.entry.where(self.manifest)}: {e} (set skip_bad: true to skip)") from None

    def _decode(self, plan: Plan) -> dict:
        cfg, timing = self.cfg, self.cfg.timing
        mel = pixels = None
        if plan.audio is not None:
            sr = timing.sample_rate
            audio = media.load_audio(plan.audio, sr)
            audio = audio[: timing.whisper_chunk_seconds * sr]  # release: first 30 s only
            min_samples = math.ceil(self.options.min_audio_seconds * sr)
            if audio.shape[0] < min_samples:
                audio = media.pad_or_trim(audio, min_samples)
            # pad_to_30s pads the waveform (not the mel) so the release's features are reproduced exactly
            pad = timing.whisper_chunk_seconds * sr if cfg.audio.pad_to_30s else None
            mel = media.log_mel_spectrogram(audio, cfg.audio.n_mels, timing, pad_to_samples=pad)  # [M, Tm]
        if plan.visual is not None:
            if plan.is_image:
                frames = media.load_image(plan.visual)  # [H, W, 3]
            else:
                frames, _ = media.load_frames(plan.visual, timing.video_fps, max_frames=timing.max_frames)
            pixels = media.preprocess_frames(frames, cfg.visual.image_size)  # [T, 3, S, S]
        return {
            "mel": mel, "pixels": pixels, "is_image": plan.is_image,
            "modality_mask": torch.tensor(plan.modality_mask, dtype=torch.float32),
            "conversation": plan.conversation, "task": plan.task, "id": plan.entry.id,
            "line": plan.entry.line, "audio_key": self._file_key(plan.audio, "audio"),
            "visual_key": self._file_key(plan.visual, "image" if plan.is_image else "video"),
        }

    def _file_key(self, path: Path | None, kind: str) -> str | None:
        """Identity of a decoded file: path, mtime, size and the decode settings that shape it."""
        if path is None:
            return None
        st = os.stat(path)
        t, a = self.cfg.timing, self.cfg.audio
        if kind == "audio":
            settings = (t.sample_rate, t.n_fft, t.hop_length, a.n_mels, a.pad_to_30s,
                        t.whisper_chunk_seconds, self.options.min_audio_seconds)
        else:
            settings = (t.video_fps, t.max_frames, self.cfg.visual.image_size)
        return f"{kind}|{os.path.abspath(path)}|{st.st_mtime_ns}|{st.st_size}|{settings}"


# -------------------------------------------------------------------------------------------- sampler


class StreamSampler(torch.utils.data.Sampler):
    """Deterministic, resumable batch sampler over an endless stream of seeded epoch permutations.

    Global stream position p maps to sample perm_{p // N}[p % N]. Each step of ``world`` processes
    consumes ``world * batch_size`` positions; rank r takes its contiguous slice. Yields lists of
    (position, index) so pairing draws are keyed by position. The recipe stores the position.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, *, rank: int = 0, world: int = 1,
                 position: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world, self.position, self.shuffle = rank, world, position, shuffle
        self._perm: tuple[int, np.ndarray] | None = None

    def index(self, position: int) -> int:
        epoch, i = divmod(position, self.n)
        if not self.shuffle:
            return i
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return int(self._perm[1][i])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        p = self.position
        while True:
            start = p + self.rank * self.batch_size
            yield [(q, self.index(q)) for q in range(start, start + self.batch_size)]
            p += self.world * self.batch_size


# -------------------------------------------------------------------------------------------- collate


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
        self.instruction_tokenizer = instruction_tokenizer or tokenizer
        self.max_text_tokens = max_text_tokens

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
        ids, mask = instruction_inputs(self.instruction_tokenizer, questions, cfg.visual.max_instruction_tokens)
        batch.update({
            "instruction_ids": ids, "instruction_mask": mask,  # [B, Li]
            "modality_mask": torch.stack([it["modality_mask"] for it in kept]),  # [B, 2]
            "audio_lengths": audio_lengths, "mel_lengths": mel_lengths,
            "prompts": [conversation_ids(self.tokenizer, list(it["conversation"]), cfg.llm.eos_token_id,
                                         self.max_text_tokens) for it in kept],
            "questions": questions, "answers": [first_answer(it["conversation"]) for it in kept],
            "tasks": [it["task"] for it in kept], "ids": [it["id"] for it in kept],
            "lines": [it["line"] for it in kept], "audio_keys": [it["audio_key"] for it in kept],
            "visual_keys": [it["visual_key"] for it in kept],
        })
        return batch

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
