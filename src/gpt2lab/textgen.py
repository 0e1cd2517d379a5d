"""Generation as text: prompts in, text out (the CLI's stream, the ``generate`` stage's samples)."""

from __future__ import annotations

import codecs
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gpt2lab.checkpoint import is_pretrained, load_model
from gpt2lab.devices import DTYPES, describe, resolve_device, resolve_precision
from gpt2lab.fileio import write_atomic
from gpt2lab.generate import generate, stream
from gpt2lab.model import GPT2
from gpt2lab.params import GenerateParams
from gpt2lab.quantize import check_int8, quantize_int8
from gpt2lab.tokenizer import EOT_TOKEN, decode, encode, get_tokenizer

log = logging.getLogger(__name__)


def stream_text(
    model: GPT2, prompt: str, max_new_tokens: int, *, stop_at_eos: bool = True, **sampling: Any
) -> Iterator[str]:
    """Stream the continuation of one ``prompt`` as text, one piece per new token (GPT-2 BPE).

    A token may end inside a multi-byte character; its bytes are held back (the piece is
    ``""``) until the character is complete, so every piece is valid text; bytes still
    incomplete at the end come as one last piece of U+FFFD. ``sampling``: as in
    :func:`stream`. An empty prompt starts from ``<|endoftext|>``, as GPT-2 was trained.
    """
    enc = get_tokenizer()
    ids = encode(prompt) or [EOT_TOKEN]
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    eos_id = EOT_TOKEN if stop_at_eos else None
    for (tok,) in stream(model, [ids], max_new_tokens, eos_id=eos_id, **sampling):
        if tok is not None:
            yield utf8.decode(enc.decode_single_token_bytes(tok))
    tail = utf8.decode(b"", final=True)
    if tail:
        yield tail


def load_generator(model_dir: str | Path, precision: str, device: torch.device | str = "cpu") -> GPT2:
    """The language model of ``model_dir`` on ``device``, ready to generate at ``precision``
    (``fp32``, ``bf16``, ``fp16``, ``int8``: resolved, see :func:`gpt2lab.devices.resolve_precision`).

    ``int8`` (CPU only) quantizes every linear weight, the LM head included, for decoding (a few rows per
    call; :mod:`gpt2lab.quantize`); the checkpoint on disk stays fp32. On a CPU without the
    int8 kernels it raises :class:`~gpt2lab.quantize.Int8UnsupportedError` before loading.
    """
    if precision == "int8":
        check_int8()
    model = load_model(model_dir, dtype=DTYPES[precision], device=device)
    if precision == "int8":
        quantize_int8(model, "decode")
    return model


def generate_samples(model_dir: str | Path, params: GenerateParams, *, progress: bool = False) -> dict[str, Any]:
    """Sample a continuation of every prompt in ``params``; the result of the ``generate`` stage.

    Each prompt is generated alone from a CPU generator seeded with ``params.seed``, so adding a
    prompt does not change the others and the model's device does not change the draws. Returns
    ``{"samples": [...], "tokens_per_s": ..., "pretrained": ..., ...}``; tokens/s counts new
    tokens over the whole call (prefill included).
    """
    device = resolve_device(params.device, key="generate.device")
    precision = resolve_precision(params.precision, device, key="generate.precision")
    model = load_generator(model_dir, precision, device)
    pretrained = is_pretrained(model_dir)
    if not pretrained:
        log.info("%s holds random weights: the samples are noise; fetch pretrained weights for real text", model_dir)
    samples = []
    for prompt in tqdm(params.prompts, desc="generate", unit="prompt", disable=None if progress else True):
        ids = encode(prompt) or [EOT_TOKEN]
        generator = torch.Generator().manual_seed(params.seed)
        t0 = time.perf_counter()
        (new,) = generate(
            model, [ids], params.max_new_tokens, temperature=params.temperature, top_k=params.top_k,
            top_p=params.top_p, eos_id=EOT_TOKEN if params.stop_at_eos else None, generator=generator,
            prompt_lookup=params.prompt_lookup,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        samples.append({
            "prompt": prompt,
            "completion": decode(new),
            "prompt_tokens": len(ids),
            "new_tokens": len(new),
            "finish_reason": "length" if len(new) == params.max_new_tokens else "eos",
            "seconds": round(seconds, 4),
            "tokens_per_s": round(len(new) / seconds, 2),
        })  # fmt: skip
    total_tokens = sum(s["new_tokens"] for s in samples)
    total_s = sum(s["seconds"] for s in samples)
    return {
        "model_dir": str(model_dir),
        "pretrained": pretrained,
        "precision": precision,
        "device": describe(device),
        "num_threads": torch.get_num_threads(),
        "new_tokens": total_tokens,
        "tokens_per_s": round(total_tokens / total_s, 2) if total_s > 0 else 0.0,
        "samples": samples,
    }


def write_outputs(result: dict[str, Any], metrics_file: str | Path, samples_file: str | Path) -> list[Path]:
    """The ``generate`` stage's files: tokens/s alone (its DVC metric) and the whole result with the samples."""
    return [write_atomic(metrics_file, json.dumps({"tokens_per_s": result["tokens_per_s"]}, indent=2) + "\n"),
            write_atomic(samples_file, json.dumps(result, indent=2) + "\n")]  # fmt: skip
