"""Gradient-flow diagnostics: monitors, BPTT reports, Jacobian norms and plots."""
