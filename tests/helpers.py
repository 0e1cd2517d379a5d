"""Helpers shared by several test files: a tiny saved classifier, a training step, one-line errors,
and Hypothesis strategies for text."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from gpt2lab.classifier import SpamClassifier, build_classifier
from gpt2lab.classifier_io import save_classifier
from gpt2lab.lora import LoRAConfig
from gpt2lab.params import ModelParams, WeightsParams
from gpt2lab.tokenizer import EOT_TEXT
from gpt2lab.weights import fetch_weights

TINY_PARAMS = ModelParams(n_layer=2, n_head=4, n_embd=32, n_ctx=64)
LORA = LoRAConfig(rank=4, alpha=8.0)
# Real-looking messages, with the awkward cases: empty, emoji, other scripts, longer than the context.
MESSAGES = [
    "You won $1000! Claim now.",
    "see you at lunch?",
    "",
    "URGENT! Your mobile No. 07808726822 was awarded a £2,000 Bonus Caller Prize. Call 09066368327",
    "😀😂 party tonight? 🎉",
    "Привет, как дела? 你好 مرحبا",
    "FREE entry into our weekly competition, text WIN to 80086 now " * 20,
]


def make_classifier(folder: Path, seed: int = 1) -> tuple[Path, Path]:
    """(classifier folder, base folder): a random tiny GPT-2 base and a LoRA classifier saved on it.

    The adapters and the head get random values (as if trained), so both labels occur.
    """
    base = fetch_weights(TINY_PARAMS, WeightsParams(source="random"), seed, folder / "base")
    torch.manual_seed(seed)
    model = build_classifier(base, "lora", LORA)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0.0, 0.5)
        model.head.weight.normal_(0.0, 0.3)
    return save_classifier(model, folder / "classifier", mode="lora", base_dir=base, lora=LORA), base


def adamw_step(model: SpamClassifier) -> None:
    """One AdamW step on a random batch (large lr so every trained tensor visibly moves)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (4, 9), generator=g)
    lengths = torch.tensor([9, 3, 5, 1])
    F.cross_entropy(model(ids, lengths), torch.tensor([0, 1, 1, 0])).backward()
    opt.step()


def compiled_calls(fn: Callable[[], object]) -> tuple[int, int]:
    """What ``fn()`` ran of torch.compile'd code, from the profiler: (compiled graph calls, of them
    through Dynamo's checks)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    counts = {event.key: event.count for event in prof.key_averages()}
    through_dynamo = sum(n for key, n in counts.items() if key.startswith("Torch-Compiled Region"))
    return sum(n for key, n in counts.items() if key.startswith("## Call CompiledFxGraph")), through_dynamo


def one_error_line(err: str) -> str:
    """The single ``error: ...`` line of ``err`` (log lines such as warnings may come before it)."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert err.rstrip("\n").splitlines()[-1] == errors[0], err  # nothing after it
    return errors[0]


# Hypothesis: how many examples, and text of every kind (emoji, other scripts, the EOS marker, ...).
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NO_SURROGATES = st.characters(exclude_categories=("Cs",))
TEXT = st.one_of(
    st.text(NO_SURROGATES, max_size=200),
    st.lists(st.sampled_from(["😀", "👍🏽", "👨‍👩‍👧", "東京", "Привет", "مرحبا", "\u200b", "\r\n", " ", "\t", EOT_TEXT,
                              "é", "e\u0301"]), max_size=30).map("".join),
)  # fmt: skip


CORRUPTIONS = ("flip", "truncate", "swap")


def corrupt(path: Path, kind: str, other: Path) -> None:
    """Damage ``path``: 64 bytes flipped in place (the size kept), cut to half, or replaced by ``other``."""
    data = bytearray(path.read_bytes())
    if kind == "flip":
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
        path.write_bytes(bytes(data))
    elif kind == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        path.write_bytes(other.read_bytes())


def log_tiny_classifier(root: Path) -> dict:
    """A tiny classifier logged into a fresh SQLite store under ``root`` (artifacts beside it) as run <id>'s `model`."""
    import mlflow

    from gpt2lab.checkpoint import read_config
    from gpt2lab.inference import Classifier
    from gpt2lab.serving import log_model

    clf_dir, base = make_classifier(root / "models")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("serving-test", artifact_location=(root / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    info = log_model(clf_dir, base, run_id=run_id, tracking_uri=uri)
    return {"root": root, "uri": uri, "run_id": run_id, "info": info, "clf": Classifier.load(clf_dir, base),
            "dirs": (clf_dir, base), "clf_base_sha256": read_config(base)["sha256"]}  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(server, url: str, log: Path, timeout_s: float = 180, path: str = "/ping") -> None:
    """Poll ``url + path`` until it answers 200; fail with the server's log if it dies or takes too long."""
    import time

    import requests

    deadline = time.monotonic() + timeout_s  # the server imports torch and loads the model first
    while True:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            if requests.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, f"server did not answer {path} in time"
        time.sleep(0.5)


class MlflowServer:
    """``mlflow server`` as a team runs it (``make server``): a database backend store, artifacts proxied
    by the server from ``artifacts``; light (no job runner). Use as a context manager; ``stop()`` kills it."""

    def __init__(self, backend_uri: str, artifacts: Path, log: Path, workers: int = 2) -> None:
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "mlflow", "server", "--workers", str(workers), "--host", "127.0.0.1",
                    "--port", str(self.port), "--backend-store-uri", backend_uri,
                    "--artifacts-destination", str(artifacts)]  # fmt: skip
        self.log = log
        self.proc = None

    def __enter__(self) -> MlflowServer:
        import os
        import subprocess
        import time

        import requests

        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 180
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if requests.get(f"{self.url}/health", timeout=2).ok:
                    return self
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer /health in time"
            time.sleep(1)

    def stop(self) -> None:
        import os
        import signal
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)

    def __exit__(self, *exc: object) -> None:
        self.stop()
