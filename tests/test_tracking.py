"""tracking.py against a real MLflow SQLite store: one run per execution, fail-fast, carry-over."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest
import yaml

from gpt2lab import tracking
from gpt2lab.tracking import Pipeline, TrackingError, md5_file, stage_run

ROOT = Path(__file__).resolve().parents[1]

# A pipeline shaped like the project's: prep -> train; gen on its own branch.
DVC_YAML = {
    "stages": {
        "prep": {
            "cmd": "python prep.py",
            "deps": ["prep.py"],
            "params": ["seed", "data"],
            "outs": ["out/prep", {"metrics/prep.json": {"cache": False}}],
        },
        "train": {
            "cmd": "python train.py",
            "deps": ["train.py", "out/prep"],
            "params": ["lora", "train"],
            "outs": ["out/model", {"metrics/train.json": {"cache": False}}, {"metrics/curve.csv": {"cache": False}}],
        },
        "gen": {
            "cmd": "python gen.py",
            "deps": ["gen.py"],
            "params": ["generate"],
            "outs": [{"metrics/gen.json": {"cache": False}}],
        },
    },
    "metrics": ["metrics/prep.json", "metrics/train.json", "metrics/gen.json"],
    "plots": [{"metrics/curve.csv": {"x": "step", "y": ["loss"]}}],
}


def _entry(repo: Path, name: str, raw: dict, out_dirs: dict[str, str] | None = None) -> dict:
    """A dvc.lock entry as DVC 3 writes it, for the repo's current files."""
    spec = DVC_YAML["stages"][name]
    out_dirs = out_dirs or {}

    def rec(path: str) -> dict:
        md5 = out_dirs.get(path) or md5_file(repo / path)
        return {"path": path, "hash": "md5", "md5": md5}

    outs = [tracking._out_path(o) for o in spec["outs"]]
    return {
        "cmd": spec["cmd"],
        "deps": [rec(d) for d in spec["deps"]],
        "params": {"params.yaml": {key: raw[key] for key in spec["params"]}},
        "outs": [rec(o) for o in outs],
    }


@pytest.fixture(scope="session")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module: creating one costs seconds of migrations."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_uri: str, request: pytest.FixtureRequest) -> Path:
    """A repo-shaped folder (.dvc, params.yaml, dvc.yaml, scripts) as the working directory."""
    (tmp_path / ".dvc").mkdir()
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tracking"]["experiment"] = f"test-{request.node.name}"  # one experiment per test, one store
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    for script in ("prep.py", "train.py", "gen.py"):
        (tmp_path / script).write_text(f"# {script}\n")
    (tmp_path / "metrics").mkdir()
    monkeypatch.chdir(tmp_path)
    for var in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(tracking.ENV_URI, store_uri)
    return tmp_path


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


def test_one_run_per_execution(repo: Path, store_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lark")
    with stage_run("prep") as run:
        (repo / "metrics/prep.json").write_text(json.dumps({"train": {"rows": 1045}, "note": "text"}))
    with stage_run("train") as run:
        assert run.log_curves({"step": [0, 50, 100], "train_loss": [0.9, 0.5, 0.3], "val_loss": [1.0, 0.6, 0.4]}) == 6
        run.log_curves([{"step": 0, "lr": 1e-4}, {"step": 50, "lr": 5e-5}])
        (repo / "metrics/train.json").write_text(json.dumps({"val_accuracy": 0.95}))
        (repo / "metrics/curve.csv").write_text("step,loss\n0,0.9\n")
    (runs,) = [_runs(store_uri, _experiment(repo))]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    r = runs[0]
    assert r.info.run_name == "brisk-lark" and r.info.status == "FINISHED"
    assert r.data.tags["dvc.exp_name"] == "brisk-lark"
    assert r.data.tags[tracking.STAGES_TAG] == "prep,train"
    assert r.data.params["lora.rank"] == "16" and r.data.params["seed"] == "123"
    assert json.loads(r.data.params["lora.targets"])[0] == "attn.c_attn"
    assert r.data.metrics == {"prep/train.rows": 1045.0, "train/val_accuracy": 0.95, "train_loss": 0.3,
                              "val_loss": 0.4, "lr": 5e-5}  # fmt: skip
    client = _client(store_uri)
    history = client.get_metric_history(r.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.9), (50, 0.5), (100, 0.3)]
    files = {f.path for f in client.list_artifacts(r.info.run_id)}
    assert files == {"metrics", "plots", "params.yaml"}
    assert {f.path for f in client.list_artifacts(r.info.run_id, "metrics")} == {"metrics/prep.json", "metrics/train.json"}
    assert {f.path for f in client.list_artifacts(r.info.run_id, "plots")} == {"plots/curve.csv"}

    # A stage that already logged into the newest run starts a new one (dvc repro -f) ...
    with stage_run("prep"):
        pass
    # ... and another experiment name is another run, even with the same params and code.
    monkeypatch.setenv("DVC_EXP_NAME", "quiet-owl")
    with stage_run("prep"):
        pass
    runs = _runs(store_uri, _experiment(repo))
    assert [x.info.run_name for x in runs] == ["brisk-lark", "brisk-lark", "quiet-owl"]
    assert len({x.data.tags[tracking.KEY_TAG] for x in runs}) == 2


def test_params_change_is_a_new_run(repo: Path, store_uri: str) -> None:
    with stage_run("prep"):
        pass
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["lora"]["rank"] = 4
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    with stage_run("train"):
        pass
    runs = _runs(store_uri, _experiment(repo))
    assert [x.data.params["lora.rank"] for x in runs] == ["16", "4"]
    assert all(x.info.run_name.startswith("repro-") for x in runs)


def test_failed_stage_marks_the_run_and_reraises(repo: Path, store_uri: str) -> None:
    with pytest.raises(ZeroDivisionError):
        with stage_run("train"):
            1 / 0
    (r,) = _runs(store_uri, _experiment(repo))
    assert r.info.status == "FAILED" and tracking.STAGES_TAG not in r.data.tags
    # The re-run after a fix joins the same execution's run: the stage never finished in it.
    with stage_run("train"):
        pass
    (r,) = _runs(store_uri, _experiment(repo))
    assert r.info.status == "FINISHED" and r.data.tags[tracking.STAGES_TAG] == "train"


def test_unreachable_server_fails_before_work(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv(tracking.ENV_URI, url)
    worked = []
    with pytest.raises(TrackingError, match=r"tracking server .* is unreachable .*tracking\.fallback_local: true"):
        with stage_run("train"):
            worked.append(True)
    assert worked == []
    assert not (repo / "mlflow.db").exists()


def test_unreachable_server_falls_back_when_configured(
    repo: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv(tracking.ENV_URI, url)
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["tracking"]["fallback_local"] = True
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    with caplog.at_level(logging.WARNING, logger="gpt2lab.tracking"):
        with stage_run("gen") as run:
            run.log_metrics({"tokens_per_s": 12.5})
    assert f"{url} is unreachable" in caplog.text and "logging to the local store" in caplog.text
    (r,) = _runs(f"sqlite:///{repo}/mlflow.db", raw["tracking"]["experiment"])
    assert r.data.tags[tracking.FALLBACK_TAG] == url and r.data.metrics["tokens_per_s"] == 12.5
    assert (repo / "mlartifacts").is_dir()  # artifacts beside the local store


def _write_fresh_lock(repo: Path) -> dict:
    (repo / "metrics/prep.json").write_text('{"rows": 3}')
    (repo / "metrics/gen.json").write_text('{"tokens_per_s": 7.0, "samples": ["Every effort moves you on"]}')
    (repo / "metrics/train.json").write_text('{"val_accuracy": 0.5}')
    (repo / "metrics/curve.csv").write_text("step,loss\n0,1\n")
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    lock = {
        "schema": "2.0",
        "stages": {
            "prep": _entry(repo, "prep", raw, {"out/prep": "aaa.dir"}),
            "gen": _entry(repo, "gen", raw),
            "train": _entry(repo, "train", raw, {"out/prep": "aaa.dir", "out/model": "bbb.dir"}),
        },
    }
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock))
    return raw


def test_freshness_from_the_lock(repo: Path) -> None:
    raw = _write_fresh_lock(repo)
    fresh = lambda name, params=raw: Pipeline.load(repo).is_fresh(name, params)  # noqa: E731
    assert fresh("prep") and fresh("gen") and fresh("train")
    assert Pipeline.load(repo).downstream("prep") == {"train"}
    assert not fresh("gen", {**raw, "generate": {**raw["generate"], "temperature": 0.0}})
    assert not fresh("train", {**raw, "seed": 7})  # its input's producer is stale
    (repo / "prep.py").write_text("# changed\n")
    assert not fresh("prep") and not fresh("train") and fresh("gen")
    (repo / "metrics/gen.json").write_text("{}")  # an output edited by hand
    assert not fresh("gen")


def test_skipped_stages_results_are_carried_into_a_new_run(repo: Path, store_uri: str) -> None:
    raw = _write_fresh_lock(repo)
    raw["lora"]["rank"] = 4  # an experiment that re-runs train only
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    with stage_run("train"):
        (repo / "metrics/train.json").write_text('{"val_accuracy": 0.75}')
    (r,) = _runs(store_uri, _experiment(repo))
    assert set(r.data.tags[tracking.CARRIED_TAG].split(",")) == {"prep", "gen"}
    assert r.data.metrics == {"prep/rows": 3.0, "gen/tokens_per_s": 7.0, "train/val_accuracy": 0.75}
    client = _client(store_uri)
    metric_files = {f.path for f in client.list_artifacts(r.info.run_id, "metrics")}
    assert metric_files == {"metrics/prep.json", "metrics/gen.json", "metrics/train.json"}
    local = Path(client.download_artifacts(r.info.run_id, "metrics/gen.json", str(repo / "dl")))
    assert json.loads(local.read_text())["samples"] == ["Every effort moves you on"]


def test_logged_classifier_loads_and_predicts(repo: Path, store_uri: str, tiny_cfg) -> None:
    """The classifier is logged into the execution's run and loads from the store alone."""
    import mlflow

    from gpt2lab.classifier import build_classifier, save_classifier
    from gpt2lab.lora import LoRAConfig
    from gpt2lab.weights import random_checkpoint

    base = random_checkpoint(tiny_cfg, 0, repo / "models/base")
    lora = LoRAConfig(rank=2, alpha=2.0, dropout=0.0, targets=("attn.c_attn",))
    save_classifier(build_classifier(base, "lora", lora), repo / "models/classifier", mode="lora", base_dir=base, lora=lora)
    with stage_run("train") as run:
        uri = run.log_classifier(repo / "models/classifier", base)
    for folder in ("models/base", "models/classifier"):  # the model must not need the workspace
        for f in (repo / folder).iterdir():
            f.unlink()
    model = mlflow.pyfunc.load_model(uri)
    out = model.predict(__import__("pandas").DataFrame({"text": ["WIN a free prize now!!!", "see you at 6"]}))
    assert list(out.columns) == ["label", "probability"] and len(out) == 2
    assert set(out.label) <= {"ham", "spam"} and out.probability.between(0, 1).all()
    (r,) = _runs(store_uri, _experiment(repo))
    assert r.info.status == "FINISHED" and [o.model_id for o in r.outputs.model_outputs]
