import pytest
import torch

from loradock.adapters.core.device import DeviceError, resolve_device, resolve_dtype


def test_auto_picks_cuda_only_when_available():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_cpu_is_always_available():
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
@pytest.mark.parametrize("requested", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_gpu_is_an_error_not_a_fallback(requested):
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device(requested)


@pytest.mark.parametrize("requested", ["tpu", "gpu", "", "meta"])
def test_unknown_devices_are_rejected_with_the_value(requested):
    with pytest.raises(DeviceError, match=repr(requested) if requested else "device"):
        resolve_device(requested)


@pytest.mark.parametrize(
    ("requested", "expected"),
    [("auto", torch.float32), ("float32", torch.float32), ("bfloat16", torch.bfloat16)],
)
def test_dtype_on_cpu(requested, expected):
    assert resolve_dtype(requested, torch.device("cpu")) is expected


def test_float16_on_cpu_is_refused():
    with pytest.raises(DeviceError, match="float16"):
        resolve_dtype("float16", torch.device("cpu"))


def test_unknown_dtype_is_refused():
    with pytest.raises(DeviceError, match="int8"):
        resolve_dtype("int8", torch.device("cpu"))


@pytest.mark.gpu
def test_auto_dtype_on_cuda_is_half_precision():
    dtype = resolve_dtype("auto", resolve_device("auto"))
    assert dtype in (torch.bfloat16, torch.float16)
