"""spectral_norms against torch.linalg.matrix_norm(ord=2) of the step Jacobian that autograd computes from
torch.nn's own cells (LSTMCell, GRUCell, RNNCell) run over the sequence.

Tolerances: rtol 1e-4 in float64 (power iteration run to a relative change of 1e-11); the linear-RNN
oracle rtol 1e-6.
"""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import vgkernels as vgk
from vgkernels.diagnostics import spectral_norms

RTOL = 1e-4
TIGHT = {"iters": 3000, "tol": 1e-11}
DT = torch.float64

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


@pytest.mark.parametrize("mode", list(TORCH_MODULES))
@pytest.mark.parametrize("T,B,I,H", [(1, 1, 1, 1), (5, 3, 3, 7), (3, 2, 37, 3)])
def test_torch_modules(mode, T, B, I, H):
    module = make(mode, I, H)
    x = torch.randn(T, B, I, dtype=DT)
    ours = spectral_norms(module, x, **TIGHT)
    assert ours.dtype == torch.float32 and ours.shape == (T, B)
    torch.testing.assert_close(ours.double(), oracle(module, mode, x), rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
def test_layers_directions_and_initial_state(mode):
    T, B, I, H = 4, 2, 3, 5
    module = make(mode, I, H, num_layers=2, bidirectional=True)
    x = torch.randn(T, B, I, dtype=DT)
    h0 = torch.randn(4, B, H, dtype=DT)
    hx = (h0, torch.randn(4, B, H, dtype=DT)) if mode == "lstm" else h0
    for layer in range(2):
        for direction in range(2):
            ours = spectral_norms(module, x, hx=hx, layer=layer, direction=direction, **TIGHT)
            expected = oracle(module, mode, x, hx, layer, direction)
            torch.testing.assert_close(ours.double(), expected, rtol=RTOL, atol=1e-7)


def test_batch_first_and_unbatched():
    module = make("gru", 3, 4, batch_first=True)
    x = torch.randn(2, 5, 3, dtype=DT)
    ours = spectral_norms(module, x, **TIGHT)
    torch.testing.assert_close(ours.double(), oracle(module, "gru", x.transpose(0, 1)), rtol=RTOL, atol=1e-7)
    single = spectral_norms(module, x[1], hx=torch.zeros(1, 4, dtype=DT), **TIGHT)
    assert single.shape == (5, 1)
    torch.testing.assert_close(single[:, 0], ours[:, 1], rtol=1e-5, atol=1e-7)


def test_linear_rnn_exact():
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
    ours = spectral_norms(module, x, **TIGHT)
    torch.testing.assert_close(ours.double(), torch.full((7, 2), rho, dtype=DT), rtol=1e-6, atol=0)


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


def test_float32_and_default_iterations():
    module = nn.LSTM(3, 8)
    x = torch.randn(6, 2, 3)
    ours = spectral_norms(module, x)
    expected = oracle(module.double(), "lstm", x.double())
    torch.testing.assert_close(ours.double(), expected, rtol=1e-3, atol=1e-5)


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
    with pytest.raises(ValueError, match=r"layer: expected an int in \[0, 1\), got 1"):
        spectral_norms(module, x, layer=1)
    with pytest.raises(ValueError, match=r"direction: expected an int in \[0, 1\), got 1"):
        spectral_norms(module, x, direction=1)
    with pytest.raises(ValueError, match="iters: expected a positive int, got 0"):
        spectral_norms(module, x, iters=0)
    with pytest.raises(ValueError, match=r"hx: expected states of shape \(1, 2, 4\), got \(1, 3, 4\)"):
        spectral_norms(module, x, hx=torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="proj_size=2"):
        spectral_norms(nn.LSTM(3, 4, proj_size=2), x)
    with pytest.raises(ValueError, match="layer_norm=True"):
        spectral_norms(vgk.nn.LSTM(3, 4, layer_norm=True), x)
