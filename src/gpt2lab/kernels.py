"""Fast CPU kernels for inference on few rows, swapped into a model the way LoRA is.

At inference on CPU, few rows (decoding: one token per sequence; a speculative verify step:
2-16 tokens) are bound by reading the weights, and kernels read them at different speeds.
ms to stream all of GPT-2 124M's matrices once, cold (12 blocks x 4 + lm_head; 2-core
AVX-512/AMX CPU, torch 2.13, 2 threads)::

    rows   fp32: F.linear  oneDNN | bf16: F.linear  W @ x^T
    1            17.4      21.7   |       16.2      16.4     (addmv: fp32 16.7, bf16 11.7)
    2            17.6      25.6   |       18.4      12.9
    4            32.9      27.3   |       17.1      12.2
    8            45.9      30.5   |       16.7      11.8
    16           44.7      35.7   |       16.3      11.2

One bf16 row runs gpt2lab's own kernel where the CPU has AVX512-BF16 (:func:`bf16_addmv_op`,
``csrc/bf16_gemv.cpp``): ATen's bf16 ``addmv`` widens every weight to fp32 before multiplying and
reads ~20% slower than fp32's does, while ``vdpbf16ps`` multiplies bf16 pairs into fp32 sums in
one instruction and 8 rows share each load of the vector: the 49 matrices of 124M in 10.6-12.2
ms against ``addmv``'s 12.0-14.1 (alternating, same process), the pace of fp32's read per byte.

MKL's fp32 GEMM (F.linear) keeps the pace of a GEMV up to 3 rows only; oneDNN's inner product
(``mkldnn::_linear_pointwise``, the op Inductor emits for CPU linears; torch is pinned) slows
down less. In bf16, W @ x^T costs what one row does. Both only pay off for a weight streamed
from memory: below about 1M (fp32) / 512K (bf16) elements F.linear is as fast or faster
(768x768 fp32, 8 rows: F.linear 151 us, oneDNN 196 us).

:class:`FewRowLinear` is an ``nn.Linear`` whose forward takes those paths;
:func:`few_row_kernels` swaps it in for every plain ``nn.Linear`` of a model for the duration
of a ``with`` block (generation does), sharing the parameters, and swaps the originals back.

What is left of a decoding step past its weight reads is the ~15 small ops per block between
the matmuls, each dispatched from Python with caches the weight stream has flushed: ~5 of 25
ms in fp32. :func:`compiled_decode_step` compiles :meth:`GPT2.decode_step` with Inductor into
a C++ wrapper (no Python between ops) and fused kernels for the ops between the matmuls, while
the matrix-vector products stay MKL's ``addmv`` in fp32 and gpt2lab's kernel in bf16 (Inductor
would generate its own, ~40% slower here). A compiled step has the same shapes at every step, so
it attends over the whole preallocated cache and masks the columns not written yet; its attention
runs gpt2lab's kernel (:func:`decode_attention_op`, ``csrc/decode_attention.cpp``), which reads the
keys and values only up to the last column in use: a bf16 step of 124M with a 256-column cache
took ~13.1 ms at any position with attention decomposed into matmuls and a softmax that Inductor
fuses (ATen's CPU flash-attention kernel, Inductor's default, was 6-7% slower still), ~12.6 ms
at column 3 and ~12.9 ms at column 100 with the kernel; 200 tokens alternating 1.3-2% faster.
Per step, fp32 ~75-81% -> 84-96% of the floor, bf16 ~72-74% -> 83-91% (same machine; bf16's
floor is the read by gpt2lab's kernel). Dynamo checks its guards at the first step of a decoding
run only, and the later steps call the compiled graph directly (:class:`CompiledDecodeStep`):
~0.85 ms less a step, 200 tokens ~5% faster in both dtypes. The first step of each cache length
compiles for ~25 s (Inductor's disk cache makes later processes take seconds), so it is a
choice (``generate(..., compile=True)``), not the default.

One sequence decodes faster still without compiling: :func:`fused_decode_step` runs a whole step of
the model as one call of gpt2lab's kernel (:class:`FusedDecodeStep`, ``csrc/decode_token.cpp``),
and generation takes it by default where it applies (one sequence on a CPU with AVX-512, fp32 or bf16,
GPT-2's own layers, or generation's int8 layers: their int8 weights widened to fp32 against fp32
activations, 1 byte a weight read). Its threads start once a step and meet at 5 barriers a block, take the rows of
each product in chunks of 64 from a shared counter (so a thread on a busier core does fewer rows
instead of keeping the other waiting), and apply bias, GELU and residual adds to their rows at once;
each computes the layer norms itself. Measured against its own products alone in one call
(``gpt2lab::matvecs``, the floor ``bench/generate.py`` now reads with), medians of 100 alternating
steps of 124M: bf16 96-98% of that read at column 0, 94-95% at column 100, 92% at column 200 (the
rest is attention's read of the cache); 200 bf16 steps in a row ran at 101-106% of the pace of 200 reads
in a row (three runs; int8: 62-98%, its 60 barriers a token exposed to a core the host takes away).
Generating 200 tokens (``bench/generate.py``, 13 runs over two noisy days): fp32 72-110% and bf16 76-104%
of the fastest single read, 79-97% / 81-97% of 200 reads in a row read just before (see the README).

The same call runs several tokens of the sequence (a short prompt, a prompt-lookup check): each weight
loaded is multiplied with 3 of them (fp32 and int8: 6), and each token's arithmetic is that of a step of its own (the
same logits and cache, bit for bit). Their arithmetic is not free on 2 cores (GPT-2 124M, medians of 5-9):

    tokens   fp32 fused  layers | bf16 fused  on AMX  layers | int8 fused  layers
    1        17.7-19.4   23.9   | 12.0-12.2   12.0    34.0   | 4.4-4.9     9.5
    4-5      21.7-23.2   50.8   | 15.8-20.5   12.7    34.6   | 11.1-11.8   14.4
    8        27.8-30.5   71.3   | 23.4-29.4   13.5    35.8   | 17.0-19.9   16.3
    16       39.6-53.3   69.6   | 36.3-46.2   15.5    34.2   | 24.8-31.9   18.6

(ms; fused: with the logits of the last token, then of all; layers: of all; since then fp32 and int8 weights
are multiplied with 6 tokens a load, 4 rows at a time: int8 8 tokens 15-20% faster, 17.4-20.4 ms against the
layers' 21.4 in one process on a slower hour, 1 token 9.0), so a step takes at most
:func:`fused_max_tokens` and longer prompts run the layers. bf16 on a CPU with AMX (Sapphire Rapids and
later) multiplies 2 to 16 tokens by tiles: each tile instruction 16 weight rows by 32 columns of every
token, where ``vdpbf16ps`` does one row and one token; it sums in another order than the one-token step,
so there the tokens' logits equal their own steps' up to rounding only.

Greedy decoding needs only the largest logit of each row and top-k sampling the k largest: a step asked to
``keep`` k reads lm_head (31% of 124M's matrices) whole only for the rows that may be among them. An int8
copy of it (:func:`lm_head_screen`: 1 byte a weight, a scale a row, made by each run in ~30 ms) bounds
each logit: it is within ``min(r2 |h|_2, r1 |h|_1)`` of the int8 row's, r2 and r1 the norm and the largest
value of that row's error, grown by what the fp32 sums may round; the rows whose upper bound is below the
k-th largest lower bound are -inf, the others computed as the whole product computes them for one token (the
same logits and picks, bit for bit; bf16 logit rows of a check on AMX: those of one-token steps, which the
tiles' sums equal up to rounding). A screened step of 124M reads 39 MB for lm_head instead of 77 (bf16) or 154 (fp32),
plus the rows kept (one or two a token on the bench's models): medians of 30 alternating steps at column
100, fp32 11.6 against 14.3 ms, bf16 7.15 against 8.2, each within 4-5% of its products alone. Where the
screen keeps over :data:`SCREEN_PAYS` of the rows (it then costs more than it saves), a run reads lm_head
whole again.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gpt2lab.errors import Gpt2labError
from gpt2lab.model import GPT2

log = logging.getLogger(__name__)

FEW_ROWS = 16
MAX_GRAPHS = 64  # compiled decoding steps one process keeps (shapes, dtypes, batch sizes, cache lengths)
_CSRC = Path(__file__).with_name("csrc")
_BUILD_LOCK = threading.Lock()
_MIN_STREAMED = {torch.float32: 1 << 20, torch.bfloat16: 1 << 19}  # weight elements
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default  # what SDPA runs on a CPU


class FewRowLinear(nn.Linear):
    """``nn.Linear`` whose inference on 1..``FEW_ROWS`` CPU rows uses the kernel that streams
    the weight fastest (see the module docstring): one row ``addmv``; 2+ rows of a large weight
    ``W @ x^T`` in bf16, oneDNN's linear in fp32 from 4 rows. Equal to ``nn.Linear`` up to float
    rounding; with autograd or autocast on, or on other devices, it is ``nn.Linear``.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FewRowLinear:
        """A ``FewRowLinear`` sharing (not copying) ``linear``'s weight and bias."""
        fast = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        fast.weight, fast.bias = linear.weight, linear.bias
        return fast

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation, skipped on the meta device: :meth:`from_linear` replaces those
        parameters at once, and initialising them there cost ~130 us a layer (~6 ms a ``generate`` call)."""
        if self.weight.device.type != "meta":
            super().reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        rows = x.numel() // x.shape[-1]
        if not (
            1 <= rows <= FEW_ROWS
            and x.dtype in _MIN_STREAMED
            and x.device.type == "cpu"
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")  # autocast casts inside F.linear
        ):
            return super().forward(x)
        weight, bias = self.weight, self.bias  # (out, in), (out,) or None
        if rows == 1:
            row = x.reshape(-1)  # (in,)
            # (Compiled, addmv is traced and the compiled graph's decompositions pick the kernel.)
            if not torch.compiler.is_compiling() and (op := bf16_kernel_for(weight)):
                y = op(bias, weight, row)  # (out,)
            else:
                y = torch.mv(weight, row) if bias is None else torch.addmv(bias, weight, row)  # (out,)
        elif weight.numel() < _MIN_STREAMED[x.dtype]:
            return super().forward(x)
        elif x.dtype == torch.bfloat16:
            cols = x.reshape(rows, -1).t()  # (in, rows)
            y = torch.mm(weight, cols) if bias is None else torch.addmm(bias[:, None], weight, cols)  # (out, rows)
            # (rows, out): stacking the columns copies 2-4x faster than y.t().contiguous() for few rows.
            y = torch.stack(y.unbind(1))
        elif rows > 3 and _ONEDNN:
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, -1), weight, bias, "none", [], "")  # (rows, out)
        else:
            return super().forward(x)
        return y.view(*x.shape[:-1], -1)  # (..., out)


@contextlib.contextmanager
def few_row_kernels(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every plain ``nn.Linear`` of ``model`` is a :class:`FewRowLinear`.

    Parameters are shared, so the state dict, tied weights and memory are unchanged; the
    original modules are put back on exit. Other layers (LoRA, already swapped) are left alone.
    Forward hooks registered on a swapped layer do not run inside the block.
    """
    swapped: list[tuple[nn.Module, str, nn.Linear]] = []
    try:
        for name, module in list(model.named_modules()):
            if name and type(module) is nn.Linear:
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, FewRowLinear.from_linear(module))
                swapped.append((parent, child, module))
        yield model
    finally:
        for parent, child, module in reversed(swapped):
            setattr(parent, child, module)


def bf16_addmv_op() -> Callable[..., torch.Tensor] | None:
    """``gpt2lab::bf16_addmv(bias | None, weight (out, in), vec (in,)) -> (out,)``, bf16 on a CPU
    (``csrc/bf16_gemv.cpp``), built by ``torch.utils.cpp_extension`` at first use (~10 s, then
    cached on disk).

    None where it cannot run here, and callers use ``torch.addmv``: the CPU lacks AVX512-BF16, or
    no C++ compiler or ninja is found, or the build fails (logged once).
    """
    with _BUILD_LOCK:  # one build, whichever thread decodes first
        return _load_bf16_addmv()


def bf16_kernel_for(mat: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    """:func:`bf16_addmv_op` for a bf16 matrix on a CPU, else None (``torch.addmv`` it is)."""
    return bf16_addmv_op() if mat.dtype == torch.bfloat16 and mat.device.type == "cpu" else None


def decode_attention_op() -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """``gpt2lab::decode_attention(q (B, H, 1, D), k, v (B, H, L, D), attn_mask | None, scale | None)
    -> (out (B, H, 1, D), logsumexp (B, H, 1))``, fp32 or bf16 on a CPU (``csrc/decode_attention.cpp``):
    one query's attention that reads the keys and values only up to the last column ``attn_mask``
    lets through. Built like :func:`bf16_addmv_op`; None where it cannot be (logged once).
    """
    with _BUILD_LOCK:
        return _load_decode_attention()


def decode_token_op() -> Callable[..., tuple[torch.Tensor, list[int], int]] | None:
    """``gpt2lab::decode_token(params, scales, caches, tokens, position, column, logit_rows, eps, screen, keep)
    -> (logits (logit_rows, vocab), id of each row's largest logit, lm_head rows read)``: one cached step of a
    whole GPT-2 over 1 to 32 tokens of one sequence (``csrc/decode_token.cpp``; see :class:`FusedDecodeStep`
    and :func:`lm_head_screen`). Built like
    :func:`bf16_addmv_op`; None where it cannot be (logged once).
    """
    with _BUILD_LOCK:
        return _load_decode_token()


@functools.cache
def _load_bf16_addmv() -> Callable[..., torch.Tensor] | None:
    if not torch.cpu._is_avx512_bf16_supported():
        return None
    return _build("bf16_gemv", "bf16_addmv", "bf16 decoding runs torch.addmv")


@functools.cache
def _load_decode_attention() -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    return _build("decode_attention", "decode_attention", "compiled decoding attends over the whole KV cache")


@functools.cache
def _load_decode_token() -> Callable[..., tuple[torch.Tensor, list[int], int]] | None:
    return _build("decode_token", "decode_token", "decoding runs the model's layers one at a time")


def _build(source: str, op: str, otherwise: str) -> Callable[..., Any] | None:
    """Build and load ``csrc/{source}.cpp`` (once per source version: torch caches the build on disk)
    and return its op ``gpt2lab::{op}``, or log why not (``otherwise``: what runs instead) and return None."""
    from torch.utils import cpp_extension

    try:
        check_compiler()
        cpp_extension.verify_ninja_availability()
        log.info("loading gpt2lab's kernel %s (built once, ~10 s, and cached under %s)",
                 op, cpp_extension.get_default_build_root())  # fmt: skip
        # -fopenmp compiles at::parallel_for's OpenMP loop; not linked: the symbols resolve to the
        # OpenMP runtime torch already loaded, so the kernel shares torch's threads (torch.set_num_threads).
        cpp_extension.load(f"gpt2lab_{source}", [str(_CSRC / f"{source}.cpp")], extra_cflags=["-O3", "-fopenmp"],
                           is_python_module=False)  # fmt: skip
    except (CompileUnavailable, RuntimeError, OSError, subprocess.CalledProcessError) as err:
        log.warning("%s: gpt2lab's kernel %s is unavailable (%s)", otherwise, op,
                    str(err).splitlines()[0] if str(err) else type(err).__name__)  # fmt: skip
        return None
    return getattr(torch.ops.gpt2lab, op).default


def fused_decode_step(model: GPT2, batch_size: int) -> FusedDecodeStep | None:
    """``model``'s cached decoding step for one sequence as one call of gpt2lab's kernel
    (:class:`FusedDecodeStep`), or None where that kernel does not run ``model`` as its layers would
    and decoding goes layer by layer: more than one sequence, another device or dtype than a CPU's
    fp32 (AVX-512) or bf16 (AVX512-BF16), layers other than GPT-2's own (LoRA) or generation's int8
    ones (:func:`gpt2lab.quantize.quantize_int8` with ``workload="decode"``, all matrices int8),
    forward hooks (which a fused step would not run), or no C++ compiler.

    Call it after ``model.setup_cache(batch_size, ...)``: the step holds that cache.
    """
    weight = model.wte.weight
    if (
        batch_size != 1
        or not _fused_runs(weight.dtype, weight.device)
        or model.config.n_embd % 32  # the kernel's products take 32 values a load
        or model.config.head_dim > 128  # its attention keeps a head's sums in registers
        or any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
    ):
        return None
    params, scales = [weight, model.wpe.weight], []  # in the kernel's order (csrc/decode_token.cpp)
    layers = [m for b in model.h for m in (b.ln_1, b.attn.c_attn, b.attn.c_proj, b.ln_2, b.mlp.c_fc, b.mlp.c_proj)]
    for layer in [*layers, model.ln_f, model.lm_head]:
        if type(layer) is nn.LayerNorm and layer.eps == model.config.layer_norm_epsilon:
            params += [layer.weight, layer.bias]
        elif type(layer) in (nn.Linear, FewRowLinear) and layer.weight.dtype == weight.dtype:
            params.append(layer.weight)
        elif getattr(layer, "int8_weight", None) is not None and weight.dtype == torch.float32:
            # gpt2lab.quantize's Int8Linear (not imported: the training stage imports this module, and
            # int8 cannot change its outputs): its plain int8 matrix and per-row scales.
            params.append(layer.int8_weight)
            scales.append(layer.scale)
        else:
            return None
        if layer is not model.lm_head and not isinstance(layer, nn.LayerNorm):
            params.append(layer.bias)
    caches = [block.attn.kv_cache.kv if block.attn.kv_cache is not None else None for block in model.h]
    if (
        any(p is None or not p.is_contiguous() or p.dtype not in (weight.dtype, torch.int8) for p in params)
        or len(scales) not in (0, 4 * len(model.h) + 1)  # all matrices int8, or none
        or any(kv is None or kv.dtype != weight.dtype or kv.shape[1] != 1 for kv in caches)
        or (op := decode_token_op()) is None
    ):
        return None
    return FusedDecodeStep(op, params, scales, caches, model.config.layer_norm_epsilon)


def matvecs_op(matrix: torch.Tensor) -> Callable[..., list[torch.Tensor]] | None:
    """``gpt2lab::matvecs(matrices, vectors, scales) -> [matrix @ vector (* scale), ...]`` for matrices like
    ``matrix`` (fp32 or bf16 with ``scales=[]``, or int8 with fp32 vectors and per-row scales): the products of
    :class:`FusedDecodeStep` alone, all in one call (a benchmark's floor); None where the fused step
    cannot run them (see :func:`fused_decode_step`)."""
    if _fused_runs(matrix.dtype, matrix.device) and decode_token_op() is not None:
        return torch.ops.gpt2lab.matvecs.default
    return None


def _fused_runs(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether gpt2lab's fused decoding kernel runs on this device and dtype here: fp32 (and int8 matrices
    with fp32 activations) on a CPU with AVX-512, bf16 on one with AVX512-BF16."""
    cpu_has = {
        torch.float32: torch.cpu._is_avx512_supported,
        torch.int8: torch.cpu._is_avx512_supported,
        torch.bfloat16: torch.cpu._is_avx512_bf16_supported,
    }
    return device.type == "cpu" and dtype in cpu_has and cpu_has[dtype]()


# The most tokens a fused step takes, by its matrices' dtype: up to these it ran faster than GPT-2 124M's layers
# (medians, 2 cores: fp32 16 tokens 40-53 ms, layers 70; bf16 8 without AMX: 23-29 ms, layers 36, and 16 with AMX
# (the most a tile takes): ~16 ms; int8 8, its weights widened once for 6 tokens: 17-20 ms, layers 21).
FUSED_MAX_TOKENS = {torch.float32: 16, torch.bfloat16: 8, torch.int8: 8}
AMX_MAX_TOKENS = 16


def fused_max_tokens(dtype: torch.dtype) -> int:
    """The most tokens a fused step with matrices of ``dtype`` takes here (see :data:`FUSED_MAX_TOKENS`): bf16
    takes :data:`AMX_MAX_TOKENS` where the kernel runs it on AMX (the CPU has it and Linux lets the process use
    its tiles: ``gpt2lab::amx_ready``)."""
    if dtype == torch.bfloat16 and decode_token_op() is not None and torch.ops.gpt2lab.amx_ready():
        return AMX_MAX_TOKENS
    return FUSED_MAX_TOKENS[dtype]


def lm_head_screen(weight: torch.Tensor) -> list[torch.Tensor]:
    """The screen of an fp32 or bf16 lm_head ``weight`` (vocab, C) that lets a fused step read it whole only
    for the logits that may be among the largest (``gpt2lab::lm_head_screen``; see ``Screen`` in
    ``csrc/decode_token.cpp``): ``[q (vocab, C) int8, scale, r2, r1 (vocab,) fp32]``, each row ``w ~ scale * q``
    (its largest value 127) with ``r2 >= |w - scale q|_2`` and ``r1 >= max |w - scale q|``, grown by what the
    kernel's fp32 sums of a row (w's and the screen's) may round; [] for a matrix with a NaN or an infinity (no
    bound holds). ~30 ms for GPT-2 124M's on 2 cores (~vocab * C bytes): each decoding run that screens makes
    its own (a weight changed in place, even through ``.data``, is never screened by a stale copy)."""
    return torch.ops.gpt2lab.lm_head_screen(weight)


# A fused step reads lm_head whole again after SCREEN_TRIAL logit rows in which its int8 screen kept more than
# SCREEN_PAYS of the rows (then the screen costs more than it saves: it reads half of bf16's bytes, a quarter of
# fp32's). Generation screens runs of SCREEN_MIN_TOKENS new tokens or more: making the screen takes ~30 ms for
# GPT-2 124M, what fp32 steps save in ~11 tokens and bf16 ones in ~29.
SCREEN_TRIAL, SCREEN_PAYS, SCREEN_MIN_TOKENS = 16, 0.4, 32


class FusedDecodeStep:
    """``step(tokens, position, column, logit_rows=1, keep=0)``: logits (1, logit_rows, vocab_size) of the tokens after
    the last ``logit_rows`` of ``tokens`` (ids, at most :attr:`max_tokens`) at position ids ``position``, ``position
    + 1``, ..., their keys and values written to KV cache columns ``column``, ``column + 1``, ..., and the id of
    each row's largest logit (``logits.max(-1).indices``: the lowest id among equal ones, a NaN above any number);
    the logits are ``model(torch.tensor([tokens]), pos=..., start=column)[:, -logit_rows:]`` up to float rounding.

    Several tokens (a short prompt, a prompt-lookup check) cost one read of the weights for all of them plus
    their arithmetic (each weight loaded once for 3 tokens, fp32 and int8 for 6), ~1.3 (fp32), ~2 (bf16) or
    ~1.5-1.9 ms (int8) a token more for GPT-2 124M on 2 cores, while the layers' matmuls cost about the same
    for any few tokens: ``max_tokens`` is where the step stops being faster (:func:`fused_max_tokens`). bf16 on
    a CPU with AMX multiplies 2 to 16 tokens by tiles of 16 weight rows, at about the cost of one token. With
    ``keep`` the step reads lm_head whole only for the logits that may be among each row's ``keep`` largest
    (fp32 and bf16 matrices: see the module docstring); ``rows_read / screened``: the rows it read whole a
    logit row.

    One call of ``gpt2lab::decode_token`` (``csrc/decode_token.cpp``) runs the whole step: the CPU
    threads start once and go through the blocks together, meeting where one needs another's
    results, instead of ~15 ops a block each started on its own (see the module docstring). The
    parameters and caches are taken when it is made: make one per decoding run.
    """

    def __init__(self, op: Callable[..., tuple[torch.Tensor, list[int], int]], params: list[torch.Tensor],
                 scales: list[torch.Tensor], caches: list[torch.Tensor], eps: float):  # fmt: skip
        self.op, self.params, self.scales, self.caches, self.eps = op, params, scales, caches, eps
        self.max_tokens = fused_max_tokens(params[-1].dtype)
        self.screening = not scales  # int8 matrices: lm_head is read at 1 byte a weight already
        self.screen: list[torch.Tensor] | None = None  # lm_head's, made at the first call that keeps few logits
        self.screened = self.rows_read = 0  # logit rows screened so far, and lm_head rows read whole for them

    def __call__(
        self, tokens: list[int], position: int, column: int, logit_rows: int = 1, keep: int = 0
    ) -> tuple[torch.Tensor, list[int]]:
        """``keep`` > 0: only the logits that may be among the ``keep`` largest of each row are computed, the
        others are -inf; the picks and the logits computed are those of ``keep=0``, bit for bit (bf16 on AMX, 2-16
        logit rows: those of one-token steps)."""
        if keep and self.screening and self.screen is None:
            self.screen = lm_head_screen(self.params[-1])  # [] where no bound holds
        screen = self.screen if keep and self.screening else []
        logits, tops, read = self.op(self.params, self.scales, self.caches, tokens, position, column, logit_rows,
                                     self.eps, screen, keep if screen else 0)  # fmt: skip
        if screen:
            self.screened, self.rows_read = self.screened + logit_rows, self.rows_read + read
            vocab = self.params[-1].shape[0]
            if self.screened >= SCREEN_TRIAL and self.rows_read > self.screened * vocab * SCREEN_PAYS:
                log.info("lm_head's int8 screen kept %.0f%% of its rows in %d steps: this run reads them all",
                         100 * self.rows_read / (self.screened * vocab), self.screened)  # fmt: skip
                self.screening = False
        return logits.view(1, logit_rows, -1), tops


class CompileUnavailable(Gpt2labError, RuntimeError):
    """torch.compile cannot run a model here: no C++ compiler, or weights it cannot trace (int8)."""


def compiled_decode_step(model: GPT2) -> CompiledDecodeStep:
    """``model.decode_step``, compiled (see the module docstring and :class:`CompiledDecodeStep`):
    same arguments, same logits up to float rounding.

    One graph per model shape, dtype, batch size and cache length (a decoder varies the cache
    length, so it should round it up to few values); a process keeps at most :data:`MAX_GRAPHS`
    (Dynamo's ``recompile_limit`` while the step compiles) and runs steps needing another one
    uncompiled, with a warning. Raises :class:`CompileUnavailable` (see :func:`check_compilable`)
    before anything is compiled.
    """
    check_compilable(model)
    return CompiledDecodeStep(model)


class CompiledDecodeStep:
    """``step(idx, pos, column, key_mask)``: ``model.decode_step`` compiled, for one decoding run.

    A call goes through ``torch.compile``: Dynamo checks its guards (the model's modules and
    parameters, the inputs' shapes and dtypes, grad mode, ...) and compiles or picks a graph. It
    also hands back that graph and its flat inputs (the parameters, the KV caches, the step's
    tensors), and a later call with the very same input tensors (updated in place) runs the graph
    on them directly: Dynamo's ~750 guard checks and frame handling cost ~0.85 ms a step, ~6% of
    a bf16 step of GPT-2 124M. Other input tensors go through ``torch.compile`` again. So the
    model must not change during the run (parameters, layers or KV caches replaced): a decoder
    makes one per run, after setting up its cache.
    """

    def __init__(self, model: GPT2):
        self.model = model
        self._inputs: tuple[torch.Tensor, ...] = ()
        self._graph: Callable[[], Any] | None = None
        self._uncompiled = False  # the process holds MAX_GRAPHS graphs already, none of them for this run

    def __call__(
        self, idx: torch.Tensor, pos: torch.Tensor, column: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits (B, 1, vocab_size); arguments as :meth:`GPT2.decode_step`'s."""
        inputs = (idx, pos, column, key_mask)
        if self._graph is not None and all(a is b for a, b in zip(inputs, self._inputs)):
            return self._graph()[0]  # the graph's outputs: (logits,)
        if self._uncompiled:
            return self.model.decode_step(*inputs)
        _CAPTURED.on, _CAPTURED.graph = True, None
        try:
            with torch._dynamo.config.patch(recompile_limit=MAX_GRAPHS):
                logits = _compiled()(self.model, *inputs)
            self._graph, self._inputs = _CAPTURED.graph, inputs
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            log.warning("compiled decoding holds %d graphs in this process already: this run decodes uncompiled",
                        MAX_GRAPHS)  # fmt: skip
            self._uncompiled = True
            return self.model.decode_step(*inputs)
        finally:
            _CAPTURED.on, _CAPTURED.graph = False, None
        return logits


_CAPTURED = threading.local()  # on: the graph Dynamo calls next is kept in `graph`, with its inputs


def check_compilable(model: nn.Module) -> None:
    """Raise :class:`CompileUnavailable` when ``torch.compile`` (here: Inductor on a CPU) cannot run
    ``model``: layers holding packed int8 weights (``gpt2lab.quantize``), or no C++ compiler."""
    if any(isinstance(value, torch.ScriptObject) for module in model.modules() for value in vars(module).values()):
        raise CompileUnavailable(
            "torch.compile runs float weights (fp32, bf16, fp16); int8 layers hold packed weights that it "
            "cannot trace: run int8 without compiling"
        )
    check_compiler()


def check_compiler() -> None:
    """Raise :class:`CompileUnavailable` when no C++ compiler for Inductor's kernels is found."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as err:  # torch raises its own InvalidCxxCompiler, or OSError, by platform
        raise CompileUnavailable(
            f"torch.compile needs a C++ compiler (g++ or clang++ on PATH, or set CXX): {err}".splitlines()[0]
        ) from None


def inductor_options() -> dict[str, Any]:
    """Inductor settings for gpt2lab's compiled graphs (``torch.compile(..., options=...)``): every
    ``tanh`` is computed as ``2 * sigmoid(2u) - 1`` (see ``_tanh_as_sigmoid_pass``)."""
    return {"post_grad_custom_post_pass": _tanh_as_sigmoid_pass()()}


@functools.cache
def _tanh_as_sigmoid_pass() -> type:
    # Made at first use: torch._inductor takes ~1 s to import, and only compiling needs it.
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class TanhAsSigmoid(CustomGraphPass):
        """An Inductor pass over the graphs after autograd: ``tanh(u)`` becomes ``2 * sigmoid(2u) - 1``.

        The same function, but Inductor's CPU kernels compute ``tanh`` ~2.6x slower than the ``exp``
        of a sigmoid: GPT-2's tanh GELU of a bf16 (960, 3072) activation 5.4 -> 2.1 ms, and a 124M
        LoRA training step spends ~9% of its time in its GELUs and their gradients. The result differs
        from ``tanh``'s by float rounding (~1e-7 absolute in fp32).
        """

        def __call__(self, graph: torch.fx.Graph) -> None:
            aten = torch.ops.aten
            for node in graph.find_nodes(op="call_function", target=aten.tanh.default):
                with graph.inserting_before(node):
                    two_u = graph.call_function(aten.mul.Tensor, (node.args[0], 2.0))
                    sigmoid = graph.call_function(aten.sigmoid.default, (two_u,))
                    twice = graph.call_function(aten.mul.Tensor, (sigmoid, 2.0))
                    tanh = graph.call_function(aten.sub.Tensor, (twice, 1.0))
                for new in (two_u, sigmoid, twice, tanh):
                    new.meta.update(node.meta)  # elementwise: the same shape and dtype as tanh's
                node.replace_all_uses_with(tanh)
                graph.erase_node(node)

        def uuid(self) -> bytes:
            # Part of Inductor's cache keys: this file's hash, so a change here recompiles.
            return get_hash_for_files((__file__,))

    return TanhAsSigmoid


@functools.cache
def _compiled() -> Callable[..., torch.Tensor]:
    from torch._inductor import decomposition, lowering
    from torch._inductor.compile_fx import compile_fx

    aten = torch.ops.aten
    if aten.addmv.default not in lowering.lowerings:
        # addmv as a call to ATen's kernel where it survives decomposition: only in the graphs compiled
        # with the table below (the default table still decomposes it). Registered here, not left to
        # Inductor's implicit fallback, which refuses an op that has a decomposition when CI is set.
        lowering.make_fallback(aten.addmv.default, warn=False, override_decomp=True)
    keep = (aten.addmv.default, aten.mv.default)
    table: dict[Any, Callable] = {op: fn for op, fn in decomposition.select_decomp_table().items() if op not in keep}
    table[aten.mv.default] = _mv_as_addmv  # addmv has a C++ entry point in Inductor's wrapper, mv does not
    table[aten.addmv.default] = _bf16_addmv  # bf16: gpt2lab's kernel (other dtypes: ATen's addmv, as above)
    # Attention of one query: gpt2lab's kernel, which reads the cache only up to its last column in use;
    # otherwise plain matmuls and a softmax that Inductor fuses, not ATen's CPU flash kernel (which
    # Inductor's default keeps): with that the whole step was 6-7% slower here.
    table[_FLASH] = _decode_attention

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        options = {**inductor_options(), "cpp_wrapper": True}
        graph = compile_fx(gm, example_inputs, decompositions=table, config_patches=options)

        def run(*args: Any) -> Any:
            if getattr(_CAPTURED, "on", False):
                _CAPTURED.graph = functools.partial(graph, *args)
            return graph(*args)

        return run

    return torch.compile(GPT2.decode_step, backend=backend, fullgraph=True, dynamic=False)


def _decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, is_causal: bool = False, **kw: Any
) -> Any:
    """ATen's CPU flash attention (same arguments and outputs) as gpt2lab's kernel for one query, else decomposed."""
    if (
        q.shape[2] == 1
        and not dropout_p
        and not is_causal
        and q.dtype in (torch.float32, torch.bfloat16)
        and q.device.type == "cpu"
        and (op := decode_attention_op()) is not None
    ):
        return op(q, k, v, kw.get("attn_mask"), kw.get("scale"))
    from torch._decomp import decomposition_table

    return decomposition_table[_FLASH](q, k, v, dropout_p, is_causal, **kw)


def _mv_as_addmv(mat: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    if (bf16_addmv := bf16_kernel_for(mat)) is not None:
        return bf16_addmv(None, mat, vec)
    return torch.ops.aten.addmv.default(mat.new_zeros(mat.shape[0]), mat, vec, beta=0)


def _bf16_addmv(bias: torch.Tensor, mat: torch.Tensor, vec: torch.Tensor, *, beta: Any = 1, alpha: Any = 1) -> Any:
    if beta == 1 and alpha == 1 and (bf16_addmv := bf16_kernel_for(mat)) is not None:
        return bf16_addmv(bias, mat, vec)
    return NotImplemented  # no decomposition: the op stays ATen's addmv
