"""Reports and plots on a :class:`~vgkernels.trace.BPTTTrace`: how far back in time the gradient reaches.

Every measure is taken per layer and direction (row ``l`` of the trace, ``layer * num_directions +
direction``), in processing order: t = 0, 1, ..., T-1 for the forward direction and T-1, ..., 0 for
the reverse one. "Steps back" count against processing order, the way back-propagation travels.

- The **anchor** is where the loss injects the gradient: by default the last processed step whose
  gradient norm is finite and nonzero (t = T-1 of the forward direction for a loss on the last
  output or on every output).
- The **gradient horizon** is the number of steps back from the anchor over which the gradient norm
  stays at or above ``threshold`` (default 1e-3) times its value at the anchor.
- The **decay rate** is the least-squares slope of log10 grad_norm against processing order, over the
  finite, nonzero steps up to the anchor: decades lost per step back (positive: vanishing, negative:
  exploding). For the forward direction it is the slope of log10 grad_norm over t.
- The **ratio** is the gradient norm at the first processed step over that at the anchor.

In float32 a vanishing gradient can underflow to exactly 0: the trace sums its squares in float64, so a
norm reads 0 only once the float32 gradient itself is 0 (below about 1e-38, or 1e-45 with denormals).
Such steps are counted (``zero_steps``), excluded from the decay fit, named in the report's notes, and
drawn as markers on the bottom edge of :func:`plot_trace`'s log-scale axes rather than silently dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vgkernels.trace import BPTTTrace

__all__ = [
    "TraceReport",
    "TraceRow",
    "decay_rate",
    "draw_log_curves",
    "format_number",
    "gradient_horizon",
    "jacobian_stats",
    "line_styles",
    "plot_trace",
    "render_table",
    "trace_report",
]

DEFAULT_THRESHOLD = 1e-3


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def format_number(x: float | int | None, digits: int = 3) -> str:
    """Compact numeric text: exact 0 as ``0``, ints as is, others to ``digits`` significant digits."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if math.isnan(x):
        return "nan"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]], fmt: str = "markdown") -> str:
    """A table as GitHub markdown (``fmt="markdown"``) or aligned plain text (``fmt="text"``).

    Cells that are not strings go through :func:`format_number`.
    """
    if fmt not in ("markdown", "text"):
        raise ValueError(f"fmt must be 'markdown' or 'text', got {fmt!r}")
    cells = [[c if isinstance(c, str) else format_number(c) for c in row] for row in rows]
    for i, row in enumerate(cells):
        if len(row) != len(headers):
            raise ValueError(f"rows[{i}]: expected {len(headers)} cells, one per header, got {len(row)}")
    if fmt == "markdown":
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    line = lambda row: "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
    )
    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(row) for row in cells)])


# ---------------------------------------------------------------------------------------------
# Measures on one gradient-norm curve
# ---------------------------------------------------------------------------------------------


def _as_curves(
    source: BPTTTrace | torch.Tensor, name: str = "source"
) -> tuple[torch.Tensor, int, BPTTTrace | None]:
    """float64 CPU [L, T] gradient norms, the number of directions, and the trace if any.

    ``name`` is the caller's argument, for the error messages.
    """
    if isinstance(source, BPTTTrace):
        grad = source.grad_norm
        if grad is None:
            raise ValueError(
                f"{name}: expected a trace with gradients, got one whose grad_norm is None (no backward "
                "yet): run backward through the tracked module before reporting"
            )
        return grad.detach().to("cpu", torch.float64), source.num_directions, source
    if isinstance(source, torch.Tensor):
        if source.dim() not in (1, 2) or source.shape[-1] < 1:
            raise ValueError(
                f"{name}: a grad_norm tensor must have shape [T] or [L, T] with T >= 1, got "
                f"{tuple(source.shape)}"
            )
        return source.detach().to("cpu", torch.float64).reshape(-1, source.shape[-1]), 1, None
    raise TypeError(f"{name}: expected a BPTTTrace or a grad_norm tensor, got {type(source).__name__}")


def _processing_order(curve: torch.Tensor, reverse: bool) -> torch.Tensor:
    return curve.flip(0) if reverse else curve


def _anchor(g: torch.Tensor, anchor: int | None, reverse: bool) -> int | None:
    """Index of the anchor in processing order (None when no step carries a usable gradient)."""
    T = g.shape[0]
    if anchor is not None:
        if not -T <= anchor < T:
            raise ValueError(f"anchor must be a time step in [0, {T}), got {anchor}")
        t = anchor % T
        return T - 1 - t if reverse else t
    usable = torch.nonzero(torch.isfinite(g) & (g > 0)).flatten()
    return int(usable[-1]) if usable.numel() else None


def _horizon(g: torch.Tensor, a: int | None, threshold: float) -> tuple[int, bool]:
    if a is None:
        return 0, False
    back = g[: a + 1].flip(0)  # back[k] = k steps before the anchor
    below = ~(back >= threshold * back[0])  # NaN counts as lost
    lost = torch.nonzero(below).flatten()
    if lost.numel() == 0:
        return a, True
    return int(lost[0]) - 1, False


def _slope(g: torch.Tensor, a: int | None) -> float:
    if a is None:
        return math.nan
    part = g[: a + 1]
    keep = torch.isfinite(part) & (part > 0)
    if int(keep.sum()) < 2:
        return math.nan
    x = torch.nonzero(keep).flatten().to(torch.float64)
    y = part[keep].log10()
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def _direction(index: int, num_directions: int) -> bool:
    return num_directions == 2 and index % 2 == 1


def _per_curve(source: BPTTTrace | torch.Tensor, anchor: int | None, measure) -> object:
    """``measure(curve in processing order, anchor index)`` per layer and direction; a bare value
    for a 1-D tensor."""
    curves, dirs, _ = _as_curves(source)
    out = []
    for i, curve in enumerate(curves):
        reverse = _direction(i, dirs)
        g = _processing_order(curve, reverse)
        out.append(measure(g, _anchor(g, anchor, reverse)))
    return out[0] if isinstance(source, torch.Tensor) and source.dim() == 1 else out


def gradient_horizon(
    source: BPTTTrace | torch.Tensor, threshold: float = DEFAULT_THRESHOLD, *, anchor: int | None = None
) -> int | list[int]:
    """Steps back from the anchor over which grad_norm stays >= ``threshold`` times its anchor value.

    Args:
        source: a BPTTTrace after backward (one value per layer and direction), or a grad_norm
            tensor [T] or [L, T] read in the forward direction.
        threshold: the fraction of the anchor's gradient that counts as still reaching.
        anchor: time step of the loss; ``None``: the last processed step with a finite, nonzero norm.
    Returns:
        an int for a [T] tensor, else a list of L ints. A horizon equal to the number of processed
        steps before the anchor means the gradient never fell below the threshold.
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    return _per_curve(source, anchor, lambda g, a: _horizon(g, a, threshold)[0])


def decay_rate(source: BPTTTrace | torch.Tensor, *, anchor: int | None = None) -> float | list[float]:
    """Decades of gradient norm lost per step back in time (slope of log10 grad_norm, processing order).

    Fit by least squares on the finite, nonzero steps up to the anchor; ``nan`` with fewer than two.

    Args:
        source, anchor: as :func:`gradient_horizon`.
    Returns:
        a float for a [T] tensor, else a list of L floats.
    """
    return _per_curve(source, anchor, _slope)


def jacobian_stats(trace: BPTTTrace) -> list[dict[str, float]]:
    """Per layer and direction: mean, min, max of the step Jacobian's Frobenius norm, and the
    fraction of steps where it is below 1 (steps no sample reaches are left out).

    The Frobenius norm bounds the spectral norm from above, so a norm below 1 at every step proves
    that the gradient vanishes; a norm above 1 proves nothing by itself.
    """
    if not isinstance(trace, BPTTTrace):
        raise TypeError(f"trace must be a BPTTTrace, got {type(trace).__name__}")
    jac = trace.jacobian_norm.detach().to("cpu", torch.float64)
    alive = trace.valid_mask().any(1).cpu()
    stats = []
    for row in jac:
        vals = row[alive]
        if vals.numel() == 0:
            stats.append({"mean": math.nan, "min": math.nan, "max": math.nan, "frac_below_1": math.nan})
            continue
        stats.append(
            {
                "mean": float(vals.mean()),
                "min": float(vals.min()),
                "max": float(vals.max()),
                "frac_below_1": float((vals < 1).to(torch.float64).mean()),
            }
        )
    return stats


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


@dataclass
class TraceRow:
    """The measures of one layer and direction; see the module docstring for their definitions.

    Attributes:
        label: e.g. ``"layer 0"``, ``"layer 1 reverse"``.
        anchor_t: time step of the anchor (``None`` when no step has a usable gradient).
        grad_anchor, grad_first: grad_norm at the anchor and at the first processed step.
        ratio: grad_first / grad_anchor (0 when the first step underflowed).
        horizon: steps back; ``horizon_full`` says it reached the first processed step.
        decay_rate: decades per step back.
        zero_steps: steps up to the anchor whose grad_norm is exactly 0 (float32 underflow).
        zero_span: (first t, last t) of the zeros when they are one run that starts at the first
            processed step (the usual underflow pattern), else ``None``.
        nonfinite_steps: steps with an inf or nan grad_norm.
        jac_mean, jac_min, jac_max, jac_frac_below_1: :func:`jacobian_stats`.
    """

    label: str
    layer: int
    direction: int
    anchor_t: int | None
    grad_anchor: float
    grad_first: float
    ratio: float
    horizon: int
    horizon_full: bool
    decay_rate: float
    zero_steps: int
    zero_span: tuple[int, int] | None
    nonfinite_steps: int
    jac_mean: float
    jac_min: float
    jac_max: float
    jac_frac_below_1: float


_HEADERS = (
    "layer",
    "grad at loss",
    "grad at first step",
    "ratio first/loss",
    "horizon (steps)",
    "decay (decades/step)",
    "zero steps",
    "mean ‖J‖_F",
    "min ‖J‖_F",
    "max ‖J‖_F",
)


@dataclass
class TraceReport:
    """Gradient-flow summary of one BPTTTrace, one :class:`TraceRow` per layer and direction.

    ``str(report)`` is a plain-text table with notes; :meth:`to_markdown` gives the same as markdown.

    Attributes:
        name: what the trace is of (shown in the heading).
        mode, seq_len, batch_size: from the trace.
        threshold: the horizon's fraction.
        rows: the measures.
        trace: the BPTTTrace measured (for plotting it next to others).
    """

    name: str
    mode: str
    seq_len: int
    batch_size: int
    threshold: float
    rows: list[TraceRow] = field(default_factory=list)
    trace: BPTTTrace | None = field(default=None, repr=False, compare=False)

    @property
    def underflow(self) -> bool:
        """True when some step's gradient norm is exactly 0."""
        return any(r.zero_steps for r in self.rows)

    def table_rows(self) -> list[list[object]]:
        """The table's cells, one list per row, in the order of :meth:`headers`."""
        return [
            [
                r.label,
                r.grad_anchor,
                r.grad_first,
                r.ratio,
                (f">= {r.horizon}" if r.horizon_full else str(r.horizon)),
                r.decay_rate,
                r.zero_steps,
                r.jac_mean,
                r.jac_min,
                r.jac_max,
            ]
            for r in self.rows
        ]

    @staticmethod
    def headers() -> tuple[str, ...]:
        """Column titles of :meth:`table_rows`."""
        return _HEADERS

    def notes(self) -> list[str]:
        """Sentences on underflow, non-finite values and the horizon threshold."""
        out = [
            f"Horizon: steps back from the loss over which the gradient norm stays >= "
            f"{format_number(self.threshold)} of its value at the loss."
        ]
        for r in self.rows:
            if r.zero_steps:
                where = f" (t = {r.zero_span[0]} ... {r.zero_span[1]})" if r.zero_span else ""
                out.append(
                    f"{r.label}: the gradient norm is exactly 0 at {r.zero_steps} of {self.seq_len} "
                    f"steps{where}. A float32 gradient below about 1e-38 (1e-45 with denormals) "
                    f"underflows to 0; a dead ReLU path also gives 0. The true ratio is then smaller "
                    f"than float32 can show. These steps are left out of the decay fit and marked on "
                    f"the plot."
                )
            if r.nonfinite_steps:
                out.append(f"{r.label}: {r.nonfinite_steps} steps have a non-finite gradient norm (inf/nan).")
        return out

    def _render(self, fmt: str) -> str:
        table = render_table(self.headers(), self.table_rows(), fmt)
        head = f"{self.name} ({self.mode}, T = {self.seq_len}, B = {self.batch_size})"
        notes = self.notes()
        if fmt == "markdown":
            return "\n".join([f"**{head}**", "", table, "", *(f"- {n}" for n in notes)])
        return "\n".join([head, table, *notes])

    def to_markdown(self) -> str:
        """A heading, the markdown table and the notes as a list."""
        return self._render("markdown")

    def to_text(self) -> str:
        """A heading, an aligned text table and the notes."""
        return self._render("text")

    def __str__(self) -> str:
        return self.to_text()


def trace_report(
    trace: BPTTTrace,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    anchor: int | None = None,
    name: str | None = None,
) -> TraceReport:
    """Measure a BPTTTrace after backward: ratio, horizon, decay rate, underflow and Jacobian norms.

    Args:
        trace: the module's ``.trace`` after a backward.
        threshold: horizon fraction (default 1e-3).
        anchor: time step of the loss; ``None`` finds it (see the module docstring).
        name: heading of the report; default the trace's mode.
    Returns:
        a :class:`TraceReport`.
    Raises:
        TypeError: not a BPTTTrace. ValueError: no gradients in the trace yet, or a bad threshold.
    """
    if not isinstance(trace, BPTTTrace):
        raise TypeError(f"trace must be a BPTTTrace, got {type(trace).__name__}")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    curves, dirs, _ = _as_curves(trace, "trace")
    jac = jacobian_stats(trace)
    T = trace.seq_len
    rows = []
    for i, curve in enumerate(curves):
        reverse = _direction(i, dirs)
        g = _processing_order(curve, reverse)
        a = _anchor(g, anchor, reverse)
        horizon, full = _horizon(g, a, threshold)
        upto = g[: a + 1] if a is not None else g
        zeros = int((upto == 0).sum())
        prefix = int(torch.cumprod(upto == 0, 0).sum())  # leading zeros in processing order
        span = None
        if zeros and prefix == zeros:
            span = (T - 1, T - prefix) if reverse else (0, prefix - 1)
        grad_anchor = float(g[a]) if a is not None else 0.0
        grad_first = float(g[0])
        layer, direction = divmod(i, dirs)
        rows.append(
            TraceRow(
                label=f"layer {layer}" + (" reverse" if direction else ""),
                layer=layer,
                direction=direction,
                anchor_t=None if a is None else (T - 1 - a if reverse else a),
                grad_anchor=grad_anchor,
                grad_first=grad_first,
                ratio=grad_first / grad_anchor if grad_anchor > 0 else math.nan,
                horizon=horizon,
                horizon_full=full,
                decay_rate=_slope(g, a),
                zero_steps=zeros,
                zero_span=span,
                nonfinite_steps=int((~torch.isfinite(curve)).sum()),
                jac_mean=jac[i]["mean"],
                jac_min=jac[i]["min"],
                jac_max=jac[i]["max"],
                jac_frac_below_1=jac[i]["frac_below_1"],
            )
        )
    return TraceReport(
        name=name or trace.mode,
        mode=trace.mode,
        seq_len=T,
        batch_size=trace.batch_size,
        threshold=threshold,
        rows=rows,
        trace=trace,
    )


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------


def line_styles(n: int) -> list[dict]:
    """``n`` distinct matplotlib line styles (colour cycles first, then the dash pattern)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    dashes = ("-", "--", "-.", ":")
    return [{"color": cmap(k % 10), "linestyle": dashes[(k // 10) % 4]} for k in range(n)]


def _series(traces: Mapping[str, BPTTTrace], what: str) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, trace in traces.items():
        if not isinstance(trace, BPTTTrace):
            raise TypeError(f"traces[{name!r}] must be a BPTTTrace, got {type(trace).__name__}")
        if what == "grad":
            curves = _as_curves(trace, f"traces[{name!r}]")[0]
        else:
            curves = trace.jacobian_norm.detach().to("cpu", torch.float64)
        for i, curve in enumerate(curves):
            label = name
            if curves.shape[0] > 1:
                layer, direction = divmod(i, trace.num_directions)
                label += f" (layer {layer}{' reverse' if direction else ''})"
            out.append((label, curve))
    return out


def draw_log_curves(
    ax, series: Sequence[tuple[str, torch.Tensor]], styles: Sequence[dict] | None = None, *, start: int = 0
) -> int:
    """Draw named 1-D curves on a matplotlib axis with a log y scale, losing no value.

    Positive values become lines. Exact zeros, which a log axis cannot show, become ▼ markers in a
    band kept free of data at the bottom of the axis, one row per curve, in the curve's colour;
    inf/nan become × markers on the top edge.

    Args:
        ax: a matplotlib Axes.
        series: (label, values [N]) pairs; value i is drawn at x = start + i.
        styles: one dict of ``Axes.plot`` keywords per series (needs ``color``); default
            :func:`line_styles`.
        start: x of the first value.
    Returns:
        how many zeros were drawn.
    """
    from matplotlib.patches import Rectangle
    from matplotlib.transforms import blended_transform_factory

    styles = list(styles) if styles is not None else line_styles(len(series))
    if len(styles) != len(series):
        raise ValueError(f"styles must have one entry per series ({len(series)}), got {len(styles)}")
    edge = blended_transform_factory(ax.transData, ax.transAxes)
    curves = [(label, curve.detach().to("cpu", torch.float64)) for label, curve in series]
    positives = []
    for (label, curve), style in zip(curves, styles, strict=True):
        x = (torch.arange(curve.shape[0]) + start).numpy()
        ok = torch.isfinite(curve) & (curve > 0)
        positives.append(curve[ok])
        ax.plot(x, torch.where(ok, curve, math.nan).numpy(), linewidth=1.6, label=label, **style)
        bad = (~torch.isfinite(curve)).numpy()
        if bad.any():
            ax.plot(
                x[bad],
                [0.985] * int(bad.sum()),
                marker="x",
                markersize=5,
                color=style["color"],
                linestyle="none",
                transform=edge,
                clip_on=False,
            )
    ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    with_zeros = [k for k, (_, curve) in enumerate(curves) if (curve == 0).any()]
    if not with_zeros:
        return 0
    values = torch.cat(positives)
    band = 0.1  # bottom fraction of the axis reserved for the zero markers
    if values.numel():
        lo, hi = float(values.min().log10()), float(values.max().log10())
        top = hi + 0.05 * max(hi - lo, 1.0)
        ax.set_ylim(10 ** (lo - band * (top - lo) / (1 - band)), 10**top)
    drawn = 0
    for j, k in enumerate(with_zeros):
        curve = curves[k][1]
        x = (torch.arange(curve.shape[0]) + start).numpy()
        zero = (curve == 0).numpy()
        y = 0.015 + 0.065 * j / max(len(with_zeros) - 1, 1)
        ax.plot(
            x[zero],
            [y] * int(zero.sum()),
            marker="v",
            markersize=3.5,
            color=styles[k]["color"],
            linestyle="none",
            transform=edge,
            clip_on=False,
        )
        drawn += int(zero.sum())
    ax.add_patch(Rectangle((0, 0), 1, band, transform=ax.transAxes, color="0.5", alpha=0.1, lw=0, zorder=0))
    ax.text(1.005, band / 2, "0", transform=ax.transAxes, ha="left", va="center", fontsize=9, color="0.3")
    return drawn


def plot_trace(
    trace: BPTTTrace | Mapping[str, BPTTTrace],
    path: str | Path,
    *,
    title: str | None = None,
    jacobian: bool = True,
    styles: Mapping[str, dict] | None = None,
) -> Path:
    """Draw grad_norm over t on a log scale, one line per trace, layer and direction, and save a PNG.

    Steps whose gradient norm is exactly 0 (float32 underflow) cannot sit on a log axis: they are
    drawn as ▼ markers on the bottom edge in the line's colour and named in the legend, so they are
    visible, not dropped. Non-finite steps are drawn as × on the top edge.

    Args:
        trace: one BPTTTrace after backward, or a mapping from a display name to such traces
            (compared on one axis).
        path: the PNG to write (its folder must exist).
        title: figure title; default "BPTT gradient norm per time step".
        jacobian: add a lower panel with the batch-mean step Jacobian Frobenius norm (log scale).
        styles: optional ``Axes.plot`` keywords (``color``, ``linestyle``) per display name, for
            traces with one layer and direction; the others get :func:`line_styles`.
    Returns:
        ``path`` as a Path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    if isinstance(trace, Mapping):
        traces = dict(trace)
    elif isinstance(trace, BPTTTrace):
        traces = {trace.mode: trace}
    else:
        raise TypeError(f"trace must be a BPTTTrace or a mapping of them, got {type(trace).__name__}")
    if not traces:
        raise ValueError(
            f"trace must be a BPTTTrace or a non-empty mapping of them, got an empty {type(trace).__name__}"
        )
    grads = _series(traces, "grad")
    defaults = line_styles(len(grads))
    chosen = [(styles or {}).get(label, defaults[k]) for k, (label, _) in enumerate(grads)]
    path = Path(path)
    fig = Figure(figsize=(11, 7.5 if jacobian else 5), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if jacobian else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    zeros = draw_log_curves(ax, grads, chosen)
    ax.set_ylabel("‖∂loss/∂h_t‖₂  (log scale)")
    ax.set_title(title or "BPTT gradient norm per time step")
    handles, labels = ax.get_legend_handles_labels()
    if zeros:
        handles.append(Line2D([], [], linestyle="none", marker="v", color="0.3"))
        labels.append("exactly 0 (float32 underflow),\nshown in the shaded band")
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if jacobian:
        draw_log_curves(axes[1], _series(traces, "jac"), chosen)
        axes[1].axhline(1.0, color="0.4", linewidth=0.8, linestyle=":")
        axes[1].set_ylabel("step Jacobian ‖∂s_t/∂s_prev‖_F\n(batch mean, log scale)")
        axes[1].set_title(
            "Step Jacobian, Frobenius norm: an upper bound on the spectral norm,\n"
            "so < 1 at every step guarantees vanishing (> 1 does not rule it out)",
            fontsize=9,
        )
    axes[-1].set_xlabel("time step t (input position)")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    return path
