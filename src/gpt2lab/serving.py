"""The spam classifier as an MLflow pyfunc model, logged as "models from code" (nothing pickled).

:func:`log_model` logs, inside an MLflow run:

- the model code ``serving_model.py`` (it calls ``mlflow.models.set_model``) and a copy of the
  ``gpt2lab`` package sources, so the model runs where gpt2lab is not installed;
- artifacts: the trained classifier folder (adapter, head, their JSON), its settings
  (``settings.json``: precision, batch size, threshold, device) and a reference to its base
  checkpoint by sha256: the base is stored once per sha256 in the tracking store with the GPT-2
  BPE ranks (:mod:`gpt2lab.basestore`), fetched from there and verified on load, so ten
  experiments on one base store it once and serving needs no internet (``share_base=False``
  embeds the base and the ranks instead);
- a signature (input column ``text`` string; outputs ``label`` string, ``spam_probability`` double),
  an input example, and pip requirements pinned to the versions installed here.

Served with :func:`gpt2lab.server.serve` (``gpt2lab serve MODEL_URI``: MLflow's own scoring
app behind a request guard) or ``mlflow models serve -m runs:/<run id>/model --env-manager local``, POST
``/invocations`` with ``{"dataframe_records": [{"text": "..."}]}`` or
``{"inputs": {"text": ["...", "..."]}}`` answers
``{"predictions": [{"label": "spam", "spam_probability": 0.97}, ...]}``, in input order. A body that
is not JSON, a missing ``text`` column, a value that is not a string (``dataframe_records`` and
``dataframe_split`` keep JSON's types) or text that is not valid Unicode gets HTTP 400 with the
reason. Messages are read as :class:`gpt2lab.Classifier` reads them (empty -> end-of-text token,
longer than the context -> first tokens kept, only a bounded prefix tokenized).

The work of a request is bounded either way: the model stops between batches once
``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`` (the timeout after which MLflow answers 504) has
passed, so a client that gives up leaves no work running; :mod:`gpt2lab.server` adds the
limits MLflow's app lacks.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from gpt2lab.basestore import resolve_base, store_base
from gpt2lab.classifier import ClassifierError
from gpt2lab.classifier_io import META_FILE, read_classifier_meta
from gpt2lab.devices import DTYPES
from gpt2lab.errors import Gpt2labError
from gpt2lab.fileio import write_atomic
from gpt2lab.inference import Classifier, InvalidTextError, StoppedError
from gpt2lab.params import DEVICE_PATTERN, DEVICES
from gpt2lab.registry import global_store
from gpt2lab.server import INPUT_COLUMN, SETTINGS_ENV, STOPPING, TIMEOUT_ENV
from gpt2lab.tokenizer import _ranks_path

log = logging.getLogger(__name__)

MODEL_CODE = Path(__file__).with_name("serving_model.py")
PACKAGE_DIR = Path(__file__).parent
INPUT_EXAMPLE = ["You won $1000! Claim now.", "see you at lunch?"]
# What `import gpt2lab.inference` needs at serving time (mlflow itself serves the model).
REQUIREMENTS = ("torch", "numpy", "pandas", "safetensors", "tiktoken", "PyYAML", "requests", "filelock", "tqdm", "mlflow")


class ModelDownloadError(Gpt2labError, RuntimeError):
    """An MLflow model cannot be downloaded, or is not a gpt2lab classifier model."""


class SpamPyfunc:
    """The pyfunc wrapper: ``load_context`` loads :class:`Classifier`, ``predict`` scores a ``text`` column.

    It subclasses ``mlflow.pyfunc.PythonModel`` only in ``serving_model.py``, so importing this
    module does not import mlflow.
    """

    def load_context(self, context: Any) -> None:
        # The settings logged with the model, then those of a model logged with MLflow's model
        # config (older gpt2lab), then the environment's (:data:`SETTINGS_ENV`).
        logged = context.artifacts.get("settings")
        config = {**(json.loads(Path(logged).read_text()) if logged else {}), **(context.model_config or {}),
                  **json.loads(os.environ.get(SETTINGS_ENV) or "{}")}  # fmt: skip
        tokenizer = context.artifacts.get("tokenizer")
        if tokenizer:
            _seed_tokenizer_cache(Path(tokenizer))
        reference = base_reference(config)
        base = resolve_base(reference) if reference is not None else context.artifacts["base"]
        self.classifier = Classifier.load(
            context.artifacts["classifier"],
            base,
            batch_size=int(config.get("batch_size", 32)),
            precision=str(config.get("precision", "fp32")),
            threshold=float(config.get("threshold", 0.5)),
            device=str(config.get("device", "auto")),  # auto: a GPU when the serving machine has one
        )

    # model_input has no annotation on purpose: MLflow would try to derive the signature from it.
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """A DataFrame with a ``text`` column (or a list of strings) -> DataFrame ``label, spam_probability``."""
        from mlflow.exceptions import MlflowException  # local: importing this module does not import mlflow
        from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

        texts = _texts(model_input)
        deadline = time.monotonic() + float(os.environ.get(TIMEOUT_ENV, 60))

        def stop() -> str | None:
            if STOPPING.is_set():
                return "the server is shutting down"
            return f"the request took longer than {TIMEOUT_ENV}" if time.monotonic() > deadline else None

        try:
            results = self.classifier.classify(texts, stop=stop)
        except InvalidTextError as err:
            raise MlflowException.invalid_parameter_value(f"{err} (column {INPUT_COLUMN!r} must hold strings)") from err
        except StoppedError as err:
            log.warning("%s", err)  # after a 504 nobody else hears of it
            raise MlflowException(str(err), error_code=TEMPORARILY_UNAVAILABLE) from err  # HTTP 503
        return pd.DataFrame(results, columns=["label", "spam_probability"])


def _texts(model_input: Any) -> list[Any]:
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN not in model_input.columns:
            from mlflow.exceptions import MlflowException

            raise MlflowException.invalid_parameter_value(
                f"input has columns {list(model_input.columns)}; expected a column {INPUT_COLUMN!r} of messages"
            )
        return model_input[INPUT_COLUMN].tolist()
    if isinstance(model_input, pd.Series):
        return model_input.tolist()
    if isinstance(model_input, dict) and INPUT_COLUMN in model_input:
        return list(model_input[INPUT_COLUMN])
    return model_input  # a list of strings; Classifier checks it


def _seed_tokenizer_cache(ranks: Path) -> None:
    """Put the shipped BPE ranks where :mod:`gpt2lab.tokenizer` looks first, if nothing is there yet."""
    target = _ranks_path()
    if not target.is_file() and ranks.is_file():
        write_atomic(target, ranks.read_bytes())  # the tokenizer verifies its sha256 on load


def signature() -> Any:
    """Input ``text`` (string) -> outputs ``label`` (string) and ``spam_probability`` (double)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "spam_probability")]),
    )


def pip_requirements() -> list[str]:
    """The serving dependencies, pinned to the versions installed here (``2.13.0+cpu`` -> ``2.13.0``)."""
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def _copy_package(dest: Path) -> Path:
    """The gpt2lab sources (``*.py`` only, no caches) under ``dest/gpt2lab``, for ``code_paths``."""
    target = dest / "gpt2lab"
    target.mkdir(parents=True)
    for file in PACKAGE_DIR.glob("*.py"):
        shutil.copy2(file, target / file.name)
    return target


def log_model(
    classifier_dir: str | Path,
    base_dir: str | Path | None = None,
    name: str = "model",
    *,
    precision: str = "fp32",
    batch_size: int = 32,
    threshold: float = 0.5,
    device: str = "auto",
    run_id: str | None = None,
    tracking_uri: str | None = None,
    share_base: bool = True,
) -> Any:
    """Log the classifier as an MLflow pyfunc model; returns MLflow's ``ModelInfo``.

    Call it inside an active run (``mlflow.start_run()``), or pass ``run_id`` (and
    ``tracking_uri`` when the run is not in the default store) to log into that run.
    ``runs:/<run id>/<name>`` then loads or serves it.

    Args:
        classifier_dir: the trained classifier folder (``models/classifier``).
        base_dir: its base checkpoint; default: the path recorded at training time.
        precision, batch_size, threshold: how the served model classifies. They are stored as an
            artifact (``settings``), not as MLflow's ``model_config``, which MLflow would also log
            as run params beside the pipeline's; :data:`SETTINGS_ENV` overrides them where the
            model is loaded or served.
        device: where it runs when served: ``auto`` (a GPU when the serving machine has one),
            ``cpu``, ``cuda``, ``cuda:N``; a setting like the others.
        share_base: store the base checkpoint once per sha256 in the tracking store
            (:mod:`gpt2lab.basestore`) and put only a reference to it in the settings; False embeds a copy.
    """
    import mlflow

    classifier_dir = Path(classifier_dir).resolve()
    if base_dir is None:
        base_dir = read_classifier_meta(classifier_dir)["base"]["path"]
    base_dir = Path(base_dir).resolve()
    # Fail here, with gpt2lab's message, rather than inside MLflow's input-example check.
    # The precision and device are resolved where it is served; here only their names are checked.
    if precision not in ("auto", *DTYPES) or not DEVICE_PATTERN.fullmatch(device):
        allowed = " | ".join(("auto", *DTYPES))
        raise ClassifierError(f"precision {precision!r} or device {device!r}: allowed: {allowed} and {DEVICES}")
    Classifier.load(classifier_dir, base_dir, batch_size=batch_size, threshold=threshold, device="cpu")
    artifacts = {"classifier": str(classifier_dir)}
    settings: dict[str, Any] = {"precision": precision, "batch_size": batch_size, "threshold": threshold,
                                "device": device}  # fmt: skip
    if not share_base:
        artifacts["base"] = str(base_dir)
        if _ranks_path().is_file():
            artifacts["tokenizer"] = str(_ranks_path())
    with tempfile.TemporaryDirectory() as tmp:
        code = _copy_package(Path(tmp))
        artifacts["settings"] = str(Path(tmp) / "settings.json")
        kwargs = dict(
            name=name,
            python_model=str(MODEL_CODE),
            artifacts=artifacts,
            code_paths=[str(code)],
            signature=signature(),
            input_example=pd.DataFrame({INPUT_COLUMN: INPUT_EXAMPLE}),
            pip_requirements=pip_requirements(),
        )

        def log_in_active_run() -> Any:
            if share_base:  # the base once per sha256 in the store; the model holds a reference
                settings.update(_base_config(store_base(mlflow.get_tracking_uri(), base_dir, tokenizer=_ranks_path(),
                                                        artifact_location=_file_artifact_root())))  # fmt: skip
            write_atomic(artifacts["settings"], json.dumps(settings) + "\n")
            return mlflow.pyfunc.log_model(**kwargs)

        with global_store(tracking_uri):
            if run_id is not None and (mlflow.active_run() is None or mlflow.active_run().info.run_id != run_id):
                with mlflow.start_run(run_id=run_id):
                    info = log_in_active_run()
            else:
                info = log_in_active_run()
    log.info("logged the classifier as MLflow model %s", info.model_uri)
    return info


BASE_KEYS = {"sha256": "base_sha256", "run_id": "base_run_id", "tracking_uri": "base_tracking_uri"}


def _base_config(reference: dict[str, str]) -> dict[str, str]:
    """A base reference as flat settings entries (``base_sha256``, ``base_run_id``, ``base_tracking_uri``)."""
    return {key: reference[field] for field, key in BASE_KEYS.items()}


def base_reference(config: dict[str, Any]) -> dict[str, str] | None:
    """The base reference in a model's settings, or None (a model that embeds its base)."""
    if not config.get("base_sha256"):
        return None
    return {field: str(config.get(key) or "") for field, key in BASE_KEYS.items()}


def _file_artifact_root() -> str | None:
    """The active run's experiment's artifact location when it is a local folder (a SQLite store), else None.

    The bases experiment goes beside it, not into the working directory (a queued experiment's copy).
    """
    import mlflow

    run = mlflow.active_run()
    location = mlflow.get_experiment(run.info.experiment_id).artifact_location if run else None
    return location if location and location.startswith("file:") else None


def download_model(model_uri: str, dst: str | Path, *, tracking_uri: str | None = None) -> tuple[Path, Path]:
    """Download a model logged by :func:`log_model` (``runs:/<run id>/model``, ``models:/...``) into ``dst``.

    Returns its (classifier folder, base checkpoint folder), e.g. for :mod:`gpt2lab.export`; the
    BPE ranks it ships are put in the tokenizer cache when none is there.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        with global_store(tracking_uri):  # never MLflow's default store for part of a runs:/ URI
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst),
                                                        tracking_uri=tracking_uri)  # fmt: skip
    except (MlflowException, OSError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelDownloadError(f"{model_uri}: cannot download the MLflow model ({reason})") from err
    artifacts = Path(local) / "artifacts"
    classifier, base = artifacts / "classifier", artifacts / "base"
    if not (classifier / META_FILE).is_file():
        raise ModelDownloadError(f"{model_uri}: not a gpt2lab classifier model (no artifacts/classifier/{META_FILE})")
    _seed_tokenizer_cache(artifacts / _ranks_path().name)
    settings = artifacts / "settings.json"
    reference = base_reference(json.loads(settings.read_text()) if settings.is_file() else {})
    if reference is not None:
        base = resolve_base(reference, tracking_uri)
    return classifier, base
