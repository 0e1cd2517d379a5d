"""A temporary clone of the working tree with real DVC and MLflow, for the end-to-end tests."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


# Records, per DVC stage, which gpt2lab files the stage process really imported.
IMPORT_HOOK = """\
import atexit, json, os, sys
if os.environ.get("GPT2LAB_IMPORT_LOG") and os.environ.get("DVC_STAGE"):
    def _dump():
        files = sorted({getattr(m, "__file__", None) or "" for n, m in list(sys.modules.items())
                        if n == "gpt2lab" or n.startswith("gpt2lab.")} - {""})
        path = os.path.join(os.environ["GPT2LAB_IMPORT_LOG"], os.environ["DVC_STAGE"] + ".json")
        with open(path, "w") as f:
            json.dump(files, f)
    atexit.register(_dump)
"""


def clone(dest: Path) -> None:
    """The working tree as it is (tracked and untracked, not ignored files) as a fresh one-commit repo."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    for args in (["init", "-q"], ["config", "user.name", "gpt2lab test"], ["config", "user.email", "test@gpt2lab"],
                 ["add", "-A"], ["commit", "-qm", "clone"]):  # fmt: skip
        subprocess.run(["git", *args], cwd=dest, check=True)


class Repo:
    """A temporary clone with an environment that runs its own code with this interpreter."""

    def __init__(self, root: Path, hook_dir: Path, import_log: Path) -> None:
        self.root = root
        self.import_log = import_log
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
        env.update(
            PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            PYTHONPATH=os.pathsep.join([str(root / "src"), str(hook_dir)]),  # this clone's gpt2lab
            MLFLOW_DISABLE_TELEMETRY="true",
            DO_NOT_TRACK="1",
            GPT2LAB_IMPORT_LOG=str(import_log),
        )
        self.env = env
        self.db = root / "mlflow.db"

    def run(self, *args: str, check: bool = True, timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
        done = subprocess.run(args, cwd=self.root, env={**self.env, **env}, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done

    def dvc(self, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "dvc", *args, check=check, **env)

    def use_this_venv(self) -> None:
        """Give the clone this interpreter's virtual environment as its ``.venv``, so ``make`` targets
        run as in a set-up checkout (and never set one up: the Makefile's stamp is newer than pyproject)."""
        (self.root / ".venv").symlink_to(Path(sys.executable).parent.parent)
        os.utime(self.root / "pyproject.toml", (0, 0))

    def smoke(self, name: str, *args: str) -> str:
        done = self.run(sys.executable, "-m", "gpt2lab.cli", "smoke", "-n", name, *args)
        return done.stdout + done.stderr

    def status(self) -> dict:
        """``dvc status --json``: the stages whose deps, params or outputs changed."""
        return json.loads(self.dvc("status", "--json").stdout or "{}")

    def runs(self) -> dict[str, object]:
        """MLflow runs of the gpt2lab experiment by name (names are unique in this scenario)."""
        import mlflow

        client = mlflow.MlflowClient(f"sqlite:///{self.db}")
        exp = client.get_experiment_by_name("gpt2lab")
        return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


QUEUE_TIMEOUT_S = 900
# `dvc queue status` fails now and then with a JSON error while its workers run: it read a task's
# info file half-written (as in treeverse/dvc#8014); the next poll reads it whole.
TORN_READ = ("Expecting value", "Extra data", "Unterminated string")


def wait_for_queue(repo: Repo, names: tuple[str, ...]) -> dict[str, str]:
    """Poll ``dvc queue status`` until the named experiments succeeded or failed; their states."""
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while True:
        try:
            table = repo.dvc("queue", "status").stdout
        except AssertionError as err:
            if not any(sign in str(err) for sign in TORN_READ) or time.monotonic() > deadline:
                raise
            time.sleep(1)  # DVC read a task's JSON file while a worker was writing it: ask again
            continue
        status = {n: s for n, s in re.findall(r"^\w+\s+(\S+)\s+.*?\s(Queued|Running|Success|Failed)\s*$", table, re.M)}
        if all(status.get(n) in ("Success", "Failed") for n in names) or time.monotonic() > deadline:
            return status
        time.sleep(5)


def start_queue(repo: Repo, jobs: int = 2) -> None:
    """``dvc queue start -j N``; the workers it leaves running must not hold this process's pipes: no capture."""
    started = subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs)], cwd=repo.root,
                             env=repo.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)  # fmt: skip
    assert started.returncode == 0


def executed(out: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", out))


