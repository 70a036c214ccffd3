"""Tests of vgkernels.diagnostics.bptt: horizon, decay rate, ratio, underflow, Jacobian statistics,
the report's tables and the plot.

Most tests build a BPTTTrace by hand from a known gradient-norm curve (geometric in t), where every
measure has a closed form: a decay of r decades per step gives decay_rate = r, horizon
floor(3 / r) at threshold 1e-3, and ratio 10^(-r (T-1)). The curves pass through float32 (the trace's
dtype), so floating comparisons use rel 1e-5; horizons, counts and labels are exact. The real traces
(an RNN, and a language model with a loss at every step, and with the last step's loss alone) are
checked against torch.nn cell loops with retain_grad at rel 1e-4 (float32 kernels against float32
autograd); the spectral bound of a linear RNN, which it reaches exactly, at rel 1e-4 (float64).
"""

import math

import matplotlib
import pytest
import torch

import vgkernels
from vgkernels.diagnostics import (
    gradient_horizon,
    last_step_traces,
    plot_step_bounds,
    plot_trace,
    trace_report,
)
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
    (row,) = trace_report(make_trace(g[None], jac=torch.full((1, T, 2), 2.0))).rows  # steps stretch 2x
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
    report = trace_report(make_trace(geometric(R)[None]), name="toy", loss_steps="last")
    md = report.to_markdown().splitlines()
    assert md[2] == "| " + " | ".join(report.headers()) + " |"
    assert md[3].startswith("|---|")
    cells = md[4].strip("|").split("|")
    assert [c.strip() for c in cells][:5] == ["layer 0", "1", "2.51e-08", "2.51e-08", "7"]
    text = report.to_text().splitlines()
    assert text[0] == "toy (rnn_tanh, T = 20, B = 2)"
    assert len(text[1]) == len(text[2]) == len(text[3])  # aligned columns
    assert str(report) == report.to_text()
    full = trace_report(make_trace((10.0 ** (0.1 * torch.arange(T - 1, -1, -1.0)))[None]), loss_steps="last")
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


# --- where the losses sit -----------------------------------------------------------------------


def flat(steps: int = T) -> torch.Tensor:
    """What a loss at every step gives: every step's own loss keeps the gradient up."""
    return torch.ones(steps, dtype=torch.float64)


def test_loss_at_every_step_states_no_horizon():
    report = trace_report(make_trace(flat()[None], jac=torch.full((1, T, 2), 4.0)), loss_steps="all")
    (row,) = report.rows
    assert not report.informative and not report.assumed
    assert row.anchor_t == T - 1 and row.loss_before_t == T - 2 and row.span_start_t == T - 1
    assert row.horizon_text() == "n/a" and math.isnan(row.ratio) and math.isnan(row.decay_rate)
    cells = report.table_rows()[0]
    assert cells[3] == "n/a" and cells[4] == "n/a" and cells[5] == "n/a"
    notes = " ".join(report.notes())
    assert "Every step carries a loss" in notes and "last_step_traces" in notes
    assert ">=" not in report.to_text().splitlines()[3]  # no horizon stated on the row


def test_without_loss_steps_the_horizon_is_marked_as_assumed():
    report = trace_report(make_trace(flat()[None], jac=torch.full((1, T, 2), 4.0)))
    (row,) = report.rows
    assert report.assumed and not row.injected
    assert row.horizon_text(report.assumed) == f">= {T - 1}†"
    assert report.table_rows()[0][4] == f">= {T - 1}†"
    assert "† loss_steps not given" in report.notes()[1] and "pass loss_steps" in report.notes()[1]


def test_losses_every_five_steps_cut_the_span():
    slow = geometric(0.1)  # 2 decades over 20 steps: never below 1e-3 within a span of 4 steps back
    report = trace_report(make_trace(slow[None]), loss_steps=[4, 9, 14, 19])
    (row,) = report.rows
    assert row.anchor_t == 19 and row.loss_before_t == 14 and row.span_start_t == 15
    assert row.horizon == 4 and row.horizon_cut and not row.horizon_full
    assert row.horizon_text() == ">= 4, cut"
    assert row.ratio == pytest.approx(10 ** (-0.1 * 4), rel=1e-5)  # over the span only
    assert row.decay_rate == pytest.approx(0.1, rel=1e-5)
    assert "Losses sit at more than one step" in " ".join(report.notes())
    fast = geometric(R)  # 0.4 decades per step: below 1e-3 after 8 steps, inside a 10-step span
    (row,) = trace_report(make_trace(fast[None]), loss_steps=[9, 19]).rows
    assert row.horizon == 7 and not row.horizon_cut and row.horizon_text() == "7"


def test_loss_steps_forms_and_errors():
    trace = make_trace(geometric(R)[None])
    mask = torch.zeros(T, dtype=torch.bool)
    mask[[3, 12]] = True
    forms = {"last": [T - 1], "all": list(range(T)), 12: [12], -1: [T - 1], (3, 12): [3, 12],
             torch.tensor([12, 3]): [3, 12], mask: [3, 12]}
    for given, expected in forms.items():
        assert trace_report(trace, loss_steps=given).loss_steps == expected
    assert trace_report(trace, anchor=12).loss_steps == [12]
    with pytest.raises(ValueError, match="loss_steps: expected 'last', 'all', steps or a mask, got 'first'"):
        trace_report(trace, loss_steps="first")
    with pytest.raises(ValueError, match=r"loss_steps: expected time steps in \[0, 20\), got 20"):
        trace_report(trace, loss_steps=[3, 20])
    with pytest.raises(ValueError, match="loss_steps: expected at least one step"):
        trace_report(trace, loss_steps=[])
    with pytest.raises(ValueError, match=r"bool mask of shape \(20,\), got \(3,\)"):
        trace_report(trace, loss_steps=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="loss_steps: expected .* got bool"):
        trace_report(trace, loss_steps=True)
    with pytest.raises(ValueError, match="got 1.5"):
        trace_report(trace, loss_steps=[1.5])
    with pytest.raises(ValueError, match="pass loss_steps only"):
        trace_report(trace, anchor=3, loss_steps=3)


def test_gradient_after_the_stated_last_loss_is_named():
    report = trace_report(make_trace(geometric(R)[None]), loss_steps=10)
    assert report.rows[0].gradient_after_t == T - 1
    assert f"t = {T - 1}, processed after it, has gradient too" in " ".join(report.notes())


def test_gradient_above_the_step_bound_proves_an_earlier_loss():
    g = geometric(R)
    g[:8] = g[8]  # from t = 7 back the gradient stops falling: more than 0.5 per step can carry
    report = trace_report(make_trace(torch.stack([g, g]), num_directions=1))  # two layers: 1 is the top
    lower, top = report.rows
    assert top.injected and top.loss_before_t == 7 and not lower.injected
    assert top.horizon is None and lower.horizon is None  # no row states a horizon
    assert not report.assumed and not report.informative
    assert report.table_rows()[1][4] == "n/a"
    assert "Gradient enters before the loss step (layer 1 at t = 7)" in " ".join(report.notes())
    # The same curve within a looser bound proves nothing: the report then says what it assumes.
    loose = trace_report(make_trace(g[None], jac=torch.full((1, T, 2), 1.5)))
    assert not loose.rows[0].injected and loose.assumed


# --- per-step losses on a real model: what the report states, and the informative measurement -------

V, EMB, HID, STEPS, BATCH = 11, 6, 8, 23, 4


class TinyLM(torch.nn.Module):
    """A word-level language model: embedding, 2-layer vgkernels LSTM, decoder; a loss at every step."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, EMB)
        self.rnn = vgkernels.nn.LSTM(EMB, HID, num_layers=2)
        self.dec = torch.nn.Linear(HID, V)

    def forward(self, tokens):
        out, _ = self.rnn(self.emb(tokens))
        return self.dec(out)


def step_losses(model, tokens, targets):
    """[B, T] cross-entropy of every step."""
    logits = model(tokens)
    return torch.nn.functional.cross_entropy(logits.permute(1, 2, 0), targets.t(), reduction="none")


def cell_loop_norms(model, tokens, targets, last_only):
    """[2, T] ‖∂loss/∂h_t‖ of both layers from torch.nn.LSTMCell loops with retain_grad."""
    cells = []
    for layer in range(2):
        cell = torch.nn.LSTMCell(EMB if layer == 0 else HID, HID)
        state = model.rnn.state_dict()
        cell.load_state_dict({k[:-3]: v for k, v in state.items() if k.endswith(f"_l{layer}")})
        cells.append(cell)
    x = model.emb(tokens)
    states = [(torch.zeros(BATCH, HID), torch.zeros(BATCH, HID)) for _ in cells]
    hidden = [[], []]
    for t in range(STEPS):
        inp = x[t]
        for layer, cell in enumerate(cells):
            h, c = cell(inp, states[layer])
            h.retain_grad()
            states[layer], inp = (h, c), h
            hidden[layer].append(h)
    losses = torch.nn.functional.cross_entropy(
        model.dec(torch.stack(hidden[1])).permute(1, 2, 0), targets.t(), reduction="none"
    )
    (losses[:, -1].sum() if last_only else losses.mean()).backward()
    return torch.tensor([[h.grad.norm().item() for h in layer] for layer in hidden], dtype=torch.float64)


def traced_lm():
    """A TinyLM, its tokens and targets, and its trace after a backward of the mean of every step's loss."""
    torch.manual_seed(1)
    model = TinyLM()
    tokens, targets = torch.randint(0, V, (STEPS, BATCH)), torch.randint(0, V, (STEPS, BATCH))
    with vgkernels.track(model) as traces:
        step_losses(model, tokens, targets).mean().backward()
    return model, tokens, targets, traces["rnn"]


def test_per_step_losses_state_no_horizon_and_the_last_step_measurement_is_exact():
    model, tokens, targets, trace = traced_lm()
    torch.testing.assert_close(  # the trace is the per-step-loss gradient itself
        trace.grad_norm.double(), cell_loop_norms(model, tokens, targets, last_only=False), rtol=1e-4, atol=0
    )
    report = trace_report(trace, loss_steps="all")
    assert not report.informative
    assert [r.horizon_text() for r in report.rows] == ["n/a", "n/a"]
    assert all(cells[3] == cells[4] == cells[5] == "n/a" for cells in report.table_rows())
    assert "Every step carries a loss" in report.to_markdown()

    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    last = last_step_traces(model, lambda: step_losses(model, tokens, targets))
    assert set(last) == {"rnn"}
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)
    expected = cell_loop_norms(model, tokens, targets, last_only=True)
    torch.testing.assert_close(last["rnn"].grad_norm.double(), expected, rtol=1e-4, atol=0)
    informative = trace_report(last["rnn"], loss_steps="last")
    assert informative.informative and not informative.assumed
    for row, curve in zip(informative.rows, expected, strict=True):
        assert row.horizon == gradient_horizon(curve) and row.horizon < STEPS - 1
        assert not row.horizon_cut and row.loss_before_t is None


def test_per_step_losses_are_detected_with_spectral_norms():
    model, tokens, _, trace = traced_lm()
    trace._output_probe = None  # as a trace without the output's gradient: the step-norm bound decides
    spectral = vgkernels.diagnostics.spectral_norms(model.rnn, model.emb(tokens), layer=None)
    report = trace_report(trace, spectral=spectral)
    assert report.rows[1].injected and not report.informative
    assert [r.horizon_text(report.assumed) for r in report.rows] == ["n/a", "n/a"]


def test_last_step_traces_arguments_and_restores_grads_on_error():
    model = TinyLM()
    tokens = torch.randint(0, V, (STEPS, BATCH))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"step: expected a time index in \[-23, 23\), got 23"):
        last_step_traces(model, lambda: step_losses(model, tokens, tokens), step=STEPS)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    with pytest.raises(ValueError, match=r"time_dim: expected a dimension of the losses \(4, 23\), got 2"):
        last_step_traces(model, lambda: step_losses(model, tokens, tokens), time_dim=2)
    with pytest.raises(ValueError, match="step_losses: expected per-step losses with a time dimension"):
        last_step_traces(model, lambda: step_losses(model, tokens, tokens).sum())
    with pytest.raises(TypeError, match="step_losses: expected a callable"):
        last_step_traces(model, 3)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        last_step_traces("model", lambda: None)
    first = last_step_traces(model, lambda: step_losses(model, tokens, tokens), step=5)["rnn"]
    (row, top) = trace_report(first, loss_steps=5).rows
    assert top.anchor_t == 5 and top.gradient_after_t is None  # nothing after the loss at t = 5


# --- the spectral step norms and their bound ----------------------------------------------------


def test_spectral_bound_is_tight_for_a_linear_rnn():
    """ReLU RNN with positive states and W = ρq, q symmetric with ‖q‖₂ = 1: ‖J‖₂ = ρ at every step."""
    H, rho, steps = 6, 0.7, 30
    rnn = vgkernels.nn.RNN(1, H, nonlinearity="relu", track=True, dtype=torch.float64)
    q = torch.rand(H, H, dtype=torch.float64)
    q = q + q.t()  # symmetric and positive: h stays positive, and the Perron vector is q's top one
    q = q / torch.linalg.matrix_norm(q, ord=2)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(rho * q)
        rnn.weight_ih_l0.fill_(1.0)
        rnn.bias_ih_l0.fill_(1.0)
        rnn.bias_hh_l0.zero_()
    x = torch.rand(steps, 1, 1, dtype=torch.float64) + 0.5
    # A loss along q's top eigenvector v: Jᵀv = ρ q v = ρ v, so every step scales the gradient by ρ.
    top = torch.linalg.eigh(q).eigenvectors[:, -1]
    out, _ = rnn(x)
    (out[-1] @ top).sum().backward()
    spectral = vgkernels.diagnostics.spectral_norms(rnn, x, layer=None)
    report = trace_report(rnn.trace, loss_steps="last", spectral=spectral)
    (row,) = report.rows
    assert row.spec_mean == pytest.approx(rho, rel=1e-5) and row.spec_frac_below_1 == 1.0
    assert row.bound_ratio == pytest.approx(rho ** (steps - 1), rel=1e-4)
    assert row.ratio == pytest.approx(rho ** (steps - 1), rel=1e-4)  # the bound is reached
    assert row.horizon == row.bound_horizon == math.floor(math.log(1e-3) / math.log(rho))
    torch.testing.assert_close(row.bound_curve, rnn.trace.grad_norm[0].double(), rtol=1e-4, atol=0)
    headers = report.headers()
    assert headers[-4:] == ("mean ‖J‖₂", "max ‖J‖₂", "Π‖J‖₂ over span", "horizon ‖J‖₂ allows")
    assert report.table_rows()[0][-1] == str(row.bound_horizon)


@pytest.mark.parametrize("cls", [vgkernels.nn.GRU, vgkernels.nn.LSTM])
def test_spectral_bound_holds_on_real_traces(cls):
    torch.manual_seed(3)
    rnn = cls(2, 7, num_layers=2, track=True)
    x = torch.rand(25, 3, 2)
    out, _ = rnn(x)
    out[-1].sum().backward()
    spectral = vgkernels.diagnostics.spectral_norms(rnn, x, layer=None)
    report = trace_report(rnn.trace, loss_steps="last", spectral=spectral)
    lower, top = report.rows
    assert lower.bound_ratio is None and lower.bound_curve is None  # gradient enters from above
    assert lower.spec_mean is not None and top.bound_ratio is not None
    assert top.ratio <= top.bound_ratio * (1 + 1e-4)
    assert top.horizon <= top.bound_horizon
    grad = rnn.trace.grad_norm[1].double()
    assert bool((grad <= top.bound_curve * (1 + 1e-4)).all())  # the ceiling holds at every step
    assert top.spec_max <= top.jac_max  # the Frobenius norm bounds the spectral one
    with pytest.raises(ValueError, match=r"spectral: expected per-sample norms of shape \(2, 25, 3\)"):
        trace_report(rnn.trace, spectral=spectral[0])
    with pytest.raises(TypeError, match="spectral: expected a tensor"):
        trace_report(rnn.trace, spectral=[1.0])


def test_plots_with_spectral_norms(tmp_path):
    torch.manual_seed(0)
    reports, spectra = {}, {}
    for name, cls in (("GRU", vgkernels.nn.GRU), ("RNN", vgkernels.nn.RNN)):
        rnn = cls(1, 5, track=True)
        x = torch.rand(30, 2, 1)
        out, _ = rnn(x)
        out[-1].sum().backward()
        spectra[name] = vgkernels.diagnostics.spectral_norms(rnn, x, layer=None)
        reports[name] = trace_report(rnn.trace, loss_steps="last", spectral=spectra[name], name=name)
    traces = {name: rep.trace for name, rep in reports.items()}
    both = plot_trace(traces, tmp_path / "both.png", spectral=spectra)
    assert both.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one = plot_trace(traces["GRU"], tmp_path / "one.png", spectral=spectra["GRU"])
    assert one.stat().st_size > 1000
    with pytest.raises(ValueError, match="spectral: pass a mapping"):
        plot_trace(traces, tmp_path / "bad.png", spectral=spectra["GRU"])
    bounds = plot_step_bounds(reports, tmp_path / "bounds.png")
    assert bounds.stat().st_size > 1000
    with pytest.raises(ValueError, match="none has a step-norm bound"):
        plot_step_bounds(trace_report(traces["GRU"]), tmp_path / "bad.png")
    with pytest.raises(TypeError, match="reports: expected a TraceReport"):
        plot_step_bounds({"a": 1}, tmp_path / "bad.png")


def test_packed_sequences_get_no_batch_bound():
    """With sequences of different lengths the samples' losses sit at different steps: no bound."""
    torch.manual_seed(2)
    rnn = vgkernels.nn.GRU(2, 5, track=True)
    padded = torch.rand(12, 3, 2)
    lengths = torch.tensor([12, 9, 5])
    packed = torch.nn.utils.rnn.pack_padded_sequence(padded, lengths, enforce_sorted=False)
    out, h_n = rnn(packed)
    h_n.sum().backward()  # every sequence's last state
    spectral = vgkernels.diagnostics.spectral_norms(rnn, padded, layer=None)
    report = trace_report(rnn.trace, loss_steps="last", spectral=spectral)
    assert report.loss_steps == [4, 8, 11]  # every sequence's last step
    (row,) = report.rows
    assert row.anchor_t == 11 and row.loss_before_t == 8 and row.span_start_t == 9
    assert row.bound_ratio is None and row.bound_curve is None and row.bound_horizon_text() == "-"
    assert row.spec_mean is not None and row.horizon is not None
    unknown = trace_report(rnn.trace, spectral=spectral)  # the full-length sample alone is checked
    assert not unknown.rows[0].injected


# ---------------------------------------------------------------------------------------------------
# Loss steps measured from the gradient reaching the module's output (rtol 1e-5 against retain_grad).


def _per_step_lm(loss_at):
    torch.manual_seed(0)
    lstm = vgkernels.nn.LSTM(6, 8, num_layers=2, track=True)
    x = torch.randn(12, 3, 6)
    out, (h_n, _) = lstm(x)
    out.retain_grad()
    if loss_at == "all":
        loss = out.pow(2).sum()
    elif loss_at == "h_n":
        loss = h_n[-1].pow(2).sum()
    else:
        loss = out[loss_at].pow(2).sum()
    loss.backward()
    return lstm.trace, out.grad


@pytest.mark.parametrize("loss_at", ["all", 11, 5, "h_n"])
def test_output_grad_norm_equals_the_gradient_of_the_output(loss_at):
    trace, grad = _per_step_lm(loss_at)
    grad = torch.zeros(12, 3, 8) if grad is None else grad  # the loss read h_n only
    torch.testing.assert_close(trace.output_grad_norm_per_sample, grad.norm(dim=-1), rtol=1e-5, atol=0)
    torch.testing.assert_close(trace.output_grad_norm, grad.flatten(1).norm(dim=-1), rtol=1e-5, atol=0)


def test_report_measures_per_step_losses_and_states_no_horizon():
    trace, _ = _per_step_lm("all")
    report = trace_report(trace)
    assert report.loss_steps_measured and report.loss_steps == list(range(12))
    assert [r.horizon_text(report.assumed) for r in report.rows] == ["n/a", "n/a"]
    assert not report.informative and "Every step carries a loss" in str(report)
    assert "†" not in str(report)


@pytest.mark.parametrize("loss_at,expected", [(11, [11]), (5, [5]), ("h_n", [11])])
def test_report_measures_a_single_loss_step(loss_at, expected):
    trace, _ = _per_step_lm(loss_at)
    report = trace_report(trace)
    assert report.loss_steps_measured and report.loss_steps == expected
    assert report.rows == trace_report(trace, loss_steps=expected[0]).rows
    assert report.rows[-1].horizon is not None


def test_measured_loss_steps_on_packed_input_and_after_pickling():
    import pickle

    torch.manual_seed(0)
    gru = vgkernels.nn.GRU(4, 5, track=True)
    seqs = [torch.randn(n, 4) for n in (3, 7, 5)]
    packed = torch.nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False)
    out, _ = gru(packed)
    padded, lengths = torch.nn.utils.rnn.pad_packed_sequence(out)
    padded.retain_grad()
    padded[2].pow(2).sum().backward()  # a loss on position 2 of every sequence
    want = padded.grad.norm(dim=-1)
    torch.testing.assert_close(gru.trace.output_grad_norm_per_sample, want, rtol=1e-5, atol=0)
    assert trace_report(gru.trace).loss_steps == [2]
    copy = pickle.loads(pickle.dumps(gru.trace))
    torch.testing.assert_close(copy.output_grad_norm_per_sample, want, rtol=1e-5, atol=0)
