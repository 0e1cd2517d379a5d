"""gpt2lab serve: MLflow's scoring app behind a guard that bounds memory, time and shutdown."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from gpt2lab.inference import TEXT_COLUMN
from gpt2lab.server import INPUT_COLUMN, RequestGuard, non_string_message
from tests.helpers import MESSAGES, free_port, log_tiny_classifier, wait_until_serving


def test_the_http_column_is_the_python_apis():
    assert INPUT_COLUMN == TEXT_COLUMN


@pytest.mark.parametrize(
    "body, problem",
    [
        ({"inputs": {"text": ["ok", None]}}, "message 1 is null"),
        ({"inputs": ["ok", 5]}, "message 1 is int"),
        ({"instances": [{"text": "ok"}, {"text": ["a"]}]}, "message 1 is list"),
        ({"dataframe_records": [{"text": None}]}, "message 0 is null"),
        ({"dataframe_split": {"columns": ["id", "text"], "data": [[1, "ok"], [2, 3.5]]}}, "message 1 is float"),
        ({"inputs": {"text": ["ok", "", "emoji 😀"]}}, None),
        ({"dataframe_records": [{"message": "wrong column"}]}, "message 0 is null"),
        ({"something": "else"}, None),  # not a scoring format: MLflow answers it
    ],
)
def test_non_string_messages_are_found_in_every_format(body, problem):
    found = non_string_message(json.dumps(body).encode())
    assert (found is None) if problem is None else found.startswith(problem), found
    assert non_string_message(b"not json") is None  # MLflow's own 400 says why


def _call(app, body: bytes, chunks: int = 1, content_length: bool = True) -> tuple[int, bytes, list[bytes]]:
    """Run one POST /invocations through ``app``; (status, response body, the bodies the inner app read)."""
    received: list[dict] = []
    parts = [body[i * len(body) // chunks : (i + 1) * len(body) // chunks] for i in range(chunks)]
    messages = [{"type": "http.request", "body": p, "more_body": i < chunks - 1} for i, p in enumerate(parts)]
    sent: list[dict] = []

    async def receive():
        message = messages.pop(0)
        received.append(message)
        return message

    async def send(message):
        sent.append(message)

    headers = [(b"content-type", b"application/json")]
    if content_length:
        headers.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "method": "POST", "path": "/invocations", "headers": headers}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"), received


def test_the_guard_refuses_large_and_non_string_requests_and_passes_the_rest():
    seen: list[bytes] = []

    async def inner(scope, receive, send):
        message = await receive()
        seen.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = RequestGuard(inner, max_bytes=1000)
    big = json.dumps({"inputs": {"text": ["x" * 2000]}}).encode()
    status, answer, read = _call(guard, big)
    assert status == 413 and read == [] and seen == []  # refused by Content-Length: not one byte read
    status, answer, read = _call(guard, big, chunks=8, content_length=False)
    assert status == 413 and len(read) < 8 and json.loads(answer)["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    status, answer, _ = _call(guard, json.dumps({"inputs": {"text": [None]}}).encode())
    assert status == 400 and "message 0 is null" in json.loads(answer)["message"] and seen == []
    fine = json.dumps({"inputs": {"text": ["hello", "see you"]}}).encode()
    status, answer, _ = _call(guard, fine, chunks=3, content_length=False)
    assert (status, answer, seen) == (200, b"ok", [fine])  # the whole body, replayed in one piece


def _rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` and its children (the server is one process here)."""
    return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("VmRSS:")).split()[1])  # fmt: skip


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> dict:
    return log_tiny_classifier(tmp_path_factory.mktemp("mlflow"))


def _start(logged: dict, tmp_path: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": logged["uri"], "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, "-m", "gpt2lab.cli", "serve", f"runs:/{logged['run_id']}/model", "--port", str(port), *args]
    log = tmp_path / "server.log"
    server = subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(server, url, log)
    return server, url


@pytest.mark.slow
def test_served_model_answers_refuses_and_stays_small(logged, tmp_path):
    server, url = _start(logged, tmp_path, "--max-request-mb", "1")
    try:
        texts = [*MESSAGES, "see you at lunch?"]
        answer = requests.post(f"{url}/invocations", json={"inputs": {"text": texts}}, timeout=60)
        assert answer.status_code == 200, answer.text
        want = logged["clf"].classify(texts)
        assert [p["label"] for p in answer.json()["predictions"]] == [w["label"] for w in want]
        null = requests.post(f"{url}/invocations", json={"inputs": {"text": ["ok", None]}}, timeout=60)
        assert null.status_code == 400 and "message 1 is null" in null.json()["message"]

        before = _rss_kib(server.pid)
        conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=60)
        conn.putrequest("POST", "/invocations")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(100 << 20))  # 100 MB announced
        conn.endheaders()
        try:
            conn.send(b'{"inputs": {"text": ["' + b"x" * (1 << 20))  # the first MB of it
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may already have answered and closed
        response = conn.getresponse()
        assert response.status == 413 and b"larger than" in response.read()
        conn.close()
        assert _rss_kib(server.pid) - before < 20 << 10, "the server read the large body into memory"
        assert requests.get(f"{url}/ping", timeout=5).status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_work_stops_at_the_timeout_and_sigterm_stops_the_server_within_seconds(logged, tmp_path):
    server, url = _start(logged, tmp_path, "--timeout", "1")
    texts = ["hi!"] * 400_000  # 3 MB of JSON: 12,500 batches, far more work than 1 s
    try:
        started = time.monotonic()
        answer = requests.post(f"{url}/invocations", json={"inputs": {"text": texts}}, timeout=120)
        assert answer.status_code == 504 and time.monotonic() - started < 30
        # The work itself stopped too (not only the answer): the model said so in the log.
        deadline = time.monotonic() + 30
        while b"classification stopped after" not in (tmp_path / "server.log").read_bytes():
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.2)
        # A request in flight, then SIGTERM: the server is gone within seconds, not after the work.
        threading.Thread(
            target=lambda: requests.post(f"{url}/invocations", json={"inputs": {"text": texts}}, timeout=120),
            daemon=True,
        ).start()
        time.sleep(1.0)
        sent = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        assert time.monotonic() - sent < 10, "SIGTERM took too long"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
