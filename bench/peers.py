"""Inference engines a user might pick instead of gpt2lab, on the same GPT-2 weights, converted here.

- CTranslate2 (``ctranslate2``): its Transformers converter on a ``GPT2LMHeadModel`` saved to a
  temporary folder; run at ``compute_type`` ``float32`` and ``int8`` (weights quantized at load).
  As a classifier: the same decoder with the 2-class head as its output layer.
- ONNX Runtime (``onnxruntime``, ``onnx``): the model exported with ``torch.onnx`` (a decoder
  step with the KV cache as inputs and outputs, and a sequence classifier), run in fp32 and
  after ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, inputs quantized per call).

They are optional bench dependencies (``pip install -e .[bench]``); :func:`missing` names the
ones not installed so a benchmark can print a note and skip them. Nothing here is used by the
library, the pipeline or the tests.

Each engine runs in a process of its own (:class:`Isolated`): engines bring their own thread
pools and OpenMP runtime (CTranslate2 bundles a second libgomp), and sharing a process lets one
slow the next. Measured here (2 cores, 2 threads): after one CTranslate2 int8 call, torch's
two-thread matmuls in the same process ran 1.4-2.2x slower for the rest of the process (fbgemm
int8 GEMV 95 -> 210 us), which cut gpt2lab's int8 decoding from ~62 to ~39 tok/s.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import time
import warnings
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lab.model import GPT2
from gpt2lab.tokenizer import get_tokenizer

ENGINES = {"CTranslate2": ("ctranslate2",), "ONNX Runtime": ("onnxruntime", "onnx")}


def missing(engine: str) -> list[str]:
    """The packages of ``engine`` (a key of :data:`ENGINES`) that are not installed."""
    return [m for m in ENGINES[engine] if importlib.util.find_spec(m) is None]


def skip_note(engine: str) -> str | None:
    """A one-line note when ``engine`` cannot run here, else None."""
    absent = missing(engine)
    return f"{engine} skipped: {', '.join(absent)} not installed (pip install -e .[bench])" if absent else None


class Isolated:
    """``factory(*args)`` built and called in a spawned process of its own; ``timed`` calls a method there.

    The process sits idle between calls (blocked on its pipe), so timings interleave fairly with
    the others'; it exits with :meth:`close` or with the benchmark.
    """

    def __init__(self, factory: Callable[..., Any], *args: Any):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no state shared with ours
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, factory, args), daemon=True)
        self._process.start()
        child.close()
        self._reply()  # built (or its error raised here)

    def timed(self, method: str, *args: Any) -> tuple[float, Any]:
        """(seconds the call took inside the engine's process, its result)."""
        self._conn.send((method, args))
        return self._reply()

    def _reply(self) -> Any:
        ok, value = self._conn.recv()
        if not ok:
            raise RuntimeError(f"engine process failed: {value}")
        return value

    def close(self) -> None:
        self._conn.send(None)
        self._process.join(timeout=30)


def _serve(conn: Connection, factory: Callable[..., Any], args: tuple) -> None:
    try:
        engine = factory(*args)
        conn.send((True, None))
    except Exception as e:  # reported in the benchmark's process
        conn.send((False, repr(e)))
        return
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the benchmark has exited
            return
        if request is None:
            return
        method, method_args = request
        try:
            t0 = time.perf_counter()
            result = getattr(engine, method)(*method_args)
            conn.send((True, (time.perf_counter() - t0, result)))
        except Exception as e:
            conn.send((False, repr(e)))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (its vocab.json spells tokens with these)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(c) for b, c in [*zip(keep, keep), *zip(extra, range(256, 256 + len(extra)))]}


def save_hf_folder(hf_model: nn.Module, folder: Path) -> Path:
    """``hf_model`` saved as a Hugging Face folder with GPT-2's vocabulary (from the offline tiktoken ranks).

    Converters read the vocabulary only (token strings by id), so merges.txt is left empty.
    """
    from transformers import GPT2Tokenizer

    hf_model.save_pretrained(folder)
    enc, table = get_tokenizer(), _bytes_to_unicode()
    vocab = {"".join(table[b] for b in enc.decode_single_token_bytes(i)): i for i in range(enc.n_vocab)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    return folder


# --- CTranslate2 ---------------------------------------------------------------------------
def ct2_convert(hf_folder: Path, out: Path) -> Path:
    """Convert a saved GPT2LMHeadModel folder to CTranslate2 (fp32 on disk; int8 is chosen at load)."""
    from ctranslate2.converters import TransformersConverter

    TransformersConverter(str(hf_folder)).convert(str(out), force=True)
    return out


class CT2Generator:
    """Greedy decoding with ``ctranslate2.Generator`` (``compute_type``: ``float32`` or ``int8``)."""

    def __init__(self, folder: Path, compute_type: str, threads: int):
        import ctranslate2

        self.generator = ctranslate2.Generator(str(folder), device="cpu", compute_type=compute_type,
                                               intra_threads=threads)  # fmt: skip
        self.vocab = json.loads((folder / "vocabulary.json").read_text())

    def generate(self, prompt: list[int], n: int) -> list[int]:
        """Exactly ``n`` new greedy tokens after ``prompt`` (no end-of-text stop)."""
        (result,) = self.generator.generate_batch(
            [[self.vocab[i] for i in prompt]], max_length=n, min_length=n, sampling_topk=1,
            include_prompt_in_result=False, end_token=[],
        )  # fmt: skip
        return result.sequences_ids[0]


# --- ONNX Runtime --------------------------------------------------------------------------
class _DecoderStep(nn.Module):
    """One cached step of gpt2lab's GPT-2 as plain tensors, for export: the past keys and values
    come in as one tensor (n_layer, 2, B, n_head, P, head_dim) and go out with the new ones."""

    def __init__(self, model: GPT2):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, past: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, (B, T), P = self.model, ids.shape, past.shape[4]
        x = m.wte(ids) + m.wpe(torch.arange(T) + P)  # (B, T, C)
        # Query i (at P + i) sees keys 0 .. P + i.
        mask = torch.arange(P + T)[None, :] <= (torch.arange(T) + P)[:, None]  # (T, P + T)
        presents = []
        for i, block in enumerate(m.h):
            attn, h = block.attn, block.ln_1(x)
            C = h.shape[-1]
            qkv = attn.c_attn(h).view(B, T, 3, attn.n_head, C // attn.n_head).permute(2, 0, 3, 1, 4)
            kv = torch.cat([past[i], qkv[1:]], dim=3)  # (2, B, n_head, P + T, head_dim)
            presents.append(kv)
            y = F.scaled_dot_product_attention(qkv[0], kv[0], kv[1], attn_mask=mask)
            x = x + attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
            x = x + block.mlp(block.ln_2(x))
        logits = m.lm_head(m.ln_f(x[:, -1]))  # (B, V): the next token only
        return logits, torch.stack(presents)


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _export(module: nn.Module, args: tuple, path: Path, names: tuple[list[str], list[str]], axes: dict) -> Path:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=names[0], output_names=names[1], dynamic_axes=axes,
                          opset_version=17, dynamo=False)  # fmt: skip
    return path


def quantize_int8(fp32: Path, out: Path) -> Path:
    """ONNX Runtime's dynamic int8 quantization of every MatMul/Gemm weight (its default recipe)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8)
    return out


def ort_export_decoder(model: GPT2, folder: Path) -> Path:
    """gpt2lab's GPT-2 as an ONNX decoder step (fp32) in ``folder``."""
    cfg = model.config
    past = torch.zeros(cfg.n_layer, 2, 1, cfg.n_head, 0, cfg.head_dim)
    axes = {"ids": {1: "T"}, "past": {4: "P"}, "present": {4: "P+T"}}
    return _export(_DecoderStep(model.float().eval()), (torch.zeros(1, 3, dtype=torch.long), past),
                   folder / "decoder.onnx", (["ids", "past"], ["logits", "present"]), axes)  # fmt: skip


class ORTGenerator:
    """Greedy decoding with an exported decoder step: the prompt once, then one token per run."""

    def __init__(self, path: Path, threads: int, cfg):
        self.session, self.cfg = _session(path, threads), cfg

    def generate(self, prompt: list[int], n: int) -> list[int]:
        cfg = self.cfg
        past = np.zeros((cfg.n_layer, 2, 1, cfg.n_head, 0, cfg.head_dim), dtype=np.float32)
        ids, out = np.array([prompt], dtype=np.int64), []
        for _ in range(n):
            logits, past = self.session.run(None, {"ids": ids, "past": past})
            out.append(int(logits[0].argmax()))
            ids = np.array([[out[-1]]], dtype=np.int64)
        return out


def ort_export_classifier(hf_classifier: nn.Module, folder: Path) -> Path:
    """A transformers ``GPT2ForSequenceClassification`` as ONNX: (ids, attention mask) -> logits (B, 2)."""
    hf_classifier = hf_classifier.float().eval()
    ids = torch.full((2, 5), 50256, dtype=torch.long)
    mask = torch.ones(2, 5, dtype=torch.long)
    axes = {"ids": {0: "B", 1: "T"}, "mask": {0: "B", 1: "T"}, "logits": {0: "B"}}

    class Logits(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=ids, attention_mask=mask, use_cache=False).logits

    return _export(Logits(hf_classifier), (ids, mask), folder / "classifier.onnx", (["ids", "mask"], ["logits"]), axes)


class _Classifier:
    def spam_probability(self, batch: list[list[int]]) -> np.ndarray:
        raise NotImplementedError

    def split(self, batches: list[list[list[int]]]) -> np.ndarray:
        """Spam probabilities of every message of ``batches``, in their order (one call: timed as one)."""
        return np.concatenate([self.spam_probability(b) for b in batches])


def padded(batch: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids (B, T) right-padded with ``pad``, and the attention mask (B, T), int64."""
    width = max(map(len, batch))
    ids = np.full((len(batch), width), pad, dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for r, seq in enumerate(batch):
        ids[r, : len(seq)], mask[r, : len(seq)] = seq, 1
    return ids, mask


class ORTClassifier(_Classifier):
    """Spam probabilities from an exported classifier, fed ids padded on the right with ``pad`` and a mask."""

    def __init__(self, path: Path, threads: int, pad: int):
        self.session, self.pad = _session(path, threads), pad

    def spam_probability(self, batch: list[list[int]]) -> np.ndarray:
        """``batch``: token ids of each message (any lengths) -> spam probability (B,)."""
        ids, mask = padded(batch, self.pad)
        (logits,) = self.session.run(None, {"ids": ids, "mask": mask})
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return (e / e.sum(-1, keepdims=True))[:, 1]


# --- classification ------------------------------------------------------------------------
def ct2_convert_classifier(hf_classifier: nn.Module, hf_folder: Path, out: Path) -> Path:
    """A ``GPT2ForSequenceClassification`` as a CTranslate2 decoder whose output layer is the
    2-class head (CTranslate2 has no sequence-classification model for GPT-2): its logits at a
    message's last token are the classifier's. ``hf_folder`` supplies the vocabulary."""
    from ctranslate2.converters.transformers import GPT2Loader
    from transformers import GPT2LMHeadModel, GPT2Tokenizer

    if getattr(hf_classifier.score, "bias", None) is not None:
        raise ValueError("the CTranslate2 head is read without a bias")
    lm = GPT2LMHeadModel(hf_classifier.config).eval()
    lm.transformer, lm.lm_head = hf_classifier.transformer, hf_classifier.score  # (2, n_embd) output layer
    spec = GPT2Loader()(lm, GPT2Tokenizer.from_pretrained(str(hf_folder)))
    spec.validate()
    spec.optimize(quantization=None)
    out.mkdir(parents=True, exist_ok=True)
    spec.save(str(out))
    return out


class CT2Classifier(_Classifier):
    """Spam probabilities from :func:`ct2_convert_classifier`'s model (``compute_type``: ``float32`` or ``int8``)."""

    def __init__(self, folder: Path, compute_type: str, threads: int):
        import ctranslate2

        self.generator = ctranslate2.Generator(str(folder), device="cpu", compute_type=compute_type,
                                               intra_threads=threads)  # fmt: skip

    def spam_probability(self, batch: list[list[int]]) -> np.ndarray:
        """``batch``: token ids of each message (any lengths) -> spam probability (B,)."""
        logits = np.asarray(self.generator.forward_batch(batch))  # (B, T, 2)
        last = logits[np.arange(len(batch)), [len(ids) - 1 for ids in batch]]  # (B, 2)
        e = np.exp(last - last.max(-1, keepdims=True))
        return (e / e.sum(-1, keepdims=True))[:, 1]
