"""The training loop: it learns, it is deterministic, every mode trains, outputs are written."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from gpt2lab.classifier_io import META_FILE, load_classifier
from gpt2lab.inference import predict_proba
from gpt2lab.lora import ADAPTER_FILE
from gpt2lab.params import LoRAParams, TrainParams
from gpt2lab.train import CURVE_COLUMNS, lr_factor, train_classifier, write_outputs

LORA = LoRAParams(rank=4, alpha=8.0)


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


def test_lora_training_learns_and_saves_the_adapter(tmp_path, train_inputs):
    base, data = train_inputs
    train = _params(epochs=6, bucket=False)
    result = train_classifier(base, data, tmp_path / "clf", LORA, train, seed=1)
    m, hist = result["metrics"], result["history"]
    steps_per_epoch = math.ceil(48 / 8)
    assert m["steps"] == len(hist["steps"]) == 6 * steps_per_epoch and m["examples_seen"] == 6 * 48
    assert m["trainable_params"] == 2 * 4 * (4 * 32 + 2 * 32 + 2 * 5 * 32) + 2 * 32  # head: no bias by default
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


def test_training_is_deterministic(tmp_path, train_inputs):
    base, data = train_inputs
    train = _params(epochs=1, bucket=True, precision="bf16")
    a = train_classifier(base, data, tmp_path / "a", LORA, train, seed=5)
    b = train_classifier(base, data, tmp_path / "b", LORA, train, seed=5)
    assert a["history"] == b["history"]
    ta, tb = load_file(str(tmp_path / "a" / ADAPTER_FILE)), load_file(str(tmp_path / "b" / ADAPTER_FILE))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    c = train_classifier(base, data, tmp_path / "c", LORA, train, seed=6)
    assert c["history"]["steps"] != a["history"]["steps"]


@pytest.mark.parametrize("mode", ["last_block", "full"])
def test_other_modes_train(tmp_path, train_inputs, mode):
    base, data = train_inputs
    result = train_classifier(base, data, tmp_path / "clf", LORA, _params(mode=mode, epochs=1), seed=1)
    assert result["metrics"]["mode"] == mode
    meta = json.loads((tmp_path / "clf" / META_FILE).read_text())
    assert result["metrics"]["trainable_params"] == meta["trainable_params"]
    load_classifier(tmp_path / "clf")


def test_write_outputs(tmp_path, train_inputs):
    base, data = train_inputs
    result = train_classifier(base, data, tmp_path / "clf", LORA, _params(epochs=1), seed=1)
    paths = write_outputs(result, tmp_path / "m" / "train.json", tmp_path / "m" / "details.json",
                          tmp_path / "m" / "curve.tsv", tmp_path / "plots")  # fmt: skip
    headline = json.loads((tmp_path / "m" / "train.json").read_text())
    details = json.loads((tmp_path / "m" / "details.json").read_text())
    assert list(headline) == ["train_loss", "val_loss", "trainable_params", "examples_per_s"]  # DVC's columns
    assert {"train_accuracy", "val_accuracy", "total_params", "wall_time_s", "epochs"} <= set(details)
    assert {**headline, **details} == json.loads(json.dumps(result["metrics"]))
    curve = pd.read_csv(tmp_path / "m" / "curve.tsv", sep="\t")
    assert list(curve.columns) == CURVE_COLUMNS and len(curve) == len(result["history"]["eval"])
    names = sorted(p.name for p in paths if p.parent == tmp_path / "plots")
    assert names == ["accuracy-plot.pdf", "accuracy.png", "loss-plot.pdf", "loss.png"]
    assert (tmp_path / "plots" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "plots" / "loss-plot.pdf").read_bytes()[:4] == b"%PDF"
    again = write_outputs(result, tmp_path / "m2.json", tmp_path / "d2.json", tmp_path / "c2.tsv", tmp_path / "plots2")
    assert [p.read_bytes() for p in again[3:]] == [p.read_bytes() for p in paths[3:]]  # byte-reproducible
