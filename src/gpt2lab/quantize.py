"""int8 inference on CPU: per-output-channel int8 weights, swapped into a model the way LoRA is.

:func:`quantize_int8` replaces the plain (and merged LoRA) linear layers of a model with
:class:`Int8Linear`: each weight (out, in) becomes int8 with one fp32 scale per output channel
(symmetric, ``scale = max|w_row| / 127``), packed once for the kernel that runs it. The model
file and ``params.yaml`` are untouched: quantizing GPT-2 124M at load takes ~1.5 s. Everything
else (embeddings, layer norms, attention, the KV cache, biases) stays fp32.

The kernels are PyTorch's dynamic-quantization matmuls: the int8 weight, plus each input
quantized to uint8 on the fly (one scale per call) so the matmul runs on int8 VNNI/AMX
instructions; the result is fp32. Two backends pack the weight differently, and each wins at
one end (2-core AVX-512-VNNI/AMX CPU, torch 2.13, 1 thread, the machine shared, so min of 7; ms)::

    decoding, 1 row: GPT-2 124M's 48 block matrices + lm_head streamed once (cold)
        fp32 mv 45.3 | bf16 mv 29.2 | fbgemm 15.0 | oneDNN 18.0 | _weight_int8pack_mm (bf16) 24.7
        | onednn.qlinear_pointwise (s8 input quantized in Python) 31.9
    classification, 512 rows (a batch of 32 messages of 16 tokens), one 768 -> 3072 matrix
        fp32 13.3 | bf16 (AMX) 2.10 | fbgemm 4.7 | oneDNN (AMX int8) 1.34 | int8pack 31.1
        | torch._int_mm 2.7

So generation packs for fbgemm (``workload="decode"``, ``quantized::linear_dynamic``) and the
classifier for oneDNN (``"batch"``, ``onednn::qlinear_pointwise``). With many rows, quantizing the
input costs about as much as the matmul (1024 x 3072 -> 768, 2 threads: ~1.25 ms inside
``linear_dynamic``, 1.75 ms with ``quantize_per_tensor_dynamic`` + ``int_repr``, 1.3 ms to
multiply), so the batch layers quantize it in two cheaper passes (:func:`quantize_input`: 0.76 ms),
which made the classifier's int8 pass ~8% faster. The MLP's tanh-GELU on the (rows, 3072)
activations costs more than its int8 matmul (``F.gelu(approximate="tanh")``: 7.4 ms for 1280 x 3072
fp32, 1 thread, against 1.9 ms for the erf form), so for batches :class:`Int8MLP` is swapped in for
GPT-2's MLP and runs ``c_fc`` + GELU as one oneDNN int8 matmul with GELU applied to its output tile
(1280 rows, 768 -> 3072: 7.9 ms fused, 11.8 ms matmul then ``F.gelu``). The LM head (tied to
``wte``: 50257 x 768, the largest matrix read per token) gets its own int8 copy when it is
quantized; the fp32 ``wte`` still serves the embedding lookup.

Generating for one prompt on a CPU with AVX-512 does not call these layers token by token: the
fused decoding step (:func:`gpt2lab.kernels.fused_decode_step`) reads each decode layer's plain
``int8_weight`` and ``scale`` itself, widening the weights to fp32 against fp32 activations (the
input is not quantized), so those layers keep that matrix beside the packed one (1 byte a weight).

Quality (measured by ``bench/generate.py`` and ``bench/classify.py``; see the README): each
output deviates from fp32 by about ``max|w_row| / 254`` per weight plus the input's rounding,
a relative error of ~1% per layer. A quantized model is for inference only (no autograd, not
saved: its ``state_dict`` no longer holds the quantized weights).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from gpt2lab.errors import Gpt2labError
from gpt2lab.lora import LoRALinear
from gpt2lab.model import MLP

# workload -> the quantized backend whose packing runs it fastest (the table above)
ENGINES = {"decode": "fbgemm", "batch": "onednn"}
_CAPABLE = ("AVX2", "AVX512")  # fbgemm and oneDNN's int8 kernels need at least AVX2


class Int8UnsupportedError(Gpt2labError, RuntimeError):
    """This CPU or PyTorch build lacks the int8 kernels; the message says which precision to use instead."""


def int8_unsupported_reason(engines: Sequence[str], capability: str) -> str | None:
    """Why int8 cannot run with these quantized ``engines`` on a CPU of this ``capability``; None if it can.

    ``engines``: ``torch.backends.quantized.supported_engines``; ``capability``:
    ``torch.backends.cpu.get_cpu_capability()`` (``"AVX512"``, ``"AVX2"``, ``"DEFAULT"``, ...).
    """
    missing = [e for e in sorted(set(ENGINES.values())) if e not in engines]
    if missing:
        return f"this PyTorch build has no {' or '.join(missing)} int8 kernels (it has: {', '.join(engines) or 'none'})"
    if capability not in _CAPABLE:
        return f"the int8 kernels need an x86 CPU with AVX2 or AVX-512; this one reports {capability}"
    return None


def check_int8() -> None:
    """Raise :class:`Int8UnsupportedError` (one line) when this machine cannot run int8."""
    reason = int8_unsupported_reason(torch.backends.quantized.supported_engines, torch.backends.cpu.get_cpu_capability())
    if reason:
        raise Int8UnsupportedError(f"precision int8 is not available: {reason}; use precision bf16 or fp32")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``weight`` (out, in) -> int8 (out, in) and fp32 scales (out,).

    ``weight ~= q * scale[:, None]`` with ``q`` in [-127, 127] and ``scale = max|row| / 127``.
    """
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # (out,) an all-zero row stays 0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
    return q, scale


@contextlib.contextmanager
def _engine(name: str) -> Iterator[None]:
    """The quantized backend that packs weights inside the block (a process-wide torch setting)."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def quantize_input(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """x (N, in) fp32 -> uint8 (N, in), its scale and zero point: one scale for the whole call,
    asymmetric over the range widened to hold 0 (``x ~= (q - zero_point) * scale``), as PyTorch's
    dynamic quantization does.

    Two passes over ``x`` (``aminmax``, then ``quantize_per_tensor``), and the uint8 tensor is a
    view of the quantized tensor's bytes: ``quantize_per_tensor_dynamic`` then ``int_repr`` took
    twice as long (1024 x 3072: 1.75 vs 0.76 ms), half of it in ``int_repr``'s copy.
    """
    lo, hi = (v.item() for v in torch.aminmax(x))
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255 or 1.0  # an all-zero input: any scale is exact
    zero_point = min(255, round(-lo / scale))
    xq = torch.quantize_per_tensor(x.contiguous(), scale, zero_point, torch.quint8)
    return torch.empty(0, dtype=torch.uint8).set_(xq.untyped_storage(), 0, x.shape), scale, zero_point


class Int8Linear(nn.Module):
    """An inference-only linear layer with an int8 weight (per-output-channel scales) and an fp32 bias.

    ``forward``: x (..., in) of any float dtype -> fp32 (..., out). The weight lives in the packed
    form of one backend (``engine``): ``fbgemm`` runs ``quantized::linear_dynamic`` (the input
    quantized inside the kernel); ``onednn`` quantizes the input with :func:`quantize_input` and
    runs ``onednn::qlinear_pointwise``, which applies :attr:`post_op` to each output tile before it
    is written. ``scale`` (out,) and ``bias`` (out,) or None are fp32; ``int8_weight`` (out, in) is
    the plain int8 matrix for gpt2lab's fused decoding step (``fbgemm``, decoding's engine; else None).
    """

    post_op: tuple[str, str] = ("none", "")  # oneDNN's post-op name and algorithm (onednn only)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, engine: str):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.engine = engine
        q, self.scale = quantize_weight(weight)  # (out, in) int8, (out,) fp32
        # Decoding one sequence runs gpt2lab's fused step on the plain int8 weight (gpt2lab.kernels); the
        # packed copy serves prompts, batches and CPUs without AVX-512.
        self.int8_weight = q if engine == ENGINES["decode"] else None
        self._zero_points = torch.zeros(self.out_features, dtype=torch.long)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        with _engine(engine), warnings.catch_warnings():
            # torch 2.13 marks quantized tensors as deprecated (warning once per process); the pinned
            # torch still runs them, so the warning is spent here rather than in the first forward.
            warnings.simplefilter("ignore", UserWarning)
            if engine == "onednn":
                self._packed = torch.ops.onednn.qlinear_prepack(q, None)
                torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.quint8)
            else:
                qweight = torch._make_per_channel_quantized_tensor(q, self.scale.double(), self._zero_points, 0)
                self._packed = torch.ops.quantized.linear_prepack(qweight, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear | LoRALinear, engine: str) -> Int8Linear:
        """Quantize ``linear``'s (merged) weight and keep its bias in fp32."""
        return cls(linear.weight, linear.bias, engine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out) fp32."""
        x2 = x.reshape(-1, self.in_features).float()  # (N, in)
        if self.engine == "onednn":
            xq, x_scale, x_zero_point = quantize_input(x2)
            name, algorithm = self.post_op
            y = torch.ops.onednn.qlinear_pointwise(
                xq, x_scale, x_zero_point, self._packed, self.scale, self._zero_points, self.bias,
                1.0, 0, torch.float32, name, [], algorithm,
            )  # fmt: skip  (N, out)
        else:
            y = torch.ops.quantized.linear_dynamic(x2, self._packed)  # (N, out)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        post = "" if self.post_op[0] == "none" else f", post_op={self.post_op[0]}_{self.post_op[1]}"
        return f"in_features={self.in_features}, out_features={self.out_features}, engine={self.engine}{post}"


class Int8GeluLinear(Int8Linear):
    """``gelu_tanh(x W^T + b)`` with an int8 ``W``: one oneDNN matmul whose output tile gets GELU
    before it is written. For many rows (see the module docstring)."""

    post_op = ("gelu", "tanh")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight, bias, "onednn")


class Int8MLP(nn.Module):
    """GPT-2's MLP for inference on many rows: ``c_proj(gelu(c_fc(x)))`` with GELU fused into ``c_fc``."""

    def __init__(self, mlp: MLP):
        super().__init__()
        self.c_fc = Int8GeluLinear(mlp.c_fc.weight, mlp.c_fc.bias)
        self.c_proj = Int8Linear.from_linear(mlp.c_proj, ENGINES["batch"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., n_embd) -> (..., n_embd) fp32."""
        return self.c_proj(self.c_fc(x))


def _quantizable(module: nn.Module) -> bool:
    # An unmerged LoRA layer keeps its fp32 branch (training); a merged one is a plain linear.
    return type(module) is nn.Linear or (isinstance(module, LoRALinear) and module.merged)


def _fusable(mlp: MLP, name: str, skip: Callable[[str], bool]) -> bool:
    return all(_quantizable(m) and not skip(f"{name}.{n}") for n, m in (("c_fc", mlp.c_fc), ("c_proj", mlp.c_proj)))


def quantize_int8(model: nn.Module, workload: str, skip: Callable[[str], bool] = lambda name: False) -> list[str]:
    """Replace every plain (or merged LoRA) linear layer of ``model`` with an :class:`Int8Linear`, in place.

    Args:
        model: switched to eval mode; its float weights of the replaced layers are dropped
            (a weight tied elsewhere, like ``lm_head`` to ``wte``, stays where it is tied).
        workload: ``"decode"`` (a few rows per call: generation) or ``"batch"`` (many rows:
            classification, where each MLP becomes an :class:`Int8MLP`); picks the backend per
            the module docstring's measurements.
        skip: names (as in ``named_modules``) to leave in float.

    Returns the names of the layers replaced. Raises :class:`Int8UnsupportedError` when the
    CPU lacks the kernels.
    """
    if workload not in ENGINES:
        raise ValueError(f"workload must be one of {sorted(ENGINES)}, got {workload!r}")
    check_int8()
    replaced: list[str] = []
    fused: set[str] = set()  # MLPs swapped whole: their layers are done
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        if not name or parent_name in fused:
            continue
        parent = model.get_submodule(parent_name) if parent_name else model
        if workload == "batch" and type(module) is MLP and _fusable(module, name, skip):
            setattr(parent, child, Int8MLP(module))
            fused.add(name)
            replaced += [f"{name}.c_fc", f"{name}.c_proj"]
        elif _quantizable(module) and not skip(name):
            setattr(parent, child, Int8Linear.from_linear(module, ENGINES[workload]))
            replaced.append(name)
    model.eval()
    return replaced
