"""GPT-2 spam classifier: the GPT-2 body plus a 2-class head on the last real token.

Batches are right-padded (see :func:`gpt2lab.batching.collate`). With causal attention a token
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

Saving and loading live in :mod:`gpt2lab.classifier_io`, the inference API in
:mod:`gpt2lab.inference`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from gpt2lab.checkpoint import load_model
from gpt2lab.dataset import CLASS_NAMES
from gpt2lab.errors import Gpt2labError
from gpt2lab.lora import LoRAConfig, LoRALinear, apply_lora, mark_trainable
from gpt2lab.model import GPT2


class ClassifierError(Gpt2labError, ValueError):
    """A classifier folder is missing, incomplete, or does not belong to the base model given."""


class SpamClassifier(nn.Module):
    """``model(ids, lengths)`` -> logits (B, num_classes) read at each sequence's last real token.

    Attributes:
        body: the GPT-2 (possibly with LoRA adapters); only ``body.hidden_states`` is used.
        head: ``nn.Linear(n_embd, num_classes, bias=head_bias)``. No bias by default, as
            ``transformers``' ``GPT2ForSequenceClassification.score``, so a trained classifier
            exports to it exactly (see :mod:`gpt2lab.export`).
        max_length: messages are cut to this many tokens (the first ones are kept).
    """

    def __init__(
        self,
        body: GPT2,
        num_classes: int = len(CLASS_NAMES),
        max_length: int | None = None,
        *,
        head_bias: bool = False,
    ):
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.config.n_embd, num_classes, bias=head_bias)
        n_ctx = body.config.n_ctx
        self.max_length = n_ctx if max_length is None else min(max_length, n_ctx)

    def features(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Hidden state (B, n_embd) of the last real token of each right-padded row of ``ids`` (B, T)."""
        return self.body.hidden_states(ids, at=lengths.to(ids.device) - 1)  # (B, C)

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
    num_classes: int = len(CLASS_NAMES),
    head_bias: bool = False,
) -> SpamClassifier:
    """Load the base checkpoint, add a fresh head (seed the RNG first) and configure ``mode``."""
    model = SpamClassifier(load_model(base_dir), num_classes, max_length, head_bias=head_bias)
    configure(model, mode, lora)
    return model


def cast_frozen_linears(model: SpamClassifier, dtype: torch.dtype) -> int:
    """Store frozen linear weights of the transformer blocks in ``dtype`` (bf16 for autocast).

    Autocast casts fp32 weights to bf16 on every call and only caches the cast of trainable
    leaves; a frozen weight stored in bf16 gives the same result without that copy. Returns
    the number of tensors cast. Embeddings and layer norms stay fp32 (the residual stream
    stays fp32 under autocast), and ``lm_head`` is skipped because it is tied to ``wte``.
    """
    count = 0
    for module in model.body.h.modules():
        if isinstance(module, (nn.Linear, LoRALinear)):
            for name in ("weight", "bias"):
                p = getattr(module, name)
                if p is not None and not p.requires_grad and p.dtype != dtype:
                    p.data = p.data.to(dtype)
                    count += 1
    return count
