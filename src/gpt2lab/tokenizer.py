"""GPT-2 BPE through tiktoken, with an offline route to the exact same ranks.

tiktoken normally downloads GPT-2's ranks (and caches them). Where that fails, the
identical ``r50k_base`` ranks file is taken from a package on the Python package index
(``openai-whisper``'s sdist ships it), verified by sha256 and cached under
``$GPT2LAB_CACHE/tiktoken``. :func:`write_hf_tokenizer` writes the same BPE as the files
``transformers`` reads (``vocab.json``, ``merges.txt``), derived from those ranks.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

from gpt2lab.errors import Gpt2labError
from gpt2lab.fetch import DownloadError, fetch_cached
from gpt2lab.fileio import cache_dir, write_atomic

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

# --- the same BPE as transformers' files -------------------------------------------------------
@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: how ``vocab.json`` and ``merges.txt`` spell bytes.

    Printable Latin-1 bytes stand for themselves; the other 68 take the code points from 256 on.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _spell(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts BPE joins last to make ``token``: merge its bytes using only lower ranks."""
    parts = [bytes([b]) for b in token]
    limit = ranks[token]
    while len(parts) > 2:
        found = [(ranks.get(a + b, limit), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        rank, i = min(found)
        if rank >= limit:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise TokenizerUnavailableError(f"token {token!r} (rank {limit}) is no merge of two lower-ranked tokens")
    return parts[0], parts[1]


@functools.cache
def vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """``vocab.json``'s token -> id map and ``merges.txt``'s lines, from tiktoken's ranks.

    GPT-2's ranks are its token ids, and token ``256 + i`` is made by merge ``i``, so the merges
    come out in order by replaying BPE on each token with the lower ranks only.
    """
    enc = get_tokenizer()
    ranks = {token: enc.encode_single_token(token) for token in enc.token_byte_values()}
    vocab = {_spell(token): rank for token, rank in ranks.items()}
    vocab[EOT_TEXT] = EOT_TOKEN
    merges = [
        " ".join(map(_spell, _last_merge(token, ranks)))
        for token, _ in sorted(ranks.items(), key=lambda item: item[1])
        if len(token) > 1
    ]
    return vocab, merges


def write_hf_tokenizer(out_dir: str | Path, model_max_length: int) -> list[Path]:
    """Write GPT-2's tokenizer as ``transformers`` reads it (``AutoTokenizer``, ``pipeline``).

    ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json``, with ``<|endoftext|>`` as the
    special token that ends text and pads. Texts longer than ``model_max_length`` tokens are cut
    to their first tokens with ``truncation=True``, as gpt2lab's classifier reads them.
    """
    out_dir = Path(out_dir)
    vocab, merges = vocab_and_merges()
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "truncation_side": "right",
        "padding_side": "right",
        "add_prefix_space": False,
        "errors": "replace",
        "bos_token": EOT_TEXT,
        "eos_token": EOT_TEXT,
        "unk_token": EOT_TEXT,
        "pad_token": EOT_TEXT,
    }
    return [
        write_atomic(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False) + "\n"),
        write_atomic(out_dir / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n"),
        write_atomic(out_dir / "tokenizer_config.json", json.dumps(config, indent=2) + "\n"),
    ]
