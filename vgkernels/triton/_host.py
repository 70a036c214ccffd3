"""Host-side helpers shared by the Triton op modules: launch, device facts, buffers.

Every kernel launch of the package goes through :func:`launch`. Normally it launches; while
:mod:`vgkernels.triton.aot` captures (no GPU needed), it records the launch instead, and the
launchers plan for the captured GPU (its SM count, its fp32 dot precision) on ``meta`` tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch.library import wrap_triton


@dataclasses.dataclass(frozen=True)
class GPU:
    """What a launch plan needs to know of a GPU."""

    name: str
    sms: int
    tf32: bool = False  # the fp32 dot precision the captured launches assume


@dataclasses.dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its grid and its arguments."""

    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


_capturing: list[Launch] | None = None
_captured_gpu: GPU | None = None


@contextlib.contextmanager
def capture(gpu: GPU):
    """Within this block launches are recorded, not run, and plans are made for ``gpu``.

    The launchers then take tensors on the ``meta`` device, so no memory is allocated.
    """
    global _capturing, _captured_gpu
    if _capturing is not None:
        raise RuntimeError("capture: launches are already being captured")
    _capturing, _captured_gpu = [], gpu
    try:
        yield _capturing
    finally:
        _capturing, _captured_gpu = None, None


def capturing() -> bool:
    return _capturing is not None


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` through ``wrap_triton`` (so torch.compile traces it)."""
    if _capturing is not None:
        _capturing.append(Launch(kernel, tuple(grid), args, kwargs))
        return
    wrap_triton(kernel)[tuple(grid)](*args, **kwargs)


def on_gpu(device: torch.device) -> bool:
    """True where launches go to a GPU (or are captured for one); False under the interpreter."""
    return device.type == "cuda" or (_capturing is not None and device.type == "meta")


def sm_count(device: torch.device) -> int | None:
    """The GPU's multiprocessor count, or None under the interpreter."""
    if _capturing is not None and device.type == "meta":
        return _captured_gpu.sms
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return None


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host integers. ``triton.cdiv`` gives the same, but as a constexpr function it
    costs about 1.5 us a call on the host, and a launch plan asks for dozens."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (0 for 0), for host integers, as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


# A launch's grid should keep at least 100 of an H200's 132 SMs busy: this fraction of the SMs.
MIN_BUSY = 100 / 132


def busy_target(sms: int | None) -> int:
    """Programs a launch should have to keep MIN_BUSY of ``sms`` SMs busy (1 under the interpreter)."""
    return math.ceil(MIN_BUSY * sms) if sms else 1


def fp32_dot_tf32(device: torch.device) -> bool:
    """Whether float32 recurrent dots use TF32 tensor cores on this device.

    They follow the switch that torch applies to its own recurrent layers on cuDNN:
    ``torch.backends.cudnn.rnn.fp32_precision`` ("tf32" by default, also set through
    ``torch.backends.cudnn.allow_tf32``), or ``torch.backends.cudnn.allow_tf32`` on a torch without
    it. IEEE float32 otherwise, and always under the interpreter.
    """
    if _capturing is not None and device.type == "meta":
        return _captured_gpu.tf32
    if device.type != "cuda":
        return False
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    value = getattr(rnn, "fp32_precision", None)
    if value in ("tf32", "ieee"):
        return value == "tf32"
    try:  # "none" (inherit) or an older torch: the legacy switch
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # torch refuses to answer when the legacy and new switches disagree
        return False


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
