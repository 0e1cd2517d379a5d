"""Classifier: reads the last real token, trains only what its mode says, reloads exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2lab.classifier import (
    HEAD_FILE,
    META_FILE,
    TRAINED_FILE,
    BaseCheckpointMissingError,
    ClassifierError,
    SpamClassifier,
    build_classifier,
    configure,
    load_classifier,
    predict_proba,
    save_classifier,
)
from gpt2lab.lora import ADAPTER_FILE, ADAPTER_META, LoRAConfig
from gpt2lab.model import GPT2, GPT2Config
from gpt2lab.weights import random_checkpoint

ALL = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LORA = LoRAConfig(rank=4, alpha=8.0, targets=ALL)
TEXTS = ["WINNER!! claim your free prize now", "see you at lunch?", "", "ok", "Call 0800 now to win cash " * 3]


@pytest.fixture
def base_dir(tmp_path, tiny_cfg):
    return random_checkpoint(tiny_cfg, 7, tmp_path / "base")


def _step(model: SpamClassifier) -> None:
    """One AdamW step on a random batch (large lr so every trained tensor visibly moves)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (4, 9), generator=g)
    lengths = torch.tensor([9, 3, 5, 1])
    F.cross_entropy(model(ids, lengths), torch.tensor([0, 1, 1, 0])).backward()
    opt.step()


@pytest.mark.parametrize("mode", ["lora", "last_block", "full"])
def test_only_the_modes_parameters_change(tiny_model, mode):
    torch.manual_seed(0)
    model = SpamClassifier(tiny_model)
    configure(model, mode, LORA)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    last = f"body.h.{tiny_model.config.n_layer - 1}."
    expected = {
        "lora": lambda k: k.startswith("head.") or k.endswith(("lora_a", "lora_b")),
        "last_block": lambda k: k.startswith(("head.", last, "body.ln_f.")),
        "full": lambda k: True,
    }[mode]
    assert changed, "nothing was trained"
    assert all(expected(k) for k in changed), sorted(k for k in changed if not expected(k))
    if mode == "lora":  # every adapter is reached by the gradient (B moves first, from zero)
        assert {k for k in before if k.endswith("lora_b")} <= changed
    if mode == "full":
        assert "body.wte.weight" in changed and "body.h.0.attn.c_attn.weight" in changed


def _gpt2_124m_on_meta() -> GPT2:
    with torch.device("meta"):
        return GPT2(GPT2Config.preset("gpt2"))


@pytest.mark.parametrize("rank", [16, 4])
def test_trainable_count_of_124m_equals_the_formula(rank):
    with torch.device("meta"):
        model = SpamClassifier(_gpt2_124m_on_meta())
    total_base = model.num_parameters()
    trainable = configure(model, "lora", LoRAConfig(rank=rank, alpha=16.0, targets=ALL))
    d, n_layer = 768, 12
    # r * (in + out) per adapted projection: c_attn d->3d, attn.c_proj d->d, c_fc d->4d, mlp.c_proj 4d->d.
    per_layer = rank * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    head = d * 2 + 2
    assert trainable == n_layer * per_layer + head
    if rank == 16:
        assert trainable == 2_360_834
    assert total_base == 124_439_808 + head  # GPT-2 124M (tied lm_head counted once) + head
    assert model.num_parameters() == total_base + n_layer * per_layer


def test_last_block_count(tiny_model):
    model = SpamClassifier(tiny_model)
    n = configure(model, "last_block")
    d = tiny_model.config.n_embd
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    assert n == block + 2 * d + (2 * d + 2)


def test_reads_the_last_real_token_and_ignores_padding(tiny_model):
    torch.manual_seed(0)
    model = SpamClassifier(tiny_model).eval()
    a = torch.randint(0, 50000, (5,))
    b = torch.randint(0, 50000, (11,))
    alone = model(a[None], torch.tensor([5]))
    padded = torch.full((2, 11), 50256)
    padded[0, :5], padded[1] = a, b
    batch = model(padded, torch.tensor([5, 11]))
    torch.testing.assert_close(batch[0], alone[0], rtol=1e-5, atol=1e-6)
    # The last position of the padded row is padding: reading it would give another answer.
    at_pad = model.head(model.body.hidden_states(padded)[0, -1])
    assert not torch.allclose(at_pad, alone[0], atol=1e-4)


def test_lm_head_is_never_computed(tiny_model):
    model = SpamClassifier(tiny_model)
    calls = []
    model.body.lm_head.register_forward_hook(lambda *args: calls.append(1))
    model(torch.randint(0, 50257, (2, 6)), torch.tensor([6, 2]))
    assert calls == []


@pytest.mark.parametrize("mode", ["lora", "last_block", "full"])
def test_save_and_load_give_the_same_predictions(tmp_path, base_dir, mode):
    torch.manual_seed(0)
    model = build_classifier(base_dir, mode, LORA, max_length=40)
    _step(model)
    model.eval()
    expected = predict_proba(model, TEXTS, batch_size=2, precision="fp32")
    out = save_classifier(model, tmp_path / "clf", mode=mode, base_dir=base_dir, lora=LORA)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["mode"] == mode and meta["max_length"] == 40 and meta["labels"] == ["ham", "spam"]
    assert meta["trainable_params"] == model.num_parameters(trainable_only=True)
    assert meta["total_params"] == model.num_parameters() and meta["base"]["pretrained"] is False
    files = {p.name for p in out.iterdir()}
    if mode == "lora":
        assert files == {META_FILE, HEAD_FILE, ADAPTER_FILE, ADAPTER_META}
    else:
        assert files == {META_FILE, HEAD_FILE, TRAINED_FILE}

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
    assert set(load_file(str(out / HEAD_FILE))) == {"weight", "bias"}


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


def test_predict_proba_keeps_input_order(base_dir):
    torch.manual_seed(0)
    model = build_classifier(base_dir, "lora", LORA, max_length=30).eval()
    together = predict_proba(model, TEXTS, batch_size=4, precision="fp32")
    one_by_one = np.concatenate([predict_proba(model, [t], precision="fp32") for t in TEXTS])
    np.testing.assert_allclose(together, one_by_one, rtol=1e-5, atol=1e-6)
    assert together.shape == (len(TEXTS),) and np.all((together > 0) & (together < 1))
    bf16 = predict_proba(model, TEXTS, batch_size=4, precision="bf16")
    np.testing.assert_allclose(bf16, together, atol=0.02)
