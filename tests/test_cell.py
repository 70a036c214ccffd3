"""The fused cells vgk.nn.LSTMCell / GRUCell / RNNCell and the op vgkernels.ops.cell on the cpp backend.

Oracles: torch.nn's cells (values and every gradient, second derivatives and forward-mode tangents
included), the eager
reference backend (vgkernels.reference.cell; the sigmoid RNN, which torch.nn lacks, and the traces),
torch.autograd.functional.jacobian of one step for the Jacobian norms, and autograd's own gradients of
the states for the gradient norms.

Tolerances: float64 rtol 1e-10, atol 1e-12; the traces, whose fields are float32, rtol 1e-6 against
the float64 oracles and rtol 1e-5, atol 1e-6 against the reference backend; float32 rtol 1e-5,
atol 1e-6 (our float32 exp is exact to 1e-8 relative; the GEMMs sum in another order than torch's);
bfloat16 / float16 against torch.nn on the same low-precision module: normwise relative error 2e-2 /
5e-3 (ours computes in float32, torch in the low precision); gradcheck and gradgradcheck with torch's
defaults.
"""

import copy
import io
import pickle

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.autograd.gradcheck import gradcheck, gradgradcheck

import vgkernels as vgk
from vgkernels.ops.cell import CellTrace
from vgkernels.reference import cell as reference

KINDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]  # those torch.nn has
MODES = KINDS + ["rnn_sigmoid"]
F64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=1e-5, atol=1e-6)


def tol(dtype):
    return F64 if dtype == torch.float64 else F32


def make(mode, input_size, hidden_size, bias=True, lib="vgk", **kwargs):
    """A cell of ``mode`` from vgkernels (lib="vgk", keyword arguments passed on) or torch.nn."""
    nn = vgk.nn if lib == "vgk" else torch.nn
    if mode == "lstm":
        return nn.LSTMCell(input_size, hidden_size, bias, **kwargs)
    if mode == "gru":
        return nn.GRUCell(input_size, hidden_size, bias, **kwargs)
    return nn.RNNCell(input_size, hidden_size, bias, mode[4:], **kwargs)


def pair(mode, input_size, hidden_size, bias=True, dtype=torch.float32, **kwargs):
    """(ours, torch.nn's) with the same parameters."""
    ours = make(mode, input_size, hidden_size, bias, dtype=dtype, **kwargs)
    theirs = make(mode, input_size, hidden_size, bias, lib="torch", dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def state(mode, B, H, dtype=torch.float32, requires_grad=True):
    def one():
        return torch.randn(B, H, dtype=dtype, requires_grad=requires_grad)

    return (one(), one()) if mode == "lstm" else one()


def outputs(out):
    return list(out) if isinstance(out, tuple) else [out]


def weighted_loss(out):
    """A loss whose gradient differs per element (so no symmetry hides an error)."""
    loss = 0
    for t in outputs(out):
        w = torch.linspace(-1.5, 2.0, t.numel(), dtype=t.dtype).view_as(t)
        loss = loss + (t * w).sum() + 0.3 * t.square().sum()
    return loss


def run(module, x, hx, wrt):
    out = module(x, hx)
    grads = torch.autograd.grad(weighted_loss(out), wrt, allow_unused=True)
    return outputs(out), grads


def leaves(x, hx):
    states = [] if hx is None else (list(hx) if isinstance(hx, tuple) else [hx])
    return [x] + states


# ---------------------------------------------------------------------------------------------------
# Drop-in: classes, parameters, values and gradients against torch.nn


@pytest.mark.parametrize("mode", KINDS)
def test_subclass_parameters_and_init_are_torch_nn(mode):
    torch.manual_seed(3)
    ours = make(mode, 5, 7)
    torch.manual_seed(3)
    theirs = make(mode, 5, 7, lib="torch")
    assert isinstance(ours, type(theirs)) and isinstance(ours, torch.nn.RNNCellBase)
    assert isinstance(ours, vgk.nn.cell.CellBase)
    names = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    assert list(ours.state_dict()) == list(theirs.state_dict()) == names
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q), name  # torch's own __init__ and reset_parameters, same random draws
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert ours.bias_ih is not None and make(mode, 5, 7, bias=False).bias_ih is None
    assert "vgk" not in repr(ours) and repr(make(mode, 2, 3, track=True)).endswith("track=True)")
    assert ours.input_size == 5 and ours.hidden_size == 7 and ours.trace is None and ours.track is False


@pytest.mark.parametrize("mode", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("B, I, H", [(1, 1, 1), (3, 5, 37), (37, 3, 2)])
def test_values_and_gradients_match_torch_nn(mode, dtype, bias, with_state, B, I, H):
    ours, theirs = pair(mode, I, H, bias, dtype)
    x = torch.randn(B, I, dtype=dtype, requires_grad=True)
    hx = state(mode, B, H, dtype) if with_state else None
    wrt = leaves(x, hx)
    out_a, grads_a = run(ours, x, hx, wrt + list(ours.parameters()))
    out_b, grads_b = run(theirs, x, hx, wrt + list(theirs.parameters()))
    for a, b in zip(out_a + list(grads_a), out_b + list(grads_b), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **tol(dtype))


@pytest.mark.parametrize("with_state", [True, False])
def test_sigmoid_rnn_matches_reference(with_state):
    ours = make("rnn_sigmoid", 4, 6, dtype=torch.float64)
    ref = make("rnn_sigmoid", 4, 6, dtype=torch.float64, backend="reference")
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    hx = state("rnn_sigmoid", 3, 6, torch.float64) if with_state else None
    wrt = leaves(x, hx)
    out_a, grads_a = run(ours, x, hx, wrt + list(ours.parameters()))
    out_b, grads_b = run(ref, x, hx, wrt + list(ref.parameters()))
    for a, b in zip(out_a + list(grads_a), out_b + list(grads_b), strict=True):
        torch.testing.assert_close(a, b, **F64)
    recurrent = 0 if hx is None else hx @ ours.weight_hh.t()
    expected = torch.sigmoid(x @ ours.weight_ih.t() + ours.bias_ih + ours.bias_hh + recurrent)
    torch.testing.assert_close(out_a[0], expected, **F64)


@pytest.mark.parametrize("mode", KINDS)
def test_unbatched_input(mode):
    ours, theirs = pair(mode, 4, 5, dtype=torch.float64)
    x = torch.randn(4, dtype=torch.float64)
    hx = state(mode, 1, 5, torch.float64, requires_grad=False)
    hx = tuple(t[0] for t in hx) if mode == "lstm" else hx[0]
    for h in (None, hx):
        a, b = outputs(ours(x, h)), outputs(theirs(x, h))
        for u, v in zip(a, b, strict=True):
            assert u.shape == (5,)
            torch.testing.assert_close(u, v, **F64)


@pytest.mark.parametrize("mode", KINDS)
def test_empty_batch_and_zero_hidden_size(mode):
    ours, theirs = pair(mode, 4, 3)
    x = torch.randn(0, 4, requires_grad=True)
    a, b = outputs(ours(x)), outputs(theirs(x))
    assert [t.shape for t in a] == [t.shape for t in b] == [(0, 3)] * len(a)
    sum(t.sum() for t in a).backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in ours.parameters())
    assert x.grad.shape == (0, 4)
    ours, theirs = pair(mode, 4, 0)
    x = torch.randn(3, 4)
    assert [t.shape for t in outputs(ours(x))] == [t.shape for t in outputs(theirs(x))]


@pytest.mark.parametrize("mode", KINDS)
def test_non_contiguous_inputs_states_and_weights(mode):
    ours, theirs = pair(mode, 6, 5, dtype=torch.float64)
    with torch.no_grad():  # weights viewed through a transpose, as a parametrization might hand them over
        for m in (ours, theirs):
            m.weight_hh = torch.nn.Parameter(m.weight_hh.detach().t().contiguous().t())
    x = torch.randn(6, 3, dtype=torch.float64).t().requires_grad_()
    hx = state(mode, 5, 3, torch.float64)
    hx = tuple(t.t() for t in hx) if mode == "lstm" else hx.t()
    assert not x.is_contiguous()
    out_a, grads_a = run(ours, x, hx, [x, *ours.parameters()])
    out_b, grads_b = run(theirs, x, hx, [x, *theirs.parameters()])
    for a, b in zip(out_a + list(grads_a), out_b + list(grads_b), strict=True):
        torch.testing.assert_close(a, b, **F64)


def test_lstm_with_only_one_output_used():
    ours, theirs = pair("lstm", 3, 4, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    for i in range(2):
        a = torch.autograd.grad(ours(x)[i].sum(), [x, *ours.parameters()])
        b = torch.autograd.grad(theirs(x)[i].sum(), [x, *theirs.parameters()])
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(u, v, **F64)
        assert a[0].abs().sum() > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_and_gradgradcheck(mode, with_state, bias):
    G = {"lstm": 4, "gru": 3}.get(mode, 1)
    H, I, B = 3, 2, 2

    def t(*shape, scale=1.0):
        return (scale * torch.randn(*shape, dtype=torch.float64)).requires_grad_()

    args = [t(B, I), t(B, H) if with_state else None, t(B, H) if with_state and mode == "lstm" else None,
            t(G * H, I), t(G * H, H, scale=0.5), t(G * H) if bias else None, t(G * H) if bias else None]

    def f(x, h, c, w_ih, w_hh, b_ih, b_hh):
        hx = None if h is None else ((h, c) if mode == "lstm" else h)
        h1, c1, _ = vgk.ops.cell(x, hx, w_ih, w_hh, b_ih, b_hh, mode=mode, backend="cpp")
        return (h1, c1) if mode == "lstm" else h1

    assert gradcheck(f, args)
    assert gradgradcheck(f, args)


@pytest.mark.parametrize("mode", KINDS)
def test_second_derivatives_match_torch_nn(mode):
    # A gradient penalty: d/dθ ||∂loss/∂x||², through create_graph=True.
    ours, theirs = pair(mode, 3, 4, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    hx = state(mode, 2, 4, torch.float64)
    results = []
    for m in (ours, theirs):
        (gx,) = torch.autograd.grad(weighted_loss(m(x, hx)), [x], create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), [x, *leaves(None, hx)[1:], *m.parameters()]))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **F64)
        assert b.abs().sum() > 0


@pytest.mark.parametrize("mode", KINDS)
@pytest.mark.parametrize("track", [False, True])
def test_forward_mode_ad_matches_torch_nn(mode, track):
    # Tangents of the input, the state and the parameters (torch.func.jvp), and dual tensors
    # (torch.autograd.forward_ad): never silently zero.
    ours, theirs = pair(mode, 3, 4, dtype=torch.float64, track=track)
    x = torch.randn(2, 3, dtype=torch.float64)
    hx = state(mode, 2, 4, torch.float64, requires_grad=False)
    params = dict(ours.named_parameters())
    tangents = (torch.randn_like(x), tuple(torch.randn_like(t) for t in leaves(None, hx)[1:]),
                {k: torch.randn_like(v) for k, v in params.items()})
    results = []
    for m in (ours, theirs):
        def f(x, states, p, m=m):
            return torch.func.functional_call(m, p, (x, states if mode == "lstm" else states[0]))

        primals = (x, tuple(leaves(None, hx)[1:]), {k: v.detach() for k, v in params.items()})
        results.append(outputs(torch.func.jvp(f, primals, tangents)[1]))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **F64)
        assert b.abs().sum() > 0
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, tangents[0])
        a = [fwAD.unpack_dual(t).tangent for t in outputs(ours(dual, hx))]
        b = [fwAD.unpack_dual(t).tangent for t in outputs(theirs(dual, hx))]
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, **F64)


@pytest.mark.parametrize("mode", KINDS)
@pytest.mark.parametrize("track", [False, True])
def test_torch_func_transforms_match_torch_nn(mode, track):
    # grad, vjp and jacrev as torch.nn's cells; vmap (which torch.nn's LSTMCell lacks) and per-sample
    # gradients (vmap of grad) against a loop over the samples.
    ours, theirs = pair(mode, 3, 4, dtype=torch.float64, track=track)
    x = torch.randn(2, 3, dtype=torch.float64)

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    transforms = [
        lambda m: torch.func.grad(lambda x: first(m(x)).square().sum())(x),
        lambda m: torch.func.vjp(lambda x: first(m(x)), x)[1](torch.ones(2, 4, dtype=torch.float64))[0],
        lambda m: torch.func.jacrev(lambda x: outputs(m(x))[-1])(x),
    ]
    for transform in transforms:
        torch.testing.assert_close(transform(ours), transform(theirs), **F64)
    batched = torch.func.vmap(lambda x: first(ours(x)))(x[None].expand(3, 2, 3))
    torch.testing.assert_close(batched, first(theirs(x))[None].expand(3, 2, 4), **F64)

    def loss(params, sample):
        return first(torch.func.functional_call(ours, params, (sample[None],))).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(dict(ours.named_parameters()), x)
    for b in range(2):
        expected = torch.autograd.grad(first(theirs(x[b: b + 1])).square().sum(), list(theirs.parameters()))
        for name, e in zip(dict(ours.named_parameters()), expected, strict=True):
            torch.testing.assert_close(per_sample[name][b], e, **F64)


# ---------------------------------------------------------------------------------------------------
# Half precision and autocast on the CPU


@pytest.mark.parametrize("mode", KINDS)
@pytest.mark.parametrize("dtype, bound", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_half_precision_modules(mode, dtype, bound):
    ours, theirs = pair(mode, 8, 16)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x = torch.randn(5, 8, dtype=dtype, requires_grad=True)
    hx = state(mode, 5, 16, dtype)
    out_a, grads_a = run(ours, x, hx, [x, *ours.parameters()])
    out_b, grads_b = run(theirs, x, hx, [x, *theirs.parameters()])
    for a, b in zip(out_a + list(grads_a), out_b + list(grads_b), strict=True):
        assert a.dtype == b.dtype == dtype
        assert ((a.double() - b.double()).norm() / b.double().norm()).item() < bound


@pytest.mark.parametrize("mode", KINDS)
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_autocast_cpu_gives_torch_nn_dtypes(mode, input_dtype):
    ours, theirs = pair(mode, 8, 16)
    x = torch.randn(5, 8).to(input_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = outputs(ours(x)), outputs(theirs(x))
    for u, v in zip(a, b, strict=True):
        assert u.dtype == v.dtype
        assert ((u.double() - v.double()).norm() / v.double().norm()).item() < 2e-2


# ---------------------------------------------------------------------------------------------------
# Bad input: torch.nn's errors and messages


@pytest.mark.parametrize("lib", ["vgk", "torch"])
@pytest.mark.parametrize("mode", KINDS)
def test_shape_errors_are_torch_nn_errors(lib, mode):
    m = make(mode, 10, 20, lib=lib)
    lstm = mode == "lstm"

    def hx(*shape):
        return (torch.randn(*shape), torch.randn(*shape)) if lstm else torch.randn(*shape)

    with pytest.raises(RuntimeError, match="input has inconsistent input_size: got 11 expected 10"):
        m(torch.randn(3, 11), hx(3, 20))
    with pytest.raises(RuntimeError, match="hidden0 has inconsistent hidden_size: got 21, expected 20"):
        m(torch.randn(3, 10), hx(3, 21))
    with pytest.raises(RuntimeError, match="Input batch size 3 doesn't match hidden0 batch size 5"):
        m(torch.randn(3, 10), hx(5, 20))
    name = {"lstm": "LSTMCell", "gru": "GRUCell"}.get(mode, "RNNCell")
    with pytest.raises(ValueError, match=f"{name}: Expected input to be 1D or 2D, got 3D instead"):
        m(torch.randn(1, 3, 10))
    which = r"hx\[0\]" if lstm else "hidden"
    with pytest.raises(ValueError, match=f"Expected {which} to be 1D or 2D, got 4D instead"):
        m(torch.randn(3, 10), hx(3, 1, 1, 20))
    if lstm:
        with pytest.raises(RuntimeError, match="hidden1 has inconsistent hidden_size: got 21, expected 20"):
            m(torch.randn(3, 10), (torch.randn(3, 20), torch.randn(3, 21)))
        with pytest.raises(RuntimeError, match="Input batch size 3 doesn't match hidden1 batch size 1"):
            m(torch.randn(3, 10), (torch.randn(3, 20), torch.randn(1, 20)))
    with pytest.raises(RuntimeError):
        m(torch.randn(10), hx(3, 20))  # unbatched input, batched state


@pytest.mark.parametrize("mode", KINDS)
def test_dtype_mismatch_raises_naming_the_argument(mode):
    m = make(mode, 3, 4)
    with pytest.raises((TypeError, RuntimeError), match="dtype"):
        m(torch.randn(2, 3, dtype=torch.float64))
    h = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="hx.*dtype"):
        m(torch.randn(2, 3), (h, h) if mode == "lstm" else h)
    with pytest.raises(TypeError, match="input must be float32 or float64, got"):
        m(torch.ones(2, 3, dtype=torch.int64))


def test_bad_constructor_and_functional_arguments():
    with pytest.raises(ValueError, match="nonlinearity: expected 'tanh', 'relu' or 'sigmoid', got 'gelu'"):
        vgk.nn.RNNCell(3, 4, nonlinearity="gelu")
    with pytest.raises(ValueError, match="backend"):
        vgk.nn.GRUCell(3, 4, backend="cuda")
    cell = vgk.nn.RNNCell(3, 4)
    cell.nonlinearity = "gelu"  # as torch.nn: found at call time
    with pytest.raises(RuntimeError, match="Unknown nonlinearity: gelu"):
        cell(torch.randn(2, 3))
    w_ih, w_hh = torch.randn(4, 3), torch.randn(4, 4)
    with pytest.raises(ValueError, match="mode"):
        vgk.ops.cell(torch.randn(2, 3), None, w_ih, w_hh, mode="lstmcell")
    with pytest.raises(TypeError, match=r"tuple \(h, c\)"):
        vgk.ops.cell(torch.randn(2, 3), torch.randn(2, 1), torch.randn(4, 3), torch.randn(4, 1), mode="lstm")
    with pytest.raises(ValueError, match="both or neither"):
        vgk.ops.cell(torch.randn(2, 3), None, w_ih, w_hh, torch.randn(4), mode="rnn_tanh")
    with pytest.raises(TypeError, match="input"):
        vgk.ops.cell(torch.randn(2, 3, 1), None, w_ih, w_hh, mode="rnn_tanh")


def test_backend_choice(monkeypatch):
    x = torch.randn(2, 3, dtype=torch.float64)
    cell = vgk.nn.GRUCell(3, 4, dtype=torch.float64)
    expected = cell(x)
    monkeypatch.setenv("VGK_BACKEND", "reference")
    torch.testing.assert_close(cell(x), expected, **F64)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET|CPU"):
        monkeypatch.delenv("TRITON_INTERPRET")
        monkeypatch.setenv("VGK_BACKEND", "triton")
        vgk.nn.GRUCell(3, 4)(x.float())


# ---------------------------------------------------------------------------------------------------
# Traces


def traced(mode, backend, x, hx, params, loss_weight=None):
    """A tracked call of ``vgk.ops.cell``, its outputs, and backward of a weighted loss."""
    h, c, trace = vgk.ops.cell(x, hx, *params, mode=mode, track=True, backend=backend)
    weighted_loss((h, c) if c is not None else h).backward()
    return trace


def cell_params(mode, I, H, dtype=torch.float64, bias=True):
    G = {"lstm": 4, "gru": 3}.get(mode, 1)
    w = [torch.randn(G * H, I, dtype=dtype), 0.6 * torch.randn(G * H, H, dtype=dtype)]
    b = [0.5 * torch.randn(G * H, dtype=dtype) for _ in range(2)] if bias else [None, None]
    return [t if t is None else t.requires_grad_() for t in w + b]


FIELDS = ["jacobian_norm_per_sample", "jacobian_norm", "grad_norm_per_sample", "grad_norm",
          "cell_grad_norm_per_sample", "cell_grad_norm", "output_grad_norm_per_sample", "output_grad_norm",
          "output_cell_grad_norm_per_sample", "output_cell_grad_norm"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trace_matches_reference_backend(mode, with_state, dtype):
    B, I, H = 5, 3, 37
    params = cell_params(mode, I, H, dtype)
    x = torch.randn(B, I, dtype=dtype)
    hx = state(mode, B, H, dtype) if with_state else None
    a, b = traced(mode, "cpp", x, hx, params), traced(mode, "reference", x, hx, params)
    assert isinstance(a, CellTrace) and a.batch_size == B
    for field in FIELDS:
        u, v = getattr(a, field), getattr(b, field)
        if field.startswith(("cell", "output_cell")) and mode != "lstm":
            assert u is None and v is None
            continue
        assert u.dtype == torch.float32 and u.shape == v.shape == ((B,) if field.endswith("sample") else ())
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
        assert (u > 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_jacobian_norm_against_autograd_jacobian(mode):
    B, I, H = 3, 2, 5
    params = [p.detach() for p in cell_params(mode, I, H)]
    x = torch.randn(B, I, dtype=torch.float64)
    hx = state(mode, B, H, torch.float64, requires_grad=False)
    _, _, trace = vgk.ops.cell(x, hx, *params, mode=mode, track=True, backend="cpp")
    lstm = mode == "lstm"
    for b in range(B):
        s0 = torch.cat(hx, dim=1)[b] if lstm else hx[b]

        def step(s, b=b):
            h = s[None, :H]
            c = s[None, H:] if lstm else None
            h1, c1 = reference.cell_forward(mode, x[b: b + 1], h, c, *params)
            return torch.cat([h1[0], c1[0]]) if lstm else h1[0]

        jac = torch.autograd.functional.jacobian(step, s0)
        assert jac.shape == (s0.numel(), s0.numel())
        torch.testing.assert_close(trace.jacobian_norm_per_sample[b].double(), jac.norm(), rtol=1e-6, atol=0)
    torch.testing.assert_close(trace.jacobian_norm, trace.jacobian_norm_per_sample.mean())


@pytest.mark.parametrize("mode", MODES)
def test_gradient_norms_against_autograd(mode):
    # Input states: the gradient autograd gives hx. Output states: h' as returned (retain_grad), and
    # for the LSTM's c' the total derivative, the path through h' = o * tanh(c') included.
    B, I, H = 4, 3, 6
    params = cell_params(mode, I, H)
    x = torch.randn(B, I, dtype=torch.float64)
    hx = state(mode, B, H, torch.float64)
    h, c, trace = vgk.ops.cell(x, hx, *params, mode=mode, track=True, backend="cpp")
    outs = [h] + ([c] if c is not None else [])
    for t in outs:
        t.retain_grad()
    weighted_loss(tuple(outs) if c is not None else h).backward()
    states = list(hx) if mode == "lstm" else [hx]
    def close(field, expected):
        torch.testing.assert_close(getattr(trace, field).double(), expected, rtol=1e-6, atol=0)

    close("grad_norm_per_sample", states[0].grad.norm(dim=1))
    close("grad_norm", states[0].grad.norm())
    close("output_grad_norm_per_sample", h.grad.norm(dim=1))
    if mode == "lstm":
        close("cell_grad_norm_per_sample", states[1].grad.norm(dim=1))
        o = torch.sigmoid((x @ params[0].t() + params[2] + hx[0] @ params[1].t() + params[3])[:, 3 * H:])
        total = c.grad + h.grad * o * (1 - torch.tanh(c) ** 2)
        close("output_cell_grad_norm_per_sample", total.norm(dim=1))


def test_trace_lifecycle_no_grad_and_repr():
    cell = vgk.nn.LSTMCell(3, 4, track=True)
    with torch.no_grad():
        cell(torch.randn(2, 3))
    assert cell.trace.grad_norm is None and cell.trace.jacobian_norm_per_sample.shape == (2,)
    assert "forward only" in repr(cell.trace)
    h, c = cell(torch.randn(3))  # unbatched: B = 1
    trace = cell.trace
    assert trace.batch_size == 1 and trace.grad_norm is None
    (h.sum() + c.sum()).backward()
    assert trace.grad_norm > 0 and "with gradients" in repr(trace)
    cell.track = False
    cell(torch.randn(2, 3))
    assert cell.trace is trace  # an untracked call leaves the last trace


def test_module_with_trace_pickles_deepcopies_and_loads_weights_only():
    cell = vgk.nn.GRUCell(3, 4, track=True)
    x = torch.randn(2, 3)
    cell(x).sum().backward()
    expected = cell.trace.grad_norm_per_sample
    buffer = io.BytesIO()
    torch.save(cell, buffer)
    buffer.seek(0)
    copies = [pickle.loads(pickle.dumps(cell)), copy.deepcopy(cell), torch.load(buffer)]  # weights_only=True
    for other in copies:
        assert type(other) is vgk.nn.GRUCell
        torch.testing.assert_close(other.trace.grad_norm_per_sample, expected)
        torch.testing.assert_close(other(x), cell(x))


def test_track_context_covers_cells_and_layers():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = vgk.nn.GRU(3, 5)
            self.decoder = vgk.nn.LSTMCell(3, 5)
            self.plain = torch.nn.Linear(5, 1)

        def forward(self, x):
            _, h = self.encoder(x)
            state = (h[0], torch.zeros_like(h[0]))
            for t in range(x.shape[0]):
                state = self.decoder(x[t], state)
            return self.plain(state[0]).sum()

    model = Model()
    with vgk.track(model) as traces:
        model(torch.randn(4, 2, 3)).backward()
    assert set(traces) == {"encoder", "decoder"}
    assert isinstance(traces["decoder"], CellTrace) and traces["decoder"].grad_norm > 0
    assert model.decoder.track is False and model.encoder.track is False
    with pytest.raises(ValueError, match="their cells"):
        with vgk.track(torch.nn.Linear(2, 2)):
            pass


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_cell_loop_trace_equals_layer_trace(mode):
    # Unrolled by hand, a cell's per-call norms are the layer's per-step ones: the Jacobian norm of
    # each step, and the gradient reaching each output state (‖∂loss/∂h_t‖, ‖∂loss/∂c_t‖).
    T, B, I, H = 5, 3, 2, 4
    layer = {"lstm": vgk.nn.LSTM, "gru": vgk.nn.GRU}[mode](I, H, track=True, dtype=torch.float64)
    cell = make(mode, I, H, track=True, dtype=torch.float64)
    cell.load_state_dict({k[:-3]: v for k, v in layer.state_dict().items()})
    x = torch.randn(T, B, I, dtype=torch.float64)
    weight = torch.randn(T, B, H, dtype=torch.float64)
    out, _ = layer(x)
    (out * weight).sum().backward()
    state, traces, loss = None, [], 0
    for t in range(T):
        state = cell(x[t], state)
        traces.append(cell.trace)
        loss = loss + ((state[0] if mode == "lstm" else state) * weight[t]).sum()
    loss.backward()
    torch.testing.assert_close(torch.stack([tr.output_grad_norm for tr in traces]), layer.trace.grad_norm[0],
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.stack([tr.jacobian_norm_per_sample for tr in traces]),
                               layer.trace.jacobian_norm_per_sample[0], rtol=1e-6, atol=0)
    if mode == "lstm":
        torch.testing.assert_close(torch.stack([tr.output_cell_grad_norm for tr in traces]),
                                   layer.trace.cell_grad_norm[0], rtol=1e-6, atol=0)
    # The gradient reaching call t's input state is the recurrent part of ‖∂loss/∂h_(t-1)‖.
    assert all(traces[t].grad_norm > 0 for t in range(T))


# ---------------------------------------------------------------------------------------------------
# torch.library and torch.compile


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("full", [True, False])
def test_opcheck(mode, full):
    G = {"lstm": 4, "gru": 3}.get(mode, 1)
    B, I, H = 3, 4, 5
    d = torch.float64

    def t(*shape):
        return torch.randn(*shape, dtype=d, requires_grad=True)

    lstm = mode == "lstm"
    if full:
        K = 2 if lstm else 1
        args = (t(B, I), t(B, H), t(B, H) if lstm else None, t(G * H, I), t(G * H, H), t(G * H), t(G * H),
                torch.zeros(2, K, B, dtype=d, requires_grad=True), mode, True)
    else:
        args = (t(B, I), None, None, t(G * H, I), t(G * H, H), None, None, None, mode, False)
    torch.library.opcheck(torch.ops.vgk.cell_forward.default, args)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    h, c, ws, _ = torch.ops.vgk.cell_forward(*detached)
    grad_c = torch.randn_like(c) if lstm else h.new_empty(0)
    bwd = (torch.randn_like(h), grad_c, *detached[:5], h, c, ws, mode, full, full, True, True, True)
    torch.library.opcheck(torch.ops.vgk.cell_backward.default, bwd)


class Decoder(torch.nn.Module):
    """Cells called once per step in a Python loop, as a decoder does."""

    def __init__(self, track=False):
        super().__init__()
        self.lstm = vgk.nn.LSTMCell(3, 6, backend="cpp", track=track)
        self.gru = vgk.nn.GRUCell(6, 5, backend="cpp")
        self.rnn = vgk.nn.RNNCell(5, 4, nonlinearity="sigmoid", backend="cpp")
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        state, g, r, outs = None, None, None, []
        for t in range(x.shape[0]):
            state = self.lstm(x[t], state)
            g = self.gru(state[0], g)
            r = self.rnn(g, r)
            outs.append(self.head(r))
        return torch.stack(outs)


def test_compile_fullgraph_cell_loop_has_no_graph_breaks_and_matches_eager():
    torch._dynamo.reset()
    model = Decoder()
    x = torch.randn(4, 2, 3)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    eager = model(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), list(model.parameters()))
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-4)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_compile_inductor_runs():
    torch._dynamo.reset()
    model = Decoder()
    x = torch.randn(3, 2, 3)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), atol=1e-5, rtol=1e-4)


def test_compile_tracked_forward_under_no_grad_and_tracked_backward_raises():
    torch._dynamo.reset()
    model = Decoder(track=True)
    x = torch.randn(3, 2, 3)
    with torch.no_grad():
        model(x)
        eager = model.lstm.trace.jacobian_norm_per_sample.clone()
        model.lstm.trace = None
        torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(model.lstm.trace.jacobian_norm_per_sample, eager, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="tracking a cell's gradients is not supported inside torch.compile"):
        torch.compile(model, fullgraph=True, backend="aot_eager")(x)


# ---------------------------------------------------------------------------------------------------
# Parametrizations


@pytest.mark.parametrize("mode", KINDS)
def test_weight_norm_parametrization(mode):
    ours, theirs = pair(mode, 3, 4, dtype=torch.float64)
    for m in (ours, theirs):
        torch.nn.utils.parametrizations.weight_norm(m, "weight_hh")
    x = torch.randn(2, 3, dtype=torch.float64)
    hx = state(mode, 2, 4, torch.float64, requires_grad=False)
    out_a, grads_a = run(ours, x, hx, list(ours.parameters()))
    out_b, grads_b = run(theirs, x, hx, list(theirs.parameters()))
    for a, b in zip(out_a + list(grads_a), out_b + list(grads_b), strict=True):
        torch.testing.assert_close(a, b, **F64)
