"""The Triton recurrent ops ``vgk::rnn_forward_triton`` / ``vgk::rnn_backward_triton``.

On CPU they run under TRITON_INTERPRET=1 (tests/conftest.py) at small shapes; the tests marked ``gpu``
run them at real sizes on CUDA (VGK_TEST_CUDA=1).

Oracles: the eager reference (vgkernels.reference.recurrent) for the states and the step-Jacobian
norms; an eager float64 loop in this file for the gradients, whose states get zero perturbations so
that their gradients are the total derivatives ∂loss/∂h_t and ∂loss/∂c_t, and whose pre-activations get
clamping hooks for grad_clip; the C++ ops; torch.nn on cuDNN (GPU).

Tolerances: float32 against the float64 oracles and the C++ ops: rtol 1e-4, atol 1e-5 (the squared
norms jac_sq and grad_sq: rtol 1e-4, atol 1e-5 times their largest value); float64 gradcheck with
torch's defaults; float16/bfloat16 against float64: normwise relative error 1e-2 / 2e-2; on CUDA
against cuDNN: float32 rtol 1e-4 (atol 1e-5), bfloat16 normwise 2e-2. Every output is allocated
NaN-filled, so an element a kernel fails to write fails the comparison.
"""

import collections
import copy
import os

import pytest
import torch

import vgkernels.triton.recurrent as tr
from vgkernels.reference import recurrent as reference

MODES = ("lstm", "gru", "rnn_tanh", "rnn_relu", "rnn_sigmoid")
LOOPS = ("persistent", "step")
RTOL, ATOL = 1e-4, 1e-5
CUDA = os.environ.get("VGK_TEST_CUDA") == "1"


@pytest.fixture(autouse=True)
def _nan_fill(monkeypatch):
    monkeypatch.setattr(tr, "_ALLOC_FILL", float("nan"))


@pytest.fixture
def loop(request, monkeypatch):
    monkeypatch.setenv(tr.LOOP_ENV, request.param)
    return request.param


# ---------------------------------------------------------------------------------------------------
# Inputs and oracles


def make_inputs(mode, T, B, H, dtype=torch.float32, device="cpu", lengths=None, gru_bias=True, scale=1.0):
    G = tr.GATES[mode]
    gen = torch.Generator().manual_seed(1234 + T * 31 + B * 7 + H)

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(device=device, dtype=dtype)

    return dict(
        xproj=rand(T, B, G * H),
        h0=rand(B, H, s=0.5),
        c0=rand(B, H) if mode == "lstm" else None,
        w_hh=rand(G * H, H, s=scale / H ** 0.5),
        b_hh=rand(G * H, s=0.5) if (mode == "gru" and gru_bias) else None,
        lengths=None if lengths is None else torch.tensor(lengths, dtype=torch.int64),
    )


def upstream(mode, T, B, H, dtype, device):
    """Gradients of the states (every slot, h0's too) and cell states."""
    gen = torch.Generator().manual_seed(99)
    gs = torch.randn(T + 1, B, H, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    if mode == "lstm":
        gcs = torch.randn(T + 1, B, H, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    else:
        gcs = torch.empty(0, dtype=dtype, device=device)
    return gs, gcs


def oracle(mode, inp, reverse, gs, gcs, grad_clip=None):
    """Eager float64 loop: states, cell states and every gradient the backward op returns."""
    x = inp["xproj"].double().detach().requires_grad_()
    h0 = inp["h0"].double().detach().requires_grad_()
    c0 = inp["c0"].double().detach().requires_grad_() if inp["c0"] is not None else None
    w = inp["w_hh"].double().detach().requires_grad_()
    b = inp["b_hh"].double().detach().requires_grad_() if inp["b_hh"] is not None else None
    T, B, _ = x.shape
    H = w.shape[1]
    lengths = inp["lengths"]
    valid = torch.ones(T, B, dtype=torch.bool, device=x.device)
    if lengths is not None:
        valid = torch.arange(T, device=x.device)[:, None] < lengths.to(x.device)[None, :]
    eps_h = torch.zeros(T, B, H, dtype=torch.float64, device=x.device, requires_grad=True)
    eps_c = torch.zeros(T, B, H, dtype=torch.float64, device=x.device, requires_grad=True)

    def clamp(t):
        if grad_clip is not None:
            t.register_hook(lambda g: g.clamp(-grad_clip, grad_clip))
        return t

    h, c = h0, c0
    hs, cs = [None] * T, [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        keep = valid[t][:, None]
        gh = h @ w.t()
        if mode == "lstm":
            i, f, g, o = clamp(x[t] + gh).chunk(4, -1)
            c = torch.where(keep, torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g), c) + eps_c[t]
            h = torch.where(keep, torch.sigmoid(o) * torch.tanh(c), h) + eps_h[t]
        elif mode == "gru":
            if b is not None:
                gh = gh + b
            xr, xz, xn = x[t].chunk(3, -1)
            hr, hz, hn = gh.chunk(3, -1)
            r = torch.sigmoid(clamp(xr + hr))
            z = torch.sigmoid(clamp(xz + hz))
            n = torch.tanh(clamp(xn + r * hn))
            h = torch.where(keep, (1 - z) * n + z * h, h) + eps_h[t]
        else:
            act = {"rnn_tanh": torch.tanh, "rnn_relu": torch.relu, "rnn_sigmoid": torch.sigmoid}[mode]
            h = torch.where(keep, act(clamp(x[t] + gh)), h) + eps_h[t]
        hs[t], cs[t] = h, c
    states = torch.stack(hs + [h0] if reverse else [h0] + hs)
    loss = (states * gs.double()).sum()
    cells = None
    if mode == "lstm":
        cells = torch.stack(cs + [c0] if reverse else [c0] + cs)
        loss = loss + (cells * gcs.double()).sum()
    named = {"xproj": x, "h0": h0, "w_hh": w, "eps_h": eps_h}
    if mode == "lstm":
        named.update(c0=c0, eps_c=eps_c)
    if b is not None:
        named["b_hh"] = b
    grads = dict(zip(named, torch.autograd.grad(loss, list(named.values())), strict=True))
    sq = [grads["eps_h"].pow(2).sum(-1)] + ([grads["eps_c"].pow(2).sum(-1)] if mode == "lstm" else [])
    grads["grad_sq"] = torch.stack(sq) * valid
    return states.detach(), None if cells is None else cells.detach(), grads


def close(actual, expected, rtol=RTOL, atol=ATOL, what=""):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten elements?)"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def close_sq(actual, expected, what=""):
    """Squared norms: relative tolerance, absolute floor scaled by the largest value."""
    scale = float(expected.abs().max()) or 1.0
    close(actual, expected, rtol=RTOL, atol=ATOL * scale, what=what)


def normwise(actual, expected, tol, what=""):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
    assert err <= tol, f"{what}: normwise relative error {err:.3e} > {tol}"


def run_ops(mode, inp, reverse, gs, gcs, track=True, grad_clip=None):
    fwd = torch.ops.vgk.rnn_forward_triton(
        inp["xproj"], inp["h0"], inp["c0"], inp["w_hh"], inp["b_hh"], inp["lengths"], None, mode,
        reverse, track,
    )
    states, cells, ws, _ = fwd
    bwd = torch.ops.vgk.rnn_backward_triton(
        gs, gcs, states, cells, ws, inp["w_hh"], inp["lengths"], mode, reverse, grad_clip, track,
        inp["b_hh"] is not None,
    )
    return fwd, bwd


def check_against_oracles(mode, inp, reverse, grad_clip=None, dtype_tol=None):
    """Forward outputs against the reference, backward outputs against the float64 loop."""
    T, B, _ = inp["xproj"].shape
    H = inp["w_hh"].shape[1]
    device, dtype = inp["xproj"].device, inp["xproj"].dtype
    gs, gcs = upstream(mode, T, B, H, dtype, device)
    (states, cells, ws, jac_sq), bwd = run_ops(mode, inp, reverse, gs, gcs, grad_clip=grad_clip)
    grad_xproj, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_sq = bwd
    d = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
         for k, v in inp.items()}
    ref = reference.layer_forward(d["xproj"], d["h0"], d["c0"], d["w_hh"], d["b_hh"], inp["lengths"], mode,
                                  reverse, track=True)
    o_states, o_cells, grads = oracle(mode, inp, reverse, gs, gcs, grad_clip)
    # the loop in this file and the reference agree on the forward
    torch.testing.assert_close(o_states, ref.states.detach())

    assert states.dtype == dtype and jac_sq.dtype == torch.float32 and grad_sq.dtype == torch.float64
    assert jac_sq.shape == (T, B) and grad_sq.shape == ((2 if mode == "lstm" else 1), T, B)
    pairs = [("states", states, o_states), ("grad_xproj", grad_xproj, grads["xproj"]),
             ("grad_h0", grad_h0, grads["h0"]), ("grad_w_hh", grad_w_hh, grads["w_hh"])]
    if mode == "lstm":
        pairs += [("cell_states", cells, o_cells), ("grad_c0", grad_c0, grads["c0"])]
    else:
        assert cells.numel() == 0 and grad_c0.numel() == 0
    if inp["b_hh"] is not None:
        pairs.append(("grad_b_hh", grad_b_hh, grads["b_hh"]))
    else:
        assert grad_b_hh.numel() == 0
    for name, actual, expected in pairs:
        if dtype_tol is None:
            close(actual, expected, what=name)
        else:
            normwise(actual, expected, dtype_tol, what=name)
    for name, actual, expected in (("jac_sq", jac_sq, ref.jac_sq), ("grad_sq", grad_sq, grads["grad_sq"])):
        if dtype_tol is None:
            close_sq(actual, expected, what=name)
        else:
            normwise(actual, expected, dtype_tol, what=name)


# ---------------------------------------------------------------------------------------------------
# CPU (interpreter)


@pytest.mark.parametrize("loop", LOOPS, indirect=True)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_direction_and_loop(mode, reverse, loop):
    inp = make_inputs(mode, T=4, B=3, H=37, lengths=[4, 2, 1] if loop == "step" else None)
    check_against_oracles(mode, inp, reverse)


@pytest.mark.parametrize(
    "T,B,H,loop",
    [(1, 1, 1, "persistent"), (3, 1, 5, "step"), (1, 37, 33, "step"), (2, 37, 5, "persistent"),
     (3, 3, 33, "persistent"), (2, 17, 16, "step")],
    indirect=["loop"],
)
@pytest.mark.parametrize("mode", MODES)
def test_odd_sizes(mode, T, B, H, loop):
    lengths = [1 + (b * 5) % T for b in range(B)] if T > 1 else None
    check_against_oracles(mode, make_inputs(mode, T, B, H, lengths=lengths), reverse=(B % 2 == 1))


@pytest.mark.parametrize("loop", LOOPS, indirect=True)
@pytest.mark.parametrize("mode", MODES)
def test_lengths_both_directions(mode, loop):
    inp = make_inputs(mode, T=5, B=4, H=6, lengths=[5, 1, 3, 2])
    for reverse in (False, True):
        check_against_oracles(mode, inp, reverse)


@pytest.mark.parametrize("loop", LOOPS, indirect=True)
@pytest.mark.parametrize("mode", MODES)
def test_grad_clip(mode, loop):
    # Large weights and upstream gradients so that the clamp is active at many elements.
    inp = make_inputs(mode, T=4, B=3, H=9, lengths=[4, 3, 2], scale=3.0)
    check_against_oracles(mode, inp, reverse=mode in ("gru", "rnn_relu"), grad_clip=0.05)


def test_grad_clip_is_active():
    inp = make_inputs("lstm", T=4, B=3, H=9, scale=3.0)
    gs, gcs = upstream("lstm", 4, 3, 9, torch.float32, "cpu")
    (_, _, _, _), free = run_ops("lstm", inp, False, gs, gcs)
    (_, _, _, _), clipped = run_ops("lstm", inp, False, gs, gcs, grad_clip=0.05)
    assert free[0].abs().max() > 0.05
    assert clipped[0].abs().max() <= 0.05 + 1e-7
    assert not torch.allclose(free[3], clipped[3])


@pytest.mark.parametrize("mode", MODES)
def test_track_off(mode):
    inp = make_inputs(mode, T=3, B=2, H=5)
    gs, gcs = upstream(mode, 3, 2, 5, torch.float32, "cpu")
    (states, cells, ws, jac), bwd = run_ops(mode, inp, False, gs, gcs, track=False)
    (states_t, _, _, _), bwd_t = run_ops(mode, inp, False, gs, gcs, track=True)
    assert jac.shape == (0,) and jac.dtype == torch.float32
    assert bwd[5].shape == (0,) and bwd[5].dtype == torch.float64
    torch.testing.assert_close(states, states_t, rtol=0, atol=0)
    for a, b in zip(bwd[:5], bwd_t[:5], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_jacobian_norm_exact_for_linear_orthogonal_rnn():
    # rnn_relu with W = rho * P (P a permutation, orthogonal) and positive inputs stays in the linear
    # regime: J = W, so ||J||_F^2 = rho^2 H at every step.
    H, rho = 7, 0.9
    w = rho * torch.eye(H)[torch.randperm(H)]
    h0 = torch.rand(2, H)
    x = torch.rand(3, 2, H) + 0.1
    _, _, _, jac = torch.ops.vgk.rnn_forward_triton(x, h0, None, w, None, None, None, "rnn_relu", False, True)
    torch.testing.assert_close(jac, torch.full((3, 2), rho * rho * H), rtol=1e-5, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_against_cpp_ops(mode):
    """Traces and gradients agree with the C++ backend's (rtol 1e-4 in float32)."""
    import vgkernels  # noqa: F401  (loads the C++ ops)

    T, B, H = 5, 3, 33
    inp = make_inputs(mode, T, B, H, lengths=[5, 2, 4])
    gs, gcs = upstream(mode, T, B, H, torch.float32, "cpu")
    for reverse in (False, True):
        for clip in (None, 0.1):
            (st, cs, _, jac), bwd = run_ops(mode, inp, reverse, gs, gcs, grad_clip=clip)
            args = (inp["xproj"], inp["h0"], inp["c0"], inp["w_hh"], inp["b_hh"], inp["lengths"], None)
            c_st, c_cs, c_ws, c_jac = torch.ops.vgk.rnn_forward(*args, mode, reverse, True)
            c_bwd = torch.ops.vgk.rnn_backward(gs, gcs, c_st, c_cs, c_ws, inp["w_hh"], inp["lengths"], mode,
                                               reverse, clip, True, inp["b_hh"] is not None)
            close(st, c_st, what="states")
            if mode == "lstm":
                close(cs, c_cs, what="cell_states")
            close_sq(jac, c_jac, what="jac_sq")
            names = ("grad_xproj", "grad_h0", "grad_c0", "grad_w_hh", "grad_b_hh")
            for name, a, b in zip(names, bwd[:5], c_bwd[:5], strict=True):
                assert a.shape == b.shape, name
                if a.numel():
                    close(a, b, what=name)
            close_sq(bwd[5], c_bwd[5], what="grad_sq")


class _Layer(torch.autograd.Function):
    """The two ops as one differentiable function of (xproj, h0, c0, w_hh, b_hh), for gradcheck."""

    @staticmethod
    def forward(ctx, xproj, h0, c0, w_hh, b_hh, lengths, mode, reverse):
        states, cells, ws, _ = torch.ops.vgk.rnn_forward_triton(xproj, h0, c0, w_hh, b_hh, lengths, None,
                                                                 mode, reverse, False)
        ctx.save_for_backward(states, cells, ws, w_hh, lengths)
        ctx.config = (mode, reverse, b_hh is not None, c0 is not None)
        return states, cells

    @staticmethod
    def backward(ctx, g_states, g_cells):
        states, cells, ws, w_hh, lengths = ctx.saved_tensors
        mode, reverse, has_b, has_c = ctx.config
        if g_cells is None or g_cells.shape != cells.shape:
            g_cells = torch.zeros_like(cells)
        gx, gh0, gc0, gw, gb, _ = torch.ops.vgk.rnn_backward_triton(
            g_states.contiguous(), g_cells.contiguous(), states, cells, ws, w_hh, lengths, mode, reverse,
            None, False, has_b)
        return gx, gh0, gc0 if has_c else None, gw, gb if has_b else None, None, None, None


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(mode):
    inp = make_inputs(mode, T=3, B=2, H=3, dtype=torch.float64, lengths=[3, 2])
    if mode == "rnn_relu":  # keep pre-activations away from the kink
        inp["xproj"] = inp["xproj"].abs() + 0.5
        inp["w_hh"] = inp["w_hh"].abs()
    tensors = [inp[k].requires_grad_() if inp[k] is not None else None
               for k in ("xproj", "h0", "c0", "w_hh", "b_hh")]
    reverse = mode in ("gru", "rnn_tanh")

    def fn(*ts):
        return _Layer.apply(*ts, inp["lengths"], mode, reverse)

    # fast mode (random projections) keeps the number of interpreted launches small
    assert torch.autograd.gradcheck(fn, tensors, fast_mode=True)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
def test_half_precision(mode, dtype, tol):
    inp = make_inputs(mode, T=4, B=3, H=17, dtype=dtype, lengths=[4, 1, 3])
    check_against_oracles(mode, inp, reverse=False, dtype_tol=tol)


def test_float64_outputs_keep_float64():
    inp = make_inputs("gru", T=2, B=2, H=4, dtype=torch.float64)
    states, _, ws, jac = torch.ops.vgk.rnn_forward_triton(
        inp["xproj"], inp["h0"], None, inp["w_hh"], inp["b_hh"], None, None, "gru", False, True)
    assert states.dtype == ws.dtype == torch.float64 and jac.dtype == torch.float32


def test_non_contiguous_inputs():
    mode, T, B, H = "lstm", 3, 4, 6
    inp = make_inputs(mode, T, B, H)
    strided = dict(inp)
    strided["xproj"] = inp["xproj"].transpose(0, 1).contiguous().transpose(0, 1)
    strided["h0"] = inp["h0"].t().contiguous().t()
    strided["c0"] = inp["c0"].t().contiguous().t()
    strided["w_hh"] = inp["w_hh"].t().contiguous().t()
    assert not strided["xproj"].is_contiguous() and not strided["w_hh"].is_contiguous()
    gs, gcs = upstream(mode, T, B, H, torch.float32, "cpu")
    gs_strided = gs.transpose(0, 1).contiguous().transpose(0, 1)
    a_fwd, a_bwd = run_ops(mode, inp, False, gs, gcs)
    b_fwd, b_bwd = run_ops(mode, strided, False, gs_strided, gcs)
    for a, b in zip(list(a_fwd) + list(a_bwd), list(b_fwd) + list(b_bwd), strict=True):
        torch.testing.assert_close(a, b)


def test_opcheck_schema_and_fake():
    inp = make_inputs("lstm", T=2, B=2, H=5, lengths=[2, 1])
    args = (inp["xproj"], inp["h0"], inp["c0"], inp["w_hh"], None, inp["lengths"], None, "lstm", True, True)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.vgk.rnn_forward_triton, args, test_utils=utils)
    states, cells, ws, _ = torch.ops.vgk.rnn_forward_triton(*args)
    gs, gcs = upstream("lstm", 2, 2, 5, torch.float32, "cpu")
    bargs = (gs, gcs, states, cells, ws, inp["w_hh"], inp["lengths"], "lstm", True, 0.5, True, False)
    torch.library.opcheck(torch.ops.vgk.rnn_backward_triton, bargs, test_utils=utils)


def test_module_integration_triton_backend():
    """The lead's layer op dispatches to these ops: a tracked bidirectional LSTM matches torch.nn."""
    import vgkernels as vgk

    torch.manual_seed(0)
    ours = vgk.nn.LSTM(4, 5, num_layers=2, bidirectional=True, backend="triton", track=True)
    theirs = torch.nn.LSTM(4, 5, num_layers=2, bidirectional=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 2, 4)
    out, (h, c) = ours(x)
    ref_out, (ref_h, ref_c) = theirs(x)
    close(out, ref_out, what="output")
    close(h, ref_h, what="h_n")
    close(c, ref_c, what="c_n")
    (out.sum() + h.sum()).backward()
    (ref_out.sum() + ref_h.sum()).backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        close(p.grad, q.grad, what=name)
    trace = ours.trace
    assert trace.grad_norm is not None and torch.isfinite(trace.grad_norm).all()
    assert torch.isfinite(trace.jacobian_norm).all()


# ---------------------------------------------------------------------------------------------------
# Bad inputs


def _fwd(**over):
    inp = make_inputs("lstm", T=2, B=2, H=3)
    inp.update(over)
    return torch.ops.vgk.rnn_forward_triton(inp["xproj"], inp["h0"], inp["c0"], inp["w_hh"], inp["b_hh"],
                                            inp["lengths"], None, over.get("mode", "lstm"), False, True)


@pytest.mark.parametrize(
    "over,error,match",
    [
        ({"mode": "elman"}, ValueError, "mode must be one of"),
        ({"xproj": torch.zeros(2, 2, 12, dtype=torch.int32)}, TypeError, "xproj must be float32"),
        ({"xproj": torch.zeros(2, 12)}, ValueError, r"xproj must be a 3-D tensor"),
        ({"xproj": torch.zeros(2, 2, 11)}, ValueError, r"xproj must have shape \(2, 2, 12\)"),
        ({"h0": torch.zeros(3, 3)}, ValueError, r"h0 must have shape \(2, 3\), got \(3, 3\)"),
        ({"h0": torch.zeros(2, 3, dtype=torch.float64)}, TypeError, "h0 must have dtype torch.float32"),
        ({"c0": None}, ValueError, "c0 is required"),
        ({"w_hh": torch.zeros(12, 4)}, ValueError, r"w_hh must have shape \(16, 4\)|xproj must have shape"),
        ({"b_hh": torch.zeros(12)}, ValueError, "b_hh must be None for mode 'lstm'"),
        ({"lengths": torch.tensor([2, 1], dtype=torch.int32)}, ValueError, "lengths must be int64"),
    ],
)
def test_bad_forward_inputs(over, error, match):
    with pytest.raises(error, match=match):
        _fwd(**over)


def test_mixed_devices():
    # Through the dispatcher a meta tensor selects the fake kernel, so call the implementation.
    inp = make_inputs("gru", T=2, B=2, H=3)
    with pytest.raises(RuntimeError, match="h0 must be on cpu like xproj, got meta"):
        tr._forward_impl(inp["xproj"], inp["h0"].to("meta"), None, inp["w_hh"], inp["b_hh"], None, "gru",
                         False, True)


def test_bad_backward_inputs():
    inp = make_inputs("gru", T=2, B=2, H=3)
    states, cells, ws, _ = torch.ops.vgk.rnn_forward_triton(
        inp["xproj"], inp["h0"], None, inp["w_hh"], inp["b_hh"], None, None, "gru", False, True)
    gs, gcs = upstream("gru", 2, 2, 3, torch.float32, "cpu")
    ok = (gs, gcs, states, cells, ws, inp["w_hh"], None, "gru", False, None, True, True)

    def call(**over):
        args = list(ok)
        names = ["grad_states", "grad_cell_states", "states", "cell_states", "workspace", "w_hh", "lengths",
                 "mode", "reverse", "grad_clip", "track", "has_b_hh"]
        for k, v in over.items():
            args[names.index(k)] = v
        return torch.ops.vgk.rnn_backward_triton(*args)

    with pytest.raises(ValueError, match=r"grad_states must have shape \(3, 2, 3\)"):
        call(grad_states=gs[:2])
    with pytest.raises(ValueError, match=r"workspace must have shape \(2, 2, 12\)"):
        call(workspace=ws[:, :, :6])
    with pytest.raises(ValueError, match="grad_clip must be a positive number"):
        call(grad_clip=0.0)
    with pytest.raises(ValueError, match="has_b_hh is for mode 'gru' only"):
        call(mode="rnn_tanh", workspace=torch.empty(0), w_hh=inp["w_hh"][:3])
    with pytest.raises(TypeError, match="states must be float32"):
        call(states=states.to(torch.int64))


@pytest.fixture
def split_plans(monkeypatch):
    """Step plans made as if for a GPU of 64 SMs: small shapes then split K over several programs."""
    monkeypatch.setattr(tr, "_INTERPRETER_SMS", 64)
    monkeypatch.setenv(tr.LOOP_ENV, "step")


@pytest.mark.parametrize("mode", MODES)
def test_split_k_step_loop(mode, split_plans):
    """Programs sharing a tile's K range: the last to arrive sums the partials (forward and backward)."""
    p = tr._plan(3, 37, tr.GATES[mode], torch.device("cpu"))
    assert p["SPLIT_FWD"] == 3 and p["SPLIT_BWD"] >= 3
    inp = make_inputs(mode, T=3, B=3, H=37, lengths=[3, 1, 2])
    check_against_oracles(mode, inp, reverse=mode in ("gru", "rnn_relu"),
                          grad_clip=0.5 if mode == "lstm" else None)


def test_split_k_float64_gradcheck(split_plans):
    inp = make_inputs("lstm", T=2, B=2, H=33, dtype=torch.float64)
    assert tr._plan(2, 33, 4, torch.device("cpu"), torch.float64)["SPLIT_FWD"] > 1
    tensors = [inp[k].requires_grad_() for k in ("xproj", "h0", "c0", "w_hh")]
    assert torch.autograd.gradcheck(lambda *ts: _Layer.apply(*ts, None, None, "lstm", False), tensors,
                                    fast_mode=True)


def test_graph_replay_keeps_busy_buffers(graph_calls):
    """Step loops replayed over static buffers (the CUDA-graph path, with a re-run instead of a graph):
    an entry whose outputs are still alive is not reused, and a replay gives the right results."""
    from vgkernels.triton import _graphs

    mode = "lstm"
    inp_a = make_inputs(mode, T=3, B=2, H=17, lengths=[3, 2])
    inp_b = make_inputs(mode, T=3, B=2, H=17, lengths=[3, 2], scale=2.0)
    gs, gcs = upstream(mode, 3, 2, 17, torch.float32, "cpu")
    run_ops(mode, inp_a, False, gs, gcs)  # a shape's first call runs without a graph
    held_fwd, held_bwd = run_ops(mode, inp_a, False, gs, gcs)
    expected = [t.clone() for t in list(held_fwd) + list(held_bwd)]
    check_against_oracles(mode, inp_b, False)  # a second entry: the first one's outputs are alive
    check_against_oracles(mode, inp_b, False)  # that entry again, replayed
    assert sum(len(pool) for pool in _graphs._entries.values()) == 4  # two forward, two backward
    for a, b in zip(list(held_fwd) + list(held_bwd), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    del held_fwd, held_bwd, a, b
    pools_before = sum(len(pool) for pool in _graphs._entries.values())
    run_ops(mode, inp_a, False, gs, gcs)  # the first entry is free again: no new one
    assert sum(len(pool) for pool in _graphs._entries.values()) == pools_before


def _later_calls_find_their_graphs(graph_calls, kinds: set[str]) -> None:
    later = graph_calls.of("later")
    assert {kind for _, kind, _ in later} == kinds, graph_calls
    assert all(outcome == "found" for _, _, outcome in later), graph_calls


@pytest.mark.parametrize("mode,layer_norm", [("lstm", False), ("gru", False), ("lstm", True)])
def test_graph_of_a_half_precision_backward_is_found_again(mode, layer_norm, graph_calls):
    """The forward's bfloat16 outputs (converted from the float32 accumulators) live in static buffers,
    so the backward, which adopts them, finds its captured entry at every training step instead of
    capturing new ones (and, past the pool, launching without a graph); a held output is never
    overwritten."""
    import vgkernels as vgk

    cls = vgk.nn.LSTM if mode == "lstm" else vgk.nn.GRU
    model = cls(8, 16, backend="triton", layer_norm=layer_norm, dtype=torch.bfloat16)
    x = torch.randn(3, 2, 8, dtype=torch.bfloat16)
    for step in range(4):
        graph_calls.phase = "first" if step < 2 else "later"  # a shape gets its graphs at its second call
        churn = [torch.empty(1 << k) for k in range(8, 16)]  # moves fresh allocations elsewhere
        out, state = model(x)
        out.float().square().sum().backward()
        del out, state, churn  # a held state would keep its entry busy: the next call takes another
    prefix = "ln-" if layer_norm else ""
    _later_calls_find_their_graphs(graph_calls, {f"{prefix}fwd", f"{prefix}bwd"})
    # An output still held keeps its buffers from the next call, which takes another entry.
    with torch.no_grad():
        held, _ = model(x)
        expected = held.clone()
        model(x * 2)
    assert torch.equal(held, expected)


@pytest.mark.parametrize("mode, layer_norm", [("lstm", False), ("gru", False), ("lstm", True)])
def test_graph_of_a_backward_is_found_again_with_fresh_weights(mode, layer_norm, graph_calls):
    """A parametrized weight (here weight_norm; autocast's casts likewise) is a fresh tensor at every
    call. The backward copies the weights into its graph's buffers rather than reading them at their
    address, so it finds its captured entry at every training step, and its gradients stay right."""
    from torch.nn.utils.parametrizations import weight_norm

    import vgkernels as vgk

    cls = vgk.nn.LSTM if mode == "lstm" else vgk.nn.GRU
    model = cls(8, 16, backend="triton", layer_norm=layer_norm, dtype=torch.float64)
    reference = cls(8, 16, backend="reference", layer_norm=layer_norm, dtype=torch.float64)
    reference.load_state_dict(model.state_dict())
    names = ["weight_hh_l0"] + (["layer_norm_hh_weight_l0", "layer_norm_cell_weight_l0"] if layer_norm
                                else [])
    for net in (model, reference):
        for name in names:
            weight_norm(net, name, dim=None)
    x = torch.randn(3, 2, 8, dtype=torch.float64)
    for step in range(4):
        graph_calls.phase = "first" if step < 2 else "later"  # a shape gets its graphs at its second call
        for net in (model, reference):
            net.zero_grad()
            out, state = net(x)
            out.square().sum().backward()
            del out, state
        pairs = zip(model.named_parameters(), reference.named_parameters(), strict=True)
        for (name, got), (_, want) in pairs:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12, msg=name)
    prefix = "ln-" if layer_norm else ""
    _later_calls_find_their_graphs(graph_calls, {f"{prefix}fwd", f"{prefix}bwd"})


@pytest.mark.parametrize("extra", [0, 2])
def test_graphs_of_a_stack_of_equal_layers(extra, graph_calls):
    """Equal layers share a loop shape; each layer in flight holds its own entry. Up to POOL layers every
    call after the first two steps finds its entry. Past POOL, the layers beyond run without a graph, and so
    do their backwards, without taking entries that would never be found again (their inputs are new
    at every call): the first POOL layers keep their graphs in both directions."""
    import vgkernels as vgk
    from vgkernels.triton import _graphs

    layers = _graphs.POOL + extra
    model = vgk.nn.GRU(4, 4, num_layers=layers, backend="triton")
    x = torch.randn(2, 1, 4)
    for step in range(4):
        graph_calls.phase = "first" if step < 2 else "later"  # a shape gets its graphs at its second call
        out, state = model(x)
        out.square().sum().backward()
        del out, state
    later = collections.Counter(graph_calls.of("later"))
    assert later == {("later", "fwd", "found"): 2 * _graphs.POOL, ("later", "bwd", "found"): 2 * _graphs.POOL,
                     **({("later", "fwd", "ungraphed"): 2 * extra, ("later", "bwd", "ungraphed"): 2 * extra}
                        if extra else {})}, later
    assert {key[0]: len(pool) for key, pool in _graphs._entries.items()} == {"fwd": _graphs.POOL,
                                                                              "bwd": _graphs.POOL}


def test_graphs_of_varying_sequence_lengths(graph_calls, monkeypatch):
    """A shape's first call runs without a graph: a length seen once captures nothing. Lengths cycling
    through more loop shapes than the cache keeps (here 3 lengths, 6 shapes with the backward, against
    4): least-recently-used eviction alone would capture at every call; with each shape waiting twice
    as many calls before each new pool, the captures die out and most calls find a graph."""
    import vgkernels as vgk
    from vgkernels.triton import _graphs

    monkeypatch.setattr(_graphs, "MAX_SHAPES", 4)
    model = vgk.nn.GRU(4, 4, backend="triton")
    rounds = 24
    for round_ in range(rounds):
        for T in (1, 2, 3):
            graph_calls.phase = round_
            out, state = model(torch.randn(T, 1, 4))
            out.sum().backward()
            del out, state
    assert {outcome for _, _, outcome in graph_calls.of(0)} == {"ungraphed"}
    assert {outcome for _, _, outcome in graph_calls.of(1)} == {"new"}
    later = collections.Counter(outcome for phase, _, outcome in graph_calls if phase >= 2)
    calls = 6 * (rounds - 2)
    assert later["new"] <= 0.15 * calls and later["found"] >= 0.6 * calls, later
    last = collections.Counter(outcome for phase, _, outcome in graph_calls if phase >= rounds - 6)
    assert last["new"] <= 2, last


def test_graph_pools_are_per_thread(graph_calls, monkeypatch):
    """Each thread takes entries from pools of its own: two threads calling a layer at once could
    otherwise both find one entry free and fill its buffers at once. Each gets its own results."""
    import threading

    import vgkernels as vgk
    from vgkernels.triton import _graphs, _host

    one_at_a_time, launch = threading.Lock(), _host.launch

    def interpreted(*args, **kwargs):  # the Triton interpreter runs one kernel at a time
        with one_at_a_time:
            launch(*args, **kwargs)

    monkeypatch.setattr(_host, "launch", interpreted)

    model = vgk.nn.GRU(4, 8, backend="triton")
    inputs = [torch.randn(3, 2, 4) for _ in range(2)]
    with torch.no_grad():
        expected = [model(x)[0].clone() for x in inputs]
    _graphs.clear()
    results, errors = [None, None], []
    together = threading.Barrier(2, timeout=60)  # both alive at once: two distinct thread ids

    def work(i: int) -> None:
        try:
            together.wait()
            with torch.no_grad():
                for _ in range(3):  # the pool comes at the second call, the third finds its entry
                    results[i] = model(inputs[i])[0].clone()
        except Exception as error:  # reported below, not lost in the thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for got, want in zip(results, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    owners = {key[-1] for key in _graphs._entries}
    assert owners == {thread.ident for thread in threads}, owners


def test_graph_mode_choice(monkeypatch):
    from vgkernels.triton import _graphs

    monkeypatch.delenv(_graphs.ENV, raising=False)
    assert _graphs.mode(torch.device("cpu")) == "off"  # the interpreter path never captures
    assert _graphs.mode(torch.device("cuda")) == "graph"
    monkeypatch.setenv(_graphs.ENV, "0")
    assert _graphs.mode(torch.device("cuda")) == "off"
    monkeypatch.setenv(_graphs.ENV, "yes")
    with pytest.raises(ValueError, match="VGK_RNN_TRITON_GRAPH"):
        _graphs.mode(torch.device("cuda"))
    monkeypatch.setenv(_graphs.ENV, "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _graphs.mode(torch.device("cuda")) == "off"  # inside the caller's own capture


def test_fp32_dot_precision_follows_torch(monkeypatch):
    """float32 dots: TF32 on CUDA where torch's cuDNN RNN switch allows it, IEEE otherwise and always
    under the interpreter."""
    from vgkernels.triton import _host

    assert tr._precision(torch.float32, torch.device("cpu")) == "ieee"
    rnn = torch.backends.cudnn.rnn
    old = rnn.fp32_precision
    try:
        rnn.fp32_precision = "tf32"
        assert _host.fp32_dot_tf32(torch.device("cuda"))
        assert tr._precision(torch.float32, torch.device("cuda")) == "tf32"
        assert tr._precision(torch.float64, torch.device("cuda")) == "ieee"
        rnn.fp32_precision = "ieee"
        assert tr._precision(torch.float32, torch.device("cuda")) == "ieee"
    finally:
        rnn.fp32_precision = old


def test_cpu_without_interpreter_is_refused(monkeypatch):
    assert tr._kernels_interpreted()
    monkeypatch.setattr(tr, "_kernels_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _fwd()


def test_bad_loop_choice(monkeypatch):
    monkeypatch.setenv(tr.LOOP_ENV, "graph")
    with pytest.raises(ValueError, match="VGK_RNN_TRITON_LOOP"):
        _fwd()


# ---------------------------------------------------------------------------------------------------
# CUDA (real sizes)

gpu = pytest.mark.gpu


def _cuda_inputs(mode, T, B, H, dtype, lengths=None):
    inp = make_inputs(mode, T, B, H, dtype=dtype, device="cuda", lengths=lengths)
    return inp


@gpu
@pytest.mark.parametrize("loop", LOOPS, indirect=True)
@pytest.mark.parametrize("mode", MODES)
def test_gpu_against_oracles(mode, loop, ieee_float32):
    T, B, H = 12, 37, 129
    lengths = [1 + (b * 7) % T for b in range(B)]
    check_against_oracles(mode, _cuda_inputs(mode, T, B, H, torch.float32, lengths), reverse=True)
    check_against_oracles(mode, _cuda_inputs(mode, T, B, 33, torch.float32), reverse=False, grad_clip=0.05)


@gpu
@pytest.mark.parametrize("loop", LOOPS, indirect=True)
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_gpu_half_precision(mode, loop):
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float16, 1e-2)):
        check_against_oracles(mode, _cuda_inputs(mode, 16, 64, 256, dtype, [16] * 60 + [3] * 4), False,
                              dtype_tol=tol)


@gpu
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_gpu_float64(mode, ieee_float32):
    check_against_oracles(mode, _cuda_inputs(mode, 5, 3, 17, torch.float64, [5, 2, 4]), reverse=True)


_NN = {"lstm": (torch.nn.LSTM, {}), "gru": (torch.nn.GRU, {}), "rnn_tanh": (torch.nn.RNN, {}),
       "rnn_relu": (torch.nn.RNN, {"nonlinearity": "relu"})}


def _against_cudnn(mode, T, B, H, dtype, tol, device="cuda"):
    """Our ops, fed the same input projection, against torch.nn on cuDNN: outputs, h_n, c_n and grads."""
    cls, extra = _NN[mode]
    torch.manual_seed(0)
    net = cls(H, H, **extra).to(device, dtype)
    x = torch.randn(T, B, H, device=device, dtype=dtype, requires_grad=True)
    out, state = net(x)
    h_n, c_n = state if mode == "lstm" else (state, None)
    gen = torch.Generator(device=device).manual_seed(5)
    g_out = torch.randn(out.shape, device=device, dtype=dtype, generator=gen)
    g_h = torch.randn(h_n.shape, device=device, dtype=dtype, generator=gen)
    torch.autograd.backward([out, h_n], [g_out, g_h])
    ref = [out, h_n[0], x.grad, net.weight_hh_l0.grad, net.weight_ih_l0.grad]
    if dtype == torch.float32:  # the float64 run that both float32 results are judged against
        net64 = copy.deepcopy(net).double()
        x64 = x.detach().double().requires_grad_()
        out64, state64 = net64(x64)
        h_n64 = state64[0] if mode == "lstm" else state64
        torch.autograd.backward([out64, h_n64], [g_out.double(), g_h.double()])
        exact = [out64, h_n64[0], x64.grad, net64.weight_hh_l0.grad, net64.weight_ih_l0.grad]

    w_ih, w_hh = net.weight_ih_l0.detach(), net.weight_hh_l0.detach()
    b_ih, b_hh = net.bias_ih_l0.detach(), net.bias_hh_l0.detach()
    xd = x.detach()
    xproj = torch.nn.functional.linear(xd, w_ih, b_ih if mode == "gru" else b_ih + b_hh)
    h0 = torch.zeros(B, H, device=device, dtype=dtype)
    c0 = h0.clone() if mode == "lstm" else None
    states, cells, ws, jac = torch.ops.vgk.rnn_forward_triton(
        xproj, h0, c0, w_hh, b_hh if mode == "gru" else None, None, None, mode, False, True)
    gs = torch.zeros_like(states)
    gs[1:] = g_out
    gs[T] += g_h[0]
    gcs = torch.zeros_like(cells)
    gx, _, _, gw, _, gsq = torch.ops.vgk.rnn_backward_triton(
        gs, gcs, states, cells, ws, w_hh, None, mode, False, None, True, mode == "gru")
    ours = [states[1:], states[T], gx.reshape(T * B, -1) @ w_ih, gw,
            gx.reshape(T * B, -1).t().to(dtype) @ xd.reshape(T * B, H)]
    names = ["output", "h_n", "grad_input", "grad_w_hh", "grad_w_ih"]
    for i, (name, a, b) in enumerate(zip(names, ours, ref, strict=True)):
        if dtype == torch.float32:
            # Sums over T * B terms in another order than cuDNN's: element by element, at most 4 times
            # cuDNN's own distance from float64, or within 1e-5 of the tensor's largest value.
            e = exact[i].detach().double().cpu().reshape(a.shape)
            err = (a.detach().double().cpu() - e).abs()
            theirs = (b.detach().double().cpu().reshape(a.shape) - e).abs()
            floor = ATOL * float(e.abs().max())
            bad = err > torch.maximum(4 * theirs, torch.full_like(theirs, floor))
            assert not bad.any(), (f"{name}: {int(bad.sum())} elements, worst {float(err.max()):.3e} "
                                   f"from float64 where cuDNN is {float(theirs.max()):.3e}")
            close(a, b.reshape(a.shape), rtol=tol, atol=floor, what=name)
        else:
            normwise(a, b.reshape(a.shape), tol, what=name)
    assert torch.isfinite(jac).all() and torch.isfinite(gsq).all() and (gsq >= 0).all()


@gpu
@pytest.mark.parametrize("loop", LOOPS, indirect=True)
@pytest.mark.parametrize("mode", list(_NN))
def test_gpu_against_cudnn_fp32(mode, loop, ieee_float32):
    _against_cudnn(mode, T=100, B=64, H=512, dtype=torch.float32, tol=1e-4)


@gpu
@pytest.mark.parametrize("loop", LOOPS, indirect=True)
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_gpu_against_cudnn_bf16(mode, loop):
    _against_cudnn(mode, T=100, B=64, H=512, dtype=torch.bfloat16, tol=2e-2)


@gpu
def test_gpu_compile_traces_the_ops():
    inp = _cuda_inputs("gru", 8, 16, 64, torch.float32)

    def f(x, h0, w, b):
        out = torch.ops.vgk.rnn_forward_triton(x, h0, None, w, b, None, None, "gru", False, True)
        return out[0], out[3]

    args = (inp["xproj"], inp["h0"], inp["w_hh"], inp["b_hh"])
    eager = f(*args)
    compiled = torch.compile(f, fullgraph=True)(*args)
    for a, b in zip(compiled, eager, strict=True):
        close(a, b, what="compiled")


@gpu
def test_gpu_module_against_torch_nn(ieee_float32):
    import vgkernels as vgk

    torch.manual_seed(0)
    ours = vgk.nn.GRU(64, 96, num_layers=2, bidirectional=True, track=True).cuda()
    theirs = torch.nn.GRU(64, 96, num_layers=2, bidirectional=True).cuda()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(20, 8, 64, device="cuda")
    out, h = ours(x)
    ref_out, ref_h = theirs(x)
    close(out, ref_out, what="output")
    close(h, ref_h, what="h_n")
    out.square().sum().backward()
    ref_out.square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        close(p.grad, q.grad, rtol=RTOL, atol=1e-4, what=name)
    assert torch.isfinite(ours.trace.grad_norm).all()


@gpu
@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
def test_gpu_step_loop_graph_replays_exactly(mode, monkeypatch, ieee_float32):
    """The step loop replayed from CUDA graphs gives bit for bit what it gives launched step by step: on
    the shape's first call (no graph), on capturing calls beside outputs of earlier calls still alive,
    and on replays."""
    from vgkernels.triton import _graphs

    monkeypatch.setenv(tr.LOOP_ENV, "step")
    T, B, H = 20, 16, 256  # split K on an H200
    inputs = [_cuda_inputs(mode, T, B, H, torch.float32, [T] * (B - 2) + [3, 1]) for _ in range(2)]
    inputs[1]["xproj"] = inputs[1]["xproj"] * 0.5
    gs, gcs = upstream(mode, T, B, H, torch.float32, "cuda")
    monkeypatch.setenv(_graphs.ENV, "0")
    eager = [run_ops(mode, inp, False, gs, gcs) for inp in inputs]
    monkeypatch.setenv(_graphs.ENV, "1")
    _graphs.clear()

    def check(results) -> None:
        for i, (fwd, bwd) in enumerate(results):
            for a, b in zip(list(fwd) + list(bwd), list(eager[i % 2][0]) + list(eager[i % 2][1]),
                            strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)

    check([run_ops(mode, inputs[i % 2], False, gs, gcs) for i in range(4)])  # all held till checked
    check([run_ops(mode, inputs[i % 2], False, gs, gcs) for i in range(2)])  # entries free again
    _graphs.clear()


class _SequenceOutput(torch.nn.Module):
    """A recurrent layer's output sequence alone (torch.cuda.make_graphed_callables takes tensors)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)[0]


@gpu
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_gpu_layer_inside_the_callers_cuda_graph(mode, ieee_float32):
    """The caller's own CUDA graph (torch.cuda.make_graphed_callables, which torch.nn's layers allow)
    captures our launches: its replays give the eager module's outputs and every gradient."""
    import vgkernels as vgk

    cls = vgk.nn.LSTM if mode == "lstm" else vgk.nn.GRU
    model = cls(32, 64, backend="triton").cuda()
    eager = copy.deepcopy(model)
    x = torch.randn(10, 16, 32, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(_SequenceOutput(model), (x,))
    for scale in (1.0, 0.5):
        xg = (x.detach() * scale).requires_grad_()
        xe = xg.detach().clone().requires_grad_()
        for net in (model, eager):
            net.zero_grad()
        out = graphed(xg)
        out.square().sum().backward()
        want, _ = eager(xe)
        want.square().sum().backward()
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(xg.grad, xe.grad, rtol=1e-5, atol=1e-6)
        for (name, got), (_, ref) in zip(model.named_parameters(), eager.named_parameters(), strict=True):
            torch.testing.assert_close(got.grad, ref.grad, rtol=1e-5, atol=1e-6, msg=name)


@gpu
def test_gpu_tf32_follows_torch_switch(ieee_float32):
    """With torch's default (TF32 for cuDNN's recurrent layers) our float32 dots use TF32: close to the
    float64 oracle at TF32's precision; with the switch off, at IEEE precision."""
    mode, T, B, H = "lstm", 10, 64, 512
    torch.backends.cudnn.allow_tf32 = True  # torch's defaults
    torch.backends.cuda.matmul.allow_tf32 = False
    assert tr._precision(torch.float32, torch.device("cuda")) == "tf32"
    check_against_oracles(mode, _cuda_inputs(mode, T, B, H, torch.float32), reverse=False, dtype_tol=5e-3)
    torch.backends.cudnn.allow_tf32 = False
    assert tr._precision(torch.float32, torch.device("cuda")) == "ieee"
    check_against_oracles(mode, _cuda_inputs(mode, T, B, H, torch.float32), reverse=False)
