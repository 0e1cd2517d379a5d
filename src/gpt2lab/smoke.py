"""The smoke profile: the whole DVC pipeline offline in minutes, as a DVC experiment.

``params-smoke.yaml`` holds the values the profile sets over ``params.yaml`` (random weights,
a tiny model, a short training). :func:`smoke_command` turns them into
``dvc exp run --temp -S key=value ...``: the experiment runs in a copy of the repository, so
the workspace's ``params.yaml`` and ``dvc.lock`` stay exactly as committed (``make repro``
still runs the real pipeline), and its results land in ``dvc exp show`` and, like every run,
in MLflow. When it succeeds, :func:`run_smoke` prints the next steps: commands that use the
experiment's MLflow model (``runs:/<id>/model``) as they are, from the repository root.

DVC runs through this module (``python -m gpt2lab.smoke exp run ...``): DVC's own command line
minus one warning. Checking out the experiment's copy, DVC warns once per output that the
committed ``dvc.lock`` names outputs this clone has never built ("No file hash info found ...
It won't be created"); the run builds them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from gpt2lab.params import Params, ParamsError, flatten, read_yaml

SMOKE_FILE = "params-smoke.yaml"
RUN_RECORD = "models/mlflow_run.json"  # the track stage's record of its MLflow run
# Where DVC (dvc-data) warns of outputs a checkout cannot create, and the warning's words.
CHECKOUT_LOGGERS = ("dvc_data.index.checkout", "dvc_data.hashfile.checkout")
NOT_BUILT_YET = "No file hash info found"
TEMP_COPIES = ".dvc/tmp/exps/standalone"  # where `dvc exp run --temp` makes its copy of the repository
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


def parse_set_param(arg: str) -> tuple[str, Any]:
    """``"lora.rank=4"`` -> ``("lora.rank", 4)``: the value read as YAML, as Hydra reads simple overrides."""
    key, sep, text = arg.partition("=")
    if not sep or not key:
        raise ParamsError(f"-S {arg}: expected KEY=VALUE, e.g. -S lora.rank=4")
    try:
        return key, yaml.safe_load(text)
    except yaml.YAMLError:
        return key, text  # left to DVC's own parser


def _merged(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = json.loads(json.dumps(base))  # a deep copy
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if name:
            merged.setdefault(section, {})[name] = value
        else:
            merged[section] = value
    return merged


def load_overrides(
    path: str | Path, params_path: str | Path = "params.yaml", set_params: Sequence[str] = ()
) -> dict[str, Any]:
    """The profile's ``{"section.key": value}``, then ``-S KEY=VALUE`` overrides over it; all of
    params.yaml as the experiment will see it is validated before anything runs (a bad value costs
    no stage its outputs and leaves no MLflow run)."""
    profile = read_yaml(path)
    if not isinstance(profile, dict):
        raise ParamsError(f"{path}: expected a mapping of params sections, got {type(profile).__name__}")
    overrides = flatten(profile)
    try:
        Params.from_dict(_merged(read_yaml(params_path), overrides))
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from err
    extra = dict(parse_set_param(arg) for arg in set_params)
    try:
        Params.from_dict(_merged(read_yaml(params_path), {**overrides, **extra}))
    except ParamsError as err:
        raise ParamsError(f"-S: {err}") from err
    return overrides


def set_param_args(overrides: Mapping[str, Any]) -> list[str]:
    """``["-S", "model.n_layer=2", ...]``."""
    return [arg for key, value in overrides.items() for arg in ("-S", f"{key}={override_value(value)}")]


def smoke_command(root: str | Path = ".", extra: Sequence[str] = (), set_params: Sequence[str] = ()) -> list[str]:
    """The ``dvc exp run --temp`` command line of the smoke profile, with ``-S`` ``set_params`` over it
    and ``extra`` DVC arguments; raises :class:`ParamsError` before anything runs if a value is bad."""
    root = Path(root)
    overrides = load_overrides(root / SMOKE_FILE, root / "params.yaml", set_params)
    given = dict(parse_set_param(arg) for arg in set_params)
    profile = {k: v for k, v in overrides.items() if k not in given}  # the user's -S wins
    return [sys.executable, "-m", __name__, "exp", "run", "--temp", *set_param_args(profile),
            *(a for kv in set_params for a in ("-S", kv)), *extra]  # fmt: skip


def experiment_refs(root: str | Path) -> set[str]:
    """The git refs of the repository's DVC experiments (``refs/exps/<baseline>/<name>``)."""
    done = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], cwd=root,
                          capture_output=True, text=True, check=False)  # fmt: skip
    return {ref for ref in done.stdout.split() if len(ref.split("/")) == 5}  # not DVC's own exec/celery refs


def stage_env() -> dict[str, str]:
    """The environment for DVC: this interpreter's ``bin`` first, so stage commands' ``python`` is it."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return env


def run_smoke(root: str | Path = ".", extra: Sequence[str] = (), set_params: Sequence[str] = ()) -> int:
    """Run the smoke profile; returns DVC's exit status.

    Ctrl-C reaches DVC and the stage it runs directly (one process group), so the stage stops
    as it would alone: training keeps its checkpoint under the repository root, and the same
    command again resumes it. The temporary copy DVC leaves behind after an interruption is
    removed.
    """
    refs = experiment_refs(root)
    cmd = smoke_command(root, extra, set_params)
    print("$ dvc " + " ".join(cmd[3:]), flush=True)
    copies = Path(root) / TEMP_COPIES
    before = set(copies.iterdir()) if copies.is_dir() else set()
    proc = subprocess.Popen(cmd, cwd=root, env=stage_env())
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # DVC hears Ctrl-C itself; wait for it to stop
    try:
        code = proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    if code and copies.is_dir():
        for left in set(copies.iterdir()) - before:
            if not _in_use(left):
                shutil.rmtree(left, ignore_errors=True)
    new = sorted(experiment_refs(root) - refs)
    if code == 0 and new:
        print("\n" + next_steps(new[0].rsplit("/", 1)[-1], experiment_record(root, new[0])), flush=True)
    return code


def experiment_record(root: str | Path, ref: str) -> dict[str, Any] | None:
    """The track stage's record (MLflow run, model URI) in the experiment at git ``ref``, read through
    DVC's API (the file is in DVC's cache; the copy the experiment ran in is gone); None if absent."""
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        return json.loads(dvc.api.read(RUN_RECORD, repo=str(root), rev=ref))
    except (DvcException, OSError, ValueError):
        return None


def next_steps(name: str, record: Mapping[str, Any] | None) -> str:
    """What to do with a finished smoke experiment: commands that run as printed, from the repository root."""
    lines = [f"Smoke experiment {name!r} done (random weights: it checks the pipeline, not spam).", "Next:"]
    if record:
        model = f"runs:/{record['run_id']}/model"  # the record's models:/m-... is the same model, less readable
        url = f"http://127.0.0.1:5000/#/experiments/{record['experiment_id']}/runs/{record['run_id']}"
        lines += [
            f"  gpt2lab classify --model {model} 'WINNER!! Claim your free prize now' 'see you at lunch?'",
            f"  gpt2lab generate --model {model} 'Every effort moves you'",
            f"  gpt2lab serve {model}    # POST http://127.0.0.1:5001/invocations; Ctrl-C stops it",
            f"  make ui    # the MLflow UI; this run: {url}",
        ]
        if record.get("model_version"):
            lines.append(f"  gpt2lab promote {record['model_version']}    # alias champion: "
                         f"models:/{record['registered_model']}@champion")  # fmt: skip
    lines += [
        "  dvc exp show --only-changed --drop 'src/|stages/|data/|models/|metrics$'    # compare (dvc exp diff: two)",
        f"  dvc exp apply {name}    # its params and outputs into the workspace (undo: git checkout params.yaml dvc.lock)",
    ]
    return "\n".join(lines)


class _BuiltByTheRun(logging.Filter):
    """Drops DVC's "No file hash info found for X. It won't be created." (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return NOT_BUILT_YET not in str(record.msg)


def dvc_main(argv: Sequence[str]) -> int:
    """DVC's command line (``dvc ARGV``) without the warning :class:`_BuiltByTheRun` drops."""
    from dvc.cli import main

    for name in CHECKOUT_LOGGERS:
        logging.getLogger(name).addFilter(_BuiltByTheRun())
    return main(list(argv))


def _in_use(folder: Path) -> bool:
    """Whether a running process works in ``folder`` (another experiment's copy, not ours to remove)."""
    folder = folder.resolve()
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if Path(os.readlink(cwd)).is_relative_to(folder):
                return True
        except OSError:
            continue
    return False


if __name__ == "__main__":
    sys.exit(dvc_main(sys.argv[1:]))
