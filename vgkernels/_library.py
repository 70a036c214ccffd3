"""Loads the compiled extension ``vgkernels._C``, which registers the C++ ops under ``torch.ops.vgk``."""

from __future__ import annotations

import torch  # noqa: F401  (libtorch must be loaded before the extension)

try:
    from vgkernels import _C

    LOAD_ERROR: Exception | None = None
except ImportError as error:  # the reference backend still works without the build
    _C = None
    LOAD_ERROR = error


def cpp_available() -> bool:
    """True when the compiled C++ kernels were built and loaded."""
    return _C is not None


def require_cpp() -> None:
    """Raise a clear error when the C++ kernels are missing."""
    if _C is None:
        raise RuntimeError(
            "vgkernels: the C++ extension vgkernels._C is not built or failed to load "
            f"({LOAD_ERROR}). Reinstall with `pip install --no-build-isolation -e .`, "
            "or pass backend='reference'."
        )
