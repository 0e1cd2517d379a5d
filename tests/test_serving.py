"""The classifier as an MLflow pyfunc model: logged from code with safetensors weights, loaded, served."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from gpt2lab.dataset import parse_collection
from gpt2lab.inference import Classifier
from gpt2lab.serving import SETTINGS_ENV, pip_requirements
from tests.helpers import MESSAGES, free_port, log_tiny_classifier, wait_until_serving

FIXTURE = Path(__file__).parent / "fixtures" / "sms_small.tsv"


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> dict:
    """A classifier logged into a fresh SQLite store (artifacts beside it) as run <id>'s `model`."""
    before = mlflow.get_tracking_uri()
    logged = log_tiny_classifier(tmp_path_factory.mktemp("mlflow"))
    assert mlflow.get_tracking_uri() == before  # the caller's store is left as it was
    return logged


@pytest.fixture
def store(logged):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(logged["uri"])
    yield logged
    mlflow.set_tracking_uri(previous)


def test_logged_as_code_with_safetensors_weights(store, tmp_path):
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{store['run_id']}/model", dst_path=str(tmp_path)))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".bin"))], "nothing pickled"
    assert {"serving_model.py", "code/gpt2lab/serving.py", "requirements.txt", "input_example.json"} <= files
    weights = sorted(f for f in files if f.endswith(".safetensors"))
    # Only what was trained: the base is stored once per sha256 (gpt2lab.basestore), referenced by its hash.
    assert weights == ["artifacts/classifier/adapter.safetensors", "artifacts/classifier/head.safetensors"]
    assert not any(f.endswith(".tiktoken") for f in files)
    meta = mlflow.models.Model.load(str(local / "MLmodel"))
    settings = json.loads((local / "artifacts" / "settings.json").read_text())  # not MLflow's model config
    assert settings["base_sha256"] == store["clf_base_sha256"] and settings["base_tracking_uri"] == store["uri"]
    flavor = meta.flavors["python_function"]
    assert "config" not in flavor  # MLflow would log a model config as run params
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    assert meta.signature.inputs.to_dict() == [{"type": "string", "name": "text", "required": True}]
    assert meta.signature.outputs.to_dict() == [
        {"type": "string", "name": "label", "required": True},
        {"type": "double", "name": "spam_probability", "required": True},
    ]
    example = json.loads((local / "input_example.json").read_text())
    assert example["columns"] == ["text"] and len(example["data"]) == 2
    requirements = (local / "requirements.txt").read_text().split()
    assert requirements == pip_requirements()
    assert "torch==2.13.0" in requirements and all("==" in r and "+" not in r for r in requirements)


def test_pyfunc_answers_equal_the_python_api(store):
    model = mlflow.pyfunc.load_model(f"runs:/{store['run_id']}/model")
    out = model.predict(pd.DataFrame({"text": MESSAGES}))
    assert list(out.columns) == ["label", "spam_probability"]
    want = store["clf"].classify(MESSAGES)
    assert out.label.tolist() == [w["label"] for w in want]
    assert out.spam_probability.tolist() == pytest.approx([w["spam_probability"] for w in want], rel=1e-6, abs=1e-9)
    with pytest.raises(mlflow.exceptions.MlflowException, match="not a string"):
        model.predict(pd.DataFrame({"text": ["fine", None]}))


def test_the_logged_model_downloads_and_exports_to_transformers(store, tmp_path, monkeypatch, capsys):
    from transformers import GPT2ForSequenceClassification

    from gpt2lab.cli import main
    from gpt2lab.serving import ModelDownloadError, download_model

    classifier, base = download_model(f"runs:/{store['run_id']}/model", tmp_path / "dl")
    assert Classifier.load(classifier, base).classify(MESSAGES) == store["clf"].classify(MESSAGES)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])  # the CLI's store, as for the pipeline
    assert main(["export", "hf", f"runs:/{store['run_id']}/model", str(tmp_path / "hf")]) == 0
    hf = GPT2ForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.id2label == {0: "ham", 1: "spam"}
    assert main(["export", "peft", f"runs:/{store['run_id']}/model", str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    with pytest.raises(ModelDownloadError, match="runs:/no-such-run/model: cannot download the MLflow model"):
        download_model("runs:/no-such-run/model", tmp_path / "none")
    capsys.readouterr()
    assert main(["export", "hf", "runs:/no-such-run/model", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err.startswith("error: runs:/no-such-run/model: cannot download")


def test_the_served_model_runs_int8_when_its_settings_say_so(store, monkeypatch):
    """The settings' precision (``log_model(precision=...)``, or overridden where it is loaded) picks int8 weights."""
    monkeypatch.setenv(SETTINGS_ENV, json.dumps({"precision": "int8"}))
    model = mlflow.pyfunc.load_model(f"runs:/{store['run_id']}/model")
    got = model.predict(pd.DataFrame({"text": MESSAGES})).spam_probability.tolist()
    int8 = Classifier.load(*store["dirs"], precision="int8").predict_proba(MESSAGES)
    assert got == pytest.approx(int8.tolist(), rel=1e-6, abs=1e-9)
    assert got == pytest.approx(store["clf"].predict_proba(MESSAGES).tolist(), abs=0.05)  # int8's tolerance


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(logged, tmp_path):
    import requests

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bin_dir = os.path.dirname(sys.executable)  # the server runs `uvicorn` from the environment's bin
    env = {**os.environ, "MLFLOW_TRACKING_URI": logged["uri"], "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_DISABLE_TELEMETRY": "true"}  # fmt: skip
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{logged['run_id']}/model",
           "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)]  # fmt: skip
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_serving(server, url, tmp_path / "server.log")

        def post(body: str | bytes) -> requests.Response:
            return requests.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"},
                                 timeout=120)  # fmt: skip

        texts = MESSAGES + parse_collection(FIXTURE).Text.tolist()[:12]  # SMS from the collection too
        want = logged["clf"].classify(texts)
        for body in (
            {"dataframe_records": [{"text": t} for t in texts]},
            {"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}},
            {"inputs": {"text": texts}},
        ):
            answer = post(json.dumps(body))
            assert answer.status_code == 200, answer.text
            got = answer.json()["predictions"]
            assert [g["label"] for g in got] == [w["label"] for w in want]
            assert [g["spam_probability"] for g in got] == pytest.approx([w["spam_probability"] for w in want], rel=1e-6)
        assert post(json.dumps({"inputs": {"text": []}})).json() == {"predictions": []}

        # Bad input: an answer in the 4xx range that says why, and the server keeps serving.
        bad = [
            b'{"dataframe_records": [{"text": "unterminated',  # malformed JSON
            b"not json at all",
            json.dumps([{"text": "a list, not an object"}]),
            json.dumps({"dataframe_records": [{"text": 5}]}),  # a number
            json.dumps({"dataframe_records": [{"text": None}]}),  # null
            json.dumps({"dataframe_split": {"columns": ["text"], "data": [[["nested"]]]}}),
            json.dumps({"dataframe_records": [{"message": "wrong column"}]}),
            json.dumps({"inputs": {"text": ["lone surrogate \ud800"]}}),  # not encodable as UTF-8
        ]
        for body in bad:
            answer = post(body)
            assert 400 <= answer.status_code < 500, (body, answer.status_code, answer.text)
            assert answer.json()["message"]
        # MLflow casts `inputs` to the signature's type: a number there is read as its digits.
        digits = post(json.dumps({"inputs": {"text": [5]}})).json()["predictions"]
        assert digits[0]["spam_probability"] == pytest.approx(logged["clf"].predict_proba(["5"])[0], rel=1e-6)
        assert requests.get(f"{url}/ping", timeout=5).status_code == 200
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the uvicorn worker it started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()
