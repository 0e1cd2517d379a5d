"""Base checkpoints stored once per sha256 in the MLflow tracking store, and found again on load.

A logged classifier (:func:`gpt2lab.serving.log_model`) carries only what was trained plus a
reference to its base: ``{"sha256", "run_id", "tracking_uri"}``. The base itself (the canonical
checkpoint folder with its manifest, and the GPT-2 BPE ranks file) is the artifacts of one run
of the ``gpt2lab-bases`` experiment per sha256, so ten experiments on ``gpt2-xl`` store its 6 GB
once, and each adds only its adapter.

Loading resolves the reference into a verified folder of the content-addressed cache
``$GPT2LAB_CACHE/bases/<sha256>/``: the cached copy if its bytes match, else a download from the
tracking store (``MLFLOW_TRACKING_URI`` / the caller's store first, then the one recorded at
logging time), checked against the sha256 before it is used. Nothing comes from the internet.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpt2lab.checkpoint import verify_checkpoint
from gpt2lab.errors import Gpt2labError
from gpt2lab.fileio import cache_dir, write_atomic

log = logging.getLogger(__name__)

EXPERIMENT = "gpt2lab-bases"
SHA_TAG = "gpt2lab.base_sha256"
BASE_PATH, TOKENIZER_PATH = "base", "tokenizer"  # artifact folders of a base run
WAIT_S = 1800.0  # how long to wait for another process uploading the same base
POLL_S = 2.0


class BaseNotFoundError(Gpt2labError, RuntimeError):
    """A model's base checkpoint cannot be found, or its bytes differ; the message says where it looked."""


def cache_path(sha256: str) -> Path:
    """The content-addressed folder of a base checkpoint: ``$GPT2LAB_CACHE/bases/<sha256>``."""
    return cache_dir() / "bases" / sha256


# --------------------------------------------------------------------------- storing


def _base_runs(client: Any, experiment_id: str, sha256: str) -> list[Any]:
    """Runs holding (or uploading) ``sha256``, oldest first; failed and deleted ones left out."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{SHA_TAG}` = '{sha256}'", max_results=100)
    alive = [r for r in runs if r.info.status in ("RUNNING", "FINISHED", "SCHEDULED")]
    return sorted(alive, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def _experiment(client: Any, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        try:
            return client.create_experiment(EXPERIMENT, artifact_location=artifact_location)
        except MlflowException:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(EXPERIMENT)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def store_base(tracking_uri: str, base_dir: str | Path, *, tokenizer: Path | None = None,
               artifact_location: str | None = None) -> dict[str, str]:  # fmt: skip
    """Make sure the tracking store at ``tracking_uri`` holds ``base_dir`` once; returns a model's reference to it.

    The first process to store a sha256 uploads it; a process that finds it stored (or being
    uploaded by another, which it then waits for) uploads nothing. ``artifact_location`` is used
    only when the ``gpt2lab-bases`` experiment is created (None: the server decides).
    """
    import mlflow

    sha256 = verify_checkpoint(base_dir)
    _cache_local_copy(Path(base_dir), sha256, tokenizer)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    reference = {"sha256": sha256, "tracking_uri": tracking_uri}
    experiment_id = _experiment(client, artifact_location)
    ours = None
    deadline = time.monotonic() + WAIT_S
    while True:
        runs = _base_runs(client, experiment_id, sha256)
        done = [r for r in runs if r.info.status == "FINISHED"]
        if done:
            if ours is not None:
                _withdraw(client, ours)
            return {**reference, "run_id": done[0].info.run_id}
        if ours is None:
            ours = client.create_run(experiment_id, run_name=f"base-{sha256[:12]}", tags={SHA_TAG: sha256}).info.run_id
            continue
        leader = runs[0].info.run_id if runs else ours
        if leader == ours:
            client.log_artifacts(ours, str(base_dir), BASE_PATH)
            if tokenizer is not None and tokenizer.is_file():
                client.log_artifact(ours, str(tokenizer), TOKENIZER_PATH)
            client.set_terminated(ours, status="FINISHED")
            log.info("stored base checkpoint sha256 %s in run %s", sha256, ours)
            return {**reference, "run_id": ours}
        if time.monotonic() > deadline:
            _withdraw(client, ours)
            raise BaseNotFoundError(f"gave up waiting {WAIT_S:.0f} s for run {leader} to store base sha256 {sha256}")
        time.sleep(POLL_S)  # another process uploads the same base: use its copy once it is finished


def _cache_local_copy(base_dir: Path, sha256: str, tokenizer: Path | None) -> None:
    """Put the (verified) base in the content-addressed cache, so loading the logged model here downloads nothing."""
    target = cache_path(sha256)
    if target.is_dir():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{sha256[:12]}-") as tmp:
        shutil.copytree(base_dir, Path(tmp) / "base")
        if tokenizer is not None and tokenizer.is_file():
            (Path(tmp) / "tokenizer").mkdir()
            shutil.copy2(tokenizer, Path(tmp) / "tokenizer" / tokenizer.name)
        with contextlib.suppress(OSError):  # another process was first
            os.replace(Path(tmp) / "tokenizer", target.with_name(sha256 + ".tokenizer"))
        with contextlib.suppress(OSError):
            os.replace(Path(tmp) / "base", target)


def _withdraw(client: Any, run_id: str) -> None:
    client.set_terminated(run_id, status="KILLED")
    client.delete_run(run_id)


# --------------------------------------------------------------------------- loading


def _candidate_uris(reference: Mapping[str, str], tracking_uri: str | None) -> list[str]:
    uris = [tracking_uri, os.environ.get("MLFLOW_TRACKING_URI"), reference.get("tracking_uri")]
    return list(dict.fromkeys(u for u in uris if u))


def _missing_sqlite(uri: str) -> bool:
    """A ``sqlite:///`` store whose file is absent (opening it would create an empty one)."""
    return uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file()


def resolve_base(reference: Mapping[str, str], tracking_uri: str | None = None) -> Path:
    """The verified local folder of the referenced base checkpoint (downloaded into the cache if needed).

    Raises :class:`BaseNotFoundError` naming the sha256 and every place looked in, with why each failed.
    """
    sha256, run_id = reference["sha256"], reference["run_id"]
    target = cache_path(sha256)
    tried = []
    if target.is_dir():
        try:
            if verify_checkpoint(target) == sha256:
                _seed_tokenizer(target.with_name(sha256 + ".tokenizer"))
                return target
            tried.append(f"{target} (weights have another sha256)")
        except Gpt2labError as err:
            tried.append(f"{target} ({err})")
    else:
        tried.append(f"{target} (absent)")
    for uri in _candidate_uris(reference, tracking_uri):
        where = f"runs:/{run_id}/{BASE_PATH} in {uri}"
        if _missing_sqlite(uri):
            tried.append(f"{where} (no such database)")
            continue
        try:
            return _download(run_id, sha256, uri, target)
        except Exception as err:  # noqa: BLE001 - MLflow, requests, OS or integrity errors: try the next place
            text = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            tried.append(f"{where} ({type(err).__name__}: {text})")
    raise BaseNotFoundError(
        f"base checkpoint sha256 {sha256} not found or not matching; looked in: " + "; ".join(tried)
        + ". Point MLFLOW_TRACKING_URI at the tracking store the model was logged to"
    )  # fmt: skip


def _download(run_id: str, sha256: str, uri: str, target: Path) -> Path:
    import mlflow

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{sha256[:12]}-") as tmp:
        local = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{BASE_PATH}", dst_path=tmp, tracking_uri=uri)
        actual = verify_checkpoint(local)
        if actual != sha256:
            raise BaseNotFoundError(f"the stored base's weights have sha256 {actual}")
        ranks = target.with_name(sha256 + ".tokenizer")
        try:
            tok = mlflow.artifacts.download_artifacts(
                f"runs:/{run_id}/{TOKENIZER_PATH}", dst_path=tmp, tracking_uri=uri
            )
            if not ranks.exists():
                os.replace(tok, ranks)
        except Exception:  # noqa: BLE001 - a base stored without the ranks: the tokenizer finds its own
            log.debug("no tokenizer stored with base %s", sha256)
        if target.exists():  # another process finished first; its copy is verified on next use
            shutil.rmtree(target, ignore_errors=True)
        os.replace(local, target)
    _seed_tokenizer(target.with_name(sha256 + ".tokenizer"))
    log.info("downloaded base checkpoint sha256 %s from %s into %s", sha256, uri, target)
    return target


def _seed_tokenizer(folder: Path) -> None:
    from gpt2lab.tokenizer import _ranks_path

    ranks = folder / _ranks_path().name
    if ranks.is_file() and not _ranks_path().is_file():
        write_atomic(_ranks_path(), ranks.read_bytes())  # the tokenizer verifies its sha256 on load
