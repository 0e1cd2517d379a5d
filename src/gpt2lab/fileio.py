"""Atomic file and folder writes, and sha256 of files.

Nothing half-written ever takes a final path: a file is written to a temporary name in the
same folder and renamed; a folder is filled under a temporary name and swapped in whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 20  # bytes per read while hashing


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through ``.<name>.tmp`` in the same folder and a rename.

    The temporary name is fixed, so a writer killed half-way leaves at most that file, which the
    next write of the same path replaces.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:  # the umask's permissions, as for any new file
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder (``.<name>.tmp``) to fill; on success it replaces ``out_dir``.

    The old folder is moved aside (``.<name>.old``) before it is deleted, so a kill at any moment
    leaves the old or the new folder whole (or, between the two renames, none), never half of
    one; leftovers of a killed run are removed by the next. On failure the temporary folder is
    removed and ``out_dir`` is left as it was. Folders get the umask's permissions.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (out_dir.with_name(f".{out_dir.name}.{kind}") for kind in ("tmp", "old"))
    for stale in (tmp, old):  # left by a killed run
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
