"""A sine-wave forecaster that calls an LSTM cell once per time step, and shows where its gradient goes.

Two stacked LSTM cells read a noisy sine wave one value at a time and predict the next value; after
the observed part they run on their own predictions for ``--future`` steps. The cells are
``vgkernels.nn.LSTMCell`` (``--impl torch`` runs ``torch.nn.LSTMCell`` instead: same seed, same
weights, same losses). After training, one tracked pass (``track=True``) reads at every step the
gradient norm that reached the first cell's output state and the Frobenius norm of its step
Jacobian, and a plot of the forecast and of those norms is written to ``--out``.

    python examples/sine_forecaster.py                  # about a minute on a laptop CPU
    python examples/sine_forecaster.py --impl torch     # the same run on torch.nn's cells
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import vgkernels as vgk


@dataclass
class Config:
    steps: int = 300  # optimizer steps
    batch: int = 32
    length: int = 60  # observed steps per wave
    future: int = 30  # steps forecast from the model's own predictions
    hidden: int = 64
    lr: float = 1e-2
    clip: float = 1.0  # the gradient norm clip (vgkernels.clip_grad_norm_)
    seed: int = 0
    impl: str = "vgkernels"  # or "torch"
    noise: float = 0.02


def make_waves(count: int, length: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """[length, count] sine waves with random period (12 to 30 steps), phase and amplitude (0.5 to 1)."""
    t = torch.arange(length, dtype=torch.float32)[:, None]
    period = 12 + 18 * torch.rand(count, generator=generator)
    phase = 2 * math.pi * torch.rand(count, generator=generator)
    amplitude = 0.5 + 0.5 * torch.rand(count, generator=generator)
    waves = amplitude * torch.sin(2 * math.pi * t / period + phase)
    return waves + noise * torch.randn(length, count, generator=generator)


class Forecaster(nn.Module):
    """Two LSTM cells and a linear read-out, stepped one value at a time."""

    def __init__(self, hidden: int, impl: str = "vgkernels") -> None:
        super().__init__()
        cells = vgk.nn if impl == "vgkernels" else nn
        self.cell1 = cells.LSTMCell(1, hidden)
        self.cell2 = cells.LSTMCell(hidden, hidden)
        self.readout = nn.Linear(hidden, 1)

    def forward(self, observed: torch.Tensor, future: int = 0, on_step=None) -> torch.Tensor:
        """observed [T, B]: predictions [T + future, B] of each next value; on_step(t) after each step."""
        state1 = state2 = None
        predictions = []
        value = observed[0, :, None]
        for t in range(observed.shape[0] + future):
            if t < observed.shape[0]:
                value = observed[t, :, None]  # teacher forcing while there is data
            state1 = self.cell1(value, state1)
            state2 = self.cell2(state1[0], state2)
            value = self.readout(state2[0])
            predictions.append(value[:, 0])
            if on_step is not None:
                on_step(t)
        return torch.stack(predictions)


def loss_fn(predictions: torch.Tensor, waves: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each prediction against the next value of the wave."""
    return nn.functional.mse_loss(predictions[: waves.shape[0] - 1], waves[1:])


def build(config: Config) -> tuple[Forecaster, torch.optim.Optimizer]:
    torch.manual_seed(config.seed)  # the same weights for both implementations
    model = Forecaster(config.hidden, config.impl)
    return model, torch.optim.Adam(model.parameters(), lr=config.lr)


def train(config: Config, progress: bool = True) -> tuple[Forecaster, list[float]]:
    """Train on fresh waves each step; returns the model and the training losses."""
    model, optimizer = build(config)
    generator = torch.Generator().manual_seed(config.seed + 1)
    losses = []
    bar = tqdm(range(config.steps), desc=f"training ({config.impl})", disable=not progress)
    for _ in bar:
        waves = make_waves(config.batch, config.length + config.future + 1, config.noise, generator)
        optimizer.zero_grad()
        loss = loss_fn(model(waves[: config.length], config.future), waves)
        loss.backward()
        vgk.clip_grad_norm_(model.parameters(), config.clip)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return model, losses


def tracked_pass(model: Forecaster, waves: torch.Tensor, future: int) -> dict[str, torch.Tensor]:
    """One forward and backward with the first cell tracked: per step, ‖∂loss/∂h_t‖ reaching its output
    state and ‖∂(h_t, c_t)/∂(h_t-1, c_t-1)‖_F (batch mean). Needs vgkernels' cells."""
    traces = []
    with vgk.track(model):
        predictions = model(waves[: waves.shape[0] - future - 1], future, on_step=lambda t: traces.append(
            model.cell1.trace))
        loss_fn(predictions, waves).backward()
    return {
        "predictions": predictions.detach(),
        "grad_norm": torch.stack([trace.output_grad_norm for trace in traces]),
        "jacobian_norm": torch.stack([trace.jacobian_norm for trace in traces]),
    }


def plot(waves: torch.Tensor, result: dict[str, torch.Tensor], observed: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    steps = torch.arange(1, waves.shape[0])
    for b, color in zip(range(3), ("C0", "C1", "C2"), strict=True):
        top.plot(waves[:, b], color=color, alpha=0.4, lw=3)
        top.plot(steps, result["predictions"][: waves.shape[0] - 1, b], color=color, lw=1)
    top.axvline(observed, color="k", ls=":", lw=1)
    top.set_ylabel("value (thick: data, thin: model)")
    top.set_title("forecast: observed to the dotted line, then on its own predictions")
    bottom.semilogy(result["grad_norm"], label="‖∂loss/∂h_t‖ (cell 1)")
    bottom.semilogy(result["jacobian_norm"], label="‖∂s_t/∂s_t-1‖_F (cell 1, batch mean)")
    bottom.axvline(observed, color="k", ls=":", lw=1)
    bottom.set_xlabel("step t")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field in ("steps", "batch", "length", "future", "hidden", "seed"):
        parser.add_argument(f"--{field}", type=int, default=getattr(defaults, field))
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--clip", type=float, default=defaults.clip)
    parser.add_argument("--impl", choices=["vgkernels", "torch"], default=defaults.impl)
    parser.add_argument("--out", type=Path, default=Path("sine_forecaster.png"),
                        help="the plot (vgkernels only)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = Config(**{name: getattr(args, name) for name in Config.__dataclass_fields__ if name != "noise"})
    start = time.perf_counter()
    model, losses = train(config)
    print(f"{config.impl}: {config.steps} steps in {time.perf_counter() - start:.1f} s; training loss "
          f"{losses[0]:.4f} -> {losses[-1]:.4f}")
    held_out = torch.Generator().manual_seed(12345)
    waves = make_waves(8, config.length + config.future + 1, config.noise, held_out)
    with torch.no_grad():
        test_loss = loss_fn(model(waves[: config.length], config.future), waves).item()
    print(f"held-out loss over {config.length} observed and {config.future} forecast steps: {test_loss:.4f}")
    if config.impl != "vgkernels":
        return
    result = tracked_pass(model, waves, config.future)
    grad = result["grad_norm"]
    print(f"‖∂loss/∂h_t‖ at cell 1: {grad[-1].item():.3g} at the last step, {grad[config.length].item():.3g} "
          f"where the forecast starts, {grad[0].item():.3g} at the first step; mean ‖J_t‖_F "
          f"{result['jacobian_norm'].mean().item():.3g}")
    plot(waves, result, config.length, args.out)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
