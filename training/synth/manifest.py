"""The JSONL manifest: one sample per line, validated on load.

Schema (other stages code against it; keep it exact):
    {"id": str, "task": str, "video": str|null, "audio": str|null, "image": str|null,
     "conversation": [{"from": "human", "value": str}, {"from": "gpt", "value": str}, ...],
     "meta": {...free-form...}}
Paths are relative to the manifest's directory; a null or absent modality key means that modality is absent.
``audio`` may name an mp4, whose audio track is then used.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from favor.fileio import atomic_write
from training.manifest import read_jsonl

from .tasks import TASKS
from .windows import TASK as STREAM_TASK

MODALITIES = ("video", "audio", "image")
KEY_ORDER = ("id", "task", *MODALITIES, "conversation", "meta")
ROLES = ("human", "gpt")


def write_manifest(path: Path | str, samples: Iterable[dict]) -> Path:
    """Write samples as JSONL (fixed key order, so equal samples give equal bytes); atomic replace."""
    path = Path(path)
    text = "".join(json.dumps({k: s[k] for k in KEY_ORDER if k in s}, ensure_ascii=False) + "\n"
                   for s in samples)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def _problem(row: dict, root: Path, check_files: bool) -> str | None:
    """What is wrong with one decoded line, or None."""
    unknown = sorted(set(row) - set(KEY_ORDER))
    if unknown:
        return f"unknown keys {unknown}; expected only {list(KEY_ORDER)}"
    if not isinstance(row.get("id"), str) or not row["id"]:
        return f"'id' must be a non-empty string, got {row.get('id')!r}"
    if row.get("task") not in (*TASKS, STREAM_TASK):
        return f"'task' must be one of {[*TASKS, STREAM_TASK]}, got {row.get('task')!r}"
    present = []
    for key in MODALITIES:
        value = row.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            return f"'{key}' must be a relative path string or null, got {value!r}"
        if Path(value).is_absolute():
            return f"'{key}' must be relative to the manifest directory, got absolute {value!r}"
        if check_files and not (root / value).is_file():
            return f"'{key}' file {value!r} does not exist under {root}"
        present.append(key)
    if not present:
        return f"at least one of {list(MODALITIES)} must be set, all are null"
    conv = row.get("conversation")
    if not isinstance(conv, list) or len(conv) < 2 or len(conv) % 2:
        return "'conversation' must be a list of human/gpt turn pairs"
    for i, turn in enumerate(conv):
        want = ROLES[i % 2]
        if not isinstance(turn, dict) or set(turn) != {"from", "value"}:
            return f"conversation turn {i} must be {{'from', 'value'}}, got {turn!r}"
        if turn["from"] != want:
            return f"conversation turn {i} must be from {want!r}, got {turn['from']!r}"
        if not isinstance(turn["value"], str) or not turn["value"].strip():
            return f"conversation turn {i} ({want}) must have a non-empty string value"
    if "meta" in row and not isinstance(row["meta"], dict):
        return f"'meta' must be an object, got {type(row['meta']).__name__}"
    return None


def load_manifest(path: Path | str, *, check_files: bool = True) -> list[dict]:
    """Read and validate a JSONL manifest; modality keys are filled in (None when absent).

    Raises ValueError naming the file and line on the first bad line. ``check_files`` also requires every
    referenced media file to exist.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"manifest {path} does not exist")
    root = path.parent
    samples, seen = [], {}
    for lineno, row in read_jsonl(path):
        problem = _problem(row, root, check_files)
        if problem is None and row["id"] in seen:
            problem = f"duplicate id {row['id']!r} (first on line {seen[row['id']]})"
        if problem is not None:
            raise ValueError(f"{path}:{lineno}: {problem}")
        seen[row["id"]] = lineno
        samples.append({**{k: None for k in MODALITIES}, "meta": {}, **row})
    return samples
