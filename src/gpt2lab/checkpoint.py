"""The canonical checkpoint folder: save, read and load it.

Layout::

    model.safetensors   the GPT2 state dict (fp32, ``lm_head`` omitted: it is tied to ``wte``)
    config.json         {"model": GPT2Config, "pretrained": bool, "source": str, "sha256": str}
    encoder.json, vocab.bpe (or tokenizer.json, ...)   when the source ships them

Folders are written atomically; loading checks every tensor's name and shape against the config.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2lab.errors import Gpt2labError
from gpt2lab.fileio import atomic_dir, sha256_file, verify_folder, write_atomic, write_manifest
from gpt2lab.model import GPT2, GPT2Config

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(Gpt2labError, ValueError):
    """A checkpoint is unreadable, or a tensor in it is missing, unexpected or of the wrong shape."""


def expected_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Canonical key -> shape for ``cfg``, built on the meta device (no memory used)."""
    with torch.device("meta"):
        model = GPT2(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}


def save_checkpoint(
    state: Mapping[str, torch.Tensor],
    cfg: GPT2Config,
    out_dir: str | Path,
    *,
    pretrained: bool,
    source: str,
    extra_files: tuple[Path, ...] = (),
) -> Path:
    """Write the canonical checkpoint folder atomically (see :func:`gpt2lab.fileio.atomic_dir`),
    its manifest last."""
    with atomic_dir(out_dir) as tmp:
        save_file(dict(state), str(tmp / MODEL_FILE), metadata={"format": "pt"})  # one key: Rust hash order would vary
        meta = {"model": cfg.to_dict(), "pretrained": pretrained, "source": source,
                "sha256": sha256_file(tmp / MODEL_FILE)}  # fmt: skip
        write_atomic(tmp / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
        for f in extra_files:
            shutil.copy2(f, tmp / f.name)
        write_manifest(tmp)
    return Path(out_dir)


def read_config(path: str | Path) -> dict[str, Any]:
    """The canonical ``config.json`` of a checkpoint folder (not verified: see :func:`verify_checkpoint`)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; convert the checkpoint first (gpt2lab convert)")
    try:
        meta = json.loads(file.read_text())
        GPT2Config.from_dict(meta["model"])
        if not isinstance(meta["sha256"], str):
            raise TypeError("sha256 is not a string")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{file}: not a gpt2lab checkpoint config ({type(err).__name__}: {err})") from err
    return meta


def verify_checkpoint(path: str | Path) -> str:
    """Check every file of the checkpoint folder against its manifest; the sha256 of its weights.

    Raises :class:`gpt2lab.fileio.IntegrityError` (one line, naming the file and both hashes) on
    any difference, and :class:`CheckpointError` when ``config.json`` records other weights.
    """
    if not (Path(path) / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; convert the checkpoint first (gpt2lab convert)")
    verified = verify_folder(path)  # before config.json is even read
    meta = read_config(path)
    actual = verified.get(MODEL_FILE)
    if actual is None or meta["sha256"] != actual:
        raise CheckpointError(
            f"{path}/{CONFIG_FILE} records weights sha256 {meta['sha256']}, but {MODEL_FILE} has sha256 {actual}; "
            "the folder mixes two checkpoints: convert or fetch it again"
        )
    return actual


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> GPT2:
    """Load a canonical checkpoint folder, its bytes verified first; returns the model in eval mode."""
    verify_checkpoint(path)
    meta = read_config(path)
    cfg = GPT2Config.from_dict(meta["model"])
    if not meta.get("pretrained", False):
        log.info("%s holds RANDOM weights (pretrained: false), not a pretrained GPT-2", path)
    try:
        state = load_file(str(Path(path) / MODEL_FILE), device=str(device))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}/{MODEL_FILE}: unreadable ({err})") from err
    shapes = expected_shapes(cfg)
    for key, shape in shapes.items():
        if key not in state:
            raise CheckpointError(f"{path}: missing tensor {key!r}")
        if tuple(state[key].shape) != shape:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(state[key].shape)}, expected {shape}")
    unexpected = sorted(set(state) - set(shapes))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r}")
    with torch.device("meta"):
        model = GPT2(cfg)
    model.load_state_dict(state, strict=False, assign=True)
    model.lm_head.weight = model.wte.weight  # re-tie after assign
    return model.to(device=device, dtype=dtype).eval()


def is_pretrained(path: str | Path) -> bool:
    return bool(read_config(path).get("pretrained", False))


def random_checkpoint(cfg: GPT2Config, seed: int, out_dir: str | Path) -> Path:
    """A seeded random init of ``cfg``, marked ``pretrained: false``."""
    generator = torch.Generator().manual_seed(seed)
    model = GPT2(cfg)
    model.reset_parameters(generator)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return save_checkpoint(state, cfg, out_dir, pretrained=False, source=f"random:seed={seed}")
