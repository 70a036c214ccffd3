"""Choice of kernel backend: ``"cpp"`` (C++ on CPU tensors), ``"triton"`` (CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1``) and ``"reference"`` (plain eager PyTorch)."""

from __future__ import annotations

import os

import torch

from vgkernels._library import require_cpp

BACKENDS = ("cpp", "triton", "reference")
ENV_VAR = "VGK_BACKEND"


def triton_available() -> bool:
    """True when triton can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    """True when Triton kernels run in the interpreter (CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str | None, device: torch.device, op: str = "vgkernels") -> str:
    """Return the backend to use for tensors on ``device``.

    ``backend=None`` reads ``VGK_BACKEND`` and otherwise picks ``"triton"`` for CUDA tensors and
    ``"cpp"`` for CPU tensors. Raises ``ValueError`` for an unknown name and ``RuntimeError`` for a
    backend that cannot run on ``device``.
    """
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
    if backend is None:
        backend = "triton" if device.type == "cuda" else "cpp"
        if backend == "cpp":
            require_cpp()  # a missing build says so here, not as an unknown operator later
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "cpp":
        require_cpp()
        if device.type != "cpu":
            raise RuntimeError(
                f"{op}: backend 'cpp' runs on CPU tensors only, got a tensor on {device}; "
                "use backend='triton' or None for CUDA tensors"
            )
    elif backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend 'triton' needs the triton package, which is not installed")
        if device.type == "cpu" and not triton_interpreted():
            raise RuntimeError(
                f"{op}: backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is "
                "imported; use backend='cpp' for CPU tensors"
            )
    return backend


def available_backends() -> dict[str, str]:
    """Map each backend to a one-line status for ``python -m vgkernels info``."""
    from vgkernels._library import LOAD_ERROR, cpp_available

    status = {"reference": "usable (plain eager PyTorch, any device)"}
    status["cpp"] = "usable (CPU tensors)" if cpp_available() else f"unavailable: {LOAD_ERROR}"
    if not triton_available():
        status["triton"] = "unavailable: triton is not installed"
    elif torch.cuda.is_available():
        status["triton"] = f"usable (CUDA: {torch.cuda.get_device_name()})"
    elif triton_interpreted():
        status["triton"] = "usable in the interpreter only (TRITON_INTERPRET=1, CPU tensors, slow)"
    else:
        status["triton"] = "installed, but no CUDA device (set TRITON_INTERPRET=1 to interpret on CPU)"
    return status
