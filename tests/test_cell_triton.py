"""The Triton cell ops ``vgk::cell_forward_triton`` / ``vgk::cell_backward_triton`` and the cells on them.

On CPU they run under TRITON_INTERPRET=1 (tests/conftest.py) at small shapes; every output is
allocated NaN-filled, so an element a kernel fails to write fails the comparison. The kernels are
also compiled for sm_90 (without a GPU), and the tests marked ``gpu`` run them on CUDA
(VGK_TEST_CUDA=1).

Oracles: the eager reference backend (values, gradients, traces) and torch.nn (on CUDA).
Tolerances: float64 rtol 1e-10, atol 1e-12; float32 (and the float32 trace fields) rtol 1e-4, atol 1e-5
(sums over 130 units in another order than the reference); float16 / bfloat16 against float64:
normwise relative error 5e-3 / 3e-2.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.autograd.gradcheck import gradgradcheck

import vgkernels as vgk
import vgkernels.triton.cell as tc

MODES = ["lstm", "gru", "rnn_tanh", "rnn_relu", "rnn_sigmoid"]
CUDA = os.environ.get("VGK_TEST_CUDA") == "1"
DEVICE = "cuda" if CUDA else "cpu"
F64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=1e-4, atol=1e-5)
TRACE_FIELDS = ["jacobian_norm_per_sample", "grad_norm_per_sample", "cell_grad_norm_per_sample",
                "output_grad_norm_per_sample", "output_cell_grad_norm_per_sample"]


@pytest.fixture(autouse=True)
def _nan_fill(monkeypatch):
    monkeypatch.setattr(tc, "_ALLOC_FILL", float("nan"))


def make_args(mode, B, I, H, dtype, with_state=True, bias=True, device=DEVICE):
    G = tc._GATES[mode]
    gen = torch.Generator().manual_seed(17 * B + 5 * I + H)

    def rand(*shape, scale=1.0):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        return t.to(device=device, dtype=dtype).requires_grad_()

    return dict(
        x=rand(B, I),
        h=rand(B, H, scale=0.5) if with_state else None,
        c=rand(B, H) if with_state and mode == "lstm" else None,
        w_ih=rand(G * H, I, scale=max(I, 1) ** -0.5),
        w_hh=rand(G * H, H, scale=max(H, 1) ** -0.5),
        b_ih=rand(G * H, scale=0.5) if bias else None,
        b_hh=rand(G * H, scale=0.5) if bias else None,
    )


def call(mode, args, backend, track=True):
    hx = None if args["h"] is None else ((args["h"], args["c"]) if mode == "lstm" else args["h"])
    weights = (args["w_ih"], args["w_hh"], args["b_ih"], args["b_hh"])
    h, c, trace = vgk.ops.cell(args["x"], hx, *weights, mode=mode, track=track, backend=backend)
    return [h] + ([c] if c is not None else []), trace


def loss_and_grads(mode, args, backend):
    outs, trace = call(mode, args, backend)
    loss = sum((o * torch.linspace(-1, 2, o.numel(), dtype=o.dtype, device=o.device).view_as(o)).sum()
               + 0.2 * o.float().square().sum() for o in outs)
    tensors = [t for t in args.values() if t is not None]
    for t in tensors:
        t.grad = None
    loss.backward()
    return outs, [t.grad for t in tensors], trace


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_state, bias", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("B, I, H", [(1, 1, 1), (3, 5, 37), (17, 3, 130)])
def test_matches_reference(mode, dtype, with_state, bias, B, I, H):
    # (17, 130): two row blocks and two hidden tiles, both partly masked.
    args = make_args(mode, B, I, H, dtype, with_state, bias)
    outs_a, grads_a, trace_a = loss_and_grads(mode, args, "triton")
    outs_b, grads_b, trace_b = loss_and_grads(mode, args, "reference")
    tol = F64 if dtype == torch.float64 else F32
    for a, b in zip(outs_a + grads_a, outs_b + grads_b, strict=True):
        assert a.dtype == b.dtype and not a.isnan().any()
        torch.testing.assert_close(a, b, **tol)
    for field in TRACE_FIELDS:
        a, b = getattr(trace_a, field), getattr(trace_b, field)
        if a is None:
            assert b is None and mode != "lstm"
            continue
        torch.testing.assert_close(a, b, **F32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype, bound", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_against_float64(mode, dtype, bound):
    args = make_args(mode, 5, 6, 24, dtype)
    exact = {k: None if v is None else v.detach().double().requires_grad_() for k, v in args.items()}
    outs_a, grads_a, _ = loss_and_grads(mode, args, "triton")
    outs_b, grads_b, _ = loss_and_grads(mode, exact, "reference")
    for a, b in zip(outs_a + grads_a, outs_b + grads_b, strict=True):
        assert a.dtype == dtype
        assert ((a.double() - b).norm() / b.norm()).item() < bound


@pytest.mark.parametrize("mode", ["lstm", "rnn_tanh"])
def test_second_derivatives(mode):
    args = make_args(mode, 2, 3, 4, torch.float64)
    names = list(args)

    def f(*tensors):
        outs, _ = call(mode, dict(zip(names, tensors, strict=True)), "triton", track=False)
        return tuple(outs)

    assert gradgradcheck(f, tuple(args.values()))


def test_forward_mode_ad_is_not_silently_zero():
    cell = vgk.nn.LSTMCell(3, 4, backend="triton", dtype=torch.float64)
    theirs = torch.nn.LSTMCell(3, 4, dtype=torch.float64)
    theirs.load_state_dict(cell.state_dict())
    x, tangent = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    a = torch.func.jvp(cell, (x,), (tangent,))[1]
    b = torch.func.jvp(theirs, (x,), (tangent,))[1]
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, **F64)
        assert v.abs().sum() > 0


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_relu"])
def test_modules_on_triton_equal_cpp(mode):
    ours = {"lstm": vgk.nn.LSTMCell, "gru": vgk.nn.GRUCell}.get(mode, vgk.nn.RNNCell)
    extra = {"nonlinearity": "relu"} if mode == "rnn_relu" else {}
    a = ours(4, 9, backend="triton", track=True, dtype=torch.float64, **extra)
    b = ours(4, 9, backend="cpp", track=True, dtype=torch.float64, **extra)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, dtype=torch.float64)  # unbatched
    outs = []
    for m in (a, b):
        out = m(x)
        sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
        outs.append(out)
    for u, v in zip(*[o if isinstance(o, tuple) else (o,) for o in outs], strict=True):
        torch.testing.assert_close(u, v, **F64)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **F64)
    torch.testing.assert_close(a.trace.grad_norm, b.trace.grad_norm, **F32)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_empty_batch_and_zero_hidden(mode):
    for B, H in ((0, 4), (3, 0)):
        args = make_args(mode, B, 2, H, torch.float32)
        outs, grads, trace = loss_and_grads(mode, args, "triton")
        assert all(o.shape == (B, H) for o in outs)
        assert all(not g.isnan().any() for g in grads) and trace.batch_size == B


def test_bad_inputs_raise_before_any_kernel():
    args = make_args("gru", 3, 4, 5, torch.float32)
    forward = torch.ops.vgk.cell_forward_triton
    x, h, w_ih, w_hh = args["x"], args["h"], args["w_ih"], args["w_hh"]
    with pytest.raises(RuntimeError, match="hidden0 has inconsistent hidden_size: got 5, expected 6"):
        forward(x, h, None, torch.randn(18, 4), torch.randn(18, 6), None, None, None, "gru", False)
    with pytest.raises(TypeError, match="w_hh: expected dtype torch.float32 like input, got torch.float64"):
        forward(x, None, None, w_ih, w_hh.double(), None, None, None, "gru", False)
    with pytest.raises(ValueError, match="mode"):
        forward(x, None, None, w_ih, w_hh, None, None, None, "lstm2", False)
    with pytest.raises(TypeError, match="2-D"):
        forward(x[0], None, None, w_ih, w_hh, None, None, None, "gru", False)


def test_kernels_compile_for_sm90():
    # The interpreter accepts what a GPU compiler may not: compile every kernel variant that the launches
    # use for sm_90, outside the interpreter, in a process of its own.
    script = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import vgkernels.triton.cell as tc

        def compile(fn, pointers, consts):
            sig = {**pointers, "B": "i32", "H": "i32", **{k: "constexpr" for k in consts}}
            source = ASTSource(fn=fn, signature=sig, constexprs=consts)
            triton.compile(source, target=GPUTarget("cuda", 90, 32))

        tiles = {k: v for k, v in tc.plan(64, 512, 132).items() if k != "num_warps"}
        count = 0
        for dt in ("fp32", "fp64", "bf16", "fp16"):
            acc = "fp64" if dt == "fp64" else "fp32"
            for mode, mode_id in tc._MODE_ID.items():
                G = tc._GATES[mode]
                for track in (False, True):
                    if dt in ("bf16", "fp16") and not track:
                        continue
                    names = ("acc", "xr", "bhh", "hp", "cp", "h", "c")
                    fwd = {f"{n}_ptr": f"*{dt}" for n in names}
                    fwd.update({f"{n}_ptr": f"*{acc}" for n in ("ws", "gram", "diag", "jac")})
                    compile(tc._cell_forward_kernel, fwd, dict(MODE=mode_id, G=G, HAS_BHH=True, TRACK=track,
                                                               **tiles))
                    bwd = {f"{n}_ptr": f"*{dt}" for n in ("gh", "gc")}
                    bwd["ws_ptr"] = f"*{acc}"
                    bwd.update({f"{n}_ptr": f"*{dt}" for n in ("h", "c", "hp", "cp")})
                    bwd.update({f"{n}_ptr": f"*{acc}" for n in ("d", "rec", "dhp", "dcp")})
                    bwd["sq_ptr"] = "*fp64"
                    lstm = mode == "lstm"
                    consts = dict(MODE=mode_id, G=G, NSQ=2 if lstm else 1, HAS_GH=True, HAS_GC=lstm,
                                  TRACK=track, **tiles)
                    compile(tc._cell_backward_kernel, bwd, consts)
                    count += 2
        print("compiled", count)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled 60" in result.stdout


# ---------------------------------------------------------------------------------------------------
# On a GPU


gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("B, H", [(1, 256), (32, 1024), (37, 130)])
def test_gpu_against_torch_nn(mode, B, H):
    ours_cls = {"lstm": vgk.nn.LSTMCell, "gru": vgk.nn.GRUCell}.get(mode, vgk.nn.RNNCell)
    theirs_cls = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell}.get(mode, torch.nn.RNNCell)
    extra = {"nonlinearity": mode[4:]} if mode.startswith("rnn") else {}
    ours = ours_cls(H, H, device="cuda", track=True, **extra)
    theirs = theirs_cls(H, H, device="cuda", **extra)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(B, H, device="cuda", requires_grad=True)
    hx = torch.randn(B, H, device="cuda")
    state = (hx, hx.flip(0)) if mode == "lstm" else hx
    results = []
    for m in (ours, theirs):
        out = m(x, state)
        outs = list(out) if isinstance(out, tuple) else [out]
        grads = torch.autograd.grad(sum((o * o).sum() for o in outs), [x, *m.parameters()])
        results.append(outs + list(grads))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@gpu
def test_gpu_compile_cell_loop():
    torch._dynamo.reset()
    cell = vgk.nn.GRUCell(16, 32, device="cuda")
    head = torch.nn.Linear(32, 1, device="cuda")

    def decode(x):
        h = None
        for t in range(x.shape[0]):
            h = cell(x[t], h)
        return head(h)

    x = torch.randn(5, 4, 16, device="cuda")
    torch.testing.assert_close(torch.compile(decode, fullgraph=True)(x), decode(x), rtol=1e-4, atol=1e-5)
