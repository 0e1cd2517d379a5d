"""The model equals transformers' GPT-2 on the same weights, and its pieces behave."""

from __future__ import annotations

import pytest
import torch

from gpt2lab.checkpoint import load_model
from gpt2lab.convert import convert_checkpoint
from gpt2lab.model import GPT2, PRESETS, GPT2Config
from tests.conftest import make_hf_checkpoint


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_logits_match_transformers_tiny(hf_tiny, tmp_path):
    hf_model, folder = hf_tiny
    out = convert_checkpoint(folder / "model.safetensors", tmp_path / "ours")
    model = load_model(out)
    assert not model.training
    g = torch.Generator().manual_seed(1)
    for batch, length in [(2, 7), (3, 1), (1, model.config.n_ctx)]:
        idx = torch.randint(0, model.config.vocab_size, (batch, length), generator=g)
        with torch.no_grad():
            ours = model(idx)
            ref = hf_model(idx).logits
        assert ours.shape == (batch, length, model.config.vocab_size)
        assert _max_diff(ours, ref) < 1e-4


@pytest.mark.slow
def test_logits_match_transformers_124m(tmp_path):
    cfg = PRESETS["gpt2"]
    hf_model, folder = make_hf_checkpoint(cfg, tmp_path / "hf")
    model = load_model(convert_checkpoint(folder, tmp_path / "ours"))
    assert model.num_parameters() == 124_439_808
    g = torch.Generator().manual_seed(2)
    for batch, length in [(2, 16), (1, 8), (1, cfg.n_ctx)]:  # (1, 8): project()'s few-row kernels
        idx = torch.randint(0, cfg.vocab_size, (batch, length), generator=g)
        with torch.no_grad():
            assert _max_diff(model(idx), hf_model(idx).logits) < 1e-4


def test_lm_head_is_tied(tiny_model):
    assert tiny_model.lm_head.weight is tiny_model.wte.weight
    assert "lm_head.weight" in tiny_model.state_dict()


def test_module_names_follow_gpt2(tiny_model):
    names = set(tiny_model.state_dict())
    for key in ["wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.1.attn.c_attn.weight", "h.1.attn.c_proj.bias",
                "h.0.ln_2.bias", "h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.weight", "ln_f.weight"]:  # fmt: skip
        assert key in names


def test_too_long_input_is_refused(tiny_model):
    with pytest.raises(ValueError, match="context length"):
        tiny_model(torch.zeros(1, tiny_model.config.n_ctx + 1, dtype=torch.long))


def test_cached_forward_equals_full_forward(tiny_model):
    idx = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = tiny_model(idx)
        tiny_model.setup_cache(batch_size=2, max_len=16)
        prefix = tiny_model(idx[:, :5], start=0)
        chunk = tiny_model(idx[:, 5:9], start=5)  # several tokens against a filled cache
        steps = [tiny_model(idx[:, t : t + 1], start=t) for t in range(9, 12)]
    cached = torch.cat([prefix, chunk, *steps], dim=1)
    assert _max_diff(cached, full) < 1e-5


def test_decode_step_over_the_whole_cache_equals_the_cached_forward(tiny_model):
    """``decode_step``: same shapes every step (the whole cache, masked), same logits; stale
    entries past the columns in use are never seen."""
    idx = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(5))
    full = tiny_model(idx)
    with torch.no_grad():
        tiny_model.setup_cache(batch_size=2, max_len=16)
        for block in tiny_model.h:
            block.attn.kv_cache.kv.normal_()  # garbage where nothing was written yet
        tiny_model(idx[:, :6], start=0)
        key_mask = torch.zeros(2, 16, dtype=torch.bool)
        key_mask[:, :6] = True
        steps = []
        for t in range(6, 9):
            key_mask[:, t] = True
            pos = torch.full((2, 1), t)
            steps.append(tiny_model.decode_step(idx[:, t : t + 1], pos, torch.tensor([t]), key_mask))
    assert all(step.shape == (2, 1, tiny_model.config.vocab_size) for step in steps)
    assert _max_diff(torch.cat(steps, dim=1), full[:, 6:]) < 1e-5


def test_key_mask_ignores_left_padding(tiny_model):
    g = torch.Generator().manual_seed(4)
    seq = torch.randint(0, 1000, (1, 6), generator=g)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], dim=1)
    key_mask = torch.tensor([[False] * 3 + [True] * 6])
    pos = torch.clamp(torch.arange(9) - 3, min=0)[None]
    with torch.no_grad():
        ref = tiny_model(seq)
        out = tiny_model(padded, pos=pos, key_mask=key_mask)
    assert _max_diff(out[:, 3:], ref) < 1e-5
    assert torch.isfinite(out).all()


def test_hidden_states_at_positions_equal_the_full_pass(tiny_model):
    """``at``: the last block runs its attention output and MLP for one position per row; the
    states there, and the gradients reaching every weight, equal the full pass's."""
    idx = torch.randint(0, 1000, (3, 10), generator=torch.Generator().manual_seed(5))
    at = torch.tensor([9, 0, 4])
    rows = torch.arange(3)
    full = tiny_model.hidden_states(idx)[rows, at]
    part = tiny_model.hidden_states(idx, at=at)
    assert part.shape == (3, tiny_model.config.n_embd)
    assert _max_diff(part, full) < 1e-5
    grads = []
    for out in (full, part):
        tiny_model.zero_grad()
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert max(_max_diff(grads[0][n], grads[1][n]) for n in grads[0]) < 1e-5
    key_mask = torch.ones(3, 10, dtype=torch.bool)
    key_mask[:, :2] = False  # left padding: the mask still applies with ``at``
    pos = torch.clamp(torch.arange(10) - 2, min=0)[None].expand(3, -1)
    with torch.no_grad():
        full = tiny_model.hidden_states(idx, pos=pos, key_mask=key_mask)[rows, at]
        part = tiny_model.hidden_states(idx, pos=pos, key_mask=key_mask, at=at)
    assert _max_diff(part, full) < 1e-5
    with pytest.raises(ValueError, match="without a KV cache"):
        tiny_model.hidden_states(idx, start=0, at=at)


def test_dropout_is_configurable():
    model = GPT2(GPT2Config(n_ctx=16, n_embd=32, n_layer=1, n_head=2, vocab_size=100, dropout=0.5)).train()
    idx = torch.randint(0, 100, (1, 8))
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))
