"""Atomic file and folder writes, sha256 of files, and the manifests that let every byte be verified.

Nothing half-written ever takes a final path: a file is written to a temporary name in the
same folder and renamed; a folder is filled under a temporary name and swapped in whole.

A model folder carries ``manifest.json`` (sha256 and size of every other file in it), written
last. :func:`verify_folder` checks the bytes against it before anything is loaded, so a
corrupted, truncated or swapped file is refused with one line naming it, never served. Hashes
are remembered per file identity (device, inode, size, modification and change times) in a
small database in the download cache, so a repeated load of an unchanged file costs a ``stat``;
any write to a file changes its change time, which no user can set back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from gpt2lab.errors import Gpt2labError

CHUNK = 1 << 20  # bytes per read while hashing
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
HASH_DB = "sha256-by-stat.sqlite3"


class IntegrityError(Gpt2labError, ValueError):
    """A file's bytes differ from what its folder's manifest records (or the manifest is missing)."""


def cache_dir() -> Path:
    """Where downloads and file hashes are cached: ``$GPT2LAB_CACHE``, default ``~/.cache/gpt2lab``."""
    return Path(os.environ.get("GPT2LAB_CACHE", Path.home() / ".cache" / "gpt2lab"))


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


# --------------------------------------------------------------------------- hashes by file identity


def _identity(path: Path) -> tuple[str, int, int, int, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _hash_db() -> sqlite3.Connection | None:
    """The database of known hashes, or None when the cache folder cannot hold it (read-only, full)."""
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(folder / HASH_DB, timeout=10)
        db.execute(
            "CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, dev INT, ino INT, size INT, "
            "mtime INT, ctime INT, sha256 TEXT)"
        )
        return db
    except (OSError, sqlite3.Error):
        return None


def sha256_known(path: str | Path) -> str:
    """``sha256_file(path)``, from the hash database when the file has not changed since it was hashed."""
    path = Path(path)
    key = _identity(path)
    db = _hash_db()
    if db is None:
        return sha256_file(path)
    with contextlib.closing(db):
        row = db.execute("SELECT dev, ino, size, mtime, ctime, sha256 FROM hashes WHERE path = ?", key[:1]).fetchone()
        if row is not None and tuple(row[:5]) == key[1:]:
            return row[5]
        digest = sha256_file(path)
        if _identity(path) == key:  # not written while it was read
            with contextlib.suppress(sqlite3.Error), db:
                db.execute("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?, ?)", (*key, digest))
        return digest


# --------------------------------------------------------------------------- manifests


def write_manifest(folder: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Record sha256 and size of every file in ``folder`` (recursively) in its ``manifest.json``.

    Call it last, once every other file of the folder is written (e.g. inside :func:`atomic_dir`).
    """
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }
    manifest = {"format": MANIFEST_FORMAT, "files": files, **(extra or {})}
    return write_atomic(folder / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The folder's manifest; :class:`IntegrityError` when it is missing or unreadable."""
    file = Path(folder) / MANIFEST_FILE
    try:
        manifest = json.loads(file.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(v.get("sha256"), str) for v in files.values()):
            raise ValueError("no file list")
    except FileNotFoundError:
        raise IntegrityError(
            f"{folder}: no {MANIFEST_FILE}, so its bytes cannot be verified; write it again with this version "
            "of gpt2lab (re-run the stage that made it, or convert the checkpoint again)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise IntegrityError(f"{file}: unreadable manifest ({err}); write the folder again") from err
    return manifest


def verify_folder(folder: str | Path, names: tuple[str, ...] | None = None) -> dict[str, str]:
    """Check the files of ``folder`` (all listed, or ``names``) against its manifest; ``{name: sha256}``.

    Raises :class:`IntegrityError` naming the first file that is missing, of another size, or
    whose sha256 differs, with the expected and the actual hash.
    """
    folder = Path(folder)
    listed = read_manifest(folder)["files"]
    wanted = tuple(listed) if names is None else names
    verified = {}
    for name in wanted:
        entry = listed.get(name)
        path = folder / name
        if entry is None:
            raise IntegrityError(f"{path}: not in {folder / MANIFEST_FILE}; the folder changed after it was written")
        if not path.is_file():
            raise IntegrityError(f"{path}: missing (the manifest lists it); write the folder again")
        actual = sha256_known(path) if path.stat().st_size == entry.get("size", path.stat().st_size) else None
        if actual != entry["sha256"]:
            what = f"sha256 {actual}" if actual else f"{path.stat().st_size} bytes, not {entry['size']}"
            raise IntegrityError(
                f"{path}: corrupted or replaced: expected sha256 {entry['sha256']}, found {what}; "
                "restore it (dvc checkout, or re-run the stage that wrote it)"
            )
        verified[name] = actual
    return verified
