"""params.yaml's schema: strict loading, one clear line naming the key and what is allowed."""

from __future__ import annotations

import dataclasses
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2lab.params import SECTIONS, Params, ParamsError, load_params, section_from_dict

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
        ("train", "precision", "fp8", r"train\.precision: .*auto \| bf16 \| fp16 \| fp32"),
        ("train", "precision", "int8", r"train\.precision: invalid value 'int8'; allowed: auto \| bf16 \| fp16 \| fp32$"),
        ("train", "mode", "adapter", r"train\.mode: .*lora \| last_block \| full"),
        ("train", "batch_size", True, r"train\.batch_size: expected an integer"),
        ("generate", "top_p", 1.5, r"generate\.top_p"),
        ("lora", "targets", "attn", r"lora\.targets: expected a list"),
        ("tracking", "registered_model", "team/spam@v1", r"tracking\.registered_model: invalid value 'team/spam@v1'"),
        ("tracking", "registered_model", "", r"tracking\.registered_model: invalid value ''"),
    ],
)
def test_bad_values_name_key_and_allowed(section, key, value, message):
    raw = _raw()
    raw[section][key] = value
    with pytest.raises(ParamsError, match=message):
        Params.from_dict(raw)


@pytest.mark.parametrize(
    "section,device,precision,message",
    [
        ("eval", "cuda", "int8", r"eval\.precision: .*with a CUDA device \(int8 weights run only on a CPU\)"),
        ("generate", "cuda:1", "int8", r"generate\.precision: .*int8 weights run only on a CPU"),
        ("generate", "cpu", "fp16", r"generate\.precision: .*auto \| bf16 \| fp32 \| int8 with device cpu \(fp16 runs"),
        ("train", "cpu", "fp16", r"train\.precision: .*auto \| bf16 \| fp32 with device cpu \(fp16 runs only"),
    ],
)
def test_a_precision_the_device_cannot_run_is_refused(section, device, precision, message):
    raw = _raw()
    raw[section].update(device=device, precision=precision)
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


def test_compiled_training_runs_in_one_process():
    raw = _raw()
    raw["train"].update(compile=True, nproc_per_node=2)
    with pytest.raises(ParamsError, match=r"train\.compile: invalid value True; allowed: false with nproc_per_node > 1"):
        Params.from_dict(raw)
    raw["train"]["nproc_per_node"] = 1
    assert Params.from_dict(raw).train.compile


def test_custom_size_must_divide_heads():
    raw = _raw()
    raw["model"].update(n_embd=30, n_head=4)
    with pytest.raises(ParamsError, match=r"model\.n_embd: .*multiple of n_head"):
        Params.from_dict(raw)


def test_flat_dict_for_tracking():
    flat = load_params(ROOT / "params.yaml").to_flat_dict()
    assert flat["lora.rank"] == 16 and flat["seed"] == 123
    assert flat["lora.targets"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


COMMITTED = yaml.safe_load((ROOT / "params.yaml").read_text())


FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


SOME = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- params validation ---------------------------------------------------------------------------
# What YAML can produce for a value: scalars of every type, awkward numbers, nested lists and maps.
AWKWARD_NUMBERS = st.sampled_from(
    [0, -1, 1, 2, 0.0, -0.0, 0.5, 1.0, 0.999999, 1e-12, -1e-12, 2**31, 2**32, 2**63, 2**64, 10**400,
     float("inf"), float("-inf"), float("nan")]  # fmt: skip
)


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), AWKWARD_NUMBERS, st.text(max_size=12),
)  # fmt: skip


VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
    max_leaves=5,
)  # fmt: skip


# YAML keys need not be strings: `1: x`, `null: x`, `true: x` are valid YAML.
ODD_KEYS = st.one_of(st.text(min_size=1, max_size=8), st.integers(-3, 3), st.none(), st.booleans())


def _choices(section: str) -> dict[str, st.SearchStrategy]:
    """Values a user would plausibly write for each key (near the valid ones), per section."""
    from gpt2lab import params as config

    words = {
        ("model", "name"): config.MODEL_NAMES + ("gpt3", "GPT2", ""),
        ("weights", "source"): config.WEIGHT_SOURCES + ("s3",),
        ("train", "mode"): config.TRAIN_MODES + ("adapter",),
        ("train", "schedule"): config.SCHEDULES + ("step",),
        ("train", "precision"): config.PRECISIONS + ("fp8",),  # int8: inference only, refused
        ("eval", "precision"): config.PRECISIONS + ("fp8",),
        ("generate", "precision"): config.PRECISIONS + ("fp8",),
        ("train", "device"): ("auto", "cpu", "cuda", "cuda:1", "gpu", "cuda:", "CPU"),
        ("eval", "device"): ("auto", "cpu", "cuda", "cuda:0", "mps"),
        ("generate", "device"): ("auto", "cpu", "cuda:0", "tpu"),
        ("data", "sha256"): (COMMITTED["data"]["sha256"], COMMITTED["data"]["sha256"].upper(), "abc"),
    }
    out = {}
    for f in dataclasses.fields(SECTIONS[section]):
        plausible = st.sampled_from(words[(section, f.name)]) if (section, f.name) in words else AWKWARD_NUMBERS
        lists = st.lists(st.text(max_size=10), max_size=3)
        out[f.name] = st.one_of(plausible, lists, VALUES, st.floats(-2, 2), st.integers(-2, 64))
    return out


@st.composite
def section_data(draw, section: str) -> object:
    """The committed section with a few keys changed, dropped or added; now and then not a mapping at all."""
    if draw(st.integers(0, 19)) == 0:
        return draw(VALUES)
    data = dict(COMMITTED.get(section) or {})
    choices = _choices(section)
    for key in draw(st.lists(st.sampled_from(sorted(choices)), max_size=3, unique=True)):
        if draw(st.booleans()) or not data:
            data[key] = draw(choices[key])
        else:
            data.pop(key, None)
    for key in draw(st.lists(ODD_KEYS, max_size=2)):
        data[key] = draw(VALUES)
    return data


def _assert_names_key_and_allowed(message: str, section: str, data: object) -> None:
    """``<section>.<key>: ...`` (or ``<section>: ...``) and what is allowed or expected."""
    names = {f.name for f in dataclasses.fields(SECTIONS[section])}
    data = {} if data is None else data  # an empty section (`lora:` alone) reads as null: all defaults
    if not isinstance(data, dict):
        assert message.startswith(f"{section}: expected a mapping of keys, got "), message
        return
    assert "\n" not in message, message  # printed as one `error: ...` line
    if "unknown key" in message:  # the key as written, or quoted (repr) when it would not read plainly
        shown = {text for k in data if k not in names for text in (str(k), repr(k))}
        assert any(message.startswith(f"{section}.{k}: unknown key; allowed keys: ") for k in shown), message
        return
    # lora.rank: ... / lora.targets[2]: ... / data.train_frac + data.validation_frac: ...
    head = re.match(rf"{section}\.(\w+)(\[\d+\])?( \+ {section}\.(\w+))?: (.*)", message, re.S)
    assert head and head.group(1) in names and head.group(4) in (None, *names), message
    assert re.match(r"(invalid value .*; allowed: \S|expected \S)", head.group(5), re.S), message


def _assert_usable(params: object, section: str) -> None:
    """A value that loads is one the code can use: finite numbers, timeouts a socket accepts."""
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if isinstance(value, float):
            assert np.isfinite(value), f"{section}.{f.name} = {value} loaded"
    if hasattr(params, "timeout_s"):
        with socket.socket() as s:
            s.settimeout(params.timeout_s)
    if section == "generate":
        torch.Generator().manual_seed(params.seed)
        np.random.RandomState(params.seed)


@pytest.mark.parametrize("section", sorted(SECTIONS))
@SOME
@given(data=st.data())
def test_each_section_loads_or_names_the_bad_key(section, data):
    raw = data.draw(section_data(section))
    try:
        params = section_from_dict(SECTIONS[section], raw, section)
    except ParamsError as err:
        _assert_names_key_and_allowed(str(err), section, raw)
    else:
        _assert_usable(params, section)


@FEW
@given(
    seed=st.one_of(st.integers(), AWKWARD_NUMBERS, SCALARS),
    extra=st.dictionaries(ODD_KEYS, VALUES, max_size=2),
)
def test_top_level_loads_or_names_the_bad_key(seed, extra):
    raw = {**COMMITTED, "seed": seed, **extra}
    try:
        params = Params.from_dict(raw)
    except ParamsError as err:
        head = str(err).partition(": ")[0]
        shown = {text for k in raw if k not in ("seed", *SECTIONS) for text in (str(k), repr(k))}
        assert head == "seed" or head in shown, str(err)
        assert "\n" not in str(err)
    else:
        np.random.RandomState(params.seed)  # data split and balance (pandas random_state)
        torch.manual_seed(params.seed)


@FEW
@given(text=st.text(min_size=1).map(lambda t: f"seed: {t}"))
def test_any_yaml_text_loads_or_is_one_params_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("p") / "params.yaml"
    path.write_text(text, encoding="utf-8")
    from gpt2lab.params import load_params

    try:
        load_params(path)
    except ParamsError as err:
        assert str(err) and "\n" not in str(err)  # printed as one `error: ...` line
