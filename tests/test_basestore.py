"""Base checkpoints stored once per sha256 in the tracking store: a second model adds only what was
trained; loading finds the base in the cache or the store, verified, or says where it looked."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from gpt2lab.basestore import EXPERIMENT, SHA_TAG, BaseNotFoundError, cache_path, resolve_base
from gpt2lab.checkpoint import read_config
from gpt2lab.inference import Classifier
from gpt2lab.serving import log_model
from tests.helpers import MESSAGES, log_tiny_classifier, make_classifier


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> dict:
    """Two classifiers on one base logged into one SQLite store, the bytes each added measured."""
    logged = log_tiny_classifier(tmp_path_factory.mktemp("store"))
    artifacts = logged["root"] / "artifacts"
    after_first = _bytes(artifacts)
    clf_dir, base = logged["dirs"]
    client = mlflow.MlflowClient(tracking_uri=logged["uri"])
    run_id = client.create_run(client.get_experiment_by_name("serving-test").experiment_id).info.run_id
    second = log_model(clf_dir, base, run_id=run_id, tracking_uri=logged["uri"])
    logged.update(second_run=run_id, second=second, first_bytes=after_first, added=_bytes(artifacts) - after_first)
    return logged


def test_the_second_model_on_one_base_adds_only_what_was_trained(two_models):
    clf_dir, base = two_models["dirs"]
    base_bytes, trained_bytes = _bytes(base), _bytes(clf_dir)
    # The first holds the base once; the second adds the adapter, the head, code and small files only.
    assert two_models["first_bytes"] > base_bytes
    assert two_models["added"] < two_models["first_bytes"] - base_bytes + trained_bytes
    assert two_models["added"] < base_bytes / 4, (two_models["added"], base_bytes)
    client = mlflow.MlflowClient(tracking_uri=two_models["uri"])
    bases = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert len(bases) == 1 and bases[0].data.tags[SHA_TAG] == read_config(base)["sha256"]


def test_a_fresh_machine_fetches_the_base_from_the_store_and_verifies_it(two_models, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))  # nothing cached: as on another machine
    sha = two_models["clf_base_sha256"]
    mlflow.set_tracking_uri(two_models["uri"])  # reset after the test (conftest)
    model = mlflow.pyfunc.load_model(two_models["second"].model_uri)
    got = model.predict(pd.DataFrame({"text": MESSAGES}))
    want = two_models["clf"].classify(MESSAGES)
    assert got.label.tolist() == [w["label"] for w in want]
    assert got.spam_probability.tolist() == pytest.approx([w["spam_probability"] for w in want], rel=1e-6)
    assert (cache_path(sha) / "model.safetensors").is_file()
    assert (tmp_path / "cache" / "tiktoken" / "gpt2.tiktoken").is_file(), "the ranks come with the base: no download"


def test_a_missing_or_different_base_is_one_error_naming_sha_and_places(two_models, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sha = two_models["clf_base_sha256"]
    client = mlflow.MlflowClient(tracking_uri=two_models["uri"])
    base_run = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])[0]
    stored = Path(base_run.info.artifact_uri.removeprefix("file://")) / "base"
    reference = {"sha256": sha, "run_id": base_run.info.run_id, "tracking_uri": two_models["uri"]}

    backup = tmp_path / "backup"
    shutil.copytree(stored, backup)
    weights = stored / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + bytes(64))  # same size, other bytes
    try:
        with pytest.raises(BaseNotFoundError) as err:
            resolve_base(reference)
        message = str(err.value)
        assert "\n" not in message and sha in message
        assert (
            str(cache_path(sha)) in message and f"runs:/{base_run.info.run_id}/base in {two_models['uri']}" in message
        )
        assert "corrupted or replaced" in message

        shutil.rmtree(stored)
        with pytest.raises(BaseNotFoundError, match=f"base checkpoint sha256 {sha} not found"):
            resolve_base({**reference, "tracking_uri": f"sqlite:///{tmp_path / 'elsewhere.db'}"})
        assert not (tmp_path / "elsewhere.db").exists(), "looking must not create a store"
    finally:
        shutil.rmtree(stored, ignore_errors=True)
        shutil.copytree(backup, stored)
    assert resolve_base(reference) == cache_path(sha)  # restored: found and verified


def test_share_base_false_embeds_the_base(tmp_path):
    clf_dir, base = make_classifier(tmp_path / "models")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("embedded", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    log_model(clf_dir, base, run_id=run_id, tracking_uri=uri, share_base=False)
    assert list((tmp_path / "artifacts").rglob("base/model.safetensors"))
    assert client.get_experiment_by_name(EXPERIMENT) is None


def test_through_a_team_server_on_postgres(postgres, tmp_path, monkeypatch):
    """The same through `mlflow server` on PostgreSQL with proxied artifacts: the base is uploaded once,
    and a machine with an empty cache gets it back from the server, verified."""
    from tests.helpers import MlflowServer

    clf_dir, base = make_classifier(tmp_path / "models")
    with MlflowServer(postgres, tmp_path / "artifacts", tmp_path / "server.log") as server:
        client = mlflow.MlflowClient(tracking_uri=server.url)
        experiment = client.create_experiment(f"team-{tmp_path.name}")
        infos = []
        for _ in range(2):
            run_id = client.create_run(experiment).info.run_id
            infos.append(log_model(clf_dir, base, run_id=run_id, tracking_uri=server.url))
        sha = read_config(base)["sha256"]
        stored = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                    filter_string=f"tags.`{SHA_TAG}` = '{sha}'")  # fmt: skip
        assert len(stored) == 1 and stored[0].info.artifact_uri.startswith("mlflow-artifacts:")
        assert len(list((tmp_path / "artifacts").rglob("model.safetensors"))) == 1, "the base is stored once"
        monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "fresh"))
        mlflow.set_tracking_uri(server.url)
        got = mlflow.pyfunc.load_model(infos[1].model_uri).predict(pd.DataFrame({"text": MESSAGES}))
        assert (cache_path(sha) / "model.safetensors").is_file()
    want = Classifier.load(clf_dir, base).classify(MESSAGES)
    assert got.spam_probability.tolist() == pytest.approx([w["spam_probability"] for w in want], rel=1e-6)
