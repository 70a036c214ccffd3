"""LayerNorm with a clipped input gradient: ``vgkernels.ops.layer_norm`` and ``vgkernels.nn.LayerNorm``.

Backends: "cpp" natively, "triton" under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py), and
"reference". The tests marked ``gpu`` run the Triton kernels on CUDA (VGK_TEST_CUDA=1).

Oracles: torch.nn.functional.layer_norm / torch.nn.LayerNorm for values and gradients; for grad_clip,
torch's unclipped gradients rescaled row by row, and the eager reference.

Tolerances: float32 output atol 1e-5 (rtol 0); float32 gradients atol 1e-4, rtol 1e-4; float64
gradcheck with torch's defaults; float16/bfloat16 against float32 on the same (rounded) values:
atol 1e-2 / 4e-2 on the output, normwise relative error 1e-2 / 2e-2 on the gradients (also with
float32 parameters, and under autocast against torch.nn.LayerNorm there); a scripted module equals the
eager one exactly; clipped rows
have norm c to rtol 1e-5. Triton outputs are allocated NaN-filled, so an element a kernel fails to
write shows up.
"""

import io
import math
import os

import pytest
import torch
import torch.nn.functional as F

import vgkernels as vgk
import vgkernels.triton.layer_norm as tln
from vgkernels.ops.layer_norm import layer_norm

BACKENDS = ("cpp", "triton", "reference")
AFFINE = ("weight_bias", "weight", "bias", "none")
CUDA = os.environ.get("VGK_TEST_CUDA") == "1"


@pytest.fixture(autouse=True)
def _nan_fill(monkeypatch):
    monkeypatch.setattr(tln, "_ALLOC_FILL", float("nan"))


@pytest.fixture
def looped(monkeypatch):
    """Send every row longer than 16 elements through the Triton kernels' chunked loops."""
    monkeypatch.setattr(tln, "MAX_FUSED", 16)
    monkeypatch.setattr(tln, "LOOP_BLOCK", 16)


def make(shape, nshape, affine="weight_bias", dtype=torch.float32, device="cpu"):
    """Input, weight and bias (None when absent) as leaf tensors that require grad."""
    x = torch.randn(shape, dtype=dtype, device=device) * 2 + 0.5
    w = torch.randn(nshape, dtype=dtype, device=device) if affine in ("weight_bias", "weight") else None
    b = torch.randn(nshape, dtype=dtype, device=device) if affine in ("weight_bias", "bias") else None
    return [None if t is None else t.requires_grad_() for t in (x, w, b)]


def grads(out, inputs, upstream):
    present = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(out, present, upstream))
    return [None if t is None else next(got) for t in inputs]


def assert_grads_close(got, want, atol=1e-4, rtol=1e-4):
    for name, g, w in zip(("dx", "dweight", "dbias"), got, want, strict=True):
        assert (g is None) == (w is None), name
        if g is not None:
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=name)


def normwise(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------------
# Values and gradients against torch


SHAPES = [
    ((1, 1, 1), (1,)),
    ((3, 7, 37), (37,)),
    ((2, 1500), (1500,)),
    ((64, 4096), (4096,)),
    ((3, 7, 37), (7, 37)),  # 2-D normalized_shape
    ((1, 37), (37,)),  # batch 1
    ((37, 3), (3,)),
    ((5,), (5,)),  # no leading dims
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("shape,nshape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_torch(backend, affine, shape, nshape):
    x, w, b = make(shape, nshape, affine)
    out = layer_norm(x, nshape, w, b, backend=backend)
    want = F.layer_norm(x, nshape, w, b)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    upstream = torch.randn_like(out)
    assert_grads_close(grads(out, (x, w, b), upstream), grads(want, (x, w, b), upstream))


@pytest.mark.parametrize("backend", ("triton",))
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("shape,nshape", [((3, 37), (37,)), ((2, 3, 37), (3, 37)), ((1, 17), (17,))])
def test_triton_looped_kernels(looped, backend, affine, shape, nshape):
    x, w, b = make(shape, nshape, affine)
    out = layer_norm(x, nshape, w, b, backend=backend)
    want = F.layer_norm(x, nshape, w, b)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    upstream = torch.randn_like(out)
    assert_grads_close(grads(out, (x, w, b), upstream), grads(want, (x, w, b), upstream))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize(
    "shape,nshape", [((2, 3, 5), (5,)), ((2, 3, 5), (3, 5)), ((1, 1), (1,)), ((3, 2), (2,))]
)
def test_gradcheck_float64(backend, affine, shape, nshape):
    x, w, b = make(shape, nshape, affine, dtype=torch.float64)
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def fn(*args):
        it = iter(args)
        xx = next(it)
        ww = next(it) if w is not None else None
        bb = next(it) if b is not None else None
        return layer_norm(xx, nshape, ww, bb, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_float64_looped_triton(looped):
    x, w, b = make((3, 2, 11), (2, 11), dtype=torch.float64)
    fn = lambda *a: layer_norm(a[0], (2, 11), a[1], a[2], backend="triton")
    assert torch.autograd.gradcheck(fn, (x, w, b))


SUBSETS = [("input", a) for a in AFFINE] + [
    ("weight", "weight_bias"), ("weight", "weight"), ("bias", "weight_bias"), ("bias", "bias"),
    ("params", "weight_bias"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wanted,affine", SUBSETS)
def test_gradients_of_a_subset_of_the_inputs(backend, wanted, affine):
    # Only some inputs require grad: each asked-for gradient matches torch's, whichever are present.
    x, w, b = make((5, 37), (37,), affine)
    asked = {"input": [x], "weight": [w], "bias": [b], "params": [w, b]}[wanted]
    for t in (x, w, b):
        if t is not None and not any(t is a for a in asked):
            t.requires_grad_(False)
    upstream = torch.randn(5, 37)
    got = torch.autograd.grad(layer_norm(x, 37, w, b, backend=backend), asked, upstream)
    want = torch.autograd.grad(F.layer_norm(x, (37,), w, b), asked, upstream)
    for g, h in zip(got, want, strict=True):
        torch.testing.assert_close(g, h, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input_and_upstream(backend):
    base = torch.randn(37, 3, 4, requires_grad=True)
    x = base.transpose(0, 2)  # [4, 3, 37], normalized over its last two dims
    w = torch.randn(3, 37, requires_grad=True)
    b = torch.randn(3, 37, requires_grad=True)
    assert not x.is_contiguous()
    out = layer_norm(x, (3, 37), w, b, backend=backend)
    want = F.layer_norm(x, (3, 37), w, b)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    upstream = torch.randn(37, 3, 4).transpose(0, 2)
    assert_grads_close(grads(out, (base, w, b), upstream), grads(want, (base, w, b), upstream))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype,out_atol,grad_tol", [(torch.float16, 1e-2, 1e-2), (torch.bfloat16, 4e-2, 2e-2)]
)
def test_half_types(backend, dtype, out_atol, grad_tol):
    x, w, b = make((5, 3, 37), (37,), dtype=dtype)
    out = layer_norm(x, 37, w, b, backend=backend)
    assert out.dtype == dtype
    x32, w32, b32 = (t.detach().float().requires_grad_() for t in (x, w, b))
    want = F.layer_norm(x32, (37,), w32, b32)
    torch.testing.assert_close(out.float(), want, atol=out_atol, rtol=0)
    upstream = torch.randn_like(want)
    got = grads(out, (x, w, b), upstream.to(dtype))
    ref = grads(want, (x32, w32, b32), upstream)
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == dtype
        assert normwise(g, r) < grad_tol


HALF = [(torch.float16, 1e-2, 1e-2), (torch.bfloat16, 4e-2, 2e-2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,out_atol,grad_tol", HALF)
@pytest.mark.parametrize("affine", ("weight_bias", "weight", "bias"))
def test_half_input_with_float32_parameters(backend, dtype, out_atol, grad_tol, affine):
    """F.layer_norm's mixed precision: the output in the input's dtype, each gradient in its tensor's.
    Torch's own backward fails for a bias without a weight, so the oracle is float32 on the rounded
    values (and torch itself wherever it runs)."""
    x, w, b = make((5, 3, 37), (37,), affine=affine)
    x = x.detach().to(dtype).requires_grad_()
    out = layer_norm(x, 37, w, b, backend=backend)
    assert out.dtype == dtype == F.layer_norm(x, (37,), w, b).dtype
    x32, w32, b32 = (None if t is None else t.detach().float().requires_grad_() for t in (x, w, b))
    want = F.layer_norm(x32, (37,), w32, b32)
    torch.testing.assert_close(out.float(), want, atol=out_atol, rtol=0)
    upstream = torch.randn_like(want)
    got = grads(out, (x, w, b), upstream.to(dtype))
    ref = grads(want, (x32, w32, b32), upstream)
    for g, r, t in zip(got, ref, (x, w, b), strict=True):
        assert (g is None) == (t is None)
        if g is not None:
            assert g.dtype == t.dtype
            assert normwise(g, r) < grad_tol
    if w is not None:
        theirs = grads(F.layer_norm(x, (37,), w, b), (x, w, b), upstream.to(dtype))
        for g, t in zip(got, theirs, strict=True):
            assert (g is None) == (t is None)
            if g is not None:
                assert g.dtype == t.dtype and normwise(g, t) < grad_tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,out_atol,grad_tol", HALF)
def test_autocast_cpu_matches_torch(backend, dtype, out_atol, grad_tol):
    """Under torch.autocast("cpu") torch leaves layer_norm alone: a half activation meets float32
    parameters. The module runs there as torch.nn.LayerNorm does."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 37)
    theirs = torch.nn.LayerNorm(37)
    ours = vgk.nn.LayerNorm(37, backend=backend)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 6, 8)
    results = []
    for norm in (ours, theirs):
        with torch.autocast("cpu", dtype=dtype):
            out = norm(linear(x))
        params = [*norm.parameters(), *linear.parameters()]
        results.append((out, torch.autograd.grad(out.float().square().sum(), params)))
    (out, got), (want, ref) = results
    assert out.dtype == want.dtype == dtype
    torch.testing.assert_close(out.float(), want.float(), atol=out_atol, rtol=0)
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == r.dtype == torch.float32
        assert normwise(g, r) < grad_tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x, w, b = make((0, 37), (37,))
    out = layer_norm(x, 37, w, b, backend=backend)
    assert out.shape == (0, 37)
    dx, dw, db = grads(out, (x, w, b), torch.ones_like(out))
    assert dx.shape == (0, 37)
    assert torch.equal(dw, torch.zeros(37)) and torch.equal(db, torch.zeros(37))


# ---------------------------------------------------------------------------------------------------
# grad_clip


def _rows(t, k):
    return t.reshape(*t.shape[: t.dim() - k], -1)


@pytest.mark.parametrize("backend,looped_kernels", [("cpp", False), ("triton", False), ("triton", True),
                                                    ("reference", False)])
@pytest.mark.parametrize("shape,nshape", [((6, 37), (37,)), ((2, 3, 3, 5), (3, 5)), ((4, 1500), (1500,))])
def test_grad_clip(backend, looped_kernels, shape, nshape, monkeypatch):
    if looped_kernels:
        monkeypatch.setattr(tln, "MAX_FUSED", 16)
        monkeypatch.setattr(tln, "LOOP_BLOCK", 16)
    k = len(nshape)
    x, w, b = make(shape, nshape)
    # Rows get very different gradient sizes, so that some lie below the bound and some above it.
    n_rows = math.prod(shape[: len(shape) - k])
    sizes = torch.logspace(-2, 2, n_rows).unsqueeze(1)
    upstream = (torch.randn(n_rows, math.prod(nshape)) * sizes).reshape(shape)
    dx_free, dw_free, db_free = grads(F.layer_norm(x, nshape, w, b), (x, w, b), upstream)
    norms = torch.linalg.vector_norm(_rows(dx_free, k), dim=-1)
    ordered = norms.flatten().sort().values
    c = (ordered[n_rows // 2 - 1] * ordered[n_rows // 2]).sqrt().item()  # strictly between two rows
    assert (norms < c).any() and (norms > c).any()

    out = layer_norm(x, nshape, w, b, grad_clip=c, backend=backend)
    torch.testing.assert_close(out, F.layer_norm(x, nshape, w, b), atol=1e-5, rtol=0)
    dx, dw, db = grads(out, (x, w, b), upstream)
    # dW and db are those of the unclipped upstream gradient.
    torch.testing.assert_close(dw, dw_free, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(db, db_free, atol=1e-4, rtol=1e-4)
    rows, rows_free = _rows(dx, k), _rows(dx_free, k)
    within = norms <= c
    # Rows within the bound keep their gradient.
    torch.testing.assert_close(rows[within], rows_free[within], atol=1e-5, rtol=1e-4)
    # Rows above it are rescaled to exactly the bound, with their direction kept.
    above = ~within
    got_norms = torch.linalg.vector_norm(rows[above], dim=-1)
    torch.testing.assert_close(got_norms, torch.full_like(got_norms, c), atol=0, rtol=1e-5)
    torch.testing.assert_close(rows[above] * (norms[above] / c).unsqueeze(-1), rows_free[above], atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("backend", ("cpp", "triton"))
def test_grad_clip_matches_reference(backend):
    x, w, b = make((4, 3, 37), (3, 37), dtype=torch.float64)
    sizes = torch.tensor([0.01, 1, 100, 0.1], dtype=torch.float64).view(4, 1, 1)
    upstream = torch.randn(4, 3, 37, dtype=torch.float64) * sizes
    got = grads(layer_norm(x, (3, 37), w, b, grad_clip=0.5, backend=backend), (x, w, b), upstream)
    want = grads(layer_norm(x, (3, 37), w, b, grad_clip=0.5, backend="reference"), (x, w, b), upstream)
    assert_grads_close(got, want, atol=1e-10, rtol=1e-10)



# ---------------------------------------------------------------------------------------------------
# Reused output blocks (cpp: outputs of 1 MiB or more come from a cache of freed blocks)


def test_cpp_outputs_reuse_freed_blocks_and_keep_live_values():
    x, w, b = make((512, 1024), (1024,))  # 2 MiB outputs
    upstream = torch.randn(512, 1024)
    y = layer_norm(x, 1024, w, b, backend="cpp")
    dx = torch.autograd.grad(y, x, upstream)[0]
    kept_y, kept_dx = y.detach().clone(), dx.clone()
    for scale in (3.0, -2.0):  # later calls with other values must not write into live outputs
        other = (x.detach() * scale).requires_grad_()
        o = layer_norm(other, 1024, w, b, backend="cpp")
        torch.autograd.grad(o, other, upstream)
    assert torch.equal(y, kept_y) and torch.equal(dx, kept_dx)
    # A freed output's block is handed to the next call of its size (13 MiB: a size class of its own).
    big = torch.randn(13 * 256, 1024)
    first = layer_norm(big, 1024, backend="cpp")
    freed = first.data_ptr()
    del first
    assert layer_norm(big, 1024, backend="cpp").data_ptr() == freed
    torch.testing.assert_close(kept_y, F.layer_norm(x.detach(), (1024,), w.detach(), b.detach()), atol=1e-5,
                               rtol=0)

# ---------------------------------------------------------------------------------------------------
# Determinism


def test_cpp_parameter_gradients_do_not_depend_on_thread_count():
    x, w, b = make((300, 129), (129,))
    upstream = torch.randn(300, 129)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append(grads(layer_norm(x, 129, w, b, backend="cpp"), (x, w, b), upstream))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for g, h in zip(results[0], other, strict=True):
            assert torch.equal(g, h)


def test_triton_parameter_gradients_are_deterministic():
    x, w, b = make((9, 37), (37,))
    upstream = torch.randn(9, 37)
    first = grads(layer_norm(x, 37, w, b, backend="triton"), (x, w, b), upstream)
    second = grads(layer_norm(x, 37, w, b, backend="triton"), (x, w, b), upstream)
    for g, h in zip(first, second, strict=True):
        assert torch.equal(g, h)


# ---------------------------------------------------------------------------------------------------
# Module


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("backend", (None, "cpp", "triton", "reference"))
def test_module_matches_torch_and_loads_its_state(affine, bias, backend):
    theirs = torch.nn.LayerNorm((3, 37), eps=1e-4, elementwise_affine=affine, bias=bias)
    ours = vgk.nn.LayerNorm((3, 37), eps=1e-4, elementwise_affine=affine, bias=bias, backend=backend)
    assert isinstance(ours, torch.nn.LayerNorm)
    layout = lambda m: [(n, p.shape) for n, p in m.named_parameters()]
    assert layout(ours) == layout(theirs)
    if affine:
        with torch.no_grad():
            for p in theirs.parameters():
                p.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 37, requires_grad=True)
    out, want = ours(x), theirs(x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *ours.parameters()], upstream)
    ref = torch.autograd.grad(want, [x, *theirs.parameters()], upstream)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    # And back: torch's module loads ours.
    back = torch.nn.LayerNorm((3, 37), eps=1e-4, elementwise_affine=affine, bias=bias)
    back.load_state_dict(ours.state_dict())
    for p, q in zip(back.parameters(), ours.parameters(), strict=True):
        assert torch.equal(p, q)


def test_module_grad_clip_and_repr():
    m = vgk.nn.LayerNorm(37, grad_clip=0.25, backend="cpp")
    assert "grad_clip=0.25" in repr(m) and "backend='cpp'" in repr(m)
    x = torch.randn(5, 37, requires_grad=True)
    (m(x) * torch.randn(5, 37) * 100).sum().backward()
    norms = x.grad.norm(dim=-1)
    assert torch.all(norms <= 0.25 * (1 + 1e-5))


def test_module_dtype_and_device_keywords():
    m = vgk.nn.LayerNorm(8, dtype=torch.float64, device="cpu")
    assert m.weight.dtype == torch.float64
    assert m(torch.randn(2, 8, dtype=torch.float64)).dtype == torch.float64


def test_torchscript_module_matches_eager():
    """torch.jit.script works as for torch.nn.LayerNorm; the scripted module runs the C++ op."""
    for kwargs in ({}, {"elementwise_affine": False}, {"bias": False}, {"grad_clip": 0.5, "eps": 1e-3}):
        eager = vgk.nn.LayerNorm((3, 37), **kwargs)
        with torch.no_grad():
            for p in eager.parameters():
                p.normal_()
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(eager), buffer)
        buffer.seek(0)
        scripted = torch.jit.load(buffer)
        x = torch.randn(2, 3, 37, requires_grad=True)
        upstream = torch.randn(2, 3, 37) * 10
        got = grads(scripted(x), (x, *scripted.parameters()), upstream)
        want = grads(eager(x), (x, *eager.parameters()), upstream)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=0, rtol=0)
        half = x.detach().bfloat16()
        torch.testing.assert_close(scripted(half), eager(half), atol=0, rtol=0)
        # An error raised in TorchScript reaches Python as torch.jit.Error, with the message.
        with pytest.raises(torch.jit.Error, match=r"trailing dims must equal normalized_shape=\(3, 37\), "
                                                  r"got input shape \[2, 37\]"):
            scripted(torch.randn(2, 37))


def test_torchscript_module_refuses_what_it_cannot_run():
    scripted = torch.jit.script(vgk.nn.LayerNorm(5, backend="reference"))
    with pytest.raises(torch.jit.Error, match=r"scripted module runs the C\+\+ kernels on CPU tensors only.*"
                                              r"got backend=reference, input on cpu"):
        scripted(torch.randn(2, 5))


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 37), vgk.nn.LayerNorm(37, grad_clip=0.5, backend="cpp"), torch.nn.Tanh(),
        torch.nn.Linear(37, 4), vgk.nn.LayerNorm(4, bias=False),
    )
    x = torch.randn(3, 5, 8)
    out = model(x)
    out.square().sum().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out_c = compiled(x)
    out_c.square().sum().backward()
    torch.testing.assert_close(out_c, out, atol=1e-5, rtol=1e-5)
    for g, e in zip((p.grad for p in model.parameters()), eager, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_opcheck_cpp_ops():
    x, w, b = make((3, 4, 5), (4, 5), dtype=torch.float64)
    torch.library.opcheck(torch.ops.vgk.layer_norm_forward, (x, w, b, 2, 1e-5, 0.3))
    torch.library.opcheck(torch.ops.vgk.layer_norm_forward, (x, None, None, 1, 1e-5, None))
    _, mean, rstd = torch.ops.vgk.layer_norm_forward(x, w, b, 2, 1e-5, None)
    dy = torch.randn(3, 4, 5, dtype=torch.float64)
    cases = ((w.detach(), 2, 0.3, True, True), (None, 2, None, False, True), (None, 2, None, False, False))
    for args in cases:
        torch.library.opcheck(torch.ops.vgk.layer_norm_backward, (dy, x.detach(), mean, rstd, *args))


# ---------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    x = torch.randn(3, 5)
    w5 = torch.ones(5)
    cases = [
        (TypeError, "input must be a tensor", lambda: layer_norm([[1.0]], 1, backend=backend)),
        (TypeError, r"float32.*got torch.int64", lambda: layer_norm(torch.ones(3, 5, dtype=torch.int64), 5,
                                                                      backend=backend)),
        (ValueError, r"trailing dims.*\[4\].*\[3, 5\]", lambda: layer_norm(x, 4, backend=backend)),
        (ValueError, r"trailing dims", lambda: layer_norm(x, (2, 3, 5), backend=backend)),
        (ValueError, "non-empty", lambda: layer_norm(x, (), backend=backend)),
        (TypeError, "normalized_shape", lambda: layer_norm(x, "5", backend=backend)),
        (ValueError, r"weight must have shape.*\[5\].*\[4\]",
         lambda: layer_norm(x, 5, torch.ones(4), backend=backend)),
        (ValueError, r"bias must have shape",
         lambda: layer_norm(x, 5, w5, torch.ones(5, 1), backend=backend)),
        (TypeError, r"weight must have dtype torch.float32, the input being torch.float32; got torch.float64",
         lambda: layer_norm(x, 5, w5.double(), backend=backend)),
        (TypeError, r"bias must have dtype torch.float32 \(with a float16/bfloat16 input: the input's "
                    r"dtype, or float32 for weight and bias both\), the input being torch.bfloat16; "
                    r"got torch.bfloat16",
         lambda: layer_norm(x.bfloat16(), 5, w5, w5.bfloat16(), backend=backend)),
        (TypeError, r"weight must have dtype torch.float16.*got torch.bfloat16",
         lambda: layer_norm(x.half(), 5, w5.bfloat16(), backend=backend)),
        (TypeError, r"bias must be a tensor", lambda: layer_norm(x, 5, w5, 1.0, backend=backend)),
        (RuntimeError, r"weight must be on the input's device cpu, got meta",
         lambda: layer_norm(x, 5, torch.ones(5, device="meta"), backend=backend)),
        (ValueError, r"eps must be a number >= 0, got -1", lambda: layer_norm(x, 5, eps=-1, backend=backend)),
        (ValueError, r"grad_clip must be None or a number > 0, got 0", lambda: layer_norm(x, 5, grad_clip=0,
                                                                                           backend=backend)),
        (ValueError, r"grad_clip", lambda: layer_norm(x, 5, grad_clip=float("nan"), backend=backend)),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()


def test_bad_backend_and_module_arguments():
    with pytest.raises(ValueError, match="backend must be one of"):
        layer_norm(torch.randn(2, 3), 3, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        vgk.nn.LayerNorm(3, backend="fast")
    with pytest.raises(ValueError, match="grad_clip must be None or a number > 0, got -1"):
        vgk.nn.LayerNorm(3, grad_clip=-1)


def test_cpp_op_rejects_bad_arguments_itself():
    x = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="float32 or float64, got Half"):
        torch.ops.vgk.layer_norm_forward(x.half(), None, None, 1, 1e-5, None)
    with pytest.raises(RuntimeError, match="normalized_ndim must be in"):
        torch.ops.vgk.layer_norm_forward(x, None, None, 3, 1e-5, None)
    with pytest.raises(RuntimeError, match="weight must have 5 elements"):
        torch.ops.vgk.layer_norm_forward(x, torch.ones(4), None, 1, 1e-5, None)


# ---------------------------------------------------------------------------------------------------
# GPU (VGK_TEST_CUDA=1 on a CUDA machine)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 4e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("shape", [(37, 1), (64, 4096), (3, 7, 1500), (5, 3 * 8192 + 5)])
def test_gpu_matches_torch(dtype, atol, shape):
    assert CUDA and torch.cuda.is_available()
    x, w, b = make(shape, shape[-1:], dtype=dtype, device="cuda")
    out = layer_norm(x, shape[-1:], w, b, grad_clip=1.0)
    want = F.layer_norm(x, shape[-1:], w, b)
    torch.testing.assert_close(out.float(), want.float(), atol=atol, rtol=0)
    upstream = torch.randn_like(out)
    _, dw, db = grads(out, (x, w, b), upstream)
    _, dw_t, db_t = grads(want, (x, w, b), upstream)
    assert normwise(dw, dw_t) < max(atol, 1e-5) and normwise(db, db_t) < max(atol, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_gpu_autocast_matches_torch(dtype):
    """Under torch.autocast("cuda") torch casts layer_norm to float32: so does the module."""
    assert CUDA and torch.cuda.is_available()
    linear = torch.nn.Linear(8, 64).cuda()
    theirs = torch.nn.LayerNorm(64).cuda()
    ours = vgk.nn.LayerNorm(64).cuda()
    x = torch.randn(16, 8, device="cuda")
    # Not out.square().sum(): that is constant in the LN's input up to eps, so its input gradient is
    # rounding noise and comparing it means nothing.
    upstream = torch.randn(16, 64, device="cuda")
    results = []
    for norm in (ours, theirs):
        with torch.autocast("cuda", dtype=dtype):
            out = norm(linear(x))
        params = [*norm.parameters(), *linear.parameters()]
        results.append((out, torch.autograd.grad((out * upstream).sum(), params)))
    (out, got), (want, ref) = results
    assert out.dtype == want.dtype == torch.float32
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    # The LayerNorm's own gradients are float32 sums; the Linear's pass through its backward in dtype,
    # where float32 differences of an ulp can round to neighbouring values of dtype.
    for g, r, tol in zip(got, ref, (1e-4, 1e-4, torch.finfo(dtype).eps, torch.finfo(dtype).eps), strict=True):
        assert g.dtype == r.dtype and normwise(g, r) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_gpu_half_input_with_float32_parameters(dtype):
    assert CUDA and torch.cuda.is_available()
    x, w, b = make((64, 1500), (1500,), device="cuda")
    x = x.detach().to(dtype).requires_grad_()
    # torch's CUDA layer_norm refuses mixed dtypes (its CPU one takes them): the float32 computation
    # rounded to dtype, which is what torch's CPU kernel returns.
    out, want = layer_norm(x, 1500, w, b), F.layer_norm(x.float(), (1500,), w, b).to(dtype)
    assert out.dtype == want.dtype == dtype
    torch.testing.assert_close(out.float(), want.float(), atol=4e-2, rtol=0)
    upstream = torch.randn_like(out)
    for g, t in zip(grads(out, (x, w, b), upstream), grads(want, (x, w, b), upstream), strict=True):
        assert g.dtype == t.dtype and normwise(g, t) < 2e-2


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    assert CUDA and torch.cuda.is_available()
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), vgk.nn.LayerNorm(64, grad_clip=0.5)).cuda()
    x = torch.randn(16, 8, device="cuda")
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert not math.isnan(compiled.sum().item())
