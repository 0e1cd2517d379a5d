"""Precision: the dtypes behind ``fp32``/``bf16`` and the autocast context for each."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def autocast(precision: str) -> torch.autocast:
    """bf16 autocast on CPU for ``precision == "bf16"``; a no-op context for ``fp32``."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
