"""Gradient statistics in plain eager PyTorch: the oracle for the fused ``vgk::grad_stats`` kernels.

For every tensor g of a list, after multiplying it by an optional ``inv_scale`` (the reciprocal of an
AMP loss scale, so that scaled gradients are reported unscaled), it gives:

- the sum of squares Σ g², in float64 (the squared L2 norm);
- a histogram of log10|g| with fixed bins, as integer counts in ``NUM_COLUMNS`` columns:

  ======================  ===============================================================
  column                  counts the elements with
  ======================  ===============================================================
  ``ZERO`` (0)            g == 0 (log10 undefined)
  ``UNDERFLOW`` (1)       0 < |g| < 10**log10_min
  2 .. 2 + bins - 1       log10|g| in bin k = [lo + k·w, lo + (k+1)·w), w = (hi - lo) / bins;
                          the last bin includes hi, exactly as ``torch.histc`` does
  ``2 + bins``            |g| > 10**log10_max, including ±inf
  ``3 + bins``            NaN
  ======================  ===============================================================

The default bins cover log10|g| in [-20, 5] in 50 bins of half a decade: ``DEFAULT_BINS``.

The values are computed in float32 (float64 for float64 tensors): g is converted, multiplied by
``inv_scale`` (rounded to float32, the dtype of an AMP loss scale), squared and summed in float64. The
bin of a value is that of ``torch.histc`` of ``torch.log10(|g|)`` over [lo, hi]. The kernels take
log10 as log2 times log10(2), so a value within a few ulp of a bin edge may fall into the
neighbouring bin there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HistogramBins:
    """Fixed bins of log10|g|: ``bins`` equal bins over [``log10_min``, ``log10_max``]."""

    log10_min: float = -20.0
    log10_max: float = 5.0
    bins: int = 50

    @property
    def num_columns(self) -> int:
        """Columns of a histogram row: zero, underflow, the bins, overflow, NaN."""
        return self.bins + 4

    @property
    def overflow(self) -> int:
        return self.bins + 2

    @property
    def nan(self) -> int:
        return self.bins + 3

    def edges(self) -> torch.Tensor:
        """float64 [bins + 1]: the bin edges in log10 units."""
        return torch.linspace(self.log10_min, self.log10_max, self.bins + 1, dtype=torch.float64)


DEFAULT_BINS = HistogramBins()
ZERO = 0
UNDERFLOW = 1
FIRST_BIN = 2


def check_bins(log10_min: float, log10_max: float, bins: int) -> None:
    """Raise ValueError unless the bin specification is usable."""
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins: expected a positive int, got {bins!r}")
    if not (log10_min < log10_max) or abs(log10_min) > 300 or abs(log10_max) > 300:
        raise ValueError(
            f"log10_min, log10_max: expected -300 <= log10_min < log10_max <= 300, "
            f"got {log10_min!r}, {log10_max!r}"
        )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 tensors, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scaled_values(g: torch.Tensor, inv_scale: torch.Tensor | None) -> torch.Tensor:
    """g in its compute dtype, multiplied by ``inv_scale`` (a one-element tensor) when given."""
    x = g.detach().to(compute_dtype(g.dtype))
    if inv_scale is not None:
        x = x * inv_scale.reshape(()).to(device=x.device, dtype=torch.float32).to(x.dtype)
    return x


def histogram_row(x: torch.Tensor, spec: HistogramBins = DEFAULT_BINS) -> torch.Tensor:
    """int64 [spec.num_columns]: the log10-magnitude histogram of the values ``x`` (see module doc)."""
    x = x.reshape(-1)
    a = x.abs()
    row = torch.zeros(spec.num_columns, dtype=torch.int64, device=x.device)
    positive = a[a > 0]  # NaN compares False, so NaNs and zeros drop out here
    logs = torch.log10(positive)
    row[ZERO] = (a == 0).sum()
    row[UNDERFLOW] = (logs < spec.log10_min).sum()
    row[FIRST_BIN: FIRST_BIN + spec.bins] = torch.histc(
        logs, bins=spec.bins, min=spec.log10_min, max=spec.log10_max
    ).to(torch.int64)
    row[spec.overflow] = (logs > spec.log10_max).sum()
    row[spec.nan] = torch.isnan(a).sum()
    return row


def grad_stats(
    tensors: Sequence[torch.Tensor],
    inv_scale: torch.Tensor | None = None,
    log10_min: float = DEFAULT_BINS.log10_min,
    log10_max: float = DEFAULT_BINS.log10_max,
    bins: int = DEFAULT_BINS.bins,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of squares and log10-magnitude histogram of every tensor, one at a time.

    Args:
        tensors: N floating-point tensors of any shape, on one device.
        inv_scale: None, or a one-element floating tensor that multiplies every value first.
        log10_min, log10_max, bins: the histogram's bins (see the module doc).
    Returns:
        sumsq: float64 [N]; hist: int64 [N, bins + 4], on the tensors' device.
    """
    check_bins(log10_min, log10_max, bins)
    spec = HistogramBins(log10_min, log10_max, bins)
    device = tensors[0].device if len(tensors) else torch.device("cpu")
    sumsq = torch.zeros(len(tensors), dtype=torch.float64, device=device)
    hist = torch.zeros(len(tensors), spec.num_columns, dtype=torch.int64, device=device)
    for i, g in enumerate(tensors):
        x = scaled_values(g, inv_scale)
        sumsq[i] = x.to(torch.float64).square().sum()
        hist[i] = histogram_row(x, spec)
    return sumsq, hist
