"""Interrupting the train stage: a real process killed mid-epoch resumes to the same result.

The train stage runs as its own process (``python stages/train.py``) in a temporary folder laid
out like the repository, once without interruption and once killed twice mid-epoch (SIGKILL,
then SIGINT) and once more after training, while it writes its outputs, and restarted each time.
Between the kills nothing half-written may be visible; the last restart must resume at the
final step, not train again; at the end, the metrics and the saved adapter and head must equal
the uninterrupted run's, bit for bit. Another test interrupts the stage in-process while it
writes its results. (The instant of replacing the classifier folder is too short to hit with a
signal: tests/test_classifier_io.py interrupts it in-process at its worst point instead.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import gpt2lab.train as train_module
from gpt2lab.classifier_io import HEAD_FILE, META_FILE
from gpt2lab.dataset import parse_collection, split, write_split
from gpt2lab.lora import ADAPTER_FILE
from gpt2lab.params import ModelParams, WeightsParams
from gpt2lab.resume import CHECKPOINT_FILE, CHECKPOINTS_DIR
from gpt2lab.weights import fetch_weights

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "sms_small.tsv"
SEED = 7
BATCH = 8
CHECKPOINT_EVERY = 5
PARAMS = {
    "seed": SEED,
    "model": {"name": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_ctx": 128},
    "weights": {"source": "random"},
    # Dropout on: a resumed run must also continue the random stream, not only the weights.
    "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},
    "train": {"epochs": 2, "batch_size": BATCH, "lr": 1e-3, "eval_freq": 4, "eval_iter": 2, "precision": "bf16",
              "max_length": 64, "num_threads": 1, "checkpoint_every": CHECKPOINT_EVERY, "resume": True},
    "tracking": {"experiment": "interrupt"},
}  # fmt: skip
OUT = Path("models/classifier")
CKPT_DIR = Path(CHECKPOINTS_DIR)  # one subfolder per run fingerprint
METRICS = Path("metrics/train_details.json")  # steps, examples seen, accuracies (train.json: the headline)
HEADLINE = Path("metrics/train.json")
# Final metrics that must not depend on the interruption (timings do).
SAME = ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "steps", "examples_seen", "trainable_params")
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A repository-shaped folder: the stage script, params.yaml, a tiny random base, prepared splits."""
    root = tmp_path_factory.mktemp("repo")
    (root / "stages").mkdir()
    shutil.copy(REPO / "stages" / "train.py", root / "stages" / "train.py")
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    fetch_weights(ModelParams(**PARAMS["model"]), WeightsParams(source="random"), SEED, root / "models" / "base")
    # The fixture's 32 messages, 16 times: 358 training rows, 45 steps an epoch (~10 ms a step),
    # long enough to be caught between checkpoints.
    df = pd.concat([parse_collection(FIXTURE)] * 16, ignore_index=True)
    for name, part in split(df, SEED, train_frac=0.7, validation_frac=0.1).items():
        write_split(part, root / "data" / "prepared" / f"{name}.csv")
    return root


def _copy(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest)
    return dest


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}  # not inside a DVC run
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
        GPT2LAB_VERBOSE="1",  # the stage's INFO lines, which these tests wait for
    )
    return env


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; any still running when it ends (a failed assertion) are killed."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _start(root: Path, log_name: str, started: list[subprocess.Popen]) -> subprocess.Popen:
    log = open(root / log_name, "wb")  # noqa: SIM115 - closed with the process, in _wait
    proc = subprocess.Popen(
        [sys.executable, "stages/train.py"], cwd=root, env=_env(root), stdout=log, stderr=subprocess.STDOUT
    )
    proc.log = log  # type: ignore[attr-defined]
    started.append(proc)
    return proc


def _wait(proc: subprocess.Popen, timeout: float = TIMEOUT_S) -> int:
    try:
        return proc.wait(timeout)
    finally:
        proc.log.close()  # type: ignore[attr-defined]


def _run(root: Path, log_name: str, started: list[subprocess.Popen]) -> str:
    proc = _start(root, log_name, started)
    rc = _wait(proc)
    text = (root / log_name).read_text(errors="replace")
    assert rc == 0, text[-3000:]
    return text


def _ckpt(root: Path) -> Path:
    """The run's checkpoint file (its folder is named by the run's fingerprint); a missing path if none."""
    found = sorted((root / CKPT_DIR).glob(f"*/{CHECKPOINT_FILE}"))
    assert len(found) <= 1, found  # one run, one fingerprint
    return found[0] if found else root / CKPT_DIR / "none" / CHECKPOINT_FILE


def _checkpoint_step(path: Path) -> int | None:
    """The step of the checkpoint at ``path`` (replaced atomically, so never read half-written)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["step"]
    except FileNotFoundError:
        return None


def _kill_after_checkpoint(proc: subprocess.Popen, root: Path, sig: int, min_step: int) -> None:
    """Send ``sig`` as soon as a checkpoint at ``min_step`` or later exists."""
    seen = None
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"train ended (rc {proc.returncode}) before it could be interrupted"
        path = _ckpt(root)
        stat = path.stat() if path.exists() else None
        key = stat and (stat.st_ino, stat.st_mtime_ns)
        if key and key != seen:
            seen = key
            step = _checkpoint_step(path)
            if step is not None and step >= min_step:
                proc.send_signal(sig)
                return
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("no checkpoint appeared in time")


def _kill_after_log_line(proc: subprocess.Popen, log: Path, text: str, sig: int) -> None:
    """Send ``sig`` as soon as the process's log holds ``text``."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"train ended (rc {proc.returncode}) before it could be interrupted"
        if text in log.read_text(errors="replace"):
            proc.send_signal(sig)
            return
        time.sleep(0.002)
    proc.kill()
    raise AssertionError(f"{text!r} did not appear in {log.name} in time")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): _sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _junk(root: Path, but: str = "") -> list[str]:
    """Hidden temporary files or folders (``.name.xxx``) under the outputs' folders, except under ``but``."""
    found = []
    for folder in ("models", "metrics"):
        if (root / folder).exists():
            found += [str(p.relative_to(root)) for p in (root / folder).rglob(".*")]
    return [f for f in found if not (but and f.startswith(but))]


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_result(tmp_path, template, started):
    full = _copy(template, tmp_path / "full")
    _run(full, "train.log", started)
    reference = json.loads((full / METRICS).read_text())
    steps_per_epoch = reference["steps"] // PARAMS["train"]["epochs"]
    assert steps_per_epoch > 2 * CHECKPOINT_EVERY  # room for checkpoints inside each epoch
    assert not (full / CKPT_DIR).exists() and not _junk(full)

    # A previous, complete output stands in place: an interrupted run must leave it untouched.
    root = _copy(template, tmp_path / "interrupted")
    shutil.copytree(full / OUT, root / OUT)
    (root / OUT / "previous-run").write_text("replaced only by a finished run\n")
    previous = _tree(root / OUT)

    # 1. SIGKILL (no clean-up at all) right after the first checkpoint, in epoch 1.
    proc = _start(root, "kill.log", started)
    _kill_after_checkpoint(proc, root, signal.SIGKILL, min_step=1)
    assert _wait(proc) == -signal.SIGKILL
    assert _tree(root / OUT) == previous and not (root / METRICS).exists()
    assert not _junk(root, but=str(CKPT_DIR))  # a checkpoint's temp file is overwritten by the next one
    killed_at = _checkpoint_step(_ckpt(root))  # the complete last checkpoint, ready to resume
    assert killed_at is not None and 0 < killed_at < steps_per_epoch

    # 2. Restarted, it resumes there; SIGINT (Ctrl-C) it mid-way through epoch 2.
    proc = _start(root, "int.log", started)
    _kill_after_checkpoint(proc, root, signal.SIGINT, min_step=steps_per_epoch + 1)
    rc = _wait(proc)
    log = (root / "int.log").read_text(errors="replace")
    assert rc == 130 and "interrupted" in log, log[-3000:]
    assert f"at step {killed_at} (epoch 1)" in log, log[-3000:]
    assert _tree(root / OUT) == previous and not (root / METRICS).exists()
    assert not _junk(root, but=str(CKPT_DIR))
    last = _checkpoint_step(_ckpt(root))
    assert last is not None and steps_per_epoch < last < reference["steps"]

    # 3. Restarted again, it trains from the last checkpoint; SIGKILL it once training is done, while
    #    the stage writes its outputs: the checkpoint must still be there.
    proc = _start(root, "logging.log", started)
    _kill_after_log_line(proc, root / "logging.log", "gpt2lab.train: trained in", signal.SIGKILL)
    assert _wait(proc) == -signal.SIGKILL
    log = (root / "logging.log").read_text(errors="replace")
    assert f"at step {last} (epoch 2)" in log, log[-3000:]
    assert _checkpoint_step(_ckpt(root)) == reference["steps"]  # taken at the final step

    # 4. Restarted once more, it resumes after the final step (no training) and finishes.
    log = _run(root, "resume.log", started)
    assert f"at step {reference['steps']}: training had finished" in log, log[-3000:]
    resumed = {**json.loads((root / METRICS).read_text()), **json.loads((root / HEADLINE).read_text())}
    reference = {**reference, **json.loads((full / HEADLINE).read_text())}
    assert {k: resumed[k] for k in SAME} == {k: reference[k] for k in SAME}
    for name in (ADAPTER_FILE, HEAD_FILE):
        assert _sha256(root / OUT / name) == _sha256(full / OUT / name), name
    assert json.loads((root / OUT / META_FILE).read_text()) == json.loads((full / OUT / META_FILE).read_text())
    assert not (root / OUT / "previous-run").exists()  # the output was replaced as a whole
    assert (root / "metrics/train_curve.tsv").read_bytes() == (full / "metrics/train_curve.tsv").read_bytes()
    assert not (root / CKPT_DIR).exists() and not _junk(root)
    assert not (root / "mlflow.db").exists()  # training never waits on the tracking store (the track stage logs)


def test_stage_keeps_its_checkpoint_until_its_outputs_are_written(tmp_path, template, monkeypatch, caplog):
    """Interrupted at its last act (writing the plots), the stage resumes at the final step."""
    root = _copy(template, tmp_path / "repo")
    params = {**PARAMS, "train": {**PARAMS["train"], "epochs": 1}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(root)
    for key in [k for k in os.environ if k.startswith("DVC_")]:
        monkeypatch.delenv(key)  # not inside a DVC run
    caplog.set_level(logging.INFO, logger="gpt2lab.train")
    stage = runpy.run_path(str(root / "stages" / "train.py"))  # not as __main__: its main() is called here

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the stage draws its plots, its last output

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "save_train_plots", interrupted)
        with pytest.raises(KeyboardInterrupt):
            stage["main"]()
    steps = json.loads((root / METRICS).read_text())["steps"]  # written before the plots
    assert _checkpoint_step(_ckpt(root)) == steps
    caplog.clear()
    stage["main"]()
    assert f"at step {steps}: training had finished" in caplog.text
    assert not (root / CKPT_DIR).exists() and not _junk(root)
