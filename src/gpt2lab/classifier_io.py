"""A trained classifier's folder: save only what was trained, rebuild it on its base.

The folder holds ``classifier.json`` with what is needed to rebuild the model (mode, base
checkpoint path and sha256, model config, ``max_length``, labels, ``head_bias``, the counts of
trainable and total parameters) beside the trained tensors: ``adapter.safetensors`` +
``adapter.json`` (``lora``) and/or ``trained.safetensors`` (``last_block``, ``full``; in ``lora``
mode only when other body tensors were trained too, as an imported PEFT adapter's
``modules_to_save``), and ``head.safetensors`` (``weight``, and ``bias`` when the head has one;
folders written before ``head_bias`` existed always have one).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2lab.checkpoint import CONFIG_FILE, load_model, read_config, verify_checkpoint
from gpt2lab.classifier import ClassifierError, SpamClassifier
from gpt2lab.dataset import CLASS_NAMES
from gpt2lab.fileio import atomic_dir, verify_folder, write_atomic, write_manifest
from gpt2lab.lora import ADAPTER_FILE, LoRAConfig, load_adapter, merge, save_adapter

log = logging.getLogger(__name__)

META_FILE = "classifier.json"
HEAD_FILE = "head.safetensors"
TRAINED_FILE = "trained.safetensors"  # last_block / full: the trained body tensors
FORMAT_VERSION = 1


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
    ``full`` write the trained body tensors and the head. A ``lora`` model whose body tensors
    also require grad (an imported PEFT adapter with more ``modules_to_save`` than the head)
    writes those too.
    """
    base_meta = read_config(base_dir)
    with atomic_dir(out_dir) as tmp:
        files = {"head": HEAD_FILE}
        if mode == "lora":
            if lora is None:
                raise ClassifierError("saving a lora-mode classifier needs its LoRAConfig")
            save_adapter(model.body, tmp, lora, base_sha256=base_meta["sha256"])
            files["adapter"] = ADAPTER_FILE
        trained = trained_state(model)
        if mode != "lora" or trained:
            save_file(trained, str(tmp / TRAINED_FILE), metadata={"format": "pt"})
            files["trained"] = TRAINED_FILE
        head = {k: v.detach().float().contiguous() for k, v in model.head.state_dict().items()}
        save_file(head, str(tmp / HEAD_FILE), metadata={"format": "pt"})
        meta = {
            "format_version": FORMAT_VERSION,
            "mode": mode,
            "labels": list(CLASS_NAMES[: model.head.out_features]),
            "max_length": model.max_length,
            "head_bias": model.head.bias is not None,
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
        write_atomic(tmp / META_FILE, json.dumps(meta, indent=2) + "\n")
        write_manifest(tmp)  # last: it vouches for every file above
    return Path(out_dir)


def read_classifier_meta(path: str | Path) -> dict[str, Any]:
    """The folder's ``classifier.json``, its shape checked (not its bytes: see :func:`load_classifier`)."""
    file = Path(path) / META_FILE
    if not file.is_file():
        raise ClassifierError(f"{path}: no {META_FILE}; not a trained classifier folder (run the train stage)")
    try:
        meta = json.loads(file.read_text())
        ok = (
            meta["mode"] in ("lora", "last_block", "full")
            and isinstance(meta["labels"], list) and len(meta["labels"]) == 2
            and all(isinstance(label, str) for label in meta["labels"])
            and isinstance(meta["max_length"], int) and meta["max_length"] > 0
            and isinstance(meta["base"]["sha256"], str) and isinstance(meta["base"]["path"], str)
            and isinstance(meta["files"]["head"], str)
        )  # fmt: skip
        if not ok:
            raise ValueError("a field has a value of the wrong kind")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ClassifierError(f"{file}: not a gpt2lab classifier description ({type(err).__name__}: {err})") from err
    return meta


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

    Raises :class:`gpt2lab.fileio.IntegrityError` if a byte of either folder differs from its
    manifest, :class:`BaseCheckpointMissingError` if the base checkpoint is not there, and
    :class:`ClassifierError` if a file is missing or the base checkpoint's weights differ from
    the ones the classifier was trained on.
    """
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise ClassifierError(f"{path}: no {META_FILE}; not a trained classifier folder (run the train stage)")
    verify_folder(path)  # every byte of the folder, classifier.json included, before it is read
    meta = read_classifier_meta(path)
    base_dir = Path(base_dir if base_dir is not None else meta["base"]["path"])
    want = meta["base"]["sha256"]
    if not (base_dir / CONFIG_FILE).is_file():
        raise BaseCheckpointMissingError(path, base_dir, meta["base"]["path"], want)
    actual = verify_checkpoint(base_dir)  # the base's bytes, not what its config.json says
    if actual != want:
        raise ClassifierError(
            f"{path}: trained on base checkpoint sha256 {want}, but the weights in {base_dir} have sha256 "
            f"{actual}; use the base it was trained on (or retrain)"
        )
    body = load_model(base_dir)
    if meta["mode"] == "lora":
        load_adapter(body, path, base_sha256=want)
    if "trained" in meta["files"]:
        state = _load_tensors(path / meta["files"]["trained"])
        own = body.state_dict()
        bad = [k for k in state if k not in own or own[k].shape != state[k].shape]
        if bad:
            raise ClassifierError(f"{path}: tensor {bad[0]!r} does not fit the base model {base_dir}")
        body.load_state_dict(state, strict=False)
    if merged:  # after the trained tensors: a merge adds the adapter to the weight they set
        merge(body)
    head = _load_tensors(path / meta["files"]["head"])
    # Folders written before head_bias existed have no key and always a bias: the file tells.
    model = SpamClassifier(body, len(meta["labels"]), meta["max_length"], head_bias="bias" in head)
    try:
        model.head.load_state_dict(head)
    except RuntimeError as err:
        raise ClassifierError(f"{path}/{meta['files']['head']}: does not fit the model ({err})") from err
    model.requires_grad_(False)
    return model.eval()
