"""The training loop: it learns, it is deterministic, every mode trains, outputs are written."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from gpt2lab.batching import SpamDataset, make_loader
from gpt2lab.classifier_io import META_FILE, load_classifier
from gpt2lab.devices import DeviceError
from gpt2lab.inference import predict_proba
from gpt2lab.lora import ADAPTER_FILE
from gpt2lab.params import LoRAParams, TrainParams
from gpt2lab.train import CURVE_COLUMNS, fixed_batches, lr_factor, setup, train_classifier, write_outputs
from tests.helpers import one_error_line

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


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_bf16_batches_on_a_cpu_are_padded_to_whole_16_row_tiles(train_inputs, precision):
    """bf16 on a CPU with AMX: a batch of 8 whose length is odd gets one more padding position (8 x T a
    multiple of 16, the rows AMX's bf16 matmuls run whole); other batches are padded to their longest message."""
    multiple = 16 if precision == "bf16" and torch.cpu._is_amx_tile_supported() else 1
    base, data = train_inputs
    run = setup(base, data, LORA, _params(precision=precision, bucket=True), seed=3)
    batches = [shard.micro[0] for shard in run.loader(0)] + run.estimate_batches["train"]
    widths = [(b.ids.shape[1], int(b.lengths.max())) for b in batches if len(b.ids) == 8]
    assert any(longest % 2 for _, longest in widths)  # some batch needs it
    assert all(width == longest + ((longest * 8) % multiple != 0) for width, longest in widths)


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


def test_gradient_accumulation_takes_the_same_steps(tmp_path, train_inputs):
    """Each batch of 8 in 3 pieces (3, 3, 2 messages): the same optimizer steps, up to float rounding."""
    base, data = train_inputs
    train = _params(epochs=1, lr=5e-4, bucket=True)
    one = train_classifier(base, data, tmp_path / "one", LORA, train, seed=3)
    acc = train_classifier(base, data, tmp_path / "acc", LORA, dataclasses.replace(train, grad_accum_steps=3), seed=3)
    a, b = ([r["loss"] for r in x["history"]["steps"]] for x in (one, acc))
    assert len(a) == len(b) == 6
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) <= 1e-5
    ta, tb = load_file(str(tmp_path / "one" / ADAPTER_FILE)), load_file(str(tmp_path / "acc" / ADAPTER_FILE))
    for key in ta:
        torch.testing.assert_close(tb[key], ta[key], rtol=1e-4, atol=1e-6)
    assert acc["metrics"]["grad_accum_steps"] == 3 and one["metrics"]["processes"] == 1


def test_compiled_training_takes_the_same_steps(tmp_path, train_inputs, cpp_compiler):
    """train.compile: the classifier through torch.compile (one graph for every batch length, one for
    evaluation); the same optimizer steps up to float rounding, the same checkpoint keys."""
    base, data = train_inputs
    train = _params(epochs=1, lr=5e-4, bucket=True)
    plain = train_classifier(base, data, tmp_path / "plain", LORA, train, seed=3)
    compiled = train_classifier(base, data, tmp_path / "compiled", LORA, dataclasses.replace(train, compile=True),
                                seed=3)  # fmt: skip
    a, b = ([r["loss"] for r in x["history"]["steps"]] for x in (plain, compiled))
    assert len(a) == len(b) == 6
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) <= 1e-4
    ta, tb = (load_file(str(tmp_path / name / ADAPTER_FILE)) for name in ("plain", "compiled"))
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(tb[key], ta[key], rtol=1e-3, atol=1e-5)
    for key in ("train_accuracy", "val_accuracy"):
        assert compiled["metrics"][key] == plain["metrics"][key], key


def test_cuda_on_a_machine_without_it_is_one_line(tmp_path, train_inputs):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    base, data = train_inputs
    with pytest.raises(DeviceError) as err:
        train_classifier(base, data, tmp_path / "clf", LORA, _params(device="cuda"), seed=1)
    assert str(err.value).startswith("train.device: cuda asked for, but this PyTorch is a CPU-only build")


GIANT_TOKENS = 1 << 17  # one message this long: attention's (B, n_head, T, T) scores need ~256 GiB
MEMORY_CAP = 6 << 30  # the run's address space: whatever else a step would allocate fails well before the machine's RAM
OOM_RUN = """
import resource, sys
from gpt2lab.params import LoRAParams, TrainParams
from gpt2lab.stage import run
from gpt2lab.train import train_classifier
resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
train = TrainParams(epochs=1, batch_size=2, eval_iter=1, precision="bf16", checkpoint_every=1, num_threads=1)
sys.exit(run(lambda: train_classifier("base", "data", "clf", LoRAParams(rank=4, alpha=8.0), train, {seed},
                                      checkpoint_dir="ckpt") and None))
"""


def _oom_case(ds: SpamDataset, seed: int, train: TrainParams) -> tuple[int, bool]:
    """(0-based step of epoch 1 holding the giant message, whether a train/validation estimate reads it)."""
    giant = max(range(len(ds)), key=lambda i: len(ds.ids[i]))
    loader = make_loader(ds, train.batch_size, shuffle=True, seed=seed, bucket=train.bucket)
    (step,) = [i for i, b in enumerate(loader.batch_sampler) if giant in b]
    estimated = any(len(b.ids[0]) >= GIANT_TOKENS for b in fixed_batches(ds, train.eval_iter * train.batch_size,
                                                                            train.batch_size, seed))  # fmt: skip
    return step, estimated


@pytest.mark.slow
def test_out_of_memory_is_one_line_naming_the_keys_and_keeps_the_checkpoint(tmp_path, train_inputs):
    """A real failed allocation (a batch whose attention needs ~256 GiB) in the middle of an epoch,
    in a process whose address space is capped (so nothing can push this machine into swapping)."""
    from gpt2lab.checkpoint import random_checkpoint
    from gpt2lab.model import GPT2Config
    from gpt2lab.resume import load_checkpoint

    _, small = train_inputs
    (tmp_path / "data").mkdir()
    df = pd.read_csv(small / "train.csv", keep_default_na=False)
    giant = pd.DataFrame({"Label": [1], "Text": ["win " * GIANT_TOKENS]})
    pd.concat([df, giant]).to_csv(tmp_path / "data" / "train.csv", index=False)
    shutil.copy(small / "validation.csv", tmp_path / "data" / "validation.csv")
    random_checkpoint(GPT2Config(n_ctx=GIANT_TOKENS, n_embd=32, n_layer=2, n_head=2), 3, tmp_path / "base")
    train = _params(epochs=1, batch_size=2, eval_iter=1)
    ds = SpamDataset.from_csv(tmp_path / "data" / "train.csv", GIANT_TOKENS)
    seed = next(s for s in range(100) if (case := _oom_case(ds, s, train))[0] >= 2 and not case[1])
    step = _oom_case(ds, seed, train)[0] + 1  # 1-based: the steps before it ran and were checkpointed
    script = OOM_RUN.format(cap=MEMORY_CAP, seed=seed)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    line = one_error_line(done.stderr)
    assert re.match(rf"error: out of memory on cpu at step {step} \([12] messages? of up to {GIANT_TOKENS} tokens", line)
    for key in ("train.batch_size (2)", "train.max_length (None)", "train.grad_accum_steps (1)"):
        assert key in line, line
    assert f"the checkpoint of step {step - 1} is intact: the next run resumes there" in line
    (path,) = (tmp_path / "ckpt").glob("*/checkpoint.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert load_checkpoint(path, state["fingerprint"])["step"] == step - 1
    assert not (tmp_path / "clf").exists()
