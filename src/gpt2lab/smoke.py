"""The smoke profile: the whole DVC pipeline offline in minutes, as a DVC experiment.

``params-smoke.yaml`` holds the values the profile sets over ``params.yaml`` (random weights,
a tiny model, a short training). :func:`smoke_command` turns them into
``dvc exp run --temp -S key=value ...``: the experiment runs in a copy of the repository, so
the workspace's ``params.yaml`` and ``dvc.lock`` stay exactly as committed, and its results
land in ``dvc exp show`` and, like every run, in MLflow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from gpt2lab.params import Params, ParamsError, flatten

SMOKE_FILE = "params-smoke.yaml"
_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_./:+-]*")  # what Hydra's override grammar reads unquoted


def override_value(value: Any) -> str:
    """``value`` in the Hydra override syntax that ``dvc exp run -S`` parses."""
    if isinstance(value, str):
        if _BARE.fullmatch(value) and value.lower() not in ("null", "true", "false", "nan", "inf"):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    return json.dumps(value)  # numbers, booleans, null


def load_overrides(path: str | Path, params_path: str | Path = "params.yaml") -> dict[str, Any]:
    """The profile's ``{"section.key": value}``, checked against ``params.yaml`` before anything runs."""
    overrides = flatten(yaml.safe_load(Path(path).read_text()) or {})
    base = yaml.safe_load(Path(params_path).read_text()) or {}
    merged = json.loads(json.dumps(base))  # a deep copy
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if name:
            merged.setdefault(section, {})[name] = value
        else:
            merged[section] = value
    try:
        Params.from_dict(merged)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from err
    return overrides


def set_param_args(overrides: Mapping[str, Any]) -> list[str]:
    """``["-S", "model.n_layer=2", ...]``."""
    return [arg for key, value in overrides.items() for arg in ("-S", f"{key}={override_value(value)}")]


def smoke_command(root: str | Path = ".", extra: Sequence[str] = ()) -> list[str]:
    """The ``dvc exp run --temp`` command line of the smoke profile, plus ``extra`` DVC arguments."""
    root = Path(root)
    overrides = load_overrides(root / SMOKE_FILE, root / "params.yaml")
    return [sys.executable, "-m", "dvc", "exp", "run", "--temp", *set_param_args(overrides), *extra]


def stage_env() -> dict[str, str]:
    """The environment for DVC: this interpreter's ``bin`` first, so stage commands' ``python`` is it."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return env


def run_smoke(root: str | Path = ".", extra: Sequence[str] = ()) -> int:
    """Run the smoke profile; returns DVC's exit status."""
    cmd = smoke_command(root, extra)
    print("$ dvc " + " ".join(cmd[3:]), flush=True)
    return subprocess.run(cmd, cwd=root, env=stage_env(), check=False).returncode
