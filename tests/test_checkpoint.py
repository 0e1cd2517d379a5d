"""The canonical checkpoint folder: written whole or not at all, loaded with every tensor checked."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt2lab.checkpoint import CheckpointError, load_model, random_checkpoint
from gpt2lab.presets import GPT2Config

TINY = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_ctx=64)


def test_load_model_names_a_mismatched_tensor(tmp_path):
    out = random_checkpoint(TINY, 0, tmp_path / "m")
    state = load_file(str(out / "model.safetensors"))
    state["h.1.attn.c_proj.weight"] = torch.zeros(32, 16)
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"h\.1\.attn\.c_proj\.weight"):
        load_model(out)


def test_random_weights_are_marked_and_seeded(tmp_path, caplog):
    a = random_checkpoint(TINY, 7, tmp_path / "a")
    b = random_checkpoint(TINY, 7, tmp_path / "b")
    assert json.loads((a / "config.json").read_text())["pretrained"] is False
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    with caplog.at_level("WARNING"):
        load_model(a)
    assert "RANDOM weights" in caplog.text
