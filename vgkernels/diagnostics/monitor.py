"""``GradientMonitor``: per-parameter and per-module gradient norms and a log10-magnitude histogram of
all gradients, from one fused pass per device and one device-to-host transfer per record.

How it works
------------
- **When.** Every parameter gets a post-accumulate-grad hook. The first one to fire in a backward
  queues an end-of-backward callback on the autograd engine; that callback queues a second one, which
  records. The engine runs callbacks in the order they were queued, and callbacks queued by a callback
  run after all the others. So the record sees the final gradients of that backward, once per
  backward, after every other end-of-backward callback. DistributedDataParallel queues its own
  callback during the backward, which waits for the gradient all-reduce and writes the averaged
  gradients into ``.grad``: under DDP the monitor therefore records the reduced gradients, the same on
  every rank. (Inside ``no_sync()`` there is no reduction, and it records the local gradients.)
  Pass ``hook=False`` and call :meth:`GradientMonitor.record` yourself after ``backward()`` instead, e.g.
  to record once per optimizer step under gradient accumulation.
- **Every `every`-th step.** A step is one backward (or one call of ``record()``); steps 0, every,
  2·every, ... are recorded.
- **One pass, one transfer.** The gradients of each device go through one fused kernel call
  (:func:`vgkernels.ops.grad_stats.grad_stats`: C++ on CPU, Triton on CUDA), whose results are packed on
  the device into one float64 tensor and copied to the host once (one copy per device).
- **AMP.** With a ``torch.amp.GradScaler`` the values are multiplied by 1/scale on the device, before
  the norms and the binning, so norms and histogram are those of the unscaled gradients. The scale is
  never read on the host. If ``scaler.unscale_(optimizer)`` was already called in this iteration, the
  gradients are taken as unscaled already. Steps where the scaler found inf/NaN show up as non-finite.
- **Flags**, per module that owns parameters directly:
  ``"vanishing"``: norm below ``vanish_ratio`` (default 1e-4) times the largest module norm of the record;
  ``"exploding"``: norm above ``explode_norm`` (default 1e3), or more than ``explode_growth`` (default
  100) times the largest module norm of the previous record (a small module that recovers is not
  flagged); ``"nonfinite"``: the norm is inf or NaN. Modules without any gradient are not flagged.
- **Histogram bins**: log10|g| in [-20, 5], 50 bins of half a decade, plus columns for zeros, underflow
  (|g| < 1e-20), overflow (|g| > 1e5, with inf) and NaN; see :mod:`vgkernels.reference.grad_stats`.

The history stays on the host as NumPy arrays, one :class:`GradientRecord` per record.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from vgkernels.ops.grad_stats import DEFAULT_BINS, SUPPORTED_DTYPES, HistogramBins, grad_stats
from vgkernels.reference.grad_stats import UNDERFLOW, ZERO

__all__ = ["GradientMonitor", "GradientRecord", "SummaryTable"]

VANISH_RATIO = 1e-4
EXPLODE_NORM = 1e3
EXPLODE_GROWTH = 1e2
HISTOGRAM_FALLBACK_SAMPLES = 100_000


def _to_host(packed: torch.Tensor) -> np.ndarray:
    """The monitor's only device-to-host transfer: one call per device and record."""
    return packed.cpu().numpy()


@dataclass
class GradientRecord:
    """What one record saw. Arrays are NumPy, on the host.

    Attributes:
        step: the step (backward count, from 0) of the record.
        param_norms: float64 [P], L2 norm of each parameter's gradient, in ``monitor.param_names``
            order; NaN for a parameter without a gradient.
        module_norms: float64 [M], L2 norm over the gradients of the parameters each module owns
            directly, in ``monitor.module_names`` order; NaN for a module without any gradient.
        total_norm: L2 norm over all gradients.
        histogram: int64 [bins + 4], counts over all gradients: zeros, underflow, each bin, overflow, NaN.
        inv_scale: the factor the gradients were multiplied by (1/loss scale; 1.0 without a scaler).
        flags: module name -> flags ("vanishing", "exploding", "nonfinite"), for flagged modules only.
    """

    step: int
    param_norms: np.ndarray
    module_norms: np.ndarray
    total_norm: float
    histogram: np.ndarray
    inv_scale: float = 1.0
    flags: dict[str, tuple[str, ...]] = field(default_factory=dict)


class SummaryTable(str):
    """A printable table; ``rows`` holds the same data as a list of dicts."""

    rows: list[dict[str, object]]

    def __new__(cls, text: str, rows: list[dict[str, object]]) -> SummaryTable:
        table = super().__new__(cls, text)
        table.rows = rows
        return table


def _scale_state(scaler) -> torch.Tensor | None:
    """The scaler's loss scale as a device tensor, or None when the gradients are not scaled."""
    if scaler is None or not scaler.is_enabled():
        return None
    scale = scaler._get_scale_async()  # the device tensor: reading it on the host would synchronise
    if scale is None:  # no loss has been scaled yet
        return None
    from torch.amp.grad_scaler import OptState

    states = getattr(scaler, "_per_optimizer_states", {})
    if any(state.get("stage") is OptState.UNSCALED for state in states.values()):
        return None  # unscale_ already divided the gradients
    return scale


class GradientMonitor:
    """Records gradient norms and a log10-magnitude histogram after every ``every``-th backward.

    Args:
        model: the module whose parameters (``requires_grad=True``, as in ``named_parameters()`` at
            construction) are monitored. Their dtype must be float32, float64, float16 or bfloat16.
        every: record every ``every``-th step (a step is one backward, or one ``record()`` call).
        writer: None, or a ``torch.utils.tensorboard.SummaryWriter``-like object with ``add_scalar`` and
            ``add_histogram`` (``add_histogram_raw`` is used when present, which logs exact counts).
        scaler: None, or the ``torch.amp.GradScaler`` that scales the loss: values are reported unscaled.
        hook: record automatically at the end of each backward (see the module doc). With False, call
            :meth:`record` yourself.
        vanish_ratio, explode_norm, explode_growth: the flag thresholds (see the module doc).
        backend: the grad_stats backend (None: C++ for CPU, Triton for CUDA).
        tag: the prefix of the writer's tags.

    Attributes:
        history: list of :class:`GradientRecord`, one per record.
        param_names: the monitored parameters' qualified names. module_names: the names of the modules
            that own them ("" is the model itself). bins: the histogram's :class:`HistogramBins`.

    The monitor holds hooks on the parameters until :meth:`close` (or the end of a ``with`` block).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int = 1,
        writer=None,
        scaler=None,
        hook: bool = True,
        vanish_ratio: float = VANISH_RATIO,
        explode_norm: float = EXPLODE_NORM,
        explode_growth: float = EXPLODE_GROWTH,
        backend: str | None = None,
        tag: str = "grad",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected a positive int, got {every!r}")
        if writer is not None and not (hasattr(writer, "add_scalar") and hasattr(writer, "add_histogram")):
            raise TypeError(
                f"writer: expected an object with add_scalar and add_histogram (a SummaryWriter), "
                f"got {type(writer).__name__}"
            )
        if scaler is not None and not hasattr(scaler, "_get_scale_async"):
            raise TypeError(f"scaler: expected a torch.amp.GradScaler, got {type(scaler).__name__}")
        for name, value in (("vanish_ratio", vanish_ratio), ("explode_norm", explode_norm),
                            ("explode_growth", explode_growth)):
            if not value > 0:
                raise ValueError(f"{name}: expected a positive number, got {value!r}")
        params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        for name, p in params:
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(
                    f"model: parameter {name!r} has dtype {p.dtype}; the monitor supports float32, "
                    "float64, float16 and bfloat16"
                )
        self.model = model
        self.every = every
        self.writer = writer
        self.scaler = scaler
        self.vanish_ratio = float(vanish_ratio)
        self.explode_norm = float(explode_norm)
        self.explode_growth = float(explode_growth)
        self.backend = backend
        self.tag = tag
        self.bins: HistogramBins = DEFAULT_BINS
        self.param_names = [name for name, _ in params]
        self._params = [p for _, p in params]
        # A parameter belongs to the module whose attribute it is: "a.b.weight" -> "a.b".
        owners = [name.rpartition(".")[0] for name in self.param_names]
        self.module_names = list(dict.fromkeys(owners))
        index = {m: i for i, m in enumerate(self.module_names)}
        self._owner = np.array([index[m] for m in owners], dtype=np.int64)
        self.module_numel = np.zeros(len(self.module_names), dtype=np.int64)
        np.add.at(self.module_numel, self._owner, [p.numel() for p in self._params])
        self.history: list[GradientRecord] = []
        self.steps = 0
        self._pending_task: int | None = None
        self._handles = []
        if hook:
            self._handles = [p.register_post_accumulate_grad_hook(self._on_accumulated) for p in self._params]

    # -------------------------------------------------------------------------------------------
    # Hooks

    def _on_accumulated(self, param: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task == self._pending_task:
            return
        self._pending_task = task
        torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        # Queued again so that it runs after every callback queued during the backward (DDP's).
        torch.autograd.Variable._execution_engine.queue_callback(self._record_from_hook)

    def _record_from_hook(self) -> None:
        self._pending_task = None
        self.record()

    def close(self) -> None:
        """Remove the hooks. The history stays."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> GradientMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------
    # Recording

    def record(self, force: bool = False) -> GradientRecord | None:
        """Count one step and, if it is due (or ``force``), record the current gradients.

        Returns the new :class:`GradientRecord`, or None when the step was not due.
        """
        step = self.steps
        self.steps += 1
        if not force and step % self.every != 0:
            return None
        entry = self._measure(step)
        self.history.append(entry)
        if self.writer is not None:
            self._log(entry)
        return entry

    def _measure(self, step: int) -> GradientRecord:
        n_params = len(self._params)
        ncol = self.bins.num_columns
        sumsq = np.full(n_params, np.nan)
        histogram = np.zeros(ncol, dtype=np.int64)
        inv_scale_value = 1.0
        scale = _scale_state(self.scaler)
        present = np.array([p.grad is not None for p in self._params], dtype=bool)
        by_device: dict[torch.device, list[int]] = {}
        for i in np.flatnonzero(present).tolist():
            by_device.setdefault(self._params[i].grad.device, []).append(i)
        inv_scale_any = None if scale is None else scale.double().reciprocal().float().reshape(1)
        implicit_zeros = 0
        for device, indices in by_device.items():
            grads = []
            for i in indices:
                g = self._params[i].grad
                if g.is_sparse:  # the values only (coalescing synchronises on CUDA); zeros counted here
                    g = g.coalesce()
                    implicit_zeros += g.numel() - g.values().numel()
                    g = g.values()
                grads.append(g)
            inv_scale = None if inv_scale_any is None else inv_scale_any.to(device)
            part_sumsq, part_hist = grad_stats(grads, inv_scale, bins=self.bins, backend=self.backend)
            pieces = [part_sumsq, part_hist.sum(0).to(torch.float64)]
            if inv_scale is not None:
                pieces.append(inv_scale.to(torch.float64))
            host = _to_host(torch.cat(pieces))
            sumsq[indices] = host[: len(indices)]
            histogram += np.rint(host[len(indices): len(indices) + ncol]).astype(np.int64)
            if inv_scale is not None:
                inv_scale_value = float(host[-1])
        histogram[ZERO] += implicit_zeros

        module_sumsq = np.zeros(len(self.module_names))
        np.add.at(module_sumsq, self._owner[present], sumsq[present])
        module_present = np.zeros(len(self.module_names), dtype=bool)
        module_present[self._owner[present]] = True
        module_norms = np.where(module_present, np.sqrt(module_sumsq), np.nan)
        total = float(np.sqrt(sumsq[present].sum())) if present.any() else math.nan
        entry = GradientRecord(
            step=step,
            param_norms=np.sqrt(sumsq),
            module_norms=module_norms,
            total_norm=total,
            histogram=histogram,
            inv_scale=inv_scale_value,
        )
        entry.flags = self._flags(module_norms, module_present)
        return entry

    def _flags(self, norms: np.ndarray, present: np.ndarray) -> dict[str, tuple[str, ...]]:
        def largest_finite(values: np.ndarray) -> float:
            finite = values[np.isfinite(values)]
            return float(finite.max()) if finite.size else 0.0

        largest = largest_finite(norms)
        previous = largest_finite(self.history[-1].module_norms) if self.history else 0.0
        flags: dict[str, tuple[str, ...]] = {}
        for i, name in enumerate(self.module_names):
            norm = norms[i]
            found = []
            if present[i] and not np.isfinite(norm):
                found.append("nonfinite")
            elif present[i]:
                if largest > 0 and norm < self.vanish_ratio * largest:
                    found.append("vanishing")
                if norm > self.explode_norm or (previous > 0 and norm > self.explode_growth * previous):
                    found.append("exploding")
            if found:
                flags[name] = tuple(found)
        return flags

    # -------------------------------------------------------------------------------------------
    # Output

    def _log_buckets(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Edges [bins + 3] and counts [bins + 2] of the log10|g| histogram: underflow drawn as one bin
        width below the range, the bins, overflow one bin width above. Zeros and NaN have no log."""
        edges = self.bins.edges().numpy()
        width = edges[1] - edges[0]
        edges = np.concatenate([[edges[0] - width], edges, [edges[-1] + width]])
        return edges, counts[UNDERFLOW: self.bins.overflow + 1].astype(np.float64)

    def _log(self, entry: GradientRecord) -> None:
        w, tag, step = self.writer, self.tag, entry.step
        w.add_scalar(f"{tag}/total_norm", entry.total_norm, step)
        for name, norm in zip(self.module_names, entry.module_norms, strict=True):
            if not np.isnan(norm):
                w.add_scalar(f"{tag}/norm/{name or 'model'}", float(norm), step)
        counts = entry.histogram
        if counts.sum() == 0:
            return
        w.add_scalar(f"{tag}/zero_fraction", counts[ZERO] / counts.sum(), step)
        w.add_scalar(f"{tag}/nan_count", int(counts[self.bins.nan]), step)
        edges, buckets = self._log_buckets(counts)
        if buckets.sum() == 0:
            return
        centers = (edges[:-1] + edges[1:]) / 2
        if hasattr(w, "add_histogram_raw"):  # exact counts
            nonempty = np.flatnonzero(buckets)
            w.add_histogram_raw(
                f"{tag}/log10_abs", min=float(edges[nonempty[0]]), max=float(edges[nonempty[-1] + 1]),
                num=int(buckets.sum()), sum=float((buckets * centers).sum()),
                sum_squares=float((buckets * centers**2).sum()), bucket_limits=edges[1:].tolist(),
                bucket_counts=buckets.tolist(), global_step=step,
            )
        else:  # bin centres repeated by their counts, thinned to a bounded sample
            keep = min(1.0, HISTOGRAM_FALLBACK_SAMPLES / buckets.sum())
            values = np.repeat(centers, np.rint(buckets * keep).astype(np.int64))
            w.add_histogram(f"{tag}/log10_abs", values, step, bins=edges)

    def module_norms(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps int64 [R], norms float64 [R, M]) over the history, modules in ``module_names`` order."""
        steps = np.array([e.step for e in self.history], dtype=np.int64)
        norms = np.array([e.module_norms for e in self.history], dtype=np.float64).reshape(
            len(self.history), len(self.module_names)
        )
        return steps, norms

    def summary(self) -> SummaryTable:
        """A table of the modules' gradient norms over the history, as text and as ``.rows``.

        Each row (one per module): ``module``, ``numel`` (parameter elements), ``norm`` (last record),
        ``min`` and ``max`` (over the records, finite values), ``relative`` (last norm over the largest
        module's last norm), ``flags`` (of the last record) and ``flagged`` (how many records flagged it).
        """
        if not self.history:
            return SummaryTable("GradientMonitor: nothing recorded yet", [])
        steps, norms = self.module_norms()
        last = self.history[-1]
        finite_last = last.module_norms[np.isfinite(last.module_norms)]
        largest = finite_last.max() if finite_last.size else math.nan
        rows = []
        for i, name in enumerate(self.module_names):
            column = norms[:, i]
            finite = column[np.isfinite(column)]
            rows.append({
                "module": name or "(model)",
                "numel": int(self.module_numel[i]),
                "norm": float(last.module_norms[i]),
                "min": float(finite.min()) if finite.size else math.nan,
                "max": float(finite.max()) if finite.size else math.nan,
                "relative": float(last.module_norms[i] / largest) if largest > 0 else math.nan,
                "flags": ",".join(last.flags.get(name, ())),
                "flagged": sum(1 for e in self.history if name in e.flags),
            })
        counts = last.histogram
        total = max(int(counts.sum()), 1)
        header = (
            f"GradientMonitor: {len(self.history)} records (steps {steps[0]}..{steps[-1]}, "
            f"every {self.every}); last total norm {last.total_norm:.3e}\n"
            f"last histogram: zeros {100 * counts[ZERO] / total:.2f}%, "
            f"|g| < 1e{self.bins.log10_min:g}: {100 * counts[UNDERFLOW] / total:.2f}%, "
            f"|g| > 1e{self.bins.log10_max:g} or inf: {int(counts[self.bins.overflow])}, "
            f"NaN: {int(counts[self.bins.nan])}"
        )
        width = max([len("module")] + [len(r["module"]) for r in rows])
        lines = [header, f"{'module':<{width}}  {'numel':>10}  {'norm':>10}  {'min':>10}  {'max':>10}  "
                         f"{'relative':>9}  flags"]
        for r in rows:
            lines.append(
                f"{r['module']:<{width}}  {r['numel']:>10}  {r['norm']:>10.3e}  {r['min']:>10.3e}  "
                f"{r['max']:>10.3e}  {r['relative']:>9.2e}  {r['flags'] or '-'}"
                + (f" (flagged in {r['flagged']} records)" if r["flagged"] else "")
            )
        return SummaryTable("\n".join(lines), rows)

    def plot(self, path: str | os.PathLike, max_histograms: int = 5) -> str:
        """Draw the module norms over steps (log y) and the log10|g| histograms to a PNG at ``path``.

        Up to ``max_histograms`` records, evenly spread over the history, are drawn in the histogram
        panel. Zero and non-finite norms cannot be drawn on a log axis: their count is in the legend.
        Returns the path as a string.
        """
        if not self.history:
            raise RuntimeError("plot: nothing recorded yet; run a backward (or record()) first")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(13, 5), layout="constrained")
        FigureCanvasAgg(fig)
        ax_norm, ax_hist = fig.subplots(1, 2)
        steps, norms = self.module_norms()
        order = np.argsort(-np.nan_to_num(norms[-1], nan=-np.inf, posinf=np.inf))
        for rank, i in enumerate(order):
            column = norms[:, i]
            drawable = np.isfinite(column) & (column > 0)
            hidden = int((~drawable).sum())
            label = self.module_names[i] or "(model)"
            if hidden:
                label += f" ({hidden} records zero, missing or non-finite)"
            ax_norm.plot(steps[drawable], column[drawable], marker="." if len(steps) < 30 else None,
                         label=label if rank < 12 else None, linewidth=1.2)
        ax_norm.set_yscale("log")
        ax_norm.xaxis.get_major_locator().set_params(integer=True)
        ax_norm.set_xlabel("step")
        ax_norm.set_ylabel("gradient L2 norm (log scale)")
        ax_norm.set_title("Gradient norm per module" + (" (12 largest labelled)" if len(order) > 12 else ""))
        ax_norm.grid(True, which="major", alpha=0.3)
        ax_norm.legend(fontsize=7, loc="best")

        count = min(max_histograms, len(self.history))
        picks = np.unique(np.linspace(0, len(self.history) - 1, count).astype(int))
        lo, hi = self.bins.log10_min, self.bins.log10_max
        shown = []
        for k in picks:
            entry = self.history[k]
            total = entry.histogram.sum()
            if total == 0:
                continue
            edges, buckets = self._log_buckets(entry.histogram)
            label = (f"step {entry.step}: zeros {100 * entry.histogram[ZERO] / total:.1f}%, "
                     f"NaN {int(entry.histogram[self.bins.nan])}")
            ax_hist.stairs(buckets / total, edges, label=label)
            nonempty = np.flatnonzero(buckets)
            shown += [edges[nonempty[0]], edges[nonempty[-1] + 1]]
        width = (hi - lo) / self.bins.bins
        ax_hist.axvspan(lo - width, lo, color="0.85", zorder=0)
        ax_hist.axvspan(hi, hi + width, color="0.85", zorder=0)
        if shown:
            ax_hist.set_xlim(max(min(shown), lo - width) - 0.5, min(max(shown), hi + width) + 0.5)
        ax_hist.set_yscale("log")
        ax_hist.set_xlabel(f"log10 |gradient| (grey: below 1e{lo:g} and above 1e{hi:g} or inf)")
        ax_hist.set_ylabel("fraction of gradient elements (log scale)")
        ax_hist.set_title("Histogram of gradient magnitudes, all parameters")
        ax_hist.grid(True, alpha=0.3)
        ax_hist.legend(fontsize=7, loc="best")
        unscaled = " (unscaled by the AMP loss scale)" if self.scaler is not None else ""
        fig.suptitle(f"GradientMonitor: {len(self.history)} records{unscaled}")
        fig.savefig(os.fspath(path), dpi=110)
        return os.fspath(path)

    def __repr__(self) -> str:
        return (
            f"GradientMonitor({len(self.param_names)} parameters in {len(self.module_names)} modules, "
            f"every={self.every}, {len(self.history)} records, hooked={bool(self._handles)})"
        )

