"""params.yaml validation: every mistake names the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gpt2lab.config import ParamsError, Params, load_params

ROOT = Path(__file__).resolve().parents[1]


def _raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_committed_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.model.name == "gpt2" and params.weights.source == "openai"
    assert params.train.epochs == 5 and params.train.batch_size == 8
    assert params.generate.prompts == ("Every effort moves you",)
    assert params.generate.max_new_tokens == 25 and params.generate.top_k == 50
    assert params.generate.temperature == 1.5


@pytest.mark.parametrize(
    "section,key,value,message",
    [
        ("lora", "rank", 0, r"lora\.rank: invalid value 0; allowed: an integer > 0"),
        ("lora", "rank", "16", r"lora\.rank: expected an integer"),
        ("model", "name", "gpt3", r"model\.name: invalid value 'gpt3'; allowed: gpt2 \| gpt2-medium"),
        ("weights", "source", "s3", r"weights\.source: .*openai \| hf \| local \| random"),
        ("data", "train_frac", 0.95, r"data\.train_frac \+ data\.validation_frac: .*below 1"),
        ("train", "precision", "fp16", r"train\.precision: .*bf16 \| fp32"),
        ("train", "mode", "adapter", r"train\.mode: .*lora \| last_block \| full"),
        ("train", "batch_size", True, r"train\.batch_size: expected an integer"),
        ("generate", "top_p", 1.5, r"generate\.top_p"),
        ("lora", "targets", "attn", r"lora\.targets: expected a list"),
    ],
)
def test_bad_values_name_key_and_allowed(section, key, value, message):
    raw = _raw()
    raw[section][key] = value
    with pytest.raises(ParamsError, match=message):
        Params.from_dict(raw)


def test_unknown_key_lists_allowed_keys():
    raw = _raw()
    raw["lora"]["rnak"] = 4
    with pytest.raises(ParamsError, match=r"lora\.rnak: unknown key; allowed keys: rank, alpha, dropout, targets"):
        Params.from_dict(raw)


def test_unknown_section():
    with pytest.raises(ParamsError, match="optimizer: unknown section"):
        Params.from_dict({**_raw(), "optimizer": {}})


def test_only_requested_sections_are_checked():
    raw = _raw()
    raw["train"]["epochs"] = -1
    assert Params.from_dict(raw, sections=["model"]).model.name == "gpt2"
    with pytest.raises(ParamsError, match="train.epochs"):
        Params.from_dict(raw, sections=["train"])


def test_custom_size_must_divide_heads():
    raw = _raw()
    raw["model"].update(n_embd=30, n_head=4)
    with pytest.raises(ParamsError, match=r"model\.n_embd: .*multiple of n_head"):
        Params.from_dict(raw)


def test_flat_dict_for_tracking():
    flat = load_params(ROOT / "params.yaml").to_flat_dict()
    assert flat["lora.rank"] == 16 and flat["seed"] == 123
    assert flat["lora.targets"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
