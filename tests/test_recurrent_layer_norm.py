"""Layer-normalized LSTM/GRU cells (layer_norm=True) and in-network BPTT clipping (grad_clip=c).

Oracles: the eager reference cell (its LayerNorm in float64), torch.autograd.functional.jacobian of
one reference step, and a reference loop whose hooks clamp the gate pre-activation gradients.
Tolerances: float32 atol 1e-5, rtol 1e-4 (normwise rtol against float64 for the stacked cells);
float64 gradcheck with torch's defaults; Jacobian norms rel 1e-5 in float64.
"""

import pytest
import torch
import torch.nn.functional as F

import vgkernels as vgk
from vgkernels.reference.recurrent import CellNorm, cell_step

BACKENDS = ["cpp"]
ATOL, RTOL = 1e-5, 1e-4


def build(mode, backend, dtype=torch.float32, **kwargs):
    cls = {"lstm": vgk.nn.LSTM, "gru": vgk.nn.GRU}[mode]
    m = cls(3, 5, layer_norm=True, backend=backend, dtype=dtype, **kwargs)
    with torch.no_grad():  # move gains and shifts off their initial 1 and 0 so that they matter
        for name, p in m.named_parameters():
            if name.startswith("layer_norm"):
                p.add_(0.3 * torch.randn_like(p))
    return m


def run(model, x):
    out, state = model(x)
    states = list(state) if isinstance(state, tuple) else [state]
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    loss = (out * w).sum() + sum((s * s).sum() for s in states)
    grads = torch.autograd.grad(loss, [x, *model.parameters()])
    return [out, *states], grads


def test_parameters_and_initialization():
    m = vgk.nn.LSTM(3, 4, num_layers=2, bidirectional=True, layer_norm=True)
    names = [n for n, _ in m.named_parameters() if n.startswith("layer_norm")]
    assert names[:6] == [f"layer_norm_{k}_l0" for k in
                         ("ih_weight", "ih_bias", "hh_weight", "hh_bias", "cell_weight", "cell_bias")]
    assert len(names) == 2 * 2 * 6
    assert torch.equal(m.layer_norm_hh_weight_l1_reverse, torch.ones(16))
    assert torch.equal(m.layer_norm_cell_bias_l0, torch.zeros(4))
    g = vgk.nn.GRU(3, 4, layer_norm=True)
    assert g.layer_norm_hh_weight_l0.shape == (12,) and not hasattr(g, "layer_norm_cell_weight_l0")
    # the torch.nn parameters load into torch.nn unchanged
    plain = {k: v for k, v in m.state_dict().items() if not k.startswith("layer_norm")}
    torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True).load_state_dict(plain)
    with pytest.raises(ValueError, match="layer_norm: layer-normalized cells exist for LSTM and GRU"):
        vgk.nn.RNN(3, 4, layer_norm=True)


def test_reference_cell_is_ba_et_al():
    """gates = LN(W_ih x) + LN(W_hh h) + b, c' = f c + i g, h' = o tanh(LN(c')), spelled out by hand."""
    m = build("lstm", "reference")
    x = torch.randn(1, 2, 3)
    h0, c0 = torch.randn(1, 2, 5), torch.randn(1, 2, 5)
    out, (h1, c1) = m(x, (h0, c0))
    ln = lambda v, w, b: F.layer_norm(v, v.shape[-1:], w, b, 1e-5)
    gates = (ln(x[0] @ m.weight_ih_l0.t(), m.layer_norm_ih_weight_l0, m.layer_norm_ih_bias_l0)
             + ln(h0[0] @ m.weight_hh_l0.t(), m.layer_norm_hh_weight_l0, m.layer_norm_hh_bias_l0)
             + m.bias_ih_l0 + m.bias_hh_l0)
    i, f, g, o = gates.chunk(4, -1)
    c = f.sigmoid() * c0[0] + i.sigmoid() * g.tanh()
    h = o.sigmoid() * ln(c, m.layer_norm_cell_weight_l0, m.layer_norm_cell_bias_l0).tanh()
    torch.testing.assert_close(c1[0], c, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[0], h, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
def test_matches_reference(backend, mode, num_layers, bidirectional):
    """Against the float64 reference, normwise: two stacked LN cells with gains off 1 are ill-conditioned
    enough that single elements of any float32 run (the eager float32 reference's too) miss the float64
    values by a few times atol + rtol|x|, while every tensor stays within rtol normwise (~1e-5 seen)."""
    ours = build(mode, backend, num_layers=num_layers, bidirectional=bidirectional)
    exact = build(mode, "reference", torch.float64, num_layers=num_layers, bidirectional=bidirectional)
    exact.load_state_dict(ours.state_dict())
    x = torch.randn(6, 3, 3, requires_grad=True)
    a_out, a_grads = run(ours, x)
    c_out, c_grads = run(exact, x.detach().double().requires_grad_())
    for a, c in zip(a_out + list(a_grads), c_out + list(c_grads), strict=True):
        assert a.dtype == torch.float32
        assert ((a.double() - c).norm() / c.norm()).item() < RTOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("hidden,T,B", [(1, 1, 1), (3, 4, 1), (37, 3, 2)])
def test_odd_sizes(backend, mode, hidden, T, B):
    cls = {"lstm": vgk.nn.LSTM, "gru": vgk.nn.GRU}[mode]
    ours = cls(2, hidden, layer_norm=True, backend=backend)
    ref = cls(2, hidden, layer_norm=True, backend="reference")
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, 2, requires_grad=True)
    a_out, a_grads = run(ours, x)
    b_out, b_grads = run(ref, x)
    for a, b in zip(a_out + list(a_grads), b_out + list(b_grads), strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradcheck_float64(backend, mode, bidirectional):
    from vgkernels.ops.recurrent import layer_norm_names, recurrent, weight_names

    m = build(mode, backend, dtype=torch.float64, bidirectional=bidirectional)
    D = 2 if bidirectional else 1
    names = weight_names(1, D, True) + layer_norm_names(mode, 1, D)
    params = [getattr(m, n).detach().clone().requires_grad_() for n in names]
    n_plain = len(weight_names(1, D, True))
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, 2])

    def fn(x, *params):
        out, h_n, c_n, _ = recurrent(x, None, list(params[:n_plain]), mode=mode, hidden_size=5,
                                     bidirectional=bidirectional, lengths=lengths,
                                     layer_norm_weights=list(params[n_plain:]), backend=backend)
        return (out, h_n) if c_n is None else (out, h_n, c_n)

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_trace_matches_reference(backend, mode, bidirectional):
    ours = build(mode, backend, bidirectional=bidirectional, num_layers=2)
    ref = build(mode, "reference", bidirectional=bidirectional, num_layers=2)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(5, 3, 3)
    traces = []
    for model in (ours, ref):
        with vgk.track(model) as t:
            out, _ = model(x)
            (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        traces.append(t[""])
    a, b = traces
    for field in ("grad_norm_per_sample", "jacobian_norm_per_sample", "grad_norm", "jacobian_norm"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-4, atol=1e-6)
    if mode == "lstm":
        torch.testing.assert_close(a.cell_grad_norm, b.cell_grad_norm, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_jacobian_norm_equals_autograd_jacobian(backend, mode):
    T, B, H = 3, 2, 4
    cls = {"lstm": vgk.nn.LSTM, "gru": vgk.nn.GRU}[mode]
    m = cls(2, H, layer_norm=True, backend=backend, dtype=torch.float64, track=True)
    x = torch.randn(T, B, 2, dtype=torch.float64)
    with torch.no_grad():
        m(x)
        got = m.trace.jacobian_norm_per_sample[0]
        xproj = F.layer_norm(x @ m.weight_ih_l0.t(), (m.weight_ih_l0.shape[0],), m.layer_norm_ih_weight_l0,
                             m.layer_norm_ih_bias_l0) + m.bias_ih_l0 + (m.bias_hh_l0 if mode == "lstm" else 0)
        norm = CellNorm(m.layer_norm_hh_weight_l0, m.layer_norm_hh_bias_l0,
                        getattr(m, "layer_norm_cell_weight_l0", None),
                        getattr(m, "layer_norm_cell_bias_l0", None))
        b_hh = m.bias_hh_l0 if mode == "gru" else None
        h = torch.zeros(B, H, dtype=torch.float64)
        c = torch.zeros(B, H, dtype=torch.float64) if mode == "lstm" else None
        for t in range(T):
            for b in range(B):
                def step(s, t=t, b=b):
                    if mode == "lstm":
                        hn, cn = cell_step(mode, xproj[t, b][None], s[None, :H], s[None, H:], m.weight_hh_l0,
                                           None, norm)
                        return torch.cat([hn[0], cn[0]])
                    return cell_step(mode, xproj[t, b][None], s[None], None, m.weight_hh_l0, b_hh, norm)[0][0]

                s = torch.cat([h[b], c[b]]) if mode == "lstm" else h[b]
                jac = torch.autograd.functional.jacobian(step, s)
                assert got[t, b].item() == pytest.approx(torch.linalg.matrix_norm(jac).item(), rel=1e-5)
            h, c = cell_step(mode, xproj[t], h, c, m.weight_hh_l0, b_hh, norm)


def clipped_reference(mode, model, x, clip):
    """The eager loop of torch.nn equations with hooks that clamp each step's pre-activation gradients."""
    H = model.hidden_size
    w_ih, w_hh, b_ih, b_hh = model.weight_ih_l0, model.weight_hh_l0, model.bias_ih_l0, model.bias_hh_l0
    clamp = lambda g: g.clamp(-clip, clip)
    h = torch.zeros(x.shape[1], H)
    c = torch.zeros_like(h)
    outs = []
    for t in range(x.shape[0]):
        gx = x[t] @ w_ih.t() + b_ih
        gh = h @ w_hh.t() + b_hh
        if mode == "lstm":
            pre = gx + gh
            pre.register_hook(clamp)
            i, f, g, o = pre.chunk(4, -1)
            c = f.sigmoid() * c + i.sigmoid() * g.tanh()
            h = o.sigmoid() * c.tanh()
        elif mode == "gru":
            xr, xz, xn = gx.chunk(3, -1)
            hr, hz, hn = gh.chunk(3, -1)
            pre_r, pre_z = xr + hr, xz + hz
            pre_r.register_hook(clamp)
            pre_z.register_hook(clamp)
            pre_n = xn + pre_r.sigmoid() * hn
            pre_n.register_hook(clamp)
            z = pre_z.sigmoid()
            h = (1 - z) * pre_n.tanh() + z * h
        else:
            pre = gx + gh
            pre.register_hook(clamp)
            h = pre.tanh()
        outs.append(h)
    return torch.stack(outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
def test_grad_clip_matches_hooked_reference(backend, mode):
    cls = {"lstm": vgk.nn.LSTM, "gru": vgk.nn.GRU, "rnn_tanh": vgk.nn.RNN}[mode]
    clip = 0.05
    m = cls(3, 6, backend=backend, grad_clip=clip)
    x = torch.randn(8, 4, 3, requires_grad=True)
    w = 5 * torch.randn(8, 4, 6)
    out, _ = m(x)
    ours = torch.autograd.grad((out * w).sum(), [x, *m.parameters()])
    ref_out = clipped_reference(mode, m, x, clip)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=RTOL)
    theirs = torch.autograd.grad((ref_out * w).sum(), [x, *m.parameters()])
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    # clipping changed the gradients: the unclipped module gives different ones
    m.grad_clip = None
    out, _ = m(x)
    unclipped = torch.autograd.grad((out * w).sum(), [x])
    assert not torch.allclose(unclipped[0], ours[0], atol=1e-3)
