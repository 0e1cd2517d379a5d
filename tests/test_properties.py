"""Property-based tests (Hypothesis): params validation, the tokenizer, classify and generate inputs.

Each property states what holds for every input of a kind, not for a few hand-picked ones:
bad params always give a :class:`ParamsError` naming the key (never another exception), valid
params are usable as loaded, text survives the tokenizer, the classifier answers any list of
strings the same way alone or batched, and generation never fails on valid arguments.
Example counts are modest so the file runs in well under a minute on two busy cores.
"""

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

from gpt2lab.classifier import Classifier, InvalidTextError
from gpt2lab.config import SECTIONS, Params, ParamsError, section_from_dict
from gpt2lab.errors import Gpt2labError
from gpt2lab.generate import GenerationError, generate
from gpt2lab.model import GPT2, GPT2Config
from gpt2lab.tokenizer import EOT_TEXT, VOCAB_SIZE, decode, encode
from tests.classify_helpers import make_classifier

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = yaml.safe_load((ROOT / "params.yaml").read_text())
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: a second thread only adds synchronisation, and on a busy machine a lot of it (10-50x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    from gpt2lab import config

    words = {
        ("model", "name"): config.MODEL_NAMES + ("gpt3", "GPT2", ""),
        ("weights", "source"): config.WEIGHT_SOURCES + ("s3",),
        ("train", "mode"): config.TRAIN_MODES + ("adapter",),
        ("train", "schedule"): config.SCHEDULES + ("step",),
        ("train", "precision"): config.PRECISIONS + ("fp16",),
        ("eval", "precision"): config.PRECISIONS + ("fp16",),
        ("generate", "precision"): config.PRECISIONS + ("fp16",),
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
    from gpt2lab.config import load_params

    try:
        load_params(path)
    except ParamsError as err:
        assert str(err) and "\n" not in str(err)  # printed as one `error: ...` line


# --- tokenizer -----------------------------------------------------------------------------------
NO_SURROGATES = st.characters(exclude_categories=("Cs",))
TEXT = st.one_of(
    st.text(NO_SURROGATES, max_size=200),
    st.lists(st.sampled_from(["😀", "👍🏽", "👨‍👩‍👧", "東京", "Привет", "مرحبا", "\u200b", "\r\n", " ", "\t", EOT_TEXT,
                              "é", "e\u0301"]), max_size=30).map("".join),
)  # fmt: skip


@SOME
@given(text=TEXT)
def test_tokenizer_round_trips_any_text(text):
    ids = encode(text)
    assert all(isinstance(i, int) and 0 <= i < VOCAB_SIZE for i in ids)
    assert decode(ids) == text
    assert (ids == []) == (text == "")


@FEW
@given(text=st.text(st.characters(), max_size=40))
def test_lone_surrogates_become_replacement_characters(text):
    """Text that is not valid Unicode (possible from Python, not from a file) is read, not refused."""
    ids = encode(text)
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert decode(ids) == re.sub("[\ud800-\udfff]", "\ufffd", text)


# --- classifier inputs -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clf(tmp_path_factory) -> Classifier:
    folder, base = make_classifier(tmp_path_factory.mktemp("clf"))
    return Classifier.load(folder, base, batch_size=3, precision="fp32")  # small batches: several per call


MESSAGES = st.lists(st.one_of(TEXT, st.text(st.characters(), max_size=30)), max_size=7)


@SOME
@given(texts=MESSAGES)
def test_classify_any_list_of_strings(clf, texts):
    results = clf.classify(texts)
    assert len(results) == len(texts)
    probs = np.array([r["probability"] for r in results])
    assert np.all((probs >= 0) & (probs <= 1))
    assert [r["label"] for r in results] == ["spam" if p >= clf.threshold else "ham" for p in probs]
    alone = [clf.predict_proba([t])[0] for t in texts]
    np.testing.assert_allclose(probs, alone, rtol=0, atol=1e-5)  # batch, padding and order do not matter


NOT_STRINGS = st.one_of(
    st.none(), st.integers(), st.floats(), st.booleans(), st.binary(max_size=5),
    st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=1),
)  # fmt: skip


@FEW
@given(before=st.lists(st.text(max_size=10), max_size=3), bad=NOT_STRINGS, after=st.lists(SCALARS, max_size=3))
def test_first_non_string_is_refused_by_position(clf, before, bad, after):
    texts = [*before, bad, *after]
    with pytest.raises(InvalidTextError, match=rf"^message {len(before)} is {type(bad).__name__} "):
        clf.classify(texts)


@FEW
@given(value=st.one_of(st.text(max_size=10), st.binary(max_size=5), st.integers(), st.none()))
def test_not_a_list_is_refused(clf, value):
    with pytest.raises(InvalidTextError, match="expected a list"):
        clf.classify(value)


# --- generate inputs --------------------------------------------------------------------------------
GEN_VOCAB = 96
GEN_CFG = GPT2Config(vocab_size=GEN_VOCAB, n_ctx=32, n_embd=32, n_layer=2, n_head=4)


@pytest.fixture(scope="module")
def lm() -> GPT2:
    """A tiny model with lively random weights (GPT-2's init repeats one token, hiding mistakes)."""
    torch.manual_seed(0)
    model = GPT2(GEN_CFG).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, {"wte.weight": 0.3, "wpe.weight": 1.0}.get(name, 3 * p.shape[1] ** -0.5))
    return model


PROMPTS = st.lists(st.lists(st.integers(0, GEN_VOCAB - 1), min_size=1, max_size=45), min_size=1, max_size=3)
SAMPLING = st.fixed_dictionaries({
    "temperature": st.one_of(st.just(0.0), st.floats(1e-3, 50.0)),
    "top_k": st.one_of(st.none(), st.integers(1, GEN_VOCAB + 10)),
    "top_p": st.one_of(st.none(), st.floats(1e-6, 1.0, exclude_min=False)),
})  # fmt: skip


@SOME
@given(prompts=PROMPTS, n=st.integers(0, 40), sampling=SAMPLING, seed=st.integers(0, 2**32 - 1), data=st.data())
def test_generate_valid_arguments_never_fail(lm, prompts, n, sampling, seed, data):
    """Right count of in-vocabulary tokens; with an EOS each row is the free run cut at its first EOS."""

    def run(eos_id: int | None) -> list[list[int]]:
        return generate(lm, prompts, n, eos_id=eos_id, generator=torch.Generator().manual_seed(seed), **sampling)

    free = run(None)
    assert len(free) == len(prompts) and all(len(row) == n for row in free)
    assert all(0 <= t < GEN_VOCAB for row in free for t in row)
    assert run(None) == free  # seeded: the same tokens again
    produced = sorted({t for row in free for t in row})
    eos = data.draw(st.sampled_from(produced) if produced else st.integers(0, GEN_VOCAB - 1), label="eos_id")
    for row, ref in zip(run(eos), free):
        assert row == (ref[: ref.index(eos)] if eos in ref else ref)


@pytest.fixture(scope="module")
def lm64(lm) -> GPT2:
    """``lm`` in float64: one- and several-token passes then round alike, so draws can be compared exactly."""
    model = GPT2(GEN_CFG).double().eval()
    model.load_state_dict(lm.state_dict())
    return model


LOOPY_PROMPT = st.tuples(st.lists(st.integers(0, GEN_VOCAB - 1), min_size=1, max_size=8), st.integers(1, 5)).map(
    lambda t: t[0] * t[1]
)  # a phrase repeated: the lookup has something to guess


@SOME
@given(prompt=LOOPY_PROMPT, n=st.integers(1, 40), sampling=SAMPLING, seed=st.integers(0, 2**32 - 1),
       prompt_lookup=st.integers(1, 12))  # fmt: skip
def test_prompt_lookup_gives_what_plain_decoding_gives(lm64, prompt, n, sampling, seed, prompt_lookup):
    def run(lookup: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        return generate(lm64, [prompt], n, generator=g, prompt_lookup=lookup, **sampling)

    assert run(prompt_lookup) == run(0)


INVALID = st.one_of(
    st.fixed_dictionaries({"temperature": st.one_of(st.floats(max_value=-1e-9), st.just(float("nan")))}),
    st.fixed_dictionaries({"top_k": st.integers(max_value=0)}),
    st.fixed_dictionaries({"top_p": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True),
                                              st.just(float("nan")))}),  # fmt: skip
    st.fixed_dictionaries({"max_new_tokens": st.integers(max_value=-1)}),
    st.fixed_dictionaries({"prompts": st.just([])}),
    st.fixed_dictionaries({"prompts": st.lists(st.just([]), min_size=1, max_size=2)}),
    st.fixed_dictionaries({"prompts": st.tuples(st.integers(0, GEN_VOCAB - 1), st.one_of(
        st.integers(max_value=-1), st.integers(min_value=GEN_VOCAB))).map(lambda t: [list(t)])}),  # fmt: skip
)
NAMES = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "max_new_tokens": "max_new_tokens",
         "prompts": "prompt"}  # fmt: skip


@SOME
@given(bad=INVALID)
def test_generate_invalid_arguments_are_named(lm, bad):
    kwargs = {"prompts": [[1, 2]], "max_new_tokens": 3, **bad}
    prompts, n = kwargs.pop("prompts"), kwargs.pop("max_new_tokens")
    (name,) = bad
    with pytest.raises(GenerationError) as info:
        generate(lm, prompts, n, **kwargs)
    assert isinstance(info.value, Gpt2labError)
    assert NAMES[name] in str(info.value) or (name == "prompts" and "no prompts" in str(info.value))

