"""Serving a logged classifier over HTTP with bounds: MLflow's scoring app behind a request guard.

``gpt2lab serve MODEL_URI`` runs MLflow's own scoring app (``/invocations``, ``/ping``,
``/health``, ``/version``; the formats ``mlflow models serve`` takes) and adds what it lacks:

- a request larger than ``max_request_bytes`` is answered 413 before its body is read, so the
  server never holds more than that;
- ``null``, a number or a list among the messages is answered 400 (MLflow would first cast it
  to the text "None" or its digits);
- a request's work stops after ``timeout_s`` (MLflow answers 504 then, and the model stops at
  its next batch), and SIGTERM or Ctrl-C stops the server within seconds, in-flight work
  included.

This module imports neither torch nor mlflow until :func:`serve` runs.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

INPUT_COLUMN = "text"  # the served model's input column (gpt2lab.inference.TEXT_COLUMN)
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"  # MLflow's; 60 s when unset
# JSON settings over the ones logged with a model, where it is loaded or served, e.g. {"precision": "int8"}.
SETTINGS_ENV = "GPT2LAB_SERVING_SETTINGS"
MAX_REQUEST_BYTES = 4 << 20  # thousands of SMS per request
SHUTDOWN_GRACE_S = 3.0
STOPPING = threading.Event()  # set when the server is told to stop: in-flight work ends at its next batch

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def non_string_message(body: bytes) -> str | None:
    """Why a JSON scoring request holds a message that is not a string, or None (not JSON: MLflow says why)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if "dataframe_split" in data:
        split = data["dataframe_split"]
        if not isinstance(split, dict) or INPUT_COLUMN not in (split.get("columns") or []):
            return None
        column = split["columns"].index(INPUT_COLUMN)
        values = [row[column] if isinstance(row, list) and len(row) > column else None for row in split.get("data", [])]
    else:
        values = data.get("dataframe_records", data.get("inputs", data.get("instances")))
        if isinstance(values, dict):
            values = values.get(INPUT_COLUMN)
        if not isinstance(values, list):
            return None
        values = [v.get(INPUT_COLUMN) if isinstance(v, dict) else v for v in values]
    for i, value in enumerate(values):
        if not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            return f"message {i} is {kind} ({json.dumps(value)[:40]}), not a string (column {INPUT_COLUMN!r})"
    return None


class RequestGuard:
    """ASGI middleware in front of MLflow's scoring app, for ``POST /invocations``.

    A body larger than ``max_bytes`` gets 413 before it is read (by ``Content-Length``, or as
    soon as a chunked body passes the limit), so the server never holds more than that; a JSON
    body with a message that is not a string gets 400. Anything else goes to MLflow unchanged.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != "/invocations" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        too_big = f"request larger than {self.max_bytes} bytes; send fewer messages per request"
        if int(headers.get(b"content-length", b"0") or 0) > self.max_bytes:
            return await _answer(send, 413, "REQUEST_LIMIT_EXCEEDED", too_big)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await _answer(send, 413, "REQUEST_LIMIT_EXCEEDED", too_big)
        body = b"".join(chunks)
        if b"json" in headers.get(b"content-type", b"") and (problem := non_string_message(body)):
            return await _answer(send, 400, "BAD_REQUEST", problem)
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def _answer(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error_code": code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def serve(
    model_uri: str,
    host: str = "127.0.0.1",
    port: int = 5001,
    *,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    timeout_s: float = 60.0,
    model_config: dict[str, Any] | None = None,
) -> None:
    """Serve the MLflow model at ``model_uri`` (``runs:/...``, ``models:/...`` or a folder) until stopped.

    ``model_config`` overrides keys of the settings logged with the model (``precision``,
    ``device``, ``batch_size``, ``threshold``), through :data:`SETTINGS_ENV`.

    MLflow's scoring app (``/invocations``, ``/ping``, ``/health``, ``/version``) behind
    :class:`RequestGuard`; a request's work stops after ``timeout_s`` (the app answers 504 then).
    SIGTERM or Ctrl-C stops accepting requests, ends in-flight work at its next batch and exits
    within :data:`SHUTDOWN_GRACE_S` seconds.
    """
    import mlflow
    import uvicorn
    from mlflow.pyfunc import scoring_server

    os.environ[TIMEOUT_ENV] = str(int(timeout_s))  # read by MLflow's app (504) and by predict's deadline
    if model_config:
        os.environ[SETTINGS_ENV] = json.dumps({**json.loads(os.environ.get(SETTINGS_ENV) or "{}"), **model_config})
    model = mlflow.pyfunc.load_model(model_uri)
    app = RequestGuard(scoring_server.init(model), max_request_bytes)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            STOPPING.set()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=SHUTDOWN_GRACE_S, log_level="info")
    log.info("serving %s on http://%s:%d (requests up to %d bytes, %g s)", model_uri, host, port, max_request_bytes,
             timeout_s)  # fmt: skip
    Server(config).run()
