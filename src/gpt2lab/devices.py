"""Devices and precision: which device a ``device`` name means here, which precisions it runs,
the dtypes behind the precision names and the autocast context for each.

``device`` names: ``auto`` (CUDA when a CUDA device is present, else the CPU), ``cpu``, ``cuda``
(the process's GPU: ``cuda:<local rank>`` under ``torchrun``) and ``cuda:N``. ``precision``
names: ``auto``, ``bf16``, ``fp16``, ``fp32`` and, for inference, ``int8``. ``auto`` follows
the device: bf16 where the hardware has it (CPUs with AVX-512 bf16 or AMX; GPUs of compute
capability 8.0 and up), fp16 with gradient scaling on older GPUs, fp32 on other CPUs. A choice
the hardware cannot run is refused with one line naming the key (:class:`DeviceError`); fp16 is
never run on a CPU (about 200x slower than fp32 there), int8 (CPU kernels, :mod:`gpt2lab.quantize`)
never on a GPU.
"""

from __future__ import annotations

import logging

import torch

from gpt2lab.errors import Gpt2labError
from gpt2lab.params import DEVICE_PATTERN

log = logging.getLogger(__name__)

# The dtype a model is loaded in. int8 loads fp32 and then quantizes the linear weights
# (gpt2lab.quantize); activations, norms, embeddings and the KV cache stay fp32.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}


class DeviceError(Gpt2labError, ValueError):
    """A device or precision this machine cannot run; the message names the key and what it can."""


def _no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this PyTorch is a CPU-only build ({torch.__version__})"
    return f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) finds no CUDA device"


def resolve_device(name: str, *, key: str = "device", local_rank: int = 0) -> torch.device:
    """The ``torch.device`` that ``name`` means on this machine, for the process of ``local_rank``.

    ``auto`` is ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; ``cuda`` is
    ``cuda:<local_rank>``. Raises :class:`DeviceError` (naming ``key``) for CUDA on a machine
    without it, or a GPU index it does not have.
    """
    if not DEVICE_PATTERN.fullmatch(name):
        raise DeviceError(f"{key}: invalid value {name!r}; allowed: auto | cpu | cuda | cuda:N")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"{key}: {name} asked for, but {_no_cuda_reason()}; use auto or cpu")
    index = int(name.partition(":")[2]) if ":" in name else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"{key}: cuda:{index} asked for, but this machine has {count} CUDA device(s) (0-{count - 1})")
    return torch.device("cuda", index)


def check_gpu_count(name: str, processes: int, *, key: str = "device", processes_key: str = "processes") -> None:
    """Raise :class:`DeviceError` when ``processes`` on ``name`` (one GPU each) need more GPUs than there are."""
    device = resolve_device(name, key=key)
    if device.type == "cuda" and processes > torch.cuda.device_count():
        raise DeviceError(
            f"{processes_key}: {processes} processes on {key} {name} need {processes} CUDA devices, but this "
            f"machine has {torch.cuda.device_count()}; lower {processes_key} or use {key}: cpu"
        )


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware (not emulated, which is slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(precision: str, device: torch.device, *, key: str = "precision") -> str:
    """``precision`` as run on ``device``: ``auto`` resolved; one the hardware cannot run is refused.

    ``auto``: bf16 when ``device`` has it natively, else fp16 on a GPU, else fp32. ``fp16`` on a
    CPU, ``int8`` on a GPU and ``bf16`` on a GPU without bf16 raise :class:`DeviceError` naming
    ``key``; ``bf16`` on a CPU without native bf16 runs (emulated, correct, slower), with a warning.
    """
    if precision not in ("auto", *DTYPES):
        raise DeviceError(f"{key}: invalid value {precision!r}; allowed: auto | {' | '.join(DTYPES)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else ("fp16" if device.type == "cuda" else "fp32")
    if precision == "fp16" and device.type == "cpu":
        raise DeviceError(
            f"{key}: fp16 runs only on CUDA (on a CPU it is ~200x slower than fp32); use auto, bf16 or fp32"
        )
    if precision == "int8" and device.type == "cuda":
        raise DeviceError(
            f"{key}: int8 weights run only on a CPU (oneDNN kernels); use device cpu, or auto, bf16 or fp16"
        )
    if precision == "bf16" and not native_bf16(device):
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            raise DeviceError(
                f"{key}: bf16 needs a GPU of compute capability 8.0 or higher; {device} "
                f"({torch.cuda.get_device_name(device)}) is {major}.{minor}: use auto, fp16 or fp32"
            )
        log.warning("%s: this CPU has no native bf16 (AVX-512 bf16 or AMX); bf16 is emulated and slow", key)
    return precision


def autocast(precision: str, device: torch.device | str = "cpu") -> torch.autocast:
    """Autocast to bf16 or fp16 on ``device``'s type for those precisions; a no-op context for ``fp32`` and ``int8``.

    ``precision`` is a resolved one (see :func:`resolve_precision`), never ``auto``.
    """
    enabled = precision in ("bf16", "fp16")
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision] if enabled else torch.bfloat16,
                          enabled=enabled)  # fmt: skip


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 training on CUDA (fp16 gradients underflow without one); else None."""
    if precision == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler(device.type)
    return None


def describe(device: torch.device) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA A100-SXM4-80GB)``: for logs and metrics."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


# How a failed allocation reads on the CPU (PyTorch's allocator; Python's own raises MemoryError).
CPU_OOM_SIGNS = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a failed allocation: CUDA out of memory, or the CPU's."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and any(sign in str(err) for sign in CPU_OOM_SIGNS)
