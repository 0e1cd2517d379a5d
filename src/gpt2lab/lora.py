"""Low-rank adapters (LoRA) that keep the base model's parameter names.

:class:`LoRALinear` replaces an ``nn.Linear`` in place: it holds the frozen ``weight`` and
``bias`` under ``nn.Linear``'s names (so a base checkpoint loads into it unchanged) plus
``lora_a`` (rank, in) and ``lora_b`` (out, rank). The output is::

    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T

``A`` starts Kaiming-uniform and ``B`` at zero, so a fresh adapter is exactly the base model.
:func:`apply_lora` picks the modules to adapt by name patterns (``params.yaml``'s
``lora.targets``); adapters are saved alone with the hash of the base they belong to.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2lab.errors import Gpt2labError
from gpt2lab.fileio import write_atomic

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_META = "adapter.json"
LORA_PARAM_NAMES = ("lora_a", "lora_b")


class LoRAError(Gpt2labError, ValueError):
    """LoRA targets match nothing, or an adapter does not fit (or belong to) the base model."""


class LoRALinear(nn.Module):
    """``nn.Linear`` plus a low-rank update; ``weight`` (out, in) and ``bias`` (out,) keep their names.

    Args:
        in_features, out_features: as for ``nn.Linear``.
        rank: inner dimension r of the update ``B @ A`` (out, r) @ (r, in).
        alpha: the update is scaled by ``alpha / rank``.
        dropout: dropout on the LoRA branch's input only; the base path is untouched.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if rank <= 0:
            raise LoRAError(f"LoRA rank must be > 0, got {rank}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_b = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
        """Wrap ``linear``, sharing (not copying) its weight and bias."""
        w = linear.weight
        lora = cls(
            linear.in_features, linear.out_features, rank, alpha, dropout,
            bias=linear.bias is not None, device="meta", dtype=w.dtype,
        )  # fmt: skip
        lora.weight = w
        lora.bias = linear.bias
        lora.lora_a = nn.Parameter(torch.empty(rank, linear.in_features, device=w.device, dtype=w.dtype))
        lora.lora_b = nn.Parameter(torch.empty(linear.out_features, rank, device=w.device, dtype=w.dtype))
        lora.reset_lora_parameters()
        return lora

    def reset_lora_parameters(self) -> None:
        """A: Kaiming-uniform (as ``nn.Linear`` initialises its weight); B: zeros, so the update starts at 0."""
        if self.lora_a.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def delta_weight(self) -> torch.Tensor:
        """The update ``(alpha / rank) * B @ A``, (out, in), in the weight's dtype."""
        delta = (self.lora_b.float() @ self.lora_a.float()) * self.scaling
        return delta.to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        if torch.is_autocast_enabled("cpu"):
            # Cast the input once for both paths (autocast would cast it once per matmul).
            x = x.to(torch.get_autocast_dtype("cpu"))
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        # Two thin matmuls (in -> r -> out) instead of forming B @ A, so the cost stays O(r);
        # the second one adds into y with the scaling folded in (no separate multiply and add).
        h = F.linear(self.lora_dropout(x), self.lora_a)  # (..., r)
        y2, h2 = y.reshape(-1, self.out_features), h.reshape(-1, self.rank)  # (N, out), (N, r)
        return torch.addmm(y2, h2, self.lora_b.t(), alpha=self.scaling).view(y.shape)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight``; the branch is skipped until :meth:`unmerge`. Idempotent."""
        if self.merged:
            return
        self.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of ``weight``. Idempotent."""
        if not self.merged:
            return
        self.weight.sub_(self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"
        )


@dataclass(frozen=True)
class LoRAConfig:
    """What an adapter needs to be rebuilt: rank, alpha, dropout and the target patterns."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

    @classmethod
    def from_params(cls, params: Any) -> LoRAConfig:
        """From :class:`gpt2lab.params.LoRAParams` (or anything with the same fields)."""
        return cls(int(params.rank), float(params.alpha), float(params.dropout), tuple(params.targets))


def matches(name: str, pattern: str) -> bool:
    """A module name matches a pattern equal to it, ending in ``.pattern``, or as a glob (``h.11.*``)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*.{pattern}")


def apply_lora(model: nn.Module, config: LoRAConfig | Any) -> list[str]:
    """Replace every ``nn.Linear`` in ``model`` whose name matches a target pattern by a :class:`LoRALinear`.

    ``config`` is a :class:`LoRAConfig` or ``LoRAParams``. Returns the adapted module names.
    Raises :class:`LoRAError` if a pattern matches no linear layer (a typo would otherwise
    silently train nothing) or if the model already has adapters.
    """
    cfg = config if isinstance(config, LoRAConfig) else LoRAConfig.from_params(config)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise LoRAError("the model already has LoRA adapters; apply_lora once per model")
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    chosen: list[str] = []
    for pattern in cfg.targets:
        hits = [name for name in linears if matches(name, pattern)]
        if not hits:
            examples = ", ".join(sorted({n.split(".", 2)[-1] for n in linears})[:8])
            raise LoRAError(
                f"lora.targets: pattern {pattern!r} matches no linear layer; "
                f"use a name suffix such as {examples} (or a glob such as 'h.11.*')"
            )
        chosen.extend(n for n in hits if n not in chosen)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear.from_linear(linears[name], cfg.rank, cfg.alpha, cfg.dropout))
    log.info("LoRA rank %d on %d linear layers (%s)", cfg.rank, len(chosen), ", ".join(cfg.targets))
    return chosen


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def is_lora_param(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in LORA_PARAM_NAMES


def mark_trainable(model: nn.Module, *, lora: bool = True, prefixes: Iterable[str] = ()) -> int:
    """Freeze everything except LoRA matrices (when ``lora``) and parameters under ``prefixes``.

    A prefix ``""`` unfreezes everything. Returns the number of trainable parameters.
    """
    prefixes = tuple(prefixes)
    for name, p in model.named_parameters():
        under = any(name == pre or name.startswith(f"{pre}.") or pre == "" for pre in prefixes)
        p.requires_grad_((lora and is_lora_param(name)) or under)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge(model: nn.Module) -> None:
    """Merge every adapter of ``model`` into its base weight (idempotent)."""
    for _, module in lora_modules(model):
        module.merge()


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter back out of its base weight (idempotent)."""
    for _, module in lora_modules(model):
        module.unmerge()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, ``{"h.0.attn.c_attn.lora_a": (rank, in), ...}``."""
    return {k: v for k, v in model.state_dict().items() if is_lora_param(k)}


# --- saving and loading adapters alone ----------------------------------------------------
def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    config: LoRAConfig,
    *,
    base_sha256: str,
    extra: dict[str, Any] | None = None,
    prefix: str = "",
) -> Path:
    """Write ``adapter.safetensors`` (LoRA tensors only) and ``adapter.json`` into ``out_dir``.

    ``prefix`` is stripped from tensor names (e.g. ``"body."``), so names are the base model's.
    ``adapter.json`` holds rank, alpha, dropout, targets, the adapted modules and ``base_sha256``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k.removeprefix(prefix): v.detach().float().contiguous() for k, v in lora_state_dict(model).items()}
    if not state:
        raise LoRAError("the model has no LoRA adapters to save; call apply_lora first")
    modules = sorted({k.rsplit(".", 1)[0] for k in state})
    meta = {
        "rank": config.rank,
        "alpha": config.alpha,
        "dropout": config.dropout,
        "targets": list(config.targets),
        "modules": modules,
        "base_sha256": base_sha256,
        **(extra or {}),
    }
    tmp = out_dir / f".{ADAPTER_FILE}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out_dir / ADAPTER_FILE)
    write_atomic(out_dir / ADAPTER_META, json.dumps(meta, indent=2) + "\n")
    return out_dir / ADAPTER_FILE


def read_adapter_meta(adapter_dir: str | Path) -> dict[str, Any]:
    file = Path(adapter_dir) / ADAPTER_META
    if not file.is_file():
        raise LoRAError(f"{adapter_dir}: no {ADAPTER_META}; not an adapter folder")
    try:
        meta = json.loads(file.read_text())
        LoRAConfig(int(meta["rank"]), float(meta["alpha"]), float(meta.get("dropout", 0.0)), tuple(meta["targets"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LoRAError(f"{file}: not a LoRA adapter description ({type(err).__name__}: {err})") from err
    return meta


def load_adapter(model: nn.Module, adapter_dir: str | Path, *, base_sha256: str | None) -> LoRAConfig:
    """Apply the adapter saved in ``adapter_dir`` to ``model`` (a base GPT-2) and load its tensors.

    Raises :class:`LoRAError` when the adapter was trained on a different base checkpoint
    (``base_sha256`` differs from the one recorded; pass None to skip the check) or when its
    tensors do not fit the model.
    """
    meta = read_adapter_meta(adapter_dir)
    if base_sha256 is not None and meta.get("base_sha256") != base_sha256:
        raise LoRAError(
            f"{adapter_dir}: this adapter was trained on base checkpoint sha256 {meta.get('base_sha256')}, "
            f"but the base model given has sha256 {base_sha256}; load it with the base it was trained on "
            "(or retrain the adapter on this base)"
        )
    cfg = LoRAConfig(int(meta["rank"]), float(meta["alpha"]), float(meta.get("dropout", 0.0)), tuple(meta["targets"]))
    apply_lora(model, cfg)
    try:
        state = load_file(str(Path(adapter_dir) / ADAPTER_FILE))
    except (SafetensorError, OSError) as err:
        raise LoRAError(f"{adapter_dir}/{ADAPTER_FILE}: unreadable ({err})") from err
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise LoRAError(f"{adapter_dir}/{ADAPTER_FILE}: does not fit the model ({what})")
    for key, tensor in state.items():
        if tensor.shape != own[key].shape:
            raise LoRAError(
                f"{adapter_dir}/{ADAPTER_FILE}: {key} has shape {tuple(tensor.shape)}, "
                f"the model needs {tuple(own[key].shape)}"
            )
    model.load_state_dict(state, strict=False)
    return cfg
