"""Extreme values: saturating nonlinearities and LayerNorm statistics that do not overflow.

Recurrent layers: the gates saturate to exactly torch's values (sigmoid 0 and 1, tanh -1 and 1) with
derivatives that reach exactly 0, in every backend. The acceptance sweep scales the recurrent weights by
1, 10, ..., 1e30 in float32 and compares every output and gradient, element by element, with torch.nn's
float32 result and a float64 run of the reference:
- where torch is finite, ours is finite and within RTOL_SWEEP of the tensor's largest float64 value, or
  at most 4 times as far from float64 as torch is;
- where torch gives NaN, ours gives NaN; where it gives inf, the same inf (or, in either case, a finite
  value within RTOL_SWEEP of float64);
- once the float64 forward itself leaves float32's range (the relu RNN from 1e14 on), float32 cannot
  hold the states; there only "non-finite where torch is non-finite" is asked, as inf + (-inf) or an
  overflow to inf depends on the GEMM's order of summation.
Cells without a torch.nn counterpart (sigmoid RNN, layer-normalized LSTM/GRU) are compared with float64
alone: finite where it is finite, within RTOL_SWEEP.

The nonlinearities alone: outputs within 5e-7 relative of torch's, derivatives within 2.5e-7 absolute.

LayerNorm: rows scaled up to float32's maximum, against the reference in float64: output and every
gradient finite and within RTOL_LN of the row's (tensor's, for the parameter gradients) largest value,
plus 8 float32 roundings times |mean|/std for a row whose mean is far from 0 (as in torch, whose float32
mean carries that error into x - mean); equal to torch's float32 result where torch is right (rows up to
1e15). Rows holding inf or NaN give NaN, as torch.

The tests marked gpu repeat the sweep, the nonlinearities (outside a margin around the saturation
points, where the GPU's approximate exp may round an ulp apart from torch) and the LayerNorm rows with
the Triton kernels on CUDA (VGK_TEST_CUDA=1).
"""

import os

import pytest
import torch
import torch.nn.functional as F

import vgkernels as vgk
import vgkernels.triton.layer_norm as tln

BACKENDS = ("cpp", "triton", "reference")
RTOL_SWEEP = 1e-4
RTOL_LN = 1e-5
FLOAT32_MAX = torch.finfo(torch.float32).max
FLOAT32_TINY = torch.finfo(torch.float32).tiny
I, H, T, B = 3, 5, 4, 2
CELLS = [("lstm", False), ("gru", False), ("tanh", False), ("relu", False), ("sigmoid", False),
         ("lstm", True), ("gru", True)]
FAST_EXPONENTS = (0, 10, 19, 20, 25, 30)
CUDA = os.environ.get("VGK_TEST_CUDA") == "1"

# The Triton interpreter computes in NumPy, which warns where float32 overflows, as it must here.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ---------------------------------------------------------------------------------------------------
# The nonlinearities themselves


def activation_layer(nonlinearity: str, backend: str) -> torch.nn.Module:
    """An RNN whose step is h = act(x) for a scalar input: W_ih = 1, W_hh = 0, no bias."""
    m = vgk.nn.RNN(1, 1, nonlinearity=nonlinearity, bias=False, backend=backend)
    with torch.no_grad():
        m.weight_ih_l0.fill_(1.0)
        m.weight_hh_l0.zero_()
    return m


def activation_points(n: int) -> torch.Tensor:
    """A grid over [-120, 120] and the points where float32's sigmoid and tanh saturate."""
    edges = [-103.98, -103.28, -88.7229, -88.7228, -87.3365, -17.33, -9.01, -8.3, 8.3, 9.01, 16.64,
             17.33, 88.7228, float("inf"), -float("inf"), float("nan"), 0.0, -0.0]
    return torch.cat([torch.linspace(-120, 120, n), torch.tensor(edges)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nonlinearity,torch_fn", [("sigmoid", torch.sigmoid), ("tanh", torch.tanh),
                                                   ("relu", torch.relu)])
def test_nonlinearities_saturate_exactly_as_torch(backend, nonlinearity, torch_fn):
    x = activation_points(200_001 if backend == "cpp" else 2001)
    ours = x[None, :, None].clone().requires_grad_()  # T = 1, one sample per point
    y, _ = activation_layer(nonlinearity, backend)(ours)
    y.sum().backward()
    theirs = x.clone().requires_grad_()
    y_t = torch_fn(theirs)
    y_t.sum().backward()
    y, dy, dy_t = y.detach().flatten(), ours.grad.flatten(), theirs.grad
    # The derivatives come from the outputs (s (1 - s), 1 - t^2), so near 1 they differ by an ulp of 1.
    for a, b, atol in ((y, y_t.detach(), 1e-38), (dy, dy_t, 2.5e-7)):
        assert torch.equal(a.isnan(), b.isnan())
        for value in (0.0, 1.0, -1.0):  # exactly the saturated values where torch has them, nowhere else
            assert torch.equal(a == value, b == value), value
        finite = torch.isfinite(b)
        torch.testing.assert_close(a[finite], b[finite], rtol=5e-7, atol=atol)


# ---------------------------------------------------------------------------------------------------
# Recurrent weights scaled up to 1e30


def make_module(kind: str, layer_norm: bool, backend: str, dtype: torch.dtype) -> torch.nn.Module:
    if kind in ("lstm", "gru"):
        cls = vgk.nn.LSTM if kind == "lstm" else vgk.nn.GRU
        return cls(I, H, layer_norm=layer_norm, backend=backend, dtype=dtype)
    return vgk.nn.RNN(I, H, nonlinearity=kind, backend=backend, dtype=dtype)


def torch_module(kind: str, layer_norm: bool) -> torch.nn.Module | None:
    if layer_norm or kind == "sigmoid":
        return None
    if kind in ("tanh", "relu"):
        return torch.nn.RNN(I, H, nonlinearity=kind)
    return {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind](I, H)


def outputs_and_grads(model, state, x, dtype, device="cpu") -> dict[str, torch.Tensor]:
    """The outputs and every gradient, as float64 CPU tensors, of model run on device."""
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    model.to(device)
    x = x.detach().to(device, dtype).clone().requires_grad_()
    out, final = model(x)
    tensors = {"output": out}
    tensors.update({f"h_n[{i}]": h for i, h in enumerate(final if isinstance(final, tuple) else (final,))})
    weights = [torch.sin(torch.arange(t.numel(), dtype=dtype, device=device)).view(t.shape)
               for t in tensors.values()]
    loss = sum((t * w).sum() for t, w in zip(tensors.values(), weights, strict=True))
    loss.backward()
    tensors["input.grad"] = x.grad
    tensors.update({f"{n}.grad": p.grad for n, p in model.named_parameters()})
    return {k: v.detach().double().cpu() for k, v in tensors.items()}


def sweep_failures(ours, theirs, exact) -> list[str]:
    """The elements that break the rules of the module docstring, one line per tensor."""
    overflowed = any((exact[k].abs() > FLOAT32_MAX).any() for k in exact if not k.endswith(".grad"))
    failures = []
    for name, e in exact.items():
        o = ours[name]
        finite = torch.isfinite(e)
        # Below float32's normal range only absolute accuracy is possible (a gradient of 1e-60 is 0).
        tol = max(RTOL_SWEEP * (e[finite].abs().max().item() if finite.any() else 0.0), FLOAT32_TINY)
        err = (o - e).abs()
        close = torch.isfinite(o) & finite & (err <= tol)
        if theirs is None:
            ok = ~finite | close
        else:
            t = theirs[name]
            t_finite = torch.isfinite(t)
            ok = ~t_finite | close | (torch.isfinite(o) & (err <= 4 * (t - e).abs()))
            if overflowed:
                ok &= t_finite | ~torch.isfinite(o) | close
            else:
                ok &= ~t.isnan() | o.isnan() | close
                ok &= ~t.isinf() | (o == t) | close
        if not ok.all():
            i = tuple((~ok).nonzero()[0].tolist())
            t_i = theirs[name][i].item() if theirs is not None else float("nan")
            failures.append(f"{name}{list(i)}: ours {o[i].item():.4g}, torch {t_i:.4g}, "
                            f"float64 {e[i].item():.4g} ({int((~ok).sum())} elements)")
    return failures


def run_sweep(kind: str, layer_norm: bool, backend: str, exponents, device: str = "cpu") -> None:
    state = make_module(kind, layer_norm, "reference", torch.float32).state_dict()
    x = torch.randn(T, B, I)
    problems = []
    for e in exponents:
        scaled = {k: v * 10.0**e if k.startswith("weight_hh") else v for k, v in state.items()}
        exact = outputs_and_grads(make_module(kind, layer_norm, "reference", torch.float64), scaled, x,
                                  torch.float64)
        reference = torch_module(kind, layer_norm)
        theirs = None if reference is None else outputs_and_grads(reference, scaled, x, torch.float32)
        ours = outputs_and_grads(make_module(kind, layer_norm, backend, torch.float32), scaled, x,
                                 torch.float32, device)
        problems += [f"W_hh x 1e{e}: {f}" for f in sweep_failures(ours, theirs, exact)]
    assert not problems, "\n".join(problems)


CELL_IDS = [f"{k}{'-ln' if ln else ''}" for k, ln in CELLS]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,layer_norm", CELLS, ids=CELL_IDS)
def test_weight_scale_sweep(backend, kind, layer_norm):
    run_sweep(kind, layer_norm, backend, FAST_EXPONENTS)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,layer_norm", CELLS, ids=CELL_IDS)
def test_weight_scale_sweep_every_decade(backend, kind, layer_norm):
    run_sweep(kind, layer_norm, backend, range(31))


def test_saturated_gru_gradient_is_exact():
    """The case that a floored sigmoid got wrong: W_hh x 1e20 sent a 6e-39 gate derivative through
    hn ~ 1e20 into the input gradient (off by 1165); saturated gates must pass exactly 0."""
    torch.manual_seed(1)
    theirs = torch.nn.GRU(4, 8)
    with torch.no_grad():
        theirs.weight_hh_l0.mul_(1e20)
    ours = vgk.nn.GRU(4, 8, backend="cpp")
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(20, 3, 4)
    grads = []
    for m in (ours, theirs):
        xi = x.clone().requires_grad_()
        m(xi)[0].sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# LayerNorm rows up to float32's maximum


@pytest.fixture
def looped(monkeypatch):
    monkeypatch.setattr(tln, "MAX_FUSED", 16)
    monkeypatch.setattr(tln, "LOOP_BLOCK", 16)


def extreme_rows(n: int) -> torch.Tensor:
    """Rows of ordinary values scaled by 1 ... 1e37, one far from 0 and narrow, and one reaching
    float32's maximum."""
    base = torch.randn(12, n)
    x = base * torch.tensor([10.0**e for e in (0, 5, 10, 15, 18, 19, 20, 25, 30, 35, 37, 0)])[:, None]
    x[10] = 1e20 + base[10] * 1e16  # mean 1e20, std 1e16
    x[11] = base[11] / base[11].abs().max() * FLOAT32_MAX
    return x


def layer_norm_run(x, w, b, dy, backend, grad_clip):
    inputs = [t.clone().requires_grad_() for t in (x, w, b)]
    if backend == "torch":
        y = F.layer_norm(inputs[0], x.shape[-1:], inputs[1], inputs[2])
    else:
        y = vgk.ops.layer_norm(inputs[0], x.shape[-1], inputs[1], inputs[2], grad_clip=grad_clip,
                               backend=backend)
    (y * dy.to(y.dtype)).sum().backward()
    return [y.detach()] + [t.grad for t in inputs]


def row_rtol(x: torch.Tensor) -> torch.Tensor:
    """Per row: RTOL_LN, plus 8 float32 roundings times |mean| / std (a float32 mean far from 0 carries
    that error into every x - mean; torch's too)."""
    xd = x.double()
    return RTOL_LN + 8 * 2.0**-24 * xd.mean(-1).abs() / xd.std(-1, correction=0)


def assert_layer_norm_close(got, exact, x, name=""):
    """got finite, and within row_rtol of exact's largest |value| (per row, or over the whole tensor for
    the parameter gradients, which sum over the rows)."""
    rtol = row_rtol(x)
    assert torch.isfinite(got).all(), name
    err = (got.double() - exact).abs()
    if got.dim() == 2:
        bad = (err > (rtol * exact.abs().amax(-1))[:, None]).any(-1)
        assert not bad.any(), (name, bad.nonzero().flatten().tolist())
    else:
        assert (err <= rtol.max() * exact.abs().max()).all(), (name, err.max().item())


@pytest.mark.parametrize("grad_clip", (None, 0.5))
@pytest.mark.parametrize("n", (37, 1024))
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_rows_up_to_float32_max(backend, n, grad_clip):
    x = extreme_rows(n)
    w, b, dy = torch.randn(n), torch.randn(n), torch.randn(12, n)
    got = layer_norm_run(x, w, b, dy, backend, grad_clip)
    exact = layer_norm_run(x.double(), w.double(), b.double(), dy.double(), "reference", grad_clip)
    for name, g, e in zip(("output", "input.grad", "weight.grad", "bias.grad"), got, exact, strict=True):
        assert_layer_norm_close(g, e, x, name)
    if grad_clip is None:  # where torch is right (rows of values up to 1e15), ours is torch's
        theirs = layer_norm_run(x[:4], w, b, dy[:4], "torch", None)
        ours = layer_norm_run(x[:4], w, b, dy[:4], backend, None)
        for g, t in zip(ours, theirs, strict=True):
            torch.testing.assert_close(g, t, rtol=1e-4, atol=1e-5)


def test_layer_norm_triton_looped_rows_up_to_float32_max(looped):
    x = extreme_rows(37)
    w, b, dy = torch.randn(37), torch.randn(37), torch.randn(12, 37)
    for grad_clip in (None, 0.5):
        got = layer_norm_run(x, w, b, dy, "triton", grad_clip)
        exact = layer_norm_run(x.double(), w.double(), b.double(), dy.double(), "reference", grad_clip)
        for g, e in zip(got, exact, strict=True):
            assert_layer_norm_close(g, e, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_inf_and_nan_rows_give_nan_as_torch(backend):
    x = torch.randn(4, 37)
    x[1, 3] = float("inf")
    x[2, 5] = float("nan")
    x[3, 0], x[3, 1] = FLOAT32_MAX, -FLOAT32_MAX  # finite: no NaN here
    ours = vgk.ops.layer_norm(x, 37, backend=backend)
    theirs = F.layer_norm(x, (37,))
    assert torch.equal(ours[:3].isnan(), theirs[:3].isnan())
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(ours[3]).all()


# ---------------------------------------------------------------------------------------------------
# GPU (VGK_TEST_CUDA=1 on a CUDA machine)


@pytest.mark.gpu
@pytest.mark.parametrize("kind,layer_norm", CELLS, ids=CELL_IDS)
def test_gpu_weight_scale_sweep(kind, layer_norm, ieee_float32):
    """The Triton kernels compiled for the GPU (tl.exp there is an approximation) against the same
    CPU oracles, in IEEE float32 (TF32 would round the products' operands to 10 bits)."""
    assert CUDA and torch.cuda.is_available()
    run_sweep(kind, layer_norm, "triton", range(31), device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("nonlinearity,torch_fn", [("sigmoid", torch.sigmoid), ("tanh", torch.tanh),
                                                   ("relu", torch.relu)])
def test_gpu_nonlinearities_saturate_as_torch(nonlinearity, torch_fn, ieee_float32):
    """On the GPU: exactly 0, 1 and -1 (and derivatives exactly 0) beyond a margin around where float32
    saturates, where the approximate exp may round differently than torch's by an ulp.
    IEEE float32: TF32 would round the input on its way through W_ih = 1."""
    assert CUDA and torch.cuda.is_available()
    x = activation_points(200_001).cuda()
    ours = x[None, :, None].clone().requires_grad_()
    y, _ = activation_layer(nonlinearity, "triton").cuda()(ours)
    y.sum().backward()
    theirs = x.clone().requires_grad_()
    y_t = torch_fn(theirs)
    y_t.sum().backward()
    a = x.abs()
    away = ~(((a > 87.0) & (a < 104.0)) | ((a > 16.0) & (a < 17.6)) | ((a > 8.0) & (a < 9.3)))
    for got, want in ((y.detach().flatten(), y_t.detach()), (ours.grad.flatten(), theirs.grad)):
        assert torch.equal(got.isnan(), want.isnan())
        for value in (0.0, 1.0, -1.0):
            assert torch.equal((got == value)[away], (want == value)[away]), value
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite], rtol=2e-6, atol=5e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("n", (37, 1024, 3 * 8192 + 5))
def test_gpu_layer_norm_rows_up_to_float32_max(n):
    assert CUDA and torch.cuda.is_available()
    x = extreme_rows(n)
    w, b, dy = torch.randn(n), torch.randn(n), torch.randn(12, n)
    for grad_clip in (None, 0.5):
        got = layer_norm_run(x.cuda(), w.cuda(), b.cuda(), dy.cuda(), "triton", grad_clip)
        exact = layer_norm_run(x.double(), w.double(), b.double(), dy.double(), "reference", grad_clip)
        for g, e in zip(got, exact, strict=True):
            assert_layer_norm_close(g.cpu(), e, x)
