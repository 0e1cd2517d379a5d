"""int8 weights: the quantization is exact to half a step, the layers and a whole tiny GPT-2 stay
within the documented tolerances of fp32, and a CPU without the kernels is refused in one line."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lab.errors import Gpt2labError
from gpt2lab.generate import generate
from gpt2lab.lora import LoRAConfig, LoRALinear, apply_lora, merge
from gpt2lab.model import GPT2, GPT2Config
from gpt2lab.quantize import (
    ENGINES,
    Int8Linear,
    Int8MLP,
    Int8UnsupportedError,
    check_int8,
    int8_unsupported_reason,
    quantize_input,
    quantize_int8,
    quantize_weight,
)

# The documented tolerances (README, gpt2lab.quantize): int8 weights with per-output-channel scales
# and inputs quantized per call move an output by ~1% of its scale per layer; through a tiny
# 2-layer GPT-2 the logits stay within 3% of their largest magnitude of fp32's.
LAYER_RTOL = 0.02  # of max |output|, one layer
MODEL_RTOL = 0.03  # of max |logit|, the whole model
CFG = GPT2Config(vocab_size=96, n_ctx=32, n_embd=64, n_layer=2, n_head=4)


def _model(seed: int = 0) -> GPT2:
    torch.manual_seed(seed)
    return GPT2(CFG).eval()


def test_weights_round_to_the_nearest_step_of_their_row():
    torch.manual_seed(0)
    w = torch.randn(48, 64) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different scales
    w[3] = 0.0
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (48,) and int(q.abs().max()) == 127
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 * (1 + 1e-6))
    assert torch.all(q[3] == 0)  # an all-zero row stays zero (no division by zero)


@pytest.mark.parametrize("workload", sorted(ENGINES))
def test_int8_linear_is_the_linear_layer_on_its_int8_weight(workload):
    torch.manual_seed(1)
    linear = nn.Linear(64, 96)
    fast = Int8Linear.from_linear(linear, ENGINES[workload])
    q, scale = quantize_weight(linear.weight)
    weight = q.float() * scale[:, None]  # what the kernel multiplies by
    for shape in [(1, 64), (3, 5, 64), (2, 1, 64)]:
        x = torch.randn(shape)
        with torch.inference_mode():
            y = fast(x)
        exact = F.linear(x, linear.weight, linear.bias).detach()
        assert y.shape == exact.shape and y.dtype == torch.float32
        assert (y - exact).abs().max() <= LAYER_RTOL * exact.abs().max()
        # On the int8 weight, only the input's rounding (half a step of its one scale) is left.
        step = (x.max().clamp(min=0) - x.min().clamp(max=0)) / 255
        on_int8 = F.linear(x, weight, linear.bias).detach()
        assert (y - on_int8).abs().max() <= step / 2 * weight.abs().sum(1).max() * 1.01 + 1e-5
    assert fast(torch.randn(2, 64).bfloat16()).dtype == torch.float32  # any float input; fp32 out


def test_inputs_are_quantized_to_the_nearest_step_of_a_range_that_holds_zero():
    x = torch.tensor([[0.5, 1.0, 2.0], [0.25, 1.5, 0.75]])  # all positive: the range starts at 0
    q, scale, zero_point = quantize_input(x)
    assert q.dtype == torch.uint8 and q.shape == x.shape and zero_point == 0 and scale == pytest.approx(2.0 / 255)
    assert torch.all(((q.float() - zero_point) * scale - x).abs() <= scale / 2 * (1 + 1e-6))
    y = torch.randn(40, 7, generator=torch.Generator().manual_seed(0)) - 1.0  # both signs
    q, scale, zero_point = quantize_input(y)
    assert 0 < zero_point < 255 and int(q.min()) == 0 and int(q.max()) >= 254
    assert torch.all(((q.float() - zero_point) * scale - y).abs() <= scale * (0.5 + 1e-4))
    assert quantize_input(torch.zeros(2, 3))[0].eq(0).all()  # all zeros: no division by zero


@pytest.mark.parametrize("workload", sorted(ENGINES))
def test_a_tiny_gpt2_stays_within_the_tolerance_of_fp32(workload):
    model = _model()
    idx = torch.randint(0, CFG.vocab_size, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        exact = model(idx)
        replaced = quantize_int8(model, workload)
        approx = model(idx)
    assert len(replaced) == 4 * CFG.n_layer + 1  # every projection and the LM head
    assert isinstance(model.h[0].mlp, Int8MLP) == (workload == "batch")  # GELU fused into c_fc for batches
    assert (approx - exact).abs().max() <= MODEL_RTOL * exact.abs().max()
    agree = (approx.argmax(-1) == exact.argmax(-1)).float().mean()
    assert agree >= 0.9  # the top token (random weights: many near-ties)


def test_the_fused_int8_mlp_is_gpt2s_mlp_on_int8_weights():
    mlp = _model(4).h[1].mlp
    x = torch.randn(2, 7, CFG.n_embd)
    with torch.inference_mode():
        exact = mlp(x)
        approx = Int8MLP(mlp)(x)
    assert approx.shape == exact.shape and (approx - exact).abs().max() <= LAYER_RTOL * exact.abs().max()


def test_only_linear_and_merged_lora_layers_are_replaced_and_the_embedding_stays_tied_fp32():
    model = _model()
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=("h.0.attn.c_attn", "h.1.attn.c_attn")))
    model.h[0].attn.c_attn.merge()
    wte = model.wte.weight
    replaced = quantize_int8(model, "decode", skip=lambda name: name.startswith("h.1.mlp"))
    assert "h.0.attn.c_attn" in replaced and "lm_head" in replaced
    assert isinstance(model.h[1].attn.c_attn, LoRALinear)  # unmerged: its fp32 branch stays
    assert type(model.h[1].mlp.c_fc) is nn.Linear  # skipped
    assert model.wte.weight is wte and wte.dtype == torch.float32  # the lookup keeps fp32
    assert not any(isinstance(m, Int8Linear) and m.engine != "fbgemm" for m in model.modules())


def test_merged_lora_is_quantized_with_its_update():
    model = _model()
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=("h.0.mlp.c_fc",)))
    with torch.no_grad():
        model.h[0].mlp.c_fc.lora_b.normal_(0.0, 0.5)
    merge(model)
    x = torch.randn(4, CFG.n_embd)
    with torch.inference_mode():
        exact = model.h[0].mlp(x)
        quantize_int8(model, "batch")
        approx = model.h[0].mlp(x)
    assert (approx - exact).abs().max() <= LAYER_RTOL * exact.abs().max()


def test_greedy_generation_of_an_int8_model_runs_and_mostly_agrees_with_fp32():
    model = _model(3)
    prompt = [[5, 17, 42]]
    exact = generate(model, prompt, 12)[0]
    quantized = copy.deepcopy(model)
    quantize_int8(quantized, "decode")
    approx = generate(quantized, prompt, 12)[0]
    assert len(approx) == 12 and approx[0] == exact[0]  # later steps may part at a near-tie


def test_a_cpu_without_the_kernels_is_refused_in_one_line():
    assert int8_unsupported_reason(["qnnpack", "onednn", "fbgemm", "x86"], "AVX512") is None
    assert int8_unsupported_reason(["fbgemm", "onednn"], "AVX2") is None
    arm = int8_unsupported_reason(["qnnpack", "none"], "DEFAULT")
    assert arm is not None and "fbgemm or onednn" in arm and "qnnpack" in arm
    old = int8_unsupported_reason(["fbgemm", "onednn"], "DEFAULT")
    assert old is not None and "AVX2" in old and "DEFAULT" in old
    assert issubclass(Int8UnsupportedError, Gpt2labError)  # the CLI and stages print it as one line
    check_int8()  # this machine (x86 with AVX-512) has them


def test_an_unknown_workload_is_refused():
    with pytest.raises(ValueError, match="workload"):
        quantize_int8(_model(), "huge")
