"""A classifier's folder: only what was trained, rebuilt on its base, replaced whole."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2lab.checkpoint import random_checkpoint
from gpt2lab.classifier import ClassifierError, build_classifier
from gpt2lab.classifier_io import (
    HEAD_FILE,
    META_FILE,
    TRAINED_FILE,
    BaseCheckpointMissingError,
    load_classifier,
    save_classifier,
)
from gpt2lab.fileio import MANIFEST_FILE, IntegrityError, write_manifest
from gpt2lab.inference import predict_proba
from gpt2lab.lora import ADAPTER_FILE, ADAPTER_META, LoRAConfig
from gpt2lab.params import LoRAParams
from tests.helpers import CORRUPTIONS, adamw_step, corrupt

ALL = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


LORA = LoRAConfig(rank=4, alpha=8.0, targets=ALL)


TEXTS = ["WINNER!! claim your free prize now", "see you at lunch?", "", "ok", "Call 0800 now to win cash " * 3]


@pytest.fixture
def base_dir(tmp_path, tiny_cfg):
    return random_checkpoint(tiny_cfg, 7, tmp_path / "base")


@pytest.mark.parametrize("mode", ["lora", "last_block", "full"])
def test_save_and_load_give_the_same_predictions(tmp_path, base_dir, mode):
    torch.manual_seed(0)
    model = build_classifier(base_dir, mode, LORA, max_length=40)
    adamw_step(model)
    model.eval()
    expected = predict_proba(model, TEXTS, batch_size=2, precision="fp32")
    out = save_classifier(model, tmp_path / "clf", mode=mode, base_dir=base_dir, lora=LORA)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["mode"] == mode and meta["max_length"] == 40 and meta["labels"] == ["ham", "spam"]
    assert meta["trainable_params"] == model.num_parameters(trainable_only=True)
    assert meta["total_params"] == model.num_parameters() and meta["base"]["pretrained"] is False
    files = {p.name for p in out.iterdir()}
    if mode == "lora":
        assert files == {META_FILE, HEAD_FILE, ADAPTER_FILE, ADAPTER_META, MANIFEST_FILE}
    else:
        assert files == {META_FILE, HEAD_FILE, TRAINED_FILE, MANIFEST_FILE}

    loaded = load_classifier(out)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    got = predict_proba(loaded, TEXTS, batch_size=3, precision="fp32")
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    if mode == "lora":  # merged: the LoRA branch is folded into the weights
        assert all(m.merged for m in loaded.modules() if hasattr(m, "merged"))
        unmerged = load_classifier(out, merged=False)
        np.testing.assert_allclose(predict_proba(unmerged, TEXTS, precision="fp32"), expected, rtol=1e-4, atol=1e-5)


def test_saves_only_what_was_trained(tmp_path, base_dir):
    from safetensors.torch import load_file

    model = build_classifier(base_dir, "last_block", None)
    out = save_classifier(model, tmp_path / "clf", mode="last_block", base_dir=base_dir)
    keys = set(load_file(str(out / TRAINED_FILE)))
    assert keys and all(k.startswith(("h.1.", "ln_f.")) for k in keys)
    assert set(load_file(str(out / HEAD_FILE))) == {"weight"}  # no head bias by default


def test_other_base_is_refused(tmp_path, base_dir, tiny_cfg):
    model = build_classifier(base_dir, "lora", LORA)
    out = save_classifier(model, tmp_path / "clf", mode="lora", base_dir=base_dir, lora=LORA)
    other = random_checkpoint(tiny_cfg, 8, tmp_path / "other")
    with pytest.raises(ClassifierError, match="trained on base checkpoint sha256"):
        load_classifier(out, other)
    with pytest.raises(ClassifierError, match="pass base_dir="):
        load_classifier(out, tmp_path / "nowhere")


def test_missing_base_names_the_recorded_one_and_the_argument(tmp_path, base_dir):
    model = build_classifier(base_dir, "lora", LORA)
    out = save_classifier(model, tmp_path / "clf", mode="lora", base_dir=base_dir, lora=LORA)
    sha = json.loads((out / META_FILE).read_text())["base"]["sha256"]
    moved = base_dir.rename(tmp_path / "moved")
    (tmp_path / "empty").mkdir()
    for given, what in ((None, "no such folder"), (tmp_path / "empty", "no config.json in it")):
        with pytest.raises(BaseCheckpointMissingError) as err:
            load_classifier(out, given)
        message = str(err.value)
        assert f"base checkpoint {given or base_dir} not found ({what}" in message
        assert "pass base_dir=DIR" in message and sha[:12] in message
        assert (f"it was trained on {base_dir}" in message) == (given is not None)
        assert "--base" in err.value.message("--base DIR") and "base_dir" not in err.value.message("--base DIR")
    load_classifier(out, moved)


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}  # fmt: skip


def test_replacing_the_classifier_never_leaves_half_a_folder(tmp_path, monkeypatch, tiny_cfg):
    base = random_checkpoint(tiny_cfg, 0, tmp_path / "base")
    lora = LoRAConfig.from_params(LoRAParams(rank=2, alpha=4))
    torch.manual_seed(0)
    model = build_classifier(base, "lora", lora)
    out = save_classifier(model, tmp_path / "clf", mode="lora", base_dir=base, lora=lora)
    old = _tree(out)
    with torch.no_grad():
        model.head.weight.add_(1.0)  # the new output differs from the old one
    real_rmtree, calls = shutil.rmtree, []

    def rmtree_interrupted(path, *args, **kwargs):
        """Ctrl-C while deleting a folder, after its first file is gone (only the first call)."""
        calls.append(Path(path))
        if len(calls) > 1:
            return real_rmtree(path, *args, **kwargs)
        next(p for p in sorted(Path(path).rglob("*")) if p.is_file()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", rmtree_interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_classifier(model, out, mode="lora", base_dir=base, lora=lora)
    monkeypatch.undo()
    assert calls, "save_classifier no longer deletes the old output; this test then checks nothing"
    now = _tree(out)
    assert now != old and set(now) == set(old)  # the new output, whole
    again = save_classifier(model, out, mode="lora", base_dir=base, lora=lora)  # the leftover aside is no obstacle
    assert _tree(again) == now


@pytest.fixture
def two_classifiers(tmp_path, base_dir):
    """Two LoRA classifiers on one base, of other seeds, alpha and max_length: same file names, other bytes."""
    folders = []
    for seed, lora, max_length in ((0, LORA, None), (1, LoRAConfig(rank=4, alpha=4.0, targets=ALL), 40)):
        torch.manual_seed(seed)
        model = build_classifier(base_dir, "lora", lora, max_length=max_length)
        adamw_step(model)
        folders.append(save_classifier(model, tmp_path / f"clf{seed}", mode="lora", base_dir=base_dir, lora=lora))
    for name in (META_FILE, HEAD_FILE, ADAPTER_FILE, ADAPTER_META):
        assert (folders[0] / name).read_bytes() != (folders[1] / name).read_bytes(), name
    return folders


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("name", [META_FILE, HEAD_FILE, ADAPTER_FILE, ADAPTER_META])
def test_a_damaged_file_of_a_classifier_folder_is_refused_with_its_hash(two_classifiers, name, kind):
    folder, other = two_classifiers
    expected = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    corrupt(folder / name, kind, other / name)
    with pytest.raises(IntegrityError, match=rf"{name}: corrupted or replaced: expected sha256 {expected}, found"):
        load_classifier(folder)


def test_an_edited_description_is_refused_not_obeyed(two_classifiers):
    """Swapped labels or another alpha would silently invert or change every answer."""
    folder, _ = two_classifiers
    for file, edit in ((META_FILE, lambda m: {**m, "labels": ["spam", "ham"]}),
                       (ADAPTER_META, lambda m: {**m, "alpha": m["alpha"] * 2})):  # fmt: skip
        original = (folder / file).read_text()
        (folder / file).write_text(json.dumps(edit(json.loads(original))))
        with pytest.raises(IntegrityError, match=f"{file}: corrupted or replaced"):
            load_classifier(folder)
        (folder / file).write_text(original)
    load_classifier(folder)  # restored: loads again


def test_a_base_with_other_weights_under_the_same_config_is_refused(two_classifiers, base_dir, tmp_path, tiny_cfg):
    """A different base whose config.json (and manifest) were copied over claims the recorded sha256: its
    bytes say otherwise."""
    folder, _ = two_classifiers
    other = random_checkpoint(tiny_cfg, 99, tmp_path / "other")
    for name in ("config.json", MANIFEST_FILE):
        shutil.copy(base_dir / name, other / name)
    with pytest.raises(IntegrityError, match="model.safetensors: corrupted or replaced"):
        load_classifier(folder, other)

@pytest.mark.parametrize("head_bias", [False, True])
def test_the_head_bias_is_recorded_and_rebuilt(tmp_path, base_dir, head_bias):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = build_classifier(base_dir, "lora", LORA, head_bias=head_bias)
    adamw_step(model)
    expected = predict_proba(model.eval(), TEXTS, precision="fp32")
    out = save_classifier(model, tmp_path / "clf", mode="lora", base_dir=base_dir, lora=LORA)
    assert json.loads((out / META_FILE).read_text())["head_bias"] is head_bias
    assert set(load_file(str(out / HEAD_FILE))) == ({"weight", "bias"} if head_bias else {"weight"})
    loaded = load_classifier(out)
    assert (loaded.head.bias is not None) is head_bias
    np.testing.assert_allclose(predict_proba(loaded, TEXTS, precision="fp32"), expected, rtol=1e-4, atol=1e-5)


def test_a_folder_from_before_head_bias_still_loads_with_its_bias(tmp_path, base_dir):
    torch.manual_seed(0)
    model = build_classifier(base_dir, "lora", LORA, head_bias=True)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.5, -0.5]))
    out = save_classifier(model, tmp_path / "clf", mode="lora", base_dir=base_dir, lora=LORA)
    meta = json.loads((out / META_FILE).read_text())
    del meta["head_bias"]  # the key older versions did not write
    (out / META_FILE).write_text(json.dumps(meta))
    write_manifest(out)
    loaded = load_classifier(out)
    assert torch.equal(loaded.head.bias, torch.tensor([0.5, -0.5]))


def test_lora_with_more_trained_tensors_saves_and_loads_them(tmp_path, base_dir):
    """An imported PEFT adapter may train whole modules besides the adapters (modules_to_save)."""
    torch.manual_seed(0)
    model = build_classifier(base_dir, "lora", LORA)
    model.body.ln_f.requires_grad_(True)
    adamw_step(model)
    expected = predict_proba(model.eval(), TEXTS, precision="fp32")
    out = save_classifier(model, tmp_path / "clf", mode="lora", base_dir=base_dir, lora=LORA)
    from safetensors.torch import load_file

    assert set(load_file(str(out / TRAINED_FILE))) == {"ln_f.weight", "ln_f.bias"}
    for merged in (True, False):
        got = predict_proba(load_classifier(out, merged=merged), TEXTS, precision="fp32")
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
