"""LoRA: exact at init, merge/unmerge equivalence, pattern targeting, adapter files."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

from gpt2lab.lora import (
    ADAPTER_FILE,
    ADAPTER_META,
    LoRAConfig,
    LoRAError,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_state_dict,
    mark_trainable,
    merge,
    save_adapter,
    unmerge,
)

ALL = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _randomize_b(model: nn.Module, seed: int = 1) -> None:
    """Give every adapter a non-zero B, as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 50257, (3, 17), generator=torch.Generator().manual_seed(0))


def test_linear_matches_its_formula():
    torch.manual_seed(0)
    lin = nn.Linear(12, 7)
    lora = LoRALinear.from_linear(lin, rank=3, alpha=6.0)
    assert lora.weight is lin.weight and lora.bias is lin.bias  # shared, not copied
    assert lora.lora_a.shape == (3, 12) and lora.lora_b.shape == (7, 3)
    assert torch.count_nonzero(lora.lora_b) == 0 and torch.count_nonzero(lora.lora_a) > 0
    with torch.no_grad():
        lora.lora_b.normal_()
    x = torch.randn(4, 5, 12)
    expected = x @ lin.weight.T + lin.bias + 2.0 * (x @ lora.lora_a.T @ lora.lora_b.T)  # alpha/rank = 2
    torch.testing.assert_close(lora(x), expected)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_linear_under_bf16_autocast(weight_dtype):
    torch.manual_seed(0)
    lora = LoRALinear.from_linear(nn.Linear(64, 48), rank=8, alpha=16.0)
    with torch.no_grad():
        lora.lora_b.normal_()
    x = torch.randn(2, 5, 64, requires_grad=True)
    expected = lora(x)
    lora.weight.data = lora.weight.data.to(weight_dtype)  # as training stores frozen weights
    lora.bias.data = lora.bias.data.to(weight_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lora(x)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)
    got.float().sum().backward()
    assert lora.lora_a.grad is not None and lora.lora_b.grad is not None and x.grad is not None
    assert lora.lora_a.grad.dtype == torch.float32  # trainable parameters keep fp32 gradients


def test_dropout_only_on_the_lora_branch():
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    lora = LoRALinear.from_linear(lin, rank=4, alpha=4.0, dropout=0.9).train()
    x = torch.randn(8, 16)
    # B = 0: the branch contributes nothing, so dropout there must not touch the output.
    torch.testing.assert_close(lora(x), lin(x), rtol=0, atol=0)
    with torch.no_grad():
        lora.lora_b.normal_()
    assert not torch.allclose(lora(x), lora(x))  # the branch is stochastic in training
    lora.eval()
    torch.testing.assert_close(lora(x), lora(x), rtol=0, atol=0)


def test_zero_b_equals_base_model(tiny_model, ids):
    base = copy.deepcopy(tiny_model)
    names = apply_lora(tiny_model, LoRAConfig(rank=4, alpha=8.0, targets=ALL))
    assert len(names) == 4 * tiny_model.config.n_layer
    torch.testing.assert_close(tiny_model(ids), base(ids), rtol=0, atol=0)


def test_base_keys_are_kept(tiny_model):
    base_state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    apply_lora(tiny_model, LoRAConfig(rank=2, alpha=2.0, targets=ALL))
    state = tiny_model.state_dict()
    assert set(base_state) <= set(state)
    extra = set(state) - set(base_state)
    assert extra and all(k.endswith(("lora_a", "lora_b")) for k in extra)
    # A base checkpoint loads straight into the adapted model.
    result = tiny_model.load_state_dict(base_state, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) == extra


def test_merged_and_unmerged_logits_agree(tiny_model, ids):
    apply_lora(tiny_model, LoRAConfig(rank=4, alpha=8.0, targets=ALL))
    _randomize_b(tiny_model)
    unmerged = tiny_model(ids)
    merge(tiny_model)
    torch.testing.assert_close(tiny_model(ids), unmerged, rtol=1e-4, atol=1e-4)


def test_adapter_changes_the_output(tiny_model, ids):
    base = copy.deepcopy(tiny_model)
    apply_lora(tiny_model, LoRAConfig(rank=4, alpha=8.0, targets=ALL))
    _randomize_b(tiny_model)
    assert (tiny_model(ids) - base(ids)).abs().max() > 1e-3


def test_merging_twice_changes_nothing(tiny_model, ids):
    apply_lora(tiny_model, LoRAConfig(rank=4, alpha=8.0, targets=ALL))
    _randomize_b(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    merge(tiny_model)
    once = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    assert any(not torch.equal(before[k], once[k]) for k in before)
    merge(tiny_model)
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, once[k]), k
    unmerge(tiny_model)
    unmerge(tiny_model)
    for k, v in tiny_model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)


def test_targets_by_suffix_and_glob(tiny_model):
    names = apply_lora(copy.deepcopy(tiny_model), LoRAConfig(rank=2, alpha=2.0, targets=("attn.c_attn",)))
    assert names == ["h.0.attn.c_attn", "h.1.attn.c_attn"]
    names = apply_lora(copy.deepcopy(tiny_model), LoRAConfig(rank=2, alpha=2.0, targets=("h.1.mlp.*",)))
    assert names == ["h.1.mlp.c_fc", "h.1.mlp.c_proj"]
    # "c_proj" is a suffix of both attention and MLP projections.
    names = apply_lora(copy.deepcopy(tiny_model), LoRAConfig(rank=2, alpha=2.0, targets=("c_proj",)))
    assert sorted(names) == ["h.0.attn.c_proj", "h.0.mlp.c_proj", "h.1.attn.c_proj", "h.1.mlp.c_proj"]


def test_pattern_matching_nothing_is_an_error(tiny_model):
    with pytest.raises(LoRAError, match="'attn.q_proj' matches no linear layer"):
        apply_lora(tiny_model, LoRAConfig(rank=2, alpha=2.0, targets=("attn.c_attn", "attn.q_proj")))
    with pytest.raises(LoRAError, match="matches no linear layer"):
        apply_lora(tiny_model, LoRAConfig(rank=2, alpha=2.0, targets=("ln_f",)))  # not a Linear


def test_applying_twice_is_an_error(tiny_model):
    apply_lora(tiny_model, LoRAConfig(rank=2, alpha=2.0, targets=ALL))
    with pytest.raises(LoRAError, match="already has LoRA"):
        apply_lora(tiny_model, LoRAConfig(rank=2, alpha=2.0, targets=ALL))


def test_mark_trainable_only_lora(tiny_model):
    apply_lora(tiny_model, LoRAConfig(rank=4, alpha=4.0, targets=ALL))
    n = mark_trainable(tiny_model)
    trainable = [k for k, p in tiny_model.named_parameters() if p.requires_grad]
    assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)
    cfg = tiny_model.config
    per_layer = 4 * ((cfg.n_embd + 3 * cfg.n_embd) + 2 * cfg.n_embd + 2 * (cfg.n_embd + 4 * cfg.n_embd))
    assert n == cfg.n_layer * per_layer


def test_adapter_round_trip(tmp_path, tiny_model, ids):
    base = copy.deepcopy(tiny_model)
    cfg = LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets=("attn.c_attn", "mlp.c_fc"))
    apply_lora(tiny_model, cfg)
    _randomize_b(tiny_model)
    tiny_model.eval()
    save_adapter(tiny_model, tmp_path, cfg, base_sha256="ab" * 32)
    meta = json.loads((tmp_path / ADAPTER_META).read_text())
    assert meta["rank"] == 4 and meta["alpha"] == 8.0 and meta["targets"] == ["attn.c_attn", "mlp.c_fc"]
    assert meta["base_sha256"] == "ab" * 32
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / ADAPTER_FILE))
    assert set(saved) == set(lora_state_dict(tiny_model))  # the adapter alone, no base weights

    loaded_cfg = load_adapter(base, tmp_path, base_sha256="ab" * 32)
    assert loaded_cfg == cfg
    base.eval()
    torch.testing.assert_close(base(ids), tiny_model(ids), rtol=0, atol=0)


def test_adapter_for_another_base_is_refused(tmp_path, tiny_model):
    base = copy.deepcopy(tiny_model)
    cfg = LoRAConfig(rank=2, alpha=2.0, targets=ALL)
    apply_lora(tiny_model, cfg)
    save_adapter(tiny_model, tmp_path, cfg, base_sha256="ab" * 32)
    with pytest.raises(LoRAError, match="trained on base checkpoint sha256 abab.*the base model given has sha256 cdcd"):
        load_adapter(base, tmp_path, base_sha256="cd" * 32)
    assert not any(isinstance(m, LoRALinear) for m in base.modules())  # refused before touching it
