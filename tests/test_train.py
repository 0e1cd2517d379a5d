"""Training loop: learns, is deterministic, resumes exactly, writes its outputs."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from gpt2lab.classifier import META_FILE, load_classifier, predict_proba
from gpt2lab.config import LoRAParams, TrainParams
from gpt2lab.lora import ADAPTER_FILE
from gpt2lab.train import (
    CHECKPOINT_FILE,
    CURVE_COLUMNS,
    lr_factor,
    remove_checkpoint,
    train_classifier,
    write_outputs,
)
from gpt2lab.weights import random_checkpoint

SPAM_WORDS = "WIN FREE cash prize claim URGENT txt now reply call £1000 winner offer".split()
HAM_WORDS = "see you at home later mum dinner ok going sorry meeting tomorrow love".split()
LORA = LoRAParams(rank=4, alpha=8.0)


def _messages(n: int, rng: random.Random) -> pd.DataFrame:
    rows = []
    for i in range(n):
        label = i % 2
        words = SPAM_WORDS if label else HAM_WORDS
        rows.append((label, " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))))
    rng.shuffle(rows)
    return pd.DataFrame(rows, columns=["Label", "Text"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("train")
    rng = random.Random(0)
    data = root / "prepared"
    data.mkdir()
    _messages(48, rng).to_csv(data / "train.csv", index=False)
    _messages(24, rng).to_csv(data / "validation.csv", index=False)
    base = random_checkpoint(TINY, 3, root / "base")
    return base, data


def _params(**kw) -> TrainParams:
    defaults = dict(epochs=2, batch_size=8, lr=3e-3, eval_freq=3, eval_iter=2, precision="fp32", num_threads=1)
    return TrainParams(**{**defaults, **kw})


def test_lr_schedules():
    f = lambda step, schedule, warmup=0: lr_factor(step, warmup_steps=warmup, total_steps=10, schedule=schedule)  # noqa: E731
    assert [f(s, "constant") for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert [f(s, "constant", warmup=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert f(0, "linear") == 1.0 and f(5, "linear") == 0.5 and f(10, "linear") == 0.0
    assert f(5, "cosine") == pytest.approx(0.5) and f(10, "cosine") == pytest.approx(0.0)
    assert f(2, "cosine", warmup=2) == 1.0 and f(6, "cosine", warmup=2) == pytest.approx(0.5)


def test_lora_training_learns_and_saves_the_adapter(tmp_path, setup):
    base, data = setup
    train = _params(epochs=6, bucket=False)
    result = train_classifier(base, data, tmp_path / "clf", LORA, train, seed=1)
    m, hist = result["metrics"], result["history"]
    steps_per_epoch = math.ceil(48 / 8)
    assert m["steps"] == len(hist["steps"]) == 6 * steps_per_epoch and m["examples_seen"] == 6 * 48
    assert m["trainable_params"] == 2 * 4 * (4 * 32 + 2 * 32 + 2 * 5 * 32) + 2 * 32 + 2
    assert m["examples_per_s"] > 0 and m["wall_time_s"] >= m["train_time_s"] > 0
    # Learns the toy task: loss falls and the validation messages are classified.
    first, last = hist["eval"][0], hist["eval"][-1]
    assert last["train_loss"] < first["train_loss"]
    assert m["val_accuracy"] >= 0.9, m
    assert [r["step"] for r in hist["eval"]] == [*range(1, 6 * steps_per_epoch + 1, 3), 36]
    # Saved: adapter + head + meta; reloading gives the accuracy the loop measured.
    meta = json.loads((tmp_path / "clf" / META_FILE).read_text())
    assert meta["trainable_params"] == m["trainable_params"] and meta["lora"]["rank"] == 4
    model = load_classifier(tmp_path / "clf")
    val = pd.read_csv(data / "validation.csv", keep_default_na=False)
    acc = ((predict_proba(model, val.Text.tolist(), precision="fp32") >= 0.5) == val.Label).mean()
    assert acc == pytest.approx(m["val_accuracy"])


def test_training_is_deterministic(tmp_path, setup):
    base, data = setup
    train = _params(epochs=1, bucket=True, precision="bf16")
    a = train_classifier(base, data, tmp_path / "a", LORA, train, seed=5)
    b = train_classifier(base, data, tmp_path / "b", LORA, train, seed=5)
    assert a["history"] == b["history"]
    ta, tb = load_file(str(tmp_path / "a" / ADAPTER_FILE)), load_file(str(tmp_path / "b" / ADAPTER_FILE))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    c = train_classifier(base, data, tmp_path / "c", LORA, train, seed=6)
    assert c["history"]["steps"] != a["history"]["steps"]


class _Stop(Exception):
    pass


# Resumed at step 13 (end of epoch 2, 6 steps each, or step 12), or mid-epoch at step 11.
@pytest.mark.parametrize(("checkpoint_every", "first_step"), [(0, 13), (4, 13), (5, 11)])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, setup, checkpoint_every, first_step):
    base, data = setup
    train = _params(epochs=3, checkpoint_every=checkpoint_every)
    lora = dataclasses.replace(LORA, dropout=0.2)  # dropout: the RNG state must be restored too
    ckpt = tmp_path / "ckpt"
    full = train_classifier(base, data, tmp_path / "full", lora, train, seed=2, checkpoint_dir=tmp_path / "c0")
    # Kept, taken at the final step: the caller removes it once the results are safe (logged), and
    # a run stopped before that (killed while logging) resumes there: no step is trained again.
    final = torch.load(tmp_path / "c0" / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    assert final["step"] == full["metrics"]["steps"] == 18
    after = train_classifier(base, data, tmp_path / "after", lora, train, seed=2, checkpoint_dir=tmp_path / "c0",
                             callback=lambda kind, r: pytest.fail(f"trained again: {kind} {r}"))  # fmt: skip
    assert after["history"] == full["history"] and after["metrics"]["val_loss"] == full["metrics"]["val_loss"]
    remove_checkpoint(tmp_path / "c0")
    assert not (tmp_path / "c0").exists()

    def stop_at_14(kind, record):
        if kind == "step" and record["step"] == 14:
            raise _Stop

    with pytest.raises(_Stop):
        train_classifier(base, data, tmp_path / "x", lora, train, seed=2, checkpoint_dir=ckpt, callback=stop_at_14)
    assert (ckpt / CHECKPOINT_FILE).is_file() and not (tmp_path / "x").exists()
    steps_seen = []
    resumed = train_classifier(
        base, data, tmp_path / "x", lora, train, seed=2, checkpoint_dir=ckpt,
        callback=lambda kind, r: steps_seen.append(r["step"]) if kind == "step" else None,
    )  # fmt: skip
    assert steps_seen[0] == first_step  # after the last checkpoint before step 14
    assert resumed["history"] == full["history"]
    ta, tb = load_file(str(tmp_path / "full" / ADAPTER_FILE)), load_file(str(tmp_path / "x" / ADAPTER_FILE))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_checkpoint_of_other_params_is_not_resumed(tmp_path, setup):
    base, data = setup
    ckpt = tmp_path / "ckpt"

    def stop(kind, record):
        if kind == "step" and record["step"] == 7:
            raise _Stop

    with pytest.raises(_Stop):
        train_classifier(base, data, tmp_path / "x", LORA, _params(), seed=2, checkpoint_dir=ckpt, callback=stop)
    steps = []
    train_classifier(base, data, tmp_path / "x", LORA, _params(lr=1e-3), seed=2, checkpoint_dir=ckpt,
                     callback=lambda kind, r: steps.append(r["step"]) if kind == "step" else None)  # fmt: skip
    assert steps[0] == 1


@pytest.mark.parametrize("mode", ["last_block", "full"])
def test_other_modes_train(tmp_path, setup, mode):
    base, data = setup
    result = train_classifier(base, data, tmp_path / "clf", LORA, _params(mode=mode, epochs=1), seed=1)
    assert result["metrics"]["mode"] == mode
    meta = json.loads((tmp_path / "clf" / META_FILE).read_text())
    assert result["metrics"]["trainable_params"] == meta["trainable_params"]
    load_classifier(tmp_path / "clf")


def test_write_outputs(tmp_path, setup):
    base, data = setup
    result = train_classifier(base, data, tmp_path / "clf", LORA, _params(epochs=1), seed=1)
    paths = write_outputs(result, tmp_path / "m" / "train.json", tmp_path / "m" / "curve.tsv", tmp_path / "plots")
    metrics = json.loads((tmp_path / "m" / "train.json").read_text())
    assert {"train_loss", "val_loss", "train_accuracy", "val_accuracy", "trainable_params", "total_params",
            "examples_per_s", "wall_time_s", "epochs"} <= set(metrics)  # fmt: skip
    curve = pd.read_csv(tmp_path / "m" / "curve.tsv", sep="\t")
    assert list(curve.columns) == CURVE_COLUMNS and len(curve) == len(result["history"]["eval"])
    names = sorted(p.name for p in paths if p.parent == tmp_path / "plots")
    assert names == ["accuracy-plot.pdf", "accuracy.png", "loss-plot.pdf", "loss.png"]
    assert (tmp_path / "plots" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "plots" / "loss-plot.pdf").read_bytes()[:4] == b"%PDF"
    again = write_outputs(result, tmp_path / "m2.json", tmp_path / "c2.tsv", tmp_path / "plots2")
    assert [p.read_bytes() for p in again[2:]] == [p.read_bytes() for p in paths[2:]]  # byte-reproducible
