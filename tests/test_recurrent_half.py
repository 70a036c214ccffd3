"""bfloat16 and float16 recurrent modules on the CPU, and torch.autocast, against torch.nn.

The cpp backend runs the half types on float32 copies; torch.nn runs them natively (oneDNN or its
native cells). Under autocast the outputs must have torch.nn's dtypes there, which differ by module:
the oneDNN LSTM (padded float32/bfloat16 input) casts everything to the autocast dtype A, the Elman RNN
returns A, the GRU and the packed LSTM promote(A, dtype of h0/c0).

Oracles: torch.nn's half-precision run for the dtype of every output and gradient; for the values,
torch.nn in float64 on the same rounded input and weights (torch's own half-precision run can be far
from it: its bfloat16 ReLU RNN's input gradient is off by 16% where ours is off by 0.3%).

Tolerances: normwise relative error ||ours - oracle|| / ||oracle|| of every output and gradient,
bfloat16 3e-2, float16 5e-3.
"""

import contextlib
import copy

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_sequence

import vgkernels as vgk

TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
CELLS = {
    "lstm": (vgk.nn.LSTM, torch.nn.LSTM, {}),
    "gru": (vgk.nn.GRU, torch.nn.GRU, {}),
    "rnn_tanh": (vgk.nn.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (vgk.nn.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
}


def pair(cell, backend="cpp", device="cpu", **kwargs):
    ours_cls, theirs_cls, extra = CELLS[cell]
    ours = ours_cls(3, 5, backend=backend, device=device, **extra, **kwargs)
    theirs = theirs_cls(3, 5, device=device, **extra, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def make_input(dtype, packed, device="cpu", batched=True):
    """Leaf tensors that require grad, and the module input built from them (batch 3)."""
    if packed:
        leaves = [torch.randn(n, 3, device=device).to(dtype).requires_grad_() for n in (6, 3, 5)]
        return leaves, pack_sequence(leaves, enforce_sorted=False)
    x = torch.randn((6, 3, 3) if batched else (6, 3), device=device).to(dtype).requires_grad_()
    return [x], x


def make_hx(cell, dtype, num_states, device="cpu"):
    h = (0.5 * torch.randn(num_states, 3, 5, device=device)).to(dtype).requires_grad_()
    if cell == "lstm":
        return (h, (0.5 * torch.randn(num_states, 3, 5, device=device)).to(dtype).requires_grad_())
    return h


def convert(hx, dtype=None):
    """Fresh leaves of hx (a tensor, a tuple or None), converted to dtype when given."""
    if hx is None:
        return None
    if isinstance(hx, tuple):
        return tuple(convert(t, dtype) for t in hx)
    return hx.detach().to(dtype or hx.dtype).requires_grad_()


def rebuild(leaves, packed, dtype=None):
    """Fresh input leaves (converted to dtype when given) and the module input built from them."""
    fresh = [t.detach().to(dtype or t.dtype).requires_grad_() for t in leaves]
    return fresh, (pack_sequence(fresh, enforce_sorted=False) if packed else fresh[0])


def leaves_of(hx):
    return [] if hx is None else (list(hx) if isinstance(hx, tuple) else [hx])


def run(model, leaves, x, hx, context=contextlib.nullcontext):
    """Outputs and the gradients of input leaves, hx and parameters of a fixed random loss."""
    with context():
        out, state = model(x, hx) if hx is not None else model(x)
    outs = [out.data if isinstance(out, PackedSequence) else out]
    outs += list(state) if isinstance(state, tuple) else [state]
    gen = torch.Generator(device=outs[0].device).manual_seed(7)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float64)).sum()
               for o in outs)
    inputs = leaves + leaves_of(hx) + list(model.parameters())
    return outs, torch.autograd.grad(loss, inputs)


def float64_run(theirs, rounded_to, leaves, packed, hx):
    """torch.nn in float64 on the input and weights rounded to ``rounded_to``; hx as given."""
    exact = copy.deepcopy(theirs)
    exact.load_state_dict({k: v.to(rounded_to) for k, v in theirs.state_dict().items()})
    exact = exact.double()
    rounded = [t.detach().to(rounded_to) for t in leaves]
    fresh, x = rebuild(rounded, packed, torch.float64)
    return run(exact, fresh, x, convert(hx, torch.float64))


def assert_matches(ours, half, exact, tol):
    """ours has the dtypes of torch.nn's half-precision run ``half`` and is within tol of ``exact``."""
    for i, (a, h, e) in enumerate(zip(ours, half, exact, strict=True)):
        assert a.dtype == h.dtype, f"item {i}: dtype {a.dtype}, torch.nn gives {h.dtype}"
        err = (a.double() - e).norm() / e.norm().clamp_min(1e-30)
        torch_err = (h.double() - e).norm() / e.norm().clamp_min(1e-30)
        assert err < tol, f"item {i}: normwise relative error {err:.3g} > {tol} (torch.nn's: {torch_err:.3g})"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("packed,with_hx", [(False, False), (False, True), (True, False)])
def test_half_modules_match_torch_nn(dtype, cell, packed, with_hx):
    ours, theirs = pair(cell, num_layers=2, bidirectional=True)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    leaves, x = make_input(dtype, packed)
    hx = make_hx(cell, dtype, 4) if with_hx else None
    got = run(ours, leaves, x, hx)
    half = run(theirs, *rebuild(leaves, packed), convert(hx))
    exact = float64_run(theirs, dtype, leaves, packed, hx)
    for part in range(2):  # outputs, then gradients
        assert_matches(got[part], half[part], exact[part], TOL[dtype])


def test_unbatched_bfloat16_and_tracking():
    ours, theirs = pair("gru")
    ours, theirs = ours.bfloat16(), theirs.bfloat16()
    ours.track = True
    leaves, x = make_input(torch.bfloat16, packed=False, batched=False)
    got = run(ours, leaves, x, None)
    half = run(theirs, *rebuild(leaves, False), None)
    exact = float64_run(theirs, torch.bfloat16, leaves, False, None)
    for part in range(2):
        assert_matches(got[part], half[part], exact[part], TOL[torch.bfloat16])
    ours(x)[0].float().sum().backward()  # the trace's gradient part fills on backward()
    trace = ours.trace
    assert trace.jacobian_norm_per_sample.dtype == torch.float32 and trace.grad_norm.dtype == torch.float32
    assert torch.isfinite(trace.grad_norm).all() and (trace.grad_norm > 0).all()


def autocast_cases():
    """(cell, autocast dtype, input dtype, packed, with_hx) where torch.nn runs on a CPU."""
    cases = []
    for cell in CELLS:
        for input_dtype in (torch.float32, torch.bfloat16, torch.float16):
            for packed, with_hx in ((False, False), (False, True), (True, False), (True, True)):
                if cell.startswith("rnn") and packed and not with_hx and input_dtype == torch.float16:
                    continue  # torch 2.13 raises "Unexpected floating ScalarType in at::autocast::prioritize"
                cases.append((cell, torch.bfloat16, input_dtype, packed, with_hx))
            cases.append((cell, torch.float16, input_dtype, False, True))
    return cases


def torch_nn_under_autocast(cell, theirs, autocast_dtype, input_dtype, packed, leaves, hx):
    """torch.nn's run, for the dtypes. Its oneDNN LSTM casts everything to the autocast dtype; where this
    CPU's oneDNN has no float16 LSTM, torch raises, and the same run cast to float16 stands in for it."""
    onednn_lstm = cell == "lstm" and not packed and input_dtype in (torch.float32, torch.bfloat16)
    if onednn_lstm and autocast_dtype == torch.float16 and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        outs, grads = run(copy.deepcopy(theirs).half(), *rebuild(leaves, packed, torch.float16),
                          convert(hx, torch.float16))
        return outs, [g.to(t.dtype) for g, t in zip(grads, leaves + leaves_of(hx) + list(theirs.parameters()),
                                                       strict=True)]
    context = lambda: torch.autocast("cpu", dtype=autocast_dtype)
    return run(theirs, *rebuild(leaves, packed), convert(hx), context)


@pytest.mark.parametrize("cell,autocast_dtype,input_dtype,packed,with_hx", autocast_cases(), ids=str)
def test_autocast_cpu_matches_torch_nn(cell, autocast_dtype, input_dtype, packed, with_hx):
    ours, theirs = pair(cell, num_layers=2, bidirectional=True)
    leaves, x = make_input(input_dtype, packed)
    hx = make_hx(cell, torch.float32, 4) if with_hx else None
    got = run(ours, leaves, x, hx, lambda: torch.autocast("cpu", dtype=autocast_dtype))
    half = torch_nn_under_autocast(cell, theirs, autocast_dtype, input_dtype, packed, leaves, hx)
    exact = float64_run(theirs, autocast_dtype, leaves, packed, hx)
    for part in range(2):
        assert_matches(got[part], half[part], exact[part], TOL[autocast_dtype])


def test_autocast_leaves_float64_alone_and_fails_like_torch():
    ours, theirs = pair("gru")
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):
            theirs(x)
        with pytest.raises(TypeError, match="weight_ih_l0: expected dtype torch.float64 like input"):
            ours(x)


def test_autocast_layer_normalized_cells_and_triton_backend():
    """No torch twin: the autocast run equals the float32 run on the rounded input and weights, within
    the autocast dtype's tolerance; the Triton kernels (interpreted) agree with the C++ ones."""
    for backend in ("cpp", "triton"):
        model = vgk.nn.LSTM(3, 5, layer_norm=True, backend=backend)
        x = torch.randn(5, 2, 3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, (h, c) = model(x)
        assert out.dtype == h.dtype == c.dtype == torch.bfloat16  # the oneDNN LSTM's rule
        rounded = vgk.nn.LSTM(3, 5, layer_norm=True, backend=backend)
        rounded.load_state_dict({k: (v.bfloat16().float() if "layer_norm" not in k else v)
                                 for k, v in model.state_dict().items()})
        want = rounded(x.bfloat16().float())[0]
        assert ((out.float() - want).norm() / want.norm()) < TOL[torch.bfloat16]


def test_autocast_compiles_without_graph_breaks():
    torch._dynamo.reset()
    lstm, gru = vgk.nn.LSTM(3, 4, backend="cpp"), vgk.nn.GRU(3, 4, backend="cpp")
    x = torch.randn(5, 2, 3)

    def f(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lstm(x)[0], gru(x)[0]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    eager = f(x)
    assert [t.dtype for t in compiled] == [torch.bfloat16, torch.float32]
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("packed", [False, True])
def test_autocast_cuda_matches_torch_nn(autocast_dtype, cell, packed):
    """On cuDNN torch.nn casts to float16 under any CUDA autocast dtype (its autocast wrapper of
    _cudnn_rnn casts to half); so do our modules."""
    assert torch.backends.cudnn.enabled and torch.backends.cudnn.is_available()
    ours, theirs = pair(cell, backend="triton", device="cuda", num_layers=2, bidirectional=True)
    leaves, x = make_input(torch.float32, packed, device="cuda")
    hx = make_hx(cell, torch.float32, 4, device="cuda")
    context = lambda: torch.autocast("cuda", dtype=autocast_dtype)
    got = run(ours, leaves, x, hx, context)
    half = run(theirs, *rebuild(leaves, packed), convert(hx), context)
    exact = float64_run(theirs, torch.float16, leaves, packed, hx)
    assert [t.dtype for t in got[0]] == [torch.float16] * len(got[0])
    for part in range(2):
        assert_matches(got[part], half[part], exact[part], TOL[torch.float16])
