"""Device names, precision names, their dtypes, autocast, and what this machine can run."""

from __future__ import annotations

import pytest
import torch

from gpt2lab.devices import (
    DTYPES,
    DeviceError,
    autocast,
    check_gpu_count,
    grad_scaler,
    is_out_of_memory,
    native_bf16,
    resolve_device,
    resolve_precision,
)
from gpt2lab.params import PRECISIONS

CPU = torch.device("cpu")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")


def test_every_precision_params_allow_has_a_dtype():
    assert set(DTYPES) | {"auto"} == set(PRECISIONS)
    assert DTYPES["bf16"] is torch.bfloat16 and DTYPES["fp32"] is torch.float32 and DTYPES["fp16"] is torch.float16


def test_autocast_runs_linear_layers_in_bf16_only_for_bf16():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with autocast("bf16"):
        assert layer(x).dtype == torch.bfloat16
    with autocast("bf16", CPU):
        assert layer(x).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert layer(x).dtype == torch.float32


def test_cpu_and_auto_resolve_here():
    assert resolve_device("cpu") == CPU
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else CPU
    assert resolve_device("auto") == expected


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_one_line_naming_the_key(name):
    with pytest.raises(DeviceError) as err:
        resolve_device(name, key="train.device")
    message = str(err.value)
    assert message.startswith(f"train.device: {name} asked for, but ") and "use auto or cpu" in message
    assert "\n" not in message
    with pytest.raises(DeviceError, match="eval.device"):
        check_gpu_count(name, 2, key="eval.device")


def test_a_name_that_is_no_device_is_refused():
    with pytest.raises(DeviceError, match=r"generate.device: invalid value 'gpu'; allowed: auto \| cpu \| cuda"):
        resolve_device("gpu", key="generate.device")


def test_precision_follows_the_cpu():
    assert resolve_precision("auto", CPU) == ("bf16" if native_bf16(CPU) else "fp32")
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(DeviceError) as err:
        resolve_precision("fp16", CPU, key="train.precision")
    assert str(err.value).startswith("train.precision: fp16 runs only on CUDA") and "\n" not in str(err.value)
    assert grad_scaler("bf16", CPU) is None and grad_scaler("fp32", CPU) is None


def test_a_failed_allocation_is_recognised():
    try:
        torch.empty(1 << 62, dtype=torch.uint8)  # 4 EiB: a real allocation failure of the CPU allocator
    except RuntimeError as err:
        assert is_out_of_memory(err)
    else:
        pytest.fail("a 4 EiB allocation succeeded")
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_int8_is_a_cpu_precision():
    assert resolve_precision("int8", CPU) == "int8"
    with autocast("int8"):  # int8 weights run without autocast: activations stay fp32
        assert torch.nn.Linear(8, 8)(torch.randn(2, 8)).dtype == torch.float32
    with pytest.raises(DeviceError) as err:  # refused before anything asks the (absent) GPU
        resolve_precision("int8", torch.device("cuda", 0), key="eval.precision")
    assert str(err.value).startswith("eval.precision: int8 weights run only on a CPU") and "\n" not in str(err.value)
