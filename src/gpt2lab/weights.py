"""Fetch GPT-2 weights and convert them to one canonical, PyTorch-native safetensors layout.

Canonical checkpoint directory::

    model.safetensors   our GPT2 state dict (fp32, ``lm_head`` omitted: it is tied to ``wte``)
    config.json         {"model": GPT2Config, "pretrained": bool, "source": str, "sha256": str}
    encoder.json, vocab.bpe (or tokenizer.json, ...)   when the source ships them

Sources: OpenAI's original TensorFlow checkpoint (TensorFlow is imported only in
:func:`read_openai_checkpoint`), a Hugging Face safetensors file, a local checkpoint in either
format, or a seeded random init. Conversion is table-driven and raises on any unmapped,
missing or wrong-shape tensor, naming it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2lab.config import ModelParams, WeightsParams
from gpt2lab.download import DownloadError, atomic_dir, cache_dir, fetch_cached, sha256_file, write_atomic
from gpt2lab.errors import Gpt2labError
from gpt2lab.model import GPT2, PRESETS, GPT2Config

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# Model name -> OpenAI's folder name and the Hugging Face repository.
OPENAI_SIZES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}
OPENAI_MIRRORS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/models/{size}/{file}",
    "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2/{size}/{file}",
)
OPENAI_FILES = (
    "checkpoint",
    "hparams.json",
    "model.ckpt.index",
    "model.ckpt.meta",
    "model.ckpt.data-00000-of-00001",
    "encoder.json",
    "vocab.bpe",
)
HF_REPOS = {name: f"openai-community/{name}" for name in OPENAI_SIZES}
HF_URL = "https://huggingface.co/{repo}/resolve/main/{file}"
HF_FILES = ("config.json", "model.safetensors")
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")
OPENAI_TOKENIZER_FILES = ("encoder.json", "vocab.bpe")

# Source key template -> canonical key; "{}" is the layer index.
HF_TABLE = {
    "wte.weight": "wte.weight",
    "wpe.weight": "wpe.weight",
    "h.{}.ln_1.weight": "h.{}.ln_1.weight",
    "h.{}.ln_1.bias": "h.{}.ln_1.bias",
    "h.{}.attn.c_attn.weight": "h.{}.attn.c_attn.weight",
    "h.{}.attn.c_attn.bias": "h.{}.attn.c_attn.bias",
    "h.{}.attn.c_proj.weight": "h.{}.attn.c_proj.weight",
    "h.{}.attn.c_proj.bias": "h.{}.attn.c_proj.bias",
    "h.{}.ln_2.weight": "h.{}.ln_2.weight",
    "h.{}.ln_2.bias": "h.{}.ln_2.bias",
    "h.{}.mlp.c_fc.weight": "h.{}.mlp.c_fc.weight",
    "h.{}.mlp.c_fc.bias": "h.{}.mlp.c_fc.bias",
    "h.{}.mlp.c_proj.weight": "h.{}.mlp.c_proj.weight",
    "h.{}.mlp.c_proj.bias": "h.{}.mlp.c_proj.bias",
    "ln_f.weight": "ln_f.weight",
    "ln_f.bias": "ln_f.bias",
}
# Old attention-mask buffers some HF files still carry; they hold no weights.
HF_IGNORED = ("h.{}.attn.bias", "h.{}.attn.masked_bias")

OPENAI_TABLE = {
    "model/wte": "wte.weight",
    "model/wpe": "wpe.weight",
    "model/h{}/ln_1/g": "h.{}.ln_1.weight",
    "model/h{}/ln_1/b": "h.{}.ln_1.bias",
    "model/h{}/attn/c_attn/w": "h.{}.attn.c_attn.weight",
    "model/h{}/attn/c_attn/b": "h.{}.attn.c_attn.bias",
    "model/h{}/attn/c_proj/w": "h.{}.attn.c_proj.weight",
    "model/h{}/attn/c_proj/b": "h.{}.attn.c_proj.bias",
    "model/h{}/ln_2/g": "h.{}.ln_2.weight",
    "model/h{}/ln_2/b": "h.{}.ln_2.bias",
    "model/h{}/mlp/c_fc/w": "h.{}.mlp.c_fc.weight",
    "model/h{}/mlp/c_fc/b": "h.{}.mlp.c_fc.bias",
    "model/h{}/mlp/c_proj/w": "h.{}.mlp.c_proj.weight",
    "model/h{}/mlp/c_proj/b": "h.{}.mlp.c_proj.bias",
    "model/ln_f/g": "ln_f.weight",
    "model/ln_f/b": "ln_f.bias",
}

# Both sources store projections as (in, out) (HF's Conv1D, TF's 1x1 conv); we use (out, in).
TRANSPOSED = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")


class CheckpointError(Gpt2labError, ValueError):
    """A checkpoint is unreadable, or a tensor in it is missing, unexpected or of the wrong shape."""


class WeightsUnavailableError(Gpt2labError, RuntimeError):
    """Pretrained weights could not be downloaded from any source."""


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


def expected_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Canonical key -> shape for ``cfg``, built on the meta device (no memory used)."""
    with torch.device("meta"):
        model = GPT2(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}


def convert(
    state: Mapping[str, torch.Tensor],
    table: Mapping[str, str],
    cfg: GPT2Config,
    *,
    ignored: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """Rename ``state`` through ``table`` into canonical fp32 tensors for ``cfg``.

    Keys matching ``ignored`` templates are dropped. Raises :class:`CheckpointError` naming
    the first unexpected key, missing key or tensor whose shape does not fit ``cfg``.
    """
    patterns = [(_template_regex(src), dst) for src, dst in table.items()]
    ignore = [_template_regex(t) for t in ignored]
    shapes = expected_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if any(p.match(key) for p in ignore):
            continue
        for pattern, dst in patterns:
            m = pattern.match(key)
            if m:
                name = dst.format(*m.groups())
                break
        else:
            raise CheckpointError(f"unexpected tensor {key!r} {tuple(tensor.shape)}: not part of GPT-2")
        if name not in shapes:
            raise CheckpointError(f"unexpected tensor {key!r}: layer index beyond n_layer={cfg.n_layer}")
        tensor = tensor.detach().to(torch.float32)
        if TRANSPOSED.fullmatch(name):
            tensor = tensor.reshape(tensor.shape[-2:]).t() if tensor.dim() >= 2 else tensor
        if tuple(tensor.shape) != shapes[name]:
            raise CheckpointError(
                f"tensor {key!r} has shape {tuple(tensor.shape)}; expected {shapes[name]} for {name} "
                f"(n_embd={cfg.n_embd}, n_layer={cfg.n_layer}, vocab_size={cfg.vocab_size}, n_ctx={cfg.n_ctx})"
            )
        out[name] = tensor.contiguous()
    missing = [k for k in shapes if k not in out]
    if missing:
        raise CheckpointError(f"missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    return out


# --- reading source checkpoints ----------------------------------------------------------
def _config_from_tensors(state: Mapping[str, torch.Tensor], n_head: int | None) -> GPT2Config:
    """Infer the size from the tensors; n_head comes from metadata or the matching preset."""
    vocab_size, n_embd = state["wte.weight"].shape
    n_ctx = state["wpe.weight"].shape[0]
    n_layer = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"h\.(\d+)\.", k))), default=-1)
    if n_head is None:
        match = [p for p in PRESETS.values() if (p.n_embd, p.n_layer) == (n_embd, n_layer)]
        if not match:
            raise CheckpointError(
                f"cannot tell n_head for n_embd={n_embd}, n_layer={n_layer}: put a config.json "
                "(Hugging Face) or hparams.json (OpenAI) with n_head beside the checkpoint"
            )
        n_head = match[0].n_head
    return GPT2Config(vocab_size=vocab_size, n_ctx=n_ctx, n_embd=n_embd, n_layer=n_layer, n_head=n_head)


def read_hf_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], GPT2Config]:
    """Read a Hugging Face GPT-2 ``.safetensors`` file (or a folder holding ``model.safetensors``)."""
    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    try:
        raw = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err
    state = {k.removeprefix("transformer."): v for k, v in raw.items()}
    lm_head = state.pop("lm_head.weight", None)
    if "wte.weight" not in state or "wpe.weight" not in state:
        missing = "wte.weight" if "wte.weight" not in state else "wpe.weight"
        raise CheckpointError(f"{file}: missing tensor {missing!r}; is this a GPT-2 checkpoint?")
    if lm_head is not None and not torch.equal(lm_head, state["wte.weight"]):
        raise CheckpointError(f"{file}: lm_head.weight differs from wte.weight; GPT-2 ties them")
    hf_cfg_file = file.parent / "config.json"
    n_head, eps = None, 1e-5
    if hf_cfg_file.is_file():
        hf_cfg = json.loads(hf_cfg_file.read_text())
        if "model" in hf_cfg and "n_head" in hf_cfg["model"]:  # a canonical gpt2lab config
            hf_cfg = hf_cfg["model"]
        n_head = hf_cfg.get("n_head")
        eps = hf_cfg.get("layer_norm_epsilon", eps)
        act = hf_cfg.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"{hf_cfg_file}: activation_function {act!r} is not GPT-2's gelu_new")
    cfg = _config_from_tensors(state, n_head)
    cfg = GPT2Config(**{**cfg.to_dict(), "layer_norm_epsilon": eps})
    return convert(state, HF_TABLE, cfg, ignored=HF_IGNORED), cfg


def read_openai_checkpoint(folder: str | Path) -> tuple[dict[str, torch.Tensor], GPT2Config]:
    """Read OpenAI's TensorFlow checkpoint folder (``hparams.json`` + ``model.ckpt.*``).

    This is the only place that imports TensorFlow.
    """
    folder = Path(folder)
    hparams_file = folder / "hparams.json"
    if not hparams_file.is_file():
        raise CheckpointError(f"{folder}: no hparams.json; not an OpenAI GPT-2 checkpoint folder")
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ INFO lines off stderr
        import tensorflow as tf  # noqa: PLC0415 - optional, heavy dependency
    except ImportError as err:
        raise CheckpointError(
            "reading OpenAI's TensorFlow checkpoint needs TensorFlow: pip install 'gpt2lab[tf]' "
            "(or use weights.source: hf)"
        ) from err
    try:
        hparams = json.loads(hparams_file.read_text())
        cfg = GPT2Config(
            vocab_size=hparams["n_vocab"], n_ctx=hparams["n_ctx"], n_embd=hparams["n_embd"],
            n_layer=hparams["n_layer"], n_head=hparams["n_head"],
        )  # fmt: skip
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{hparams_file}: unusable ({type(err).__name__}: {err}); expected JSON with "
            "n_vocab, n_ctx, n_embd, n_head and n_layer"
        ) from err
    ckpt = tf.train.latest_checkpoint(str(folder)) or str(folder / "model.ckpt")
    try:
        names = [name for name, _shape in tf.train.list_variables(ckpt)]
        state = {name: torch.from_numpy(tf.train.load_variable(ckpt, name).copy()) for name in names}
    except (tf.errors.OpError, ValueError) as err:
        raise CheckpointError(f"{folder}: unreadable TensorFlow checkpoint ({type(err).__name__}: {err})") from err
    return convert(state, OPENAI_TABLE, cfg), cfg


def detect_format(path: str | Path) -> str:
    """``"openai"`` for a TF checkpoint folder, ``"hf"`` for safetensors; else CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir() and (path / "hparams.json").is_file():
        return "openai"
    if path.suffix == ".safetensors" or (path.is_dir() and (path / MODEL_FILE).is_file()):
        return "hf"
    raise CheckpointError(
        f"{path}: not a GPT-2 checkpoint (expected an OpenAI folder with hparams.json and model.ckpt.*, "
        "or a Hugging Face .safetensors file or folder)"
    )


# --- writing and loading the canonical layout --------------------------------------------
def save_checkpoint(
    state: Mapping[str, torch.Tensor],
    cfg: GPT2Config,
    out_dir: str | Path,
    *,
    pretrained: bool,
    source: str,
    extra_files: tuple[Path, ...] = (),
) -> Path:
    """Write the canonical checkpoint folder atomically (see :func:`gpt2lab.download.atomic_dir`)."""
    with atomic_dir(out_dir) as tmp:
        save_file(dict(state), str(tmp / MODEL_FILE), metadata={"format": "pt"})  # one key: Rust hash order would vary
        meta = {"model": cfg.to_dict(), "pretrained": pretrained, "source": source,
                "sha256": sha256_file(tmp / MODEL_FILE)}  # fmt: skip
        write_atomic(tmp / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
        for f in extra_files:
            shutil.copy2(f, tmp / f.name)
    return Path(out_dir)


def convert_checkpoint(src: str | Path, out_dir: str | Path) -> Path:
    """Convert an OpenAI or Hugging Face checkpoint (auto-detected) into ``out_dir``."""
    src = Path(src)
    fmt = detect_format(src)
    state, cfg = read_openai_checkpoint(src) if fmt == "openai" else read_hf_checkpoint(src)
    folder = src if src.is_dir() else src.parent
    tok_names = OPENAI_TOKENIZER_FILES if fmt == "openai" else HF_TOKENIZER_FILES
    extras = tuple(folder / n for n in tok_names if (folder / n).is_file())
    return save_checkpoint(state, cfg, out_dir, pretrained=True, source=f"{fmt}:{src}", extra_files=extras)


def read_config(path: str | Path) -> dict[str, Any]:
    """The canonical ``config.json`` of a checkpoint folder."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; convert the checkpoint first (gpt2lab convert)")
    return json.loads(file.read_text())


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> GPT2:
    """Load a canonical checkpoint folder; returns the model in eval mode."""
    meta = read_config(path)
    cfg = GPT2Config.from_dict(meta["model"])
    if not meta.get("pretrained", False):
        log.warning("%s holds RANDOM weights (pretrained: false), not a pretrained GPT-2", path)
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


# --- the fetch_weights stage -------------------------------------------------------------
def random_checkpoint(cfg: GPT2Config, seed: int, out_dir: str | Path) -> Path:
    """A seeded random init of ``cfg``, marked ``pretrained: false``."""
    generator = torch.Generator().manual_seed(seed)
    model = GPT2(cfg)
    model.reset_parameters(generator)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return save_checkpoint(state, cfg, out_dir, pretrained=False, source=f"random:seed={seed}")


def _download_all(urls: dict[str, list[str]], folder: Path, params: WeightsParams) -> None:
    for name, sources in urls.items():
        try:  # a file already in the cache is kept; another process fetching it is waited for
            fetch_cached(sources, folder / name, timeout_s=params.timeout_s, retries=params.retries)
        except DownloadError as err:
            raise WeightsUnavailableError(
                f"cannot download {name} (no internet?); tried {', '.join(sources)}"
            ) from err


def fetch_weights(model: ModelParams, weights: WeightsParams, seed: int, out_dir: str | Path) -> Path:
    """Produce the canonical checkpoint folder for the chosen model and source."""
    if weights.source == "random":
        return random_checkpoint(GPT2Config.from_params(model), seed, out_dir)
    if weights.source == "local":
        return convert_checkpoint(Path(weights.path).expanduser(), out_dir)
    if any(getattr(model, k) is not None for k in ("n_layer", "n_head", "n_embd", "n_ctx")):
        raise CheckpointError("model size overrides only apply to weights.source: random")
    if weights.source == "openai":
        size = OPENAI_SIZES[model.name]
        folder = cache_dir() / "openai" / size
        urls = {f: [m.format(size=size, file=f) for m in OPENAI_MIRRORS] for f in OPENAI_FILES}
    else:
        folder = cache_dir() / "hf" / model.name
        urls = {f: [HF_URL.format(repo=HF_REPOS[model.name], file=f)] for f in HF_FILES}
    _download_all(urls, folder, weights)
    return convert_checkpoint(folder, out_dir)
