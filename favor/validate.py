"""Checks at the boundary: numbers and paths that come from a user, a checkpoint or a bundle manifest.

Everything read from outside is untrusted: a checkpoint's config metadata, a bundle's manifest and
its ONNX external-data references, command-line numbers. Each is checked once, here, before anything
is allocated or opened, and a failure is a ``ValueError`` whose message names the field, the value
and the accepted range (callers prefix the file). Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def check_number(name: str, value: Any, lo: float | None = None, hi: float | None = None,
                 integer: bool = False, lo_open: bool = False) -> float:
    """``value`` as a finite number within [lo, hi] (``lo_open``: > lo); ValueError otherwise."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} ({value!r}) must be {kind}")
    if integer and not isinstance(value, int):
        raise ValueError(f"{name} ({value!r}) must be {kind}")
    if not math.isfinite(value):
        raise ValueError(f"{name} ({value}) must be a finite number")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and value > hi
    if below or above:
        left = "(" if lo_open else "["
        shown = value if isinstance(value, int) else f"{value:g}"
        raise ValueError(f"{name} ({shown}) must be in {left}{_g(lo, '-inf')}, {_g(hi, 'inf')}]")
    return value


def _g(x: float | None, unbounded: str) -> str:
    return unbounded if x is None else f"{x:g}"


def json_object(text: Any, what: str) -> dict:
    """Parse ``text`` (a JSON string) and require an object: ``what`` names it in the message."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a JSON string, got {type(text).__name__}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def inside(root: str | Path, relative: Any, what: str) -> Path:
    """``root / relative`` if it stays inside ``root`` after resolving ``..`` and symlinks."""
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"{what} ({relative!r}) must be a non-empty relative path")
    root = Path(root).resolve()
    if os.path.isabs(relative):
        raise ValueError(f"{what} ({relative}) must be relative to {root}, not absolute")
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise ValueError(f"{what} ({relative}) resolves outside {root}")
    return target


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when two paths name one file (hard links and symlinks included); False if either is absent."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()
