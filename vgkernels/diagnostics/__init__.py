"""Gradient-flow diagnostics: a fused gradient monitor, BPTT trace reports, Jacobian norms and plots."""

from vgkernels.diagnostics.bptt import (
    TraceReport,
    gradient_horizon,
    last_step_traces,
    plot_step_bounds,
    plot_trace,
    trace_report,
)
from vgkernels.diagnostics.monitor import GradientMonitor
from vgkernels.diagnostics.spectral import spectral_norms

__all__ = [
    "GradientMonitor",
    "TraceReport",
    "gradient_horizon",
    "last_step_traces",
    "plot_step_bounds",
    "plot_trace",
    "spectral_norms",
    "trace_report",
]
