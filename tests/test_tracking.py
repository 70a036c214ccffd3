"""BPTT traces: grad_norm / cell_grad_norm / jacobian_norm against independent computations.

Oracles: the retain_grad'ed states of the eager reference loop, torch.autograd.functional.jacobian of
one reference step, and the exact linear-RNN result of REFERENCES.md. Tolerances: float32 rtol 1e-4,
atol 1e-6 against the reference; float64 rtol 1e-6 for the linear regime and the Jacobian oracle.
"""

import math

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import vgkernels as vgk
from vgkernels.reference.recurrent import GATES, cell_step

BACKENDS = ["cpp"]
MODES = ["lstm", "gru", "rnn_tanh", "rnn_relu", "rnn_sigmoid"]


def build(mode, input_size, hidden, backend, **kwargs):
    cls = {"gru": vgk.nn.GRU, "lstm": vgk.nn.LSTM}.get(mode, vgk.nn.RNN)
    extra = {"nonlinearity": mode[4:]} if mode.startswith("rnn") else {}
    return cls(input_size, hidden, backend=backend, **extra, **kwargs)


def traced_run(model, x, weight):
    with vgk.track(model) as traces:
        out, _ = model(x)
        data = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
        (data * weight).sum().backward()
    return traces[""]


def assert_trace_equal(a, b, rtol=1e-4, atol=1e-6):
    torch.testing.assert_close(a.grad_norm_per_sample, b.grad_norm_per_sample, rtol=rtol, atol=atol)
    torch.testing.assert_close(a.grad_norm, b.grad_norm, rtol=rtol, atol=atol)
    torch.testing.assert_close(a.jacobian_norm_per_sample, b.jacobian_norm_per_sample, rtol=rtol, atol=atol)
    torch.testing.assert_close(a.jacobian_norm, b.jacobian_norm, rtol=rtol, atol=atol)
    if a.mode == "lstm":
        torch.testing.assert_close(a.cell_grad_norm, b.cell_grad_norm, rtol=rtol, atol=atol)
    else:
        assert a.cell_grad_norm is None and b.cell_grad_norm is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_trace_equals_reference_retain_grad(backend, mode, num_layers, bidirectional):
    ours = build(mode, 3, 5, backend, num_layers=num_layers, bidirectional=bidirectional)
    ref = build(mode, 3, 5, "reference", num_layers=num_layers, bidirectional=bidirectional)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(6, 4, 3)
    w = torch.randn(6, 4, 5 * (2 if bidirectional else 1))
    a, b = traced_run(ours, x, w), traced_run(ref, x, w)
    L = num_layers * (2 if bidirectional else 1)
    assert a.grad_norm.shape == (L, 6) and a.grad_norm_per_sample.shape == (L, 6, 4)
    assert a.jacobian_norm.shape == (L, 6) and a.jacobian_norm_per_sample.shape == (L, 6, 4)
    assert a.grad_norm.dtype == torch.float32
    assert_trace_equal(a, b)
    assert (a.grad_norm > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_trace_packed_sequence(backend, mode):
    ours = build(mode, 3, 4, backend, bidirectional=True)
    ref = build(mode, 3, 4, "reference", bidirectional=True)
    ref.load_state_dict(ours.state_dict())
    packed = pack_sequence([torch.randn(n, 3) for n in (2, 5, 3)], enforce_sorted=False)
    w = torch.randn(packed.data.shape[0], 8)
    a, b = traced_run(ours, packed, w), traced_run(ref, packed, w)
    assert_trace_equal(a, b)
    # steps past a sequence's end contribute nothing
    assert torch.all(a.grad_norm_per_sample[:, 2:, 0] == 0)
    assert torch.all(a.jacobian_norm_per_sample[:, 3:, 2] == 0)
    # the batch mean of the Jacobian norm counts only the live samples
    torch.testing.assert_close(a.jacobian_norm[:, 4], a.jacobian_norm_per_sample[:, 4, 1])


def _one_step(mode, module, x_t, h, c):
    """s_t as a function of s_prev for one sample, layer 0 forward direction, from the module weights."""
    w_ih, w_hh, b_ih, b_hh = module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0
    xproj = x_t @ w_ih.t() + b_ih + (0 if mode == "gru" else b_hh)
    h_new, c_new = cell_step(mode, xproj[None], h[None], None if c is None else c[None], w_hh,
                             b_hh if mode == "gru" else None)
    return h_new[0] if c is None else torch.cat([h_new[0], c_new[0]])


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("mode", MODES)
def test_jacobian_norm_equals_autograd_jacobian(backend, mode):
    T, B, H = 4, 3, 5
    model = build(mode, 2, H, backend, dtype=torch.float64)
    x = torch.randn(T, B, 2, dtype=torch.float64)
    with torch.no_grad():
        model.track = True
        model(x)
    trace = model.trace
    ref = build(mode, 2, H, "reference", dtype=torch.float64)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        out, state = ref(x)
    hs = torch.cat([torch.zeros(1, B, H, dtype=torch.float64), out])
    if mode == "lstm":  # recover the cell states by rerunning the reference one step at a time
        cs = [torch.zeros(B, H, dtype=torch.float64)]
        for t in range(T):
            s = torch.stack([_one_step(mode, ref, x[t, b], hs[t, b], cs[t][b]) for b in range(B)])
            cs.append(s[:, H:])
    with torch.no_grad():
        for t in range(T):
            for b in range(B):
                if mode == "lstm":
                    s_prev = torch.cat([hs[t, b], cs[t][b]])
                    f = lambda s, t=t, b=b: _one_step(mode, ref, x[t, b], s[:H], s[H:])
                else:
                    s_prev = hs[t, b]
                    f = lambda s, t=t, b=b: _one_step(mode, ref, x[t, b], s, None)
                jac = torch.autograd.functional.jacobian(f, s_prev)
                expected = torch.linalg.matrix_norm(jac, ord="fro").item()
                got = trace.jacobian_norm_per_sample[0, t, b].item()
                assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), (t, b)


def linear_regime_w_hh(mode, H, rho):
    """A float64 W_hh [G*H, H] under which, with zero biases and tiny inputs, backpropagation through
    one step multiplies the gradient by rho times an orthogonal matrix Q.

    Elman RNN: W_hh = rho Q. GRU and LSTM: near the zero state every gate is 1/2, and a step maps the
    gradient (the GRU's of h, the LSTM's of c) by 1/2 + W^T/4, W the n (GRU) or g (LSTM) block; every
    other block is 0, so W = 4 rho Q - 2 I gives rho Q^T.
    """
    q, _ = torch.linalg.qr(torch.randn(H, H, dtype=torch.float64))
    if mode.startswith("rnn"):
        return rho * q
    w = torch.zeros(GATES[mode] * H, H, dtype=torch.float64)
    w[2 * H: 3 * H] = 4 * rho * q - 2 * torch.eye(H, dtype=torch.float64)  # n (GRU: r, z, n), g (i, f, g, o)
    return w


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("rho", [0.9, 1.1])
def test_linear_regime_exact_decay(backend, bidirectional, rho):
    """Orthogonal W_hh scaled by rho and tiny inputs give grad_norm[t] = rho^(T-1-t) grad_norm[T-1]
    and a step Jacobian norm of rho sqrt(H) (REFERENCES.md, linear RNN)."""
    T, B, H = 12, 2, 8
    model = build("rnn_tanh", 3, H, backend, dtype=torch.float64, bias=False, bidirectional=bidirectional)
    with torch.no_grad():
        for suffix in ["", "_reverse"][: 1 + bidirectional]:
            getattr(model, f"weight_hh_l0{suffix}").copy_(linear_regime_w_hh("rnn_tanh", H, rho))
    x = 1e-7 * torch.randn(T, B, 3, dtype=torch.float64)
    with vgk.track(model) as traces:
        out, _ = model(x)
        loss = out[-1, :, :H].sum() + (out[0, :, H:].sum() if bidirectional else 0)
        loss.backward()
    trace = traces[""]
    g = trace.grad_norm[0].double()
    expected = rho ** torch.arange(T - 1, -1, -1, dtype=torch.float64) * g[-1]
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(trace.jacobian_norm, torch.full_like(trace.jacobian_norm, rho * math.sqrt(H)),
                               rtol=1e-5, atol=0)
    if bidirectional:  # the reverse direction's loss sits at position 0
        g = trace.grad_norm[1].double()
        expected = rho ** torch.arange(T, dtype=torch.float64) * g[0]
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=0)


def assert_decay(norms, rho, last, floor):
    """norms[t] = rho^(last-t) norms[last] for t <= last, wherever that is above floor."""
    g = norms[: last + 1].double()
    expected = rho ** torch.arange(last, -1, -1, dtype=torch.float64) * g[-1]
    above = expected > floor
    torch.testing.assert_close(g[above], expected[above], rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("mode", ["rnn_tanh", "gru", "lstm"])
def test_float32_trace_keeps_norms_whose_square_underflows(backend, mode):
    """float32, rho = 0.5, T = 100: the decay reaches ~1e-29, where a float32 squared norm underflows
    (below ~1e-19) but the float32 gradient does not (above ~1e-38): the trace must not read 0 there."""
    T, B, H, rho = 100, 2, 16, 0.5
    model = build(mode, 3, H, backend, bias=False)
    with torch.no_grad():
        model.weight_hh_l0.copy_(linear_regime_w_hh(mode, H, rho))
    x = 1e-6 * torch.randn(T, B, 3)
    with vgk.track(model) as traces:
        out, _ = model(x)
        out[-1].sum().backward()
    trace = traces[""]
    assert trace.grad_norm.dtype == torch.float32
    floor = 1e-33  # the gradient's elements stay well inside float32's normal range
    if mode == "lstm":
        # c's gradient shrinks by rho Q^T per step; h's is (2 rho Q^T - I) times c's of the next step
        # (before T-1, where the loss adds to it), so it decays alike from T-2 on.
        assert_decay(trace.cell_grad_norm[0], rho, T - 1, floor)
        assert_decay(trace.grad_norm[0], rho, T - 2, floor)
    else:
        assert_decay(trace.grad_norm[0], rho, T - 1, floor)
    assert trace.grad_norm[0].min() < 1e-25  # the range float32 squares lose is covered


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_layer_norm_trace_keeps_norms_whose_square_underflows(backend, mode):
    """A loss scaled by 2^-100 scales every gradient exactly (a power of two, and the gradients stay
    normal float32 numbers), so the trace scales by 2^-100 too, though the squares underflow in float32."""
    model = build(mode, 3, 8, backend, layer_norm=True)
    x, w = torch.randn(6, 2, 3), torch.randn(6, 2, 8)
    scale = 2.0**-100
    a, b = traced_run(model, x, w), traced_run(model, x, scale * w)
    torch.testing.assert_close(b.grad_norm_per_sample, scale * a.grad_norm_per_sample, rtol=1e-5, atol=0)
    if mode == "lstm":
        torch.testing.assert_close(b.cell_grad_norm, scale * a.cell_grad_norm, rtol=1e-5, atol=0)
    assert (b.grad_norm > 0).all()


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_no_grad_fills_forward_part_only(backend):
    model = build("lstm", 3, 4, backend, track=True)
    with torch.no_grad():
        model(torch.randn(5, 2, 3))
    assert model.trace is not None
    assert model.trace.jacobian_norm.shape == (1, 5)
    assert (model.trace.jacobian_norm > 0).all()
    assert model.trace.grad_norm is None and model.trace.cell_grad_norm is None


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_track_context_names_modules_and_restores(backend):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = build("gru", 3, 4, backend)
            self.blocks = torch.nn.ModuleList([build("lstm", 4, 4, backend, num_layers=2)])
            self.head = torch.nn.Linear(4, 1)

        def forward(self, x):
            h, _ = self.encoder(x)
            h, _ = self.blocks[0](h)
            return self.head(h[-1])

    net = Net()
    assert net.encoder.trace is None
    with vgk.track(net) as traces:
        net(torch.randn(5, 2, 3)).sum().backward()
    assert set(traces) == {"encoder", "blocks.0"}
    assert traces["blocks.0"].grad_norm.shape == (2, 5)
    assert traces["encoder"] is net.encoder.trace
    assert not net.encoder.track and not net.blocks[0].track
    # the encoder's last step feeds the head only through the LSTM, so every step has a gradient
    assert (traces["encoder"].grad_norm > 0).all()
    with pytest.raises(ValueError, match="contains no vgkernels recurrent module"):
        with vgk.track(torch.nn.Linear(2, 2)):
            pass


@pytest.mark.parametrize("backend", BACKENDS)
def test_trace_includes_final_state_gradient(backend):
    """A loss on h_n alone reaches the last position's state through grad_norm."""
    model = build("gru", 3, 4, backend, track=True)
    out, h_n = model(torch.randn(5, 2, 3))
    (h_n * 2).sum().backward()
    g = model.trace.grad_norm_per_sample[0]
    torch.testing.assert_close(g[-1], torch.full((2,), 4.0), rtol=1e-6, atol=0)
