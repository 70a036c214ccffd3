"""The Triton layer-normalized recurrent ops vgk::rnn_ln_forward_triton / vgk::rnn_ln_backward_triton.

On CPU they run under TRITON_INTERPRET=1 (tests/conftest.py) at small shapes, both loop kinds: the
persistent loop and the step loop (a few kernels per step, row statistics through per-tile partials), the
latter also with the launch plans of a GPU (split K, element-wise tiles of 2 rows) and over the static
buffers a CUDA graph replays; the tests marked ``gpu`` run them at real sizes on CUDA (VGK_TEST_CUDA=1).

Oracles: the eager float64 loop of tests/ln_cell_oracle.py (values, every gradient, total-derivative
gradient norms, jacrev Jacobian norms), the C++ ops, and at module level the eager reference modules.
Tolerances: float64 rtol 1e-9, atol 1e-10; float32 rtol 1e-4, atol 1e-5 (squared norms: at least rtol
1e-6, atol relative to their largest value); against the C++ ops rtol 1e-4, atol 1e-5; float16 /
bfloat16 against float64: normwise relative error 1e-2 / 3e-2; float64 gradcheck (fast mode) with
torch's defaults.
Every output and scratch buffer is allocated NaN-filled, so an element a kernel fails to write (or
reads before writing) fails the comparison.
"""

import os

import ln_cell_oracle
import pytest
import torch
from ln_cell_oracle import (
    assert_matches,
    backward_args,
    check_ops,
    forward_args,
    gradcheck_layer,
    make_inputs,
    make_output_grads,
    oracle,
)

import vgkernels as vgk
import vgkernels.triton.recurrent as plain_triton
import vgkernels.triton.recurrent_ln as trl

OPS = torch.ops.vgk
CUDA = os.environ.get("VGK_TEST_CUDA") == "1"
LOOPS = ("persistent", "step")


@pytest.fixture(autouse=True)
def _nan_fill(monkeypatch):
    monkeypatch.setattr(plain_triton, "_ALLOC_FILL", float("nan"))


@pytest.fixture
def loop(request, monkeypatch):
    monkeypatch.setenv(plain_triton.LOOP_ENV, request.param)
    return request.param


@pytest.fixture
def gpu_plans(monkeypatch):
    """Step plans made as if for a GPU of 64 SMs: at these small shapes K is split over several programs
    and the element-wise kernels take tiles of 2 rows x 16 units."""
    monkeypatch.setattr(plain_triton, "_INTERPRETER_SMS", 64)
    monkeypatch.setenv(plain_triton.LOOP_ENV, "step")


def run_ops(inp, mode, reverse, gs, gcs, clip=None, track=True, triton=True):
    fwd_op, bwd_op = ((OPS.rnn_ln_forward_triton, OPS.rnn_ln_backward_triton) if triton
                      else (OPS.rnn_ln_forward, OPS.rnn_ln_backward))
    return ln_cell_oracle.run_ops(fwd_op, bwd_op, inp, mode, reverse, gs, gcs, clip, track)


def check(mode, T, B, H, dtype, **kwargs):
    ops = (OPS.rnn_ln_forward_triton, OPS.rnn_ln_backward_triton)
    inp, gs, gcs, got, _ = check_ops(*ops, mode, T, B, H, dtype, **kwargs)
    return inp, gs, gcs, got


@pytest.mark.parametrize("loop", LOOPS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("reverse,lengths,clip", [(False, None, None), (True, [3, 1, 2], None),
                                                  (False, [2, 3, 1], 0.05)])
def test_ops_match_oracle(dtype, mode, reverse, lengths, clip, loop):
    check(mode, 3, 3, 5, dtype, reverse=reverse, lengths=lengths, clip=clip)


@pytest.mark.parametrize("loop", LOOPS, indirect=True)
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("T,B,H", [(1, 1, 1), (4, 1, 3), (2, 17, 37)])
def test_odd_sizes(mode, T, B, H, loop):
    """B = 17 spans two batch blocks; H = 37 and 3H, 4H are no multiple of any block."""
    lengths = None if B == 1 else [1 + b % T for b in range(B)]
    check(mode, T, B, H, torch.float32, reverse=True, lengths=lengths)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_step_loop_with_gpu_plans(mode, dtype, gpu_plans):
    """Split K in both dot kernels (the last of a tile's programs sums the partials), row statistics
    combined from many tiles, every output NaN-filled beforehand; odd sizes, lengths, reverse, clipping."""
    p = trl._plan(3, 37, trl.GATES[mode], torch.device("cpu"), dtype)
    assert p["loop"] == "step" and p["fwd"]["SPLIT"] > 1 and p["bwd"]["SPLIT"] > 1
    assert (p["gates"]["BLOCK_B"], p["gates"]["BLOCK_J"]) == (2, 16)
    check(mode, 3, 3, 37, dtype, reverse=True, lengths=[3, 1, 2], clip=0.05)
    check(mode, 2, 17, 5, dtype, lengths=[1 + b % 2 for b in range(17)])


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_step_loop_gradcheck_float64(mode, gpu_plans):
    assert gradcheck_layer(mode, "triton", reverse=True, fast_mode=True)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_step_loop_weight_scale_sweep(mode, gpu_plans):
    """W_hh scaled up to 1e30: the row statistics combined from many tiles scale the squares that would
    overflow float32, as the persistent loop and the C++ kernels do (tolerances of test_extreme_values)."""
    from test_extreme_values import FAST_EXPONENTS, run_sweep

    run_sweep(mode, True, "triton", FAST_EXPONENTS)


def test_graph_buffers_replay_and_stay_untouched_while_held(graph_calls):
    """The step loop over the static buffers a CUDA graph replays (re-launched instead of replayed here):
    right results, and an entry whose outputs are still held is not reused."""
    from vgkernels.triton import _graphs

    for mode in ("lstm", "gru"):
        inp_a = make_inputs(mode, 3, 2, 6, torch.float32, lengths=[3, 2])
        inp_b = make_inputs(mode, 3, 2, 6, torch.float32, lengths=[2, 3], seed=1)
        gs, gcs = make_output_grads(mode, 3, 2, 6, torch.float32)
        run_ops(inp_a, mode, False, gs, gcs)  # a shape's first call runs without a graph
        held = run_ops(inp_a, mode, False, gs, gcs)
        expected = {k: v.clone() for k, v in held.items()}
        want = oracle(inp_b, mode, False, gs, gcs)
        for _ in range(2):  # another entry (the first one's outputs are held), then that entry again
            assert_matches(run_ops(inp_b, mode, False, gs, gcs), want, *ln_cell_oracle.TOL[torch.float32])
        for name, value in held.items():
            torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    assert sum(len(pool) for pool in _graphs._entries.values()) == 8  # 2 modes x 2 x (forward, backward)


def test_gru_without_b_hh_and_untracked():
    _, _, _, got = check("gru", 3, 2, 4, torch.float32, gru_bias=False, track=False)
    assert got["grad_b_hh"].shape == (0,) and got["jac_sq"].shape == (0,) and got["grad_sq"].shape == (0,)
    assert got["grad_c0"].shape == (0,) and got["grad_ln_cell_weight"].shape == (0,)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_matches_cpp_ops(mode):
    inp = make_inputs(mode, 4, 3, 6, torch.float32, lengths=[4, 2, 3])
    gs, gcs = make_output_grads(mode, 4, 3, 6, torch.float32)
    ours = run_ops(inp, mode, True, gs, gcs, clip=0.3)
    cpp = run_ops(inp, mode, True, gs, gcs, clip=0.3, triton=False)
    for name in cpp:
        torch.testing.assert_close(ours[name], cpp[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_half_dtypes(mode, dtype, tol):
    inp = make_inputs(mode, 3, 2, 8, dtype, lengths=[3, 2])
    gs, gcs = make_output_grads(mode, 3, 2, 8, dtype)
    got = run_ops(inp, mode, False, gs, gcs)
    want = oracle(inp, mode, False, gs, gcs)
    assert got["states"].dtype == dtype and got["workspace"].dtype == torch.float32
    assert got["jac_sq"].dtype == torch.float32
    for name, w in want.items():
        if w.numel():
            err = (got[name].double() - w).norm() / w.norm().clamp_min(1e-12)
            assert err < tol, f"{name}: normwise relative error {err:.2e}"


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_gradcheck_float64(mode):
    # fast_mode (random projections): the interpreter pays per launch; the float64 oracle tests above
    # compare every gradient element by element.
    assert gradcheck_layer(mode, "triton", reverse=False, fast_mode=True)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_modules_and_traces_match_cpp_and_reference(mode):
    """Two bidirectional layers in float64 (in float32 this configuration is conditioned so that even the
    eager reference is off by ~5e-4 from float64): outputs, input and parameter gradients, traces."""
    cls = {"lstm": vgk.nn.LSTM, "gru": vgk.nn.GRU}[mode]
    kwargs = dict(num_layers=2, bidirectional=True, layer_norm=True, dtype=torch.float64)
    torch.manual_seed(1)
    ours = cls(3, 5, backend="triton", **kwargs)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.startswith("layer_norm"):
                p.add_(0.3 * torch.randn_like(p))
    others = {b: cls(3, 5, backend=b, **kwargs) for b in ("cpp", "reference")}
    for m in others.values():
        m.load_state_dict(ours.state_dict())
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    w = torch.randn(5, 3, 10, dtype=torch.float64)
    results = {}
    for name, m in [("triton", ours), *others.items()]:
        xi = x.clone().requires_grad_()
        with vgk.track(m) as traces:
            out, _ = m(xi)
            (out * w).sum().backward()
        results[name] = (out.detach(), xi.grad, [p.grad for p in m.parameters()], traces[""])
    for other in ("cpp", "reference"):
        a, b = results["triton"], results[other]
        for ta, tb in zip([a[0], a[1], *a[2]], [b[0], b[1], *b[2]], strict=True):
            torch.testing.assert_close(ta, tb, rtol=1e-9, atol=1e-10)
        fields = ["grad_norm_per_sample", "jacobian_norm_per_sample"]
        for field in fields + (["cell_grad_norm"] if mode == "lstm" else []):
            torch.testing.assert_close(getattr(a[3], field), getattr(b[3], field), rtol=1e-5, atol=1e-6)


def _bad_cases():
    lstm = make_inputs("lstm", 2, 2, 3, torch.float32)
    gru = make_inputs("gru", 2, 2, 3, torch.float32)
    yield "mode", dict(gru), "rnn_tanh", ValueError, "mode must be 'lstm' or 'gru'"
    yield "ln dtype", dict(lstm, ln_hh_bias=lstm["ln_hh_bias"].double()), "lstm", TypeError, "ln_hh_bias"
    yield "ln shape", dict(gru, ln_hh_weight=gru["ln_hh_weight"][:4]), "gru", ValueError, "ln_hh_weight"
    yield "no cell ln", dict(lstm, ln_cell_bias=None), "lstm", ValueError, "ln_cell_bias"
    yield "cell ln on gru", dict(gru, ln_cell_weight=torch.ones(3)), "gru", ValueError, "ln_cell_weight"
    yield "b_hh on lstm", dict(lstm, b_hh=torch.zeros(12)), "lstm", ValueError, "b_hh"
    yield "xproj int", dict(gru, xproj=gru["xproj"].int()), "gru", TypeError, "xproj"


@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[0])
def test_forward_rejects_bad_input(case):
    _, inp, mode, exc, match = case
    with pytest.raises(exc, match=match):
        OPS.rnn_ln_forward_triton(*forward_args(inp, mode, False, False))


def test_backward_rejects_bad_workspace_and_clip():
    inp = make_inputs("gru", 2, 2, 3, torch.float32)
    gs, gcs = make_output_grads("gru", 2, 2, 3, torch.float32)
    fwd = OPS.rnn_ln_forward_triton(*forward_args(inp, "gru", False, False))
    args = list(backward_args(inp, fwd, gs, gcs, "gru", False, None, False))
    with pytest.raises(TypeError, match="workspace"):
        OPS.rnn_ln_backward_triton(*args[:4], args[4].double(), *args[5:])
    args[11] = -1.0
    with pytest.raises(ValueError, match="grad_clip"):
        OPS.rnn_ln_backward_triton(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_cuda_matches_cpp(mode, ieee_float32):
    assert CUDA and torch.cuda.is_available()
    T, B, H = 16, 40, 96
    inp = make_inputs(mode, T, B, H, torch.float32, lengths=[T - b % 5 for b in range(B)])
    gs, gcs = make_output_grads(mode, T, B, H, torch.float32)
    cpp = run_ops(inp, mode, False, gs, gcs, clip=1.0, triton=False)
    cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    ours = run_ops(cuda, mode, False, gs.cuda(), gcs.cuda(), clip=1.0)
    for name in cpp:
        torch.testing.assert_close(ours[name].cpu(), cpp[name], rtol=1e-4, atol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")
