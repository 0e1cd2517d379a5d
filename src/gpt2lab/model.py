"""GPT-2 in one readable file, with GPT-2's own module names and a preallocated KV cache.

Module names follow OpenAI's checkpoint (``wte, wpe, h.{i}.ln_1, attn.c_attn, attn.c_proj,
ln_2, mlp.c_fc, mlp.c_proj, ln_f``) so loading a checkpoint is a mapping table, not code.
Linear weights use PyTorch's ``(out, in)`` layout; ``lm_head`` shares its weight with ``wte``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from gpt2lab.config import ModelParams


@dataclass(frozen=True)
class GPT2Config:
    """Architecture hyper-parameters (names as in OpenAI's ``hparams.json``)."""

    vocab_size: int = 50257
    n_ctx: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPT2Config:
        """One of ``gpt2`` (124M), ``gpt2-medium`` (355M), ``gpt2-large`` (774M), ``gpt2-xl`` (1558M)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model name {name!r}; allowed: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_params(cls, params: ModelParams) -> GPT2Config:
        """The preset ``params.name`` with any non-null size overrides and the dropout applied."""
        overrides = {
            key: getattr(params, key)
            for key in ("n_layer", "n_head", "n_embd", "n_ctx")
            if getattr(params, key) is not None
        }
        return cls.preset(params.name, dropout=params.dropout, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPT2Config:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
}


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for x (..., in); a single row on CPU at inference runs as ``addmv``.

    That is the decoding step (batch 1, one token), which only streams the weights: there
    ``linear`` reads bf16 weights ~1.5x slower than ``addmv`` does (fp32: a few % slower).
    Only a plain ``nn.Linear`` takes this path (a LoRA layer keeps its own forward);
    forward hooks on the layer do not run for it.
    """
    if (
        x.dtype in (torch.float32, torch.bfloat16)
        and x.numel() == x.shape[-1]
        and type(layer) is nn.Linear
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
    ):
        row = x.reshape(-1)  # (in,)
        y = torch.mv(layer.weight, row) if layer.bias is None else torch.addmv(layer.bias, layer.weight, row)
        return y.view(*x.shape[:-1], -1)  # (..., out)
    return layer(x)


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer, kept out of the state dict."""

    def __init__(self, batch_size: int, n_head: int, max_len: int, head_dim: int, dtype: torch.dtype, device: Any):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` (B, n_head, T, head_dim) at ``start``; return keys/values up to ``start + T``."""
        end = start + k.shape[2]
        self.k[: k.shape[0], :, start:end] = k
        self.v[: v.shape[0], :, start:end] = v
        return self.k[: k.shape[0], :, :end], self.v[: v.shape[0], :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, start: int | None, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, T, C). ``start`` is the cache offset (None = no cache); ``mask`` (B, 1, T, S) bool or None."""
        B, T, C = x.shape
        q, k, v = project(self.c_attn, x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if start is not None:
            if self.kv_cache is None:
                raise RuntimeError("KV cache not set up: call model.setup_cache(batch_size, max_len) first")
            k, v = self.kv_cache.update(start, k, v)  # (B, n_head, start + T, head_dim)
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:
            # Without a cache (or for a single new token) the plain causal mask is exact.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1 and start in (None, 0))
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(project(self.c_proj, y))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(project(self.c_proj, F.gelu(project(self.c_fc, x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, start: int | None, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), start, mask)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT-2 language model. ``model(idx)`` with idx (B, T) returns logits (B, T, vocab_size)."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self.cache_len = 0
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("ln_f"):
                nn.init.ones_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer), generator=generator)
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)

    # --- KV cache -----------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> None:
        """Preallocate a KV cache of ``(batch_size, n_head, max_len, head_dim)`` in every layer."""
        cfg = self.config
        max_len = cfg.n_ctx if max_len is None else max_len
        if max_len > cfg.n_ctx:
            raise ValueError(f"cache length {max_len} exceeds the context length {cfg.n_ctx}")
        dtype = dtype or self.wte.weight.dtype
        for block in self.h:
            block.attn.kv_cache = KVCache(batch_size, cfg.n_head, max_len, cfg.head_dim, dtype, self.wte.weight.device)
        self.cache_len = max_len

    def clear_cache(self) -> None:
        """Free the KV cache buffers."""
        for block in self.h:
            block.attn.kv_cache = None
        self.cache_len = 0

    # --- forward ------------------------------------------------------------------------
    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        pos: torch.Tensor | None = None,
        start: int | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-layer-norm hidden states (B, T, n_embd).

        Args:
            idx: token ids (B, T).
            pos: position ids (B, T) or (T,) for ``wpe``; default ``start + arange(T)``.
            start: offset into the KV cache; None runs without a cache.
            key_mask: (B, S) bool, False for keys to ignore (padding), S = ``start + T``
                with a cache, else T. Combined with the causal mask.
        """
        B, T = idx.shape
        offset = start or 0
        if offset + T > self.config.n_ctx:
            raise ValueError(
                f"sequence of {offset + T} tokens exceeds the context length {self.config.n_ctx}; truncate the input"
            )
        if pos is None:
            pos = torch.arange(offset, offset + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        mask = None
        if key_mask is not None or (start is not None and start > 0 and T > 1):
            S = offset + T
            q_pos = torch.arange(offset, S, device=idx.device)
            mask = (torch.arange(S, device=idx.device)[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, S)
            if key_mask is not None:
                mask = mask & key_mask[:, None, None, :].bool()  # (B, 1, T, S)
                # A fully masked row (a padding query) would give NaN; let it see itself instead.
                mask = mask | (torch.arange(S, device=idx.device)[None, :] == q_pos[:, None])[None, None]
        for block in self.h:
            x = block(x, start, mask)
        return self.ln_f(x)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        pos: torch.Tensor | None = None,
        start: int | None = None,
        key_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size), or (B, 1, vocab_size) with ``last_only`` (decoding)."""
        x = self.hidden_states(idx, pos=pos, start=start, key_mask=key_mask)
        if last_only:
            x = x[:, -1:, :]
        return project(self.lm_head, x)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Unique parameters (the tied ``lm_head`` counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
