"""The canonical checkpoint folder: written whole or not at all, loaded with every tensor checked."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt2lab import fileio
from gpt2lab.checkpoint import CheckpointError, load_model, random_checkpoint
from gpt2lab.fileio import MANIFEST_FILE, IntegrityError, sha256_file, write_manifest
from gpt2lab.presets import GPT2Config
from tests.helpers import CORRUPTIONS, corrupt

TINY = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_ctx=64)


def test_load_model_names_a_mismatched_tensor(tmp_path):
    out = random_checkpoint(TINY, 0, tmp_path / "m")
    state = load_file(str(out / "model.safetensors"))
    state["h.1.attn.c_proj.weight"] = torch.zeros(32, 16)
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(IntegrityError, match=r"model\.safetensors: corrupted or replaced: expected sha256 [0-9a-f]{64}"):
        load_model(out)
    # A folder whose manifest and config vouch for the wrong shape (made so on purpose) is refused by name.
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "sha256": sha256_file(out / "model.safetensors")}))
    write_manifest(out)
    with pytest.raises(CheckpointError, match=r"h\.1\.attn\.c_proj\.weight"):
        load_model(out)


def test_random_weights_are_marked_and_seeded(tmp_path, caplog):
    a = random_checkpoint(TINY, 7, tmp_path / "a")
    b = random_checkpoint(TINY, 7, tmp_path / "b")
    assert json.loads((a / "config.json").read_text())["pretrained"] is False
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    with caplog.at_level("INFO"):
        load_model(a)
    assert "RANDOM weights" in caplog.text


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_damaged_file_of_a_base_folder_is_refused_with_its_hash(tmp_path, name, kind):
    folder = random_checkpoint(TINY, 0, tmp_path / "a")
    other = random_checkpoint(TINY, 1, tmp_path / "b")  # another model's file of the same name
    expected = sha256_file(folder / name)
    corrupt(folder / name, kind, other / name)
    with pytest.raises(IntegrityError, match=rf"{name}: corrupted or replaced: expected sha256 {expected}, found"):
        load_model(folder)


def test_a_damaged_manifest_is_refused(tmp_path):
    folder = random_checkpoint(TINY, 0, tmp_path / "a")
    other = random_checkpoint(TINY, 1, tmp_path / "b")
    corrupt(folder / MANIFEST_FILE, "swap", other / MANIFEST_FILE)  # it vouches for the other model's bytes
    with pytest.raises(IntegrityError, match=r"(config\.json|model\.safetensors): corrupted or replaced"):
        load_model(folder)
    corrupt(folder / MANIFEST_FILE, "truncate", other / MANIFEST_FILE)
    with pytest.raises(IntegrityError, match="unreadable manifest"):
        load_model(folder)
    (folder / MANIFEST_FILE).unlink()
    with pytest.raises(IntegrityError, match="no manifest.json, so its bytes cannot be verified"):
        load_model(folder)


def test_a_verified_load_costs_a_stat_the_second_time(tmp_path, monkeypatch):
    folder = random_checkpoint(TINY, 0, tmp_path / "a")
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    load_model(folder)
    hashed = []
    monkeypatch.setattr(fileio, "sha256_file", lambda p: hashed.append(p) or "x")
    load_model(folder)
    assert hashed == []  # every file's hash came from the database of known hashes
    (folder / "config.json").write_text((folder / "config.json").read_text())  # a write: change time moves
    with pytest.raises(IntegrityError):  # rehashed (our fake hash differs), not trusted
        load_model(folder)
    assert [p.name for p in hashed] == ["config.json"]
