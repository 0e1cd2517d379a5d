"""Resumable training: an interrupted run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2lab.lora import ADAPTER_FILE
from gpt2lab.params import LoRAParams, TrainParams
from gpt2lab.resume import CHECKPOINT_FILE, checkpoints_root, remove_checkpoint
from gpt2lab.train import train_classifier

LORA = LoRAParams(rank=4, alpha=8.0)


def _params(**kw) -> TrainParams:
    defaults = dict(epochs=2, batch_size=8, lr=3e-3, eval_freq=3, eval_iter=2, precision="fp32", num_threads=1)
    return TrainParams(**{**defaults, **kw})


class _Stop(Exception):
    pass


# Resumed at step 13 (end of epoch 2, 6 steps each, or step 12), or mid-epoch at step 11.
@pytest.mark.parametrize(("checkpoint_every", "first_step"), [(0, 13), (4, 13), (5, 11)])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, train_inputs, checkpoint_every, first_step):
    base, data = train_inputs
    train = _params(epochs=3, checkpoint_every=checkpoint_every)
    lora = dataclasses.replace(LORA, dropout=0.2)  # dropout: the RNG state must be restored too
    ckpt = tmp_path / "ckpt"
    full = train_classifier(base, data, tmp_path / "full", lora, train, seed=2, checkpoint_dir=tmp_path / "c0")
    # Kept, taken at the final step: the caller removes it once the results are safe (logged), and
    # a run stopped before that (killed while logging) resumes there: no step is trained again.
    (kept,) = (tmp_path / "c0").glob(f"*/{CHECKPOINT_FILE}")  # in a folder named by the run's fingerprint
    assert full["checkpoint_dir"] == str(kept.parent)
    final = torch.load(kept, map_location="cpu", weights_only=True)
    assert final["step"] == full["metrics"]["steps"] == 18
    after = train_classifier(base, data, tmp_path / "after", lora, train, seed=2, checkpoint_dir=tmp_path / "c0",
                             callback=lambda kind, r: pytest.fail(f"trained again: {kind} {r}"))  # fmt: skip
    assert after["history"] == full["history"] and after["metrics"]["val_loss"] == full["metrics"]["val_loss"]
    remove_checkpoint(full["checkpoint_dir"])
    assert not (tmp_path / "c0").exists()  # its folder, and the root left empty, are gone

    def stop_at_14(kind, record):
        if kind == "step" and record["step"] == 14:
            raise _Stop

    with pytest.raises(_Stop):
        train_classifier(base, data, tmp_path / "x", lora, train, seed=2, checkpoint_dir=ckpt, callback=stop_at_14)
    assert len(list(ckpt.glob(f"*/{CHECKPOINT_FILE}"))) == 1 and not (tmp_path / "x").exists()
    steps_seen = []
    resumed = train_classifier(
        base, data, tmp_path / "x", lora, train, seed=2, checkpoint_dir=ckpt,
        callback=lambda kind, r: steps_seen.append(r["step"]) if kind == "step" else None,
    )  # fmt: skip
    assert steps_seen[0] == first_step  # after the last checkpoint before step 14
    assert resumed["history"] == full["history"]
    ta, tb = load_file(str(tmp_path / "full" / ADAPTER_FILE)), load_file(str(tmp_path / "x" / ADAPTER_FILE))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_checkpoint_of_other_params_is_not_resumed(tmp_path, train_inputs):
    base, data = train_inputs
    ckpt = tmp_path / "ckpt"

    def stop(kind, record):
        if kind == "step" and record["step"] == 7:
            raise _Stop

    with pytest.raises(_Stop):
        train_classifier(base, data, tmp_path / "x", LORA, _params(), seed=2, checkpoint_dir=ckpt, callback=stop)
    steps = []
    other = train_classifier(base, data, tmp_path / "x", LORA, _params(lr=1e-3), seed=2, checkpoint_dir=ckpt,
                             callback=lambda kind, r: steps.append(r["step"]) if kind == "step" else None)  # fmt: skip
    assert steps[0] == 1
    # Each run keeps its own: the interrupted one is still there to resume, beside the new one.
    assert len(list(ckpt.glob(f"*/{CHECKPOINT_FILE}"))) == 2
    remove_checkpoint(other["checkpoint_dir"])
    assert len(list(ckpt.glob(f"*/{CHECKPOINT_FILE}"))) == 1 and ckpt.exists()


def test_checkpoints_live_under_the_repository_root_also_for_temporary_experiment_copies(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert checkpoints_root() == Path(".") / "models" / ".train-checkpoints"
    monkeypatch.setenv("DVC_ROOT", "/repo")  # DVC names the original repository in --temp / --queue copies
    assert checkpoints_root() == Path("/repo/models/.train-checkpoints")
