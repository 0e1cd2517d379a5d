"""Atomic writes: the old content or the new, whole, with the usual permissions."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from gpt2lab.fileio import atomic_dir, sha256_file, write_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_write_atomic_replaces_whole_and_leaves_no_temporary(tmp_path, umask_022):
    path = tmp_path / "sub" / "f.json"
    write_atomic(path, "old")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new" and os.listdir(path.parent) == ["f.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_write_atomic_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f"
    write_atomic(path, "old")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="No space"):
        write_atomic(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f"]


def test_atomic_dir_swaps_a_folder_in_whole_with_the_umasks_permissions(tmp_path, umask_022):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(os.listdir(out)) == ["b"] and os.listdir(tmp_path) == ["out"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not mkdtemp's 0700


def test_atomic_dir_failure_keeps_the_old_folder(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("the producer failed")
    assert os.listdir(out) == ["a"] and os.listdir(tmp_path) == ["out"]


def test_sha256_file(tmp_path):
    path = tmp_path / "f"
    data = bytes(range(256)) * 10_000  # several read chunks
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_leftovers_of_a_killed_writer_are_replaced_by_the_next_write(tmp_path):
    """SIGKILL cannot be cleaned up after in-process: the next write of the same path does it."""
    (tmp_path / ".f.tmp").write_text("half")
    write_atomic(tmp_path / "f", "whole")
    (tmp_path / ".out.tmp").mkdir()
    (tmp_path / ".out.tmp" / "half").write_text("x")
    (tmp_path / ".out.old").mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "whole").write_text("y")
    assert sorted(os.listdir(tmp_path)) == ["f", "out"] and os.listdir(tmp_path / "out") == ["whole"]
