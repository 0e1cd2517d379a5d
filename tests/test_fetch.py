"""Downloads: sources in order, retries, resumable parts, checksums, safe zips, the shared cache's lock, the dataset's download."""

from __future__ import annotations

import ast
import functools
import hashlib
import http.server
import json
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from gpt2lab.fetch import (
    SOURCE_RECORD,
    STREAM_CHUNK,
    ChecksumError,
    DownloadError,
    UnsafeArchiveError,
    download_dataset,
    fetch,
    fetch_cached,
    fetch_first,
    http_download,
    safe_extract,
)
from gpt2lab.fileio import sha256_file

PAYLOAD = bytes(range(251)) * (4 * STREAM_CHUNK // 251 + 7)  # ~4 chunks; period 251 is no chunk's divisor


CUT = 2 * STREAM_CHUNK + 123  # where a cut transfer stops: inside the third chunk


SHA = hashlib.sha256(PAYLOAD).hexdigest()


OTHER = bytes(reversed(PAYLOAD))  # same size, other bytes: an older version or a wrong mirror


ROOT = Path(__file__).resolve().parents[1]


HANG_S = 5.0  # how long a stalling handler waits at most (released at teardown)


Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


class Server:
    """A loopback HTTP server whose paths behave as the test says; it records every request."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.release = threading.Event()  # set at teardown: stalled handlers stop waiting
        outer = self

        class Dispatch(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                outer.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                route = outer.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                try:
                    route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): expected in several tests

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Dispatch)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def route(self, path: str, handler: Handler) -> str:
        self.routes[path] = handler
        return self.base + path

    def ranges(self, path: str) -> list[str | None]:
        """The Range header of each request to ``path``, in order (None: no Range)."""
        return [headers.get("range") for p, headers in self.requests if p == path]


@pytest.fixture
def server():
    srv = Server()
    srv.thread.start()
    yield srv
    srv.release.set()
    srv.httpd.shutdown()
    srv.httpd.server_close()


# --- handlers ----------------------------------------------------------------------------------
def body(
    data: bytes, *, ranges: bool = True, etag: str | None = None, content_range_start: int | None = None
) -> Handler:
    """Serve ``data``; with ``ranges`` honour ``Range: bytes=N-`` (and ``If-Range`` against ``etag``).

    ``content_range_start`` forces a wrong 206 answer: that part of the file whatever was asked.
    """

    def handle(h: http.server.BaseHTTPRequestHandler) -> None:
        wanted = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
        if_range = h.headers.get("If-Range")
        start = int(wanted.group(1)) if wanted and ranges else None
        if start is not None and if_range is not None and if_range != etag:
            start = None  # RFC 9110: a changed resource is sent whole
        if content_range_start is not None and wanted:
            start = content_range_start
        if start is not None and start >= len(data):
            h.send_response(416)
            h.send_header("Content-Range", f"bytes */{len(data)}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        h.send_response(200 if start is None else 206)
        chunk = data if start is None else data[start:]
        if start is not None:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if etag is not None:
            h.send_header("ETag", etag)
        h.send_header("Accept-Ranges", "bytes" if ranges else "none")
        h.send_header("Content-Length", str(len(chunk)))
        h.end_headers()
        h.wfile.write(chunk)

    return handle


def cut(data: bytes, after: int, etag: str | None = None) -> Handler:
    """Announce all of ``data`` (Content-Length), send ``after`` bytes, close the connection."""

    def handle(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        if etag is not None:
            h.send_header("ETag", etag)
        h.end_headers()
        h.wfile.write(data[:after])
        h.wfile.flush()
        h.close_connection = True

    return handle


def status(code: int, **headers: str) -> Handler:
    def handle(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(code)
        for key, value in headers.items():
            h.send_header(key.replace("_", "-"), value)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return handle


def stall(srv: Server, *, after_bytes: int | None = None, data: bytes = PAYLOAD) -> Handler:
    """Say nothing (``after_bytes`` None) or send headers and ``after_bytes`` bytes, then stall."""

    def handle(h: http.server.BaseHTTPRequestHandler) -> None:
        if after_bytes is not None:
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data[:after_bytes])
            h.wfile.flush()
        srv.release.wait(HANG_S)
        h.close_connection = True

    return handle


def sequence(*handlers: Handler) -> Handler:
    """The first request gets the first handler, and so on; the last one answers the rest."""
    calls = iter(handlers)
    last = [handlers[-1]]

    def handle(h: http.server.BaseHTTPRequestHandler) -> None:
        last[0] = next(calls, last[0])
        last[0](h)

    return handle


def closed_port_url() -> str:
    with socket.socket() as s:  # bound, never listening: connection refused at once
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/file"


def leftovers(folder: Path, keep: str | None = None) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


def fetch_quick(sources: list[str], dest: Path, sha256: str | None = SHA, retries: int = 0, timeout_s: float = 0.5):
    return fetch_first(sources, dest, sha256=sha256, timeout_s=timeout_s, retries=retries)


# --- every kind of failure falls through to the next source ------------------------------------
@pytest.mark.parametrize(
    "make_bad",
    [
        pytest.param(lambda srv: status(404), id="404"),
        pytest.param(lambda srv: status(500), id="500"),
        pytest.param(lambda srv: status(503, Retry_After="3600"), id="503-retry-after-an-hour"),
        pytest.param(lambda srv: body(OTHER), id="checksum-mismatch"),
        pytest.param(lambda srv: body(PAYLOAD[:-1]), id="one-byte-short-but-complete"),
        pytest.param(lambda srv: cut(PAYLOAD, after=1000), id="content-length-larger-than-body"),
        pytest.param(lambda srv: stall(srv), id="timeout-before-headers"),
        pytest.param(lambda srv: stall(srv, after_bytes=3000), id="timeout-mid-body"),
    ],
)
def test_failure_falls_through_to_the_next_source(server, tmp_path, make_bad):
    bad = server.route("/bad", make_bad(server))
    good = server.route("/good", body(PAYLOAD))
    dest = tmp_path / "file.bin"
    t0 = time.monotonic()
    path, source = fetch_quick([bad, good], dest, retries=1)
    assert time.monotonic() - t0 < 3.0  # one timeout (0.5 s) at most twice, no hour-long Retry-After
    assert (path, source) == (dest, good)
    assert dest.read_bytes() == PAYLOAD
    assert leftovers(tmp_path) == ["file.bin"]  # no .part, no side files
    assert server.ranges("/good") == [None]  # the bad source's bytes were not resumed from


def test_connection_refused_and_404_fall_through_to_a_local_file(server, tmp_path):
    local = tmp_path / "mirror.bin"
    local.write_bytes(PAYLOAD)
    out = tmp_path / "out"
    out.mkdir()
    sources = [closed_port_url(), server.route("/missing", status(404)), str(local)]
    assert fetch_quick(sources, out / "file.bin")[1] == str(local)
    assert leftovers(out) == ["file.bin"]


def test_every_source_failing_leaves_nothing_and_names_each(server, tmp_path):
    sources = [
        server.route("/404", status(404)),
        server.route("/500", status(500)),
        server.route("/wrong", body(OTHER)),
        closed_port_url(),
    ]
    with pytest.raises(DownloadError) as info:
        fetch_quick(sources, tmp_path / "file.bin")
    lines = str(info.value).splitlines()
    assert lines[0] == "could not fetch file.bin from any source:"
    for source, why in zip(sources, ["404", "500", "sha256", "ConnectionError"]):
        assert why in next(line for line in lines if line.strip().startswith(source))
    assert leftovers(tmp_path) == []


def test_checksum_failure_keeps_no_part_to_resume_from(server, tmp_path):
    url = server.route("/file", sequence(body(OTHER), body(PAYLOAD)))
    dest = tmp_path / "file.bin"
    with pytest.raises(ChecksumError, match="does not match"):
        http_download(url, dest, sha256=SHA, retries=0, progress=False)
    assert leftovers(tmp_path) == []
    http_download(url, dest, sha256=SHA, retries=0, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges("/file") == [None, None]  # the second try started from zero


def test_zip_member_source_cut_short_leaves_no_temporary_folder(server, tmp_path):
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("data/payload.bin", PAYLOAD)
    archive = buffer.getvalue()
    cut_url = server.route("/a.zip", cut(archive, after=len(archive) // 2))
    good_url = server.route("/b.zip", body(archive))
    dest = tmp_path / "payload.bin"
    with pytest.raises(requests.RequestException):
        fetch(cut_url, dest, sha256=SHA, timeout_s=1, retries=0, member="payload.bin")
    assert leftovers(tmp_path) == []
    fetch(good_url, dest, sha256=SHA, timeout_s=1, retries=0, member="payload.bin")
    assert dest.read_bytes() == PAYLOAD and leftovers(tmp_path) == ["payload.bin"]


# --- retry policy --------------------------------------------------------------------------------
def test_refused_connection_is_not_retried_with_back_off(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(requests.ConnectionError):
        http_download(closed_port_url(), tmp_path / "f", timeout_s=1, retries=3, progress=False)
    assert time.monotonic() - t0 < 1.0  # 3 connect retries with back-off took ~3 s


@pytest.mark.parametrize(
    "first",
    [pytest.param(lambda srv: status(500), id="500"), pytest.param(lambda srv: stall(srv), id="read-timeout")],
)
def test_server_errors_and_read_timeouts_are_retried(server, tmp_path, first):
    url = server.route("/file", sequence(first(server), body(PAYLOAD)))
    http_download(url, tmp_path / "f", sha256=SHA, timeout_s=0.5, retries=1, progress=False)
    assert (tmp_path / "f").read_bytes() == PAYLOAD and len(server.ranges("/file")) == 2


def test_no_retries_means_one_request(server, tmp_path):
    url = server.route("/file", sequence(status(500), body(PAYLOAD)))
    with pytest.raises(requests.HTTPError, match="500"):
        http_download(url, tmp_path / "f", retries=0, progress=False)
    assert len(server.ranges("/file")) == 1


# --- resuming a .part ----------------------------------------------------------------------------
def kept_part(folder: Path, name: str = "file.bin") -> int:
    """Bytes a cut transfer left in ``<name>.part``: a prefix of what was sent, at most one chunk short."""
    part = (folder / f"{name}.part").read_bytes()
    assert CUT - STREAM_CHUNK < len(part) <= CUT
    return len(part)


@pytest.mark.parametrize("etag", [None, '"v1"'])
def test_cut_transfer_resumes_with_a_range_request(server, tmp_path, etag):
    url = server.route("/file", sequence(cut(PAYLOAD, after=CUT, etag=etag), body(PAYLOAD, etag=etag)))
    dest = tmp_path / "file.bin"
    with pytest.raises(requests.RequestException, match="IncompleteRead"):
        http_download(url, dest, sha256=SHA, retries=0, progress=False)
    assert not dest.exists()
    kept = kept_part(tmp_path)
    assert (tmp_path / "file.bin.part").read_bytes() == PAYLOAD[:kept]
    http_download(url, dest, sha256=SHA, retries=0, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges("/file") == [None, f"bytes={kept}-"]
    if etag:
        assert server.requests[-1][1]["if-range"] == etag  # a changed file would come back whole
    assert leftovers(tmp_path) == ["file.bin"]


def test_fetch_first_again_resumes_its_own_part(server, tmp_path):
    url = server.route("/file", sequence(cut(PAYLOAD, after=CUT), body(PAYLOAD)))
    with pytest.raises(DownloadError, match="IncompleteRead"):
        fetch_quick([url], tmp_path / "file.bin")
    kept = kept_part(tmp_path)
    fetch_quick([url], tmp_path / "file.bin")
    assert (tmp_path / "file.bin").read_bytes() == PAYLOAD and server.ranges("/file")[-1] == f"bytes={kept}-"


@pytest.mark.parametrize("sha256", [SHA, None], ids=["with-sha256", "without-sha256"])
def test_part_of_another_source_is_not_spliced_onto_this_one(server, tmp_path, sha256):
    """Mirror A (an older file) is cut short; mirror B must not append its tail to A's bytes."""
    a = server.route("/a", cut(OTHER, after=CUT))
    b = server.route("/b", body(PAYLOAD))
    dest = tmp_path / "file.bin"
    assert fetch_quick([a, b], dest, sha256=sha256)[1] == b
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges("/b") == [None]
    assert leftovers(tmp_path) == ["file.bin"]


def test_changed_file_is_fetched_whole_not_spliced(server, tmp_path):
    """The .part came from version 1; the server now has version 2 (another ETag); no checksum known."""
    url = server.route("/file", sequence(cut(OTHER, after=CUT, etag='"v1"'), body(PAYLOAD, etag='"v2"')))
    dest = tmp_path / "file.bin"
    with pytest.raises(requests.RequestException):
        http_download(url, dest, retries=0, progress=False)
    kept = kept_part(tmp_path)
    http_download(url, dest, retries=0, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges("/file") == [None, f"bytes={kept}-"]  # asked for the tail, got the whole new file


def test_checksum_failure_after_a_resume_starts_over_once(server, tmp_path):
    """No validator tells the file changed: the spliced file fails sha256, and one fresh try fixes it."""
    url = server.route("/file", sequence(cut(OTHER, after=CUT), body(PAYLOAD)))
    dest = tmp_path / "file.bin"
    with pytest.raises(requests.RequestException):
        http_download(url, dest, sha256=SHA, retries=0, progress=False)
    kept = kept_part(tmp_path)
    http_download(url, dest, sha256=SHA, retries=0, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges("/file") == [None, f"bytes={kept}-", None]
    assert leftovers(tmp_path) == ["file.bin"]


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(body(PAYLOAD, ranges=False), id="range-ignored-200"),
        pytest.param(body(PAYLOAD, content_range_start=0), id="206-from-the-wrong-offset"),
    ],
)
def test_resume_against_a_server_that_misanswers_the_range(server, tmp_path, answer):
    url = server.route("/file", sequence(cut(PAYLOAD, after=CUT), answer))
    dest = tmp_path / "file.bin"
    with pytest.raises(requests.RequestException):
        http_download(url, dest, retries=0, progress=False)
    kept_part(tmp_path)
    http_download(url, dest, retries=0, progress=False)  # no checksum: only the range logic protects it
    assert dest.read_bytes() == PAYLOAD
    assert leftovers(tmp_path) == ["file.bin"]


def test_part_longer_than_the_file_starts_over(server, tmp_path):
    url = server.route("/file", sequence(cut(PAYLOAD + PAYLOAD, after=len(PAYLOAD) + CUT), body(PAYLOAD)))
    dest = tmp_path / "file.bin"
    with pytest.raises(requests.RequestException):
        http_download(url, dest, retries=0, progress=False)
    kept = (tmp_path / "file.bin.part").stat().st_size
    assert kept > len(PAYLOAD)
    http_download(url, dest, sha256=SHA, retries=0, progress=False)  # 416 for the range, then from zero
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges("/file") == [None, f"bytes={kept}-", None]


def test_part_without_a_record_of_its_origin_is_not_resumed(server, tmp_path):
    """A .part left by something else (or an older gpt2lab) may hold anything: start from zero."""
    (tmp_path / "file.bin.part").write_bytes(OTHER[:CUT])
    url = server.route("/file", body(PAYLOAD))
    http_download(url, tmp_path / "file.bin", retries=0, progress=False)
    assert (tmp_path / "file.bin").read_bytes() == PAYLOAD and server.ranges("/file") == [None]


# --- the shared cache: processes take turns ----------------------------------------------------
# What one process of `dvc exp run --queue -j 2` does: fetch a file into the shared cache, print its sha256.
FETCH_CACHED = """
import hashlib, logging, sys
from gpt2lab.fetch import fetch_cached
logging.basicConfig(level=logging.INFO, format="%(message)s")
path = fetch_cached([sys.argv[1]], sys.argv[2], sha256=sys.argv[3], timeout_s=30, retries=0)
print(hashlib.sha256(path.read_bytes()).hexdigest())
"""


WAITING = "waiting for another process fetching"  # what a process blocked on the lock logs


PROCESS_S = 60.0


def held(data: bytes, until: threading.Event) -> Handler:
    """Send the headers and the first chunk of ``data``, then the rest once ``until`` is set."""

    def handle(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data[:STREAM_CHUNK])
        h.wfile.flush()
        until.wait(PROCESS_S)
        h.wfile.write(data[STREAM_CHUNK:])

    return handle


@pytest.fixture
def processes():
    """Fetching processes a test starts: ``start(url, dest)``; any left running at the end are killed."""
    started: list[subprocess.Popen] = []

    def start(url: str, dest: Path, log: Path) -> subprocess.Popen:
        with open(log, "wb") as err:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen([sys.executable, "-c", FETCH_CACHED, url, str(dest), SHA],
                                    stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PROCESS_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def finished(proc: subprocess.Popen, log: Path) -> str:
    """The sha256 the process printed; it must have exited cleanly."""
    out, _ = proc.communicate(timeout=PROCESS_S)
    assert proc.returncode == 0, log.read_text()
    return out.strip()


def test_two_processes_fetching_one_cached_file_download_it_once(server, tmp_path, processes):
    go_on = threading.Event()
    url = server.route("/file", held(PAYLOAD, go_on))
    dest = tmp_path / "cache" / "file.bin"
    try:
        first = processes(url, dest, tmp_path / "first.log")
        wait_for(lambda: len(server.ranges("/file")) == 1, "the first process's request")
        second = processes(url, dest, tmp_path / "second.log")
        # Without the lock the second process would request the file too, into the same .part file.
        wait_for(lambda: WAITING in (tmp_path / "second.log").read_text() or len(server.ranges("/file")) > 1
                 or second.poll() is not None, "the second process to wait or to download")  # fmt: skip
        assert server.ranges("/file") == [None]
    finally:
        go_on.set()  # the first download completes
    assert finished(first, tmp_path / "first.log") == SHA
    assert finished(second, tmp_path / "second.log") == SHA  # found the finished, checked file
    assert server.ranges("/file") == [None]  # one full download for both
    assert dest.read_bytes() == PAYLOAD
    assert leftovers(dest.parent) == [".file.bin.lock", ".file.bin.sha256", "file.bin"]  # the lock file stays; no .part


def test_lock_of_a_killed_process_blocks_nobody(server, tmp_path, processes):
    """SIGKILL the process that holds the lock mid-download: the kernel drops its lock, the waiting
    process goes on at once and resumes the dead one's .part."""
    never = threading.Event()  # the first download stalls until its process is killed
    url = server.route("/file", sequence(held(PAYLOAD, never), body(PAYLOAD)))
    dest = tmp_path / "cache" / "file.bin"
    part = dest.with_name("file.bin.part")
    try:
        holder = processes(url, dest, tmp_path / "holder.log")
        wait_for(lambda: part.is_file() and part.stat().st_size == STREAM_CHUNK, "the holder's first chunk")
        waiter = processes(url, dest, tmp_path / "waiter.log")
        wait_for(lambda: WAITING in (tmp_path / "waiter.log").read_text() or waiter.poll() is not None,
                 "the second process to wait for the lock")  # fmt: skip
        time.sleep(0.3)
        assert waiter.poll() is None and server.ranges("/file") == [None]  # blocked while the holder lives
        holder.send_signal(signal.SIGKILL)
        assert finished(waiter, tmp_path / "waiter.log") == SHA
    finally:
        never.set()
    assert holder.wait() == -signal.SIGKILL
    assert server.ranges("/file") == [None, f"bytes={STREAM_CHUNK}-"]  # resumed, not started over
    assert dest.read_bytes() == PAYLOAD
    assert leftovers(dest.parent) == [".file.bin.lock", ".file.bin.sha256", "file.bin"]


def test_cached_file_is_kept_and_a_corrupt_one_fetched_again(server, tmp_path):
    url = server.route("/file", body(PAYLOAD))
    dest = tmp_path / "file.bin"
    assert fetch_cached([url], dest, sha256=SHA, retries=0) == dest
    assert fetch_cached([url], dest, sha256=SHA, retries=0) == dest
    assert server.ranges("/file") == [None]  # the second call found it in the cache
    dest.write_bytes(OTHER)  # corrupted on disk
    fetch_cached([url], dest, sha256=SHA, retries=0)
    assert dest.read_bytes() == PAYLOAD and server.ranges("/file") == [None, None]


# --- loading what was downloaded: nothing may run code from a file ------------------------------
SCANNED = ("src", "stages", "bench")


PICKLE_MODULES = {"pickle", "_pickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}


def _dotted(node: ast.AST) -> str:
    """``torch.load`` for the call target ``torch.load``; '' for anything that is not a plain name chain."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def unsafe_loading(source: str, filename: str = "<src>") -> list[str]:
    """Each place in ``source`` that could unpickle or run code from data, as ``file:line: what``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in PICKLE_MODULES:
                found.append(f"{where}: from {module} import ...")
            if module == "torch" and any(a.name == "load" for a in node.names):
                found.append(f"{where}: from torch import load (use torch.load(..., weights_only=True))")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            kwargs = {k.arg: k.value for k in node.keywords}

            def is_true(key: str) -> bool:
                return isinstance(kwargs.get(key), ast.Constant) and kwargs[key].value is True

            if name.endswith("torch.load") and not is_true("weights_only"):
                found.append(f"{where}: torch.load without weights_only=True")
            elif name.endswith(("jit.load", "read_pickle", "yaml.load", "yaml.load_all", "yaml.unsafe_load",
                                "yaml.full_load")):  # fmt: skip
                found.append(f"{where}: {name}")
            elif name.split(".")[-1] in ("load", "loads") and name.split(".")[0] in PICKLE_MODULES:
                found.append(f"{where}: {name}")
            elif name in ("eval", "exec"):
                found.append(f"{where}: {name}()")
            if is_true("allow_pickle") or is_true("trust_remote_code") or is_true("shell"):
                found.append(f"{where}: {name}(... {'/'.join(k for k in kwargs if is_true(k))}=True)")
    return found


def test_the_scanner_finds_each_unsafe_pattern():
    bad = """
import pickle
from cloudpickle import loads
import torch, numpy as np, yaml, subprocess
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
np.load("x.npy", allow_pickle=True)
yaml.load(open("p.yaml"))
pickle.loads(b"")
eval("1")
subprocess.run("ls", shell=True)
"""
    flagged = {int(hit.split(":")[1]) for hit in unsafe_loading(bad)}
    assert flagged == set(range(2, 12)) - {4}  # every line but the plain imports of line 4
    assert unsafe_loading('torch.load("x.pt", map_location="cpu", weights_only=True)\nyaml.safe_load("")') == []


def test_no_code_path_unpickles_or_runs_code_from_files():
    files = sorted(p for folder in SCANNED for p in (ROOT / folder).rglob("*.py"))
    assert len(files) > 20
    found = [hit for p in files for hit in unsafe_loading(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []


FIXTURE = Path(__file__).parent / "fixtures" / "sms_small.tsv"
FIXTURE_SHA256 = hashlib.sha256(FIXTURE.read_bytes()).hexdigest()
RAW = "SMSSpamCollection.tsv"


def download(sources, raw_dir: Path) -> dict:
    """The dataset's download from ``sources`` into ``raw_dir``, without retries."""
    return download_dataset([str(s) for s in sources], FIXTURE_SHA256, raw_dir / RAW, retries=0, timeout_s=5.0)


def make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, payload in entries.items():
            zf.writestr(name, payload)
    return path


@pytest.fixture
def good_zip(tmp_path) -> Path:
    """An archive shaped like UCI's: the TSV as ``SMSSpamCollection`` beside a readme."""
    entries = {"readme": b"SMS Spam Collection v.1", "SMSSpamCollection": FIXTURE.read_bytes()}
    return make_zip(tmp_path / "good.zip", entries)


@pytest.fixture
def http_root(tmp_path):
    """A loopback HTTP server over a folder: exercises the real HTTP path without any network."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_checksum_mismatch_falls_through_to_next_source(tmp_path, good_zip):
    bad = make_zip(tmp_path / "bad.zip", {"SMSSpamCollection": FIXTURE.read_bytes() + b"ham\textra row\n"})
    record = download([bad, good_zip], tmp_path / "raw")
    assert record["source"] == str(good_zip)
    assert (tmp_path / "raw" / RAW).read_bytes() == FIXTURE.read_bytes()
    saved = json.loads((tmp_path / "raw" / SOURCE_RECORD).read_text())
    assert saved == record == {
        "file": RAW, "source": str(good_zip), "sha256": FIXTURE_SHA256, "bytes": FIXTURE.stat().st_size,
    }  # fmt: skip


def test_zip_served_over_http_is_extracted_and_verified(tmp_path, http_root, good_zip):
    root, base = http_root
    (root / "sms.zip").write_bytes(good_zip.read_bytes())
    (root / "wrong.tsv").write_bytes(b"ham\tnot the file\n")
    sources = [f"{base}/missing.zip", f"{base}/wrong.tsv", f"{base}/sms.zip"]
    record = download(sources, tmp_path / "raw")
    assert record["source"] == f"{base}/sms.zip"
    assert sha256_file(tmp_path / "raw" / RAW) == FIXTURE_SHA256
    assert stat.S_IMODE((tmp_path / "raw" / RAW).stat().st_mode) == 0o644
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [RAW, SOURCE_RECORD]


def test_all_sources_failing_is_one_error_listing_each(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connection refused, no network needed
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/sms.zip"
    wrong = tmp_path / "wrong.tsv"
    wrong.write_bytes(b"ham\thello\n")
    no_member = make_zip(tmp_path / "other.zip", {"readme": b"nothing here"})
    escaping = make_zip(tmp_path / "evil.zip", {"../SMSSpamCollection": FIXTURE.read_bytes()})
    sources = [closed, str(tmp_path / "absent.zip"), str(wrong), str(no_member), str(escaping)]
    with pytest.raises(DownloadError) as info:
        download(sources, tmp_path / "raw")
    message = str(info.value)
    assert message.startswith(f"could not fetch {RAW} from any source")
    for source, why in zip(sources, ["ConnectionError", "no such file", "sha256", "no entry named", ".."]):
        line = next(line for line in message.splitlines() if line.strip().startswith(source + ":"))
        assert why in line
    assert list((tmp_path / "raw").iterdir()) == []  # nothing half-done left behind
    assert not list(tmp_path.rglob("SMSSpamCollection"))  # the '..' entry was not extracted anywhere


@pytest.mark.parametrize(
    "entry", ["../escaped.txt", "sub/../../escaped.txt", "/tmp/absolute.txt", "..\\escaped.txt", "C:/escaped.txt"]
)
def test_zip_entry_escaping_the_folder_is_refused(tmp_path, entry):
    archive = make_zip(tmp_path / "evil.zip", {"SMSSpamCollection": b"ham\thi\n", entry: b"pwned"})
    target = tmp_path / "a" / "b"
    with pytest.raises(UnsafeArchiveError, match="refusing to extract"):
        safe_extract(archive, target, member="SMSSpamCollection")
    assert not target.exists()  # refused before anything was written, the safe entry included
    assert not list(tmp_path.rglob("escaped.txt"))


def test_zip_symlink_entry_is_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("SMSSpamCollection")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        safe_extract(archive, tmp_path / "out")


def test_unsafe_zip_falls_through_to_next_source(tmp_path, good_zip):
    evil = make_zip(tmp_path / "evil.zip", {"SMSSpamCollection": FIXTURE.read_bytes(), "../x": b"x"})
    assert download([evil, good_zip], tmp_path / "raw")["source"] == str(good_zip)


def test_safe_extract_keeps_nested_member(tmp_path):
    archive = make_zip(tmp_path / "n.zip", {"folder/": b"", "folder/SMSSpamCollection": b"x", "readme": b"r"})
    [out] = safe_extract(archive, tmp_path / "out", member="SMSSpamCollection")
    assert out == (tmp_path / "out" / "folder" / "SMSSpamCollection").resolve() and out.read_bytes() == b"x"


def run_stage(name: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / f"{name}.py")], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_download_data_stage(tmp_path, good_zip):
    cfg = {"data": {"sources": [str(tmp_path / "absent.zip"), str(good_zip)], "sha256": FIXTURE_SHA256, "retries": 0}}
    (tmp_path / "params.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    proc = run_stage("download_data", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "data" / "raw" / "source.json").read_text())["source"] == str(good_zip)
    cfg["data"]["sources"] = [str(tmp_path / "absent.zip")]
    (tmp_path / "params.yaml").write_text(json.dumps(cfg))
    proc = run_stage("download_data", tmp_path)
    assert proc.returncode == 1 and "error: could not fetch" in proc.stderr and "Traceback" not in proc.stderr
