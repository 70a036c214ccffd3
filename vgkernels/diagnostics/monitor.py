"""GradientMonitor (placeholder until it lands)."""

GradientMonitor = None
