"""``python -m vgkernels demo``: the classic vanishing and exploding gradient results, measured.

a. BPTT at initialization (Hochreiter 1991; Bengio et al. 1994; Pascanu et al. 2013; Le et al. 2015;
   Jozefowicz et al. 2015): per-step gradient norms of seven recurrent setups, traced by the vgkernels
   modules, with the Frobenius and the spectral norm of every step's Jacobian, and the product of the
   spectral norms that bounds the decay.
b. Depth at initialization, every remedy side by side (Glorot & Bengio 2010; He et al. 2015; Ioffe &
   Szegedy 2015; Srivastava et al. 2015; Ba et al. 2016; Klambauer et al. 2017; Yilmaz & Poli 2022):
   the first-to-last-layer gradient ratio and the norms of a deep MLP for each activation and its
   usual initialization, against plain, residual, highway, LayerNorm and BatchNorm (train, eval).
c. Time at initialization, the same remedies through time (Le et al. 2015; Cooijmans et al. 2017;
   Zilly et al. 2017): the first-to-last-step gradient ratio of an Elman RNN.
d. Training on the adding problem (Le et al. 2015; Arjovsky et al. 2016) with global norm clipping
   (Pascanu et al. 2013): RNN-tanh against GRU against LSTM, and their gradient horizon before and
   after training.
e. A loss at every step (a language model): what the trace report can and cannot say, and the
   measurement that answers how far gradient travels back.
f. A verdict in words, generated from the numbers measured in this run.

Everything lands in one folder: ``report.md`` and the PNGs it shows. The tables are also printed.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

import vgkernels
from vgkernels import init as vinit
from vgkernels import tasks
from vgkernels.diagnostics.bptt import (
    TraceReport,
    draw_log_curves,
    format_number,
    last_step_traces,
    line_styles,
    plot_step_bounds,
    plot_trace,
    render_table,
    trace_report,
)
from vgkernels.diagnostics.spectral import spectral_norms

__all__ = ["DemoConfig", "DemoResult", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; :data:`DEFAULT` reproduces the classic numbers, :data:`QUICK` is a smoke run."""

    bptt_seq_len: int = 200
    bptt_hidden: int = 64
    bptt_batch: int = 32
    mlp_depth: int = 20
    mlp_width: int = 256
    mlp_batch: int = 64
    rnn_seq_len: int = 100
    rnn_hidden: int = 64
    rnn_batch: int = 32
    train_seq_len: int = 100
    train_hidden: int = 64
    train_batch: int = 64
    train_lr: float = 1e-2
    train_clip: float = 1.0
    train_max_steps: int = 2000
    train_target_mse: float = 0.01  # stop a model once its recent training MSE is below this
    train_window: int = 25  # steps in that running mean
    eval_batch: int = 1000
    horizon_batch: int = 64
    lm_vocab: int = 50
    lm_embed: int = 32
    lm_hidden: int = 64
    lm_layers: int = 2
    lm_seq_len: int = 35
    lm_batch: int = 20


DEFAULT = DemoConfig()
QUICK = replace(
    DEFAULT,
    bptt_seq_len=60,
    bptt_hidden=32,
    bptt_batch=8,
    mlp_depth=8,
    mlp_width=64,
    mlp_batch=16,
    rnn_seq_len=30,
    rnn_hidden=16,
    rnn_batch=8,
    train_seq_len=20,
    train_hidden=16,
    train_batch=32,
    train_max_steps=60,
    train_window=10,
    eval_batch=256,
    horizon_batch=16,
    lm_vocab=20,
    lm_embed=8,
    lm_hidden=16,
    lm_seq_len=12,
    lm_batch=4,
)

VANISHED = 1e-10  # a ratio below this (or an underflow to 0) counts as vanished
KEPT = 1e-2  # a ratio at or above this counts as kept
BAND = (1e-2, 1e2)  # a first-to-last ratio inside this band counts as preserved
EXPLODED = 1e6  # a largest gradient norm above this counts as exploding
LEARNED_MSE = 0.05  # final MSE below this: the task was learned
BASELINE_BAND = 0.12  # final MSE above this: no better than (about) the constant baseline


# ---------------------------------------------------------------------------------------------
# a. BPTT at initialization
# ---------------------------------------------------------------------------------------------

# name -> (module class, constructor kwargs, init scheme)
BPTT_SETUPS: dict[str, tuple[str, dict, str]] = {
    "RNN-sigmoid": ("RNN", {"nonlinearity": "sigmoid"}, "default"),
    "RNN-tanh": ("RNN", {"nonlinearity": "tanh"}, "default"),
    "IRNN": ("RNN", {"nonlinearity": "relu"}, "irnn"),
    "GRU": ("GRU", {}, "default"),
    "LSTM": ("LSTM", {}, "default"),
    "LSTM, forget bias 1": ("LSTM", {}, "default+forget_bias_1"),
    "LSTM, forget bias 3": ("LSTM", {}, "default+forget_bias_3"),
}


def _recurrent(kind: str, input_size: int, hidden: int, scheme: str, seed: int, device: str, **kwargs):
    module = getattr(vgkernels.nn, kind)(input_size, hidden, **kwargs)
    vinit.init_recurrent_(module, scheme, generator=torch.Generator().manual_seed(seed))
    return module.to(device)


def _bptt_at_init(cfg: DemoConfig, device: str, seed: int) -> tuple[dict[str, TraceReport], dict]:
    """The reports (loss on the last output; spectral norms given) and the spectral norms by name."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(cfg.bptt_seq_len, cfg.bptt_batch, 1, generator=gen).to(device)
    reports, spectra = {}, {}
    for name, (kind, kwargs, scheme) in tqdm(BPTT_SETUPS.items(), desc="a. BPTT at init", unit="model"):
        rnn = _recurrent(kind, 1, cfg.bptt_hidden, scheme, seed, device, track=True, **kwargs)
        output, _ = rnn(x)
        output[-1].sum().backward()  # the loss sits on the last output only
        spectra[name] = spectral_norms(rnn, x, layer=None)
        reports[name] = trace_report(rnn.trace, loss_steps="last", spectral=spectra[name], name=name)
    return reports, spectra


# ---------------------------------------------------------------------------------------------
# b, c. The remedies side by side, through depth and through time
# ---------------------------------------------------------------------------------------------

# (activation, init): the classic bad pairings, then every activation with its usual init.
DEPTH_ROWS: tuple[tuple[str, str], ...] = (
    ("sigmoid", "standard"),
    ("sigmoid", "negative_mean"),
    *((a, tasks.USUAL_INIT[a]) for a in tasks.ACTIVATIONS),
)
DEPTH_COLUMNS: dict[str, dict] = {
    "plain": {},
    "residual": {"residual": True},
    "highway": {"highway": True},
    "LayerNorm": {"layer_norm": True},
    "BatchNorm (train)": {"batch_norm": "train"},
    "BatchNorm (eval)": {"batch_norm": "eval"},
}
TIME_ROWS: tuple[tuple[str, str], ...] = (
    ("sigmoid", "default"),
    ("tanh", "default"),
    ("relu", "irnn"),
    *((a, tasks.USUAL_INIT[a]) for a in tasks.ACTIVATIONS),
)
# Through time every remedy but the residual connection, which makes h_t = h_(t-1) + act(...) grow.
TIME_COLUMNS: dict[str, dict] = {name: v for name, v in DEPTH_COLUMNS.items() if name != "residual"}
_INIT_NAMES = {"standard": "standard init", "negative_mean": "negative mean", "default": "default init"}


def _row_label(activation: str, init: str) -> str:
    return f"{activation} + {_INIT_NAMES.get(init, init)}"


@dataclass
class Grid:
    """Probes of every (activation + init) row and remedy column, in row-major order."""

    rows: list[str]
    columns: list[str]
    probes: dict[tuple[str, str], tasks.MLPProbe | tasks.RNNProbe]

    def all(self) -> list[tasks.MLPProbe | tasks.RNNProbe]:
        return [self.probes[r, c] for r in self.rows for c in self.columns]


def _grid(rows, columns: dict[str, dict], probe: Callable, desc: str) -> Grid:
    cells = [(a, i, c) for a, i in rows for c in columns]
    probes = {
        (_row_label(a, i), c): probe(a, i, **columns[c]) for a, i, c in tqdm(cells, desc=desc, unit="probe")
    }
    return Grid([_row_label(a, i) for a, i in rows], list(columns), probes)


def _depth_grid(cfg: DemoConfig, device: str, seed: int) -> Grid:
    def probe(activation, init, **variant):
        return tasks.mlp_gradient_probe(cfg.mlp_depth, cfg.mlp_width, activation, init,
                                        batch_size=cfg.mlp_batch, seed=seed, device=device, **variant)

    return _grid(DEPTH_ROWS, DEPTH_COLUMNS, probe, "b. depth, remedies")


def _time_grid(cfg: DemoConfig, device: str, seed: int) -> Grid:
    def probe(activation, init, **variant):
        return tasks.rnn_gradient_probe(cfg.rnn_seq_len, cfg.rnn_hidden, activation, init,
                                        batch_size=cfg.rnn_batch, seed=seed, device=device, **variant)

    return _grid(TIME_ROWS, TIME_COLUMNS, probe, "c. time, remedies")


# ---------------------------------------------------------------------------------------------
# d. Training on the adding problem
# ---------------------------------------------------------------------------------------------


class AddingModel(torch.nn.Module):
    """A vgkernels recurrent layer over [B, T, 2] and a linear read-out of its last output -> [B, 1]."""

    def __init__(self, rnn: torch.nn.Module, hidden: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = torch.nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = self.rnn(x)
        return self.head(output[:, -1])


@dataclass
class TrainResult:
    """One model's run on the adding problem."""

    name: str
    steps: int
    seconds: float
    losses: list[float]
    final_mse: float
    init_report: TraceReport
    trained_report: TraceReport
    stopped_early: bool


TRAIN_SETUPS: dict[str, tuple[str, dict]] = {
    "GRU": ("GRU", {}),
    "LSTM": ("LSTM", {}),
    "RNN-tanh": ("RNN", {"nonlinearity": "tanh"}),
}


def _horizon_report(model: AddingModel, x: torch.Tensor, y: torch.Tensor, name: str) -> TraceReport:
    with vgkernels.track(model) as traces:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return trace_report(traces["rnn"], loss_steps="last", name=name)  # the head reads the last output


def _train_one(
    name: str, cfg: DemoConfig, device: str, seed: int, max_steps: int, held_out, probe
) -> TrainResult:
    kind, kwargs = TRAIN_SETUPS[name]
    rnn = _recurrent(kind, 2, cfg.train_hidden, "default", seed, device, batch_first=True, **kwargs)
    model = AddingModel(rnn, cfg.train_hidden)
    head = torch.Generator().manual_seed(seed)  # torch.nn.Linear's default init, from our seed
    vinit.kaiming_uniform_(model.head.weight, a=math.sqrt(5), nonlinearity="leaky_relu", generator=head)
    vinit.default_(model.head.bias, cfg.train_hidden, generator=head)
    model = model.to(device)
    init_report = _horizon_report(model, *probe, f"{name} at init")
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train_lr)
    data = torch.Generator().manual_seed(seed + 1)  # the same batches for every model
    losses: list[float] = []
    stopped = False
    start = time.perf_counter()
    bar = tqdm(range(max_steps), desc=f"d. train {name}", unit="step", leave=True)
    for step in bar:
        x, y = tasks.adding_problem(cfg.train_batch, cfg.train_seq_len, generator=data, device=device)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        vgkernels.clip_grad_norm_(model.parameters(), cfg.train_clip)
        optimizer.step()
        losses.append(loss.item())
        recent = sum(losses[-cfg.train_window :]) / len(losses[-cfg.train_window :])
        if step % 10 == 0:
            bar.set_postfix(mse=f"{recent:.4f}")
        if len(losses) >= cfg.train_window and recent < cfg.train_target_mse:
            stopped = True
            bar.close()
            break
    seconds = time.perf_counter() - start
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model(held_out[0]), held_out[1]).item()
    trained_report = _horizon_report(model, *probe, f"{name} trained")
    return TrainResult(name, len(losses), seconds, losses, final, init_report, trained_report, stopped)


def _training(cfg: DemoConfig, device: str, seed: int) -> list[TrainResult]:
    held_out = tasks.adding_problem(cfg.eval_batch, cfg.train_seq_len, seed=seed + 2, device=device)
    probe = (held_out[0][: cfg.horizon_batch], held_out[1][: cfg.horizon_batch])
    results = []
    # The gated models first; the RNN-tanh then gets as many steps as the slower of them needed.
    for name in ("GRU", "LSTM"):
        results.append(_train_one(name, cfg, device, seed, cfg.train_max_steps, held_out, probe))
    budget = max(r.steps for r in results)
    results.append(_train_one("RNN-tanh", cfg, device, seed, budget, held_out, probe))
    return results


# ---------------------------------------------------------------------------------------------
# e. A loss at every step
# ---------------------------------------------------------------------------------------------


class LanguageModel(torch.nn.Module):
    """Embedding, a multi-layer vgkernels recurrent layer and a decoder: next-token logits [T, B, V]."""

    def __init__(self, kind: str, cfg: DemoConfig) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(cfg.lm_vocab, cfg.lm_embed)
        self.rnn = getattr(vgkernels.nn, kind)(cfg.lm_embed, cfg.lm_hidden, num_layers=cfg.lm_layers)
        self.dec = torch.nn.Linear(cfg.lm_hidden, cfg.lm_vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dec(self.rnn(self.emb(tokens))[0])


@dataclass
class PerStepResult:
    """What the reports say about one language model's trace with a loss at every step."""

    name: str
    unknown: TraceReport  # loss_steps not given: measured from the gradient reaching the output
    every: TraceReport  # loss_steps="all"
    last: TraceReport  # last_step_traces, loss_steps="last"


def _per_step_losses(cfg: DemoConfig, device: str, seed: int) -> list[PerStepResult]:
    gen = torch.Generator().manual_seed(seed + 3)
    tokens = torch.randint(0, cfg.lm_vocab, (cfg.lm_seq_len + 1, cfg.lm_batch), generator=gen).to(device)
    inputs, targets = tokens[:-1], tokens[1:]
    results = []
    for kind in tqdm(("LSTM", "GRU"), desc="e. per-step losses", unit="model"):
        with torch.random.fork_rng(devices=[]):  # torch.nn's own init, seeded, the caller's stream untouched
            torch.manual_seed(seed)
            model = LanguageModel(kind, cfg).to(device)

        def step_losses(model=model) -> torch.Tensor:
            """[B, T] cross-entropy of every step's next-token prediction."""
            logits = model(inputs)
            return torch.nn.functional.cross_entropy(logits.permute(1, 2, 0), targets.t(), reduction="none")

        with vgkernels.track(model) as traces:
            step_losses().mean().backward()  # a language model's loss: the mean over every step
        trace = traces["rnn"]
        with torch.no_grad():
            embedded = model.emb(inputs)
        spectral = spectral_norms(model.rnn, embedded, layer=None)
        last = last_step_traces(model, step_losses)["rnn"]
        name = f"{kind} ({cfg.lm_layers} layers)"
        results.append(
            PerStepResult(
                name=name,
                unknown=trace_report(trace, name=f"{name}, loss at every step"),
                every=trace_report(trace, loss_steps="all", name=name),
                last=trace_report(last, loss_steps="last", spectral=spectral, name=f"{name}, last loss"),
            )
        )
    return results


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def _figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (9, 5.5)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=90)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _plot_mlp(grid: Grid, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    cols = 3
    fig, axes = _figure(-(-len(grid.columns) // cols), cols, (12, 7))
    styles = line_styles(len(grid.rows))
    for k, column in enumerate(grid.columns):
        ax = axes[k // cols, k % cols]
        series = [(row, torch.tensor(grid.probes[row, column].norms)) for row in grid.rows]
        draw_log_curves(ax, series, styles, start=1)  # blocks count from 1
        ax.set_title(column)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[-1]:
        ax.set_xlabel("block l (1 = next to the input)")
    for ax in axes[:, 0]:
        ax.set_ylabel("‖∂loss/∂W_l‖_F  (log scale)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9)
    probe = grid.all()[0]
    fig.suptitle(f"Gradient norm per layer at initialization: {probe.depth}-layer MLP, width {probe.width}")
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    return path


def _draw_heatmap(fig, ax, grid: Grid, title: str) -> None:
    """log10 of each probe's first/last ratio, coloured from vanished (red) through 1 to exploded (blue)."""
    limit = 12.0
    values = [[grid.probes[r, c].ratio for c in grid.columns] for r in grid.rows]
    values = torch.tensor(values, dtype=torch.float64)
    logs = torch.where(values > 0, values.log10(), torch.tensor(-math.inf, dtype=torch.float64))
    image = ax.imshow(logs.clamp(-limit, limit).nan_to_num(-limit).numpy(), cmap="RdBu", vmin=-limit,
                      vmax=limit, aspect="auto")
    for i in range(len(grid.rows)):
        for j in range(len(grid.columns)):
            v = float(values[i, j])
            dark = abs(float(logs[i, j].clamp(-limit, limit).nan_to_num(-limit))) > 0.6 * limit
            ax.text(j, i, _ratio_text(v).replace(" (underflow)", ""), ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    ax.set_xticks(range(len(grid.columns)), grid.columns, rotation=30, ha="right", fontsize=9)
    ax.set_yticks(range(len(grid.rows)), grid.rows, fontsize=9)
    ax.set_title(title, fontsize=10)
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label(f"log10 ratio (clipped to ±{limit:g})")


def _plot_remedies(depth: Grid, time_grid: Grid, path: Path) -> Path:
    fig, axes = _figure(1, 2, (16, 6.5))
    mlp, rnn = depth.all()[0], time_grid.all()[0]
    _draw_heatmap(fig, axes[0, 0], depth,
                  f"Through depth: ‖∇W‖ of block 1 / block {mlp.depth} (MLP, width {mlp.width})")
    _draw_heatmap(fig, axes[0, 1], time_grid,
                  f"Through time: ‖∂loss/∂h_0‖ / ‖∂loss/∂h_(T-1)‖ "
                  f"(Elman RNN, T = {rnn.seq_len}, H = {rnn.hidden})")
    fig.suptitle("The remedies side by side at initialization: red vanishes, white keeps, blue explodes")
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    return path


def _plot_training(results: list[TrainResult], cfg: DemoConfig, path: Path) -> Path:
    fig, axes = _figure(1, 1, (9, 5))
    ax = axes[0, 0]
    for r, style in zip(results, line_styles(len(results)), strict=True):
        losses = torch.tensor(r.losses)
        steps = torch.arange(1, len(losses) + 1)
        window = min(cfg.train_window, len(losses))
        smooth = torch.nn.functional.avg_pool1d(losses[None, None], window, 1)[0, 0]
        ax.plot(steps.numpy(), losses.numpy(), color=style["color"], alpha=0.2, linewidth=0.8)
        ax.plot(
            steps[window - 1 :].numpy(),
            smooth.numpy(),
            color=style["color"],
            linewidth=2,
            label=f"{r.name} (held-out MSE {format_number(r.final_mse)})",
        )
    ax.axhline(
        tasks.ADDING_BASELINE_MSE,
        color="0.3",
        linestyle="--",
        linewidth=1,
        label="baseline: predict 1, MSE 1/6",
    )
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"training MSE (log scale; bold: mean of {cfg.train_window} steps)")
    ax.set_title(
        f"Adding problem, T = {cfg.train_seq_len}: Adam lr {cfg.train_lr:g}, "
        f"global norm clip {cfg.train_clip:g}"
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _ratio_text(ratio: float) -> str:
    return "0 (underflow)" if ratio == 0 else format_number(ratio)


def _horizon_text(report: TraceReport) -> str:
    return report.rows[0].horizon_text(report.assumed)


def _bptt_table(reports: dict[str, TraceReport], fmt: str) -> str:
    headers = (
        "model",
        "‖g‖ at t=T-1",
        "‖g‖ at t=0",
        "ratio t=0 / t=T-1",
        "horizon (steps)",
        "decay (decades/step)",
        "steps at exactly 0",
        "mean ‖J_t‖_F",
        "mean ‖J_t‖₂",
        "Π‖J_t‖₂, t=T-1…1",
        "horizon ‖J‖₂ allows",
    )
    rows = []
    for name, rep in reports.items():
        r = rep.rows[0]
        rows.append(
            [
                name,
                r.grad_anchor,
                r.grad_first,
                _ratio_text(r.ratio),
                _horizon_text(rep),
                r.decay_rate,
                r.zero_steps,
                r.jac_mean,
                r.spec_mean,
                "-" if r.bound_ratio is None else _ratio_text(r.bound_ratio),
                r.bound_horizon_text(),
            ]
        )
    return render_table(headers, rows, fmt)


def _grid_table(grid: Grid, value: Callable, fmt: str, corner: str = "activation + init") -> str:
    rows = [[row, *(value(grid.probes[row, column]) for column in grid.columns)] for row in grid.rows]
    return render_table((corner, *grid.columns), rows, fmt)


def _ratio_cell(probe) -> str:
    return _ratio_text(probe.ratio)


def _largest_cell(probe) -> str:
    return format_number(max(probe.norms))


def _mlp_table(probes: list[tasks.MLPProbe], fmt: str) -> str:
    headers = ("setup", "‖∇W‖ first block", "‖∇W‖ last block", "largest ‖∇W‖", "ratio first/last")
    rows = [[p.setup, p.first, p.last, max(p.weight_grad_norms), p.ratio] for p in probes]
    return render_table(headers, rows, fmt)


def _train_table(results: list[TrainResult], fmt: str) -> str:
    headers = (
        "model",
        "steps",
        "held-out MSE",
        "MSE / baseline",
        "horizon at init",
        "horizon trained",
        "train time (s)",
    )
    rows = []
    for r in results:
        rows.append(
            [
                r.name,
                r.steps,
                r.final_mse,
                r.final_mse / tasks.ADDING_BASELINE_MSE,
                _horizon_text(r.init_report),
                _horizon_text(r.trained_report),
                f"{r.seconds:.1f}",
            ]
        )
    return render_table(headers, rows, fmt)


def _per_step_table(results: list[PerStepResult], fmt: str) -> str:
    headers = (
        "model",
        "layer",
        "horizon, losses not given",
        "loss_steps='all'",
        "last step's loss alone",
        "‖J‖₂ allows (top layer)",
    )
    rows = []
    for r in results:
        for k, row in enumerate(r.unknown.rows):
            rows.append(
                [
                    r.name,
                    row.label,
                    row.horizon_text(r.unknown.assumed),
                    r.every.rows[k].horizon_text(),
                    r.last.rows[k].horizon_text(),
                    r.last.rows[k].bound_horizon_text(),
                ]
            )
    return render_table(headers, rows, fmt)


# ---------------------------------------------------------------------------------------------
# Verdict
# ---------------------------------------------------------------------------------------------


def _names(items: list[str]) -> str:
    if not items:
        return "none"
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _orders(ratio: float) -> str:
    return f"{-math.log10(ratio):.0f}" if ratio > 0 else "all (underflow to 0)"


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _in_band(ratio: float) -> bool:
    return BAND[0] <= ratio <= BAND[1]


def _underflow_sentence(bptt: dict[str, TraceReport]) -> str:
    underflow = [n for n, rep in bptt.items() if rep.rows[0].zero_steps]
    if not underflow:
        return (
            "No gradient underflowed to exactly 0 in this run (in float32 it can: a gradient below about "
            "1e-38, or 1e-45 with denormals, reads 0)."
        )
    ratios = "its ratio reads" if len(underflow) == 1 else "their ratios read"
    return (
        f"In float32 the gradient underflowed to exactly 0 for {_names(underflow)}: long before t = 0 "
        f"its elements fell below what float32 holds (about 1e-38, or 1e-45 with denormals), so "
        f"backpropagation itself carried zeros from there on, and {ratios} 0 although the exact values "
        f"are tiny but positive. The plot draws those steps as ▼ in a shaded band at its bottom instead "
        f"of dropping them."
    )


def _verdict_bptt(bptt: dict[str, TraceReport], T: int) -> list[str]:
    out = []
    rows = {name: rep.rows[0] for name, rep in bptt.items()}
    vanished = [n for n, r in rows.items() if r.ratio < VANISHED]
    kept = [n for n, r in rows.items() if r.ratio >= KEPT]
    middle = [n for n in rows if n not in vanished and n not in kept]
    ratio = lambda n: "underflow to 0" if rows[n].ratio == 0 else f"ratio {format_number(rows[n].ratio)}"
    cite = lambda n: f"{n} ({ratio(n)}, {format_number(rows[n].decay_rate)} decades lost per step)"
    out.append(
        f"**Recurrent nets at initialization, {T} steps.** The gradient that reaches t = 0 is below "
        f"{VANISHED:g} of its value at the loss for {_names([cite(n) for n in vanished])}. "
        f"It keeps at least {KEPT:g} for {_names([cite(n) for n in kept])}"
        + (f"; in between: {_names([cite(n) for n in middle])}." if middle else ".")
    )
    out.append(_underflow_sentence(bptt))
    gated = [n for n in ("GRU", "LSTM") if n in rows]
    fixes = [n for n in ("IRNN", "LSTM, forget bias 3") if n in kept]
    if gated and all(n in vanished for n in gated) and fixes:
        why = {
            "IRNN": "the identity recurrent matrix",
            "LSTM, forget bias 3": f"a forget gate that starts open (sigmoid(3) = {_sigmoid(3.0):.2f})",
        }
        if all(rows[n].ratio == 0 for n in gated):
            kept_gated = "nothing that float32 can show"
        else:
            kept_gated = "only " + _names([_ratio_text(rows[n].ratio) for n in gated])
        out.append(
            f"Gating alone does not save the gradient at initialization: {_names(gated)} with default "
            f"weights keep {kept_gated} of it. What saves it "
            f"is the initialization: {_names(fixes)} keep "
            f"{_names([_ratio_text(rows[n].ratio) for n in fixes])}. With {_names([why[n] for n in fixes])}, "
            f"each step's Jacobian starts close to the identity."
        )
    elif gated:
        out.append(
            f"Gated models with default weights: {_names([cite(n) for n in gated])}; "
            f"the initialization fixes kept {_names([cite(n) for n in fixes]) if fixes else 'none'}."
        )
    return out


def _verdict_step_norms(bptt: dict[str, TraceReport], T: int) -> list[str]:
    rows = {name: rep.rows[0] for name, rep in bptt.items() if rep.rows[0].spec_mean is not None}
    if not rows:
        return []
    frob = [n for n, r in rows.items() if r.jac_mean > 1 and r.ratio < VANISHED]
    shrinking = [n for n, r in rows.items() if r.spec_frac_below_1 == 1.0]
    bounded = [f"{n} (mean ‖J‖₂ {format_number(rows[n].spec_mean)}, product at most "
               f"{_ratio_text(rows[n].bound_ratio)})" for n in shrinking if rows[n].bound_ratio is not None]
    measured = {n: r for n, r in rows.items() if r.horizon is not None and r.bound_horizon is not None}
    close = [n for n, r in measured.items()
             if not r.horizon_full and not r.bound_horizon_full and r.bound_horizon <= 2 * r.horizon + 2]
    far = [n for n, r in measured.items() if not r.horizon_full and n not in close]
    out = [
        f"**Step norms.** The Frobenius norm of the step Jacobian averages above 1 for "
        f"{_names([f'{n} ({format_number(rows[n].jac_mean)})' for n in frob])}, whose gradients vanished "
        f"all the same: as an upper bound of the spectral norm it proves nothing there. The spectral norm, "
        f"the most one step can stretch a gradient, is below 1 at every step for {_names(bounded)}: every "
        f"step shrinks every gradient, and the product over the {T - 1} steps bounds the ratio."
    ]
    allowed = lambda n: f"{n} ({rows[n].horizon} steps, allowed {rows[n].bound_horizon_text()})"  # noqa: E731
    if close or far:
        out.append(
            "The step norms alone explain the decay (they allow at most twice the measured horizon, plus "
            f"two steps) for {_names([allowed(n) for n in close])}. "
            f"They allow far more than the gradient reached for {_names([allowed(n) for n in far])}: "
            "there the gradient decays faster than the norms force, because it does not lie along each "
            "step's most stretched direction."
        )
    return out


def _verdict_depth(grid: Grid) -> list[str]:
    out = []
    by = {p.setup: p for p in grid.all()}
    plain = by.get("sigmoid + standard init")
    depth = grid.all()[0].depth
    if plain is not None:
        negative = by.get("sigmoid + negative mean")
        lift = ""
        if negative is not None and negative.ratio > 0 and plain.ratio > 0:
            lift = (
                f" The negative-mean init moves it from {format_number(plain.ratio)} to "
                f"{format_number(negative.ratio)}, {math.log10(negative.ratio / plain.ratio):.0f} orders "
                f"of magnitude closer to 1."
            )
        out.append(
            f"**Depth at initialization, {depth} layers, every remedy.** With the sigmoid and standard init "
            f"the first layer's gradient is {format_number(plain.ratio)} of the last layer's "
            f"({_orders(plain.ratio)} orders of magnitude): the sigmoid's derivative is at most 0.25." + lift
        )
    plain_ok = [f"{r} ({_ratio_text(grid.probes[r, 'plain'].ratio)})" for r in grid.rows
                if _in_band(grid.probes[r, "plain"].ratio)]
    if plain_ok:
        out.append(
            f"Without skip connections or normalization, the ratio stays within [{BAND[0]:g}, {BAND[1]:g}] "
            f"for {_names(plain_ok)}."
        )
    else:
        out.append("Without skip connections or normalization, no setup keeps the ratio within the band.")
    counts = [f"{c} {sum(_in_band(grid.probes[r, c].ratio) for r in grid.rows)}/{len(grid.rows)}"
              for c in grid.columns]
    everyone = [c for c in grid.columns if all(_in_band(grid.probes[r, c].ratio) for r in grid.rows)]
    out.append(
        f"Setups kept within the band, by remedy: {_names(counts)}. "
        + (f"{_capital(_names(everyone))} keep{'s' if len(everyone) == 1 else ''} every activation and "
           f"initialization within it, the sigmoid with torch's default init included."
           if everyone else "No remedy keeps every setup within it.")
    )
    exploding = [(c, p) for (r, c), p in grid.probes.items() if max(p.norms) > EXPLODED]
    if exploding:
        worst = max((p for _, p in exploding), key=lambda p: max(p.norms))
        columns = sorted({c for c, _ in exploding}, key=grid.columns.index)
        many = len(exploding) > 1
        line = (
            f"A good ratio can hide an explosion: {len(exploding)} setup{'s' if many else ''}, "
            f"{'all ' if many else ''}in {_names(columns)}, ha{'ve' if many else 's'} gradient norms above "
            f"{EXPLODED:g}, up to {format_number(max(worst.norms))} ({worst.setup}, ratio "
            f"{_ratio_text(worst.ratio)})"
        )
        if all(getattr(p, "residual", False) for _, p in exploding):
            line += ": without normalization each residual block adds to the variance of the next"
        normed = [max(grid.probes[r, c].norms) for r in grid.rows for c in grid.columns if "Norm" in c]
        if normed:
            line += f". With LayerNorm or BatchNorm the largest norm is {format_number(max(normed))}"
        out.append(line + ".")
    return out


def _verdict_time(grid: Grid) -> list[str]:
    probe = grid.all()[0]
    plain = {r: grid.probes[r, "plain"] for r in grid.rows}
    vanished = [r for r, p in plain.items() if p.ratio < VANISHED]
    kept = [r for r, p in plain.items() if _in_band(p.ratio)]
    counts = [f"{c} {sum(_in_band(grid.probes[r, c].ratio) for r in grid.rows)}/{len(grid.rows)}"
              for c in grid.columns]
    best = max(grid.columns, key=lambda c: sum(_in_band(grid.probes[r, c].ratio) for r in grid.rows))
    return [
        f"**Through time at initialization, T = {probe.seq_len}, every remedy.** In the plain Elman RNN the "
        f"gradient at t = 0 is below {VANISHED:g} of its value at the loss for {_names(vanished)}, and "
        f"within [{BAND[0]:g}, {BAND[1]:g}] for "
        f"{_names([f'{r} ({_ratio_text(plain[r].ratio)})' for r in kept])}. "
        f"Setups kept within the band, by remedy: {_names(counts)}; the most with {best}. Through time "
        f"the same weights act at every step, so a remedy that fixes depth need not fix time."
    ]


def _verdict_training(training: list[TrainResult], cfg: DemoConfig) -> list[str]:
    if not training:
        return []
    learned = [r for r in training if r.final_mse < LEARNED_MSE]
    stuck = [r for r in training if r.final_mse > BASELINE_BAND]
    fmt_r = lambda r: f"{r.name} (MSE {format_number(r.final_mse)} after {r.steps} steps)"
    moved = [f"{r.name} from {_horizon_text(r.init_report)} to {_horizon_text(r.trained_report)} steps"
             for r in training]
    reach = cfg.train_seq_len - cfg.train_seq_len // 2  # the first marker lies at least this far back
    short = [r.name for r in stuck if (r.trained_report.rows[0].horizon or 0) < reach]
    return [
        f"**Training on the adding problem, T = {cfg.train_seq_len}.** Learned (held-out MSE below "
        f"{LEARNED_MSE:g}): {_names([fmt_r(r) for r in learned])}. Stayed near the baseline of 1/6 "
        f"(above {BASELINE_BAND:g}): {_names([fmt_r(r) for r in stuck])}.",
        f"After training the picture changes: the gradient horizon went {_names(moved)}. The first "
        f"marker lies {reach} to {cfg.train_seq_len - 1} steps before the loss, so a model learns the "
        f"sum only once its gradient reaches that far back"
        + (f"; the gradient of {_names(short)} never did." if short else "."),
    ]


def _verdict_per_step(results: list[PerStepResult]) -> list[str]:
    if not results:
        return []
    naive = "; ".join(f"{_names([row.horizon_text(r.unknown.assumed) for row in r.unknown.rows])} for the "
                      f"{r.name}" for r in results)
    measured = all(r.unknown.loss_steps_measured for r in results)
    stated_none = all(row.horizon_text() == "n/a" for r in results for row in r.unknown.rows)
    travelled = "; ".join(f"{_names([row.horizon_text() for row in r.last.rows])} steps in the {r.name}"
                          for r in results)
    T = results[0].unknown.seq_len
    return [
        "**A loss at every step.** There the gradient at each step is mostly that step's own loss, so a "
        "horizon read off the trace would say where the losses sit, not how far gradient travels. "
        + ("Not told where the losses are, the report measured them from the gradient that reached the "
           "layers' output at every step, and "
           + ("stated no horizon for any layer. " if stated_none else f"stated horizons of {naive}. ")
           if measured else f"Not told where the losses are, the report stated horizons of {naive}. ")
        + f"Told loss_steps='all', it states none either. The gradient of the last step's loss alone "
        f"(last_step_traces: one extra forward and backward) reaches back {travelled}, of {T - 1} possible."
    ]


def _verdict(
    bptt: dict[str, TraceReport],
    depth: Grid | None,
    time_grid: Grid | None,
    training: list[TrainResult],
    per_step: list[PerStepResult],
    cfg: DemoConfig,
) -> list[str]:
    """Plain-word conclusions; every number and every claim is read from this run's measurements."""
    out = _verdict_bptt(bptt, cfg.bptt_seq_len) + _verdict_step_norms(bptt, cfg.bptt_seq_len)
    if depth is not None:
        out += _verdict_depth(depth)
    if time_grid is not None:
        out += _verdict_time(time_grid)
    return out + _verdict_training(training, cfg) + _verdict_per_step(per_step)


def _platform() -> str:
    cpu = platform.processor() or platform.machine()
    try:  # the CPU's model name, where Linux tells it
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return (
        f"{platform.system()}, {cpu}, {os.cpu_count()} cores, {threads} torch "
        f"thread{'s' if threads != 1 else ''}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, "
        f"vgkernels {vgkernels.__version__}"
    )


def _report_markdown(
    cfg: DemoConfig,
    quick: bool,
    seed: int,
    device: str,
    seconds: dict[str, float],
    result: DemoResult,
) -> str:
    fig = {f.stem: f.name for f in result.figures}
    command = f"python -m vgkernels demo{' --quick' if quick else ''} --seed {seed} --device {device}"
    parts = ", ".join(f"{k} {seconds[k]:.0f} s" for k in "abcde")
    run = (
        f"`{command}` on {_platform()}. Wall time {seconds['total']:.0f} s (parts {parts}). Every number "
        f"below was measured in this run."
    )
    if quick:
        run += " This was a `--quick` run at tiny sizes: its numbers do not show the classic results."
    part_a = (
        f"IRNN is the ReLU RNN with identity recurrent weights (Le et al. 2015); a forget bias is the "
        f"effective b_ih + b_hh of the LSTM's forget gate. One layer, hidden size {cfg.bptt_hidden}, "
        f"batch {cfg.bptt_batch}, T = {cfg.bptt_seq_len} inputs drawn from U[0, 1], loss = sum of the last "
        f"output (`loss_steps='last'`). The vgkernels modules with `track=True` record ‖∂loss/∂h_t‖ at every "
        f"step (float32). The horizon counts the steps back from the loss over which the gradient stays "
        f">= 1e-3 of its value there; the decay is the slope of log10 ‖∂loss/∂h_t‖ over t, fitted on the "
        f"nonzero steps. ‖J_t‖_F is the Frobenius norm of the step Jacobian ∂s_t/∂s_(t-1), from the trace; "
        f"‖J_t‖₂ its spectral norm, the most one step can stretch a gradient, computed exactly by "
        f"`vgkernels.diagnostics.spectral_norms` (both averaged over the batch and the steps). The product "
        f"of the spectral norms from the loss back to t = 0 (largest over the samples) bounds the ratio, and "
        f"the horizon it allows bounds the horizon."
    )
    mlp = result.depth.all()[0]
    part_b = (
        f"{mlp.depth} blocks of width {mlp.width}, batch {mlp.batch_size} of N(0, 1) inputs, loss = sum of "
        f"the outputs. A block is act(Linear(h)); residual: h + act(Linear(h)); highway: T·act(Linear(h)) + "
        f"(1 - T)·h with the transform gate T = sigmoid(Linear_T(h)) and its bias at "
        f"{tasks.HIGHWAY_BIAS:g} (Srivastava et al. 2015); LayerNorm before the Linear (pre-LN); BatchNorm "
        f"between the Linear and the activation (Ioffe & Szegedy 2015), with the batch's statistics "
        f"(train) or with running statistics from {tasks.CALIBRATION_BATCHES} batches (eval). Standard init "
        f"is torch.nn.Linear's; negative mean is N(max(-1, -8/N), 0.1²) (Yilmaz & Poli 2022, as "
        f"reconstructed); Xavier is uniform; He is normal with the ReLU gain (the leaky ReLU's for leaky "
        f"ReLU); LeCun is N(0, 1/N), SELU's pairing (Klambauer et al. 2017). Each cell is the ratio of the "
        f"first block's weight gradient to the last block's; the second table gives the largest norm over "
        f"the blocks, because a ratio near 1 can hide norms that explode."
    )
    rnn = result.time.all()[0]
    part_c = (
        f"An Elman RNN (`vgkernels.tasks.rnn_gradient_probe`), hidden size {rnn.hidden}, batch "
        f"{rnn.batch_size}, T = {rnn.seq_len} inputs from U[0, 1], loss = sum of the last state. Default "
        f"init is torch.nn's U[-1/sqrt(H), 1/sqrt(H)]; IRNN sets W_hh = I. Highway: h_t = T·act(a) + "
        f"(1 - T)·h_(t-1), the transform gate's bias at {tasks.HIGHWAY_BIAS:g} (a recurrent highway layer "
        f"of depth 1, Zilly et "
        f"al. 2017); LayerNorm of the summed inputs (Ba et al. 2016); BatchNorm of W_ih x_t and W_hh h_(t-1) "
        f"separately, with statistics per step and gains {tasks.RECURRENT_BN_GAIN:g} (Cooijmans et al. "
        f"2017). "
        f"Each cell is ‖∂loss/∂h_0‖ / ‖∂loss/∂h_(T-1)‖."
    )
    part_d = (
        f"T = {cfg.train_seq_len}, hidden {cfg.train_hidden}, batch {cfg.train_batch}, Adam lr "
        f"{cfg.train_lr:g}, `vgkernels.clip_grad_norm_` at {cfg.train_clip:g}, seed {seed}, every "
        f"model on the same batches. A model stops once its mean training MSE over "
        f"{cfg.train_window} steps falls below {cfg.train_target_mse:g} (at most "
        f"{cfg.train_max_steps} steps); the RNN-tanh gets as many steps as the slower gated model "
        f"used. The MSE is measured on {cfg.eval_batch} held-out sequences; the constant prediction "
        f"1 scores 1/6 ≈ 0.167. The horizons come from `vgkernels.track` on {cfg.horizon_batch} "
        f"held-out sequences with the MSE loss on the last output, before and after training."
    )
    part_e = (
        f"A word-level language model at initialization: embedding {cfg.lm_embed}, a {cfg.lm_layers}-layer "
        f"vgkernels LSTM or GRU of hidden size {cfg.lm_hidden}, a linear decoder over {cfg.lm_vocab} tokens; "
        f"random tokens, T = {cfg.lm_seq_len}, batch {cfg.lm_batch}, and the loss of every step's next-token "
        f"prediction (the mean cross-entropy), as in training. The same trace, reported two ways: without "
        f"saying where the losses are (the report measures them from the gradient that reaches the layers' "
        f"output at each step, the trace's `output_grad_norm`) and with `loss_steps='all'`. The last "
        f"column is the measurement that answers how far gradient travels: "
        f"`vgkernels.diagnostics.last_step_traces` runs one extra forward and backward from the last "
        f"step's loss alone."
    )
    lines = [
        "# vgkernels demo: vanishing and exploding gradients, measured",
        "",
        run,
        "",
        "## a. BPTT at initialization",
        "",
        part_a,
        "",
        _bptt_table(result.bptt, "markdown"),
        "",
        _underflow_sentence(result.bptt),
        "",
        f"![BPTT gradient norms and step Jacobian norms at initialization]({fig['bptt_init']})",
        "",
        f"![Each model's gradient against the product of its spectral step norms]({fig['bptt_bounds']})",
        "",
        "## b. Depth at initialization: the remedies side by side",
        "",
        part_b,
        "",
        "Ratio ‖∇W‖ first block / last block:",
        "",
        _grid_table(result.depth, _ratio_cell, "markdown"),
        "",
        "Largest ‖∇W_l‖ over the blocks:",
        "",
        _grid_table(result.depth, _largest_cell, "markdown"),
        "",
        "<details><summary>Every setup: first, last and largest norm</summary>",
        "",
        _mlp_table(result.mlp, "markdown"),
        "",
        "</details>",
        "",
        f"![The remedies side by side, through depth and through time]({fig['remedies']})",
        "",
        f"![Per-layer gradient norms of the deep MLP, by remedy]({fig['mlp_depth']})",
        "",
        "## c. Time at initialization: the remedies side by side",
        "",
        part_c,
        "",
        _grid_table(result.time, _ratio_cell, "markdown"),
        "",
        "## d. Training on the adding problem",
        "",
        part_d,
        "",
        _train_table(result.training, "markdown"),
        "",
        f"![Training curves]({fig['adding_training']})",
        "",
        f"![Gradient norms before and after training]({fig['horizon_trained']})",
        "",
        "## e. A loss at every step",
        "",
        part_e,
        "",
        _per_step_table(result.per_step, "markdown"),
        "",
        f"![A loss at every step against the last step's loss alone]({fig['per_step_losses']})",
        "",
        "## f. Verdict",
        "",
        *(f"- {line}" for line in result.verdict),
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


@dataclass
class DemoResult:
    """What :func:`run_demo` measured and wrote."""

    out: Path
    report: Path
    figures: list[Path]
    bptt: dict[str, TraceReport]
    depth: Grid
    time: Grid
    training: list[TrainResult]
    per_step: list[PerStepResult]
    verdict: list[str]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def mlp(self) -> list[tasks.MLPProbe]:
        """Every depth probe, row by row."""
        return self.depth.all()


def _timed(seconds: dict[str, float], key: str, fn: Callable):
    start = time.perf_counter()
    value = fn()
    seconds[key] = time.perf_counter() - start
    return value


def run_demo(
    out: str | Path = "vgkernels-demo",
    device: str = "cpu",
    quick: bool = False,
    seed: int = 0,
    *,
    threads: int | None = 1,
    echo: Callable[[str], None] | None = print,
) -> DemoResult:
    """Run parts a-f, write ``report.md`` and its PNGs to ``out``, and print the tables.

    Args:
        out: folder, created if missing.
        device: ``"cpu"`` or ``"cuda"``.
        quick: tiny sizes (a smoke run of about 30 s; its numbers do not show the classic results).
        seed: seeds every initialization, input and training batch.
        threads: torch's intra-op threads during the run (restored afterwards); ``None`` keeps the
            current setting. One by default: the per-step work (batch 64, hidden 64) is too small to
            split well, and extra threads stall badly on a shared CPU (2 threads ran up to 15x slower
            per step than 1 on a busy 2-core machine).
        echo: where the tables go (``None``: nowhere).
    Returns:
        a :class:`DemoResult`.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for, but torch sees no CUDA device")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(Path(out), device, quick, seed, echo)
    finally:
        torch.set_num_threads(previous)


def _run(folder: Path, device: str, quick: bool, seed: int, echo: Callable[[str], None] | None) -> DemoResult:
    say = echo or (lambda text: None)
    cfg = QUICK if quick else DEFAULT
    folder.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    figures = []

    bptt, spectra = _timed(seconds, "a", lambda: _bptt_at_init(cfg, device, seed))
    say(f"\na. BPTT at initialization (T = {cfg.bptt_seq_len}, H = {cfg.bptt_hidden}, B = {cfg.bptt_batch})")
    say(_bptt_table(bptt, "text"))
    figures.append(plot_trace(
        {name: rep.trace for name, rep in bptt.items()},
        folder / "bptt_init.png",
        title=f"BPTT at initialization: gradient norm per step, loss at t = {cfg.bptt_seq_len - 1}",
        spectral=spectra,
    ))
    figures.append(plot_step_bounds(
        bptt, folder / "bptt_bounds.png",
        title="BPTT at initialization: the gradient against the product of the spectral step norms",
    ))

    depth = _timed(seconds, "b", lambda: _depth_grid(cfg, device, seed))
    say(f"\nb. Depth at initialization ({cfg.mlp_depth} layers, width {cfg.mlp_width}, "
        f"batch {cfg.mlp_batch}): "
        f"ratio ‖∇W‖ first block / last block")
    say(_grid_table(depth, _ratio_cell, "text"))
    say("largest ‖∇W_l‖ over the blocks")
    say(_grid_table(depth, _largest_cell, "text"))
    figures.append(_plot_mlp(depth, folder / "mlp_depth.png"))

    time_grid = _timed(seconds, "c", lambda: _time_grid(cfg, device, seed))
    say(f"\nc. Time at initialization (Elman RNN, T = {cfg.rnn_seq_len}, H = {cfg.rnn_hidden}, "
        f"B = {cfg.rnn_batch}): ratio ‖∂loss/∂h_0‖ / ‖∂loss/∂h_(T-1)‖")
    say(_grid_table(time_grid, _ratio_cell, "text"))
    figures.append(_plot_remedies(depth, time_grid, folder / "remedies.png"))

    training = _timed(seconds, "d", lambda: _training(cfg, device, seed))
    say(f"\nd. Training on the adding problem (T = {cfg.train_seq_len}, H = {cfg.train_hidden})")
    say(_train_table(training, "text"))
    figures.append(_plot_training(training, cfg, folder / "adding_training.png"))
    gated = [r for r in training if r.name != "RNN-tanh"]
    pairs = {}
    styles = {}
    for r, style in zip(gated, line_styles(len(gated)), strict=True):
        for rep, dash in ((r.init_report, ":"), (r.trained_report, "-")):
            pairs[rep.name] = rep.trace
            styles[rep.name] = {**style, "linestyle": dash}
    figures.append(plot_trace(
        pairs,
        folder / "horizon_trained.png",
        styles=styles,
        title=f"Adding problem, T = {cfg.train_seq_len}: gradient norm per step before and after training",
    ))

    per_step = _timed(seconds, "e", lambda: _per_step_losses(cfg, device, seed))
    say(f"\ne. A loss at every step (language model, T = {cfg.lm_seq_len}, B = {cfg.lm_batch}): horizons")
    say(_per_step_table(per_step, "text"))
    lm_traces = {}
    for r in per_step:
        lm_traces[f"{r.name}, loss at every step"] = r.unknown.trace
        lm_traces[f"{r.name}, last step's loss alone"] = r.last.trace
    figures.append(plot_trace(
        lm_traces,
        folder / "per_step_losses.png",
        jacobian=False,
        title="Language models at initialization: a loss at every step against the last step's loss alone",
    ))

    verdict = _verdict(bptt, depth, time_grid, training, per_step, cfg)
    say("\nf. Verdict")
    for line in verdict:
        say("- " + line.replace("**", ""))
    seconds["total"] = time.perf_counter() - started
    say(f"\nwrote {folder / 'report.md'} and {len(figures)} PNGs in {seconds['total']:.0f} s "
        f"(parts: " + ", ".join(f"{k} {seconds[k]:.1f} s" for k in "abcde") + ")")

    result = DemoResult(
        out=folder,
        report=folder / "report.md",
        figures=figures,
        bptt=bptt,
        depth=depth,
        time=time_grid,
        training=training,
        per_step=per_step,
        verdict=verdict,
        seconds=seconds,
    )
    result.report.write_text(_report_markdown(cfg, quick, seed, device, seconds, result), encoding="utf-8")
    sys.stdout.flush()
    return result
