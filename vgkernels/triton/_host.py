"""Host-side helpers shared by the Triton op modules."""

import contextlib

import torch


def device_ctx(device: torch.device):
    """Launch context: the tensor's CUDA device (Triton launches on the current device), else nothing."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic and buffer dtype for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def alloc(shape, dtype: torch.dtype, device: torch.device, fill: float | None) -> torch.Tensor:
    """An uninitialised buffer, or one filled with ``fill`` (tests use NaN to expose unwritten elements)."""
    if fill is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, fill, dtype=dtype, device=device)
