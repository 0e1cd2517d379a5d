"""GPT-2 BPE through tiktoken, with an offline route to the exact same ranks.

tiktoken normally downloads GPT-2's ranks (and caches them). Where that fails, the
identical ``r50k_base`` ranks file is taken from a package on the Python package index
(``openai-whisper``'s sdist ships it), verified by sha256 and cached under
``$GPT2LAB_CACHE/tiktoken``.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

from gpt2lab.errors import Gpt2labError
from gpt2lab.fetch import DownloadError, fetch_cached
from gpt2lab.fileio import cache_dir

log = logging.getLogger(__name__)

EOT_TOKEN = 50256
EOT_TEXT = "<|endoftext|>"
VOCAB_SIZE = 50257
MAX_TOKEN_BYTES = 128  # the longest GPT-2 token (tests/test_tokenizer.py checks it against the ranks)
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
RANKS_SOURCES = ("pypi://openai-whisper==20250625/whisper/assets/gpt2.tiktoken",)


class TokenizerUnavailableError(Gpt2labError, RuntimeError):
    """Neither tiktoken's download nor the package-index copy of the ranks could be had."""


def _ranks_path() -> Path:
    return cache_dir() / "tiktoken" / "gpt2.tiktoken"


def _offline_encoding() -> tiktoken.Encoding:
    try:
        path = fetch_cached(RANKS_SOURCES, _ranks_path(), sha256=RANKS_SHA256)  # a corrupt copy is fetched again
    except DownloadError as err:
        raise TokenizerUnavailableError(
            f"GPT-2 tokenizer unavailable: tiktoken could not download its ranks and {err}"
        ) from err
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=load_tiktoken_bpe(str(path), expected_hash=RANKS_SHA256),
        special_tokens={EOT_TEXT: EOT_TOKEN},
        explicit_n_vocab=VOCAB_SIZE,
    )


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding (``encode``, ``decode``, ``eot_token``), offline when needed."""
    if _ranks_path().is_file():
        return _offline_encoding()
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # noqa: BLE001 - any failure here (network, cache) has the same remedy
        log.info("tiktoken could not load gpt2 (%s); using the package-index copy of the ranks", err)
        return _offline_encoding()


def encode(text: str) -> list[int]:
    """Token ids of ``text``; ``<|endoftext|>`` in the text is encoded as the EOS token."""
    return get_tokenizer().encode(text, allowed_special={EOT_TEXT})


def decode(ids: list[int]) -> str:
    return get_tokenizer().decode(ids)


def text_bound(max_tokens: int) -> int:
    """Characters of a text that always hold its first ``max_tokens`` tokens (each token is at most
    :data:`MAX_TOKEN_BYTES` bytes, so at most that many characters; one token more for the word
    cut at the bound). Cutting a text there before encoding bounds the work for any input size."""
    return (max_tokens + 1) * MAX_TOKEN_BYTES
