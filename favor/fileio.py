"""File helpers shared by every package: content hashes and atomic writes.

    sha256_file(path)         -> hex digest of one file
    sha256_path(path)         -> hex digest of a file, or of a directory's files (HF model dirs)
    atomic_write(path, write) -> ``write(tmp)`` beside ``path``, fsync, rename over ``path``
    atomic_dir(target, fill)  -> ``fill(tmp_dir)`` beside ``target``, rename into place
    write_step_dir(target, fill, keep) -> a run's step checkpoint: replaces ``target``, keeps the newest ``keep``

A reader never sees a half-written file: it finds the old file or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

# Files are hashed 1 MiB at a time: constant memory for multi-GB weights, few system calls.
HASH_BLOCK_BYTES = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of one file's bytes."""
    h = hashlib.sha256()
    _hash_into(h, path)
    return h.hexdigest()


def _hash_into(h, path: str | os.PathLike) -> None:  # h: a hashlib object
    with open(path, "rb") as fh:
        while block := fh.read(HASH_BLOCK_BYTES):
            h.update(block)


def sha256_path(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a directory's files (relative name + content, sorted) for HF model dirs."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        _hash_into(h, f)
    return h.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)``, fsync the result, then atomically move it to ``path``.

    The file gets the permissions a plain ``open()`` would give (mkstemp's 0600 is for the temp name
    only); on any error the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_dir(target: Path, fill: Callable[[Path], object]) -> Path:
    """Build a directory with ``fill(tmp_dir)`` beside ``target`` and rename it into place.

    Callers name directories by their content, so when another process renamed its own copy into
    place first (a lost race) that copy is kept and this one is removed. Returns ``target``.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # not a lost race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)  # removes symlinks, never what they point to
    return target


def write_step_dir(target: Path, fill: Callable[[Path], object], keep: int) -> Path:
    """A training run's checkpoint directory (``<run>/step_NNNNNN``): ``fill(tmp_dir)`` beside ``target``,
    then it replaces ``target`` (a resumed run rewrites its own step) and only the newest ``keep``
    ``step_*`` siblings stay (``keep`` 0 keeps all). The directory appears complete or not at all, so a
    run killed mid-write resumes from the previous step."""
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    for old in sorted(target.parent.glob("step_*"))[: -keep or None]:
        shutil.rmtree(old, ignore_errors=True)
    return target
