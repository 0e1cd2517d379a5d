"""The few-row CPU kernels equal nn.Linear, keep autograd, and are swapped in only for a block."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import logging

import pytest
import torch
import torch.nn as nn
from torch.profiler import profile

from gpt2lab import kernels
from gpt2lab.generate import generate, stream
from gpt2lab.kernels import FEW_ROWS, FewRowLinear, bf16_addmv_op, compiled_decode_step, few_row_kernels
from gpt2lab.lora import LoRAConfig, LoRALinear, apply_lora
from gpt2lab.model import GPT2, GPT2Config
from tests.helpers import compiled_calls

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
    """The op FewRowLinear runs for a large weight (the measured choices in kernels.py)."""
    if rows == 1:
        if dtype == torch.bfloat16 and bf16_addmv_op() is not None:
            return "gpt2lab::bf16_addmv"
        return "aten::addmv" if bias else "aten::mv"
    if rows > FEW_ROWS or (dtype == torch.float32 and rows < 4):
        return "aten::linear"
    if dtype == torch.bfloat16:
        return "aten::addmm" if bias else "aten::mm"
    return "mkldnn::_linear_pointwise"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_row_projections_equal_the_linear_layer(dtype):
    """At inference, FewRowLinear runs its own kernel for 1..FEW_ROWS rows of a weight large enough
    to be streamed (1 row: addmv, or gpt2lab's bf16 kernel; bf16: W @ x^T; fp32 from 4 rows: oneDNN)
    and agrees with F.linear."""
    torch.manual_seed(5)
    for bias in (True, False):
        layer = nn.Linear(1024, 1024, bias=bias).to(dtype)  # 1M elements: above both thresholds
        fast_layer = FewRowLinear.from_linear(layer)
        assert fast_layer.weight is layer.weight and fast_layer.bias is layer.bias  # shared, not copied
        for rows in (1, 2, 3, 4, 8, FEW_ROWS, FEW_ROWS + 1):
            x = torch.randn(1, rows, 1024).to(dtype)
            with torch.no_grad():
                plain = layer(x)  # F.linear
                fast = fast_layer(x)
                ops = _aten_ops(lambda: fast_layer(x))
            torch.testing.assert_close(fast, plain, **TOLERANCE[dtype])
            kernel = _kernel(dtype, rows, bias)
            assert kernel in ops
            assert kernel == "aten::linear" or "aten::linear" not in ops


def test_autograd_and_autocast_take_the_plain_path():
    layer = FewRowLinear.from_linear(nn.Linear(1024, 1024))
    x = torch.randn(1, 1024)
    y = layer(x)
    assert y.requires_grad and "aten::linear" in _aten_ops(lambda: layer(x))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # as F.linear under autocast


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_single_row_projection_equals_linear(dtype, tol):
    torch.manual_seed(0)
    layer = FewRowLinear.from_linear(torch.nn.Linear(64, 96).to(dtype))
    x = torch.randn(1, 1, 64, dtype=dtype)
    with torch.inference_mode():
        fast = layer(x)
        assert _kernel(dtype, 1, bias=True) in _aten_ops(lambda: layer(x))
    ref = torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
    assert fast.shape == (1, 1, 96) and torch.allclose(fast.double(), ref, atol=tol, rtol=tol)


def test_swapped_in_for_the_block_only_and_lora_left_alone():
    cfg = GPT2Config(vocab_size=64, n_ctx=16, n_embd=32, n_layer=2, n_head=4)
    model = GPT2(cfg).eval()
    apply_lora(model, LoRAConfig(rank=2, alpha=2.0, targets=("h.0.attn.c_attn",)))
    before = dict(model.named_modules())
    state = {k: v.data_ptr() for k, v in model.state_dict().items()}
    with few_row_kernels(model):
        inside = dict(model.named_modules())
        assert type(inside["h.1.mlp.c_fc"]) is FewRowLinear and type(inside["lm_head"]) is FewRowLinear
        assert isinstance(inside["h.0.attn.c_attn"], LoRALinear)  # LoRA keeps its own forward
        assert inside["lm_head"].weight is model.wte.weight  # still tied
        assert {k: v.data_ptr() for k, v in model.state_dict().items()} == state  # no copies
    after = dict(model.named_modules())
    assert all(after[name] is module for name, module in before.items())  # the originals are back
    assert not any(type(m) is FewRowLinear for m in model.modules())


def test_generation_swaps_them_in_and_restores_the_model_even_when_stopped_early():
    cfg = GPT2Config(vocab_size=64, n_ctx=32, n_embd=32, n_layer=1, n_head=4)
    model = GPT2(cfg).eval()
    heads = []
    model.ln_f.register_forward_hook(lambda *_: heads.append(type(model.lm_head)))
    assert len(generate(model, [[1, 2, 3]], 3)[0]) == 3
    assert heads == [FewRowLinear] * 3  # every forward pass of the generation ran the fast layers
    steps = stream(model, [[1, 2, 3]], 10)
    next(steps)
    assert type(model.lm_head) is FewRowLinear
    steps.close()  # the caller stops early
    assert type(model.lm_head) is nn.Linear and not any(type(m) is FewRowLinear for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_steps_equal_the_plain_linear_path(dtype):
    """A prefill, a multi-token verify step and a decoding step through the fast kernels give the
    logits of the same steps through nn.Linear."""
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

    with few_row_kernels(model):
        fast = steps()
        ops = _aten_ops(steps)
    assert _kernel(dtype, 1, bias=True) in ops  # the decoding step took the fast path
    plain = steps()
    torch.testing.assert_close(fast, plain, **MODEL_TOLERANCE[dtype])


# --- gpt2lab's bf16 matrix-vector kernel -------------------------------------------------------
def _exact_and_bound(bias: torch.Tensor | None, w: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact ``w @ x + bias`` (fp64), and how far a bf16 result of an fp32 sum may be from it:
    half a bf16 step (rounded once: 2^-8 relative, bf16 keeps 8 significant bits) plus fp32's
    summation error."""
    exact = w.double() @ x.double() + (0.0 if bias is None else bias.double())
    magnitude = w.double().abs() @ x.double().abs() + (0.0 if bias is None else bias.double().abs())
    return exact, exact.abs() * 2**-8 + magnitude * (w.shape[1] + 1) * 2**-24


@pytest.mark.parametrize(
    "out_features,in_features",
    [(1, 32), (8, 64), (13, 70), (96, 31), (250, 1000)],  # row blocks of 8 and not, columns in 32s and not
)
def test_bf16_kernel_is_the_exact_product_rounded_once(bf16_kernel, out_features, in_features):
    g = torch.Generator().manual_seed(out_features)
    w, x, b = (torch.randn(*shape, generator=g).bfloat16() for shape in
               ((out_features, in_features), (in_features,), (out_features,)))  # fmt: skip
    for bias in (b, None):
        y = bf16_kernel(bias, w, x)
        assert y.dtype == torch.bfloat16 and y.shape == (out_features,)
        exact, bound = _exact_and_bound(bias, w, x)
        assert ((y.double() - exact).abs() <= bound).all()
        # ATen's addmv meets the same bound: the two differ by at most a rounding step
        assert ((torch.addmv(b if bias is None else bias, w, x, beta=0 if bias is None else 1).double() - exact).abs()
                <= bound).all()  # fmt: skip


def test_bf16_kernel_reads_strided_inputs_and_names_bad_shapes(bf16_kernel):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 24, generator=g).bfloat16().t()  # (24, 40), column-major
    x = torch.randn(80, generator=g).bfloat16()[::2]  # (40,), every other element
    exact, bound = _exact_and_bound(None, w, x)
    assert ((bf16_kernel(None, w, x).double() - exact).abs() <= bound).all()
    with pytest.raises(RuntimeError, match=r"weight \(out, in\) and vec \(in,\) expected, got \[24, 40\] and \[41\]"):
        bf16_kernel(None, w, torch.zeros(41, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="bf16 weight and vec expected"):
        bf16_kernel(None, w.float(), x.float())


def test_without_the_bf16_kernel_one_row_runs_addmv(monkeypatch, caplog):
    """Where the kernel cannot be built (here: no C++ compiler), one warning and ATen's addmv."""

    def no_compiler() -> None:
        raise kernels.CompileUnavailable("torch.compile needs a C++ compiler (g++ or clang++ on PATH, or set CXX)")

    monkeypatch.setattr(kernels, "check_compiler", no_compiler)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    kernels._load_bf16_addmv.cache_clear()
    try:
        layer = FewRowLinear.from_linear(nn.Linear(64, 96).to(torch.bfloat16))
        x = torch.randn(1, 64, dtype=torch.bfloat16)
        with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="gpt2lab.kernels"):
            ops = _aten_ops(lambda: layer(x))
            layer(x)
        assert "aten::addmv" in ops and "gpt2lab::bf16_addmv" not in ops
        warnings = [r.getMessage() for r in caplog.records]
        assert warnings == ["bf16 decoding runs torch.addmv: gpt2lab's kernel bf16_addmv is unavailable "
                            "(torch.compile needs a C++ compiler (g++ or clang++ on PATH, or set CXX))"]  # fmt: skip
    finally:
        kernels._load_bf16_addmv.cache_clear()  # the next caller loads the real one again


def _cached_steps(
    model: GPT2,
    step: Callable[..., torch.Tensor],
    tokens: torch.Tensor,
    padding: frozenset[tuple[int, int]] = frozenset(),
) -> torch.Tensor:
    """Logits (B, steps, vocab) of cached decoding steps through ``step`` (``model.decode_step`` or its
    compiled form), one token (B, 1) of ``tokens`` (steps, B, 1) each, in an 8-column cache; the
    (row, column) pairs in ``padding`` are masked as padding."""
    batch = tokens.shape[1]
    model.setup_cache(batch_size=batch, max_len=8)
    logits = []
    # Every input made in inference mode, as a decoder's (Dynamo compiles inference and other tensors apart).
    with torch.inference_mode(), few_row_kernels(model):
        key_mask = torch.zeros(batch, 8, dtype=torch.bool)
        for t, token in enumerate(tokens.clone()):
            key_mask[:, t] = torch.tensor([(row, t) not in padding for row in range(batch)])
            logits.append(step(token, torch.full((batch, 1), t), torch.tensor([t]), key_mask))
    return torch.cat(logits, dim=1)


def test_compiled_bf16_decoding_runs_the_bf16_kernel(bf16_kernel, cpp_compiler):
    """Compiled bf16 steps call the kernel (not ATen's addmv) and give eager bf16's logits up to rounding."""
    cfg = GPT2Config(vocab_size=96, n_ctx=64, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(4)
    model = GPT2(cfg).eval().to(torch.bfloat16)
    tokens = torch.tensor([[[5]], [[17]], [[3]]])  # (steps, B, 1)

    def steps(step: Callable[..., torch.Tensor]) -> torch.Tensor:
        return _cached_steps(model, step, tokens)

    compiled = compiled_decode_step(model)
    eager = steps(model.decode_step)
    assert "gpt2lab::bf16_addmv" in _aten_ops(lambda: steps(model.decode_step))
    torch.testing.assert_close(steps(compiled), eager, **MODEL_TOLERANCE[torch.bfloat16])
    ops = _aten_ops(lambda: steps(compiled))
    assert "gpt2lab::bf16_addmv" in ops and "aten::addmv" not in ops


def test_a_compiled_step_calls_its_graph_directly_on_the_same_input_tensors(cpp_compiler):
    """Steps on the same input tensors, updated in place, go through Dynamo's checks once and then call
    the graph it picked directly, with eager's logits; other input tensors go through Dynamo again."""
    cfg = GPT2Config(vocab_size=96, n_ctx=64, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(5)
    model = GPT2(cfg).eval()
    tokens = torch.tensor([[[5], [9]], [[17], [2]], [[3], [40]], [[8], [1]]])  # (steps, B, 1)
    eager = _cached_steps(model, model.decode_step, tokens)
    step = compiled_decode_step(model)
    model.setup_cache(batch_size=2, max_len=8)
    logits = []

    def steps() -> None:
        with torch.inference_mode(), few_row_kernels(model):
            # Made in inference mode, as _cached_steps' (and a decoder's): the graph compiled for those serves.
            idx, pos, column = (torch.zeros(shape, dtype=torch.long) for shape in ((2, 1), (2, 1), (1,)))
            key_mask = torch.zeros(2, 8, dtype=torch.bool)
            for t, token in enumerate(tokens):
                idx.copy_(token)
                pos.fill_(t)
                column.fill_(t)
                key_mask[:, t] = True
                logits.append(step(idx, pos, column, key_mask))
            logits.append(step(tokens[0], pos.clone(), column.clone(), key_mask.clone()))  # other tensors: checked

    assert compiled_calls(steps) == (len(tokens) + 1, 2)
    torch.testing.assert_close(torch.cat(logits[:-1], dim=1), eager, **MODEL_TOLERANCE[torch.float32])


def test_past_its_graphs_compiled_decoding_runs_uncompiled_with_a_warning(monkeypatch, caplog, cpp_compiler):
    """A run that would need one more graph than the process may keep decodes uncompiled (one
    warning, eager's logits) instead of failing (Dynamo's hard failure with fullgraph=True)."""
    torch.manual_seed(7)
    small = GPT2(GPT2Config(vocab_size=96, n_ctx=64, n_embd=64, n_layer=2, n_head=4)).eval()
    tokens = torch.tensor([[[5], [9]], [[17], [2]]])  # (steps, B, 1)
    _cached_steps(small, compiled_decode_step(small), tokens)  # at least one graph in the process
    odd = GPT2(GPT2Config(vocab_size=80, n_ctx=32, n_embd=40, n_layer=1, n_head=2)).eval()  # no graph of its own
    eager = _cached_steps(odd, odd.decode_step, tokens)
    monkeypatch.setattr(kernels, "MAX_GRAPHS", 0)
    with caplog.at_level(logging.WARNING, logger="gpt2lab.kernels"):
        logits = _cached_steps(odd, compiled_decode_step(odd), tokens)
    assert torch.equal(logits, eager)
    assert [r.getMessage() for r in caplog.records if r.name == "gpt2lab.kernels"] == [
        "compiled decoding holds 0 graphs in this process already: this run decodes uncompiled"
    ]


# --- gpt2lab's one-query attention kernel --------------------------------------------------------
def _cache_and_query(dtype: torch.dtype, B: int, H: int, L: int, D: int, seed: int):
    """A query (B, H, 1, D) and keys, values (B, H, L, D) sliced from a cache of B + 1 rows (strided)."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, B + 1, H, L, D, generator=g).to(dtype)
    return torch.randn(B, H, 1, D, generator=g).to(dtype), cache[0, :B], cache[1, :B]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,L,D", [(1, 12, 256, 64), (3, 4, 17, 8), (2, 2, 40, 20)])
def test_attention_kernel_equals_sdpa(attention_kernel, dtype, B, H, L, D):
    """Output and logsumexp of one query's attention as fp64 SDPA gives them, for a boolean mask with
    holes (padding) and unused columns at the end, the same mask as 0/-inf, and no mask; rounded
    once to the input dtype (bf16: within half a bf16 step of the magnitude, outputs are < ~3)."""
    q, k, v = _cache_and_query(dtype, B, H, L, D, seed=L)
    keep = torch.rand(B, L, generator=torch.Generator().manual_seed(D)) < 0.6
    keep[:, L // 2 :] = False  # columns not in use yet
    keep[:, 0] = True
    keep = keep[:, None, None, :]  # (B, 1, 1, L)
    additive = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf"))
    atol = 1e-5 if dtype == torch.float32 else 3 * 2**-8  # fp32: sums of ~100 products in another order
    for mask, reference_mask in ((keep, keep), (additive, keep), (None, None)):
        out, lse = attention_kernel(q, k, v, mask, None)
        assert out.dtype == dtype and out.shape == (B, H, 1, D)
        assert lse.dtype == torch.float32 and lse.shape == (B, H, 1)
        qd, kd, vd = q.double(), k.double(), v.double()
        exact = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=reference_mask)
        scores = (qd @ kd.transpose(-1, -2)) / D**0.5  # (B, H, 1, L)
        if reference_mask is not None:
            scores = scores.masked_fill(~reference_mask, float("-inf"))
        torch.testing.assert_close(out.double(), exact, rtol=0, atol=atol)
        torch.testing.assert_close(lse.double(), scores.logsumexp(-1), rtol=1e-6, atol=1e-5)
    out, _ = attention_kernel(q, k, v, keep, 0.5)  # an explicit scale
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=keep,
                                                             scale=0.5)  # fmt: skip
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=atol)


def test_attention_kernel_reads_only_the_columns_in_use(attention_kernel):
    """Keys and values past the last column the mask lets through are never read: NaN there (a
    column not yet written) does not reach the output, as it would through 0 * NaN in SDPA."""
    q, k, v = _cache_and_query(torch.float32, 2, 3, 32, 16, seed=1)
    keep = torch.zeros(2, 1, 1, 32, dtype=torch.bool)
    keep[0, ..., :5] = True
    keep[1, ..., [0, 2, 9]] = True  # a padded row: holes, then its last column in use
    expected, _ = attention_kernel(q, k, v, keep, None)
    k[0, :, 5:], v[0, :, 5:], k[1, :, 10:], v[1, :, 10:] = (float("nan"),) * 4
    out, _ = attention_kernel(q, k, v, keep, None)
    assert torch.equal(out, expected)
    assert torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep).isnan().any()


def test_attention_kernel_names_bad_inputs(attention_kernel):
    q, k, v = _cache_and_query(torch.float32, 1, 2, 8, 4, seed=2)
    with pytest.raises(RuntimeError, match=r"q \(B, H, 1, D\) and k, v \(B, H, L, D\) expected, got \[1, 2, 2, 4\]"):
        attention_kernel(torch.cat([q, q], dim=2), k, v, None, None)
    with pytest.raises(RuntimeError, match="all fp32 or all bf16 expected, got Float, BFloat16 and Float"):
        attention_kernel(q, k.bfloat16(), v, None, None)
    with pytest.raises(RuntimeError, match=r"attn_mask broadcastable to \(B, H, 1, L\) expected, got \[1, 1, 1, 7\]"):
        attention_kernel(q, k, v, torch.ones(1, 1, 1, 7, dtype=torch.bool), None)
    out, lse = attention_kernel(q, k, v, torch.zeros(1, 1, 1, 8, dtype=torch.bool), None)  # nothing to attend to
    assert out.isnan().all() and (lse == float("-inf")).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decoding_attends_with_the_kernel(attention_kernel, cpp_compiler, dtype):
    """Compiled steps of a padded batch run gpt2lab's attention kernel (not the decomposed matmuls
    over the whole cache) and give the eager steps' logits up to rounding."""
    cfg = GPT2Config(vocab_size=96, n_ctx=64, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(6)
    model = GPT2(cfg).eval().to(dtype)
    tokens = torch.tensor([[[5], [9]], [[17], [2]], [[3], [40]]])  # (steps, B, 1)

    def steps(step: Callable[..., torch.Tensor]) -> torch.Tensor:
        return _cached_steps(model, step, tokens, padding=frozenset({(1, 1)}))  # row 1 never attends to column 1

    compiled = compiled_decode_step(model)
    eager = steps(model.decode_step)
    torch.testing.assert_close(steps(compiled), eager, **MODEL_TOLERANCE[dtype])
    ops = _aten_ops(lambda: steps(compiled))
    assert "gpt2lab::decode_attention" in ops


def test_without_the_attention_kernel_compiled_attention_is_decomposed(monkeypatch, caplog):
    """Where the kernel cannot be built, one warning, and the compiled step's attention is the plain
    decomposition (matmuls and a softmax over the whole cache), with the same result."""

    def no_compiler() -> None:
        raise kernels.CompileUnavailable("torch.compile needs a C++ compiler (g++ or clang++ on PATH, or set CXX)")

    monkeypatch.setattr(kernels, "check_compiler", no_compiler)
    kernels._load_decode_attention.cache_clear()
    try:
        q, k, v = _cache_and_query(torch.float32, 1, 2, 8, 4, seed=3)
        keep = torch.tensor([True] * 3 + [False] * 5)[None, None, None, :]
        additive = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))  # what the flash op is given
        with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="gpt2lab.kernels"):
            ops = _aten_ops(lambda: kernels._decode_attention(q, k, v, attn_mask=additive))
            out, _ = kernels._decode_attention(q, k, v, attn_mask=additive)
        assert "gpt2lab::decode_attention" not in ops and "aten::softmax" in ops
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep))
        warnings = [r.getMessage() for r in caplog.records]
        assert warnings == [
            "compiled decoding attends over the whole KV cache: gpt2lab's kernel decode_attention is unavailable "
            "(torch.compile needs a C++ compiler (g++ or clang++ on PATH, or set CXX))"
        ]
    finally:
        kernels._load_decode_attention.cache_clear()  # the next caller loads the real one again


def test_compiled_graphs_compute_tanh_with_a_sigmoid(cpp_compiler):
    """Inductor's pass leaves no tanh in a graph, and compiled tanh GELU and its gradient equal eager's."""
    from torch._inductor.utils import run_and_get_code
    from torch.fx.experimental.proxy_tensor import make_fx

    tanh_as_sigmoid = kernels.inductor_options()["post_grad_custom_post_pass"]
    graph = make_fx(torch.tanh)(torch.randn(4))
    tanh_as_sigmoid(graph.graph)
    graph.recompile()
    targets = {node.target for node in graph.graph.nodes}
    assert torch.ops.aten.tanh.default not in targets and torch.ops.aten.sigmoid.default in targets
    x = torch.linspace(-20, 20, 4001, dtype=torch.float64)
    torch.testing.assert_close(graph(x), torch.tanh(x), rtol=0, atol=1e-15)

    def gelu(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x, approximate="tanh")

    compiled = torch.compile(gelu, options=kernels.inductor_options())
    for dtype, tol in ((torch.float32, {"rtol": 1e-6, "atol": 1e-6}), (torch.bfloat16, TOLERANCE[torch.bfloat16])):
        x = torch.linspace(-8, 8, 1001, dtype=dtype, requires_grad=True)
        grad = torch.linspace(-1, 1, 1001, dtype=dtype)
        (eager_grad,) = torch.autograd.grad(gelu(x), x, grad)
        y, code = run_and_get_code(compiled, x)
        (compiled_grad,) = torch.autograd.grad(y, x, grad)
        assert "tanh" not in "".join(code).lower()  # the forward's kernels
        torch.testing.assert_close(y, gelu(x), **tol)
        torch.testing.assert_close(compiled_grad, eager_grad, **tol)


# --- gpt2lab's whole-step decoding kernel --------------------------------------------------------
@pytest.fixture
def two_threads() -> Iterator[None]:
    """The fused step's threads share its work (chunks of rows taken in turn, each thread's picks merged, barriers
    between the products): its tests run it with two (the suite runs one thread otherwise)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


FUSED_CFG = GPT2Config(vocab_size=96, n_ctx=24, n_embd=64, n_layer=2, n_head=4)


def _lively_model(cfg: GPT2Config, dtype: torch.dtype, seed: int) -> GPT2:
    """A model whose layers all matter: random non-zero biases and layer norms too (GPT-2's init zeroes
    the biases and sets the norms to 1, which would hide a bias or a norm applied at the wrong place)."""
    torch.manual_seed(seed)
    model = GPT2(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.2)
            else:
                p.normal_(0.0, 0.15)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_equals_the_layers_called_one_by_one(fused_step_kernel, two_threads, dtype):
    """The fused step's logits and the keys and values it writes to the cache equal the model's own step
    from the same cache (up to float rounding): one token at the first column, in the middle and at the
    last one, with a position id other than the column. Several tokens (fp32: 6 or 3 a weight load, then
    the rest: 2, 4 and 17), with the logits of the last one or of all of them, give exactly what the same
    tokens give one step each (bf16 on AMX, 2 to 16 tokens: up to rounding, its tiles sum in another
    order), and the layers' logits in fp32 (in bf16 the layers' matmuls over several tokens round
    otherwise). Each row's pick is torch's max."""
    if dtype == torch.bfloat16 and not torch.cpu._is_avx512_bf16_supported():
        pytest.skip("this CPU has no AVX512-BF16: bf16 decoding runs the model's layers one at a time")
    model = _lively_model(FUSED_CFG, dtype, seed=11)
    prompt = torch.tensor([[5, 17, 3, 60, 2]])
    max_len = FUSED_CFG.n_ctx
    with torch.inference_mode(), few_row_kernels(model):
        model.setup_cache(1, max_len)
        model(prompt, start=0)
        before = [block.attn.kv_cache.kv.clone() for block in model.h]
        step = kernels.fused_decode_step(model, batch_size=1)
        assert step is not None
        many = torch.randint(0, FUSED_CFG.vocab_size, (17,), generator=torch.Generator().manual_seed(5)).tolist()
        cases = [([7], 0, 0, 1), ([41], 9, 5, 1), ([95], 23, max_len - 1, 1), ([7, 41], 3, 5, 2),
                 ([7, 41, 95, 3], 1, 5, 1), ([7, 41, 95, 3], 20, 20, 4), (many, 0, 0, 17), (many, 2, 5, 1)]  # fmt: skip
        def run(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
            for block, kv in zip(model.h, before):
                block.attn.kv_cache.kv.copy_(kv)
            return fn(), [block.attn.kv_cache.kv.clone() for block in model.h]

        for tokens, position, column, logit_rows in cases:
            pos = torch.arange(position, position + len(tokens))[None]
            ref, ref_cache = run(lambda: model(torch.tensor([tokens]), pos=pos, start=column)[:, -logit_rows:])
            (logits, tops), cache = run(lambda: step(tokens, position, column, logit_rows))
            assert logits.shape == (1, logit_rows, FUSED_CFG.vocab_size) and logits.dtype == dtype
            assert tops == logits.max(dim=-1).indices[0].tolist()
            if len(tokens) == 1 or dtype == torch.float32:
                torch.testing.assert_close(logits, ref, **MODEL_TOLERANCE[dtype])
                for got, expected in zip(cache, ref_cache):
                    torch.testing.assert_close(got, expected, **MODEL_TOLERANCE[dtype])
            one_by_one, singles_cache = run(lambda: torch.cat(
                [step([t], position + i, column + i)[0] for i, t in enumerate(tokens)], dim=1
            )[:, -logit_rows:])
            if dtype == torch.bfloat16 and torch.ops.gpt2lab.amx_ready() and 2 <= len(tokens) <= 16:
                # an fp32 sum rounded to bf16 at every layer: one rounding flipped (2**-8) moves a logit more
                torch.testing.assert_close(logits, one_by_one, rtol=2e-2, atol=5e-2)
                for got, expected in zip(cache, singles_cache):
                    torch.testing.assert_close(got, expected, **MODEL_TOLERANCE[dtype])
            else:
                assert torch.equal(logits, one_by_one)
                assert all(torch.equal(got, expected) for got, expected in zip(cache, singles_cache))
        model.clear_cache()


def _decode_token_calls(fn: Callable[[], object]) -> int:
    with profile() as prof:
        fn()
    return sum(event.count for event in prof.key_averages() if event.key == "gpt2lab::decode_token")


@pytest.mark.parametrize("prompt_lookup", [0, 3])
def test_one_sequence_decodes_with_the_fused_step_and_gives_the_layers_tokens(fused_step_kernel, prompt_lookup,
                                                                              monkeypatch):
    """Generating for one prompt runs the prompt and each step after it (prompt lookup's checks of several
    tokens too) as a fused step, past the context length too (the context is cut, its last 12 tokens run
    again as a prompt, and decoding goes on), and gives the tokens of the layers called one by one (a forward
    hook keeps generation on that path) and of decoding without a cache."""
    model = _lively_model(FUSED_CFG, torch.float32, seed=12)
    prompt, n = [[5, 17, 3, 5, 17]], 3 * FUSED_CFG.n_ctx
    fed: list[int] = []  # the tokens of each fused step
    step, forward = kernels.FusedDecodeStep.__call__, model.forward
    monkeypatch.setattr(kernels.FusedDecodeStep, "__call__", lambda self, tokens, *args, **kwargs: (
        fed.append(len(tokens)), step(self, tokens, *args, **kwargs))[1])  # fmt: skip
    monkeypatch.setattr(model, "forward", lambda *args, **kwargs: pytest.fail("a layer ran"))
    out = generate(model, prompt, n, prompt_lookup=prompt_lookup)
    monkeypatch.setattr(model, "forward", forward)
    assert fed[0] == 5 and 12 in fed  # the prompt, a cut context's last 12 tokens
    if prompt_lookup:
        assert len(fed) < n and max(fed[1:]) > 1  # checks of guesses, and some held
    else:
        assert len(fed) == n and set(fed[1:]) == {1, 12}  # a step a token after the first
    hook = model.register_forward_hook(lambda *_: None)
    try:
        layered: list[list[int]] = []
        assert _decode_token_calls(lambda: layered.extend(generate(model, prompt, n, prompt_lookup=prompt_lookup))) == 0
    finally:
        hook.remove()
    assert out == layered
    ids = list(prompt[0])
    with torch.inference_mode():
        for _ in range(2 * FUSED_CFG.n_ctx // 3):  # uncached greedy decoding, before the first cut
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out[0][: len(ids) - 5] == ids[5:]


def test_the_fused_step_is_taken_only_where_it_runs_the_model_as_its_layers_do(fused_step_kernel):
    """None (the layers one by one) for a batch, LoRA layers, the classifier's int8 layers or a mix of int8
    and float, a matrix of another dtype, a forward hook or a width the kernel does not take; a step for
    GPT-2's own layers (tied or not) and generation's int8 ones."""
    from gpt2lab.quantize import quantize_int8

    def fused(model: GPT2, batch_size: int = 1) -> kernels.FusedDecodeStep | None:
        model.setup_cache(batch_size, 8)
        try:
            return kernels.fused_decode_step(model, batch_size)
        finally:
            model.clear_cache()

    plain = GPT2(FUSED_CFG).eval()
    assert isinstance(fused(plain), kernels.FusedDecodeStep)
    assert fused(plain, batch_size=2) is None
    lora = GPT2(FUSED_CFG).eval()
    apply_lora(lora, LoRAConfig(rank=2, alpha=2.0, targets=("h.1.mlp.c_fc",)))
    assert fused(lora) is None
    if torch.backends.quantized.engine != "none":
        int8 = GPT2(FUSED_CFG).eval()
        quantize_int8(int8, "decode")
        assert isinstance(fused(int8), kernels.FusedDecodeStep)  # generation's int8 layers
        classifier_int8 = GPT2(FUSED_CFG).eval()
        quantize_int8(classifier_int8, "batch")  # packed for oneDNN only
        assert fused(classifier_int8) is None
        mixed = GPT2(FUSED_CFG).eval()
        quantize_int8(mixed, "decode", skip=lambda name: name == "h.0.mlp.c_fc")
        assert fused(mixed) is None
    untied = GPT2(FUSED_CFG).eval()
    untied.lm_head.weight = nn.Parameter(untied.wte.weight.detach().clone())
    assert isinstance(fused(untied), kernels.FusedDecodeStep)
    assert fused(untied.to(torch.bfloat16).float()) is not None
    untied.lm_head.weight = nn.Parameter(untied.wte.weight.detach().to(torch.bfloat16))
    assert fused(untied) is None  # matrices of another dtype than the activations
    hooked = GPT2(FUSED_CFG).eval()
    hook = hooked.h[1].ln_2.register_forward_pre_hook(lambda *_: None)
    assert fused(hooked) is None
    hook.remove()
    assert isinstance(fused(hooked), kernels.FusedDecodeStep)
    assert fused(GPT2(GPT2Config(vocab_size=96, n_ctx=24, n_embd=40, n_layer=1, n_head=2)).eval()) is None
    assert fused(plain.to(torch.float16)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_steps_pick_is_torchs_max_with_ties_and_nans(fused_step_kernel, two_threads, dtype):
    """The id the fused step returns with its logits is ``logits.max(-1).indices``: among equal largest
    logits the lowest id (whichever thread wrote them), a NaN above any number, the first NaN of several."""
    if dtype == torch.bfloat16 and not torch.cpu._is_avx512_bf16_supported():
        pytest.skip("this CPU has no AVX512-BF16: bf16 decoding runs the model's layers one at a time")
    cfg = GPT2Config(vocab_size=200, n_ctx=8, n_embd=64, n_layer=1, n_head=4)  # lm_head: 4 chunks of 64 rows
    model = _lively_model(cfg, torch.float32, seed=14)
    model.lm_head.weight = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.n_embd))
    model = model.to(dtype)
    head = model.lm_head.weight.data
    row = torch.randn(cfg.n_embd, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.inference_mode():
        model.setup_cache(1, cfg.n_ctx)
        step = kernels.fused_decode_step(model, batch_size=1)
        assert step is not None
        cases = {
            "all equal (zeros)": {},
            "a tie in two threads' chunks": {150: row, 20: row, 90: -row, 199: -row},
            "NaNs": {130: torch.full_like(row, float("nan")), 70: torch.full_like(row, float("nan")), 10: 1e4 * row},
        }
        for name, rows in cases.items():
            head.zero_()
            for i, r in rows.items():
                head[i] = r
            logits, tops = step([7, 3], 0, 0, logit_rows=2)  # the pick of each row
            assert tops == logits.max(dim=-1).indices[0].tolist(), name
        assert tops == [70, 70]  # the first NaN
    model.clear_cache()


SCREEN_CFG = GPT2Config(vocab_size=5000, n_ctx=24, n_embd=64, n_layer=1, n_head=4)  # 3 scans of 2048 ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_head_screen_bounds_every_logit(fused_step_kernel, dtype):
    """The screen's rows are within r2 (|.|_2) and r1 (max) of lm_head's, so a logit is within r2 |h|_2 and
    r1 |h|_1 of the screen's; a matrix with a NaN or an infinity gets no screen."""
    generator = torch.Generator().manual_seed(21)
    weight = (torch.randn(300, 64, generator=generator) * torch.rand(300, 1, generator=generator)).to(dtype)
    weight[7] = 0.0  # a zero row
    q, scale, r2, r1 = kernels.lm_head_screen(weight)
    assert q.dtype == torch.int8 and q.abs().amax(dim=1)[8:].eq(127).all()
    error = weight.double() - q.double() * scale.double()[:, None]
    assert (error.norm(dim=1) <= r2).all() and (error.abs().amax(dim=1) <= r1).all() and r2[7] == 0
    h = torch.randn(64, generator=generator).double() * 30
    gap = (weight.double() @ h - (q.double() @ h) * scale.double()).abs()
    assert (gap <= torch.minimum(r2 * h.norm(), r1 * h.abs().sum())).all()
    weight[3, 5] = float("nan")
    assert kernels.lm_head_screen(weight) == []
    weight[3, 5] = float("-inf")
    assert kernels.lm_head_screen(weight) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_screened_step_gives_the_picks_and_largest_logits_of_the_whole_product(fused_step_kernel, two_threads, dtype):
    """With ``keep``, the fused step reads lm_head whole only for the rows an int8 screen cannot rule out of
    each row's ``keep`` largest logits: those logits are the whole product's bit for bit, the others -inf,
    and the picks and the ``keep`` largest are the same, also where rows differ by less than int8 can tell
    (near-copies of the best row) or are equal (the lowest id wins), for one token and several."""
    if dtype == torch.bfloat16 and not torch.cpu._is_avx512_bf16_supported():
        pytest.skip("this CPU has no AVX512-BF16: bf16 decoding runs the model's layers one at a time")
    model = _lively_model(SCREEN_CFG, torch.float32, seed=15)
    model.lm_head.weight = nn.Parameter(torch.randn(SCREEN_CFG.vocab_size, SCREEN_CFG.n_embd) * 0.15)
    model = model.to(dtype)
    tokens = [5, 17, 3, 60, 2, 9, 40]
    with torch.inference_mode():
        model.setup_cache(1, SCREEN_CFG.n_ctx)
        step = kernels.fused_decode_step(model, batch_size=1)
        assert step is not None
        full, full_tops = step(tokens, 0, 0, logit_rows=7)
        best = int(full[0, -1].float().argmax())
        head = model.lm_head.weight.data
        for i, scale in ((4100, 1 + 2**-7), (150, 1 - 2**-7), (2500, 1.0), (3000, 1.0)):
            head[i] = head[best] * scale  # a little larger, a little smaller, equal (twice: later ids)
        for keep in (1, 5, 50):
            for n, rows in ((1, 1), (7, 1), (7, 7)):
                full, full_tops = step(tokens[:n], 0, 0, logit_rows=rows)
                logits, tops = step(tokens[:n], 0, 0, logit_rows=rows, keep=keep)
                kept = logits.float().isfinite()
                assert tops == full_tops == full.max(dim=-1).indices[0].tolist()
                assert torch.equal(logits[kept], full[kept]) and (logits[~kept].float() == float("-inf")).all()
                assert torch.equal(logits.float().topk(keep).values, full.float().topk(keep).values)
                assert kept.sum() < rows * SCREEN_CFG.vocab_size / 20, "the screen ruled out few rows"
        assert full_tops[-1] == 4100
    model.clear_cache()


def test_screen_keeps_a_best_row_that_int8_underrates_by_nearly_its_whole_margin(fused_step_kernel, two_threads):
    """Two rows whose int8 copies err by almost all their bound, the other way each: the best row's screen value
    0.95 |h|_1 s below the other's (s: the int8 step), its logit above. The screen keeps it."""
    C = SCREEN_CFG.n_embd
    model = _lively_model(SCREEN_CFG, torch.float32, seed=18)
    generator = torch.Generator().manual_seed(19)
    h = torch.randn(C, generator=generator)
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(h)  # the last hidden state is h, whatever the token
    sign = h.sign()
    sign[0] = 0.0  # column 0 holds each row's largest value, 127 steps exactly
    z = torch.randint(-100, 101, (C,), generator=generator).float()
    z[0] = 127.0
    by_size = h.abs().argsort(descending=True)
    share = by_size[: int((h.abs()[by_size].cumsum(0) < 0.95 * h.abs().sum()).sum()) + 1]  # 95% of |h|_1
    up = torch.zeros(C)
    up[share] = sign[share]
    step_size = 0.01
    head = torch.randn(SCREEN_CFG.vocab_size, C, generator=generator) * 0.001
    head[900] = step_size * (z + up - 0.49 * sign)  # int8: z + up, 0.49 s |h|_1 above its logit
    head[3100] = step_size * (z + 0.49 * sign)  # int8: z, 0.49 s |h|_1 below its logit: the best row
    model.lm_head.weight = nn.Parameter(head)
    with torch.inference_mode():
        model.setup_cache(1, SCREEN_CFG.n_ctx)
        step = kernels.fused_decode_step(model, batch_size=1)
        logits, tops = step([3], 0, 0)
        assert tops == [3100] and logits[0, 0, 3100] > logits[0, 0, 900]
        assert step([3], 0, 0, keep=1)[1] == [3100]
    model.clear_cache()


@pytest.mark.parametrize("sampling", [{}, {"prompt_lookup": 3}, {"temperature": 1.0, "top_k": 20},
                                      {"temperature": 0.8, "top_k": 40, "top_p": 0.9}])  # fmt: skip
def test_generation_screens_lm_head_and_gives_the_same_tokens(fused_step_kernel, two_threads, sampling, monkeypatch):
    """Greedy decoding (prompt lookup's checks too) and top-k sampling read few of lm_head's rows whole, and
    give the tokens they give reading all of them (a seed: the same draws), also after lm_head changed in place
    (each run makes its screen)."""
    model = _lively_model(SCREEN_CFG, torch.float32, seed=17)
    prompt, n = [[5, 17, 3, 5, 17]], 40
    steps: list[kernels.FusedDecodeStep] = []
    make = kernels.FusedDecodeStep.__init__
    monkeypatch.setattr(kernels.FusedDecodeStep, "__init__",
                        lambda self, *args: (make(self, *args), steps.append(self))[0])  # fmt: skip

    def run() -> list[list[int]]:
        return generate(model, prompt, n, generator=torch.Generator().manual_seed(0), **sampling)

    screened = run()
    assert 0 < steps[0].rows_read < steps[0].screened * SCREEN_CFG.vocab_size / 20
    head = model.lm_head.weight.data  # changed in place where PyTorch does not count a change
    head.copy_(head.flip(0))
    changed = run()  # screened anew
    monkeypatch.setattr(kernels, "lm_head_screen", lambda weight: [])
    assert changed == run() != screened and steps[1].screened and steps[2].screened == 0
    head.copy_(head.flip(0))
    assert screened == run()


def test_screened_step_reads_lm_head_whole_where_the_screen_does_not_pay_or_cannot_bound(fused_step_kernel, two_threads,
                                                                                         caplog):
    """Where the screen keeps most rows (an lm_head of near-copies of one row), the step stops screening after
    ``SCREEN_TRIAL`` logit rows; a NaN in the hidden state (no bound holds) reads every row, as without it."""
    model = _lively_model(SCREEN_CFG, torch.float32, seed=16)
    base = torch.randn(SCREEN_CFG.n_embd)
    model.lm_head.weight = nn.Parameter(base + 1e-4 * torch.randn(SCREEN_CFG.vocab_size, SCREEN_CFG.n_embd))
    with torch.inference_mode(), caplog.at_level(logging.INFO, logger="gpt2lab.kernels"):
        model.setup_cache(1, SCREEN_CFG.n_ctx)
        step = kernels.fused_decode_step(model, batch_size=1)
        for i in range(kernels.SCREEN_TRIAL):
            assert step.screening
            full = step([i], i, i)
            assert step([i], i, i, keep=1)[1] == full[1]
        assert not step.screening and "kept 100% of its rows in 16 steps" in caplog.text
        model.ln_f.weight.data[3] = float("nan")
        step = kernels.fused_decode_step(model, batch_size=1)
        logits, tops = step([4], 0, 0, keep=1)
        assert tops == [int(logits[0, 0].isnan().nonzero()[0])] and step.rows_read == SCREEN_CFG.vocab_size
    model.clear_cache()


def test_fused_step_kernel_names_bad_inputs(fused_step_kernel):
    model = GPT2(FUSED_CFG).eval()
    model.setup_cache(1, 8)
    step = kernels.fused_decode_step(model, 1)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="room for columns 8 to 8"):
            step([3], 8, 8)
        with pytest.raises(RuntimeError, match="room for columns 6 to 8"):
            step([3, 4, 5], 6, 6)
        with pytest.raises(RuntimeError, match="token 96 out of range"):
            step([3, 96], 0, 0)
        with pytest.raises(RuntimeError, match="positions 22 to 24 or column 0 out of range"):
            step([3, 4, 5], 22, 0)
        with pytest.raises(RuntimeError, match="1 to 32 tokens and logits of 1 to all of them expected, got 0"):
            step([], 0, 0)
        with pytest.raises(RuntimeError, match="got 2 tokens and 3 logit rows"):
            step([3, 4], 0, 0, logit_rows=3)
        with pytest.raises(RuntimeError, match="12 tensors a block"):
            fused_step_kernel(step.params[:-1], step.scales, step.caches, [3], 0, 0, 1, 1e-5, [], 0)
        with pytest.raises(RuntimeError, match="no scales for float matrices expected, got 1 for 9 matrices"):
            fused_step_kernel(step.params, [torch.ones(96)], step.caches, [3], 0, 0, 1, 1e-5, [], 0)
        int8 = [p.to(torch.int8) if p.dim() == 2 and i > 1 else p for i, p in enumerate(step.params)]
        with pytest.raises(RuntimeError, match="one scale vector per int8 matrix expected, got 0 for 9 matrices"):
            fused_step_kernel(int8, [], step.caches, [3], 0, 0, 1, 1e-5, [], 0)
        screen = kernels.lm_head_screen(step.params[-1])
        with pytest.raises(RuntimeError, match="keep 0 \\(all logits\\) to 96 expected, got 97"):
            fused_step_kernel(step.params, [], step.caches, [3], 0, 0, 1, 1e-5, screen, 97)
        with pytest.raises(RuntimeError, match="keep 1 needs lm_head's screen .* got 0 screen tensors"):
            fused_step_kernel(step.params, [], step.caches, [3], 0, 0, 1, 1e-5, [], 1)
        with pytest.raises(RuntimeError, match=r"screen of int8 \(\[96, 64\]\) and 3 fp32 \(96,\) .*Float \[95\]"):
            fused_step_kernel(step.params, [], step.caches, [3], 0, 0, 1, 1e-5, [*screen[:3], screen[3][:-1]], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matvecs_are_the_fused_steps_products_alone(fused_step_kernel, dtype):
    """``gpt2lab::matvecs`` (a benchmark's floor) gives each matrix times its vector, for row counts that
    fill no whole chunk or block, and names inputs it cannot take."""
    if dtype == torch.bfloat16 and not torch.cpu._is_avx512_bf16_supported():
        pytest.skip("this CPU has no AVX512-BF16: the fused step does not run bf16 here")
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(rows, cols, generator=g).to(dtype) for rows, cols in ((96, 64), (203, 32), (7, 128))]
    xs = [torch.randn(w.shape[1], generator=g).to(dtype) for w in ws]
    op = kernels.matvecs_op(ws[0])
    with torch.inference_mode():
        outs = op(ws, xs, [])
        for w, x, out in zip(ws, xs, outs):
            assert out.dtype == dtype
            torch.testing.assert_close(out.double(), w.double() @ x.double(), **TOLERANCE[dtype], check_dtype=False)
        with pytest.raises(RuntimeError, match="in a multiple of 32"):
            op([torch.randn(4, 40).to(dtype)], [torch.randn(40).to(dtype)], [])
        if dtype == torch.float32:  # int8 matrices, their per-row scales applied, against fp32 vectors
            qs = [torch.randint(-127, 128, w.shape, generator=g, dtype=torch.int8) for w in ws]
            scales = [torch.rand(w.shape[0], generator=g) / 100 for w in ws]
            for q, scale, x, out in zip(qs, scales, xs, kernels.matvecs_op(qs[0])(qs, xs, scales)):
                expected = (q.double() * scale.double()[:, None]) @ x.double()
                torch.testing.assert_close(out.double(), expected, **TOLERANCE[dtype])
    assert kernels.matvecs_op(ws[0].to(torch.float16)) is None


def _dequantized(model: GPT2) -> GPT2:
    """A copy of ``model`` whose matrices are their int8 quantization, dequantized (fp32): what int8 weights
    compute with exact fp32 inputs. ``lm_head`` gets its own copy; the embedding ``wte`` stays exact."""
    from gpt2lab.quantize import quantize_weight

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in ref.named_modules():
            if type(module) is nn.Linear:
                q, scale = quantize_weight(module.weight)
                module.weight = nn.Parameter(q.float() * scale[:, None])
    return ref


def test_int8_fused_step_computes_with_the_int8_weights_and_fp32_inputs(fused_step_kernel):
    """On generation's int8 layers the fused step widens each int8 weight to fp32 (the activations stay fp32,
    unlike the layers' own kernels, which quantize them too): its logits and KV cache equal the fp32 layers'
    on the dequantized weights, and generation runs it with those layers' tokens."""
    from gpt2lab.quantize import quantize_int8

    if torch.backends.quantized.engine == "none":
        pytest.skip("this PyTorch build has no int8 kernels")
    model = _lively_model(FUSED_CFG, torch.float32, seed=13)
    int8 = copy.deepcopy(model)
    quantize_int8(int8, "decode")
    ref = _dequantized(model)
    prompt = torch.tensor([[5, 17, 3, 60, 2]])
    with torch.inference_mode():
        ref.setup_cache(1, FUSED_CFG.n_ctx)
        int8.setup_cache(1, FUSED_CFG.n_ctx)
        ref(prompt, start=0)
        for mine, theirs in zip(int8.h, ref.h):
            mine.attn.kv_cache.kv.copy_(theirs.attn.kv_cache.kv)
        step = kernels.fused_decode_step(int8, batch_size=1)
        assert step is not None and all(m.dtype == torch.int8 for m in step.params[4:-2:12] + [step.params[-1]])
        tokens = [41, 7, 60, 3, 88, 12, 50]  # 6 a weight load, then 1
        logits, tops = step(tokens, 5, 5, logit_rows=len(tokens))
        assert tops == logits.max(dim=-1).indices[0].tolist()
        expected = ref(torch.tensor([tokens]), start=5)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        for mine, theirs in zip(int8.h, ref.h):
            torch.testing.assert_close(mine.attn.kv_cache.kv, theirs.attn.kv_cache.kv, rtol=1e-4, atol=1e-4)
    ref.clear_cache()
    int8.clear_cache()
    out: list[list[int]] = []
    assert _decode_token_calls(lambda: out.extend(generate(int8, prompt, 12))) == 12  # the prompt, then 11 steps
    assert out == generate(ref, prompt, 12)
