"""Resumable training checkpoints: when to write them, where, and whether one belongs to this run.

A checkpoint holds the trainable tensors, the optimizer and schedule, the RNG state and the
position in the epoch; it resumes only a run with the same fingerprint (params that change
the result, base weights, data). It is written atomically and kept until the caller removes
it with :func:`remove_checkpoint`, once everything that uses the run is safe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gpt2lab.errors import Gpt2labError
from gpt2lab.fileio import sha256_file
from gpt2lab.params import LoRAParams, TrainParams, neutral_keys

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINTS_DIR = "models/.train-checkpoints"  # under the repository root (not a stage output)
# Settings that do not change the result: a checkpoint written under other values still resumes.
NOT_FINGERPRINTED = neutral_keys(TrainParams)


def checkpoints_root() -> Path:
    """Where training checkpoints live: under the repository root (``DVC_ROOT``, which DVC sets to
    the original repository also in ``--temp`` and ``--queue`` runs), so that a rerun of an
    interrupted experiment, in a new temporary copy, finds its checkpoint."""
    return Path(os.environ.get("DVC_ROOT") or ".") / CHECKPOINTS_DIR


def fingerprint(lora: LoRAParams, train: TrainParams, seed: int, base_sha256: str, data_files: Sequence[Path]) -> str:
    """Hash of everything that determines the result: a checkpoint resumes only into the same run."""
    train_dict = {k: v for k, v in dataclasses.asdict(train).items() if k not in NOT_FINGERPRINTED}
    spec = {
        "lora": dataclasses.asdict(lora) if train.mode == "lora" else None,
        "train": train_dict,
        "seed": seed,
        "base": base_sha256,
        "data": [sha256_file(f) for f in data_files],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=list).encode()).hexdigest()


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


class CheckpointWriteError(Gpt2labError, OSError):
    """The training checkpoint could not be written (a full disk, most often)."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a resumable checkpoint atomically (temp file + rename); the previous one stays on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError of its zip writer
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CheckpointWriteError(
            f"could not write the training checkpoint {path} ({first}); {free / 2**20:.0f} MiB free on that disk: "
            "free some space and run it again (it resumes from the previous checkpoint)"
        ) from err


def load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to this run (same fingerprint), else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception as err:  # noqa: BLE001 - a torn or foreign file: start over, do not crash
        log.warning("ignoring unreadable checkpoint %s (%s); training from the start", path, err)
        return None
    if state.get("fingerprint") != fingerprint:
        log.info("checkpoint %s is from other params, base or data; training from the start", path)
        return None
    return state


def remove_checkpoint(checkpoint_dir: str | Path) -> None:
    """Delete the resumable checkpoint in ``checkpoint_dir`` (and the folder and its parent, when left empty).

    Call it only once the run's results are safe everywhere they go: until then a re-run
    resumes from the checkpoint (the last one is taken at the final step) instead of step 0.
    """
    folder = Path(checkpoint_dir)
    path = folder / CHECKPOINT_FILE
    path.unlink(missing_ok=True)
    _tmp(path).unlink(missing_ok=True)  # left by a kill while a checkpoint was written
    for empty in (folder, folder.parent):
        with contextlib.suppress(OSError):  # absent, or holds other files (another run's): leave it
            empty.rmdir()


@dataclasses.dataclass(frozen=True)
class Checkpointer:
    """Where a run's checkpoint lives and when it is due.

    ``every`` optimizer steps (0 = at the end of each epoch), and always at the final step, so
    a kill after training (while saving or logging) costs no steps.
    """

    path: Path
    fingerprint: str
    every: int
    steps_per_epoch: int
    total_steps: int

    def due(self, step: int, batch_in_epoch: int) -> bool:
        """Whether to save after global ``step``, the ``batch_in_epoch``-th batch of its epoch."""
        if step == self.total_steps:
            return True
        return step % self.every == 0 if self.every else batch_in_epoch == self.steps_per_epoch

    def save(self, state: dict[str, Any]) -> None:
        save_checkpoint(self.path, {"fingerprint": self.fingerprint, **state})

    def load(self) -> dict[str, Any] | None:
        return load_checkpoint(self.path, self.fingerprint)
