"""How fast this machine reads memory at the moment: the yardstick every benchmark prints.

On a shared machine (a VM whose host runs other jobs) a benchmark can run 1.5-2x slower from
one hour to the next, and the libraries compared do not slow down alike: on the 2-core VM these
benchmarks were written on, gpt2lab's int8 classification measured 1.10x ONNX Runtime's int8 on
a quiet hour and 0.68x on a busy one. Reading GPT-2 124M's weights is the cheapest honest
measure of that load, so ``generate.py`` times it in every repeat (its floor) and the other
benchmarks print it at their start and end: compare two runs only when their yardsticks agree.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

from gpt2lab.kernels import CompileUnavailable, bf16_kernel_for, check_compiler, matvecs_op
from gpt2lab.model import GPT2, PRESETS
from gpt2lab.quantize import Int8Linear

READS = 5  # memory idle for a while takes 2-3 passes to read at full speed again: keep the fastest
T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """(seconds, result) of one call of ``fn``."""
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def matrices(model: GPT2) -> list[torch.Tensor]:
    """Every matrix of ``model`` in forward order (12 blocks x 4, then ``lm_head``, tied to ``wte``): the float
    weights, or the int8 ones of generation's int8 layers (``gpt2lab.quantize``, ``workload="decode"``)."""
    return [m.weight if isinstance(m, torch.nn.Linear) else m.int8_weight
            for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]  # fmt: skip


def vectors(model: GPT2) -> list[torch.Tensor]:
    """A random input vector for each of :func:`matrices`, in the activations' dtype (int8 layers: fp32)."""
    dtype = model.wte.weight.dtype
    return [torch.randn(w.shape[1], dtype=dtype) for w in matrices(model)]


Reader = Callable[[list[torch.Tensor]], object]  # reads every matrix once, given one vector each


def readers(model: GPT2) -> list[Reader]:
    """The ways there are to read ``model``'s matrices once, each ``read(vectors)``: ``torch.mv`` one matrix
    at a time (int8: fbgemm's ``linear_dynamic``, what its layers run); in bf16, gpt2lab's matrix-vector
    kernel one at a time (it reads bf16 faster than ``torch.mv``); and where gpt2lab's fused decoding step
    runs, its products alone, all in one call (``gpt2lab::matvecs``: what the fused step reads, with no
    other work between the matrices)."""
    ws = matrices(model)
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    if int8:
        linear_dynamic = torch.ops.quantized.linear_dynamic
        fns: list[Reader] = [lambda xs: [linear_dynamic(x[None], m._packed) for m, x in zip(int8, xs)]]
        scales = [m.scale for m in int8]
    else:
        fns, scales = [lambda xs: [torch.mv(w, x) for w, x in zip(ws, xs)]], []
    if (op := bf16_kernel_for(ws[0])) is not None:
        fns.append(lambda xs: [op(None, w, x) for w, x in zip(ws, xs)])
    if (matvecs := matvecs_op(ws[0])) is not None:
        fns.append(lambda xs: matvecs(ws, xs, scales))
    return fns


@torch.inference_mode()
def weight_read_seconds(read: Reader, xs: list[torch.Tensor]) -> float:
    """Time to read every matrix of a model once with ``read``, in forward order: a matrix-vector product
    per matrix (``xs``: one vector each) and nothing else. The floor under any plain decoding step
    of batch 1, whatever library runs it."""
    t0 = time.perf_counter()
    read(xs)
    return time.perf_counter() - t0


def fastest_way(
    model: GPT2, xs: list[torch.Tensor], reads: int = READS, ways: list[Reader] | None = None, warm: int = 0
) -> tuple[float, Reader]:
    """The fastest of ``reads`` :func:`weight_read_seconds` with each of ``ways`` (default: :func:`readers`),
    each way first reading ``warm`` times untimed, and the way that read it: what memory gives once it is
    read at full speed, by the fastest kernel there is for the model."""
    best: tuple[float, Reader] | None = None
    for read in readers(model) if ways is None else ways:
        for _ in range(warm):
            read(xs)
        seconds = min(weight_read_seconds(read, xs) for _ in range(reads))
        best = (seconds, read) if best is None or seconds < best[0] else best
    assert best is not None, "no way to read the model"
    return best


def fastest_read_seconds(
    model: GPT2, xs: list[torch.Tensor], reads: int = READS, ways: list[Reader] | None = None, warm: int = 0
) -> float:
    """:func:`fastest_way`'s seconds."""
    return fastest_way(model, xs, reads, ways, warm)[0]


@torch.inference_mode()
def sustained_read_seconds(read: Reader, xs: list[torch.Tensor], n: int) -> float:
    """Seconds a read of every matrix takes, on average, over ``n`` reads in a row with ``read``: the floor
    under a plain decoding of ``n`` tokens (which must read the weights ``n`` times), where the fastest
    single read is a burst that memory need not sustain (on a shared machine, 200 reads in a row took from
    10% less to 21% more a read than the fastest of four just before)."""
    t0 = time.perf_counter()
    for _ in range(n):
        read(xs)
    return (time.perf_counter() - t0) / n


class Yardstick:
    """GPT-2 124M's fp32 weights (random) and :meth:`read_ms`, the fastest of ``READS`` reads of them by
    ``torch.mv`` (the same reader in every run, so that yardsticks compare across versions)."""

    def __init__(self) -> None:
        self.model = GPT2(PRESETS["gpt2"]).eval()
        self.xs = vectors(self.model)

    def read_ms(self) -> float:
        return fastest_read_seconds(self.model, self.xs, ways=readers(self.model)[:1]) * 1e3

    @staticmethod
    def line(start_ms: float, end_ms: float) -> str:
        return (
            f"yardstick: GPT-2 124M's fp32 weights read in {start_ms:.1f} ms at the start, {end_ms:.1f} ms at "
            f"the end (fastest of {READS}; a busier machine reads slower; compare runs whose yardsticks agree)"
        )


def compiler_note() -> str | None:
    """None when torch.compile can run here; else why not, printed (the benchmark leaves its compiled rows out)."""
    try:
        check_compiler()
    except CompileUnavailable as err:
        print(f"gpt2lab compiled left out: {err}")
        return str(err)
    return None
