"""GPT-2 spam classifier: the GPT-2 body plus a 2-class head on the last real token.

Batches are right-padded (see :func:`gpt2lab.data.collate`). With causal attention a token
never attends to anything after it, so padding cannot change the hidden state of any real
token and no attention mask is needed: the head reads position ``lengths - 1``. The
50257-wide ``lm_head`` is never computed.

Training modes (``train.mode``):

- ``lora`` (default): LoRA adapters on ``lora.targets`` plus the head are trained; the base
  weights, layer norms and embeddings stay frozen. Saved: ``adapter.safetensors`` +
  ``adapter.json`` and ``head.safetensors``.
- ``last_block``: the reference recipe's ``alternative=False``: the last transformer block,
  the final layer norm and the head. Saved: those tensors in ``trained.safetensors`` + head.
- ``full``: every parameter. Saved: the whole body in ``trained.safetensors`` + head.

A trained folder also holds ``classifier.json`` with what is needed to rebuild the model:
mode, base checkpoint path and sha256, model config, ``max_length``, labels and the counts
of trainable and total parameters. :func:`load_classifier` rebuilds it on its base.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2lab.download import atomic_dir
from gpt2lab.errors import Gpt2labError
from gpt2lab.lora import ADAPTER_FILE, LoRAConfig, apply_lora, load_adapter, mark_trainable, merge, save_adapter
from gpt2lab.model import GPT2
from gpt2lab.weights import CONFIG_FILE, CheckpointError, load_model, read_config

log = logging.getLogger(__name__)

LABELS = ("ham", "spam")
META_FILE = "classifier.json"
HEAD_FILE = "head.safetensors"
TRAINED_FILE = "trained.safetensors"  # last_block / full: the trained body tensors
FORMAT_VERSION = 1


class ClassifierError(Gpt2labError, ValueError):
    """A classifier folder is missing, incomplete, or does not belong to the base model given."""


class BaseCheckpointMissingError(ClassifierError):
    """The base checkpoint a classifier is rebuilt on is not at the path given (or recorded at training).

    ``str(err)`` words the fix for a Python caller (``base_dir=``); :meth:`message` words it for
    another interface, e.g. ``err.message("--base DIR")`` for the command line.
    """

    def __init__(self, classifier: Path, base_dir: Path, recorded: str, sha256: str):
        self.classifier, self.base_dir, self.recorded, self.sha256 = classifier, base_dir, recorded, sha256
        super().__init__(self.message("base_dir=DIR"))

    def message(self, option: str) -> str:
        """The error message, telling the user to give the base checkpoint through ``option``."""
        what = "no such folder" if not self.base_dir.exists() else f"no {CONFIG_FILE} in it"
        recorded = "" if str(self.base_dir) == self.recorded else f"; it was trained on {self.recorded}"
        return (
            f"{self.classifier}: base checkpoint {self.base_dir} not found ({what}{recorded}); pass {option}, "
            f"the folder of the base checkpoint it was trained on (sha256 {self.sha256[:12]}...)"
        )


class SpamClassifier(nn.Module):
    """``model(ids, lengths)`` -> logits (B, num_classes) read at each sequence's last real token.

    Attributes:
        body: the GPT-2 (possibly with LoRA adapters); only ``body.hidden_states`` is used.
        head: ``nn.Linear(n_embd, num_classes)``.
        max_length: messages are cut to this many tokens (the first ones are kept).
    """

    def __init__(self, body: GPT2, num_classes: int = len(LABELS), max_length: int | None = None):
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.config.n_embd, num_classes)
        n_ctx = body.config.n_ctx
        self.max_length = n_ctx if max_length is None else min(max_length, n_ctx)

    def features(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Hidden state (B, n_embd) of the last real token of each right-padded row of ``ids`` (B, T)."""
        hidden = self.body.hidden_states(ids)  # (B, T, C)
        rows = torch.arange(ids.shape[0], device=ids.device)
        return hidden[rows, lengths.to(ids.device) - 1]  # (B, C)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) right-padded, lengths (B,) >= 1 -> logits (B, num_classes)."""
        return self.head(self.features(ids, lengths))

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Unique parameters (GPT-2's tied ``lm_head`` counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def trainable_prefixes(mode: str, n_layer: int) -> tuple[str, ...]:
    """Parameter-name prefixes trained besides LoRA matrices, for ``mode``."""
    if mode == "lora":
        return ("head",)
    if mode == "last_block":
        return (f"body.h.{n_layer - 1}", "body.ln_f", "head")
    if mode == "full":
        return ("",)
    raise ClassifierError(f"train.mode: unknown mode {mode!r}; allowed: lora | last_block | full")


def configure(model: SpamClassifier, mode: str, lora: LoRAConfig | None = None) -> int:
    """Prepare ``model`` for training in ``mode``: add adapters (``lora``) and set ``requires_grad``.

    Returns the number of trainable parameters.
    """
    if mode == "lora":
        if lora is None:
            raise ClassifierError("train.mode lora needs the lora section of params.yaml")
        apply_lora(model.body, lora)
    prefixes = trainable_prefixes(mode, model.body.config.n_layer)
    return mark_trainable(model, lora=mode == "lora", prefixes=prefixes)


def build_classifier(
    base_dir: str | Path,
    mode: str,
    lora: LoRAConfig | None = None,
    *,
    max_length: int | None = None,
    num_classes: int = len(LABELS),
) -> SpamClassifier:
    """Load the base checkpoint, add a fresh head (seed the RNG first) and configure ``mode``."""
    model = SpamClassifier(load_model(base_dir), num_classes, max_length)
    configure(model, mode, lora)
    return model


def trained_state(model: SpamClassifier) -> dict[str, torch.Tensor]:
    """The body tensors that ``requires_grad`` (not LoRA, not the head), fp32, with base names."""
    return {
        name.removeprefix("body."): p.detach().float().contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad and name.startswith("body.") and not name.rsplit(".", 1)[-1].startswith("lora_")
    }


def save_classifier(
    model: SpamClassifier,
    out_dir: str | Path,
    *,
    mode: str,
    base_dir: str | Path,
    lora: LoRAConfig | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write only what was trained, plus ``classifier.json``; replaces ``out_dir`` atomically.

    ``lora`` mode writes the adapter (with the base sha256) and the head; ``last_block`` and
    ``full`` write the trained body tensors and the head.
    """
    base_meta = read_config(base_dir)
    with atomic_dir(out_dir) as tmp:
        files = {"head": HEAD_FILE}
        if mode == "lora":
            if lora is None:
                raise ClassifierError("saving a lora-mode classifier needs its LoRAConfig")
            save_adapter(model.body, tmp, lora, base_sha256=base_meta["sha256"])
            files["adapter"] = ADAPTER_FILE
        else:
            save_file(trained_state(model), str(tmp / TRAINED_FILE), metadata={"format": "pt"})
            files["trained"] = TRAINED_FILE
        head = {k: v.detach().float().contiguous() for k, v in model.head.state_dict().items()}
        save_file(head, str(tmp / HEAD_FILE), metadata={"format": "pt"})
        meta = {
            "format_version": FORMAT_VERSION,
            "mode": mode,
            "labels": list(LABELS[: model.head.out_features]),
            "max_length": model.max_length,
            "base": {
                "path": str(base_dir),
                "sha256": base_meta["sha256"],
                "pretrained": bool(base_meta.get("pretrained", False)),
                "source": base_meta.get("source"),
            },
            "model": base_meta["model"],
            "lora": None if lora is None or mode != "lora" else {
                "rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(lora.targets),
            },
            "trainable_params": model.num_parameters(trainable_only=True),
            "total_params": model.num_parameters(),
            "files": files,
            **(extra or {}),
        }  # fmt: skip
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out_dir)


def read_classifier_meta(path: str | Path) -> dict[str, Any]:
    file = Path(path) / META_FILE
    if not file.is_file():
        raise ClassifierError(f"{path}: no {META_FILE}; not a trained classifier folder (run the train stage)")
    return json.loads(file.read_text())


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise ClassifierError(f"{file}: missing; the classifier folder is incomplete (re-run the train stage)")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise ClassifierError(f"{file}: unreadable ({err})") from err


def load_classifier(
    path: str | Path, base_dir: str | Path | None = None, *, merged: bool = True
) -> SpamClassifier:
    """Rebuild a trained classifier on its base checkpoint; returns it in eval mode.

    Args:
        path: the folder the train stage wrote (``classifier.json``, head, adapter or trained tensors).
        base_dir: the base checkpoint folder; default: the path recorded at training time.
        merged: fold LoRA adapters into the base weights (inference then costs what the base does).

    Raises :class:`BaseCheckpointMissingError` if the base checkpoint is not there, and
    :class:`ClassifierError` if a file is missing or the base checkpoint's sha256 differs from
    the one the classifier was trained on.
    """
    path = Path(path)
    meta = read_classifier_meta(path)
    base_dir = Path(base_dir if base_dir is not None else meta["base"]["path"])
    try:
        base_meta = read_config(base_dir)
    except CheckpointError as err:
        raise BaseCheckpointMissingError(path, base_dir, meta["base"]["path"], meta["base"]["sha256"]) from err
    want = meta["base"]["sha256"]
    if base_meta.get("sha256") != want:
        raise ClassifierError(
            f"{path}: trained on base checkpoint sha256 {want}, but {base_dir} has sha256 "
            f"{base_meta.get('sha256')}; use the base it was trained on (or retrain)"
        )
    body = load_model(base_dir)
    if meta["mode"] == "lora":
        load_adapter(body, path, base_sha256=want)
        if merged:
            merge(body)
    else:
        state = _load_tensors(path / meta["files"]["trained"])
        own = body.state_dict()
        bad = [k for k in state if k not in own or own[k].shape != state[k].shape]
        if bad:
            raise ClassifierError(f"{path}: tensor {bad[0]!r} does not fit the base model {base_dir}")
        body.load_state_dict(state, strict=False)
    model = SpamClassifier(body, len(meta["labels"]), meta["max_length"])
    head = _load_tensors(path / meta["files"]["head"])
    try:
        model.head.load_state_dict(head)
    except RuntimeError as err:
        raise ClassifierError(f"{path}/{meta['files']['head']}: does not fit the model ({err})") from err
    model.requires_grad_(False)
    return model.eval()


def autocast(precision: str) -> torch.autocast:
    """bf16 autocast on CPU for ``precision == "bf16"``; a no-op context for ``fp32``."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.inference_mode()
def predict_proba(
    model: SpamClassifier, texts: Sequence[str], batch_size: int = 32, precision: str = "bf16"
) -> np.ndarray:
    """Spam probability (N,) of each text, in input order.

    Texts are tokenized, cut to ``model.max_length`` tokens and batched by length (sorted,
    then padded per batch) so little time goes into padding.
    """
    from gpt2lab.data import SpamDataset, collate  # local: data pulls in pandas

    dataset = SpamDataset(texts, None, model.max_length)
    order = np.argsort(dataset.lengths, kind="stable")
    probs = np.empty(len(dataset), dtype=np.float64)
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([dataset[int(i)] for i in idx]).to(device)
        with autocast(precision):
            logits = model(batch.ids, batch.lengths)
        probs[idx] = torch.softmax(logits.float(), dim=-1)[:, 1].cpu().numpy()
    return probs


# --- inference API ------------------------------------------------------------------------
class InvalidTextError(ClassifierError, TypeError):
    """What was passed to classify is not a list of strings; the message names the first bad item."""


def check_texts(texts: Any) -> list[str]:
    """``texts`` as a list of ``str``; raise :class:`InvalidTextError` for a lone string or a non-string item.

    A lone ``str`` is refused rather than read as a sequence of one-character messages.
    """
    if isinstance(texts, (str, bytes)):
        raise InvalidTextError(f"expected a list of messages, got a single {type(texts).__name__}; wrap it: [text]")
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
      training set ``train.max_length``) is truncated: its FIRST ``max_length`` tokens are read;
    - emoji and any other Unicode go through GPT-2's byte-level BPE unchanged (a lone surrogate
      becomes U+FFFD);
    - a non-string item, or a single string instead of a list, raises :class:`InvalidTextError`.

    Example::

        clf = Classifier.load("models/classifier")
        clf.predict(["You won $1000! Claim now.", "see you at lunch?"])  # ['spam', 'ham']
        clf.predict_proba(["You won $1000! Claim now."])                  # array([0.98...])
    """

    def __init__(
        self,
        model: SpamClassifier,
        *,
        labels: Sequence[str] = LABELS,
        batch_size: int = 32,
        precision: str = "fp32",
        threshold: float = 0.5,
    ):
        if len(labels) != 2 or model.head.out_features != 2:
            raise ClassifierError(f"expected a 2-class (ham, spam) classifier, got labels {list(labels)}")
        if precision not in ("fp32", "bf16"):
            raise ClassifierError(f"precision: {precision!r} is not fp32 or bf16")
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
    ) -> Classifier:
        """Load the folder the train stage wrote (``models/classifier``) onto its base checkpoint.

        Args:
            path: the trained classifier folder.
            base_dir: the base checkpoint; default: the path recorded at training time.
            batch_size: messages per forward pass.
            precision: ``fp32``, or ``bf16`` (about 2x faster on CPUs with AVX-512 bf16; the
                transformer's linear weights are then stored in bf16, as autocast would cast them).
            threshold: a message is ``spam`` when its spam probability is >= threshold.
        """
        model = load_classifier(path, base_dir)
        if precision == "bf16":
            from gpt2lab.train import cast_frozen_linears  # local: train pulls in the training stack

            cast_frozen_linears(model, torch.bfloat16)
        labels = read_classifier_meta(path)["labels"]
        return cls(model, labels=labels, batch_size=batch_size, precision=precision, threshold=threshold)

    @property
    def max_length(self) -> int:
        """Messages are cut to this many tokens (their first ones are kept)."""
        return self.model.max_length

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Spam probability (N,) float64 of each message, in input order."""
        return predict_proba(self.model, check_texts(texts), self.batch_size, self.precision)

    def predict(self, texts: Sequence[str]) -> list[str]:
        """Label (``"spam"`` or ``"ham"``) of each message, in input order."""
        return [self.labels[int(p >= self.threshold)] for p in self.predict_proba(texts)]

    def classify(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """``[{"label": "spam", "probability": 0.97}, ...]``: both answers in one pass."""
        probs = self.predict_proba(texts)
        return [{"label": self.labels[int(p >= self.threshold)], "probability": float(p)} for p in probs]


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
    ``device`` is the CPU, and ``pad_token_id`` is unused because one message needs no padding.
    ``max_length`` truncates the message to that many tokens (never beyond the model's limit).
    """
    if isinstance(model, Classifier):
        clf = model
    else:  # a bare model: run it at the precision its weights are stored in
        bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
        clf = Classifier(model, precision="bf16" if bf16 else "fp32")
    if max_length is not None and max_length < clf.max_length:
        # A shallow copy shares every weight; only its truncation length differs.
        import copy

        view = copy.copy(clf.model)
        view.max_length = max_length
        clf = Classifier(view, labels=clf.labels, batch_size=1, precision=clf.precision, threshold=clf.threshold)
    return "spam" if clf.predict([text])[0] == clf.labels[1] else "not spam"
