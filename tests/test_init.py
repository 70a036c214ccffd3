"""Tests of vgkernels.init.

Tolerances: a sample variance of n i.i.d. draws is checked against its formula within 5 standard
errors, the standard error coming from the distribution's fourth moment (relative SE sqrt(2/n) for a
normal, sqrt(0.8/n) for a uniform); a sample mean within 5 sigma/sqrt(n). Orthogonality and
identities are checked to 1e-5 in float32 (the QR runs in float64 and is rounded once), exact
copies with torch.equal.
"""

import math

import pytest
import torch

import vgkernels
from vgkernels import init as vinit

N_OUT, N_IN = 768, 640  # 491,520 draws: the variance's relative SE is about 0.2%


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_variance(values: torch.Tensor, expected: float, dist: str) -> None:
    values = values.detach().double().flatten()
    n = values.numel()
    rel_se = math.sqrt((2.0 if dist == "normal" else 0.8) / n)
    assert abs(values.var().item() / expected - 1) < 5 * rel_se, (values.var().item(), expected)
    assert abs(values.mean().item()) < 5 * math.sqrt(expected / n)


# --- variances of the plain schemes -----------------------------------------------------------


@pytest.mark.parametrize("gain", [1.0, 5 / 3])
def test_xavier_uniform_variance_and_bound(gain):
    w = vinit.xavier_uniform_(torch.empty(N_OUT, N_IN), gain, generator=gen())
    check_variance(w, gain**2 * 2 / (N_IN + N_OUT), "uniform")
    bound = gain * math.sqrt(6 / (N_IN + N_OUT))
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.99 * bound


def test_xavier_normal_variance():
    w = vinit.xavier_normal_(torch.empty(N_OUT, N_IN), generator=gen())
    check_variance(w, 2 / (N_IN + N_OUT), "normal")


@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
def test_kaiming_normal_variance(mode):
    w = vinit.kaiming_normal_(torch.empty(N_OUT, N_IN), mode=mode, generator=gen())
    fan = N_IN if mode == "fan_in" else N_OUT
    check_variance(w, 2 / fan, "normal")


def test_kaiming_uniform_variance_relu_and_leaky():
    w = vinit.kaiming_uniform_(torch.empty(N_OUT, N_IN), generator=gen())
    check_variance(w, 2 / N_IN, "uniform")
    # leaky_relu with a = sqrt(5) is torch.nn.Linear's default: Var = 1 / (3 n_in)
    w = vinit.kaiming_uniform_(
        torch.empty(N_OUT, N_IN), a=math.sqrt(5), nonlinearity="leaky_relu", generator=gen()
    )
    check_variance(w, 1 / (3 * N_IN), "uniform")


def test_lecun_normal_variance_per_block():
    w = vinit.lecun_normal_(torch.empty(N_OUT, N_IN), generator=gen())
    check_variance(w, 1 / N_IN, "normal")
    stacked = vinit.lecun_normal_(torch.empty(3 * N_IN, N_IN), blocks=3, generator=gen())
    for block in stacked.chunk(3):  # the fan-in is the columns, the same in every gate block
        check_variance(block, 1 / N_IN, "normal")


def test_init_recurrent_lecun():
    H = 512
    rnn = torch.nn.RNN(256, H)
    vinit.init_recurrent_(rnn, "lecun", generator=gen())
    check_variance(rnn.weight_hh_l0, 1 / H, "normal")
    check_variance(rnn.weight_ih_l0, 1 / 256, "normal")
    assert torch.equal(rnn.bias_ih_l0, torch.zeros(H)) and torch.equal(rnn.bias_hh_l0, torch.zeros(H))
    assert "lecun" in vinit.RECURRENT_SCHEMES


def test_default_variance():
    w = vinit.default_(torch.empty(N_OUT, N_IN), hidden_size=100, generator=gen())
    check_variance(w, 1 / (3 * 100), "uniform")
    assert w.abs().max() <= 0.1


@pytest.mark.parametrize("fan_in", [256, 5])
def test_negative_mean_moments(fan_in):
    w = vinit.negative_mean_(torch.empty(200_000 // fan_in * 10, fan_in), generator=gen())
    mu = max(-1.0, -8.0 / fan_in)  # fan_in 5 hits the -1 floor
    n = w.numel()
    assert abs(w.mean().item() - mu) < 5 * 0.1 / math.sqrt(n)
    assert abs(w.var().item() / 0.01 - 1) < 5 * math.sqrt(2 / n)


def test_negative_mean_overrides():
    w = vinit.negative_mean_(torch.empty(400, 500), mean=0.5, std=0.0)
    assert torch.equal(w, torch.full_like(w, 0.5))


def test_blocks_use_per_gate_fans():
    H, n_in = 256, 512
    w = vinit.xavier_normal_(torch.empty(4 * H, n_in), blocks=4, generator=gen())
    for block in w.chunk(4):
        check_variance(block, 2 / (n_in + H), "normal")
    stacked = vinit.xavier_normal_(torch.empty(4 * H, n_in), generator=gen())
    check_variance(stacked, 2 / (n_in + 4 * H), "normal")


def test_generator_reproducible_and_float64():
    a = vinit.kaiming_normal_(torch.empty(7, 3, dtype=torch.float64), generator=gen(3))
    b = vinit.kaiming_normal_(torch.empty(7, 3, dtype=torch.float64), generator=gen(3))
    assert a.dtype == torch.float64
    assert torch.equal(a, b)


def test_works_on_parameters_and_noncontiguous():
    p = torch.nn.Parameter(torch.zeros(6, 4))
    vinit.xavier_uniform_(p, generator=gen())
    assert p.requires_grad and (p != 0).all()
    base = torch.zeros(8, 6)
    view = base.t()  # non-contiguous [6, 8]
    vinit.identity_(view)
    assert torch.equal(base, torch.eye(6, 8).t())


# --- orthogonal and identity ------------------------------------------------------------------


@pytest.mark.parametrize("gates", [1, 3, 4])
def test_orthogonal_per_gate_block(gates):
    H = 37
    w = vinit.orthogonal_(torch.empty(gates * H, H), generator=gen())  # blocks inferred
    for block in w.chunk(gates):
        torch.testing.assert_close(block @ block.t(), torch.eye(H), atol=1e-5, rtol=0)
        torch.testing.assert_close(block.t() @ block, torch.eye(H), atol=1e-5, rtol=0)
    if gates > 1:  # the blocks differ: one Q per gate, not one Q reused
        assert not torch.allclose(w[:H], w[H : 2 * H])


@pytest.mark.parametrize("shape", [(3, 37), (37, 3), (1, 1)])
def test_orthogonal_rectangular_and_gain(shape):
    w = vinit.orthogonal_(torch.empty(*shape), gain=2.0, blocks=1, generator=gen())
    s = torch.linalg.svdvals(w)
    torch.testing.assert_close(s, torch.full_like(s, 2.0), atol=1e-5, rtol=0)


def test_identity_blocks():
    w = vinit.identity_(torch.randn(3 * 5, 5), gain=0.5, blocks=3)
    for block in w.chunk(3):
        assert torch.equal(block, 0.5 * torch.eye(5))


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: vinit.xavier_uniform_(torch.empty(5)), ValueError, "2-D"),
        (lambda: vinit.xavier_uniform_(torch.empty(4, 4, dtype=torch.int64)), TypeError, "floating"),
        (lambda: vinit.orthogonal_(torch.empty(6, 4), blocks=4), ValueError, "blocks"),
        (lambda: vinit.identity_([[1.0]]), TypeError, "torch.Tensor"),
        (lambda: vinit.kaiming_normal_(torch.empty(4, 4), mode="fan"), ValueError, "mode"),
        (lambda: vinit.negative_mean_(torch.empty(4, 4), std=-1.0), ValueError, "std"),
        (lambda: vinit.default_(torch.empty(4), hidden_size=0), ValueError, "hidden_size"),
    ],
)
def test_bad_inputs(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


# --- recurrent modules ------------------------------------------------------------------------


def recurrent_params(module):
    return {n: p for n, p in module.named_parameters() if n.startswith(("weight_", "bias_"))}


@pytest.mark.parametrize("make", [torch.nn.LSTM, vgkernels.nn.LSTM])
@pytest.mark.parametrize("value", [1.0, 3.0])
def test_lstm_forget_bias_all_layers_and_directions(make, value):
    H = 5
    lstm = make(3, H, num_layers=2, bidirectional=True)
    before = {n: p.detach().clone() for n, p in recurrent_params(lstm).items()}
    vinit.lstm_forget_bias_(lstm, value)
    suffixes = ["_l0", "_l0_reverse", "_l1", "_l1_reverse"]
    for sfx in suffixes:
        b_ih, b_hh = getattr(lstm, "bias_ih" + sfx), getattr(lstm, "bias_hh" + sfx)
        effective = b_ih + b_hh
        torch.testing.assert_close(effective[H : 2 * H], torch.full((H,), value))
        torch.testing.assert_close(b_ih[H : 2 * H], b_hh[H : 2 * H])  # split evenly
        for name in ("bias_ih" + sfx, "bias_hh" + sfx):  # the i, g, o slices are untouched
            p = getattr(lstm, name)
            assert torch.equal(p[:H], before[name][:H]) and torch.equal(p[2 * H :], before[name][2 * H :])
        assert torch.equal(getattr(lstm, "weight_hh" + sfx), before["weight_hh" + sfx])


def test_lstm_forget_bias_cell_and_errors():
    cell = torch.nn.LSTMCell(2, 4)
    vinit.lstm_forget_bias_(cell, 2.0)
    torch.testing.assert_close((cell.bias_ih + cell.bias_hh)[4:8], torch.full((4,), 2.0))
    with pytest.raises(TypeError, match="LSTM"):
        vinit.lstm_forget_bias_(torch.nn.GRU(2, 4))
    with pytest.raises(ValueError, match="bias=False"):
        vinit.lstm_forget_bias_(torch.nn.LSTM(2, 4, bias=False))
    with pytest.raises(TypeError, match="recurrent"):
        vinit.lstm_forget_bias_(torch.nn.Linear(2, 4))


@pytest.mark.parametrize("make", [torch.nn.GRU, vgkernels.nn.GRU])
def test_init_recurrent_orthogonal(make):
    H = 16
    gru = make(4, H, num_layers=2, bidirectional=True)
    vinit.init_recurrent_(gru, "orthogonal", generator=gen())
    for name, p in recurrent_params(gru).items():
        if name.startswith("weight_hh"):
            for block in p.detach().chunk(3):
                torch.testing.assert_close(block @ block.t(), torch.eye(H), atol=1e-5, rtol=0)
        elif name.startswith("bias"):
            assert torch.equal(p, torch.zeros_like(p))
        else:
            bound = math.sqrt(6 / (p.shape[1] + H))  # Xavier per gate block
            assert p.abs().max() <= bound


def test_init_recurrent_irnn_and_default_statistics():
    H = 512
    rnn = torch.nn.RNN(H, H, nonlinearity="relu")
    vinit.init_recurrent_(rnn, "irnn", generator=gen())
    assert torch.equal(rnn.weight_hh_l0, torch.eye(H))
    assert torch.equal(rnn.bias_ih_l0, torch.zeros(H)) and torch.equal(rnn.bias_hh_l0, torch.zeros(H))
    check_variance(rnn.weight_ih_l0, 1e-6, "normal")
    vinit.init_recurrent_(rnn, "default", generator=gen())
    check_variance(rnn.weight_hh_l0, 1 / (3 * H), "uniform")


def test_init_recurrent_combined_scheme_in_container_and_layer_norm_untouched():
    H = 6
    model = torch.nn.Sequential(vgkernels.nn.LSTM(3, H, layer_norm=True), torch.nn.Linear(H, 1))
    lstm = model[0]
    ln_before = {n: p.detach().clone() for n, p in lstm.named_parameters() if n.startswith("layer_norm")}
    linear_before = model[1].weight.detach().clone()
    vinit.init_recurrent_(model, "orthogonal+forget_bias_3", generator=gen())
    torch.testing.assert_close((lstm.bias_ih_l0 + lstm.bias_hh_l0)[H : 2 * H], torch.full((H,), 3.0))
    assert torch.equal((lstm.bias_ih_l0 + lstm.bias_hh_l0)[:H], torch.zeros(H))
    for block in lstm.weight_hh_l0.detach().chunk(4):
        torch.testing.assert_close(block @ block.t(), torch.eye(H), atol=1e-5, rtol=0)
    for n, p in lstm.named_parameters():
        if n in ln_before:
            assert torch.equal(p, ln_before[n])
    assert torch.equal(model[1].weight, linear_before)


@pytest.mark.parametrize(
    "scheme", ["default", "xavier", "kaiming", "orthogonal", "identity", "forget_bias_1"]
)
def test_init_recurrent_reproducible_and_torch_vgk_agree(scheme):
    a = torch.nn.LSTM(3, 5, num_layers=2)
    b = vgkernels.nn.LSTM(3, 5, num_layers=2)
    b.load_state_dict(a.state_dict())
    vinit.init_recurrent_(a, scheme, generator=gen(7))
    vinit.init_recurrent_(b, scheme, generator=gen(7))
    for name, p in recurrent_params(a).items():
        assert torch.equal(p, getattr(b, name)), name


def test_init_recurrent_bad_inputs():
    with pytest.raises(ValueError, match="scheme: expected parts joined by .*, got .glorot. with the unkn"):
        vinit.init_recurrent_(torch.nn.RNN(2, 3), "glorot")
    with pytest.raises(ValueError, match="non-empty"):
        vinit.init_recurrent_(torch.nn.RNN(2, 3), "")
    with pytest.raises(TypeError, match="recurrent"):
        vinit.init_recurrent_(torch.nn.Linear(2, 3), "orthogonal")
    with pytest.raises(TypeError, match="LSTM"):
        vinit.init_recurrent_(torch.nn.GRU(2, 3), "forget_bias_1")
