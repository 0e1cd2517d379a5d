"""int8 inference on CPU: per-output-channel int8 weights, swapped into a model the way LoRA is.

:func:`quantize_int8` replaces the plain (and merged LoRA) linear layers of a model with
:class:`Int8Linear`: each weight (out, in) becomes int8 with one fp32 scale per output channel
(symmetric, ``scale = max|w_row| / 127``), packed once for the kernel that runs it. The model
file and ``params.yaml`` are untouched: quantizing GPT-2 124M at load takes ~1.5 s. Everything
else (embeddings, layer norms, attention, the KV cache, biases) stays fp32.

The kernels are PyTorch's dynamic-quantization linears (``quantized::linear_dynamic``): the
int8 weight, plus each input quantized to uint8 on the fly (one scale per call) so the matmul
runs on int8 VNNI/AMX instructions; the result is fp32. Two backends pack the weight
differently, and each wins at one end (2-core AVX-512-VNNI/AMX CPU, torch 2.13, 1 thread, the
machine shared, so min of 7; ms)::

    decoding, 1 row: GPT-2 124M's 48 block matrices + lm_head streamed once (cold)
        fp32 mv 45.3 | bf16 mv 29.2 | fbgemm 15.0 | oneDNN 18.0 | _weight_int8pack_mm (bf16) 24.7
        | onednn.qlinear_pointwise (s8 input quantized in Python) 31.9
    classification, 512 rows (a batch of 32 messages of 16 tokens), one 768 -> 3072 matrix
        fp32 13.3 | bf16 (AMX) 2.10 | fbgemm 4.7 | oneDNN (AMX int8) 1.34 | int8pack 31.1
        | torch._int_mm 2.7

So generation packs for fbgemm (``workload="decode"``) and the classifier for oneDNN
(``"batch"``). The LM head (tied to ``wte``: 50257 x 768, the largest matrix read per token)
gets its own int8 copy when it is quantized; the fp32 ``wte`` still serves the embedding lookup.

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


class Int8Linear(nn.Module):
    """An inference-only linear layer with an int8 weight (per-output-channel scales) and an fp32 bias.

    ``forward``: x (..., in) of any float dtype -> fp32 (..., out). The weight lives only in the
    packed form of one backend (``engine``: ``fbgemm`` or ``onednn``).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, engine: str):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.engine = engine
        q, scale = quantize_weight(weight)
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with _engine(engine), warnings.catch_warnings():
            # torch 2.13 marks quantized tensors as deprecated; the pinned torch still packs them.
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero_points, 0)
            b = None if bias is None else bias.detach().float().contiguous()
            self._packed = torch.ops.quantized.linear_prepack(qweight, b)

    @classmethod
    def from_linear(cls, linear: nn.Linear | LoRALinear, engine: str) -> Int8Linear:
        """Quantize ``linear``'s (merged) weight and keep its bias in fp32."""
        return cls(linear.weight, linear.bias, engine)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight (out, in) as the kernel sees it (int8 x scale, fp32) and the bias (out,)."""
        qweight, bias = torch.ops.quantized.linear_unpack(self._packed)
        return qweight.dequantize(), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out) fp32."""
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float(), self._packed)  # (N, out)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, engine={self.engine}"


def _quantizable(module: nn.Module) -> bool:
    # An unmerged LoRA layer keeps its fp32 branch (training); a merged one is a plain linear.
    return type(module) is nn.Linear or (isinstance(module, LoRALinear) and module.merged)


def quantize_int8(model: nn.Module, workload: str, skip: Callable[[str], bool] = lambda name: False) -> list[str]:
    """Replace every plain (or merged LoRA) linear layer of ``model`` with an :class:`Int8Linear`, in place.

    Args:
        model: switched to eval mode; its float weights of the replaced layers are dropped
            (a weight tied elsewhere, like ``lm_head`` to ``wte``, stays where it is tied).
        workload: ``"decode"`` (a few rows per call: generation) or ``"batch"`` (many rows:
            classification); picks the backend per the module docstring's measurements.
        skip: names (as in ``named_modules``) to leave in float.

    Returns the names of the layers replaced. Raises :class:`Int8UnsupportedError` when the
    CPU lacks the kernels.
    """
    if workload not in ENGINES:
        raise ValueError(f"workload must be one of {sorted(ENGINES)}, got {workload!r}")
    check_int8()
    replaced = []
    for name, module in list(model.named_modules()):
        if name and _quantizable(module) and not skip(name):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, Int8Linear.from_linear(module, ENGINES[workload]))
            replaced.append(name)
    model.eval()
    return replaced
