"""The served classifier under concurrent load: every answer is right, none fails, the server survives.

Eight clients POST real SMS messages to ``mlflow models serve`` for ``GPT2LAB_LOAD_SECONDS``
(15 s by default here); each answer must be HTTP 200 with the labels (and probabilities) the
Python API gives for the same messages. The harness is bench/serve.py's, which reports speed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import requests

from gpt2lab.inference import Classifier
from tests.helpers import MESSAGES, make_classifier

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 8


def _bench():
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_concurrent_clients_get_the_python_api_answers(tmp_path):
    bench = _bench()
    seconds = float(os.environ.get("GPT2LAB_LOAD_SECONDS", 15))
    clf_dir, base = make_classifier(tmp_path / "models")
    clf = Classifier.load(clf_dir, base)
    texts = bench.real_messages(None) + MESSAGES  # the SMS fixture, then emoji, other scripts, empty, too long
    bodies = [*bench.request_bodies(texts, 1), *bench.request_bodies(texts, 3), texts]  # 1, 3 and all per request
    want = [clf.classify(body) for body in bodies]
    assert {w["label"] for answers in want for w in answers} == {"spam", "ham"}

    def check(index: int, got: list[dict]) -> str | None:
        expected = want[index]
        if [g["label"] for g in got] != [w["label"] for w in expected]:
            return f"labels {[g['label'] for g in got]} != {[w['label'] for w in expected]}"
        worst = max(abs(g["spam_probability"] - w["spam_probability"]) for g, w in zip(got, expected))
        return None if worst <= 1e-5 else f"probability off by {worst:.2e}"

    tracking_uri, model_uri = bench.log_classifier(clf_dir, base, tmp_path)
    with bench.served(model_uri, tracking_uri, tmp_path / "server.log") as url:
        result = bench.run_load(url, bodies, CLIENTS, seconds, check)
        assert requests.get(f"{url}/ping", timeout=5).status_code == 200  # still serving afterwards
    assert result.errors == []
    assert min(result.per_client) > 0, result.per_client  # every client got answers, none was starved
    assert result.requests >= CLIENTS
