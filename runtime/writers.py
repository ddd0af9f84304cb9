"""Caption writers (SRT, WebVTT, JSON lines), durable per caption, and parsers to read them back.

Every ``write`` appends one complete cue, then flushes and fsyncs, so a crash, Ctrl-C or power loss
leaves a valid file holding every caption produced so far (a cue is never half-written from the
reader's point of view: the file ends after a blank line). The parsers are strict: they raise
ValueError naming the file and line on anything malformed; tests read every output back with them.
"""

from __future__ import annotations

import abc
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

_MS_PER_S = 1000
_MS_PER_MIN = 60 * _MS_PER_S
_MS_PER_H = 60 * _MS_PER_MIN


@dataclass
class Cue:
    start: float  # seconds
    end: float
    text: str


def timestamp(seconds: float, sep: str) -> str:
    """HH:MM:SS<sep>mmm (sep ',' for SRT, '.' for WebVTT)."""
    ms = max(0, round(seconds * _MS_PER_S))
    h, ms = divmod(ms, _MS_PER_H)
    m, ms = divmod(ms, _MS_PER_MIN)
    s, ms = divmod(ms, _MS_PER_S)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _cue_text(text: str) -> str:
    # A blank line ends a cue in both formats, and "-->" would read as a timing line.
    lines = [ln.strip() for ln in text.replace("-->", "->").splitlines() if ln.strip()]
    return "\n".join(lines) or "..."


class CaptionWriter(abc.ABC):
    """Base: opens ``path`` for writing (truncating), appends a durable record per caption."""

    header = ""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.parent and not self.path.parent.is_dir():
            raise ValueError(f"{self.path}: directory {self.path.parent} does not exist")
        self.fh = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.count = 0
        if self.header:
            self._append(self.header)

    def _append(self, text: str) -> None:
        self.fh.write(text)
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def write(self, start: float, end: float, text: str, record: dict | None = None) -> None:
        self.count += 1
        self._append(self.format(start, end, text, record))

    @abc.abstractmethod
    def format(self, start: float, end: float, text: str, record: dict | None) -> str:
        """One caption in this writer's format."""

    def close(self) -> None:
        if not self.fh.closed:
            self.fh.close()


class SrtWriter(CaptionWriter):
    def format(self, start: float, end: float, text: str, record: dict | None) -> str:
        return f"{self.count}\n{timestamp(start, ',')} --> {timestamp(end, ',')}\n{_cue_text(text)}\n\n"


class VttWriter(CaptionWriter):
    header = "WEBVTT\n\n"

    def format(self, start: float, end: float, text: str, record: dict | None) -> str:
        return f"{timestamp(start, '.')} --> {timestamp(end, '.')}\n{_cue_text(text)}\n\n"


class JsonlWriter(CaptionWriter):
    def format(self, start: float, end: float, text: str, record: dict | None) -> str:
        row = {"start": round(start, 3), "end": round(end, 3), "text": text, **(record or {})}
        return json.dumps(row, ensure_ascii=False) + "\n"


WRITERS = {"srt": SrtWriter, "vtt": VttWriter, "jsonl": JsonlWriter}

_TIME = r"(\d{2,}):(\d{2}):(\d{2})[SEP](\d{3})"


def _seconds(m: re.Match, offset: int) -> float:
    h, mi, s, ms = (int(m.group(offset + i)) for i in range(4))
    if mi >= 60 or s >= 60:
        raise ValueError("minutes and seconds must be < 60")
    return h * 3600 + mi * 60 + s + ms / _MS_PER_S


def _parse_blocks(path: Path, text: str, sep: str, numbered: bool) -> list[Cue]:
    one = _TIME.replace("SEP", re.escape(sep))
    timing = re.compile(one + r" --> " + one + r"$")
    cues: list[Cue] = []
    if text and not text.endswith("\n\n"):
        raise ValueError(f"{path}: last cue is not terminated by a blank line (truncated file?)")
    line_no = 1
    for block in text.split("\n\n"):
        lines = block.split("\n")
        if block == "":
            line_no += 1
            continue
        if numbered:
            if not lines[0].isdigit() or int(lines[0]) != len(cues) + 1:
                raise ValueError(f"{path}:{line_no}: expected cue number {len(cues) + 1}, got {lines[0]!r}")
            lines = lines[1:]
        m = timing.match(lines[0]) if lines else None
        if m is None:
            raise ValueError(f"{path}:{line_no}: expected a timing line 'start --> end', got {lines[:1]}")
        start, end = _seconds(m, 1), _seconds(m, 5)
        if end < start:
            raise ValueError(f"{path}:{line_no}: cue ends ({end}) before it starts ({start})")
        if len(lines) < 2 or not all(lines[1:]):
            raise ValueError(f"{path}:{line_no}: cue has no text")
        cues.append(Cue(start, end, "\n".join(lines[1:])))
        line_no += len(block.split("\n")) + 1
    return cues


def parse_srt(path: str | Path) -> list[Cue]:
    path = Path(path)
    return _parse_blocks(path, path.read_text(encoding="utf-8"), ",", numbered=True)


def parse_vtt(path: str | Path) -> list[Cue]:
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if not text.startswith("WEBVTT\n\n"):
        raise ValueError(f"{path}:1: a WebVTT file must start with 'WEBVTT' and a blank line")
    return _parse_blocks(path, text[len("WEBVTT\n\n"):], ".", numbered=False)


def parse_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not a JSON line ({e.msg})") from None
    return rows
