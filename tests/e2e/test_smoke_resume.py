"""Ctrl-C during `gpt2lab smoke` (a `dvc exp run --temp` experiment), then the same command again:
training resumes at its checkpoint, and the interrupted run leaves no temporary copy behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt2lab.resume import CHECKPOINT_FILE, CHECKPOINTS_DIR
from tests.e2e.repo import IMPORT_HOOK, Repo, clone, executed

TIMEOUT_S = 600


@pytest.mark.slow
def test_ctrl_c_then_the_same_command_resumes_the_experiment(tmp_path: Path) -> None:
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(IMPORT_HOOK)
    (tmp_path / "repo").mkdir()
    clone(tmp_path / "repo")
    repo = Repo(tmp_path / "repo", tmp_path / "hook", tmp_path)
    cmd = [sys.executable, "-m", "gpt2lab.cli", "smoke", "-n", "resumable", "-S", "train.epochs=3",
           "-S", "train.checkpoint_every=25"]  # fmt: skip
    checkpoints = repo.root / CHECKPOINTS_DIR
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(cmd, cwd=repo.root, env=repo.env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + TIMEOUT_S
            step = 0
            while step < 50:  # well into training: two checkpoints taken
                assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint in time"
                found = list(checkpoints.glob(f"*/{CHECKPOINT_FILE}"))
                if found:
                    try:
                        step = torch.load(found[0], map_location="cpu", weights_only=True)["step"]
                    except (OSError, RuntimeError, EOFError):
                        pass  # being replaced
                time.sleep(0.2)
            os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole process group
            assert first.wait(timeout=120) != 0
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
    copies = repo.root / ".dvc" / "tmp" / "exps" / "standalone"
    assert not (copies.is_dir() and list(copies.iterdir())), "the interrupted run left its temporary copy"
    (kept,) = checkpoints.glob(f"*/{CHECKPOINT_FILE}")  # under the repository root, not in the copy
    at = torch.load(kept, map_location="cpu", weights_only=True)["step"]
    assert at >= 50

    again = repo.run(*cmd, timeout=TIMEOUT_S)
    out = again.stdout + again.stderr
    assert f"at step {at} (epoch" in out, out[-3000:]  # resumed where it stopped, not at step 1
    assert "train" in executed(out) and not checkpoints.exists()  # removed once the results were saved
    assert re.search(r"Ran experiment\(s\): resumable", out)
