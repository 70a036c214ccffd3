"""Fused gradient statistics: the squared L2 norm and a log10-magnitude histogram of every tensor of a
list, in one pass over the data (``vgk::grad_stats`` in C++ for CPU tensors, ``vgk::grad_stats_triton``
for CUDA tensors). The bins and the histogram's columns are documented in
:mod:`vgkernels.reference.grad_stats`. The ops have no autograd: they read gradients. Their results
are statistics of the values as ``.detach()`` sees them, in every mode: no gradient flows back through
them, forward-mode AD gives them no tangent (a zero tangent under ``torch.func.jvp``), and ``vmap``
raises (no batching rule).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vgkernels.backends import resolve_backend
from vgkernels.reference import grad_stats as reference
from vgkernels.reference.grad_stats import DEFAULT_BINS, HistogramBins

__all__ = ["DEFAULT_BINS", "HistogramBins", "grad_stats"]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def fake_grad_stats(tensors, inv_scale, log10_min, log10_max, bins):
    """Shapes only: float64 [N] and int64 [N, bins + 4] on the tensors' device."""
    n = len(tensors)
    like = tensors[0]
    return like.new_empty(n, dtype=torch.float64), like.new_empty(n, bins + 4, dtype=torch.int64)


torch.library.register_fake("vgk::grad_stats")(fake_grad_stats)


def _check(tensors: Sequence[torch.Tensor], inv_scale: torch.Tensor | None) -> torch.device | None:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"tensors: expected a list or tuple of tensors, got {type(tensors).__name__}")
    device = None
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{i}]: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"tensors[{i}]: expected dtype float32, float64, float16 or bfloat16, got {t.dtype}"
            )
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"tensors[{i}]: expected every tensor on {device}, got one on {t.device}")
    if inv_scale is not None:
        if not isinstance(inv_scale, torch.Tensor):
            raise TypeError(f"inv_scale: expected a tensor or None, got {type(inv_scale).__name__}")
        if inv_scale.numel() != 1 or not torch.is_floating_point(inv_scale):
            raise ValueError(
                "inv_scale: expected a one-element floating-point tensor, got shape "
                f"{tuple(inv_scale.shape)} and dtype {inv_scale.dtype}"
            )
        if device is not None and inv_scale.device != device:
            raise ValueError(f"inv_scale: expected a tensor on {device}, got one on {inv_scale.device}")
    return device


def grad_stats(
    tensors: Sequence[torch.Tensor],
    inv_scale: torch.Tensor | None = None,
    *,
    bins: HistogramBins = DEFAULT_BINS,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of squares and log10-magnitude histogram of every tensor, in one fused pass.

    Args:
        tensors: N tensors of any shape and strides, all on one device; dtype float32, float64, float16
            or bfloat16 (float64 is computed in float64, the others in float32). Tensors may differ in
            dtype and be empty.
        inv_scale: None, or a one-element floating tensor on the same device that multiplies every value
            before anything else (``1 / loss_scale`` reports AMP-scaled gradients unscaled), rounded to
            float32. It is read on the device: no host synchronisation.
        bins: the histogram's bins; by default log10|g| in [-20, 5] in 50 bins of half a decade.
        backend: ``"cpp"``, ``"triton"``, ``"reference"`` or None (see :mod:`vgkernels.backends`).
    Returns:
        ``(sumsq, hist)``: float64 [N], the sums of squares; int64 [N, bins.bins + 4], per tensor the
        counts of zeros, underflow, each bin, overflow (including inf) and NaN. Both on the tensors'
        device (CPU for an empty list).
    """
    device = _check(tensors, inv_scale)
    reference.check_bins(bins.log10_min, bins.log10_max, bins.bins)
    if device is None:  # an empty list
        return (
            torch.zeros(0, dtype=torch.float64),
            torch.zeros(0, bins.num_columns, dtype=torch.int64),
        )
    backend = resolve_backend(backend, device, "grad_stats")
    if inv_scale is not None:  # every backend multiplies by the float32 value, as GradScaler.unscale_ does
        inv_scale = inv_scale.reshape(1).to(torch.float32)
    args = (list(tensors), inv_scale, float(bins.log10_min), float(bins.log10_max), int(bins.bins))
    if backend == "reference":
        return reference.grad_stats(*args)
    with torch.no_grad():  # statistics, not a differentiable function (and the op has no autograd)
        if backend == "cpp":
            return tuple(torch.ops.vgk.grad_stats(*args))
        import vgkernels.triton.grad_stats  # noqa: F401  (registers the Triton op)

        return tuple(torch.ops.vgk.grad_stats_triton(*args))
