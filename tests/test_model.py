"""The model equals transformers' GPT-2 on the same weights, and its pieces behave."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
from torch.profiler import profile

import gpt2lab.model as model_module
from gpt2lab.lora import LoRALinear
from gpt2lab.model import GPT2, PRESETS, GPT2Config, project
from gpt2lab.weights import convert_checkpoint, load_model
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


@pytest.mark.parametrize("name,params", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                         ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])  # fmt: skip
def test_presets_have_the_published_sizes(name, params):
    with torch.device("meta"):
        model = GPT2(GPT2Config.preset(name))
    assert model.num_parameters() == params


def test_unknown_preset_names_the_allowed():
    with pytest.raises(ValueError, match="gpt2-medium"):
        GPT2Config.preset("gpt3")


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


def test_dropout_is_configurable():
    model = GPT2(GPT2Config(n_ctx=16, n_embd=32, n_layer=1, n_head=2, vocab_size=100, dropout=0.5)).train()
    idx = torch.randint(0, 100, (1, 8))
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


# A different summation order: about one unit in the last place for one projection (bf16 keeps
# 8 bits), a few after a whole model.
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2**-7, "atol": 1e-3}}
MODEL_TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


def _aten_ops(fn: Callable[[], object]) -> set[str]:
    """Names of the ops (aten::..., mkldnn::...) that ``fn()`` ran."""
    with profile() as prof:
        fn()
    return {event.key for event in prof.key_averages()}


def _kernel(dtype: torch.dtype, rows: int, bias: bool) -> str:
    """The op project() runs for a large weight (the measured choices in model.py)."""
    if rows == 1:
        return "aten::addmv" if bias else "aten::mv"
    if rows > model_module.FEW_ROWS or (dtype == torch.float32 and rows < 4):
        return "aten::linear"
    if dtype == torch.bfloat16:
        return "aten::addmm" if bias else "aten::mm"
    return "mkldnn::_linear_pointwise"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_row_projections_equal_the_linear_layer(dtype):
    """At inference, project() runs its own kernel for 1..FEW_ROWS rows of a weight large enough
    to be streamed (1 row: addmv; bf16: W @ x^T; fp32 from 4 rows: oneDNN) and agrees with F.linear."""
    torch.manual_seed(5)
    for bias in (True, False):
        layer = nn.Linear(1024, 1024, bias=bias).to(dtype)  # 1M elements: above both thresholds
        for rows in (1, 2, 3, 4, 8, model_module.FEW_ROWS, model_module.FEW_ROWS + 1):
            x = torch.randn(1, rows, 1024).to(dtype)
            with torch.no_grad():
                plain = layer(x)  # F.linear
                fast = project(layer, x)
                ops = _aten_ops(lambda: project(layer, x))
            torch.testing.assert_close(fast, plain, **TOLERANCE[dtype])
            kernel = _kernel(dtype, rows, bias)
            assert kernel in ops
            assert kernel == "aten::linear" or "aten::linear" not in ops


def test_projection_keeps_the_layers_own_forward_and_autograd():
    layer = nn.Linear(1024, 1024)
    lora = LoRALinear.from_linear(layer, rank=2, alpha=4.0)
    nn.init.normal_(lora.lora_b)
    x = torch.randn(4, 1024)
    with torch.no_grad():
        torch.testing.assert_close(project(lora, x), lora(x), rtol=0, atol=0)  # the LoRA branch counts
    y = project(layer, x[:1])
    assert y.requires_grad and "aten::linear" in _aten_ops(lambda: project(layer, x[:1]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert project(layer, x).dtype == torch.bfloat16  # as F.linear under autocast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_steps_equal_the_plain_linear_path(dtype, monkeypatch):
    """A prefill, a multi-token verify step and a decoding step through the fast kernels give the
    logits of the same steps through nn.Linear (FEW_ROWS = 0 turns the fast paths off)."""
    cfg = GPT2Config(vocab_size=64, n_ctx=32, n_embd=1024, n_layer=1, n_head=8)  # weights above the thresholds
    torch.manual_seed(6)
    model = GPT2(cfg).eval().to(dtype)
    idx = torch.randint(0, cfg.vocab_size, (1, 14), generator=torch.Generator().manual_seed(7))

    def steps() -> torch.Tensor:
        model.setup_cache(batch_size=1, max_len=16)
        with torch.no_grad():
            prefix = model(idx[:, :5], start=0)
            verify = model(idx[:, 5:13], start=5)
            step = model(idx[:, 13:], start=13, last_only=True)
        return torch.cat([prefix, verify, step], dim=1)

    fast = steps()
    monkeypatch.setattr(model_module, "FEW_ROWS", 0)
    plain = steps()
    torch.testing.assert_close(fast, plain, **MODEL_TOLERANCE[dtype])
