"""Conversion: OpenAI's TF checkpoint and Hugging Face files give identical tensors; a bad tensor is named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt2lab.checkpoint import CheckpointError, load_model
from gpt2lab.convert import convert_checkpoint
from tests.conftest import TINY


def write_openai_checkpoint(hf_state: dict[str, torch.Tensor], cfg, folder: Path) -> Path:
    """Write a GPT-2-shaped TF1 checkpoint (OpenAI's variable names and shapes) with TensorFlow."""
    import tensorflow as tf

    folder.mkdir(parents=True)
    tf_vars = {}
    for key, t in hf_state.items():
        if key in ("lm_head.weight",) or key.endswith(("attn.bias", "attn.masked_bias")) and "c_" not in key:
            continue
        key = key.removeprefix("transformer.")
        name = re.sub(r"^h\.(\d+)\.", r"h\1/", key).replace(".", "/")
        name = "model/" + name.replace("/weight", "/w" if ("c_" in key) else "/g").replace("/bias", "/b")
        name = name.replace("model/wte/g", "model/wte").replace("model/wpe/g", "model/wpe")
        arr = t.numpy()
        if name.endswith("/w"):
            arr = arr[None]  # OpenAI's 1x1 conv weights: (1, in, out)
        tf_vars[name] = arr
    assert "model/h0/attn/c_attn/w" in tf_vars and tf_vars["model/h0/attn/c_attn/w"].shape == (1, cfg.n_embd, 3 * cfg.n_embd)
    graph = tf.Graph()
    with graph.as_default():
        variables = [tf.compat.v1.Variable(arr, name=name) for name, arr in tf_vars.items()]
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(folder / "model.ckpt"))
    hparams = {"n_vocab": cfg.vocab_size, "n_ctx": cfg.n_ctx, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
               "n_layer": cfg.n_layer}  # fmt: skip
    (folder / "hparams.json").write_text(json.dumps(hparams))
    (folder / "encoder.json").write_text("{}")
    (folder / "vocab.bpe").write_text("#version: 0.2\n")
    return folder


@pytest.mark.slow
def test_openai_and_hf_checkpoints_convert_to_identical_tensors(hf_tiny, tmp_path):
    hf_model, hf_folder = hf_tiny
    hf_state = load_file(str(hf_folder / "model.safetensors"))
    openai_folder = write_openai_checkpoint(hf_state, TINY, tmp_path / "openai")
    from_openai = convert_checkpoint(openai_folder, tmp_path / "a")
    from_hf = convert_checkpoint(hf_folder, tmp_path / "b")
    a, b = load_file(str(from_openai / "model.safetensors")), load_file(str(from_hf / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (from_openai / "encoder.json").is_file() and (from_openai / "vocab.bpe").is_file()
    meta = json.loads((from_openai / "config.json").read_text())
    assert meta["pretrained"] is True and meta["model"]["n_head"] == TINY.n_head
    idx = torch.randint(0, TINY.vocab_size, (2, 9))
    with torch.no_grad():
        assert (load_model(from_openai)(idx) - hf_model(idx).logits).abs().max() < 1e-4


@pytest.mark.parametrize("variant", ["prefixed", "bare", "with_lm_head", "with_mask_buffers"])
def test_hf_key_variants_all_load(hf_tiny, tmp_path, variant):
    hf_model, folder = hf_tiny
    state = load_file(str(folder / "model.safetensors"))
    state = {k if k.startswith(("transformer.", "lm_head")) else f"transformer.{k}": v for k, v in state.items()}
    if variant == "bare":
        state = {k.removeprefix("transformer."): v for k, v in state.items() if not k.startswith("lm_head")}
    elif variant == "with_lm_head":
        state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    elif variant == "with_mask_buffers":
        for i in range(TINY.n_layer):
            state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, TINY.n_ctx, TINY.n_ctx))
            state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    else:
        state.pop("lm_head.weight", None)
    src = tmp_path / "src"
    src.mkdir()
    save_file(state, str(src / "model.safetensors"))
    (src / "config.json").write_text((folder / "config.json").read_text())
    model = load_model(convert_checkpoint(src / "model.safetensors", tmp_path / "out"))
    idx = torch.randint(0, TINY.vocab_size, (1, 5))
    with torch.no_grad():
        assert (model(idx) - hf_model(idx).logits).abs().max() < 1e-4


def _corrupt(folder: Path, tmp_path: Path, edit) -> Path:
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(state, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((folder / "config.json").read_text())
    return bad


def test_wrong_shape_tensor_is_named(hf_tiny, tmp_path):
    _, folder = hf_tiny
    bad = _corrupt(folder, tmp_path, lambda s: s.__setitem__("transformer.h.1.mlp.c_fc.weight", torch.zeros(32, 64)))
    with pytest.raises(CheckpointError, match=r"h\.1\.mlp\.c_fc\.weight.*shape"):
        convert_checkpoint(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tensor_is_named(hf_tiny, tmp_path):
    _, folder = hf_tiny
    bad = _corrupt(folder, tmp_path, lambda s: s.pop("transformer.h.0.ln_2.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'h\.0\.ln_2\.bias'"):
        convert_checkpoint(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unexpected_tensor_is_named(hf_tiny, tmp_path):
    _, folder = hf_tiny
    bad = _corrupt(folder, tmp_path, lambda s: s.__setitem__("transformer.h.0.attn.rotary", torch.zeros(3)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'h.0.attn.rotary'"):
        convert_checkpoint(bad, tmp_path / "out")


def test_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a GPT-2 checkpoint"):
        convert_checkpoint(tmp_path / "notes.txt", tmp_path / "out")


def test_truncated_file_is_refused_and_leaves_nothing(hf_tiny, tmp_path):
    _, folder = hf_tiny
    data = (folder / "model.safetensors").read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        convert_checkpoint(bad, out)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_failed_conversion_keeps_the_previous_output(hf_tiny, tmp_path):
    _, folder = hf_tiny
    out = convert_checkpoint(folder, tmp_path / "out")
    before = (out / "model.safetensors").read_bytes()
    bad = _corrupt(folder, tmp_path, lambda s: s.pop("transformer.wpe.weight"))
    with pytest.raises(CheckpointError):
        convert_checkpoint(bad, out)
    assert (out / "model.safetensors").read_bytes() == before


# --- the other direction: canonical -> transformers, the same table inverted --------------------
def test_to_hf_is_the_inverse_of_the_table(hf_tiny):
    from gpt2lab.convert import from_hf, read_hf_checkpoint, to_hf

    model, folder = hf_tiny
    canonical, _ = read_hf_checkpoint(folder)
    exported = to_hf(canonical)
    buffers = (".attn.bias", ".attn.masked_bias")  # old mask buffers, no weights
    hf_state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" and not k.endswith(buffers)}
    assert exported.keys() == hf_state.keys()
    assert all(torch.equal(exported[k], hf_state[k]) for k in hf_state)  # names and Conv1D layouts
    back = from_hf(exported)
    assert back.keys() == canonical.keys() and all(torch.equal(back[k], canonical[k]) for k in canonical)
    part = {"h.1.mlp.c_fc.weight": canonical["h.1.mlp.c_fc.weight"], "ln_f.bias": canonical["ln_f.bias"]}
    assert set(to_hf(part)) == {"transformer.h.1.mlp.c_fc.weight", "transformer.ln_f.bias"}  # any part of a body


def test_a_tensor_without_counterpart_is_named():
    from gpt2lab.convert import HF_TABLE, PEFT_LORA_TABLE, rename_key, to_hf

    with pytest.raises(CheckpointError, match="'lm_head.weight' has no counterpart"):
        to_hf({"lm_head.weight": torch.zeros(3, 2)})
    assert rename_key("h.11.attn.c_proj.lora_B.weight", PEFT_LORA_TABLE) == "h.11.attn.c_proj.lora_b"
    assert rename_key("h.3.mlp.c_fc.lora_a", PEFT_LORA_TABLE, inverse=True) == "h.3.mlp.c_fc.lora_A.weight"
    assert rename_key("h.12.ln_2.bias", HF_TABLE, inverse=True) == "h.12.ln_2.bias"
