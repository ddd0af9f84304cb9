"""Caption writers (SRT, WebVTT, JSON lines), durable per caption, and parsers to read them back.

Every ``write`` appends one complete cue (unbuffered), then fsyncs a regular file, so a crash, Ctrl-C
or power loss leaves a valid file holding every caption produced so far (a cue is never half-written
from the reader's point of view: the file ends after a blank line). Outputs may also be FIFOs,
character devices (/dev/null) or ``-`` (standard output): those are written, never fsynced. The
parsers are strict: they raise ValueError naming the file and line on anything malformed; tests read
every output back with them.
"""

from __future__ import annotations

import abc
import errno
import json
import os
import re
import stat
import sys
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


class OutputError(ValueError):
    """An output cannot be opened or written. The message is one line naming the path."""


STDOUT = "-"


def _open_sink(path: Path) -> tuple[int, bool, bool]:
    """(fd, durable, owned) for a caption output: a regular file (created or truncated; durable =
    fsynced per caption), a FIFO (with a reader already attached), a character device such as
    /dev/null, or ``-`` for standard output (neither fsynced nor closed by the writer)."""
    if str(path) == STDOUT:
        return -1, False, False  # written through sys.stdout (whatever it is: a pipe, a terminal, a test)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise OutputError(f"{path}: cannot write here ({e.strerror})") from None
    if mode is None and not path.parent.is_dir():
        raise OutputError(f"{path}: directory {path.parent} does not exist")
    if mode is not None and stat.S_ISDIR(mode):
        raise OutputError(f"{path}: is a directory, expected a file to write captions to")
    try:
        if mode is not None and stat.S_ISFIFO(mode):
            # O_NONBLOCK: fails with ENXIO at once when nothing reads the pipe (a plain open would
            # wait forever); the fd is made blocking again so a slow reader slows the writes down.
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.set_blocking(fd, True)
        elif mode is not None and not stat.S_ISREG(mode):
            fd = os.open(path, os.O_WRONLY)  # character devices: /dev/null, /dev/full, a tty
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    except OSError as e:
        why = "no process is reading the pipe" if e.errno == errno.ENXIO else e.strerror
        raise OutputError(f"{path}: cannot open for writing ({why})") from None
    return fd, stat.S_ISREG(os.fstat(fd).st_mode), True


class CaptionWriter(abc.ABC):
    """Base: opens ``path`` for writing (a regular file is truncated), appends a durable record per
    caption. A failed write (disk full, read-only, pipe closed) raises ``OutputError`` and leaves a
    regular file holding exactly the complete cues written before it (a partial cue is cut off)."""

    header = ""

    def __init__(self, path: str | Path):
        self.path = Path(path) if str(path) != STDOUT else Path(STDOUT)
        self.fd, self.durable, self.owned = _open_sink(self.path)
        self.count = 0
        self.size = 0  # bytes of complete records written
        self.closed = False
        if self.header:
            self._append(self.header)

    def _append(self, text: str) -> None:
        data = memoryview(text.encode("utf-8"))
        try:
            if self.fd < 0:
                sys.stdout.write(text)
                sys.stdout.flush()
            while self.fd >= 0 and data:
                data = data[os.write(self.fd, data):]
            if self.durable:
                os.fsync(self.fd)
        except OSError as e:
            self._cut_partial()
            kept = f"; the {self.count - 1} caption(s) before it are kept" if self.count > 1 else ""
            raise OutputError(f"{self.path}: cannot write ({e.strerror or e}){kept}") from None
        self.size += len(text.encode("utf-8"))

    def _cut_partial(self) -> None:
        if self.durable:
            try:  # a record cut off mid-way would make the whole file unparseable
                os.ftruncate(self.fd, self.size)
            except OSError:
                pass

    def write(self, start: float, end: float, text: str, record: dict | None = None) -> None:
        self.count += 1
        self._append(self.format(start, end, text, record))

    @abc.abstractmethod
    def format(self, start: float, end: float, text: str, record: dict | None) -> str:
        """One caption in this writer's format."""

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.owned:
                os.close(self.fd)


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
