"""The Model Registry: versions, the champion alias, and models:/ and runs:/ URIs used from any directory."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from gpt2lab.cli import main
from gpt2lab.registry import RegistryError, promote, register, serve_command
from gpt2lab.tracking import TrackingError, project_store
from tests.helpers import MESSAGES, log_tiny_classifier, one_error_line

NAME = "gpt2lab-spam"


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> dict:
    logged = log_tiny_classifier(tmp_path_factory.mktemp("registry"))
    tags = {"test.f1": 0.5, "dvc.exp_name": "exp-a", "git.commit": "0" * 40, "base.pretrained": "false"}
    logged["versions"] = [register(logged["uri"], NAME, logged["info"], logged["run_id"], tags) for _ in range(2)]
    return logged


def test_each_registration_is_a_new_tagged_version(registered):
    assert [v.version for v in registered["versions"]] == ["1", "2"]
    client = mlflow.MlflowClient(tracking_uri=registered["uri"], registry_uri=registered["uri"])
    mv = client.get_model_version(NAME, "2")
    assert mv.run_id == registered["run_id"]
    assert mv.tags == {"test.f1": "0.5", "dvc.exp_name": "exp-a", "git.commit": "0" * 40, "base.pretrained": "false"}


def test_promote_moves_the_alias(registered):
    promote(registered["uri"], NAME, "1")
    assert promote(registered["uri"], NAME, "2", "champion").version == "2"
    client = mlflow.MlflowClient(tracking_uri=registered["uri"], registry_uri=registered["uri"])
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    with pytest.raises(RegistryError, match=r"has no version 9 in .* \(its versions: 1, 2\)"):
        promote(registered["uri"], NAME, "9")


def test_serve_command_names_the_store():
    assert serve_command("sqlite:////srv/team db/mlflow.db", "models:/gpt2lab-spam@champion") == (
        "MLFLOW_TRACKING_URI='sqlite:////srv/team db/mlflow.db' mlflow models serve -m models:/gpt2lab-spam@champion "
        "--env-manager local --port 5001"
    )


def _repo(folder: Path) -> Path:
    (folder / ".dvc").mkdir(parents=True)
    (folder / "params.yaml").write_text("tracking:\n  registered_model: gpt2lab-spam\n")
    return folder


def test_the_store_is_found_from_a_subfolder_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    repo = _repo(tmp_path / "repo")
    (repo / "deep" / "er").mkdir(parents=True)
    with pytest.raises(TrackingError, match="no MLflow store at .*mlflow.db yet: run the pipeline first"):
        project_store(repo / "deep" / "er")
    (repo / "mlflow.db").touch()
    assert project_store(repo / "deep" / "er")[0] == f"sqlite:///{repo / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrackingError, match="not inside a gpt2lab repository .* MLFLOW_TRACKING_URI is not set"):
        project_store()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example.org:5000")
    assert project_store()[0] == "http://mlflow.example.org:5000"


def test_cli_promotes_and_classifies_by_uri_from_outside_the_repository(registered, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    monkeypatch.chdir(outside)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    assert main(["promote", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"models:/{NAME}@champion -> version 1 (run {registered['run_id']}, dvc.exp_name exp-a")
    assert out[1] == "serve it: " + serve_command(registered["uri"], f"models:/{NAME}@champion")

    want = registered["clf"].classify(MESSAGES)
    for uri in (f"models:/{NAME}@champion", f"runs:/{registered['run_id']}/model"):
        assert main(["classify", "--json", "--model", uri, *MESSAGES]) == 0
        got = json.loads(capsys.readouterr().out)
        assert [g["label"] for g in got] == [w["label"] for w in want]
        assert [g["spam_probability"] for g in got] == pytest.approx([w["spam_probability"] for w in want], rel=1e-6)

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["classify", "--model", f"models:/{NAME}@champion", "hello"]) == 1
    assert "not inside a gpt2lab repository" in one_error_line(capsys.readouterr().err)
    assert main(["promote", "7"]) == 1
    assert not list(outside.iterdir()), "nothing (no stray mlflow.db) is written where the command runs"
