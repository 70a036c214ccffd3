"""spectral_norms against torch.linalg.matrix_norm(ord=2) of the step Jacobian that autograd computes from
torch.nn's own cells (LSTMCell, GRUCell, RNNCell) run over the sequence, and, for the layer-normalized
LSTM and GRU, from the cell equations written out here (checked first against the module's own output).

Tolerances: rtol 1e-4 in float64, for both methods (power iteration run to a relative change of
1e-11); the linear-RNN oracle rtol 1e-6 (exact: 1e-12); float32 input rtol 1e-3.
"""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import vgkernels as vgk
from vgkernels.diagnostics import spectral, spectral_norms

RTOL = 1e-4
TIGHT = {"iters": 3000, "tol": 1e-11}
DT = torch.float64
METHODS = [{"method": "exact"}, {"method": "power", **TIGHT}]

TORCH_MODULES = {
    "lstm": (nn.LSTM, {}),
    "gru": (nn.GRU, {}),
    "rnn_tanh": (nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}),
}


def cell_of(module, mode, layer, direction):
    """torch.nn's cell with the weights of one layer-direction of ``module``."""
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    w_ih = getattr(module, "weight_ih" + suffix)
    H = module.hidden_size
    bias = getattr(module, "bias_ih" + suffix, None) is not None
    if mode == "lstm":
        cell = nn.LSTMCell(w_ih.shape[1], H, bias=bias, dtype=DT)
    elif mode == "gru":
        cell = nn.GRUCell(w_ih.shape[1], H, bias=bias, dtype=DT)
    elif mode == "rnn_sigmoid":
        return None
    else:
        cell = nn.RNNCell(w_ih.shape[1], H, bias=bias, nonlinearity=mode[4:], dtype=DT)
    with torch.no_grad():
        for kind in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if bias else ()):
            getattr(cell, kind).copy_(getattr(module, kind + suffix))
    return cell


def sigmoid_cell(module, layer, direction):
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    w_ih, w_hh = getattr(module, "weight_ih" + suffix), getattr(module, "weight_hh" + suffix)
    b_ih, b_hh = getattr(module, "bias_ih" + suffix), getattr(module, "bias_hh" + suffix)
    return lambda x, h: torch.sigmoid(x @ w_ih.t() + b_ih + h @ w_hh.t() + b_hh)


def oracle(module, mode, x, hx=None, layer=0, direction=0):
    """[T, B] spectral norms of the autograd Jacobian of torch.nn's cell, state by state.

    x: [T, B, I] (not batch_first). Layers below ``layer`` are run with torch.nn's cells as well.
    """
    T, B = x.shape[0], x.shape[1]
    H = module.hidden_size
    D = 2 if module.bidirectional else 1
    h0_all, c0_all = (hx if mode == "lstm" else (hx, None)) if hx is not None else (None, None)

    def init(all_states, index):
        return torch.zeros(B, H, dtype=DT) if all_states is None else all_states[index].to(DT)

    def run(layer_, direction_, inputs):
        cell = cell_of(module, mode, layer_, direction_) if mode != "rnn_sigmoid" else \
            sigmoid_cell(module, layer_, direction_)
        index = layer_ * D + direction_
        h = init(h0_all, index)
        c = init(c0_all, index) if mode == "lstm" else None
        prev, out = [None] * T, [None] * T
        for t in (range(T - 1, -1, -1) if direction_ else range(T)):
            prev[t] = (h, c)
            if mode == "lstm":
                h, c = cell(inputs[t], (h, c))
            else:
                h = cell(inputs[t], h)
            out[t] = h
        return prev, torch.stack(out), cell

    with torch.no_grad():
        inputs = x.to(DT)
        for below in range(layer):
            inputs = torch.cat([run(below, d, inputs)[1] for d in range(D)], -1)
        prev, _, cell = run(layer, direction, inputs)
    result = torch.zeros(T, B, dtype=DT)
    for t in range(T):
        for b in range(B):
            xt = inputs[t, b: b + 1]
            h, c = prev[t]
            if mode == "lstm":
                def step(s, xt=xt):
                    h_new, c_new = cell(xt, (s[None, :H], s[None, H:]))
                    return torch.cat([h_new[0], c_new[0]])

                s = torch.cat([h[b], c[b]])
            else:
                def step(s, xt=xt):
                    return cell(xt, s[None])[0]

                s = h[b]
            jac = torch.autograd.functional.jacobian(step, s)
            result[t, b] = torch.linalg.matrix_norm(jac, ord=2)
    return result


def make(mode, input_size, hidden, **kwargs):
    cls, extra = TORCH_MODULES[mode]
    return cls(input_size, hidden, dtype=DT, **extra, **kwargs)


@pytest.mark.parametrize("how", METHODS, ids=["exact", "power"])
@pytest.mark.parametrize("mode", list(TORCH_MODULES))
@pytest.mark.parametrize("T,B,I,H", [(1, 1, 1, 1), (5, 3, 3, 7), (3, 2, 37, 3)])
def test_torch_modules(mode, T, B, I, H, how):
    module = make(mode, I, H)
    x = torch.randn(T, B, I, dtype=DT)
    ours = spectral_norms(module, x, **how)
    assert ours.dtype == torch.float32 and ours.shape == (T, B)
    torch.testing.assert_close(ours.double(), oracle(module, mode, x), rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("how", METHODS, ids=["exact", "power"])
@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
def test_layers_directions_and_initial_state(mode, how):
    T, B, I, H = 4, 2, 3, 5
    module = make(mode, I, H, num_layers=2, bidirectional=True)
    x = torch.randn(T, B, I, dtype=DT)
    h0 = torch.randn(4, B, H, dtype=DT)
    hx = (h0, torch.randn(4, B, H, dtype=DT)) if mode == "lstm" else h0
    every = spectral_norms(module, x, hx=hx, layer=None, **how)
    assert every.shape == (4, T, B) and every.dtype == torch.float32
    for layer in range(2):
        for direction in range(2):
            ours = spectral_norms(module, x, hx=hx, layer=layer, direction=direction, **how)
            expected = oracle(module, mode, x, hx, layer, direction)
            torch.testing.assert_close(ours.double(), expected, rtol=RTOL, atol=1e-7)
            torch.testing.assert_close(every[layer * 2 + direction], ours, rtol=1e-6, atol=0)


def test_batch_first_and_unbatched():
    module = make("gru", 3, 4, batch_first=True)
    x = torch.randn(2, 5, 3, dtype=DT)
    ours = spectral_norms(module, x, **TIGHT)
    torch.testing.assert_close(ours.double(), oracle(module, "gru", x.transpose(0, 1)), rtol=RTOL, atol=1e-7)
    single = spectral_norms(module, x[1], hx=torch.zeros(1, 4, dtype=DT), **TIGHT)
    assert single.shape == (5, 1)
    torch.testing.assert_close(single[:, 0], ours[:, 1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("how, rtol", [(METHODS[0], 1e-12), (METHODS[1], 1e-6)], ids=["exact", "power"])
def test_linear_rnn_exact(how, rtol):
    """ReLU RNN with positive states: h_t = W h_{t-1} + positive input, so J = ρQ and ‖J‖₂ = ρ exactly."""
    H, rho = 6, 0.8
    module = nn.RNN(1, H, nonlinearity="relu", dtype=DT)
    q = torch.linalg.qr(torch.randn(H, H, dtype=DT))[0].abs()  # nonnegative entries keep h positive
    q = q / torch.linalg.matrix_norm(q, ord=2)
    with torch.no_grad():
        module.weight_hh_l0.copy_(rho * q)
        module.weight_ih_l0.fill_(1.0)
        module.bias_ih_l0.fill_(1.0)
        module.bias_hh_l0.zero_()
    x = torch.rand(7, 2, 1, dtype=DT) + 0.5
    ours = spectral_norms(module, x, **how)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), torch.full((7, 2), rho, dtype=DT), rtol=max(rtol, 6e-8), atol=0)


@pytest.mark.parametrize("cls,mode,extra", [
    (vgk.nn.LSTM, "lstm", {}),
    (vgk.nn.GRU, "gru", {}),
    (vgk.nn.RNN, "rnn_tanh", {"nonlinearity": "tanh"}),
    (vgk.nn.RNN, "rnn_relu", {"nonlinearity": "relu"}),
    (vgk.nn.RNN, "rnn_sigmoid", {"nonlinearity": "sigmoid"}),
])
def test_vgkernels_modules(cls, mode, extra):
    module = cls(3, 4, num_layers=2, dtype=DT, **extra)
    x = torch.randn(5, 3, 3, dtype=DT)
    for layer in range(2):
        ours = spectral_norms(module, x, layer=layer, **TIGHT)
        torch.testing.assert_close(ours.double(), oracle(module, mode, x, layer=layer), rtol=RTOL, atol=1e-7)
    if mode != "rnn_sigmoid":  # the same weights in torch.nn give the same norms
        theirs = make(mode, 3, 4, num_layers=2)
        theirs.load_state_dict(module.state_dict())
        torch.testing.assert_close(spectral_norms(theirs, x, **TIGHT), spectral_norms(module, x, **TIGHT))


@pytest.mark.parametrize("method", ["auto", "power"])
def test_float32_and_default_iterations(method):
    module = nn.LSTM(3, 8)
    x = torch.randn(6, 2, 3)
    ours = spectral_norms(module, x, method=method)
    expected = oracle(module.double(), "lstm", x.double())
    torch.testing.assert_close(ours.double(), expected, rtol=1e-3, atol=1e-5)


def test_exact_in_chunks(monkeypatch):
    module = make("gru", 2, 3)
    x = torch.randn(5, 4, 2, dtype=DT)
    whole = spectral_norms(module, x, method="exact")
    monkeypatch.setattr(spectral, "CHUNK_ELEMENTS", 20)  # 2 rows of 3x3 per chunk
    torch.testing.assert_close(spectral_norms(module, x, method="exact"), whole, rtol=0, atol=0)


def test_auto_method_switches_at_the_state_size(monkeypatch):
    module = make("lstm", 2, 3)  # S = 6
    x = torch.randn(3, 2, 2, dtype=DT)
    calls = []
    monkeypatch.setattr(spectral, "_exact", lambda *a: calls.append("exact") or torch.zeros(3, 2))
    monkeypatch.setattr(spectral, "_power", lambda *a: calls.append("power") or torch.zeros(3, 2))
    spectral_norms(module, x)
    monkeypatch.setattr(spectral, "EXACT_MAX_STATE", 5)
    spectral_norms(module, x)
    assert calls == ["exact", "power"]


# --- layer-normalized cells ----------------------------------------------------------------------


def ln_cell(module, mode, layer=0):
    """The layer-normalized cell written out: gates = LN(W_ih x) + LN(W_hh h) + b; LSTM: h = o tanh(LN(c))."""
    p = lambda name: getattr(module, f"{name}_l{layer}")  # noqa: E731
    H = module.hidden_size

    def ln(v, kind):
        mean = v.mean(-1, keepdim=True)
        var = ((v - mean) ** 2).mean(-1, keepdim=True)
        gain, shift = p(f"layer_norm_{kind}_weight"), p(f"layer_norm_{kind}_bias")
        return (v - mean) / torch.sqrt(var + 1e-5) * gain + shift

    def step(x, h, c):
        gx, gh = ln(x @ p("weight_ih").t(), "ih"), ln(h @ p("weight_hh").t(), "hh")
        if mode == "lstm":
            i, f, g, o = (gx + gh + p("bias_ih") + p("bias_hh")).split(H, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(ln(c, "cell")), c
        xr, xz, xn = (gx + p("bias_ih")).split(H, -1)
        hr, hz, hn = (gh + p("bias_hh")).split(H, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, None

    return step


@pytest.mark.parametrize("how", METHODS, ids=["exact", "power"])
@pytest.mark.parametrize("cls,mode", [(vgk.nn.LSTM, "lstm"), (vgk.nn.GRU, "gru")])
@pytest.mark.parametrize("T,B,I,H", [(1, 1, 1, 1), (4, 3, 2, 5)])
def test_layer_normalized_cells(cls, mode, T, B, I, H, how):
    module = cls(I, H, layer_norm=True, dtype=DT)
    with torch.no_grad():  # gains and shifts away from 1 and 0, so that they count
        for name, param in module.named_parameters():
            if name.startswith("layer_norm"):
                param.add_(0.3 * torch.randn_like(param))
    x = torch.randn(T, B, I, dtype=DT)
    step = ln_cell(module, mode)
    h, c = torch.zeros(B, H, dtype=DT), torch.zeros(B, H, dtype=DT)
    expected = torch.zeros(T, B, dtype=DT)
    outputs = []
    for t in range(T):
        for b in range(B):
            if mode == "lstm":
                def one(s, t=t, b=b):
                    h1, c1 = step(x[t, b : b + 1], s[None, :H], s[None, H:])
                    return torch.cat([h1[0], c1[0]])

                s = torch.cat([h[b], c[b]])
            else:
                def one(s, t=t, b=b):
                    return step(x[t, b : b + 1], s[None], None)[0][0]

                s = h[b]
            jac = torch.autograd.functional.jacobian(one, s)
            expected[t, b] = torch.linalg.matrix_norm(jac, ord=2)
        with torch.no_grad():
            h, c = step(x[t], h, c)
        outputs.append(h)
    with torch.no_grad():  # the written-out cell is the module's cell
        torch.testing.assert_close(module(x)[0], torch.stack(outputs), rtol=1e-12, atol=1e-12)
    ours = spectral_norms(module, x, **how)
    torch.testing.assert_close(ours.double(), expected, rtol=RTOL, atol=1e-7)


def test_layer_normalized_second_layer_matches_per_layer_cells():
    module = vgk.nn.LSTM(2, 3, num_layers=2, layer_norm=True, dtype=DT)
    x = torch.randn(3, 2, 2, dtype=DT)
    with torch.no_grad():  # the first layer's outputs are the second layer's input
        top = vgk.nn.LSTM(3, 3, layer_norm=True, dtype=DT)
        state = module.state_dict()
        top.load_state_dict({k.replace("_l1", "_l0"): v for k, v in state.items() if "_l1" in k})
        first = vgk.nn.LSTM(2, 3, layer_norm=True, dtype=DT)
        first.load_state_dict({k: v for k, v in state.items() if "_l0" in k})
        below = first(x)[0]
    torch.testing.assert_close(spectral_norms(module, x, layer=1), spectral_norms(top, below))


def test_bad_inputs():
    module = nn.GRU(3, 4)
    x = torch.randn(5, 2, 3)
    with pytest.raises(TypeError, match="module: expected a recurrent module .* got Linear"):
        spectral_norms(nn.Linear(3, 4), x)
    with pytest.raises(TypeError, match="PackedSequence"):
        spectral_norms(module, pack_sequence([torch.randn(3, 3), torch.randn(2, 3)]))
    with pytest.raises(TypeError, match="input: expected a floating-point tensor, got torch.int64"):
        spectral_norms(module, torch.ones(5, 2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"input: expected a 2-D or 3-D tensor, got shape \(3,\)"):
        spectral_norms(module, torch.randn(3))
    with pytest.raises(ValueError, match=r"input: expected 3 features, got shape \(5, 2, 4\)"):
        spectral_norms(module, torch.randn(5, 2, 4))
    with pytest.raises(ValueError, match=r"layer: expected None or an int in \[0, 1\), got 1"):
        spectral_norms(module, x, layer=1)
    with pytest.raises(ValueError, match=r"direction: expected an int in \[0, 1\), got 1"):
        spectral_norms(module, x, direction=1)
    with pytest.raises(ValueError, match="iters: expected a positive int, got 0"):
        spectral_norms(module, x, iters=0)
    with pytest.raises(ValueError, match=r"hx: expected states of shape \(1, 2, 4\), got \(1, 3, 4\)"):
        spectral_norms(module, x, hx=torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="proj_size=2"):
        spectral_norms(nn.LSTM(3, 4, proj_size=2), x)
    with pytest.raises(ValueError, match="method: expected one of .* got 'svd'"):
        spectral_norms(module, x, method="svd")
