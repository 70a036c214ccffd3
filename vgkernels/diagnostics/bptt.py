"""Reports and plots on a :class:`~vgkernels.trace.BPTTTrace`: how far back in time the gradient reaches.

Every measure is taken per layer and direction (row ``l`` of the trace, ``layer * num_directions +
direction``), in processing order: t = 0, 1, ..., T-1 for the forward direction and T-1, ..., 0 for
the reverse one. "Steps back" count against processing order, the way back-propagation travels.

- The **anchor** is the last processed step that carries a loss. :func:`trace_report` takes the steps
  whose outputs the loss reads as ``loss_steps``; without them, it reads them off the trace: the
  recurrent modules record in backward the norm of the gradient that enters through their output at
  every step (``output_grad_norm``), so the steps a loss reads are measured, not guessed. Only a trace
  without that record falls back to the last processed step whose gradient norm is finite and
  nonzero, and marks every measure that rests on that assumption.
- The **span** runs back from the anchor to the step after the previous loss step (or to the first
  processed step). Only there is the gradient purely the one that travelled back through time from
  the anchor's loss: a loss at an earlier step injects gradient of its own, and from there on the
  norm measures where the losses sit, not how far gradient travels. With a loss at every step the span
  is the anchor alone and nothing about travel can be read from the trace;
  :func:`last_step_traces` then measures the gradient of the last step's loss alone, with one extra
  forward and backward.
- The **gradient horizon** is the number of steps back from the anchor over which the gradient norm
  stays at or above ``threshold`` (default 1e-3) times its value at the anchor. Where it lasts to the
  end of a span that an earlier loss cuts, it is only known to be at least that long.
- The **decay rate** is the least-squares slope of log10 grad_norm against processing order, over the
  finite, nonzero steps of the span: decades lost per step back (positive: vanishing, negative:
  exploding). For the forward direction it is the slope of log10 grad_norm over t.
- The **ratio** is the gradient norm at the span's first step over that at the anchor.

**Step norms.** One step can stretch a gradient by at most the spectral norm of its Jacobian
∂s_t/∂s_prev, and the Frobenius norm bounds that from above. So without gradient entering on the way
(a loss, or the layer above), the ratio over k steps back is at most the product of the k step norms,
sample by sample; over the batch, at most their largest product. :func:`trace_report` uses this bound
twice, for the top layer (every lower layer receives gradient from above at every step):

- with ``spectral`` norms (``vgkernels.diagnostics.spectral_norms``, opt in: costly) it reports the
  product over the span and the horizon the step norms allow; where the two horizons are close, the
  step norms alone explain the decay;
- without ``loss_steps`` it checks the gradient against the bound (Frobenius, or spectral if given). A
  gradient above it proves that gradient entered before the anchor, and the report then states no
  horizon at all. A gradient within the bound proves nothing: losses can hide under a loose bound.

In float32 a vanishing gradient can underflow to exactly 0: the trace sums its squares in float64, so a
norm reads 0 only once the float32 gradient itself is 0 (below about 1e-38, or 1e-45 with denormals).
Such steps are counted (``zero_steps``), excluded from the decay fit, named in the report's notes, and
drawn as markers on the bottom edge of :func:`plot_trace`'s log-scale axes rather than silently dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vgkernels.trace import BPTTTrace

__all__ = [
    "LossSteps",
    "TraceReport",
    "TraceRow",
    "decay_rate",
    "draw_log_curves",
    "format_number",
    "gradient_horizon",
    "jacobian_stats",
    "last_step_traces",
    "line_styles",
    "plot_step_bounds",
    "plot_trace",
    "render_table",
    "trace_report",
]

DEFAULT_THRESHOLD = 1e-3
BOUND_SLACK = 1e-3
"""Relative slack of the step-norm bound before a gradient above it counts as entering: float32
rounding of the norms, plus 1e-5 per step."""

LossSteps = str | int | Sequence[int] | torch.Tensor | None
"""Where losses sit: ``"last"`` (t = T-1), ``"all"``, a step, steps, or a bool mask [T] over input
positions; None: not known."""


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
    """A [T, ...] tensor over input positions in processing order (its own inverse)."""
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


def _slope(g: torch.Tensor, a: int | None, start: int = 0) -> float:
    """Decades per step back, fitted on the finite nonzero steps start..a (processing order)."""
    if a is None:
        return math.nan
    part = g[start : a + 1]
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

    It assumes that no step before the anchor carries a loss; with losses at earlier steps (per-step
    losses) use :func:`trace_report` with ``loss_steps``, which says what the trace can support.

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
    Like :func:`gradient_horizon`, it assumes that no step before the anchor carries a loss.

    Args:
        source, anchor: as :func:`gradient_horizon`.
    Returns:
        a float for a [T] tensor, else a list of L floats.
    """
    return _per_curve(source, anchor, _slope)


def _step_means(norms: torch.Tensor, trace: BPTTTrace) -> torch.Tensor:
    """float64 CPU [L, T]: the batch mean of per-sample step norms [L, T, B] over the samples alive at
    each step (as ``BPTTTrace.jacobian_norm``)."""
    valid = trace.valid_mask().cpu()
    count = valid.sum(1).clamp_min(1).to(torch.float64)
    return (norms.detach().to("cpu", torch.float64) * valid).sum(-1) / count


def _norm_stats(norms: torch.Tensor, trace: BPTTTrace) -> list[dict[str, float]]:
    """Per row of [L, T, B] per-sample step norms: mean, min, max of the batch mean over the steps some
    sample reaches, and the fraction of those steps below 1."""
    per_step = _step_means(norms, trace)
    alive = trace.valid_mask().cpu().any(1)
    stats = []
    for row in per_step:
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


def jacobian_stats(trace: BPTTTrace) -> list[dict[str, float]]:
    """Per layer and direction: mean, min, max of the step Jacobian's Frobenius norm, and the
    fraction of steps where it is below 1 (steps no sample reaches are left out).

    The Frobenius norm bounds the spectral norm from above, so a norm below 1 at every step proves
    that the gradient vanishes; a norm above 1 proves nothing by itself.
    """
    if not isinstance(trace, BPTTTrace):
        raise TypeError(f"trace must be a BPTTTrace, got {type(trace).__name__}")
    return _norm_stats(trace.jacobian_norm_per_sample, trace)


# ---------------------------------------------------------------------------------------------
# Where the losses sit, and the step-norm bound
# ---------------------------------------------------------------------------------------------


def _loss_mask(loss_steps: LossSteps, T: int, lengths: torch.Tensor | None) -> torch.Tensor | None:
    """bool [T] over input positions, or None when not given. ``"last"`` is every sequence's last step
    (``lengths``: of a packed batch)."""
    if loss_steps is None:
        return None
    mask = torch.zeros(T, dtype=torch.bool)
    if isinstance(loss_steps, str):
        if loss_steps not in ("last", "all"):
            raise ValueError(f"loss_steps: expected 'last', 'all', steps or a mask, got {loss_steps!r}")
        if loss_steps == "last":
            mask[T - 1 if lengths is None else lengths.cpu().clamp_min(1) - 1] = True
        else:
            mask[:] = True
        return mask
    if isinstance(loss_steps, torch.Tensor) and loss_steps.dtype == torch.bool:
        if tuple(loss_steps.shape) != (T,):
            got = tuple(loss_steps.shape)
            raise ValueError(f"loss_steps: expected a bool mask of shape ({T},), got {got}")
        mask = loss_steps.detach().cpu().clone()
    else:
        if isinstance(loss_steps, bool) or not isinstance(loss_steps, int | Sequence | torch.Tensor):
            raise TypeError(
                "loss_steps: expected 'last', 'all', an int, ints or a bool mask, got "
                f"{type(loss_steps).__name__}"
            )
        steps = [loss_steps] if isinstance(loss_steps, int) else torch.as_tensor(loss_steps).flatten()
        steps = steps if isinstance(steps, list) else steps.tolist()
        for t in steps:
            if isinstance(t, bool) or not isinstance(t, int) or not -T <= t < T:
                raise ValueError(f"loss_steps: expected time steps in [0, {T}), got {t!r}")
            mask[t % T] = True
    if not mask.any():
        raise ValueError("loss_steps: expected at least one step that carries a loss, got none")
    return mask


def _log_bound(log_norms: torch.Tensor, a: int) -> torch.Tensor:
    """log of the product of the step norms over k = 0..a steps back from the anchor, per sample.

    log_norms: [T, B] log step norms in processing order (the norm at index t maps the state before
    t to the state at t). Returns [a + 1, B]: row k bounds ‖g_(a-k)‖ / ‖g_a‖.
    """
    steps = log_norms[1 : a + 1].flip(0)  # the norms at a, a-1, ..., 1: going back one step each
    zero = log_norms.new_zeros(1, log_norms.shape[1])
    return torch.cat([zero, steps.cumsum(0)])


def _injection(
    g_ps: torch.Tensor,
    log_norms: torch.Tensor,
    a: int,
    alive: torch.Tensor,
    state_at_anchor: torch.Tensor | None,
) -> int | None:
    """The step nearest to the anchor (processing order) whose gradient exceeds the step-norm bound.

    g_ps: [T, B] per-sample gradient norms in processing order; ``alive``: [B] samples used (those
    alive at every step). With the state's whole gradient per sample (``state_at_anchor`` None: the RNN
    and GRU, whose state is h), step by step: ‖g_(t-1)‖ <= ‖J_t‖ ‖g_t‖ for each sample. Otherwise (the
    LSTM, whose cell gradient is only known over the batch) from the anchor: the batch norm k steps
    back is at most the largest per-sample product of k step norms times ``state_at_anchor``, a batch
    bound on the whole state's gradient at the anchor.
    """
    if a < 1 or not bool(alive.any()):
        return None
    back = g_ps[: a + 1, alive].flip(0).log()  # back[k]: k steps before the anchor
    steps = log_norms[1 : a + 1, alive].flip(0)  # steps[k - 1]: the norm that carries k - 1 to k
    if state_at_anchor is None:
        over = (back[1:] > back[:-1] + steps + math.log1p(BOUND_SLACK)).any(1)
    else:
        slack = torch.log1p(BOUND_SLACK + 1e-5 * torch.arange(1, a + 1, dtype=torch.float64))
        batch = back.exp().pow(2).sum(1).sqrt().log()[1:]
        over = batch > state_at_anchor.log() + steps.cumsum(0).max(1).values + slack
    hits = torch.nonzero(over).flatten()
    return None if hits.numel() == 0 else a - (int(hits[0]) + 1)


@dataclass
class TraceRow:
    """The measures of one layer and direction; see the module docstring for their definitions.

    Attributes:
        label: e.g. ``"layer 0"``, ``"layer 1 reverse"``.
        anchor_t: time step of the anchor (``None`` when no step has a usable gradient).
        span_start_t: time step of the span's first step: the step after the previous loss step, or
            the first processed step.
        loss_before_t: time step of the previous loss step before the anchor, given by ``loss_steps``
            or detected (``injected``); ``None`` when there is none (as far as known).
        injected: the gradient exceeded the step-norm bound at ``loss_before_t``: gradient entered there.
        gradient_after_t: with ``loss_steps`` given, the latest step processed after the anchor that
            still has gradient (so ``loss_steps`` missed a loss there), else None.
        grad_anchor, grad_first: grad_norm at the anchor and at the span's first step.
        ratio: grad_first / grad_anchor (0 when the first step underflowed); nan where the span is the
            anchor alone.
        horizon: steps back; ``None`` where the trace supports no horizon. ``horizon_full`` says it
            reached the first processed step, ``horizon_cut`` that it reached the previous loss step
            (it is at least that long).
        decay_rate: decades per step back, over the span.
        zero_steps: steps up to the anchor whose grad_norm is exactly 0 (float32 underflow).
        zero_span: (first t, last t) of the zeros when they are one run that starts at the first
            processed step (the usual underflow pattern), else ``None``.
        nonfinite_steps: steps with an inf or nan grad_norm.
        jac_mean, jac_min, jac_max, jac_frac_below_1: :func:`jacobian_stats`.
        spec_mean, spec_min, spec_max, spec_frac_below_1: the same for the spectral norms, when given.
        bound_ratio: the largest per-sample product of the spectral step norms over the span, a bound
            on ``ratio`` (top layer with spectral norms; else None).
        bound_horizon: the most steps back over which that product stays >= the threshold, so the
            most the horizon can be; ``bound_horizon_full``: it lasts the whole span.
        bound_curve: float64 [T] over input positions: the anchor's gradient times the product, the
            ceiling of grad_norm at every step of the span (nan elsewhere); None without a bound.
    """

    label: str
    layer: int
    direction: int
    anchor_t: int | None
    grad_anchor: float
    grad_first: float
    ratio: float
    horizon: int | None
    horizon_full: bool
    decay_rate: float
    zero_steps: int
    zero_span: tuple[int, int] | None
    nonfinite_steps: int
    jac_mean: float
    jac_min: float
    jac_max: float
    jac_frac_below_1: float
    span_start_t: int | None = None
    loss_before_t: int | None = None
    injected: bool = False
    horizon_cut: bool = False
    gradient_after_t: int | None = None
    spec_mean: float | None = None
    spec_min: float | None = None
    spec_max: float | None = None
    spec_frac_below_1: float | None = None
    bound_ratio: float | None = None
    bound_horizon: int | None = None
    bound_horizon_full: bool = False
    bound_curve: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def horizon_text(self, assumed: bool = False) -> str:
        """The horizon as the tables show it: ``"12"``, ``">= 199"`` (full span), ``">= 9, cut"``
        (reached the previous loss step), ``"n/a"`` (nothing to measure); ``assumed`` adds ``†``."""
        if self.horizon is None or (self.horizon_cut and self.horizon == 0):
            return "n/a"
        text = str(self.horizon)
        if self.horizon_full:
            text = f">= {text}"
        elif self.horizon_cut:
            text = f">= {text}, cut"
        return text + ("†" if assumed else "")

    def bound_horizon_text(self) -> str:
        """The horizon the spectral step norms allow, as the tables show it (``"-"`` without one)."""
        if self.bound_horizon is None:
            return "-"
        return f">= {self.bound_horizon}" if self.bound_horizon_full else str(self.bound_horizon)


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
_SPECTRAL_HEADERS = ("mean ‖J‖₂", "max ‖J‖₂", "Π‖J‖₂ over span", "horizon ‖J‖₂ allows")


@dataclass
class TraceReport:
    """Gradient-flow summary of one BPTTTrace, one :class:`TraceRow` per layer and direction.

    ``str(report)`` is a plain-text table with notes; :meth:`to_markdown` gives the same as markdown.

    Attributes:
        name: what the trace is of (shown in the heading).
        mode, seq_len, batch_size: from the trace.
        threshold: the horizon's fraction.
        rows: the measures.
        loss_steps: the input positions that carry a loss (sorted): as given, or as measured from the
            gradient that reached the module's output at each step; None when neither is known.
        loss_steps_measured: True when ``loss_steps`` was measured from the trace, not given.
        spectral: whether spectral norms were given (adds their columns).
        trace: the BPTTTrace measured (for plotting it next to others).
    """

    name: str
    mode: str
    seq_len: int
    batch_size: int
    threshold: float
    rows: list[TraceRow] = field(default_factory=list)
    trace: BPTTTrace | None = field(default=None, repr=False, compare=False)
    loss_steps: list[int] | None = None
    spectral: bool = False
    loss_steps_measured: bool = False

    @property
    def underflow(self) -> bool:
        """True when some step's gradient norm is exactly 0."""
        return any(r.zero_steps for r in self.rows)

    @property
    def assumed(self) -> bool:
        """True when the loss steps were not given and no gradient was seen entering: the measures
        assume that no step before the anchor carries a loss."""
        return self.loss_steps is None and not any(r.injected for r in self.rows)

    @property
    def informative(self) -> bool:
        """False when no row has a span longer than its anchor: the trace says nothing of how far
        gradient travels back (e.g. a loss at every step)."""
        return any(r.horizon is not None and not (r.horizon_cut and r.horizon == 0) for r in self.rows)

    def table_rows(self) -> list[list[object]]:
        """The table's cells, one list per row, in the order of :meth:`headers`."""
        out = []
        for r in self.rows:
            stated = r.horizon is not None
            cells = [
                r.label,
                r.grad_anchor,
                r.grad_first,
                r.ratio if stated and not math.isnan(r.ratio) else "n/a",
                r.horizon_text(self.assumed),
                r.decay_rate if stated and not math.isnan(r.decay_rate) else "n/a",
                r.zero_steps,
                r.jac_mean,
                r.jac_min,
                r.jac_max,
            ]
            if self.spectral:
                bound = "-" if r.bound_ratio is None else r.bound_ratio
                cells += [r.spec_mean, r.spec_max, bound, r.bound_horizon_text()]
            out.append(cells)
        return out

    def headers(self) -> tuple[str, ...]:
        """Column titles of :meth:`table_rows`."""
        return _HEADERS + (_SPECTRAL_HEADERS if self.spectral else ())

    def notes(self) -> list[str]:
        """Sentences on where the losses sit, the horizon, the step norms, underflow and non-finite
        values."""
        out = [
            f"Horizon: steps back from the loss over which the gradient norm stays >= "
            f"{format_number(self.threshold)} of its value at the loss."
        ]
        out += self._loss_notes()
        if self.spectral:
            out += self._bound_notes()
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

    def _loss_notes(self) -> list[str]:
        out = []
        if self.loss_steps_measured:
            out.append(f"Loss steps measured, not assumed: gradient entered through the module's output at "
                       f"{_steps_text(self.loss_steps)} (the trace's output_grad_norm).")
        return out + self._loss_span_notes()

    def _loss_span_notes(self) -> list[str]:
        how = (
            "Measure how far the gradient of one loss travels with vgkernels.diagnostics.last_step_traces"
            "(model, step_losses): one extra forward and backward from the last step's loss alone, whose "
            "traces report with loss_steps='last'."
        )
        injected = [r for r in self.rows if r.injected]
        if injected:
            where = "; ".join(f"{r.label} at t = {r.loss_before_t}" for r in injected)
            return [
                f"Gradient enters before the loss step ({where}): there the gradient norm exceeds what "
                f"the step Jacobians can carry back from t = {injected[0].anchor_t}, so an earlier step "
                f"carries a loss (or gradient from elsewhere). The trace then cannot tell travelled "
                f"gradient from injected gradient: no horizon, ratio or decay is stated. Pass loss_steps. "
                + how
            ]
        if self.loss_steps is None:
            return [
                "† loss_steps not given: the measures run back from the last step with gradient and "
                "assume that no earlier step carries a loss (no gradient above the step-norm bound was "
                "seen, but that proves nothing). With a loss at every step (a language model) they would "
                "measure where the losses sit, not how far gradient travels: pass loss_steps. " + how
            ]
        if not self.informative:
            return [
                "Every step carries a loss: the gradient at step t is mostly the gradient of the loss at "
                "t, so this trace cannot show how far gradient travels back, and no horizon, ratio or "
                "decay is stated. " + how
            ]
        out = [
            f"{r.label}: loss_steps puts the last loss at t = {r.anchor_t}, but t = {r.gradient_after_t}, "
            f"processed after it, has gradient too: a loss (or gradient from elsewhere) sits there. "
            f"Check loss_steps."
            for r in self.rows
            if r.gradient_after_t is not None
        ]
        cut = [r for r in self.rows if r.loss_before_t is not None]
        if cut:
            spans = "; ".join(f"{r.label}: t = {r.span_start_t} ... {r.anchor_t}" for r in cut)
            return [
                f"Losses sit at more than one step: each measure covers only the span from the last loss "
                f"step back to the step after the previous one ({spans}), where the gradient is purely "
                f"the one that travelled back from the last loss. A horizon marked 'cut' lasted the whole "
                f"span and is at least that long. " + how
            ]
        return out

    def _bound_notes(self) -> list[str]:
        out = [
            "Π‖J‖₂ over span: the largest per-sample product of the spectral step norms from the loss back "
            "over the span, an upper bound on the ratio; 'horizon ‖J‖₂ allows' is how many steps back that "
            "product stays >= the horizon's fraction, so the most the horizon can be. Where the two "
            "horizons are close, the step norms alone explain the decay; where the allowed one is far "
            "longer, the gradient decays because it does not lie along each step's most stretched "
            "direction. Shown for the top layer only: lower layers receive gradient from above at every "
            "step."
        ]
        for r in self.rows:
            if r.spec_frac_below_1 is not None and r.spec_frac_below_1 == 1.0 and r.jac_frac_below_1 < 1.0:
                out.append(
                    f"{r.label}: the spectral norm is below 1 at every step although the Frobenius norm "
                    f"is not: every step shrinks every gradient."
                )
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


def _steps_text(steps: list[int]) -> str:
    """'t = 3', 't = 0 ... 9' (consecutive) or 't = 1, 4, 7', shortened past 8 steps."""
    if len(steps) == 1:
        return f"t = {steps[0]}"
    if steps == list(range(steps[0], steps[-1] + 1)):
        return f"t = {steps[0]} ... {steps[-1]}"
    shown = ", ".join(str(t) for t in steps[:8])
    return f"t = {shown}" + (f", ... ({len(steps)} steps)" if len(steps) > 8 else "")


def _spectral_norms_of(spectral: torch.Tensor | None, trace: BPTTTrace) -> torch.Tensor | None:
    """The spectral norms as float64 CPU [L, T, B], checked against the trace."""
    if spectral is None:
        return None
    if not isinstance(spectral, torch.Tensor):
        raise TypeError(f"spectral: expected a tensor [L, T, B] or [T, B], got {type(spectral).__name__}")
    L = trace.num_layers * trace.num_directions
    expected = (L, trace.seq_len, trace.batch_size)
    norms = spectral.unsqueeze(0) if spectral.dim() == 2 and L == 1 else spectral
    if tuple(norms.shape) != expected:
        raise ValueError(
            f"spectral: expected per-sample norms of shape {expected} (spectral_norms(module, input, "
            f"layer=None)), got {tuple(spectral.shape)}"
        )
    return norms.detach().to("cpu", torch.float64)


def trace_report(
    trace: BPTTTrace,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    loss_steps: LossSteps = None,
    spectral: torch.Tensor | None = None,
    anchor: int | None = None,
    name: str | None = None,
) -> TraceReport:
    """Measure a BPTTTrace after backward: ratio, horizon, decay rate, underflow and step norms, over
    the part of the trace that gradient reached by travelling back through time.

    Args:
        trace: the module's ``.trace`` after a backward.
        threshold: horizon fraction (default 1e-3).
        loss_steps: the input positions whose outputs the loss reads, directly or through the rest of
            the model: ``"last"`` (t = T-1, e.g. a classifier on the last output; for a packed batch
            every sequence's last step), ``"all"`` (e.g. a language model), an int, a sequence of ints,
            or a bool mask [T]. None (not given): the steps where gradient entered through the module's
            output, as the trace measured them in backward (``trace.output_grad_norm``; where none
            did, the last step). A trace without that measurement (built by hand) falls back to the
            last step with gradient, marks the measures as assuming no earlier loss, and checks the
            top layer's gradient against the step-norm bound; gradient above it proves an earlier
            loss, and then no horizon is stated.
        spectral: optional per-sample spectral norms of the step Jacobians, float [L, T, B] (or [T, B]
            for one layer-direction), e.g. ``vgkernels.diagnostics.spectral_norms(module, input,
            layer=None)`` of the same forward; adds their columns and the step-norm bound.
        anchor: time step of the loss, an older way to say ``loss_steps=anchor``.
        name: heading of the report; default the trace's mode.
    Returns:
        a :class:`TraceReport`.
    Raises:
        TypeError: not a BPTTTrace. ValueError: no gradients in the trace yet, a bad threshold, bad
        loss steps or spectral norms of the wrong shape.
    """
    if not isinstance(trace, BPTTTrace):
        raise TypeError(f"trace must be a BPTTTrace, got {type(trace).__name__}")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    if anchor is not None and loss_steps is not None:
        raise ValueError("anchor and loss_steps say the same thing: pass loss_steps only")
    curves, dirs, _ = _as_curves(trace, "trace")
    T = trace.seq_len
    if anchor is not None:
        if not -T <= anchor < T:
            raise ValueError(f"anchor must be a time step in [0, {T}), got {anchor}")
        loss_steps = anchor
    mask = _loss_mask(loss_steps, T, trace.lengths)
    measured = mask is None and trace.output_grad_norm is not None
    if measured:
        mask = _measured_loss_mask(trace)
    spec = _spectral_norms_of(spectral, trace)
    per_sample = trace.grad_norm_per_sample.detach().to("cpu", torch.float64)
    cell = trace.cell_grad_norm
    cell = None if cell is None else cell.detach().to("cpu", torch.float64)
    # The bound holds sample by sample only where every step is inside the sequence.
    full = trace.valid_mask().all(0).cpu()
    jac = jacobian_stats(trace)
    spec_stats = _norm_stats(spec, trace) if spec is not None else None
    top = trace.num_layers - 1
    rows = []
    for i, curve in enumerate(curves):
        reverse = _direction(i, dirs)
        layer, direction = divmod(i, dirs)
        g = _processing_order(curve, reverse)
        order = lambda t, rev=reverse: None if t is None else (T - 1 - t if rev else t)  # noqa: E731
        previous = injected = None
        if mask is not None:
            losses = torch.nonzero(_processing_order(mask, reverse)).flatten()
            a = int(losses[-1])
            previous = int(losses[-2]) if losses.numel() > 1 else None
        else:
            a = _anchor(g, None, reverse)
        norms = spec[i] if spec is not None else trace.jacobian_norm_per_sample[i].detach().cpu().double()
        log_norms = _processing_order(norms, reverse).log()
        g_ps = _processing_order(per_sample[i], reverse)
        if mask is None and layer == top and a is not None:
            lam = None
            if trace.mode == "lstm":
                # The state's gradient at the anchor, (∂h, ∂c not through h): that cell part is at most
                # ‖∂c‖ + ‖∂h‖, since h = o * tanh(c) passes at most ∂h on to c.
                g_h, g_c = float(g[a]), float(_processing_order(cell[i], reverse)[a])
                lam = torch.tensor(math.sqrt(g_h**2 + (g_c + g_h) ** 2), dtype=torch.float64)
            injected = _injection(g_ps, log_norms, a, full, lam)
            previous = injected
        start = 0 if previous is None else previous + 1
        horizon, reached = _horizon(g, a, threshold)
        cut = False
        if previous is not None and a is not None and horizon >= a - start:
            horizon, reached, cut = a - start, False, True
        if injected is not None:
            horizon = None
        upto = g[: a + 1] if a is not None else g
        zeros = int((upto == 0).sum())
        prefix = int(torch.cumprod(upto == 0, 0).sum())  # leading zeros in processing order
        span = None
        if zeros and prefix == zeros:
            span = (T - 1, T - prefix) if reverse else (0, prefix - 1)
        grad_anchor = float(g[a]) if a is not None else 0.0
        grad_first = float(g[start])
        single = a is None or a == start
        ratio = math.nan if single or grad_anchor <= 0 else grad_first / grad_anchor
        row = TraceRow(
            label=f"layer {layer}" + (" reverse" if direction else ""),
            layer=layer,
            direction=direction,
            anchor_t=order(a),
            grad_anchor=grad_anchor,
            grad_first=grad_first,
            ratio=ratio,
            horizon=horizon,
            horizon_full=reached,
            decay_rate=_slope(g, a, start),
            zero_steps=zeros,
            zero_span=span,
            nonfinite_steps=int((~torch.isfinite(curve)).sum()),
            jac_mean=jac[i]["mean"],
            jac_min=jac[i]["min"],
            jac_max=jac[i]["max"],
            jac_frac_below_1=jac[i]["frac_below_1"],
            span_start_t=order(start),
            loss_before_t=order(previous),
            injected=injected is not None,
            horizon_cut=cut,
        )
        if mask is not None and a is not None:
            later = torch.nonzero(torch.isfinite(g[a + 1 :]) & (g[a + 1 :] > 0)).flatten()
            row.gradient_after_t = order(a + 1 + int(later[-1])) if later.numel() else None
        if spec_stats is not None:
            row.spec_mean, row.spec_min = spec_stats[i]["mean"], spec_stats[i]["min"]
            row.spec_max, row.spec_frac_below_1 = spec_stats[i]["max"], spec_stats[i]["frac_below_1"]
            if layer == top and a is not None and injected is None and bool(full.all()):
                _bound(row, log_norms, a, start, grad_anchor, threshold, reverse, T)
        rows.append(row)
    if any(r.injected for r in rows):  # losses sit before the anchor: no row's horizon is supported
        for r in rows:
            r.horizon = None
    return TraceReport(
        name=name or trace.mode,
        mode=trace.mode,
        seq_len=T,
        batch_size=trace.batch_size,
        threshold=threshold,
        rows=rows,
        trace=trace,
        loss_steps=None if mask is None else torch.nonzero(mask).flatten().tolist(),
        spectral=spec is not None,
        loss_steps_measured=measured,
    )


def _measured_loss_mask(trace: BPTTTrace) -> torch.Tensor:
    """bool [T]: the positions where gradient entered the module through its output (the trace's
    ``output_grad_norm``); where none did (the loss read the final state only), every sequence's last
    step."""
    mask = (trace.output_grad_norm.detach().cpu() > 0)
    return mask if mask.any() else _loss_mask("last", trace.seq_len, trace.lengths)


def _bound(row: TraceRow, log_norms: torch.Tensor, a: int, start: int, grad_anchor: float, threshold: float,
           reverse: bool, T: int) -> None:
    """Fill the step-norm bound of a top-layer row over its span (processing indices start..a)."""
    worst = _log_bound(log_norms, a).max(1).values[: a - start + 1]  # k = 0 .. span length
    row.bound_ratio = float(worst[-1].exp()) if a > start else None
    below = torch.nonzero(worst < math.log(threshold)).flatten()
    row.bound_horizon = a - start if below.numel() == 0 else int(below[0]) - 1
    row.bound_horizon_full = below.numel() == 0
    curve = torch.full((T,), math.nan, dtype=torch.float64)
    curve[start : a + 1] = (grad_anchor * worst.exp()).flip(0)  # processing index a - k holds k
    row.bound_curve = _processing_order(curve, reverse)


def last_step_traces(
    model: torch.nn.Module,
    step_losses: Callable[[], torch.Tensor],
    *,
    step: int = -1,
    time_dim: int = -1,
) -> dict[str, BPTTTrace]:
    """Trace the gradient of ONE step's loss alone: what a report needs when every step carries a loss.

    Runs ``step_losses()`` under ``vgkernels.track(model)``, takes its losses at time index ``step``
    only, sums them over the other dimensions and back-propagates that. The traces then show how far
    the gradient of that one loss travels back through time; report them with
    ``trace_report(trace, loss_steps=step)`` (``"last"`` for the default). The parameters' ``.grad``
    are left as they were, and the caller's random number streams too (dropout draws its own masks:
    call ``model.eval()`` first for the same network as the training forward without dropout).

    Cost: one extra forward and one backward of the model. Leaf tensors other than the model's
    parameters that require grad (inputs, for example) accumulate this backward's gradient.

    Args:
        model: contains the vgkernels recurrent modules to trace.
        step_losses: runs the forward and returns the per-step losses, a tensor with a time dimension
            (e.g. ``F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")`` of shape
            [B, T]).
        step: the time index whose loss is kept (default the last).
        time_dim: the time dimension of the returned losses.
    Returns:
        a dict from qualified module name to that module's BPTTTrace, as ``vgkernels.track`` yields.
    """
    from vgkernels.nn.tracking import track

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not callable(step_losses):
        got = type(step_losses).__name__
        raise TypeError(f"step_losses: expected a callable returning per-step losses, got {got}")
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    try:
        for p in params:
            p.grad = None
        with torch.random.fork_rng(devices=devices), track(model) as traces:
            losses = step_losses()
            if not isinstance(losses, torch.Tensor) or losses.dim() == 0:
                got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
                raise ValueError(f"step_losses: expected per-step losses with a time dimension, got {got}")
            if not -losses.dim() <= time_dim < losses.dim():
                shape = tuple(losses.shape)
                raise ValueError(f"time_dim: expected a dimension of the losses {shape}, got {time_dim}")
            steps = losses.shape[time_dim]
            if not -steps <= step < steps:
                raise ValueError(f"step: expected a time index in [{-steps}, {steps}), got {step}")
            losses.select(time_dim, step).sum().backward()
        return dict(traces)
    finally:
        for p, grad in zip(params, saved, strict=True):
            p.grad = grad


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------


def line_styles(n: int) -> list[dict]:
    """``n`` distinct matplotlib line styles (colour cycles first, then the dash pattern)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    dashes = ("-", "--", "-.", ":")
    return [{"color": cmap(k % 10), "linestyle": dashes[(k // 10) % 4]} for k in range(n)]


def _series(
    traces: Mapping[str, BPTTTrace], what: str, spectral: Mapping[str, torch.Tensor] | None = None
) -> list[tuple[str, torch.Tensor]]:
    """(label, curve [T]) per trace, layer and direction: ``what`` is "grad", "jac" (Frobenius) or
    "spectral" (the batch means of ``spectral[name]``; traces without an entry are skipped)."""
    out = []
    for name, trace in traces.items():
        if not isinstance(trace, BPTTTrace):
            raise TypeError(f"traces[{name!r}] must be a BPTTTrace, got {type(trace).__name__}")
        if what == "grad":
            curves = _as_curves(trace, f"traces[{name!r}]")[0]
        elif what == "jac":
            curves = trace.jacobian_norm.detach().to("cpu", torch.float64)
        elif name in spectral:
            curves = _step_means(_spectral_norms_of(spectral[name], trace), trace)
        else:
            continue
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
    spectral: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
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
        spectral: per-sample spectral norms of the step Jacobians ([L, T, B], as for
            :func:`trace_report`), or a mapping from display name to them: the lower panel then draws
            their batch mean (solid) beside the Frobenius norm (dotted).
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
    if spectral is not None and not isinstance(spectral, Mapping):
        if len(traces) != 1:
            raise ValueError("spectral: pass a mapping from display name to norms for several traces")
        spectral = {next(iter(traces)): spectral}
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
        frobenius = _series(traces, "jac")
        if spectral:
            labels = [label for label, _ in grads]
            spec = _series(traces, "spectral", spectral)
            draw_log_curves(axes[1], spec, [chosen[labels.index(label)] for label, _ in spec])
            styles_f = [{**style, "linestyle": ":", "alpha": 0.7} for style in chosen]
            ylabel = "‖∂s_t/∂s_prev‖"
            title = (
                "Step Jacobian: spectral norm (solid), the most one step can stretch a gradient, and its\n"
                "upper bound the Frobenius norm (dotted). Spectral < 1 at every step guarantees vanishing."
            )
        else:
            styles_f = chosen
            ylabel = "‖∂s_t/∂s_prev‖_F"
            title = (
                "Step Jacobian, Frobenius norm: an upper bound on the spectral norm,\n"
                "so < 1 at every step guarantees vanishing (> 1 does not rule it out)"
            )
        draw_log_curves(axes[1], frobenius, styles_f)
        axes[1].axhline(1.0, color="0.4", linewidth=0.8, linestyle=":")
        axes[1].set_ylabel(f"step Jacobian {ylabel}\n(batch mean, log scale)")
        axes[1].set_title(title, fontsize=9)
    axes[-1].set_xlabel("time step t (input position)")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    return path


def plot_step_bounds(
    reports: TraceReport | Mapping[str, TraceReport], path: str | Path, *, title: str | None = None
) -> Path:
    """Small multiples, one per report: the top layer's gradient norm relative to the loss step, and the
    product of the spectral step norms from the loss back (its ceiling), on a log scale.

    Where the ceiling falls as fast as the gradient, the step norms alone explain the decay; where it
    stays high, the decay comes from the gradient's direction. The dotted line is the horizon's
    threshold.

    Args:
        reports: reports made with ``spectral`` norms, or a mapping from display name to them; rows
            without a bound (lower layers) are left out.
        path: the PNG to write (its folder must exist).
        title: the figure's title.
    Returns:
        ``path`` as a Path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if isinstance(reports, TraceReport):
        reports = {reports.name: reports}
    if not isinstance(reports, Mapping) or not all(isinstance(r, TraceReport) for r in reports.values()):
        raise TypeError("reports: expected a TraceReport or a mapping from name to TraceReports")
    panels = [
        (name if len(rep.rows) == 1 else f"{name} ({row.label})", rep, row)
        for name, rep in reports.items()
        for row in rep.rows
        if row.bound_curve is not None and row.grad_anchor > 0
    ]
    if not panels:
        raise ValueError("reports: none has a step-norm bound; report with trace_report(..., spectral=...)")
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(3.3 * cols + 1, 2.9 * rows + 0.8), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    grad_style, bound_style = line_styles(2)
    for k, (label, rep, row) in enumerate(panels):
        ax = axes[k // cols, k % cols]
        curves = _as_curves(rep.trace)[0]
        index = row.layer * rep.trace.num_directions + row.direction
        series = [("‖∂loss/∂h_t‖ / its value at the loss", curves[index] / row.grad_anchor),
                  ("Π‖J‖₂ from the loss back (ceiling)", row.bound_curve / row.grad_anchor)]
        draw_log_curves(ax, series, [grad_style, {**bound_style, "linestyle": "--"}])
        ax.axhline(rep.threshold, color="0.4", linewidth=0.8, linestyle=":")
        ax.set_title(
            f"{label}\nhorizon {row.horizon_text(rep.assumed)}, ‖J‖₂ allows {row.bound_horizon_text()}",
            fontsize=9,
        )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for k in range(len(panels), rows * cols):
        axes[k // cols, k % cols].set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("time step t")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=9, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(title or "The gradient against the product of the spectral step norms")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    return path
