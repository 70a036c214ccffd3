"""The C++ layer-normalized recurrent ops vgk::rnn_ln_forward / vgk::rnn_ln_backward, called directly.

Oracle: the eager float64 loop of tests/ln_cell_oracle.py (F.layer_norm inside the loop, clamping hooks
for grad_clip, zero perturbations whose gradients are the total derivatives ∂loss/∂h_t and ∂loss/∂c_t,
jacrev step Jacobians).
Tolerances: float64 inputs rtol 1e-9, atol 1e-10; float32 inputs rtol 1e-4, atol 1e-5; the squared norms
jac_sq and grad_sq (float32 and float64 outputs) at least rtol 1e-6, with atol times their largest value;
float64 gradcheck with torch's defaults.
"""

import ln_cell_oracle
import pytest
import torch
from ln_cell_oracle import (
    BACKWARD_NAMES,
    backward_args,
    check_ops,
    forward_args,
    gradcheck_layer,
    make_inputs,
    make_output_grads,
    oracle,
)

import vgkernels  # noqa: F401  (registers the ops)

OPS = torch.ops.vgk


def run_ops(inp, mode, reverse, gs, gcs, clip=None, track=True):
    return ln_cell_oracle.run_ops(OPS.rnn_ln_forward, OPS.rnn_ln_backward, inp, mode, reverse, gs, gcs, clip,
                                  track)


def check(mode, T, B, H, dtype, **kwargs):
    _, _, _, got, want = check_ops(OPS.rnn_ln_forward, OPS.rnn_ln_backward, mode, T, B, H, dtype, **kwargs)
    return got, want


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [None, [3, 1, 2]])
def test_ops_match_oracle(dtype, mode, reverse, lengths):
    # float32 jac_sq is computed in float64 but from float32 states: compare at float32 tolerance
    check(mode, 3, 3, 5, dtype, reverse=reverse, lengths=lengths)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("T,B,H", [(1, 1, 1), (2, 1, 3), (3, 2, 37), (4, 3, 2)])
def test_odd_sizes(mode, T, B, H):
    check(mode, T, B, H, torch.float64, reverse=True, lengths=None)
    check(mode, T, B, H, torch.float32)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_grad_clip_matches_hooked_oracle(mode):
    got, want = check(mode, 4, 3, 4, torch.float64, lengths=[4, 2, 3], clip=0.05)
    unclipped = oracle(make_inputs(mode, 4, 3, 4, lengths=[4, 2, 3]), mode, False,
                       *make_output_grads(mode, 4, 3, 4))
    assert got["grad_xproj"].abs().max() <= 0.05 + 1e-12
    assert not torch.allclose(unclipped["grad_w_hh"], got["grad_w_hh"], atol=1e-3)


def test_gru_without_b_hh():
    got, _ = check("gru", 3, 2, 4, torch.float64, gru_bias=False)
    assert got["grad_b_hh"].shape == (0,)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_untracked_outputs_are_empty_and_equal(mode):
    inp = make_inputs(mode, 3, 2, 4, torch.float32)
    gs, gcs = make_output_grads(mode, 3, 2, 4, torch.float32)
    tracked = run_ops(inp, mode, False, gs, gcs, track=True)
    plain = run_ops(inp, mode, False, gs, gcs, track=False)
    assert plain["jac_sq"].shape == (0,) and plain["grad_sq"].shape == (0,)
    assert plain["jac_sq"].dtype == torch.float32 and plain["grad_sq"].dtype == torch.float64
    for name in ("states", "cell_states", "workspace") + BACKWARD_NAMES[:-1]:
        assert torch.equal(plain[name], tracked[name]), name
    if mode == "gru":
        assert plain["grad_c0"].shape == (0,) and plain["grad_ln_cell_weight"].shape == (0,)
        assert plain["cell_states"].shape == (0,)


def test_lstm_h1_jacobian_in_float32():
    """H = 1: LN(c) is constant, its projector vanishes and the expanded row norms cancel completely."""
    inp = make_inputs("lstm", 3, 4, 1, torch.float32)
    gs, gcs = make_output_grads("lstm", 3, 4, 1, torch.float32)
    got = run_ops(inp, "lstm", False, gs, gcs)
    want = oracle(inp, "lstm", False, gs, gcs)
    torch.testing.assert_close(got["jac_sq"].double(), want["jac_sq"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_gradcheck_float64(mode):
    assert gradcheck_layer(mode, "cpp", reverse=True)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_non_contiguous_inputs(mode):
    inp = make_inputs(mode, 3, 2, 4, torch.float32)
    gs, gcs = make_output_grads(mode, 3, 2, 4, torch.float32)
    want = run_ops(inp, mode, False, gs, gcs)

    def strided(t):  # the same values behind a non-contiguous view
        if t is None or t.dim() == 0 or t.dtype == torch.int64:
            return t
        big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]

    nc = {k: strided(v) for k, v in inp.items()}
    assert not nc["xproj"].is_contiguous()
    got = run_ops(nc, mode, False, strided(gs), strided(gcs) if mode == "lstm" else gcs)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_gain_gradients_are_deterministic_across_thread_counts(mode):
    inp = make_inputs(mode, 5, 33, 16, torch.float32)
    gs, gcs = make_output_grads(mode, 5, 33, 16, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_ops(inp, mode, False, gs, gcs)
        torch.set_num_threads(2)
        two = run_ops(inp, mode, False, gs, gcs)
    finally:
        torch.set_num_threads(threads)
    for name in ("grad_ln_hh_weight", "grad_ln_hh_bias", "grad_ln_cell_weight", "grad_ln_cell_bias",
                 "grad_b_hh"):
        assert torch.equal(one[name], two[name]), name


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_opcheck(mode):
    inp = make_inputs(mode, 2, 2, 3, torch.float64, lengths=[2, 1])
    gs, gcs = make_output_grads(mode, 2, 2, 3)
    fwd_args = forward_args(inp, mode, False, True)
    torch.library.opcheck(OPS.rnn_ln_forward, fwd_args)
    fwd = OPS.rnn_ln_forward(*fwd_args)
    torch.library.opcheck(OPS.rnn_ln_backward, backward_args(inp, fwd, gs, gcs, mode, False, 0.5, True))


def _bad_forward_cases():
    base = make_inputs("lstm", 2, 2, 3, torch.float32)
    gru = make_inputs("gru", 2, 2, 3, torch.float32)
    f64 = lambda t: t.double()  # noqa: E731
    yield "mode", dict(base), "rnn_tanh", ValueError, "mode must be 'lstm' or 'gru'"
    yield "ln dtype", dict(base, ln_hh_weight=f64(base["ln_hh_weight"])), "lstm", TypeError, "ln_hh_weight"
    yield "ln shape", dict(base, ln_hh_bias=base["ln_hh_bias"][:5]), "lstm", ValueError, "ln_hh_bias"
    yield "no cell ln", dict(base, ln_cell_weight=None), "lstm", ValueError, "ln_cell_weight"
    yield "cell ln on gru", dict(gru, ln_cell_bias=torch.zeros(3)), "gru", ValueError, "ln_cell_bias"
    yield "c0 on gru", dict(gru, c0=torch.zeros(2, 3)), "gru", ValueError, "c0"
    yield "b_hh on lstm", dict(base, b_hh=torch.zeros(12)), "lstm", ValueError, "b_hh"
    yield "w_hh shape", dict(base, w_hh=base["w_hh"][:, :2]), "lstm", ValueError, "w_hh"
    yield "xproj dtype", dict(base, xproj=base["xproj"].half()), "lstm", TypeError, "xproj"
    yield "lengths", dict(base, lengths=torch.tensor([0, 2])), "lstm", ValueError, "lengths"


@pytest.mark.parametrize("case", list(_bad_forward_cases()), ids=lambda c: c[0])
def test_forward_rejects_bad_input(case):
    _, inp, mode, exc, match = case
    with pytest.raises(exc, match=match):
        OPS.rnn_ln_forward(*forward_args(inp, mode, False, False))


def test_forward_rejects_negative_eps():
    args = list(forward_args(make_inputs("gru", 2, 2, 3, torch.float32), "gru", False, False))
    args[9] = -1.0
    with pytest.raises(ValueError, match="eps"):
        OPS.rnn_ln_forward(*args)


@pytest.mark.parametrize("what", ["clip", "workspace", "has_b_hh", "cell weight"])
def test_backward_rejects_bad_input(what):
    mode = "lstm"
    inp = make_inputs(mode, 2, 2, 3, torch.float32)
    gs, gcs = make_output_grads(mode, 2, 2, 3, torch.float32)
    fwd = OPS.rnn_ln_forward(*forward_args(inp, mode, False, False))
    args = list(backward_args(inp, fwd, gs, gcs, mode, False, None, False))
    if what == "clip":
        args[11], match = 0.0, "grad_clip"
    elif what == "workspace":
        args[4], match = args[4][..., 1:], "workspace"
    elif what == "has_b_hh":
        args[13], match = True, "has_b_hh"
    else:
        args[7], match = None, "ln_cell_weight"
    with pytest.raises(ValueError, match=match):
        OPS.rnn_ln_backward(*args)


def test_compile_fullgraph_layer_norm_cells():
    import vgkernels as vgk

    torch._dynamo.reset()
    lstm = vgk.nn.LSTM(3, 4, layer_norm=True, bidirectional=True, backend="cpp")
    gru = vgk.nn.GRU(8, 3, layer_norm=True, backend="cpp")

    def f(x):
        return gru(lstm(x)[0])[0]

    x = torch.randn(5, 2, 3)
    params = list(lstm.parameters()) + list(gru.parameters())
    eager = f(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), params)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), params)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-4)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
