"""Conversion between foreign GPT-2 checkpoints and the canonical layout, table-driven.

Each source format is a mapping table ``{source key template: canonical key}`` (``{}`` is the
layer index) plus the set of keys stored transposed. :func:`convert` applies a table and
raises on any unmapped, missing or wrong-shape tensor, naming it. Sources: OpenAI's original
TensorFlow checkpoint (TensorFlow is imported only in :func:`read_openai_checkpoint`) and
Hugging Face safetensors files. The other direction, to ``transformers``' names and layouts
(:func:`to_hf`), runs the same table inverted; PEFT's LoRA names are one more table.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gpt2lab.checkpoint import MODEL_FILE, CheckpointError, expected_shapes, save_checkpoint
from gpt2lab.model import PRESETS, GPT2Config

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

# transformers' GPT-2 models hold the body under this prefix (GPT2LMHeadModel, GPT2ForSequenceClassification).
HF_PREFIX = "transformer."
# The projections LoRA can adapt: the linear layers of a block (lm_head is tied to wte).
PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# PEFT's LoRA matrices (under HF_PREFIX) -> canonical. PEFT keeps nn.Linear layouts, A (r, in) and
# B (out, r), even on GPT-2's Conv1D layers, as gpt2lab's LoRALinear does: renamed, never transposed.
PEFT_LORA_TABLE = {
    f"h.{{}}.{proj}.lora_{ab}.weight": f"h.{{}}.{proj}.lora_{ab.lower()}" for proj in PROJECTIONS for ab in "AB"
}


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


def rename_key(key: str, table: Mapping[str, str], *, inverse: bool = False) -> str:
    """``key`` through ``table`` (source -> canonical, or canonical -> source when ``inverse``).

    Raises :class:`CheckpointError` naming the key when the table has no template for it.
    """
    for src, dst in table.items():
        pattern, target = (dst, src) if inverse else (src, dst)
        m = _template_regex(pattern).match(key)
        if m:
            return target.format(*m.groups())
    raise CheckpointError(f"tensor {key!r} has no counterpart in the target format")


def to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical tensors (a whole body or any part) -> ``transformers``' GPT-2 names and layouts.

    :data:`HF_TABLE` inverted, under :data:`HF_PREFIX`; projections go back to Conv1D's (in, out).
    """
    return {HF_PREFIX + rename_key(key, HF_TABLE, inverse=True): _layout(key, t) for key, t in state.items()}


def from_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_hf`, for any part of a body (keys with or without :data:`HF_PREFIX`)."""
    named = {rename_key(k.removeprefix(HF_PREFIX), HF_TABLE): t for k, t in state.items()}
    return {key: _layout(key, t) for key, t in named.items()}


def _layout(canonical_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """fp32 and contiguous; a projection weight transposed ((out, in) <-> (in, out))."""
    tensor = tensor.detach().to(torch.float32)
    return (tensor.t() if TRANSPOSED.fullmatch(canonical_key) else tensor).contiguous()


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
    state = {k.removeprefix(HF_PREFIX): v for k, v in raw.items()}
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


def check_size(cfg: GPT2Config, expected: GPT2Config, what: str) -> None:
    """Raise :class:`CheckpointError` when ``cfg``'s sizes are not ``expected``'s, naming each difference."""
    keys = ("n_layer", "n_embd", "n_head", "n_ctx", "vocab_size")
    diff = [f"{k} {getattr(cfg, k)} (expected {getattr(expected, k)})"
            for k in keys if getattr(cfg, k) != getattr(expected, k)]  # fmt: skip
    if diff:
        raise CheckpointError(f"{what} has {', '.join(diff)}: it is not the model asked for")


def convert_checkpoint(src: str | Path, out_dir: str | Path, *, expected: GPT2Config | None = None) -> Path:
    """Convert an OpenAI or Hugging Face checkpoint (auto-detected) into ``out_dir``.

    With ``expected``, a checkpoint of other sizes is refused before anything is written.
    """
    src = Path(src)
    fmt = detect_format(src)
    state, cfg = read_openai_checkpoint(src) if fmt == "openai" else read_hf_checkpoint(src)
    if expected is not None:
        check_size(cfg, expected, str(src))
    folder = src if src.is_dir() else src.parent
    tok_names = OPENAI_TOKENIZER_FILES if fmt == "openai" else HF_TOKENIZER_FILES
    extras = tuple(folder / n for n in tok_names if (folder / n).is_file())
    return save_checkpoint(state, cfg, out_dir, pretrained=True, source=f"{fmt}:{src}", extra_files=extras)
