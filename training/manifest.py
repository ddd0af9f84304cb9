"""The training manifest: one JSONL line per sample, parsed into ``Entry`` objects (no decoding).

One manifest line is one sample (schema from training/synth):
    {"id", "task", "video", "audio", "image", "conversation": [{"from": "human"|"gpt", "value"}, ...], "meta"}
Paths are relative to the manifest's directory; null or absent means the modality is absent; "audio"
may name a video file (its audio track is used).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from favor import media
from favor.validate import json_object


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


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line of a JSONL file.

    A line that is not a JSON object raises ValueError naming ``file:line`` (both manifest readers,
    this one and training/synth's validating one, read lines through here).
    """
    with open(path, encoding="utf-8") as fh:
        for n, raw in enumerate(fh, start=1):
            if raw.strip():
                yield n, json_object(raw, f"{path}:{n}: the line")


def parse_manifest(path: str | os.PathLike) -> list[Entry]:
    """Read a JSONL manifest; any malformed line raises ValueError naming ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    entries = [_entry(d, n, path.parent, f"{path}:{n}") for n, d in read_jsonl(path)]
    if not entries:
        raise ValueError(f"{path}: manifest has no samples")
    return entries


def _entry(d: dict, n: int, root: Path, where: str) -> Entry:
    video, audio, image = (_path(d.get(k), k, root, where) for k in ("video", "audio", "image"))
    if video is not None and image is not None:
        raise ValueError(f"{where}: a sample has a video or an image, not both")
    if video is None and audio is None and image is None:
        raise ValueError(f"{where}: no media (video, audio and image are all null)")
    task = d.get("task")
    if not isinstance(task, str) or not task:
        raise ValueError(f"{where}: 'task' must be a non-empty string, got {task!r}")
    meta = d.get("meta") or {}
    return Entry(n, str(d.get("id", n)), task, video, audio, image, _conversation(d.get("conversation"), where),
                 meta if isinstance(meta, dict) else {"value": meta})


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
