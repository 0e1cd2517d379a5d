"""Precision names, their dtypes and autocast."""

from __future__ import annotations

import torch

from gpt2lab.devices import DTYPES, autocast
from gpt2lab.params import PRECISIONS


def test_every_precision_params_allow_has_a_dtype():
    assert set(DTYPES) == set(PRECISIONS)
    assert DTYPES["bf16"] is torch.bfloat16 and DTYPES["fp32"] is torch.float32


def test_autocast_runs_linear_layers_in_bf16_only_for_bf16():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with autocast("bf16"):
        assert layer(x).dtype == torch.bfloat16
    with autocast("fp32"):
        assert layer(x).dtype == torch.float32
