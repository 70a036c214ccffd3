"""examples/sine_forecaster.py: a forecaster that calls LSTM cells once per step.

The training losses with vgkernels' cells equal those with torch.nn's cells, same seed, to 1e-5
(absolute, on losses of order 0.1 to 1: float32 sums in another order over 25 recurrent steps and three
optimizer steps); the command line runs end to end at tiny sizes and writes its plot.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "sine_forecaster.py"
TINY = dict(steps=3, batch=4, length=20, future=5, hidden=8)


def load():
    spec = importlib.util.spec_from_file_location("sine_forecaster", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_losses_equal_torch_nn_with_the_same_seed():
    example = load()
    _, ours = example.train(example.Config(**TINY, impl="vgkernels"), progress=False)
    _, theirs = example.train(example.Config(**TINY, impl="torch"), progress=False)
    assert len(ours) == len(theirs) == TINY["steps"]
    assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) <= 1e-5
    assert ours[0] != ours[-1]  # it trains


def test_tracked_pass_reads_every_step():
    example = load()
    model, _ = example.train(example.Config(**TINY), progress=False)
    waves = example.make_waves(3, TINY["length"] + TINY["future"] + 1, 0.0, torch.Generator().manual_seed(0))
    result = example.tracked_pass(model, waves, TINY["future"])
    steps = TINY["length"] + TINY["future"]
    assert result["grad_norm"].shape == result["jacobian_norm"].shape == (steps,)
    assert (result["grad_norm"] > 0).all() and (result["jacobian_norm"] > 0).all()
    assert model.cell1.track is False  # vgk.track restored it


def test_command_line_runs(tmp_path):
    out = tmp_path / "plot.png"
    args = [f"--{k}={v}" for k, v in TINY.items()] + [f"--out={out}", "--threads=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "held-out loss" in result.stdout and "where the forecast starts" in result.stdout
    assert out.stat().st_size > 1000
