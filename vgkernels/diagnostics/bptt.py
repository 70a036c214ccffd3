"""Reports on a BPTTTrace (placeholder until it lands)."""

TraceReport = gradient_horizon = plot_trace = trace_report = None
