"""GPT-2 in one readable file, with GPT-2's own module names and a preallocated KV cache.

Module names follow OpenAI's checkpoint (``wte, wpe, h.{i}.ln_1, attn.c_attn, attn.c_proj,
ln_2, mlp.c_fc, mlp.c_proj, ln_f``) so loading a checkpoint is a mapping table, not code.
Linear weights use PyTorch's ``(out, in)`` layout; ``lm_head`` shares its weight with ``wte``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lab.presets import PRESETS, GPT2Config

__all__ = ["GPT2", "GPT2Config", "PRESETS", "KVCache"]


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer, kept out of the state dict.

    Keys and values share one buffer (2, batch_size, n_head, max_len, head_dim), so that a step
    writes and reads them with one indexing op each: in a 124M decoding step the ops between the
    matmuls take ~3 of ~21 ms (fp32), each running with caches the weight stream has flushed.
    """

    def __init__(self, batch_size: int, n_head: int, max_len: int, head_dim: int, dtype: torch.dtype, device: Any):
        super().__init__()
        shape = (2, batch_size, n_head, max_len, head_dim)
        self.register_buffer("kv", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int | torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Write ``kv`` (2, B, n_head, T, head_dim) at ``start``; return keys and values up to ``start + T``.

        ``start`` as a (T,) tensor of columns instead: write there and return the whole cache (the
        caller masks the columns not in use), so that every step has the same shapes.
        """
        if isinstance(start, torch.Tensor):
            cache = self.kv[:, : kv.shape[1]]
            return cache.index_copy_(3, start, kv)  # (2, B, n_head, max_len, head_dim)
        B, end = kv.shape[1], start + kv.shape[3]
        self.kv[:, :B, :, start:end] = kv
        return self.kv[:, :B, :, :end]  # (2, B, n_head, start + T, head_dim)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        start: int | torch.Tensor | None,
        mask: torch.Tensor | None,
        at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C). ``start`` is the cache offset (None = no cache; a tensor: see
        :meth:`KVCache.update`, ``mask`` then covering the whole cache); ``mask`` (B, 1, T, S)
        bool or None. ``at`` (B,): only the query at that position of each row, -> (B, 1, C) (no cache)."""
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, n_head, T, head_dim)
        q, kv = qkv[0], qkv[1:]
        if at is not None:
            rows = torch.arange(B, device=x.device)
            q = q[rows, :, at, None]  # (B, n_head, 1, head_dim)
            # Key j is seen by the query at position at[b] when j <= at[b] (and the mask allows it).
            visible = torch.arange(T, device=x.device)[None, :] <= at[:, None]  # (B, T)
            mask = visible[:, None, None, :] if mask is None else mask[rows, :, at, None] & visible[:, None, None, :]
            T = 1
        if start is not None:
            if self.kv_cache is None:
                raise RuntimeError("KV cache not set up: call model.setup_cache(batch_size, max_len) first")
            kv = self.kv_cache.update(start, kv)  # (2, B, n_head, start + T, head_dim)
        k, v = kv.unbind(0)
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:
            # Without a cache (or for a single new token) the plain causal mask is exact.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1 and start in (None, 0))
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
        # Dropout only when training: an eval-mode call is a no-op that still costs a module call.
        return self.resid_dropout(y) if self.training else y


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))
        return self.dropout(y) if self.training else y


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        start: int | torch.Tensor | None,
        mask: torch.Tensor | None,
        at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C), or (B, 1, C) at the positions ``at`` (B,) alone (see ``GPT2.hidden_states``)."""
        attended = self.attn(self.ln_1(x), start, mask, at)
        if at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), at, None]  # (B, 1, C)
        x = x + attended
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
        at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-layer-norm hidden states (B, T, n_embd), or (B, n_embd) at the positions ``at``.

        Args:
            idx: token ids (B, T).
            pos: position ids (B, T) or (T,) for ``wpe``; default ``start + arange(T)``.
            start: offset into the KV cache; None runs without a cache.
            key_mask: (B, S) bool, False for keys to ignore (padding), S = ``start + T``
                with a cache, else T. Combined with the causal mask.
            at: (B,) one position per row (no cache): only those rows' states are returned, and the
                last block computes its attention output, MLP and ``ln_f`` for them alone (the
                other positions' would be discarded). A classifier reading one token per message
                so saves ~6% of GPT-2 124M's forward and backward passes.
        """
        if at is not None and start is not None:
            raise ValueError("hidden_states(at=...) runs without a KV cache (start=None)")
        B, T = idx.shape
        offset = start or 0
        if offset + T > self.config.n_ctx:
            raise ValueError(
                f"sequence of {offset + T} tokens exceeds the context length {self.config.n_ctx}; truncate the input"
            )
        if pos is None:
            pos = torch.arange(offset, offset + T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        if self.training:
            x = self.drop(x)
        mask = None
        if key_mask is not None or (start is not None and start > 0 and T > 1):
            S = offset + T
            q_pos = torch.arange(offset, S, device=idx.device)
            mask = (torch.arange(S, device=idx.device)[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, S)
            if key_mask is not None:
                mask = mask & key_mask[:, None, None, :].bool()  # (B, 1, T, S)
                # A fully masked row (a padding query) would give NaN; let it see itself instead.
                mask = mask | (torch.arange(S, device=idx.device)[None, :] == q_pos[:, None])[None, None]
        *blocks, last = self.h
        for block in blocks:
            x = block(x, start, mask)
        x = self.ln_f(last(x, start, mask, at))  # (B, T, C), or (B, 1, C) at ``at``
        return x if at is None else x[:, 0]

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
        return self.lm_head(x)

    def decode_step(
        self, idx: torch.Tensor, pos: torch.Tensor, column: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits (B, 1, vocab_size) of one cached decoding step whose shapes never change (for
        ``torch.compile``, see :func:`gpt2lab.kernels.compiled_decode_step`).

        The tokens ``idx`` (B, 1) at position ids ``pos`` (B, 1) are written to the cache column
        ``column`` (a (1,) tensor: another column is other data, not another graph) and attend to
        the whole preallocated cache through ``key_mask`` (B, cache_len), True for the columns in
        use, ``column`` included. Equal to ``self(idx, pos=pos, start=column.item(),
        key_mask=key_mask[:, :column + 1], last_only=True)`` up to float rounding.
        """
        x = self.wte(idx) + self.wpe(pos)  # (B, 1, C)
        mask = key_mask[:, None, None, :]  # (B, 1, 1, cache_len)
        for block in self.h:
            x = block(x, column, mask)
        return self.lm_head(self.ln_f(x))

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Unique parameters (the tied ``lm_head`` counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
