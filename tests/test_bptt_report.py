"""Tests of vgkernels.diagnostics.bptt: horizon, decay rate, ratio, underflow, Jacobian statistics,
the report's tables and the plot.

Most tests build a BPTTTrace by hand from a known gradient-norm curve (geometric in t), where every
measure has a closed form: a decay of r decades per step gives decay_rate = r, horizon
floor(3 / r) at threshold 1e-3, and ratio 10^(-r (T-1)). The curves pass through float32 (the trace's
dtype), so floating comparisons use rel 1e-5; horizons, counts and labels are exact. One test
checks the report on a real vgkernels RNN trace against a torch.nn cell loop with retain_grad
(rel 1e-4, float32 kernels against float32 autograd).
"""

import math

import matplotlib
import pytest
import torch

import vgkernels
from vgkernels.diagnostics import TraceReport, gradient_horizon, plot_trace, trace_report
from vgkernels.diagnostics.bptt import (
    decay_rate,
    draw_log_curves,
    format_number,
    jacobian_stats,
    render_table,
)
from vgkernels.trace import BPTTTrace

T = 20
R = 0.4  # decades per step: horizon floor(3 / 0.4) = 7


def make_trace(
    grad_norm: torch.Tensor,
    *,
    num_directions: int = 1,
    batch: int = 2,
    jac: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    mode: str = "rnn_tanh",
) -> BPTTTrace:
    """A trace whose grad_norm is ``grad_norm`` [L, T]; each sample carries an equal share."""
    grad_norm = torch.as_tensor(grad_norm, dtype=torch.float64)
    L, steps = grad_norm.shape
    K = 2 if mode == "lstm" else 1
    sources = []
    for row in grad_norm:
        sq = (row**2 / batch)[None, :, None].expand(K, steps, batch).to(torch.float32)
        sources.append(lambda sq=sq: sq)
    if jac is None:
        jac = torch.full((L, steps, batch), 0.5)
    return BPTTTrace(mode, L // num_directions, num_directions, jac, sources, lengths)


def geometric(rate: float, steps: int = T) -> torch.Tensor:
    """g_t = 10^(-rate (T-1-t)): 1 at the last step, decaying backwards in time."""
    return 10.0 ** (-rate * (steps - 1 - torch.arange(steps, dtype=torch.float64)))


# --- measures -----------------------------------------------------------------------------------


def test_geometric_decay_closed_forms():
    report = trace_report(make_trace(geometric(R)[None]), name="toy")
    (row,) = report.rows
    assert row.label == "layer 0" and row.anchor_t == T - 1
    assert row.horizon == 7 and not row.horizon_full
    assert row.decay_rate == pytest.approx(R, rel=1e-5)
    assert row.ratio == pytest.approx(10 ** (-R * (T - 1)), rel=1e-5)
    assert row.grad_anchor == pytest.approx(1.0, rel=1e-6)
    assert row.zero_steps == 0 and row.nonfinite_steps == 0 and row.zero_span is None
    assert not report.underflow


def test_growing_gradient_has_full_horizon_and_negative_decay():
    g = 10.0 ** (0.1 * (T - 1 - torch.arange(T, dtype=torch.float64)))  # explodes going back
    (row,) = trace_report(make_trace(g[None])).rows
    assert row.horizon == T - 1 and row.horizon_full
    assert row.decay_rate == pytest.approx(-0.1, rel=1e-5)
    assert row.ratio == pytest.approx(10 ** (0.1 * (T - 1)), rel=1e-5)


def test_underflow_is_counted_reported_and_left_out_of_the_fit():
    g = geometric(R)
    g[:5] = 0.0  # float32 underflow at the earliest steps
    report = trace_report(make_trace(g[None]))
    (row,) = report.rows
    assert row.zero_steps == 5 and row.zero_span == (0, 4)
    assert row.ratio == 0.0
    assert row.decay_rate == pytest.approx(R, rel=1e-5)  # the zeros do not bend the slope
    assert report.underflow
    notes = " ".join(report.notes())
    assert "exactly 0 at 5 of 20 steps (t = 0 ... 4)" in notes and "underflows" in notes
    assert "exactly 0" in report.to_markdown() and "exactly 0" in report.to_text()


def test_bidirectional_two_layers_processing_order():
    fwd = geometric(R)
    rev = fwd.flip(0)  # the reverse direction's loss-side step is t = 0
    report = trace_report(make_trace(torch.stack([fwd, rev, fwd, rev]), num_directions=2))
    labels = [r.label for r in report.rows]
    assert labels == ["layer 0", "layer 0 reverse", "layer 1", "layer 1 reverse"]
    for row in report.rows:
        assert row.horizon == 7
        assert row.decay_rate == pytest.approx(R, rel=1e-5)
        assert row.anchor_t == (0 if row.direction else T - 1)
        assert row.ratio == pytest.approx(10 ** (-R * (T - 1)), rel=1e-5)
    trace = make_trace(torch.stack([fwd, rev]), num_directions=2)
    assert gradient_horizon(trace) == [7, 7]
    zeros = rev.clone()
    zeros[-3:] = 0.0  # underflow at the reverse direction's first processed steps
    (_, row) = trace_report(make_trace(torch.stack([fwd, zeros]), num_directions=2)).rows
    assert row.zero_span == (T - 1, T - 3)


def test_anchor_found_or_given():
    g = geometric(R)
    g[13:] = 0.0  # the loss sits at t = 12; nothing flows from later steps
    (row,) = trace_report(make_trace(g[None])).rows
    assert row.anchor_t == 12 and row.zero_steps == 0  # zeros after the anchor are not underflow
    assert row.horizon == 7
    (row,) = trace_report(make_trace(geometric(R)[None]), anchor=10).rows
    assert row.anchor_t == 10 and row.horizon == 7
    assert row.ratio == pytest.approx(10 ** (-R * 10), rel=1e-5)
    with pytest.raises(ValueError, match="anchor"):
        trace_report(make_trace(geometric(R)[None]), anchor=T)
    (row,) = trace_report(make_trace(torch.zeros(1, T))).rows
    assert row.anchor_t is None and row.horizon == 0 and math.isnan(row.decay_rate)


def test_nan_stops_the_horizon_and_is_counted():
    g = geometric(R)
    g[T - 4] = math.nan
    report = trace_report(make_trace(g[None]))
    (row,) = report.rows
    assert row.horizon == 2 and row.nonfinite_steps == 1
    assert any("non-finite" in n for n in report.notes())


def test_functions_on_tensors_and_thresholds():
    g = geometric(R)
    assert gradient_horizon(g) == 7
    assert gradient_horizon(g, threshold=1e-2) == 5
    assert gradient_horizon(torch.stack([g, g.flip(0)])) == [7, T - 1]  # read forward: it grows going back
    assert decay_rate(g) == pytest.approx(R, rel=1e-9)
    assert decay_rate(torch.stack([g, g]))[1] == pytest.approx(R, rel=1e-9)
    with pytest.raises(ValueError, match="threshold"):
        gradient_horizon(g, threshold=0)
    with pytest.raises(ValueError, match="shape"):
        gradient_horizon(torch.ones(2, 2, 2))
    with pytest.raises(TypeError, match="BPTTTrace"):
        gradient_horizon([1.0, 2.0])
    with pytest.raises(TypeError, match="BPTTTrace"):
        trace_report(g)


def test_trace_without_gradients_is_refused():
    trace = BPTTTrace("gru", 1, 1, torch.ones(1, 4, 2), [lambda: None])
    with pytest.raises(ValueError, match="backward"):
        trace_report(trace)


def test_jacobian_stats_over_live_steps_only():
    jac = torch.tensor([[[0.5, 0.5], [2.0, 1.0], [0.25, 0.0], [9.0, 0.0]]])  # [1, 4, 2]
    lengths = torch.tensor([3, 2])  # step 3: no sample alive
    trace = make_trace(geometric(R, 4)[None], jac=jac, lengths=lengths)
    (stats,) = jacobian_stats(trace)
    per_step = [0.5, 1.5, 0.25]  # mean over the samples alive at each step
    assert stats["mean"] == pytest.approx(sum(per_step) / 3)
    assert stats["min"] == pytest.approx(0.25) and stats["max"] == pytest.approx(1.5)
    assert stats["frac_below_1"] == pytest.approx(2 / 3)
    (row,) = trace_report(trace).rows
    assert row.jac_mean == pytest.approx(stats["mean"]) and row.jac_frac_below_1 == pytest.approx(2 / 3)


def test_lstm_trace():
    trace = make_trace(geometric(R)[None], mode="lstm")
    report = trace_report(trace, name="an LSTM")
    assert report.mode == "lstm" and report.rows[0].horizon == 7
    assert report.to_markdown().startswith("**an LSTM (lstm, T = 20, B = 2)**")


# --- tables -------------------------------------------------------------------------------------


def test_report_tables():
    report = trace_report(make_trace(geometric(R)[None]), name="toy")
    md = report.to_markdown().splitlines()
    assert md[2] == "| " + " | ".join(TraceReport.headers()) + " |"
    assert md[3].startswith("|---|")
    cells = md[4].strip("|").split("|")
    assert [c.strip() for c in cells][:5] == ["layer 0", "1", "2.51e-08", "2.51e-08", "7"]
    text = report.to_text().splitlines()
    assert text[0] == "toy (rnn_tanh, T = 20, B = 2)"
    assert len(text[1]) == len(text[2]) == len(text[3])  # aligned columns
    assert str(report) == report.to_text()
    full = trace_report(make_trace((10.0 ** (0.1 * torch.arange(T - 1, -1, -1.0)))[None]))
    assert ">= 19" in full.to_text()


def test_render_table_and_format_number():
    assert render_table(["a", "b"], [["x", 1.5e-17]]) == "| a | b |\n|---|---|\n| x | 1.5e-17 |"
    assert render_table(["a", "b"], [["x", 0.0]], "text").splitlines()[2] == "x  0"
    with pytest.raises(ValueError, match="fmt"):
        render_table(["a"], [["x"]], "html")
    with pytest.raises(ValueError, match="cells"):
        render_table(["a", "b"], [["x"]])
    assert format_number(0.0) == "0" and format_number(math.nan) == "nan"
    assert format_number(12) == "12" and format_number(0.123456) == "0.123"


# --- a real trace -------------------------------------------------------------------------------


def test_report_on_a_real_rnn_matches_a_cell_loop():
    torch.manual_seed(0)
    steps, batch, hidden = 37, 3, 5
    rnn = vgkernels.nn.RNN(2, hidden, track=True)
    x = torch.rand(steps, batch, 2)
    out, _ = rnn(x)
    out[-1].sum().backward()
    report = trace_report(rnn.trace)

    cell = torch.nn.RNNCell(2, hidden)
    cell.load_state_dict({k[:-3]: v for k, v in rnn.state_dict().items()})
    h = torch.zeros(batch, hidden)
    states = []
    for t in range(steps):
        h = cell(x[t], h)
        h.retain_grad()
        states.append(h)
    h.sum().backward()
    norms = torch.stack([s.grad.norm() for s in states])
    (row,) = report.rows
    assert row.grad_anchor == pytest.approx(norms[-1].item(), rel=1e-4)
    assert row.grad_first == pytest.approx(norms[0].item(), rel=1e-4)
    assert row.horizon == gradient_horizon(norms)
    assert row.decay_rate == pytest.approx(decay_rate(norms), rel=1e-3)


# --- plots --------------------------------------------------------------------------------------


def test_draw_log_curves_marks_zeros_and_nonfinite():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.subplots()
    g = geometric(R)
    g[:4] = 0.0
    g[10] = math.inf
    drawn = draw_log_curves(ax, [("toy", g)], start=1)
    assert drawn == 4
    assert ax.get_yscale() == "log"
    lines = {line.get_marker(): line for line in ax.get_lines()}
    assert list(lines["v"].get_xdata()) == [1, 2, 3, 4]  # zeros at x = start + t
    assert list(lines["x"].get_xdata()) == [11]
    with pytest.raises(ValueError, match="styles"):
        draw_log_curves(ax, [("a", g)], [])


def test_plot_trace_writes_png(tmp_path):
    g = geometric(R)
    g[:3] = 0.0
    single = plot_trace(make_trace(g[None]), tmp_path / "one.png")
    assert single.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    two = make_trace(torch.stack([geometric(R), geometric(R).flip(0)]), num_directions=2)
    many = plot_trace(
        {"A": make_trace(g[None]), "B": two},
        tmp_path / "many.png",
        title="t",
        jacobian=False,
        styles={"A": {"color": "k", "linestyle": "--"}},
    )
    assert many.stat().st_size > 1000
    with pytest.raises(TypeError, match="BPTTTrace"):
        plot_trace(g, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="non-empty"):
        plot_trace({}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="backward"):
        plot_trace(BPTTTrace("gru", 1, 1, torch.ones(1, 4, 2), [lambda: None]), tmp_path / "bad.png")
    assert matplotlib.get_backend()  # drawing left pyplot's state alone
