"""Tests of ``python -m vgkernels demo``.

One ``--quick`` run through the command line (as a user starts it) feeds most tests: its exit status,
report.md with the four sections, every table row and picture, at least three PNGs, and the tables on
stdout agreeing with the report cell for cell. The verdict is tested separately on made-up
measurements, to show that its words follow the numbers rather than a script. No tolerances: the
checks are on text and files.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vgkernels
from vgkernels import demo, tasks
from vgkernels.diagnostics import trace_report
from vgkernels.trace import BPTTTrace

SECTIONS = [
    "## a. BPTT at initialization",
    "## b. Depth at initialization",
    "## c. Training on the adding problem",
    "## d. Verdict",
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


def test_report_sections_and_tables(quick_run):
    _, out = quick_run
    text = (out / "report.md").read_text(encoding="utf-8")
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    assert "--quick --seed 3" in text and "torch" in text

    bptt = table_rows(text, "model")
    assert [r[0] for r in bptt] == list(demo.BPTT_SETUPS)
    for row in bptt:
        ratio = row[3]
        assert ratio == "0 (underflow)" or 0 <= float(ratio) < 1e3
        assert re.fullmatch(r"(>= )?\d+", row[4])  # horizon
        assert float(row[7]) > 0  # mean Jacobian norm
    assert "underflow" in text  # said whether or not it happened in this run

    mlp = table_rows(text, "setup")
    assert len(mlp) == 10 and mlp[0][0] == "sigmoid + standard init"
    assert sum("LayerNorm" in r[0] for r in mlp) == 5
    for row in mlp:
        assert float(row[1]) > 0 and float(row[3]) >= float(row[1])

    train = table_rows(text.split(SECTIONS[2])[1], "model")
    assert [r[0] for r in train] == ["GRU", "LSTM", "RNN-tanh"]
    for row in train:
        mse = float(row[2])
        assert float(row[3]) == pytest.approx(mse / tasks.ADDING_BASELINE_MSE, rel=2e-2)

    verdict = text.split(SECTIONS[3])[1]
    assert verdict.count("\n- ") >= 4
    assert "1/6" in verdict and "horizon" in verdict


def test_stdout_tables_match_the_report(quick_run):
    proc, out = quick_run
    text = (out / "report.md").read_text(encoding="utf-8")
    for section in ("a. BPTT at initialization", "b. Depth at initialization", "c. Training on the adding"):
        assert section in proc.stdout
    for row in table_rows(text, "setup"):  # the same numbers, cell for cell
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(row[0] + "  "))
        assert line.split()[-4:] == row[1:]
    assert "d. Verdict" in proc.stdout and "wrote" in proc.stdout


# --- the verdict follows the numbers -------------------------------------------------------------


def fake_report(name: str, ratio: float, zero_steps: int = 0):
    steps = 10
    g = torch.logspace(0, 0, steps, dtype=torch.float64)
    g[0] = ratio
    g[1:zero_steps] = 0.0
    trace = BPTTTrace("rnn_tanh", 1, 1, torch.full((1, steps, 1), 0.5), [lambda: (g**2)[None, :, None]])
    return trace_report(trace, name=name)


def fake_bptt(ratios: dict[str, float]):
    return {name: fake_report(name, r, zero_steps=3 if r == 0 else 0) for name, r in ratios.items()}


def fake_probe(setup: str, first: float, last: float, top: float | None = None):
    norms = [first, top or max(first, last), last]
    return tasks.MLPProbe(setup, "relu", "he", "residual" in setup, "LayerNorm" in setup, 3, 4, 2, norms)


def fake_train(name: str, mse: float, before: float, after: float):
    return demo.TrainResult(
        name, 100, 1.0, [mse] * 100, mse, fake_report(name, before), fake_report(name, after), False
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


def test_verdict_names_what_vanished_and_why():
    probes = [
        fake_probe("sigmoid + standard init", 1e-17, 1.0),
        fake_probe("sigmoid + negative mean", 1e-3, 1.0),
        fake_probe("relu + he + residual", 0.3, 1.0, top=1e8),
        fake_probe("relu + he + residual + LayerNorm", 0.3, 1.0, top=2e3),
    ]
    training = [fake_train("GRU", 0.004, 1e-9, 0.5), fake_train("RNN-tanh", 0.17, 1e-9, 1e-9)]
    lines = demo._verdict(fake_bptt(CLASSIC), probes, training, demo.QUICK)
    text = "\n".join(lines)
    first = lines[0]
    assert "below 1e-10 of its value at the loss for RNN-sigmoid (underflow to 0, " in first
    assert "It keeps at least 0.01 for IRNN (ratio 0.7" in first
    assert "in between: LSTM, forget bias 1 (ratio 1e-05" in first
    assert "underflowed to exactly 0 for RNN-sigmoid, RNN-tanh, GRU and LSTM" in text
    assert "Gating alone does not save the gradient" in text and "keep nothing that float32 can show" in text
    assert "(17 orders of magnitude)" in text
    assert "from 1e-17 to 0.001, 14 orders of magnitude closer to 1" in text
    assert "Outside that band: sigmoid + negative mean (0.001)" in text
    assert "gradient norms up to 1e+08" in text and "With LayerNorm the largest norm is 2e+03" in text
    assert "Learned (held-out MSE below 0.05): GRU (MSE 0.004" in text
    assert "(above 0.12): RNN-tanh (MSE 0.17" in text
    assert "the gradient of RNN-tanh never did" in text  # 8 steps back: short of the marker


def test_verdict_changes_with_the_numbers():
    ratios = dict(CLASSIC, GRU=0.5, **{"IRNN": 1e-12})
    lines = demo._verdict(fake_bptt(ratios), [], [], demo.QUICK)
    text = "\n".join(lines)
    assert "Gating alone does not save" not in text  # the GRU kept its gradient in these numbers
    assert "It keeps at least 0.01 for GRU (ratio 0.5" in text
    assert "IRNN (ratio 1e-12" in lines[0].split("It keeps")[0]
    no_zero = {n: (r or 1e-20) for n, r in CLASSIC.items()}
    assert "No gradient underflowed" in "\n".join(demo._verdict(fake_bptt(no_zero), [], [], demo.QUICK))


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
