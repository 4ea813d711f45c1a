"""Device and dtype selection: CUDA when present, CPU otherwise."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class DeviceError(ValueError):
    """The requested device or dtype cannot be used on this machine."""


def resolve_device(requested: str) -> torch.device:
    """Turn a setting (`auto`, `cpu`, `cuda`, `cuda:N`) into a usable device.

    `auto` picks the first CUDA device when one is available. Asking for CUDA on a machine without
    it is an error, not a silent fallback: a GPU deployment quietly serving from the CPU is a bug.
    """
    if requested == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as e:
        raise DeviceError(
            f"unknown device {requested!r}; expected auto, cpu, cuda or cuda:N"
        ) from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {requested!r} requested but CUDA is not available here")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {requested!r} requested but only {torch.cuda.device_count()} "
                "CUDA device(s) are visible"
            )
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise DeviceError(f"unsupported device type {device.type!r}; expected cpu or cuda")
    return device


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """Turn a setting (`auto` or a name from DTYPES) into a dtype that fits the device.

    `auto` is float32 on CPU (half precision is slow there and loses accuracy) and bfloat16 on GPUs
    that support it, float16 on older ones.
    """
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if requested not in DTYPES:
        raise DeviceError(f"unknown dtype {requested!r}; expected auto or one of {sorted(DTYPES)}")
    dtype = DTYPES[requested]
    if device.type == "cpu" and dtype is torch.float16:
        raise DeviceError("dtype float16 is not supported on the CPU; use float32 or bfloat16")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
