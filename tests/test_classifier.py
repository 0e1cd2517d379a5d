"""The classifier module: which parameters each mode trains, the last real token, no LM head."""

from __future__ import annotations

import copy

import pytest
import torch

from gpt2lab.classifier import SpamClassifier, configure
from gpt2lab.lora import LoRAConfig
from gpt2lab.model import GPT2, GPT2Config
from tests.helpers import adamw_step

ALL = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


LORA = LoRAConfig(rank=4, alpha=8.0, targets=ALL)


@pytest.mark.parametrize("mode", ["lora", "last_block", "full"])
def test_only_the_modes_parameters_change(tiny_model, mode):
    torch.manual_seed(0)
    model = SpamClassifier(tiny_model)
    configure(model, mode, LORA)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adamw_step(model)
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
    head = d * 2  # no bias by default (train.head_bias: false)
    assert trainable == n_layer * per_layer + head
    if rank == 16:
        assert trainable == 2_360_832
    assert total_base == 124_439_808 + head  # GPT-2 124M (tied lm_head counted once) + head
    assert model.num_parameters() == total_base + n_layer * per_layer


def test_last_block_count(tiny_model):
    model = SpamClassifier(tiny_model)
    n = configure(model, "last_block")
    d = tiny_model.config.n_embd
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    assert n == block + 2 * d + 2 * d


def test_head_bias_is_off_by_default_and_can_be_had(tiny_model):
    assert SpamClassifier(tiny_model).head.bias is None  # as transformers' score: exports exactly
    with_bias = SpamClassifier(tiny_model, head_bias=True)
    assert with_bias.head.bias is not None
    without = SpamClassifier(copy.deepcopy(tiny_model))
    assert configure(with_bias, "lora", LORA) == configure(without, "lora", LORA) + 2


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
