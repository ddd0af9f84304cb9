"""favor.fileio: the one sha256 and the one atomic write every package uses."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from favor.fileio import HASH_BLOCK_BYTES, atomic_dir, atomic_write, sha256_file, sha256_path


def test_sha256_of_files_and_directories(tmp_path):
    data = os.urandom(HASH_BLOCK_BYTES + 7)  # crosses a block boundary
    (tmp_path / "d").mkdir()
    f = tmp_path / "d" / "a.bin"
    f.write_bytes(data)
    assert sha256_file(f) == sha256_path(f) == hashlib.sha256(data).hexdigest()
    before = sha256_path(tmp_path / "d")
    (tmp_path / "d" / "a.bin").rename(tmp_path / "d" / "b.bin")  # same bytes, another name
    assert sha256_path(tmp_path / "d") != before  # a directory's digest covers its file names


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "out" / "x.txt"
    atomic_write(path, lambda tmp: open(tmp, "w").write("one"))
    assert path.read_text() == "one"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600

    def half_then_fail(tmp):
        open(tmp, "w").write("tw")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "one" and os.listdir(path.parent) == ["x.txt"]  # no temp litter


def test_atomic_dir_keeps_the_winner_of_a_race(tmp_path):
    target = tmp_path / "cache-abc"
    assert atomic_dir(target, lambda d: (d / "f").write_text("first")) == target

    def late(d):  # another process got there first: this copy is dropped, the first kept
        (d / "f").write_text("second")

    assert atomic_dir(target, late) == target
    assert (target / "f").read_text() == "first" and sorted(os.listdir(tmp_path)) == ["cache-abc"]
    with pytest.raises(ValueError):  # a failing fill leaves nothing behind
        atomic_dir(tmp_path / "other", lambda d: (_ for _ in ()).throw(ValueError("bad")))
    assert sorted(os.listdir(tmp_path)) == ["cache-abc"]


def test_write_step_dir_replaces_and_keeps_the_newest(tmp_path):
    """A step directory appears whole (a failing fill leaves the previous steps untouched and no
    partial target), a rewritten step replaces its old content, and only the newest ``keep`` stay."""
    from favor.fileio import write_step_dir

    for step in (1, 2, 3):
        write_step_dir(tmp_path / f"step_{step:06d}", lambda d, s=step: (d / "w").write_text(str(s)), keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000002", "step_000003"]
    write_step_dir(tmp_path / "step_000003", lambda d: (d / "w").write_text("again"), keep=2)
    assert (tmp_path / "step_000003" / "w").read_text() == "again"
    with pytest.raises(ValueError, match="disk"):
        write_step_dir(tmp_path / "step_000004", lambda d: (_ for _ in ()).throw(ValueError("disk full")), keep=2)
    assert not (tmp_path / "step_000004").exists() and not list(tmp_path.glob(".step_000004*"))
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000002", "step_000003"]
    assert (tmp_path / "step_000002" / "w").read_text() == "2"
