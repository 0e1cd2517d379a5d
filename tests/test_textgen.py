"""Generation as text: streamed pieces, the generate stage's seeded samples."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2lab.checkpoint import random_checkpoint
from gpt2lab.generate import generate
from gpt2lab.params import GenerateParams
from gpt2lab.textgen import generate_samples, stream_text
from gpt2lab.tokenizer import decode

ROOT = Path(__file__).resolve().parents[1]


# --- text, stage and CLI --------------------------------------------------------------------------
def test_stream_text_joins_to_the_decoded_tokens(tiny_model):
    from gpt2lab.tokenizer import encode

    pieces = list(stream_text(tiny_model, "Every effort moves you", 20, temperature=0))
    assert len(pieces) > 1
    assert "".join(pieces) == decode(generate(tiny_model, [encode("Every effort moves you")], 20)[0])


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_cfg) -> Path:
    return random_checkpoint(tiny_cfg, seed=0, out_dir=tmp_path / "models" / "base")


def test_generate_samples_is_seeded_and_complete(tiny_checkpoint, caplog):
    params = GenerateParams(prompts=("Every effort moves you", "Hello"), max_new_tokens=8, seed=5)
    with caplog.at_level(logging.WARNING):
        first = generate_samples(tiny_checkpoint, params)
    assert any("random weights" in r.getMessage() for r in caplog.records)
    assert first["pretrained"] is False and first["new_tokens"] == 16 and first["tokens_per_s"] > 0
    assert [s["prompt"] for s in first["samples"]] == list(params.prompts)
    assert all(s["new_tokens"] == 8 and s["finish_reason"] == "length" for s in first["samples"])
    again = generate_samples(tiny_checkpoint, GenerateParams(prompts=("Hello",), max_new_tokens=8, seed=5))
    assert again["samples"][0]["completion"] == first["samples"][1]["completion"]  # other prompts don't matter
    lookup = generate_samples(tiny_checkpoint, dataclasses.replace(params, prompt_lookup=4))
    assert [s["completion"] for s in lookup["samples"]] == [s["completion"] for s in first["samples"]]


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_stage_writes_metrics(tiny_checkpoint, tmp_path, precision):
    params = {"generate": {"prompts": ["Every effort moves you"], "max_new_tokens": 5, "precision": precision}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    run = subprocess.run([sys.executable, str(ROOT / "stages" / "generate.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    metrics = json.loads((tmp_path / "metrics" / "generate.json").read_text())
    assert metrics["precision"] == precision and metrics["samples"][0]["new_tokens"] == 5
