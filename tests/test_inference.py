"""The Classifier API: answers in input order, defined behaviour for awkward input."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gpt2lab
from gpt2lab.classifier import ClassifierError
from gpt2lab.devices import DeviceError, resolve_precision
from gpt2lab.errors import Gpt2labError
from gpt2lab.inference import Classifier, InvalidTextError, StoppedError, classify_review
from gpt2lab.quantize import Int8Linear
from gpt2lab.tokenizer import EOT_TOKEN, decode, encode
from tests.helpers import FEW, MESSAGES, SOME, TEXT, make_classifier


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return make_classifier(tmp_path_factory.mktemp("clf"))


@pytest.fixture(scope="module")
def clf(saved) -> Classifier:
    return Classifier.load(saved[0], saved[1])


@torch.no_grad()
def one_by_one(clf: Classifier, ids: list[int]) -> float:
    """The spam probability of one token sequence straight from the model: no batching, no padding."""
    logits = clf.model(torch.tensor([ids]), torch.tensor([len(ids)]))
    return float(torch.softmax(logits, -1)[0, 1])


def test_exported_from_the_package():
    assert gpt2lab.Classifier is Classifier and gpt2lab.classify_review is classify_review


def test_probabilities_match_the_model_one_message_at_a_time(clf):
    probs = clf.predict_proba(MESSAGES)
    assert probs.shape == (len(MESSAGES),) and probs.dtype == np.float64
    expected = [one_by_one(clf, (encode(t) or [EOT_TOKEN])[: clf.max_length]) for t in MESSAGES]
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    assert 0 < probs.min() and probs.max() < 1


def test_labels_follow_the_threshold_and_both_occur(clf, saved):
    probs = clf.predict_proba(MESSAGES)
    labels = clf.predict(MESSAGES)
    assert labels == ["spam" if p >= 0.5 else "ham" for p in probs]
    assert set(labels) == {"spam", "ham"}, "the fixture should produce both labels"
    strict = Classifier.load(saved[0], saved[1], threshold=float(np.sort(probs)[-1]))
    assert strict.predict(MESSAGES).count("spam") == 1
    assert clf.classify(MESSAGES) == [{"label": lab, "spam_probability": float(p)} for lab, p in zip(labels, probs)]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 64])
def test_batching_and_order_do_not_change_answers(saved, clf, batch_size):
    reference = clf.predict_proba(MESSAGES)
    other = Classifier.load(saved[0], saved[1], batch_size=batch_size)
    np.testing.assert_allclose(other.predict_proba(MESSAGES), reference, rtol=1e-5, atol=1e-6)
    perm = np.random.default_rng(batch_size).permutation(len(MESSAGES))
    shuffled = other.predict_proba([MESSAGES[i] for i in perm])
    np.testing.assert_allclose(shuffled, reference[perm], rtol=1e-5, atol=1e-6)


def test_empty_message_reads_as_end_of_text(clf):
    assert clf.predict_proba([""])[0] == pytest.approx(one_by_one(clf, [EOT_TOKEN]), rel=1e-6)
    assert clf.predict_proba([""])[0] == pytest.approx(clf.predict_proba(["<|endoftext|>"])[0], rel=1e-6)


def test_message_longer_than_the_context_keeps_its_first_tokens(clf):
    n = clf.max_length
    long_text = " ".join(f"word{i}" for i in range(400))
    ids = encode(long_text)
    assert len(ids) > 3 * n
    head = decode(ids[:n])
    assert encode(head) == ids[:n]  # the prefix is a text of its own that encodes to the same tokens
    p_long, p_head = clf.predict_proba([long_text, head])
    assert p_long == pytest.approx(p_head, rel=1e-6)
    assert p_long == pytest.approx(one_by_one(clf, ids[:n]), rel=1e-5)


def test_emoji_and_other_scripts(clf):
    texts = ["😀😂🎉", "Привет", "你好", "مرحبا", "é", "\x00", "\ud800 lone surrogate"]
    probs = clf.predict_proba(texts)
    assert np.isfinite(probs).all()
    assert probs[0] == pytest.approx(one_by_one(clf, encode("😀😂🎉")), rel=1e-5)
    # A lone surrogate cannot be UTF-8: it is read as U+FFFD, the replacement character.
    assert probs[-1] == pytest.approx(clf.predict_proba(["\ufffd lone surrogate"])[0], rel=1e-5)  # batch vs alone


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("one message", r"wrap it: \[text\]"),
        (b"bytes", "got a single bytes"),
        (["fine", None], "message 1 is NoneType"),
        ([3.5], "message 0 is float"),
        ([b"bytes"], "message 0 is bytes"),
        (42, "got int"),
    ],
)
def test_non_strings_are_refused_with_the_position(clf, bad, says):
    with pytest.raises(InvalidTextError, match=says) as info:
        clf.predict(bad)
    assert isinstance(info.value, Gpt2labError) and isinstance(info.value, TypeError)
    with pytest.raises(InvalidTextError):
        clf.predict_proba(bad)


def test_no_messages_no_answers(clf):
    assert clf.predict_proba([]).shape == (0,)
    assert clf.predict([]) == [] and clf.classify(()) == []


def test_auto_runs_where_the_hardware_says(saved, clf):
    auto = Classifier.load(saved[0], saved[1], precision="auto")
    assert auto.device == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    assert auto.precision == resolve_precision("auto", auto.device)
    assert clf.device == auto.device and clf.precision == "fp32"


def test_bf16_is_close_to_fp32(saved, clf):
    fast = Classifier.load(saved[0], saved[1], precision="bf16")
    assert fast.model.body.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    probs = fast.predict_proba(MESSAGES)
    np.testing.assert_allclose(probs, clf.predict_proba(MESSAGES), atol=0.03)
    alone = [fast.predict_proba([t])[0] for t in MESSAGES]  # one message per batch, as classify_review
    labels = ["spam" if p >= 0.5 else "not spam" for p in alone]
    assert [classify_review(t, fast.model) for t in MESSAGES] == labels  # a bf16 model runs in bf16


def test_int8_is_close_to_fp32(saved, clf):
    """int8 weights (per output channel) quantized at load: probabilities within the documented
    0.05 of fp32's (README), the files untouched."""
    files = {p: p.read_bytes() for folder in saved for p in folder.iterdir()}
    fast = Classifier.load(saved[0], saved[1], precision="int8")
    assert isinstance(fast.model.body.h[0].attn.c_attn, Int8Linear) and fast.precision == "int8"
    probs = fast.predict_proba(MESSAGES)
    np.testing.assert_allclose(probs, clf.predict_proba(MESSAGES), atol=0.05)
    assert {p: p.read_bytes() for folder in saved for p in folder.iterdir()} == files
    alone = [fast.predict_proba([t])[0] for t in MESSAGES]
    labels = ["spam" if p >= 0.5 else "not spam" for p in alone]
    assert [classify_review(t, fast.model) for t in MESSAGES] == labels  # an int8 model runs in int8


def test_bad_settings_and_missing_folder(saved, tmp_path):
    with pytest.raises(DeviceError, match="precision: fp16 runs only on CUDA"):
        Classifier.load(saved[0], saved[1], precision="fp16", device="cpu")
    with pytest.raises(DeviceError, match="precision: invalid value 'fp8'"):
        Classifier.load(saved[0], saved[1], precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="device: cuda asked for, but "):
            Classifier.load(saved[0], saved[1], device="cuda")
    with pytest.raises(ClassifierError, match="threshold"):
        Classifier.load(saved[0], saved[1], threshold=1.5)
    with pytest.raises(ClassifierError, match="no classifier.json"):
        Classifier.load(tmp_path / "nothing")


def test_classify_review_is_the_recipes_call(clf):
    for text, label in zip(MESSAGES, clf.predict(MESSAGES)):
        expected = "spam" if label == "spam" else "not spam"
        assert classify_review(text, clf, tokenizer=None, device="cpu", max_length=None, pad_token_id=EOT_TOKEN) == expected
        assert classify_review(text, clf.model) == expected  # a bare SpamClassifier works too


def test_classify_review_truncates_to_max_length(clf):
    ids = encode(MESSAGES[3])
    expected = ["spam" if one_by_one(clf, ids[:k]) >= 0.5 else "not spam" for k in range(1, len(ids) + 1)]
    assert len(set(expected)) == 2, "the cut should change the answer somewhere, or this test proves nothing"
    got = [classify_review(MESSAGES[3], clf, max_length=k) for k in range(1, len(ids) + 1)]
    assert got == expected
    assert clf.max_length == clf.model.max_length == 64  # the shared model is untouched



# --- tokenizer -----------------------------------------------------------------------------------


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12))
MESSAGE_LISTS = st.lists(st.one_of(TEXT, st.text(st.characters(), max_size=30)), max_size=7)


@SOME
@given(texts=MESSAGE_LISTS)
def test_classify_any_list_of_strings(clf, texts):
    results = clf.classify(texts)
    assert len(results) == len(texts)
    probs = np.array([r["spam_probability"] for r in results])
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


def test_a_dataframe_is_read_from_its_text_column_and_a_series_as_messages(clf):
    import pandas as pd

    texts = ["You won $1000! Claim now.", "see you at lunch?"]
    want = clf.predict(texts)
    assert clf.predict(pd.DataFrame({"text": texts, "id": [1, 2]})) == want  # not its column names
    assert clf.predict(pd.Series(texts)) == want and clf.predict(tuple(texts)) == want
    with pytest.raises(InvalidTextError, match=r"needs a 'text' column; it has \['message'\]"):
        clf.predict(pd.DataFrame({"message": texts}))
    with pytest.raises(InvalidTextError, match="message 1 is NoneType"):
        clf.predict(["ok", None])
    with pytest.raises(InvalidTextError, match="message 0 is float"):  # a missing value in a DataFrame
        clf.predict(pd.DataFrame({"text": [None, "ok"]}))


def test_a_huge_message_costs_what_a_long_one_does(clf):
    huge = "WIN a free prize now " * 5_000_000  # 100 MB
    bound = (clf.max_length + 1) * 128
    started = time.perf_counter()
    assert clf.predict_proba([huge])[0] == pytest.approx(clf.predict_proba([huge[:bound]])[0], abs=1e-6)
    assert time.perf_counter() - started < 60  # tokenizing all of it would take minutes and gigabytes


def test_stop_ends_the_work_at_the_next_batch(saved):
    clf = Classifier.load(saved[0], saved[1], batch_size=2)
    asked = []

    def stop() -> str | None:
        asked.append(1)
        return "enough" if len(asked) > 2 else None

    with pytest.raises(StoppedError, match="stopped after 4 of 10 messages: enough"):
        clf.predict_proba(["m"] * 10, stop=stop)
