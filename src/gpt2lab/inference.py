"""The inference API: :class:`Classifier` (load, ``predict``, ``predict_proba``, ``classify``).

Messages are tokenized, cut to the model's ``max_length`` and batched by length (sorted, then
padded per batch); results come back in input order. The model runs on the device it is on
(``Classifier.load(..., device="auto")``: a GPU when there is one); batches reach a GPU from
pinned memory without blocking.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from gpt2lab.batching import Batch, SpamDataset, collate
from gpt2lab.classifier import ClassifierError, SpamClassifier, cast_frozen_linears
from gpt2lab.classifier_io import load_classifier, read_classifier_meta
from gpt2lab.dataset import CLASS_NAMES
from gpt2lab.devices import DTYPES, autocast, resolve_device, resolve_precision
from gpt2lab.quantize import Int8Linear, check_int8, quantize_int8

TEXT_COLUMN = "text"  # a DataFrame's column of messages (also the served model's input column)


@torch.inference_mode()
def predict_proba(
    model: SpamClassifier,
    texts: Sequence[str],
    batch_size: int = 32,
    precision: str = "bf16",
    *,
    stop: Callable[[], str | None] | None = None,
) -> np.ndarray:
    """Spam probability (N,) of each text, in input order, computed on the model's device.

    Texts are tokenized, cut to ``model.max_length`` tokens and batched by length (sorted,
    then padded per batch) so little time goes into padding. ``precision``: fp32, or bf16 / fp16
    autocast (resolved: see :func:`gpt2lab.devices.resolve_precision`). ``stop`` is asked before
    each batch; when it returns a reason, :class:`StoppedError` is raised (a server's deadline or
    shutdown: the work stops within one batch).
    """
    dataset = SpamDataset(texts, None, model.max_length)
    order = np.argsort(dataset.lengths, kind="stable")
    probs = np.empty(len(dataset), dtype=np.float64)
    model.eval()
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    for start in range(0, len(order), batch_size):
        if stop is not None and (reason := stop()):
            raise StoppedError(f"classification stopped after {start} of {len(order)} messages: {reason}")
        idx = order[start : start + batch_size]
        batch = collate([dataset[int(i)] for i in idx])
        batch = batch.to(device) if not cuda else Batch(*(t.pin_memory() for t in batch)).to(device, non_blocking=True)
        with autocast(precision, device):
            logits = model(batch.ids, batch.lengths)
        probs[idx] = torch.softmax(logits.float(), dim=-1)[:, 1].cpu().numpy()
    return probs


class InvalidTextError(ClassifierError, TypeError):
    """What was passed to classify is not a list of strings; the message names the first bad item."""


class StoppedError(ClassifierError, TimeoutError):
    """Classification was stopped before the end (a deadline passed, or the server is shutting down)."""


def check_texts(texts: Any) -> list[str]:
    """``texts`` as a list of ``str``; raise :class:`InvalidTextError` for a lone string or a non-string item.

    Accepted: a list, tuple or other iterable of strings, a pandas Series, or a DataFrame with a
    ``text`` column (its messages). A lone ``str`` is refused rather than read as a sequence of
    one-character messages; ``None``/NaN items are refused, never read as the text "None".
    """
    if isinstance(texts, (str, bytes)):
        raise InvalidTextError(f"expected a list of messages, got a single {type(texts).__name__}; wrap it: [text]")
    if isinstance(texts, pd.DataFrame):  # iterating one would give its column names
        if TEXT_COLUMN not in texts.columns:
            raise InvalidTextError(
                f"a DataFrame of messages needs a {TEXT_COLUMN!r} column; it has {list(texts.columns)}"
            )
        texts = texts[TEXT_COLUMN]
    try:
        items = list(texts)
    except TypeError:
        raise InvalidTextError(f"expected a list of messages (strings), got {type(texts).__name__}") from None
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise InvalidTextError(f"message {i} is {type(text).__name__} ({text!r:.40}), not a string; pass text")
    return items


class Classifier:
    """A trained spam classifier for inference: ``Classifier.load(dir)``, then ``predict`` / ``predict_proba``.

    Messages are classified in batches of ``batch_size``, sorted by length so little time goes
    into padding; results come back in input order. Defined behaviour for awkward input:

    - an empty message is read as the end-of-text token alone (it still gets a probability);
    - a message longer than ``max_length`` tokens (the model's context, 1024 for GPT-2, unless
      training set ``train.max_length``) is truncated: its FIRST ``max_length`` tokens are read,
      and only its first ``(max_length + 1) * 128`` characters are tokenized, so a huge message
      costs what a long one does;
    - emoji and any other Unicode go through GPT-2's byte-level BPE unchanged (a lone surrogate
      becomes U+FFFD);
    - a DataFrame is read from its ``text`` column;
    - a non-string item (``None`` included), or a single string instead of a list, raises
      :class:`InvalidTextError`.

    Example::

        clf = Classifier.load("models/classifier")
        clf.predict(["You won $1000! Claim now.", "see you at lunch?"])  # ['spam', 'ham']
        clf.predict_proba(["You won $1000! Claim now."])                  # array([0.98...])
    """

    def __init__(
        self,
        model: SpamClassifier,
        *,
        labels: Sequence[str] = CLASS_NAMES,
        batch_size: int = 32,
        precision: str = "fp32",
        threshold: float = 0.5,
    ):
        if len(labels) != 2 or model.head.out_features != 2:
            raise ClassifierError(f"expected a 2-class (ham, spam) classifier, got labels {list(labels)}")
        if precision not in DTYPES:
            raise ClassifierError(f"precision: {precision!r} is not one of {' | '.join(DTYPES)} (resolve auto first)")
        if not 0.0 <= threshold <= 1.0:
            raise ClassifierError(f"threshold: {threshold} is not between 0 and 1")
        if batch_size < 1:
            raise ClassifierError(f"batch_size: {batch_size} is not a positive integer")
        self.model = model.eval()
        self.labels = tuple(labels)
        self.batch_size, self.precision, self.threshold = batch_size, precision, threshold

    @classmethod
    def load(
        cls,
        path: str | Path,
        base_dir: str | Path | None = None,
        *,
        batch_size: int = 32,
        precision: str = "fp32",
        threshold: float = 0.5,
        device: str = "auto",
    ) -> Classifier:
        """Load the folder the train stage wrote (``models/classifier``) onto its base checkpoint.

        Args:
            path: the trained classifier folder.
            base_dir: the base checkpoint; default: the path recorded at training time.
            batch_size: messages per forward pass.
            precision: ``fp32``; ``bf16`` (about 2x faster on CPUs with AVX-512 bf16; the
                transformer's linear weights are then stored in bf16 on a CPU, as autocast would
                cast them); ``fp16`` (GPUs only); ``int8`` (CPU only: the transformer's linear
                weights quantized to int8 at load, per output channel, for batches of many rows:
                :mod:`gpt2lab.quantize`; the files stay fp32; raises
                :class:`~gpt2lab.quantize.Int8UnsupportedError` on a CPU without the kernels);
                ``auto`` (bf16 where the hardware has it, fp16 on older GPUs, else fp32).
            threshold: a message is ``spam`` when its spam probability is >= threshold.
            device: ``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``. A
                device or precision this machine cannot run raises a one-line
                :class:`gpt2lab.devices.DeviceError`.
        """
        target = resolve_device(device, key="device")
        precision = resolve_precision(precision, target, key="precision")
        if precision == "int8":
            check_int8()  # before the slow part
        model = load_classifier(path, base_dir)
        if precision == "bf16" and target.type == "cpu":  # on a GPU autocast casts as it goes
            cast_frozen_linears(model, torch.bfloat16)
        elif precision == "int8":
            quantize_int8(model.body.h, "batch")  # the blocks only: the classifier never runs lm_head
        labels = read_classifier_meta(path)["labels"]
        return cls(model.to(target), labels=labels, batch_size=batch_size, precision=precision, threshold=threshold)

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return next(self.model.parameters()).device

    @property
    def max_length(self) -> int:
        """Messages are cut to this many tokens (their first ones are kept)."""
        return self.model.max_length

    def predict_proba(self, texts: Sequence[str], *, stop: Callable[[], str | None] | None = None) -> np.ndarray:
        """Spam probability (N,) float64 of each message, in input order (``stop``: see :func:`predict_proba`)."""
        return predict_proba(self.model, check_texts(texts), self.batch_size, self.precision, stop=stop)

    def predict(self, texts: Sequence[str]) -> list[str]:
        """Label (``"spam"`` or ``"ham"``) of each message, in input order."""
        return [self.labels[int(p >= self.threshold)] for p in self.predict_proba(texts)]

    def classify(self, texts: Sequence[str], *, stop: Callable[[], str | None] | None = None) -> list[dict[str, Any]]:
        """``[{"label": "spam", "spam_probability": 0.97}, ...]``: both answers in one pass."""
        probs = self.predict_proba(texts, stop=stop)
        return [{"label": self.labels[int(p >= self.threshold)], "spam_probability": float(p)} for p in probs]


def classify_review(
    text: str,
    model: Classifier | SpamClassifier,
    tokenizer: Any = None,
    device: Any = None,
    max_length: int | None = None,
    pad_token_id: int = 50256,
) -> str:
    """The reference recipe's one-message call, as a thin wrapper over :class:`Classifier`.

    Returns the recipe's strings: ``"spam"`` or ``"not spam"``. The signature is the recipe's so
    code written for it runs unchanged: ``tokenizer`` must be GPT-2's BPE (gpt2lab always uses it),
    ``device`` is unused (the model runs where it is: ``Classifier.load(..., device=...)``), and
    ``pad_token_id`` is unused because one message needs no padding.
    ``max_length`` truncates the message to that many tokens (never beyond the model's limit).
    """
    if isinstance(model, Classifier):
        clf = model
    else:  # a bare model: run it at the precision its weights are stored in (bf16: cast on a CPU)
        bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
        int8 = any(isinstance(m, Int8Linear) for m in model.modules())
        clf = Classifier(model, precision="int8" if int8 else "bf16" if bf16 else "fp32")
    if max_length is not None and max_length < clf.max_length:
        # A shallow copy shares every weight; only its truncation length differs.
        view = copy.copy(clf.model)
        view.max_length = max_length
        clf = Classifier(view, labels=clf.labels, batch_size=1, precision=clf.precision, threshold=clf.threshold)
    return "spam" if clf.predict([text])[0] == clf.labels[1] else "not spam"
