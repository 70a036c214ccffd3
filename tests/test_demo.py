"""Tests of ``python -m vgkernels demo``.

One ``--quick`` run through the command line (as a user starts it) feeds most tests: its exit status,
report.md with its six sections, every table row and picture, at least three PNGs, and the tables on
stdout agreeing with the report cell for cell. The verdict is tested separately on made-up
measurements, to show that its words follow the numbers rather than a script. No tolerances: the
checks are on text and files.
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vgkernels
from vgkernels import demo, tasks
from vgkernels.diagnostics.bptt import TraceReport, TraceRow

SECTIONS = [
    "## a. BPTT at initialization",
    "## b. Depth at initialization: the remedies side by side",
    "## c. Time at initialization: the remedies side by side",
    "## d. Training on the adding problem",
    "## e. A loss at every step",
    "## f. Verdict",
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    root = Path(vgkernels.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "vgkernels", "demo", "--quick", "--out", str(out), "--seed", "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    return proc, out


def table_rows(markdown: str, first_header: str) -> list[list[str]]:
    """The body rows of the markdown table whose first column is titled ``first_header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_quick_run_succeeds_and_writes_files(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out / "report.md"
    assert report.is_file()
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 3
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 200_000
    text = report.read_text(encoding="utf-8")
    for png in pngs:
        assert f"]({png.name})" in text  # every picture is shown in the report
    assert "%|" in proc.stderr  # tqdm progress bars


def section(text: str, k: int) -> str:
    """The markdown of section k (0 = a)."""
    return text.split(SECTIONS[k])[1].split(SECTIONS[k + 1])[0] if k + 1 < len(SECTIONS) else \
        text.split(SECTIONS[k])[1]


def test_report_sections_and_tables(quick_run):
    _, out = quick_run
    text = (out / "report.md").read_text(encoding="utf-8")
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    assert "--quick --seed 3" in text and "torch" in text and "cores" in text

    bptt = table_rows(section(text, 0), "model")
    assert [r[0] for r in bptt] == list(demo.BPTT_SETUPS)
    for row in bptt:
        ratio = row[3]
        assert ratio == "0 (underflow)" or 0 <= float(ratio) < 1e3
        assert re.fullmatch(r"(>= )?\d+", row[4])  # horizon, with the loss steps given: no †
        frobenius, spectral = float(row[7]), float(row[8])
        assert 0 < spectral <= frobenius * (1 + 1e-3)  # the Frobenius norm bounds the spectral norm
        assert re.fullmatch(r"(>= )?\d+", row[10]) and int(row[10].lstrip(">= ")) >= int(row[4].lstrip(">= "))
    assert "underflow" in text  # said whether or not it happened in this run

    depth = section(text, 1)
    ratios = table_rows(depth, "activation + init")
    assert [r[0] for r in ratios] == [demo._row_label(a, i) for a, i in demo.DEPTH_ROWS]
    assert len(ratios[0]) == 1 + len(demo.DEPTH_COLUMNS)
    largest = table_rows(depth.split("Largest")[1], "activation + init")
    assert len(largest) == len(demo.DEPTH_ROWS)
    every = table_rows(depth, "setup")
    assert len(every) == len(demo.DEPTH_ROWS) * len(demo.DEPTH_COLUMNS)
    assert every[0][0] == "sigmoid + standard init"
    assert sum("BatchNorm (eval)" in r[0] for r in every) == len(demo.DEPTH_ROWS)
    for row in every:
        assert float(row[1]) > 0 and float(row[3]) >= float(row[1])

    time_rows = table_rows(section(text, 2), "activation + init")
    assert [r[0] for r in time_rows] == [demo._row_label(a, i) for a, i in demo.TIME_ROWS]
    assert len(time_rows[0]) == 1 + len(demo.TIME_COLUMNS)

    train = table_rows(section(text, 3), "model")
    assert [r[0] for r in train] == ["GRU", "LSTM", "RNN-tanh"]
    for row in train:
        mse = float(row[2])
        assert float(row[3]) == pytest.approx(mse / tasks.ADDING_BASELINE_MSE, rel=2e-2)

    per_step = table_rows(section(text, 4), "model")
    assert len(per_step) == 2 * demo.QUICK.lm_layers
    for row in per_step:
        assert row[2] == "n/a" and row[3] == "n/a"  # loss steps measured from the output's gradient; 'all'
        assert re.fullmatch(r"(>= )?\d+", row[4])  # the last step's loss alone: a horizon

    verdict = section(text, 5)
    assert verdict.count("\n- ") >= 8
    assert "1/6" in verdict and "horizon" in verdict and "spectral norm" in verdict
    assert "by remedy" in verdict and "A loss at every step" in verdict


def test_stdout_tables_match_the_report(quick_run):
    proc, out = quick_run
    text = (out / "report.md").read_text(encoding="utf-8")
    for title in ("a. BPTT at initialization", "b. Depth at initialization", "c. Time at initialization",
                  "d. Training on the adding", "e. A loss at every step"):
        assert title in proc.stdout
    for row in table_rows(section(text, 1), "activation + init"):  # the same numbers, cell for cell
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(row[0] + "  "))
        assert line[len(row[0]):].split() == " ".join(row[1:]).split()
    assert "f. Verdict" in proc.stdout and "wrote" in proc.stdout
    assert re.search(r"parts: a [\d.]+ s, b [\d.]+ s, c [\d.]+ s, d [\d.]+ s, e [\d.]+ s", proc.stdout)


# --- the verdict follows the numbers -------------------------------------------------------------


def fake_row(ratio: float = 1.0, horizon: int | None = 5, *, label: str = "layer 0", **extra) -> TraceRow:
    """A measured row over 10 steps with the loss at t = 9; ``extra`` sets any other field."""
    decay = -math.log10(ratio) / 9 if ratio > 0 else 0.9
    fields = dict(
        label=label, layer=0, direction=0, anchor_t=9, grad_anchor=1.0, grad_first=ratio, ratio=ratio,
        horizon=horizon, horizon_full=False, decay_rate=decay, zero_steps=3 if ratio == 0 else 0,
        zero_span=None, nonfinite_steps=0, jac_mean=0.5, jac_min=0.5, jac_max=0.5, jac_frac_below_1=1.0,
    )
    return TraceRow(**{**fields, **extra})


def fake_report(name: str, *rows: TraceRow, loss_steps: list[int] | None = (9,), spectral: bool = False,
                measured: bool = False):
    steps = None if loss_steps is None else list(loss_steps)
    return TraceReport(name, "rnn_tanh", 10, 1, 1e-3, list(rows), None, steps, spectral, measured)


def fake_bptt(ratios: dict[str, float]):
    return {name: fake_report(name, fake_row(r)) for name, r in ratios.items()}


def fake_grid(kind, cells: dict[tuple[str, str], tuple[float, float, float]]):
    """A Grid of probes from (row, column) -> (first, largest, last) norms."""
    rows = list(dict.fromkeys(r for r, _ in cells))
    columns = list(dict.fromkeys(c for _, c in cells))
    probes = {}
    for (r, c), (first, top, last) in cells.items():
        setup = r if c == "plain" else f"{r} + {c}"
        if kind == "mlp":
            probes[r, c] = tasks.MLPProbe(setup, "relu", "he", c == "residual", c == "LayerNorm", 3, 4, 2,
                                          [first, top, last])
        else:
            probes[r, c] = tasks.RNNProbe(setup, "tanh", "default", c == "highway", False, None, 3, 4, 2,
                                          [first, top, last])
    return demo.Grid(rows, columns, probes)


def fake_train(name: str, mse: float, before: int, after: int):
    return demo.TrainResult(
        name, 100, 1.0, [mse] * 100, mse, fake_report(name, fake_row(horizon=before)),
        fake_report(name, fake_row(horizon=after)), False
    )


CLASSIC = {
    "RNN-sigmoid": 0.0,
    "RNN-tanh": 0.0,
    "IRNN": 0.7,
    "GRU": 0.0,
    "LSTM": 0.0,
    "LSTM, forget bias 1": 1e-5,
    "LSTM, forget bias 3": 0.05,
}

DEPTH = {
    ("sigmoid + standard init", "plain"): (1e-17, 1.0, 1.0),
    ("sigmoid + standard init", "residual"): (0.3, 1e7, 1.0),
    ("sigmoid + standard init", "LayerNorm"): (1.0, 500.0, 1.0),
    ("sigmoid + negative mean", "plain"): (1e-3, 1.0, 1.0),
    ("sigmoid + negative mean", "residual"): (0.5, 1e3, 1.0),
    ("sigmoid + negative mean", "LayerNorm"): (2.0, 300.0, 1.0),
    ("relu + he", "plain"): (0.5, 1.0, 1.0),
    ("relu + he", "residual"): (0.3, 1e8, 1.0),
    ("relu + he", "LayerNorm"): (30.0, 2e3, 1.0),
}
TIME = {
    ("tanh + default init", "plain"): (1e-21, 1.0, 1.0),
    ("tanh + default init", "highway"): (0.06, 1.0, 1.0),
    ("relu + irnn", "plain"): (0.7, 1.0, 1.0),
    ("relu + irnn", "highway"): (0.7, 1.0, 1.0),
}


def fake_per_step():
    rows = lambda **kw: [fake_row(label=f"layer {k}", **kw) for k in (0, 1)]  # noqa: E731
    return [demo.PerStepResult(
        name="LSTM (2 layers)",
        unknown=fake_report("u", *rows(horizon=0, horizon_cut=True), loss_steps=list(range(10)),
                            measured=True),
        every=fake_report("e", *rows(horizon=0, horizon_cut=True), loss_steps=list(range(10))),
        last=fake_report("l", fake_row(label="layer 0", horizon=7), fake_row(label="layer 1", horizon=4)),
    )]


def test_verdict_names_what_vanished_and_why():
    bptt = fake_bptt(CLASSIC)
    spec = dict(spec_mean=0.7, spec_max=0.8, spec_frac_below_1=1.0, bound_ratio=1e-30, jac_mean=4.0)
    bptt["GRU"] = fake_report("GRU", fake_row(0.0, 13, bound_horizon=19, **spec), spectral=True)
    loose = dict(jac_mean=4.5, spec_mean=1.1, spec_frac_below_1=0.2, bound_ratio=3e9, bound_horizon=9,
                 bound_horizon_full=True)
    bptt["RNN-tanh"] = fake_report("RNN-tanh", fake_row(0.0, 13, **loose), spectral=True)
    training = [fake_train("GRU", 0.004, 3, 19), fake_train("RNN-tanh", 0.17, 3, 8)]
    lines = demo._verdict(bptt, fake_grid("mlp", DEPTH), fake_grid("rnn", TIME), training, fake_per_step(),
                          demo.QUICK)
    text = "\n".join(lines)
    first = lines[0]
    assert "below 1e-10 of its value at the loss for RNN-sigmoid (underflow to 0, " in first
    assert "It keeps at least 0.01 for IRNN (ratio 0.7" in first
    assert "in between: LSTM, forget bias 1 (ratio 1e-05" in first
    assert "underflowed to exactly 0 for RNN-sigmoid, RNN-tanh, GRU and LSTM" in text
    assert "Gating alone does not save the gradient" in text and "keep nothing that float32 can show" in text
    # the step norms
    assert "averages above 1 for RNN-tanh (4.5) and GRU (4)" in text
    assert "below 1 at every step for GRU (mean ‖J‖₂ 0.7, product at most 1e-30)" in text
    assert "explain the decay (they allow at most twice the measured horizon, plus two steps) for GRU " \
           "(13 steps, allowed 19)" in text
    assert "far more than the gradient reached for RNN-tanh (13 steps, allowed >= 9)" in text
    # through depth
    assert "(17 orders of magnitude)" in text
    assert "from 1e-17 to 0.001, 14 orders of magnitude closer to 1" in text
    assert "the ratio stays within [0.01, 100] for relu + he (0.5)." in text
    assert "by remedy: plain 1/3, residual 3/3 and LayerNorm 3/3. Residual and LayerNorm keep every" in text
    assert "2 setups, all in residual, have gradient norms above 1e+06, up to 1e+08 (relu + he + residual" \
        in text
    assert "each residual block adds" in text
    assert "With LayerNorm or BatchNorm the largest norm is 2e+03." in text
    # through time
    assert "below 1e-10 of its value at the loss for tanh + default init, and within [0.01, 100] for relu " \
           "+ irnn (0.7)" in text
    assert "by remedy: plain 1/2 and highway 2/2; the most with highway" in text
    # training
    assert "Learned (held-out MSE below 0.05): GRU (MSE 0.004" in text
    assert "(above 0.12): RNN-tanh (MSE 0.17" in text
    assert "went GRU from 3 to 19 steps and RNN-tanh from 3 to 8 steps" in text
    assert "the gradient of RNN-tanh never did" in text  # 8 steps back: short of the marker at 10
    # a loss at every step
    assert "measured them from the gradient that reached the layers' output at every step, and stated " \
           "no horizon for any layer" in text
    assert "Told loss_steps='all', it states none either" in text
    assert "reaches back 7 and 4 steps in the LSTM (2 layers), of 9 possible" in text


def test_verdict_changes_with_the_numbers():
    ratios = dict(CLASSIC, GRU=0.5, **{"IRNN": 1e-12})
    lines = demo._verdict(fake_bptt(ratios), None, None, [], [], demo.QUICK)
    text = "\n".join(lines)
    assert "Gating alone does not save" not in text  # the GRU kept its gradient in these numbers
    assert "It keeps at least 0.01 for GRU (ratio 0.5" in text
    assert "IRNN (ratio 1e-12" in lines[0].split("It keeps")[0]
    assert "Step norms" not in text  # no spectral norms measured
    no_zero = {n: (r or 1e-20) for n, r in CLASSIC.items()}
    assert "No gradient underflowed" in "\n".join(demo._verdict(fake_bptt(no_zero), None, None, [], [],
                                                                 demo.QUICK))
    calm = {cell: (first, min(top, 10.0), last) for cell, (first, top, last) in DEPTH.items()}
    text = "\n".join(demo._verdict(fake_bptt(CLASSIC), fake_grid("mlp", calm), None, [], [], demo.QUICK))
    assert "hide an explosion" not in text
    assumed = fake_per_step()
    assumed[0].unknown = fake_report("u", *[fake_row(label=f"layer {k}", horizon=9, horizon_full=True)
                                            for k in (0, 1)], loss_steps=None)
    text = "\n".join(demo._verdict(fake_bptt(CLASSIC), None, None, [], assumed, demo.QUICK))
    assert "the report stated horizons of >= 9† and >= 9† for the LSTM (2 layers)" in text


def test_run_demo_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'tpu'"):
        demo.run_demo(tmp_path, device="tpu")
    with pytest.raises(TypeError, match="seed must be an int"):
        demo.run_demo(tmp_path, seed="0")
    assert not any(tmp_path.iterdir())  # nothing ran


def test_threads_set_for_the_run_and_restored(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(demo, "_run", lambda *args: seen.append(torch.get_num_threads()) or "ran")
    before = torch.get_num_threads()
    assert demo.run_demo(tmp_path, threads=1) == "ran"
    assert demo.run_demo(tmp_path, threads=None) == "ran"
    assert seen == [1, before] and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be a positive int or None, got 0"):
        demo.run_demo(tmp_path, threads=0)
