"""Precision: the dtypes behind ``fp32``/``bf16``/``int8`` and the autocast context for each."""

from __future__ import annotations

import torch

# The dtype a model is loaded in. int8 loads fp32 and then quantizes the linear weights
# (gpt2lab.quantize); activations, norms, embeddings and the KV cache stay fp32.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}


def autocast(precision: str) -> torch.autocast:
    """bf16 autocast on CPU for ``precision == "bf16"``; a no-op context for ``fp32`` and ``int8``."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
