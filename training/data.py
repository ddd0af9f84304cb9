"""Training data: JSONL manifest -> decoded media, and the order samples are drawn in.

    manifest line -> Entry (training/manifest.py) -> pair() (training/pairing.py) -> Plan -> decode here
    -> Collator (training/collate.py)

Every random draw comes from a generator seeded by (seed, stream position), so the data a step sees is a
pure function of the train state, whatever the number of loader workers.

Notation: T frames, S image side, M mel bins, Tm mel frames (100 Hz).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from favor import media
from favor.clip_media import MIN_AUDIO_SECONDS, decode_clip
from favor.config import FavorConfig
from training.manifest import check_media, parse_manifest
from training.pairing import STREAM_TASK, PairingOptions, Plan, own_soundtrack, pair


@dataclass(frozen=True)
class DataOptions:
    skip_bad: bool = False  # True: unusable samples are skipped and counted instead of raising
    validate: bool = True  # probe every file's streams when the dataset is built (no decoding)
    min_audio_seconds: float = MIN_AUDIO_SECONDS  # release dataset: shorter audio zero-padded to 3 s
    pairing: PairingOptions = field(default_factory=PairingOptions)
    tasks: tuple[str, ...] = ()  # only samples of these tasks (a curriculum stage); () = every task


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
        if self.options.tasks:
            present = {e.task for e in entries}
            if missing := sorted(set(self.options.tasks) - present):
                raise ValueError(f"{self.manifest}: no samples of task(s) {', '.join(missing)} "
                                 f"(it has {', '.join(sorted(present))})")
            entries = [e for e in entries if e.task in self.options.tasks]
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
        self.stream_captions = [e.conversation[1]["value"] for e in entries if e.task == STREAM_TASK]

    def __len__(self) -> int:
        return len(self.entries)

    def plan(self, key: int | tuple[int, int]) -> Plan:
        position, index = key if isinstance(key, tuple) else (key, key)
        rng = np.random.default_rng([self.seed, position])
        return pair(self.entries[index], rng, self.audio_pool, self.options.pairing, self.stream_captions)

    def __getitem__(self, key: int | tuple[int, int]) -> dict | None:
        plan = self.plan(key)
        try:
            return self._decode(plan)
        except media.MediaError as e:
            if self.options.skip_bad:
                return None
            raise ValueError(f"{plan.entry.where(self.manifest)}: {e} (set skip_bad: true to skip)") from None

    def _decode(self, plan: Plan) -> dict:
        # the one decode rule of training, favor-eval and the runtime's whole-clip answers
        mel, pixels = decode_clip(self.cfg, plan.audio, plan.visual, plan.is_image,
                                  self.options.min_audio_seconds)  # [M, Tm], [T, 3, S, S]
        return {
            "mel": mel, "pixels": pixels, "is_image": plan.is_image,
            "modality_mask": torch.tensor(plan.modality_mask, dtype=torch.float32),
            "conversation": plan.conversation, "instruction": plan.instruction, "task": plan.task,
            "id": plan.entry.id,
            "line": plan.entry.line, "audio_key": self._file_key(plan.audio, "audio"),
            "visual_key": self._file_key(plan.visual, "image" if plan.is_image else "video"),
            "scene": scene_of(plan), "own_soundtrack": own_soundtrack(plan),
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


def scene_of(plan: Plan) -> dict | None:
    """The clip's scene ground truth as far as this draw's media show it (training/window_words.py), or
    None for a manifest without ``meta.events``.

    ``meta.events`` is the timeline of the clip's video and soundtrack: an entry's video shows it, and so
    does its audio, unless the entry is an image one (a still and the spoken question about it: one
    instant, and a recording that is not the clip's); audio that pairing swapped in is another clip's."""
    meta, entry = plan.entry.meta, plan.entry
    if "events" not in meta or "duration" not in meta:
        return None
    seen = plan.modality_mask[0] > 0 and entry.video is not None and plan.visual == entry.video
    heard = (plan.modality_mask[1] > 0 and entry.image is None and plan.audio is not None
             and plan.audio == entry.audio)
    return {"events": meta["events"], "duration": float(meta["duration"]), "seen": seen, "heard": heard}


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
