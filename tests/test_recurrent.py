"""vgkernels.nn.LSTM / GRU / RNN against torch.nn and against the eager reference.

Tolerances: float32 atol 1e-5, rtol 1e-4 (against torch.nn, same state_dict); float64 gradcheck with
torch's defaults (eps 1e-6, atol 1e-5, rtol 1e-3).
"""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence, pad_sequence

import vgkernels as vgk

ATOL, RTOL = 1e-5, 1e-4
FAST_BACKENDS = ["cpp", "reference"]

CELLS = {
    "lstm": (vgk.nn.LSTM, torch.nn.LSTM, {}),
    "gru": (vgk.nn.GRU, torch.nn.GRU, {}),
    "rnn_tanh": (vgk.nn.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (vgk.nn.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
}


def make_pair(cell, input_size, hidden_size, backend, dtype=torch.float32, **kwargs):
    ours_cls, theirs_cls, extra = CELLS[cell]
    ours = ours_cls(input_size, hidden_size, backend=backend, dtype=dtype, **extra, **kwargs)
    theirs = theirs_cls(input_size, hidden_size, dtype=dtype, **extra, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def make_hx(cell, num_states, batch, hidden, dtype=torch.float32):
    shape = (num_states, batch, hidden) if batch is not None else (num_states, hidden)
    if cell == "lstm":
        return (torch.randn(shape, dtype=dtype, requires_grad=True),
                torch.randn(shape, dtype=dtype, requires_grad=True))
    return torch.randn(shape, dtype=dtype, requires_grad=True)


def leaves(hx):
    return list(hx) if isinstance(hx, tuple) else [hx]


def clone_hx(hx):
    if hx is None:
        return None
    if isinstance(hx, tuple):
        return tuple(t.detach().clone().requires_grad_() for t in hx)
    return hx.detach().clone().requires_grad_()


def run_and_grad(model, x, hx, weights_out):
    """Forward, a loss touching the output and every final state, backward; returns all results."""
    out, state = model(x, hx)
    states = list(state) if isinstance(state, tuple) else [state]
    out_t = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    loss = (out_t * weights_out(out_t)).sum() + sum((s * s).sum() for s in states)
    inputs = [x] + (leaves(hx) if hx is not None else []) + list(model.parameters())
    grads = torch.autograd.grad(loss, inputs, allow_unused=False)
    return [out_t] + states, grads


def assert_close_all(ours, theirs, atol=ATOL, rtol=RTOL):
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, i=i: f"item {i}: {m}")


def out_weights(t):
    g = torch.Generator().manual_seed(1)
    return torch.randn(t.shape, generator=g, dtype=t.dtype)


MATRIX = list(itertools.product(CELLS, [1, 2], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("cell,num_layers,bidirectional,batch_first,with_h0", MATRIX)
def test_matches_torch_nn(backend, cell, num_layers, bidirectional, batch_first, with_h0):
    T, B, I, H = 5, 3, 4, 6
    ours, theirs = make_pair(cell, I, H, backend, num_layers=num_layers, bidirectional=bidirectional,
                             batch_first=batch_first)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), requires_grad=True)
    hx = make_hx(cell, num_layers * (2 if bidirectional else 1), B, H) if with_h0 else None
    ours_res, ours_grads = run_and_grad(ours, x, hx, out_weights)
    theirs_res, theirs_grads = run_and_grad(theirs, x, clone_hx(hx), out_weights)
    assert_close_all(ours_res, theirs_res)
    assert_close_all(ours_grads, theirs_grads)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("hidden", [1, 3, 37])
@pytest.mark.parametrize("T,B", [(1, 1), (4, 1), (1, 3)])
def test_odd_sizes(backend, cell, hidden, T, B):
    ours, theirs = make_pair(cell, 5, hidden, backend, bidirectional=True)
    x = torch.randn(T, B, 5, requires_grad=True)
    hx = make_hx(cell, 2, B, hidden)
    ours_res, ours_grads = run_and_grad(ours, x, hx, out_weights)
    theirs_res, theirs_grads = run_and_grad(theirs, x, clone_hx(hx), out_weights)
    assert_close_all(ours_res, theirs_res)
    assert_close_all(ours_grads, theirs_grads)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequence_unsorted(backend, cell, bidirectional):
    lengths = [3, 6, 1, 4]
    ours, theirs = make_pair(cell, 4, 5, backend, num_layers=2, bidirectional=bidirectional)
    seqs = [torch.randn(n, 4) for n in lengths]
    packed = pack_sequence(seqs, enforce_sorted=False)
    packed.data.requires_grad_()
    hx = make_hx(cell, 2 * (2 if bidirectional else 1), len(lengths), 5)
    hx_t = clone_hx(hx)
    out_o, st_o = ours(packed, hx)
    out_t, st_t = theirs(packed, hx_t)
    assert torch.equal(out_o.batch_sizes, out_t.batch_sizes)
    assert torch.equal(out_o.sorted_indices, out_t.sorted_indices)
    torch.testing.assert_close(out_o.data, out_t.data, atol=ATOL, rtol=RTOL)
    for a, b in zip(leaves(st_o), leaves(st_t), strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    w = out_weights(out_o.data)

    def grads(model_out, states, hx_in, model):
        loss = (model_out.data * w).sum() + sum((s * s).sum() for s in leaves(states))
        return torch.autograd.grad(loss, [packed.data] + leaves(hx_in) + list(model.parameters()))

    assert_close_all(grads(out_o, st_o, hx, ours), grads(out_t, st_t, hx_t, theirs))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("cell", list(CELLS))
def test_unbatched_input(backend, cell):
    ours, theirs = make_pair(cell, 4, 5, backend, num_layers=2, bidirectional=True)
    x = torch.randn(6, 4, requires_grad=True)
    hx = make_hx(cell, 4, None, 5)
    ours_res, ours_grads = run_and_grad(ours, x, hx, out_weights)
    theirs_res, theirs_grads = run_and_grad(theirs, x, clone_hx(hx), out_weights)
    assert ours_res[0].shape == (6, 10)
    assert_close_all(ours_res, theirs_res)
    assert_close_all(ours_grads, theirs_grads)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_padded_batch_of_packed_lengths_matches_padding_semantics(backend):
    """A PackedSequence's padded positions give zero output, as torch.nn does."""
    ours, _ = make_pair("gru", 3, 4, backend)
    seqs = [torch.randn(n, 3) for n in (2, 5)]
    out, _ = ours(pack_sequence(seqs, enforce_sorted=False))
    padded, lengths = torch.nn.utils.rnn.pad_packed_sequence(out)
    assert torch.all(padded[2:, 0] == 0)
    assert lengths.tolist() == [2, 5]
    assert pad_sequence(seqs).shape[:2] == padded.shape[:2]


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("mode", ["rnn_sigmoid", "rnn_tanh", "rnn_relu", "gru", "lstm"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_against_reference_backend(backend, mode, bidirectional):
    """Every mode, the sigmoid RNN included (torch.nn has none), against the eager reference."""
    cls = {"gru": vgk.nn.GRU, "lstm": vgk.nn.LSTM}.get(mode, vgk.nn.RNN)
    extra = {"nonlinearity": mode[4:]} if mode.startswith("rnn") else {}
    ours = cls(4, 7, num_layers=2, bidirectional=bidirectional, backend=backend, **extra)
    ref = cls(4, 7, num_layers=2, bidirectional=bidirectional, backend="reference", **extra)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(6, 3, 4, requires_grad=True)
    ours_res, ours_grads = run_and_grad(ours, x, None, out_weights)
    ref_res, ref_grads = run_and_grad(ref, x, None, out_weights)
    assert_close_all(ours_res, ref_res)
    assert_close_all(ours_grads, ref_grads)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh", "rnn_relu", "rnn_sigmoid"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck_float64(backend, mode, bidirectional, packed):
    from vgkernels.ops.recurrent import recurrent

    T, B, I, H = 3, 2, 2, 3
    cls = {"gru": vgk.nn.GRU, "lstm": vgk.nn.LSTM}.get(mode, vgk.nn.RNN)
    extra = {"nonlinearity": mode[4:]} if mode.startswith("rnn") else {}
    m = cls(I, H, num_layers=2, bidirectional=bidirectional, dtype=torch.float64, **extra)
    weights = [p.detach().clone().requires_grad_() for p in m.parameters()]
    L = 2 * (2 if bidirectional else 1)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    if mode == "rnn_relu":  # keep pre-activations away from the kink at 0
        x = (x.detach().abs() + 0.5).requires_grad_()
        weights = [(w.detach().abs() + 0.05).requires_grad_() for w in weights]
    h0 = torch.randn(L, B, H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(L, B, H, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, 2]) if packed else None

    def fn(x, h0, c0, *weights):
        hx = (h0, c0) if mode == "lstm" else h0
        out, h_n, c_n, _ = recurrent(x, hx, list(weights), mode=mode, hidden_size=H, num_layers=2,
                                     bidirectional=bidirectional, lengths=lengths, backend=backend)
        return (out, h_n) if c_n is None else (out, h_n, c_n)

    assert torch.autograd.gradcheck(fn, (x, h0, c0, *weights))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_dropout_between_layers_in_training_only(backend):
    m = vgk.nn.LSTM(4, 8, num_layers=3, dropout=0.5, backend=backend)
    x = torch.randn(5, 2, 4)
    m.eval()
    a, _ = m(x)
    b, _ = m(x)
    assert torch.equal(a, b)
    m.train()
    torch.manual_seed(1)
    c, _ = m(x)
    torch.manual_seed(2)
    d, _ = m(x)
    assert not torch.allclose(c, d)
    torch.manual_seed(1)
    e, _ = m(x)
    torch.testing.assert_close(c, e)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_state_dict_loads_both_ways(backend):
    theirs = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    ours = vgk.nn.LSTM(3, 4, num_layers=2, bidirectional=True, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    back = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    back.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_no_bias_and_non_contiguous_input(backend):
    ours, theirs = make_pair("gru", 4, 5, backend, bias=False, batch_first=True)
    x = torch.randn(5, 3, 4).transpose(0, 1).requires_grad_()
    assert not x.is_contiguous()
    ours_res, ours_grads = run_and_grad(ours, x, None, out_weights)
    theirs_res, theirs_grads = run_and_grad(theirs, x, None, out_weights)
    assert_close_all(ours_res, theirs_res)
    assert_close_all(ours_grads, theirs_grads)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_float64_matches_torch(backend):
    ours, theirs = make_pair("lstm", 3, 4, backend, dtype=torch.float64, num_layers=2)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    ours_res, ours_grads = run_and_grad(ours, x, None, out_weights)
    theirs_res, theirs_grads = run_and_grad(theirs, x, None, out_weights)
    assert_close_all(ours_res, theirs_res, atol=1e-12, rtol=1e-10)
    assert_close_all(ours_grads, theirs_grads, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_non_finite_values_propagate_like_torch(backend):
    ours, theirs = make_pair("lstm", 3, 4, backend)
    x = torch.randn(4, 2, 3)
    x[1, 0, 0] = float("nan")
    out_o, _ = ours(x)
    out_t, _ = theirs(x)
    assert torch.equal(torch.isnan(out_o), torch.isnan(out_t))
    assert torch.isnan(out_o[1:, 0]).all() and not torch.isnan(out_o[:, 1]).any()


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_env_var_sets_default_backend(backend, monkeypatch):
    monkeypatch.setenv("VGK_BACKEND", "nonexistent")
    m = vgk.nn.GRU(2, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        m(torch.randn(2, 1, 2))
    monkeypatch.setenv("VGK_BACKEND", backend)
    out, _ = m(torch.randn(2, 1, 2))
    assert out.shape == (2, 1, 3)
