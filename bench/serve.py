"""Serving under load: ``mlflow models serve`` of the spam classifier with concurrent clients.

Logs the classifier (``--model``; by default a tiny random one made here) as an MLflow model
into a temporary SQLite store, starts ``mlflow models serve --env-manager local`` on a free
loopback port, and runs ``--clients`` threads that each POST real SMS messages (``--batch``
per request) for ``--seconds``. Prints requests/s, messages/s and latency percentiles per
run; asserts nothing (tests/test_serving_load.py checks the answers under the same load).

``GPT2LAB_LOAD_SECONDS`` sets the default duration (30 s), e.g. to shorten a CI run.

    python bench/serve.py                                  # tiny random classifier, 8 clients, 30 s
    python bench/serve.py --model models/classifier --clients 1 4 8 --seconds 20
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

READY_TIMEOUT_S = 180  # the server imports torch and loads the model before it answers /ping
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sms_small.tsv"


def default_seconds() -> float:
    return float(os.environ.get("GPT2LAB_LOAD_SECONDS", 30))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_classifier(classifier_dir: Path, base_dir: Path | None, root: Path) -> tuple[str, str]:
    """Log the classifier into a fresh SQLite store under ``root``; ``(tracking URI, model URI)``."""
    import mlflow

    from gpt2lab.serving import log_model

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("serve-load", artifact_location=(root / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    log_model(classifier_dir, base_dir, run_id=run_id, tracking_uri=uri)
    return uri, f"runs:/{run_id}/model"


@contextlib.contextmanager
def served(model_uri: str, tracking_uri: str, log_file: Path, workers: int = 1) -> Iterator[str]:
    """``mlflow models serve`` on a free loopback port; yields its base URL once /ping answers.

    The server runs in its own process group, killed on exit whatever happened (it starts a
    uvicorn worker of its own, so the whole group is signalled).
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bin_dir = os.path.dirname(sys.executable)  # the server runs `uvicorn` from the environment's bin
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "--host", "127.0.0.1", "-p", str(port), "--workers", str(workers)]  # fmt: skip
    with open(log_file, "wb") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"server exited ({server.returncode}):\n{log_file.read_text()[-3000:]}")
                with contextlib.suppress(requests.ConnectionError):
                    if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server did not answer /ping in {READY_TIMEOUT_S} s")
                time.sleep(0.5)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)


@dataclass
class LoadResult:
    """What the clients saw: one latency per answered request, and every error."""

    clients: int
    seconds: float
    messages_per_request: list[int] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    per_client: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.latencies_s)

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000) if self.latencies_s else float("nan")


Check = Callable[[int, list[dict]], str | None]


def run_load(
    url: str, bodies: Sequence[list[str]], clients: int, seconds: float, check: Check | None = None
) -> LoadResult:
    """``clients`` threads POST ``bodies`` (each a list of messages) round-robin for ``seconds``.

    ``check(body index, predictions)`` returns a problem or None; non-200 answers, exceptions and
    problems are recorded as errors. A client that errs goes on, so one failure does not hide others.
    """
    result = LoadResult(clients, seconds, per_client=[0] * clients)
    lock = threading.Lock()
    start = threading.Barrier(clients)
    deadline: list[float] = []

    def client(k: int) -> None:
        with requests.Session() as session:
            start.wait()
            with lock:
                if not deadline:
                    deadline.append(time.monotonic() + seconds)
            i = k  # clients start at different bodies
            while time.monotonic() < deadline[0]:
                body = {"inputs": {"text": bodies[i % len(bodies)]}}
                t0 = time.perf_counter()
                try:
                    answer = session.post(f"{url}/invocations", json=body, timeout=120)
                    elapsed = time.perf_counter() - t0
                    problem = None if answer.status_code == 200 else f"HTTP {answer.status_code}: {answer.text[:200]}"
                    if problem is None and check is not None:
                        problem = check(i % len(bodies), answer.json()["predictions"])
                except (requests.RequestException, ValueError, KeyError) as err:
                    elapsed, problem = time.perf_counter() - t0, f"{type(err).__name__}: {err}"
                with lock:
                    if problem is None:
                        result.latencies_s.append(elapsed)
                        result.messages_per_request.append(len(body["inputs"]["text"]))
                        result.per_client[k] += 1
                    else:
                        result.errors.append(f"client {k}, body {i % len(bodies)}: {problem}")
                i += clients

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 300)  # a request may still be in flight at the deadline
    return result


def request_bodies(texts: Sequence[str], batch: int) -> list[list[str]]:
    """Consecutive groups of ``batch`` messages (the last group may be shorter)."""
    return [list(texts[i : i + batch]) for i in range(0, len(texts), batch)]


def real_messages(path: str | None) -> list[str]:
    """SMS texts: a prepared split CSV, a collection TSV, or (default) the small collection in tests/fixtures."""
    from gpt2lab.dataset import parse_collection, read_split

    if path is None:
        return parse_collection(FIXTURE).Text.tolist()
    return (read_split(path) if path.endswith(".csv") else parse_collection(path)).Text.tolist()


def tiny_classifier(folder: Path) -> tuple[Path, Path]:
    """A random 2-layer GPT-2 base and a LoRA classifier on it: serving cost without a trained model."""
    import torch

    from gpt2lab.classifier import build_classifier
    from gpt2lab.classifier_io import save_classifier
    from gpt2lab.lora import LoRAConfig
    from gpt2lab.params import ModelParams, WeightsParams
    from gpt2lab.weights import fetch_weights

    lora = LoRAConfig(rank=4, alpha=8.0)
    base = fetch_weights(ModelParams(n_layer=2, n_head=4, n_embd=32, n_ctx=64), WeightsParams(source="random"), 1,
                         folder / "base")  # fmt: skip
    torch.manual_seed(1)
    model = build_classifier(base, "lora", lora)
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.3)  # both labels occur
    return save_classifier(model, folder / "classifier", mode="lora", base_dir=base, lora=lora), base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="trained classifier folder (default: a tiny random one)")
    parser.add_argument("--base", default=None, help="its base checkpoint (default: the one it was trained on)")
    parser.add_argument("--clients", type=int, nargs="+", default=[8], help="concurrent clients (several: a run each)")
    parser.add_argument("--seconds", type=float, default=default_seconds(), help="per run (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="messages per request (default: %(default)s)")
    parser.add_argument("--messages", default=None, help="split CSV or collection TSV (default: tests/fixtures)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of the server (default: 1)")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    texts = real_messages(args.messages)
    bodies = request_bodies(texts, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, base = (Path(args.model), args.base) if args.model else tiny_classifier(root / "models")
        tracking_uri, model_uri = log_classifier(Path(model), Path(base) if base else None, root)
        print(f"model {args.model or 'tiny random (2 layers, width 32)'}; {len(texts)} messages, {args.batch} per "
              f"request; server: {args.workers} worker(s); {os.cpu_count()} CPUs")  # fmt: skip
        header = (f"{'clients':>7} {'seconds':>7} {'requests':>8} {'req/s':>7} {'msg/s':>7} {'p50 ms':>8} "
                  f"{'p95 ms':>8} {'p99 ms':>8} {'errors':>6}")  # fmt: skip
        with served(model_uri, tracking_uri, root / "server.log", workers=args.workers) as url:
            run_load(url, bodies[:4], 1, 2.0)  # warm-up: first requests pay for lazy initialisation
            print(header + "\n" + "-" * len(header))
            for clients in args.clients:
                r = run_load(url, bodies, clients, args.seconds)
                print(f"{clients:>7} {r.seconds:>7.0f} {r.requests:>8} {r.requests / r.seconds:>7.1f} "
                      f"{sum(r.messages_per_request) / r.seconds:>7.1f} {r.percentile_ms(50):>8.1f} "
                      f"{r.percentile_ms(95):>8.1f} {r.percentile_ms(99):>8.1f} {len(r.errors):>6}")  # fmt: skip
                for error in r.errors[:5]:
                    print(f"  error: {error}")


if __name__ == "__main__":
    main()
