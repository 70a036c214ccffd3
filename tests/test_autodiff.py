"""Higher-order and forward-mode autodiff through every op: create_graph (double backward), the torch.func
transforms and torch.autograd.forward_ad.

Oracles: torch.autograd.gradgradcheck (second derivatives against finite differences of the first-order
backward, which for grad_clip is the clipped backward of the kernels); torch.nn's modules and
F.layer_norm for Hessian-vector products, tangents, Jacobians and Hessians; central finite differences
for what torch has no twin of (the sigmoid RNN, layer-normalized cells, the clip functions).

Tolerances: float64 everywhere. gradgradcheck / gradcheck with torch's defaults (eps 1e-6, atol 1e-5,
rtol 1e-3); against torch.nn and F.layer_norm rtol 1e-7, atol 1e-9 (the same math, summed in another
order); against central differences (step 1e-6) rtol 1e-5, atol 1e-7.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap
from torch.nn.utils.rnn import pack_sequence

import vgkernels as vgk
import vgkernels.reference.recurrent as reference_recurrent
from vgkernels.ops.grad_stats import grad_stats
from vgkernels.ops.layer_norm import layer_norm
from vgkernels.ops.recurrent import GATES, layer_norm_names, recurrent, weight_names

D = torch.float64
EXACT = dict(rtol=1e-7, atol=1e-9)  # against torch.nn / F.layer_norm
FD = dict(rtol=1e-5, atol=1e-7)  # against central differences
MODES = ["lstm", "gru", "rnn_tanh", "rnn_relu", "rnn_sigmoid"]
REFUSED = "grad_clip: create_graph=True .* through a layer with a gradient clip"
TORCH_TWIN = {"lstm": (vgk.nn.LSTM, torch.nn.LSTM, {}), "gru": (vgk.nn.GRU, torch.nn.GRU, {}),
              "rnn_tanh": (vgk.nn.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
              "rnn_relu": (vgk.nn.RNN, torch.nn.RNN, {"nonlinearity": "relu"})}


def central_difference(f, x, v, eps=1e-6):
    """(f(x + eps v) - f(x - eps v)) / 2 eps, for f returning a tensor."""
    with torch.no_grad():
        return (f(x + eps * v) - f(x - eps * v)) / (2 * eps)


# ---------------------------------------------------------------------------------------------------
# The functional recurrent op: second derivatives of every mode, clip, lengths, direction, depth and LN


def recurrent_inputs(mode, T, B, I, H, num_layers, bidirectional, layer_norm_cells, seed=0):
    """(x, h0, c0 or None, weights, layer-norm weights or None), float64 leaves that require grad."""
    gen = torch.Generator().manual_seed(seed)
    nd = 2 if bidirectional else 1
    G = GATES[mode]

    def leaf(*shape, scale=0.5, shift=0.0):
        return (shift + scale * torch.randn(*shape, generator=gen, dtype=D)).requires_grad_()

    weights = []
    for name in weight_names(num_layers, nd, True):
        layer = int(name.split("_l")[1].split("_")[0])
        fan_in = I if layer == 0 else H * nd
        weights.append(leaf(*{"weight_ih": (G * H, fan_in), "weight_hh": (G * H, H)}.get(name[:9], (G * H,))))
    ln = None
    if layer_norm_cells:
        ln = [leaf(H if "_cell_" in name else G * H, scale=0.3, shift=1.0 if "weight" in name else 0.0)
              for name in layer_norm_names(mode, num_layers, nd)]
    c0 = leaf(num_layers * nd, B, H) if mode == "lstm" else None
    return leaf(T, B, I, scale=1.0), leaf(num_layers * nd, B, H), c0, weights, ln


def recurrent_function(mode, H, num_layers, bidirectional, lengths, grad_clip, has_c0, n_weights, backend,
                       track=False):
    """f(x, h0[, c0], *weights, *ln_weights) -> (output, h_n[, c_n]) for gradcheck."""

    def f(x, h0, *rest):
        c0, rest = (rest[0], rest[1:]) if has_c0 else (None, rest)
        weights, ln = list(rest[:n_weights]), list(rest[n_weights:]) or None
        out, h_n, c_n, _ = recurrent(x, h0 if c0 is None else (h0, c0), weights, mode=mode, hidden_size=H,
                                     num_layers=num_layers, bidirectional=bidirectional, lengths=lengths,
                                     grad_clip=grad_clip, layer_norm_weights=ln, track=track, backend=backend)
        return (out, h_n) if c_n is None else (out, h_n, c_n)

    return f


# (mode, lengths, bidirectional, num_layers, layer-normalized cells)
# Few layer-normalized cases: the recomputation calls F.layer_norm per step, which is slow on a loaded
# machine (it opens an OpenMP region even for two rows).
CPP_CASES = [(mode, None, False, 1, False) for mode in MODES] + [
    (mode, [3, 1], True, 1, False) for mode in MODES] + [
    (mode, [2, 3], False, 2, False) for mode in MODES] + [
    ("lstm", [3, 1], False, 1, True), ("gru", None, True, 1, True),
]
TRITON_CASES = [("lstm", [3, 1], True, 1, False), ("gru", None, False, 2, False),
                ("rnn_tanh", [2, 3], False, 2, False), ("rnn_relu", None, True, 1, False),
                ("rnn_sigmoid", [3, 2], False, 1, False), ("gru", [2, 3], False, 1, True)]


def _gradgradcheck_recurrent(backend, mode, lengths, bidirectional, num_layers, ln_cells):
    T, B, I, H = 3, 2, 2, 2
    x, h0, c0, weights, ln = recurrent_inputs(mode, T, B, I, H, num_layers, bidirectional, ln_cells)
    lens = None if lengths is None else torch.tensor(lengths)
    f = recurrent_function(mode, H, num_layers, bidirectional, lens, None, c0 is not None, len(weights),
                           backend)
    inputs = (x, h0) + ((c0,) if c0 is not None else ()) + tuple(weights) + tuple(ln or ())
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("case", CPP_CASES, ids=str)
def test_gradgradcheck_cpp(case):
    _gradgradcheck_recurrent("cpp", *case)


@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_gradgradcheck_triton(case):
    _gradgradcheck_recurrent("triton", *case)


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
def test_gradgradcheck_reference_backend(mode):
    _gradgradcheck_recurrent("reference", mode, [3, 1], True, 2, False)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_relu"])
@pytest.mark.parametrize("layer_norm_cells", [False, True])
def test_create_graph_through_grad_clip_raises_before_returning(backend, mode, layer_norm_cells):
    if layer_norm_cells and mode == "rnn_relu":
        return  # layer-normalized cells are LSTM and GRU only
    x, h0, c0, weights, ln = recurrent_inputs(mode, 3, 2, 2, 2, 1, False, layer_norm_cells)
    f = recurrent_function(mode, 2, 1, False, None, 0.1, c0 is not None, len(weights), backend)
    args = (x, h0, *(() if c0 is None else (c0,)), *weights, *(ln or ()))
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.autograd.grad(f(*args)[0].sin().sum(), x, create_graph=True)
    (first_order,) = torch.autograd.grad(f(*args)[0].sin().sum(), x)  # the first order still works
    assert first_order.shape == x.shape


# ---------------------------------------------------------------------------------------------------
# Modules: Hessian-vector products against torch.nn, and traces under create_graph


def module_pair(mode, backend, **kwargs):
    ours_cls, theirs_cls, extra = TORCH_TWIN[mode]
    ours = ours_cls(3, 4, backend=backend, dtype=D, **extra, **kwargs)
    theirs = theirs_cls(3, 4, dtype=D, **extra, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def hvp(model, x, vector):
    """Hessian-vector product of a scalar loss w.r.t. the parameters and the input, by double backward."""
    params = list(model.parameters())
    out, _ = model(x)
    data = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    loss = (data.sin() * torch.arange(data.numel(), dtype=D).reshape(data.shape).cos()).sum()
    inputs = params + [x.data if isinstance(x, torch.nn.utils.rnn.PackedSequence) else x]
    first = torch.autograd.grad(loss, inputs, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(first, vector, strict=True))
    return torch.autograd.grad(dot, inputs)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("mode", list(TORCH_TWIN))
@pytest.mark.parametrize("packed", [False, True])
def test_hessian_vector_product_matches_torch_nn(backend, mode, packed):
    ours, theirs = module_pair(mode, backend, num_layers=2, bidirectional=True)
    if packed:
        seqs = [torch.randn(n, 3, dtype=D) for n in (4, 2, 3)]
        x = pack_sequence(seqs, enforce_sorted=False)
        x.data.requires_grad_()
    else:
        x = torch.randn(4, 3, 3, dtype=D, requires_grad=True)
    xdata = x.data if packed else x
    vector = [torch.randn_like(p) for p in ours.parameters()] + [torch.randn_like(xdata)]
    for got, want in zip(hvp(ours, x, vector), hvp(theirs, x, vector), strict=True):
        torch.testing.assert_close(got, want, **EXACT)


@pytest.mark.parametrize("packed", [False, True])
def test_hessian_vector_product_with_projection_matches_torch_nn(packed):
    ours, theirs = module_pair("lstm", "cpp", num_layers=2, bidirectional=True, proj_size=2)
    if packed:
        x = pack_sequence([torch.randn(n, 3, dtype=D) for n in (4, 2, 3)], enforce_sorted=False)
        x.data.requires_grad_()
    else:
        x = torch.randn(4, 3, 3, dtype=D, requires_grad=True)
    xdata = x.data if packed else x
    vector = [torch.randn_like(p) for p in ours.parameters()] + [torch.randn_like(xdata)]
    for got, want in zip(hvp(ours, x, vector), hvp(theirs, x, vector), strict=True):
        torch.testing.assert_close(got, want, **EXACT)


@pytest.mark.parametrize("proj_size", [0, 2])
def test_tracked_create_graph_on_packed_input_fills_the_trace_as_a_first_order_backward(proj_size):
    ours, _ = module_pair("lstm", "cpp", num_layers=2, bidirectional=True, proj_size=proj_size)
    ours.track = True
    seqs = [torch.randn(n, 3, dtype=D) for n in (4, 2, 3)]
    traces = []
    for create_graph in (False, True):
        x = pack_sequence(seqs, enforce_sorted=False)
        ours(x)[0].data.pow(2).sum().backward(create_graph=create_graph)
        traces.append(ours.trace)
    first_order, tracked = traces
    torch.testing.assert_close(tracked.grad_norm_per_sample, first_order.grad_norm_per_sample, **EXACT)
    torch.testing.assert_close(tracked.cell_grad_norm, first_order.cell_grad_norm, **EXACT)
    assert first_order.grad_norm.gt(0).any()


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
def test_tracked_create_graph_fills_the_trace_as_a_first_order_backward(mode):
    ours, _ = module_pair(mode, "cpp", num_layers=2, bidirectional=True)
    ours.track = True
    x = torch.randn(5, 2, 3, dtype=D, requires_grad=True)
    ours(x)[0].pow(2).sum().backward()
    first_order = ours.trace
    x.grad = None
    ours(x)[0].pow(2).sum().backward(create_graph=True)  # the probe fills on backward(), as without it
    tracked = ours.trace
    torch.testing.assert_close(tracked.grad_norm_per_sample, first_order.grad_norm_per_sample, **EXACT)
    if mode == "lstm":
        torch.testing.assert_close(tracked.cell_grad_norm, first_order.cell_grad_norm, **EXACT)
    # the second derivative through the tracked layers is torch.nn's
    _, theirs = module_pair(mode, "cpp", num_layers=2, bidirectional=True)
    theirs.load_state_dict(ours.state_dict())
    x2 = x.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(theirs(x2)[0].pow(2).sum(), x2, create_graph=True)
    want = torch.autograd.grad(g.square().sum(), list(theirs.parameters()))
    got = torch.autograd.grad(x.grad.square().sum(), list(ours.parameters()))
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, **EXACT)


def test_first_order_backward_runs_the_kernels_not_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(reference_recurrent, "layer_forward",
                        lambda *a, **k: calls.append(1) or pytest.fail("reference ran"))
    models = (vgk.nn.LSTM(3, 4, backend="cpp", track=True), vgk.nn.GRU(3, 4, backend="cpp", layer_norm=True))
    for model in models:
        x = torch.randn(5, 2, 3, requires_grad=True)
        model(x)[0].sum().backward()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager") if not model.track else None
        if compiled is not None:
            compiled(x)[0].sum().backward()
    assert not calls


@pytest.mark.parametrize("backend,layer_norm_cells", [("triton", False), ("triton", True), ("cpp", True)])
def test_layer_op_keeps_no_copy_of_the_input_projection(backend, layer_norm_cells):
    """The create_graph recompute needs the layer op's input projection; the op saves the tensors it was
    computed from, which autograd keeps anyway (x and W_ih; x W_ih^T before the LayerNorm), not itself."""
    T, B, H = 5, 2, 4
    model = vgk.nn.GRU(3, H, backend=backend, layer_norm=layer_norm_cells)
    storages = set()

    def pack(t):
        if tuple(t.shape) == (T, B, 3 * H):
            storages.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(T, B, 3, requires_grad=True))
    assert len(storages) == (1 if layer_norm_cells else 0)  # x W_ih^T, saved by the LayerNorm


# ---------------------------------------------------------------------------------------------------
# LayerNorm


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("affine", ["weight_bias", "weight", "none"])
def test_layer_norm_gradgradcheck(backend, affine):
    x = torch.randn(3, 2, 5, dtype=D, requires_grad=True)
    w = torch.randn(2, 5, dtype=D, requires_grad=True) if affine != "none" else None
    b = torch.randn(2, 5, dtype=D, requires_grad=True) if affine == "weight_bias" else None
    inputs = [t for t in (x, w, b) if t is not None]

    def f(*args):
        it = iter(args)
        x_ = next(it)
        w_ = next(it) if w is not None else None
        b_ = next(it) if b is not None else None
        return layer_norm(x_, (2, 5), w_, b_, backend=backend)

    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_layer_norm_create_graph_through_grad_clip_raises_before_returning(backend):
    x = torch.randn(3, 5, dtype=D, requires_grad=True)
    w = torch.randn(5, dtype=D, requires_grad=True)
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.autograd.grad(layer_norm(x, 5, w, grad_clip=0.1, backend=backend).sin().sum(), x,
                            create_graph=True)
    (first_order,) = torch.autograd.grad(layer_norm(x, 5, w, grad_clip=0.1, backend=backend).sum(), x)
    assert first_order.shape == x.shape


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_layer_norm_hessian_vector_product_matches_torch(backend):
    x = torch.randn(4, 7, dtype=D, requires_grad=True)
    w = torch.randn(7, dtype=D, requires_grad=True)
    b = torch.randn(7, dtype=D, requires_grad=True)
    v = [torch.randn_like(t) for t in (x, w, b)]

    def product(fn):
        first = torch.autograd.grad(fn(x, (7,), w, b).tanh().sum(), (x, w, b), create_graph=True)
        return torch.autograd.grad(sum((g * u).sum() for g, u in zip(first, v, strict=True)), (x, w, b))

    got = product(lambda *a: layer_norm(*a, backend=backend))
    for a, e in zip(got, product(F.layer_norm), strict=True):
        torch.testing.assert_close(a, e, **EXACT)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_layer_norm_third_derivative(backend):
    """gradgradcheck of the create_graph gradient checks the third derivative. (Not against torch: in
    torch 2.13 F.layer_norm fails this same check.)"""
    x = torch.randn(3, 5, dtype=D, requires_grad=True)
    w = torch.randn(5, dtype=D, requires_grad=True)

    def first_order(x, w):
        (g,) = torch.autograd.grad(layer_norm(x, 5, w, backend=backend).pow(3).sum(), x, create_graph=True)
        return g

    assert torch.autograd.gradgradcheck(first_order, (x, w))


@pytest.mark.parametrize("fn", ["recurrent", "layer_norm"])
def test_nested_reverse_transforms_with_clip_refuse(fn):
    if fn == "layer_norm":
        def f(x):
            return layer_norm(x, 5, grad_clip=0.1, backend="cpp").sin().sum()
        x = torch.randn(3, 5, dtype=D)
    else:
        model = vgk.nn.GRU(3, 4, backend="cpp", dtype=D, grad_clip=0.1)

        def f(x):
            return model(x)[0].sin().sum()
        x = torch.randn(4, 2, 3, dtype=D)
    with pytest.raises(RuntimeError, match="a reverse-mode derivative of a reverse-mode derivative"):
        grad(lambda x: grad(f)(x).sum())(x)
    # Forward over reverse is allowed and exact: the Jacobian of the clipped gradient itself.
    v = torch.randn_like(x)
    hv = (hessian(f)(x) * v).sum(tuple(range(x.dim(), 2 * x.dim())))
    torch.testing.assert_close(hv, central_difference(grad(f), x, v), **FD)


# ---------------------------------------------------------------------------------------------------
# Forward mode and torch.func over the recurrent modules


def functional(model, batch_first=False):
    """(params dict, f(params, x, hx) -> flat tuple of outputs) for the torch.func transforms."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, x, hx=None):
        out, state = functional_call(model, p, (x, hx) if hx is not None else (x,))
        states = state if isinstance(state, tuple) else (state,)
        return (out,) + states

    return params, f


CONFIGS = [dict(), dict(num_layers=2, bidirectional=True), dict(batch_first=True, bias=False)]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("mode", list(TORCH_TWIN))
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_jvp_matches_torch_nn(backend, mode, config):
    ours, theirs = module_pair(mode, backend, **config)
    x = torch.randn((2, 5, 3) if config.get("batch_first") else (5, 2, 3), dtype=D)
    nd = 2 if config.get("bidirectional") else 1
    h = torch.randn(config.get("num_layers", 1) * nd, 2, 4, dtype=D)
    hx = (h, h.cos()) if mode == "lstm" else h
    hx_t = tuple(torch.randn_like(t) for t in hx) if mode == "lstm" else torch.randn_like(h)
    params, f = functional(ours)
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    x_t = torch.randn_like(x)
    got = jvp(f, (params, x, hx), (tangents, x_t, hx_t))
    params_t, g = functional(theirs)
    want = jvp(g, (params_t, x, hx), (tangents, x_t, hx_t))
    for a, e in zip(got[1], want[1], strict=True):
        assert e.abs().max() > 0
        torch.testing.assert_close(a, e, **EXACT)
    for a, e in zip(got[0], want[0], strict=True):
        torch.testing.assert_close(a, e, **EXACT)


@pytest.mark.parametrize("mode", list(TORCH_TWIN))
def test_forward_ad_dual_level_matches_torch_nn_and_finite_differences(mode):
    """Dual input and dual recurrent weight. (torch's pack_sequence has no forward-mode rule, so packed
    input cannot carry a tangent in torch at all.)"""
    ours, theirs = module_pair(mode, "cpp", bidirectional=True, num_layers=2)
    x, x_t = torch.randn(4, 3, 3, dtype=D), torch.randn(4, 3, 3, dtype=D)
    w_t = torch.randn_like(ours.weight_hh_l0)

    def output(model, x, w):
        params = {k: v.detach() for k, v in model.named_parameters()}
        params["weight_hh_l0"] = w
        return functional_call(model, params, (x,))[0]

    def tangent_of(model):
        with fwAD.dual_level():
            out = output(model, fwAD.make_dual(x, x_t), fwAD.make_dual(model.weight_hh_l0.detach(), w_t))
            return fwAD.unpack_dual(out).tangent

    got = tangent_of(ours)
    torch.testing.assert_close(got, tangent_of(theirs), **EXACT)
    flat = torch.cat([x.reshape(-1), ours.weight_hh_l0.detach().reshape(-1)])
    direction = torch.cat([x_t.reshape(-1), w_t.reshape(-1)])
    split = x.numel()
    expected = central_difference(
        lambda s: output(ours, s[:split].reshape(x.shape), s[split:].reshape(w_t.shape)), flat, direction)
    torch.testing.assert_close(got, expected, **FD)


@pytest.mark.parametrize("mode", ["rnn_sigmoid", "lstm_ln", "gru_ln"])
def test_jvp_without_torch_twin_matches_finite_differences(mode):
    if mode == "rnn_sigmoid":
        model = vgk.nn.RNN(3, 4, nonlinearity="sigmoid", bidirectional=True, backend="cpp", dtype=D)
    else:
        cls = vgk.nn.LSTM if mode.startswith("lstm") else vgk.nn.GRU
        model = cls(3, 4, layer_norm=True, num_layers=2, backend="cpp", dtype=D)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith("layer_norm"):
                    p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(5, 2, 3, dtype=D)
    v = torch.randn_like(x)
    _, tangent = jvp(lambda x: model(x)[0], (x,), (v,))
    torch.testing.assert_close(tangent, central_difference(lambda x: model(x)[0], x, v), **FD)


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_relu"])
def test_func_transforms_match_torch_nn(mode):
    """jacfwd, jacrev, grad, hessian and vmap of the modules. torch.nn's GRU and LSTM have no batching
    rule (vmap, jacfwd and jacrev raise there), so the oracle is torch.autograd.functional, which loops."""
    ours, theirs = module_pair(mode, "cpp", bidirectional=True)
    x = torch.randn(3, 1, 3, dtype=D)
    jacobian = torch.autograd.functional.jacobian(lambda x: theirs(x)[0], x)
    for transform in (jacfwd, jacrev):
        torch.testing.assert_close(transform(lambda x: ours(x)[0])(x), jacobian, **EXACT)
    torch.testing.assert_close(grad(lambda x: ours(x)[0].sin().sum())(x),
                               torch.autograd.grad(theirs(x.requires_grad_())[0].sin().sum(), x)[0], **EXACT)
    x = x.detach()
    want = torch.autograd.functional.hessian(lambda x: theirs(x)[0].sin().sum(), x)
    torch.testing.assert_close(hessian(lambda x: ours(x)[0].sin().sum())(x), want, **EXACT)
    batch = torch.randn(4, 3, 2, 3, dtype=D)
    torch.testing.assert_close(vmap(lambda x: ours(x)[0])(batch), torch.stack([theirs(b)[0] for b in batch]),
                               **EXACT)
    params, f = functional(ours)
    got = grad(lambda p: f(p, x)[0].square().sum())(params)
    want = torch.autograd.grad(theirs(x)[0].square().sum(), list(theirs.parameters()))
    for (name, _), w in zip(theirs.named_parameters(), want, strict=True):
        torch.testing.assert_close(got[name], w, **EXACT)


def test_torch_compile_around_the_transforms():
    ours, theirs = module_pair("gru", "cpp")
    x, v = torch.randn(5, 2, 3, dtype=D), torch.randn(5, 2, 3, dtype=D)
    torch._dynamo.reset()
    tangent = torch.compile(lambda x, v: jvp(lambda x: ours(x)[0], (x,), (v,))[1], backend="aot_eager",
                            fullgraph=True)(x, v)
    torch.testing.assert_close(tangent, jvp(lambda x: theirs(x)[0], (x,), (v,))[1], **EXACT)
    torch._dynamo.reset()
    gradient = torch.compile(lambda x: grad(lambda x: ours(x)[0].sin().sum())(x), backend="aot_eager")(x)
    torch.testing.assert_close(gradient, grad(lambda x: theirs(x)[0].sin().sum())(x), **EXACT)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_grad_clip_under_torch_func(mode):
    """Tangents are the exact derivative (the clip changes the reverse pass only); torch.func.grad clips
    as the kernels' backward does."""
    clipped = (vgk.nn.LSTM if mode == "lstm" else vgk.nn.GRU)(3, 4, backend="cpp", dtype=D, grad_clip=0.02)
    plain = (vgk.nn.LSTM if mode == "lstm" else vgk.nn.GRU)(3, 4, backend="cpp", dtype=D)
    plain.load_state_dict(clipped.state_dict())
    x = torch.randn(6, 2, 3, dtype=D) * 3
    v = torch.randn_like(x)
    torch.testing.assert_close(jvp(lambda x: clipped(x)[0], (x,), (v,))[1],
                               jvp(lambda x: plain(x)[0], (x,), (v,))[1], **EXACT)
    x_leaf = x.clone().requires_grad_()
    kernel = torch.autograd.grad((clipped(x_leaf)[0] * 10).sum(), x_leaf)[0]
    functorch = grad(lambda x: (clipped(x)[0] * 10).sum())(x)
    unclipped = grad(lambda x: (plain(x)[0] * 10).sum())(x)
    torch.testing.assert_close(functorch, kernel, **EXACT)
    assert not torch.allclose(functorch, unclipped)


def test_tracked_module_under_transforms_keeps_the_jacobian_norms():
    model = vgk.nn.LSTM(3, 4, backend="cpp", dtype=D, track=True)
    x = torch.randn(5, 2, 3, dtype=D)
    model(x)
    eager = model.trace.jacobian_norm_per_sample
    jvp(lambda x: model(x)[0], (x,), (torch.randn_like(x),))
    torch.testing.assert_close(model.trace.jacobian_norm_per_sample, eager, **EXACT)
    assert model.trace.grad_norm is None  # the transforms run no backward that fills it
    grad(lambda x: model(x)[0].sum())(x)
    assert model.trace.grad_norm is None


# ---------------------------------------------------------------------------------------------------
# Forward mode and torch.func: LayerNorm, the clip functions, grad_stats


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_layer_norm_forward_mode_matches_torch(backend):
    x = torch.randn(3, 4, 5, dtype=D)
    w, b = torch.randn(4, 5, dtype=D), torch.randn(4, 5, dtype=D)
    primals = (x, w, b)
    tangents = tuple(torch.randn_like(t) for t in primals)
    ours = lambda x, w, b: layer_norm(x, (4, 5), w, b, backend=backend)
    theirs = lambda x, w, b: F.layer_norm(x, (4, 5), w, b)
    torch.testing.assert_close(jvp(ours, primals, tangents)[1], jvp(theirs, primals, tangents)[1], **EXACT)
    with fwAD.dual_level():
        out = ours(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)))
        got = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(got, jvp(theirs, primals, tangents)[1], **EXACT)
    small = torch.randn(2, 3, dtype=D)
    for fn in (jacfwd, jacrev, hessian):
        torch.testing.assert_close(fn(lambda x: layer_norm(x, 3, backend=backend).sin().sum())(small),
                                   fn(lambda x: F.layer_norm(x, (3,)).sin().sum())(small), **EXACT)
    torch.testing.assert_close(vmap(lambda x: layer_norm(x, 5, backend=backend))(x),
                               F.layer_norm(x, (5,)), **EXACT)


def test_layer_norm_clip_under_forward_mode_and_func_grad():
    x = torch.randn(3, 6, dtype=D) * 3
    v = torch.randn_like(x)
    torch.testing.assert_close(jvp(lambda x: layer_norm(x, 6, grad_clip=0.1, backend="cpp"), (x,), (v,))[1],
                               jvp(lambda x: F.layer_norm(x, (6,)), (x,), (v,))[1], **EXACT)
    up = torch.randn_like(x) * 5
    x_leaf = x.clone().requires_grad_()
    kernel, = torch.autograd.grad(layer_norm(x_leaf, 6, grad_clip=0.1, backend="cpp"), x_leaf, up)
    functorch = grad(lambda x: (layer_norm(x, 6, grad_clip=0.1, backend="cpp") * up).sum())(x)
    torch.testing.assert_close(functorch, kernel, **EXACT)
    torch.testing.assert_close(functorch.norm(dim=-1), torch.full((3,), 0.1, dtype=D))


@pytest.mark.parametrize("norm_type", [2.0, 3.0])
def test_total_norm_tangent_matches_finite_differences(norm_type):
    tensors = [torch.randn(5, dtype=D), torch.randn(2, 3, dtype=D)]
    tangents = [torch.randn_like(t) for t in tensors]

    def total(flat):
        return vgk.get_total_norm([flat[:5], flat[5:].reshape(2, 3)], norm_type)

    flat = torch.cat([t.reshape(-1) for t in tensors])
    direction = torch.cat([t.reshape(-1) for t in tangents])
    expected = central_difference(total, flat, direction)
    _, tangent = jvp(lambda *ts: vgk.get_total_norm(list(ts), norm_type), tuple(tensors), tuple(tangents))
    torch.testing.assert_close(tangent, expected, **FD)
    with fwAD.dual_level():
        dual = [fwAD.make_dual(t, u) for t, u in zip(tensors, tangents, strict=True)]
        got = fwAD.unpack_dual(vgk.get_total_norm(dual, norm_type)).tangent
    torch.testing.assert_close(got, expected, **FD)
    batch = torch.randn(4, 7, dtype=D)
    torch.testing.assert_close(vmap(lambda t: vgk.get_total_norm([t], norm_type))(batch),
                               torch.linalg.vector_norm(batch, norm_type, dim=1), **EXACT)


def test_clip_grad_norm_scales_the_tangents_of_dual_gradients():
    p = torch.nn.Parameter(torch.zeros(6, dtype=D))
    g, t = torch.randn(6, dtype=D) * 4, torch.randn(6, dtype=D)

    def clipped(g):
        p.grad = g.clone()
        vgk.clip_grad_norm_([p], 1.0)
        return p.grad

    with fwAD.dual_level():
        p.grad = fwAD.make_dual(g.clone(), t.clone())  # the in-place scaling scales the tangent in place
        total = vgk.clip_grad_norm_([p], 1.0)
        got = fwAD.unpack_dual(p.grad).tangent
        assert fwAD.unpack_dual(total).tangent is not None
    torch.testing.assert_close(got, central_difference(clipped, g, t), **FD)


def test_grad_stats_is_a_detached_statistic_in_every_mode():
    g = torch.randn(7, dtype=D)
    with fwAD.dual_level():
        sumsq, _ = grad_stats([fwAD.make_dual(g, torch.ones_like(g))])
        assert fwAD.unpack_dual(sumsq).tangent is None
    torch.testing.assert_close(sumsq, g.square().sum().reshape(1), **EXACT)
    assert not grad_stats([g.clone().requires_grad_()])[0].requires_grad
    with pytest.raises(RuntimeError, match="vgk::grad_stats"):
        vmap(lambda t: grad_stats([t])[0])(g[None])
