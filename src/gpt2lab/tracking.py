"""MLflow tracking for the DVC pipeline: every stage logs through this module (and only here is
``mlflow`` imported for tracking; :mod:`gpt2lab.serving` packages the classifier as a model).

One *execution* of the pipeline (a ``dvc repro`` or ``dvc exp run`` that ran at least one stage)
is one MLflow run in the ``tracking.experiment`` experiment. The first stage that executes creates
the run and tags it with a key hashed from the params, the git commit and DVC's experiment name;
later stages of the same execution find the run by that key and add to it. A stage that finds its
own name already logged in the newest run with the key starts a new run instead (``dvc repro -f``,
or a re-run after a code change at the same commit). Stages that DVC skips never touch MLflow, so
they create no empty runs; their results (metrics, plots, samples) are carried into the new run
when ``dvc.lock`` shows them up to date, so each run holds the whole experiment.

Store: ``MLFLOW_TRACKING_URI`` if set, else ``tracking.uri``, else SQLite ``mlflow.db`` at the
repository root (``DVC_ROOT``, which DVC points at the original repository also in ``--temp`` and
``--queue`` runs, so every run lands in one database) with artifacts in ``mlartifacts/`` beside it.
A tracking server that does not answer stops the stage before any work, unless
``tracking.fallback_local`` is true: then the run goes to the local store and a warning says so.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import math
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpt2lab.config import Params, ParamsError, TrackingParams, load_params
from gpt2lab.errors import Gpt2labError

log = logging.getLogger(__name__)

ENV_URI = "MLFLOW_TRACKING_URI"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
PARAMS_FILE = "params.yaml"
DVC_FILE = "dvc.yaml"
LOCK_FILE = "dvc.lock"
PROBE_TIMEOUT_S = 5.0  # a reachable server answers its health check well within this

KEY_TAG = "gpt2lab.run_key"
STAGES_TAG = "gpt2lab.stages"  # stages that executed into this run, in order
CARRIED_TAG = "gpt2lab.carried_over"  # skipped stages whose up-to-date results were copied in
FALLBACK_TAG = "gpt2lab.fallback_from"  # the unreachable server this run should have gone to
STAGE_DONE_TAG = "gpt2lab.stage.{}"
COMMIT_TAG = "mlflow.source.git.commit"
EXP_NAME_TAG = "dvc.exp_name"
BASELINE_TAG = "dvc.baseline_rev"

METRICS_PREFIX = "metrics"  # artifact folders
PLOTS_PREFIX = "plots"
BATCH = 1000  # MLflow's limit of metrics per log_batch call
PARAMS_BATCH = 100  # ... and of params


class TrackingError(Gpt2labError, RuntimeError):
    """The MLflow store cannot be used; the message names it and what to do."""


# --------------------------------------------------------------------------- where to log


def repo_root() -> Path:
    """The repository root: ``DVC_ROOT`` when DVC runs the stage, else the nearest folder with ``.dvc``.

    DVC sets ``DVC_ROOT`` to the original repository also for ``--temp``/``--queue`` experiments,
    which run in a copy under ``.dvc/tmp/exps/``; a path relative to the copy would be lost with it.
    """
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return cwd


def local_store_uri(root: Path) -> str:
    """SQLite store at ``root/mlflow.db`` (absolute, so every working copy shares it)."""
    return f"sqlite:///{(root / DB_FILE).resolve()}"


def resolve_uri(params: TrackingParams, root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` > ``tracking.uri`` > the local SQLite store at ``root``.

    A relative SQLite path is taken relative to ``root``, not to the stage's working copy.
    """
    uri = os.environ.get(ENV_URI) or params.uri or local_store_uri(root)
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():
        return f"sqlite:///{(root / db).resolve()}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``sqlite:////abs/path`` is absolute), else None."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


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
    """Serialise store creation and run lookup across processes (``dvc queue start -j 2``).

    Two processes creating a fresh SQLite database race on its migrations, and two lookups of
    the same key could both create a run; an advisory lock on a file beside the database avoids both.
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


# --------------------------------------------------------------------------- the pipeline's files


def _out_path(entry: Any) -> str:
    return entry if isinstance(entry, str) else next(iter(entry))


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class StageSpec:
    name: str
    cmd: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    params: tuple[tuple[str, str], ...]  # (params file, key)


@dataclass
class Pipeline:
    """What ``dvc.yaml`` declares and ``dvc.lock`` records, read without DVC (it holds the repo lock)."""

    stages: dict[str, StageSpec]
    metrics: tuple[str, ...]
    plots: tuple[str, ...]
    lock: dict[str, Any] = field(default_factory=dict)
    workdir: Path = Path(".")

    @classmethod
    def load(cls, workdir: Path = Path(".")) -> Pipeline:
        dvc_path = workdir / DVC_FILE
        if not dvc_path.exists():
            return cls({}, (), (), {}, workdir)
        raw = yaml.safe_load(dvc_path.read_text()) or {}
        stages = {}
        metrics: list[str] = [_out_path(m) for m in raw.get("metrics", [])]
        plots: list[str] = []
        for entry in raw.get("plots", []):
            for key, conf in ({entry: None} if isinstance(entry, str) else entry).items():
                y = (conf or {}).get("y") if isinstance(conf, dict) else None
                plots.extend(y if isinstance(y, dict) else [key])
        for name, spec in (raw.get("stages") or {}).items():
            own_metrics = [_out_path(m) for m in spec.get("metrics", [])]
            own_plots = [_out_path(p) for p in spec.get("plots", [])]
            metrics += own_metrics
            plots += own_plots
            params: list[tuple[str, str]] = []
            for item in spec.get("params", []):
                if isinstance(item, str):
                    params.append((PARAMS_FILE, item))
                else:
                    params.extend((file, key) for file, keys in item.items() for key in keys or [])
            stages[name] = StageSpec(
                name=name,
                cmd=spec["cmd"] if isinstance(spec.get("cmd"), str) else " && ".join(spec.get("cmd", [])),
                deps=tuple(spec.get("deps", [])),
                outs=tuple(_out_path(o) for o in spec.get("outs", [])) + tuple(own_metrics) + tuple(own_plots),
                params=tuple(params),
            )
        lock_path = workdir / LOCK_FILE
        lock = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {}) if lock_path.exists() else {}
        return cls(stages, tuple(dict.fromkeys(metrics)), tuple(dict.fromkeys(plots)), lock, workdir)

    def producer(self, path: str) -> str | None:
        """The stage whose outputs contain ``path``."""
        for spec in self.stages.values():
            if any(_under(path, out) for out in spec.outs):
                return spec.name
        return None

    def downstream(self, name: str) -> set[str]:
        """Stages that depend, directly or not, on ``name``'s outputs."""
        found: set[str] = set()
        frontier = [name]
        while frontier:
            outs = self.stages[frontier.pop()].outs
            for spec in self.stages.values():
                if spec.name not in found and any(_under(d, o) or _under(o, d) for d in spec.deps for o in outs):
                    found.add(spec.name)
                    frontier.append(spec.name)
        return found

    def files(self, name: str) -> tuple[list[str], list[str]]:
        """(metrics files, plot files) that stage ``name`` writes."""
        outs = self.stages[name].outs
        pick = lambda paths: [p for p in paths if any(_under(p, o) for o in outs)]  # noqa: E731
        return pick(self.metrics), pick(self.plots)

    def is_fresh(self, name: str, params: Mapping[str, Any], _seen: dict[str, bool] | None = None) -> bool:
        """Whether ``dvc.lock`` records ``name`` as run with the current params, code and inputs.

        A light ``dvc status``: file dependencies are hashed; a dependency that another stage writes
        is compared with that stage's recorded output, and that stage must be fresh too. Anything
        this cannot verify (an untracked folder) counts as not fresh, so nothing stale is carried.
        """
        seen = {} if _seen is None else _seen
        if name not in seen:
            seen[name] = False  # a cycle would be DVC's error; treat it as stale meanwhile
            seen[name] = self._check_fresh(name, params, seen)
        return seen[name]

    def _check_fresh(self, name: str, params: Mapping[str, Any], seen: dict[str, bool]) -> bool:
        spec, entry = self.stages.get(name), self.lock.get(name)
        if spec is None or not entry or entry.get("cmd") != spec.cmd:
            return False
        recorded = entry.get("params") or {}
        for file, key in spec.params:
            if file != PARAMS_FILE or recorded.get(file, {}).get(key, object()) != params.get(key):
                return False
        deps = {d["path"]: d.get("md5") for d in entry.get("deps", [])}
        if set(deps) != set(spec.deps):
            return False
        for path, md5 in deps.items():
            producer = self.producer(path)
            if producer is not None:
                outs = {o["path"]: o.get("md5") for o in self.lock.get(producer, {}).get("outs", [])}
                if outs.get(path) != md5 or not self.is_fresh(producer, params, seen):
                    return False
            elif not self._file_matches(path, md5):
                return False
        for out in entry.get("outs", []):
            if not str(out.get("md5", "")).endswith(".dir") and not self._file_matches(out["path"], out.get("md5")):
                return False
        return True

    def _file_matches(self, path: str, md5: str | None) -> bool:
        file = self.workdir / path
        return md5 is not None and not md5.endswith(".dir") and file.is_file() and md5_file(file) == md5


# --------------------------------------------------------------------------- values


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


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
        flat = flatten(raw)  # the stage that owns a bad section reports it; log what is there
    return {k: param_value(v) for k, v in flat.items()}


def run_key(raw: Mapping[str, Any], commit: str, exp_name: str) -> str:
    """Identity of one execution: params (without ``tracking``: where to log, not what), code, name."""
    params = {k: v for k, v in raw.items() if k != "tracking"}
    blob = json.dumps({"params": params, "commit": commit, "exp": exp_name}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def git_commit(workdir: Path) -> tuple[str, bool]:
    """(HEAD commit, whether tracked files differ from it); ("unknown", False) outside git."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=workdir, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


# --------------------------------------------------------------------------- the run


class StageRun:
    """A stage's handle on the execution's MLflow run (see :func:`stage_run`)."""

    def __init__(self, client: Any, run_id: str, stage: str, pipeline: Pipeline, store: Store) -> None:
        self.client = client
        self.run_id = run_id
        self.stage = stage
        self.pipeline = pipeline
        self.store = store

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0, prefix: str = "") -> None:
        """Log the numbers in (nested) ``metrics`` as ``prefix + key``; other values are skipped."""
        from mlflow.entities import Metric

        now = _now_ms()
        values = numeric(flatten(metrics, prefix))
        self._batch([Metric(k, v, now, step) for k, v in values.items()])

    def log_curves(
        self,
        history: Mapping[str, Sequence[float]] | Sequence[Mapping[str, Any]],
        *,
        prefix: str = "",
        exclude: Sequence[str] = (),
        step_key: str = "step",
    ) -> int:
        """Log per-step curves; return how many points were logged.

        ``history`` is either columns (``{"step": [...], "train_loss": [...], ...}``) or rows
        (``[{"step": 0, "train_loss": ...}, ...]``); every other numeric column not in ``exclude``
        becomes a metric ``prefix + column`` whose history is indexed by ``step_key`` (by
        position when there is none).
        """
        from mlflow.entities import Metric

        if isinstance(history, Mapping):
            columns = {k: list(v) for k, v in history.items() if isinstance(v, Sequence) and not isinstance(v, str)}
            length = max((len(v) for v in columns.values()), default=0)
            rows = [{k: v[i] for k, v in columns.items() if i < len(v)} for i in range(length)]
        else:
            rows = [dict(row) for row in history]
        now = _now_ms()
        metrics = []
        for i, row in enumerate(rows):
            step = int(row.get(step_key, i))
            values = numeric({prefix + k: v for k, v in row.items() if k != step_key and k not in exclude})
            metrics.extend(Metric(k, v, now, step) for k, v in values.items())
        self._batch(metrics)
        return len(metrics)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or a folder (recursively) under ``artifact_path``."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_classifier(self, classifier_dir: str | Path, base_dir: str | Path, name: str = "model") -> str:
        """Log the trained classifier into this run as an MLflow pyfunc model; return its model URI.

        The model (see :mod:`gpt2lab.serving`) holds the classifier, its base checkpoint and
        gpt2lab's code: ``mlflow models serve -m runs:/<run id>/model`` needs no repository.
        """
        from gpt2lab.serving import log_model

        return log_model(classifier_dir, base_dir, name, run_id=self.run_id, tracking_uri=self.store.uri).model_uri

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_stage_outputs(self, stage: str | None = None) -> None:
        """Log the metrics and plots ``dvc.yaml`` declares for ``stage`` (default: this one).

        Each metrics file's numbers become metrics ``<file stem>/<key>``; the files themselves go to
        the ``metrics/`` and ``plots/`` artifact folders, so text (samples) and images are kept too.
        """
        stage = stage or self.stage
        if stage not in self.pipeline.stages:
            return
        metrics, plots = self.pipeline.files(stage)
        for rel in metrics:
            path = self.pipeline.workdir / rel
            if path.is_file():
                with contextlib.suppress(ValueError):  # JSON metrics only; other formats are kept as files
                    self.log_metrics(json.loads(path.read_text()), prefix=f"{path.stem}/")
                self.log_artifact(path, METRICS_PREFIX)
        for rel in plots:
            path = self.pipeline.workdir / rel
            if path.exists():
                self.log_artifact(path, PLOTS_PREFIX)

    def _batch(self, metrics: list[Any]) -> None:
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + BATCH], synchronous=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _now_ms() -> int:
    return int(datetime.datetime.now().timestamp() * 1000)


def _client(store: Store) -> Any:
    import mlflow  # imported here: a stage pays for it only when it executes

    logging.getLogger("alembic").setLevel(logging.WARNING)  # the migration chatter of a new store
    return mlflow.MlflowClient(tracking_uri=store.uri)


def _experiment_id(client: Any, name: str, store: Store) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=store.artifact_root)
        except MlflowException:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise TrackingError(
            f"MLflow experiment {name!r} is deleted in {store.uri}; restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or set tracking.experiment"
        )
    return experiment.experiment_id


def _find_or_create_run(
    client: Any, experiment_id: str, stage: str, raw: Mapping[str, Any], pipeline: Pipeline, store: Store
) -> tuple[str, bool]:
    """(run id, whether it was created): the newest run with this execution's key, unless it already
    holds ``stage``; then a new run with all params, the commit and the skipped stages' results."""
    commit, dirty = git_commit(pipeline.workdir)
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    key = run_key(raw, commit, exp_name)
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'", order_by=["attributes.start_time DESC"], max_results=1
    )
    if found and STAGE_DONE_TAG.format(stage) not in found[0].data.tags:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id, False
    tags = {
        KEY_TAG: key,
        COMMIT_TAG: commit,
        "gpt2lab.git_dirty": str(dirty).lower(),
        "mlflow.source.name": DVC_FILE,
        "mlflow.source.type": "PROJECT",
    }
    if exp_name:
        tags[EXP_NAME_TAG] = exp_name
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags[BASELINE_TAG] = os.environ["DVC_EXP_BASELINE_REV"]
    if store.fallback_from:
        tags[FALLBACK_TAG] = store.fallback_from
    name = exp_name or f"repro-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    return run.info.run_id, True


def _start_new_run(run: StageRun, raw: Mapping[str, Any]) -> None:
    """Fill a new run: every param, params.yaml itself, and the up-to-date results of other stages."""
    from mlflow.entities import Param

    params = [Param(k, v) for k, v in all_params(raw).items()]
    for i in range(0, len(params), PARAMS_BATCH):
        run.client.log_batch(run.run_id, params=params[i : i + PARAMS_BATCH], synchronous=True)
    params_file = run.pipeline.workdir / PARAMS_FILE
    if params_file.exists():
        run.log_artifact(params_file)
    pipeline = run.pipeline
    if run.stage not in pipeline.stages:
        return
    later = pipeline.downstream(run.stage) | {run.stage}  # about to change: never carried
    carried = [s for s in pipeline.stages if s not in later and pipeline.is_fresh(s, raw)]
    for stage in carried:
        run.log_stage_outputs(stage)
    if carried:
        run.set_tags({CARRIED_TAG: ",".join(carried)})


@contextlib.contextmanager
def stage_run(stage: str, params_file: str | Path = PARAMS_FILE) -> Iterator[StageRun]:
    """Open this execution's MLflow run for ``stage``; on success log the stage's declared outputs.

    Use it around a stage's work, after validating the stage's own params: connection problems
    surface here, before any work. The run ends FINISHED after each stage (the next stage sets it
    running again), FAILED if the body raises, KILLED on Ctrl-C.
    """
    workdir = Path(params_file).resolve().parent
    raw = yaml.safe_load(Path(params_file).read_text()) or {}
    tracking = load_params(params_file, sections=["tracking"]).tracking
    store = choose_store(tracking, repo_root())
    from mlflow.exceptions import MlflowException

    pipeline = Pipeline.load(workdir)
    try:
        client = _client(store)
        with _store_lock(store):
            experiment_id = _experiment_id(client, tracking.experiment, store)
            run_id, created = _find_or_create_run(client, experiment_id, stage, raw, pipeline, store)
        run = StageRun(client, run_id, stage, pipeline, store)
        if created:
            _start_new_run(run, raw)
    except (MlflowException, OSError) as err:
        raise TrackingError(f"MLflow store {store.uri}: {_first_line(err)}") from err
    log.info("tracking %s in MLflow run %s (experiment %r, %s)", stage, run_id, tracking.experiment, store.uri)
    try:
        yield run
    except BaseException as err:
        with contextlib.suppress(Exception):  # the stage's own error is the one to report
            client.set_terminated(run_id, status="KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    try:
        run.log_stage_outputs()
        stages = client.get_run(run_id).data.tags.get(STAGES_TAG)
        run.set_tags({STAGE_DONE_TAG.format(stage): "done", STAGES_TAG: f"{stages},{stage}" if stages else stage})
        client.set_terminated(run_id, status="FINISHED")
    except Exception as err:  # MlflowException, or requests/OS errors from an artifact upload
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, status="FAILED")
        raise TrackingError(
            f"could not log {stage}'s results to MLflow store {store.uri} ({_first_line(err)}); "
            "its outputs are written, re-run the stage once the store works"
        ) from err

