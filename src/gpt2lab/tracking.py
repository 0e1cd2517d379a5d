"""MLflow tracking of the DVC pipeline: one run per execution, holding the whole experiment.

The pipeline's last stage, ``track``, depends on every result the other stages write. DVC runs
it whenever one of them changed (and restores it from its run-cache when an experiment is
repeated), so each ``dvc repro`` / ``dvc exp run`` / queued experiment that computed anything
is exactly one MLflow run, and a run of ``-S lora.rank=4`` holds the untouched stages' results
too: they are read from the workspace, where DVC keeps them. Nothing here re-implements DVC's
change detection, and a stage's work never waits on, or is lost to, the tracking server: if
logging fails, only ``track`` fails, and the next ``dvc repro`` runs only ``track``.

A run holds every param, the git commit, the DVC experiment name, a description (pretrained or
random base, the DVC experiment, the test F1), the headline numbers as metrics (``test/f1``,
``validation/accuracy``, ``training/examples_per_s``, ``generation/tokens_per_s``, ...), the
curves as step series named by what they measure, each pair under one prefix (``loss/train`` and
``loss/val``, ``accuracy/train`` and ``accuracy/val``; ``step/loss``, ``step/lr``), the data splits
as datasets (their row counts live there, not among the metrics), the metrics, details and plot
files as artifacts, ``params.yaml`` and the trained classifier as an MLflow model
(:mod:`gpt2lab.serving`). This module is the only one that imports ``mlflow`` for runs.

Store: ``MLFLOW_TRACKING_URI`` if set, else ``tracking.uri``, else SQLite ``mlflow.db`` at the
repository root (``DVC_ROOT``, which DVC points at the original repository also in ``--temp`` and
``--queue`` runs, so every run lands in one database) with artifacts in ``mlartifacts/`` beside
it. A tracking server that does not answer fails the stage with one line, unless
``tracking.fallback_local`` is true: then the run goes to the local store and a warning says so.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import math
import os
import socket
import subprocess
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from gpt2lab.checkpoint import read_config
from gpt2lab.errors import Gpt2labError
from gpt2lab.fileio import write_atomic
from gpt2lab.params import Params, ParamsError, TrackingParams, flatten, load_params
from gpt2lab.registry import Version, register, serve_command

log = logging.getLogger(__name__)

ENV_URI = "MLFLOW_TRACKING_URI"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
PARAMS_FILE = "params.yaml"
PROBE_TIMEOUT_S = 5.0  # a reachable server answers its health check well within this
# What the pipeline writes besides code: a checkout that differs only here is not "dirty".
PIPELINE_FILES = ("params.yaml", "dvc.lock", "metrics")

COMMIT_TAG = "mlflow.source.git.commit"
DIRTY_TAG = "gpt2lab.git_dirty"
EXP_NAME_TAG = "dvc.exp_name"
BASELINE_TAG = "dvc.baseline_rev"
FALLBACK_TAG = "gpt2lab.fallback_from"  # the unreachable server this run should have gone to
HOST_TAG, PID_TAG = "gpt2lab.host", "gpt2lab.pid"  # who is logging: a run left RUNNING by a dead process is closed
NOTE_TAG = "mlflow.note.content"  # the run's description on its MLflow page
# MLflow 3's UI opens an experiment on its runs (not the GenAI traces view) when it is of this kind.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
DATA_CONTEXTS = {"train": "training", "validation": "validation", "test": "testing"}
BATCH = 1000  # MLflow's limit of metrics per log_batch call
PARAMS_BATCH = 100  # ... and of params


class TrackingError(Gpt2labError, RuntimeError):
    """The MLflow store cannot be used; the message names it and what to do."""


# --------------------------------------------------------------------------- where to log


def repo_root() -> Path:
    """The repository root: ``DVC_ROOT`` when DVC runs the stage, else the nearest folder with ``.dvc``.

    DVC sets ``DVC_ROOT`` to the original repository also for ``--temp``/``--queue`` experiments,
    which run in a copy under ``.dvc/tmp/exps/``; a path relative to the copy would be lost with it.
    Outside any repository: the working directory (:func:`find_repo_root` says None instead).
    """
    return find_repo_root() or Path.cwd().resolve()


def local_store_uri(root: Path) -> str:
    """SQLite store at ``root/mlflow.db`` (absolute, so every working copy shares it)."""
    return f"sqlite:///{(root / DB_FILE).resolve()}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``sqlite:////abs/path`` is absolute), else None."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def resolve_uri(params: TrackingParams, root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` > ``tracking.uri`` > the local SQLite store at ``root``.

    A relative SQLite path is taken relative to ``root``, not to the stage's working copy.
    """
    uri = os.environ.get(ENV_URI) or params.uri or local_store_uri(root)
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():
        return f"sqlite:///{(root / db).resolve()}"
    return uri


def probe(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the tracking server at ``uri`` cannot be reached, or None if it answers (any HTTP status)."""
    if not uri.startswith(("http://", "https://")):
        return None  # a database or a managed scheme: mlflow reports its own errors
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s)
    except requests.RequestException as err:
        return f"{type(err).__name__}: {_first_line(err)}"
    return None


@dataclass(frozen=True)
class Store:
    uri: str
    artifact_root: str | None  # for experiments this module creates; None = the server decides
    fallback_from: str | None = None


def choose_store(params: TrackingParams, root: Path) -> Store:
    """The store to log to, after checking that a tracking server answers (see module docstring)."""
    uri = resolve_uri(params, root)
    db = sqlite_path(uri)
    if db is not None:  # artifacts beside the database, not in the (maybe temporary) working copy
        return Store(uri, (db.parent / ARTIFACTS_DIR).as_uri())
    problem = probe(uri)
    if problem is None:
        return Store(uri, None)
    if not params.fallback_local:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({problem}); start it, point "
            f"{ENV_URI} or tracking.uri at a running server, or set tracking.fallback_local: true "
            "to log to the local store"
        )
    local = local_store_uri(root)
    log.warning("MLflow tracking server %s is unreachable (%s); logging to the local store %s instead "
                "(tracking.fallback_local: true)", uri, problem, local)  # fmt: skip
    return Store(local, (root / ARTIFACTS_DIR).resolve().as_uri(), fallback_from=uri)


@contextlib.contextmanager
def _store_lock(store: Store) -> Iterator[None]:
    """One writer at a time on a SQLite store (``dvc queue start -j 2`` logs from two processes).

    Two processes creating a fresh SQLite database race on its migrations, and concurrent
    writers can meet "database is locked"; an advisory lock beside the database avoids both.
    """
    db = sqlite_path(store.uri)
    if db is None:
        yield
        return
    lock_path = db.with_name(db.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- values


def numeric(flat: Mapping[str, Any]) -> dict[str, float]:
    """The finite-number entries of ``flat`` (booleans, strings, lists and NaN are not metrics)."""
    return {
        k: float(v)
        for k, v in flat.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def param_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def all_params(raw: Mapping[str, Any]) -> dict[str, str]:
    """Every param as ``section.key`` -> text, with defaults filled in when the file validates."""
    try:
        flat = Params.from_dict(dict(raw)).to_flat_dict()
    except ParamsError:
        flat = flatten(raw)  # a stage reports a bad section; log what is there
    return {k: param_value(v) for k, v in flat.items()}


def git_commit(workdir: Path) -> tuple[str, bool]:
    """(HEAD commit, whether the code differs from it); ("unknown", False) outside git.

    The files the pipeline itself writes (params set by ``dvc exp run -S``, ``dvc.lock``,
    ``metrics/``) do not count: an experiment of a clean checkout is not dirty.
    """

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=workdir, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      *(f":(exclude){p}" for p in PIPELINE_FILES))  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return commit, bool(changed)


def curve_rows(file: str | Path) -> list[dict[str, Any]]:
    """The rows of a TSV with a ``step`` column (a curve file the train stage writes)."""
    return pd.read_csv(file, sep="\t").to_dict("records")


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class PipelineFiles:
    """The outputs one MLflow run records, as paths in the working copy.

    ``metrics``: metric prefix -> JSON file (its numbers become ``<prefix><key>``, nested keys
    joined by ``/``); ``scores``: JSON file ``{split: {...}}`` of which ``score_keys`` become
    ``<split>/<key>`` (the evaluation's, without its counts); ``curves``: TSV of rows with a
    ``step`` -> {column: metric name} (each a step series); ``datasets``: split name -> CSV
    (logged as the run's datasets); ``artifacts``: artifact folder -> files or folders to store under it.
    """

    metrics: Mapping[str, str]
    scores: str
    score_keys: Sequence[str]
    curves: Mapping[str, Mapping[str, str]]
    datasets: Mapping[str, str]
    artifacts: Mapping[str, Sequence[str]]
    raw_dir: str
    base_dir: str
    classifier_dir: str


class RunLogger:
    """Logging into one MLflow run through the client (no global active run)."""

    def __init__(self, client: Any, run_id: str, store: Store) -> None:
        self.client, self.run_id, self.store = client, run_id, store
        self.model: Any = None  # MLflow's ModelInfo of the logged classifier

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAMS_BATCH], synchronous=True)

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0, prefix: str = "") -> None:
        """Log the numbers in (nested) ``metrics`` as ``prefix + key`` (nested keys joined by
        ``/``, MLflow's grouping); other values are skipped."""
        from mlflow.entities import Metric

        now = _now_ms()
        flat = {k.replace(".", "/"): v for k, v in flatten(metrics, prefix).items()}
        self._batch([Metric(k, v, now, step) for k, v in numeric(flat).items()])

    def log_curves(self, rows: Sequence[Mapping[str, Any]], names: Mapping[str, str]) -> int:
        """The columns of ``rows`` named in ``names`` (column -> metric name) as step series; returns the points."""
        from mlflow.entities import Metric

        now = _now_ms()
        points = []
        for i, row in enumerate(rows):
            step = int(row.get("step", i))
            values = numeric({name: row[column] for column, name in names.items() if column in row})
            points.extend(Metric(k, v, now, step) for k, v in values.items())
        self._batch(points)
        return len(points)

    def log_datasets(self, splits: Mapping[str, str | Path]) -> None:
        """Each split's CSV as an MLflow dataset of this run (name, digest, schema, row count)."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        inputs = []
        for split, path in splits.items():
            df = pd.read_csv(path)
            source = (repo_root() / path).as_uri()  # where the repository keeps it, not a temporary copy
            dataset = mlflow.data.from_pandas(df, source=source, name=f"sms-spam-{split}", targets="Label")
            tags = [InputTag("mlflow.data.context", DATA_CONTEXTS.get(split, split))]
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags))
        self.client.log_inputs(self.run_id, datasets=inputs)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or a folder (recursively) under ``artifact_path``."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def _batch(self, metrics: list[Any]) -> None:
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + BATCH], synchronous=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _now_ms() -> int:
    return int(datetime.datetime.now().timestamp() * 1000)


def _client(store: Store) -> Any:
    import mlflow  # imported here: importing this module stays cheap

    logging.getLogger("alembic").setLevel(logging.WARNING)  # the migration chatter of a new store
    db = sqlite_path(store.uri)
    if db is not None and not db.exists():
        # Create the database with its artifact root beside it. Left to the client, MLflow creates
        # it with its "Default" experiment's artifacts in ./mlruns of the working directory: a
        # temporary copy, for `dvc exp run --temp` and queued experiments.
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        SqlAlchemyStore(store.uri, store.artifact_root)
    return mlflow.MlflowClient(tracking_uri=store.uri)


def _experiment_id(client: Any, name: str, store: Store) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=store.artifact_root, tags={KIND_TAG: KIND})
        except MlflowException:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise TrackingError(
            f"MLflow experiment {name!r} is deleted in {store.uri}; restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or set tracking.experiment"
        )
    if KIND_TAG not in experiment.tags:  # made by an older gpt2lab or by hand
        client.set_experiment_tag(experiment.experiment_id, KIND_TAG, KIND)
    return experiment.experiment_id


def _close_abandoned_runs(client: Any, experiment_id: str) -> None:
    """Mark KILLED the runs this machine left RUNNING: their ``track`` process died (SIGKILL, power)."""
    host = socket.gethostname()
    running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=200)
    for run in running:
        tags = run.data.tags
        if tags.get(HOST_TAG) == host and tags.get(PID_TAG, "").isdigit() and not _alive(int(tags[PID_TAG])):
            client.set_terminated(run.info.run_id, status="KILLED")
            log.warning("MLflow run %s was left RUNNING by a process that died; marked KILLED", run.info.run_id)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run_tags(workdir: Path, files: PipelineFiles, store: Store) -> dict[str, str]:
    commit, dirty = git_commit(workdir)
    tags = {COMMIT_TAG: commit, DIRTY_TAG: str(dirty).lower(), "mlflow.source.name": "dvc.yaml",
            "mlflow.source.type": "PROJECT", HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}  # fmt: skip
    if os.environ.get("DVC_EXP_NAME"):
        tags[EXP_NAME_TAG] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags[BASELINE_TAG] = os.environ["DVC_EXP_BASELINE_REV"]
    if store.fallback_from:
        tags[FALLBACK_TAG] = store.fallback_from
    source = Path(files.raw_dir) / "source.json"
    if source.is_file():
        tags["data.source"] = json.loads(source.read_text())["source"]
    base = read_config(files.base_dir)
    tags["base.sha256"] = base["sha256"]
    tags["base.pretrained"] = str(bool(base.get("pretrained", False))).lower()
    tags[NOTE_TAG] = describe_run(base, files)
    return tags


def split_scores(files: PipelineFiles) -> dict[str, dict[str, Any]]:
    """``{split: {key: value}}`` of ``files.scores`` for ``files.score_keys`` ({} without the file)."""
    scores = Path(files.scores)
    if not scores.is_file():
        return {}
    return {split: {k: values[k] for k in files.score_keys if k in values}
            for split, values in json.loads(scores.read_text()).items() if isinstance(values, dict)}  # fmt: skip


def describe_run(base: Mapping[str, Any], files: PipelineFiles) -> str:
    """The run's description (Markdown): pretrained or random base, the DVC experiment, the test scores."""
    model = base.get("model", {})
    size = f"{model.get('n_layer', '?')} layers, {model.get('n_embd', '?')} wide"
    if base.get("pretrained", False):
        lines = [f"Fine-tuned on **pretrained** GPT-2 weights from `{base.get('source', '?')}` ({size})."]
    else:
        lines = [f"**Random base weights** ({size}): a smoke run; its scores check the pipeline, not the model."]
    name, baseline = os.environ.get("DVC_EXP_NAME"), os.environ.get("DVC_EXP_BASELINE_REV")
    if name:
        lines.append(f"DVC experiment `{name}` (baseline {baseline[:7] if baseline else 'unknown'}): "
                     f"`dvc exp show`, `dvc exp apply {name}`.")  # fmt: skip
    else:
        lines.append("DVC: `dvc repro` of the workspace.")
    test = split_scores(files).get("test")
    if test:
        lines.append("Test split: " + ", ".join(f"{k} {v:.4f}" for k, v in test.items() if v is not None) + ".")
    return "\n\n".join(lines)


# MLflow's advice that does not apply here (no value is missing; a file: URI is a local file).
MLFLOW_HINTS = ("Hint: Inferred schema contains integer column", "The specified dataset source can be interpreted")


def _log_everything(run: RunLogger, raw: Mapping[str, Any], files: PipelineFiles, params_file: Path) -> str:
    """Params, metrics, curves, artifacts and the model into ``run``; returns the model URI."""
    with warnings.catch_warnings():
        for hint in MLFLOW_HINTS:
            warnings.filterwarnings("ignore", message=hint, category=UserWarning)
        return _log_all(run, raw, files, params_file)


def _log_all(run: RunLogger, raw: Mapping[str, Any], files: PipelineFiles, params_file: Path) -> str:
    from gpt2lab.serving import log_model

    run.log_params(all_params(raw))
    run.log_artifact(params_file)
    for prefix, file in files.metrics.items():
        run.log_metrics(json.loads(Path(file).read_text()), prefix=prefix)
    if not Path(files.scores).is_file():
        raise FileNotFoundError(files.scores)
    run.log_metrics(split_scores(files))
    for file, names in files.curves.items():
        run.log_curves(curve_rows(file), names)
    run.log_datasets(files.datasets)
    for folder, paths in files.artifacts.items():
        for path in paths:
            run.log_artifact(path, folder)
    info = log_model(files.classifier_dir, files.base_dir, run_id=run.run_id, tracking_uri=run.store.uri)
    run.model = info
    return info.model_uri


def log_pipeline_run(files: PipelineFiles, record: str | Path, params_file: str | Path = PARAMS_FILE) -> dict[str, str]:
    """Log the pipeline's current outputs as one new MLflow run; write and return its record.

    The record (``run_id``, ``experiment_id``, ``run_name``, ``tracking_uri``, ``model_uri``)
    lands in ``record``; the run ends FINISHED, or FAILED with a one-line :class:`TrackingError`.
    """
    params_file = Path(params_file)
    workdir = params_file.resolve().parent
    raw = yaml.safe_load(params_file.read_text()) or {}
    tracking = load_params(params_file, sections=["tracking"]).tracking
    store = choose_store(tracking, repo_root())
    name = os.environ.get("DVC_EXP_NAME") or f"repro-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    client, run_id = None, None
    try:
        with _store_lock(store):
            client = _client(store)
            experiment_id = _experiment_id(client, tracking.experiment, store)
            _close_abandoned_runs(client, experiment_id)
            run_id = client.create_run(experiment_id, run_name=name, tags=_run_tags(workdir, files, store)).info.run_id
            run = RunLogger(client, run_id, store)
            model_uri = _log_everything(run, raw, files, params_file)
            version = register_run_model(run, tracking.registered_model, files)
            client.set_terminated(run_id, status="FINISHED")
    except TrackingError:
        raise
    except Exception as err:  # MLflow's, SQLAlchemy's (a damaged or locked database), requests', OS errors
        if client is not None and run_id is not None:
            with contextlib.suppress(Exception):
                client.set_terminated(run_id, status="FAILED")
        damaged = sqlite_path(store.uri) is not None and "database" in str(err).lower()
        hint = f"; if {sqlite_path(store.uri)} is damaged, move it aside" if damaged else ""
        raise TrackingError(
            f"could not log the pipeline's results to MLflow store {store.uri} ({type(err).__name__}: "
            f"{_first_line(err)}){hint}; the results are kept: re-run `dvc repro` once the store works "
            "(only `track` runs)"
        ) from err
    except BaseException:
        if client is not None and run_id is not None:
            with contextlib.suppress(Exception):
                client.set_terminated(run_id, status="KILLED")
        raise
    result = {"run_id": run_id, "experiment_id": experiment_id, "run_name": name, "tracking_uri": store.uri,
              "model_uri": model_uri, "registered_model": version.name, "model_version": version.version,
              "serve": serve_command(store.uri, version.uri)}  # fmt: skip
    write_atomic(record, json.dumps(result, indent=2) + "\n")
    log.info("logged MLflow run %s (%s) in %s", run_id, name, store.uri)
    return result


# --------------------------------------------------------------------------- registry, and the store from anywhere


def register_run_model(run: RunLogger, name: str, files: PipelineFiles) -> Version:
    """Register the run's logged classifier as a new version of ``name``, tagged with what tells versions apart:
    test metrics, DVC experiment name, git commit, base sha256 and whether it was pretrained."""
    logged = run.client.get_run(run.run_id)
    tags = logged.data.tags  # the base's tags as _run_tags wrote them
    version_tags = {f"test.{k}": v for k, v in numeric(split_scores(files).get("test", {})).items()}
    version_tags.update({"dvc.exp_name": tags.get(EXP_NAME_TAG, logged.info.run_name),
                         "git.commit": tags.get(COMMIT_TAG, "unknown"), "base.sha256": tags["base.sha256"],
                         "base.pretrained": tags["base.pretrained"]})  # fmt: skip
    return register(run.store.uri, name, run.model, run.run_id, version_tags)


def find_repo_root(start: Path | None = None) -> Path | None:
    """The DVC repository holding ``start`` (default: the working directory): ``DVC_ROOT``, or the
    nearest folder upwards with a ``.dvc`` folder; None outside any."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = (start or Path.cwd()).resolve()
    return next((folder for folder in (here, *here.parents) if (folder / ".dvc").is_dir()), None)


def project_store(start: Path | None = None) -> tuple[str, TrackingParams]:
    """The project's tracking URI and tracking params, from any directory, for reading runs and models.

    ``MLFLOW_TRACKING_URI`` wins; else the repository's ``tracking.uri`` or its SQLite store. Outside a
    repository without ``MLFLOW_TRACKING_URI``, or with no store yet, a :class:`TrackingError` says so
    (no stray ``mlflow.db`` is created where the command happens to run).
    """
    root = find_repo_root(start)
    params_file = root / PARAMS_FILE if root is not None else None
    tracking = (load_params(params_file, sections=["tracking"]).tracking if params_file and params_file.is_file()
                else TrackingParams())  # fmt: skip
    if os.environ.get(ENV_URI):
        return os.environ[ENV_URI], tracking
    if root is None:
        raise TrackingError(
            f"no MLflow tracking store: {Path.cwd()} is not inside a gpt2lab repository (no .dvc folder here or "
            f"above) and {ENV_URI} is not set; run from the repository, or export {ENV_URI}=<its store>"
        )
    uri = resolve_uri(tracking, root)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise TrackingError(f"no MLflow store at {db} yet: run the pipeline first (`make smoke` or `dvc repro`)")
    return uri, tracking
