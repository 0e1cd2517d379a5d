"""The MLflow Model Registry: each trained classifier is a new version of one registered model.

:func:`register` adds a version (tagged with the run's test metrics, DVC experiment name, git
commit and whether the base was pretrained); :func:`promote` moves an alias (``champion``) to a
version, so ``models:/gpt2lab-spam@champion`` names whatever the team promoted last;
:func:`serve_command` is the one command line that serves a version from any directory.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from gpt2lab.errors import Gpt2labError

log = logging.getLogger(__name__)

DEFAULT_ALIAS = "champion"
SERVE_PORT = 5001


class RegistryError(Gpt2labError, RuntimeError):
    """A registered model, version or alias is missing or cannot be set; the message says which."""


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    run_id: str | None
    tags: Mapping[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _client(tracking_uri: str) -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@contextlib.contextmanager
def global_store(tracking_uri: str | None) -> Iterator[None]:
    """MLflow resolves some URIs (a version's source, part of a ``runs:/`` URI) through its global
    store, whatever store the call names: point it at ``tracking_uri`` meanwhile (None or "": leave it)."""
    import mlflow

    if not tracking_uri:
        yield
        return
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def register(tracking_uri: str, name: str, model: Any, run_id: str, tags: Mapping[str, Any]) -> Version:
    """Register ``model`` (MLflow's ``ModelInfo`` of a logged model) as a new version of ``name``."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        client.create_registered_model(name, description="gpt2lab's SMS spam classifier; one version per training run")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another experiment registered it first: fine
            raise
    tags = {k: str(v) for k, v in tags.items()}
    with global_store(tracking_uri):
        mv = client.create_model_version(name, source=model.model_uri, run_id=run_id, tags=tags,
                                         model_id=getattr(model, "model_id", None))  # fmt: skip
    log.info("registered %s as version %s of %s", model.model_uri, mv.version, name)
    return Version(name, str(mv.version), run_id, tags)


def promote(tracking_uri: str, name: str, version: str, alias: str = DEFAULT_ALIAS) -> Version:
    """Point ``alias`` of registered model ``name`` at ``version``; returns that version."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as err:
        try:
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        except MlflowException:
            versions = []
        known = f"its versions: {', '.join(map(str, versions))}" if versions else "it has no versions"
        raise RegistryError(
            f"registered model {name!r} has no version {version} in {tracking_uri} ({known}); "
            "each pipeline run that trains registers one"
        ) from err
    client.set_registered_model_alias(name, alias, mv.version)
    return Version(name, str(mv.version), mv.run_id, dict(mv.tags or {}))


def serve_command(tracking_uri: str, model_uri: str, port: int = SERVE_PORT) -> str:
    """The command that serves ``model_uri`` from any directory (the store is named, not looked up)."""
    return (f"MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)} mlflow models serve -m {shlex.quote(model_uri)} "
            f"--env-manager local --port {port}")  # fmt: skip
