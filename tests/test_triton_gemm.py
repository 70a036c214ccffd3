"""vgkernels.triton.gemm: the recurrent layers' products around the time loop (input projection, its
gradients, the gradients of W_hh and h0) in the precision of cuDNN's switch.

The Triton kernel runs on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py) with
``gemm._FORCE_TRITON`` (on a GPU it runs where torch's matmul switch and cuDNN's differ); which
products take it, and in which precision, is checked on the launches captured for a GPU (no GPU
needed). Tolerances: float32 products rtol 1e-5, atol 1e-5 (sums of at most 130 products, in another
order than torch's); layers against the cpp backend rtol 1e-4, atol 1e-5; float64 gradcheck with
torch's defaults.
"""

import pytest
import torch

import vgkernels as vgk
from vgkernels.triton import _host, aot, gemm

F32 = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def force_triton(monkeypatch):
    monkeypatch.setattr(gemm, "_FORCE_TRITON", True)


def _operands(M, K, N, transposed):
    gen = torch.Generator().manual_seed(M * 100 + K * 10 + N)
    a = torch.randn(K, M, generator=gen).t() if transposed else torch.randn(M, K, generator=gen)
    b = torch.randn(N, K, generator=gen).t() if transposed else torch.randn(K, N, generator=gen)
    return a, b, torch.randn(N, generator=gen)


@pytest.mark.parametrize("sms", [None, 64])
@pytest.mark.parametrize("M, K, N", [(1, 1, 1), (3, 37, 5), (17, 130, 33)])
@pytest.mark.parametrize("transposed", [False, True])
def test_kernel_matches_torch(M, K, N, transposed, sms, force_triton, monkeypatch):
    """Odd sizes, transposed operands read in place, with and without bias; with 64 SMs the larger
    product splits K over programs whose partials torch sums."""
    monkeypatch.setattr(gemm, "_INTERPRETER_SMS", sms)
    a, b, bias = _operands(M, K, N, transposed)
    if sms and (M, K, N) == (17, 130, 33):
        assert gemm.plan(M, N, K, sms)["SPLIT"] > 1
    torch.testing.assert_close(gemm.mm(a, b), a @ b, **F32)
    torch.testing.assert_close(gemm.mm(a, b, bias), torch.addmm(bias, a, b), **F32)


def test_host_integer_helpers_equal_tritons():
    """The launch plans' host arithmetic gives what triton.cdiv and triton.next_power_of_2 give."""
    import triton

    for n in range(0, 2100):
        assert _host.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 37, 128):
            assert _host.cdiv(n, d) == triton.cdiv(n, d), (n, d)


def test_plans_keep_64_rows_where_a_tie_is_halved():
    """A weight gradient of a small layer (4H = 1024 rows, H = 256 columns, T * B = 1600) on 132 SMs:
    64 x 64 tiles are too few, and the columns give way (64 x 32), not the rows; the larger products keep
    their 128-row tiles."""
    assert {k: gemm.plan(1024, 256, 1600, 132)[k] for k in ("BLOCK_M", "BLOCK_N")} == {"BLOCK_M": 64,
                                                                                        "BLOCK_N": 32}
    assert gemm.plan(6400, 2048, 512, 132)["BLOCK_M"] == 128


def test_cached_plan_is_not_changed_by_a_product(force_triton, monkeypatch):
    """The product takes SPLIT out of its copy of the plan: the cached plan keeps it for the next call."""
    monkeypatch.setattr(gemm, "_INTERPRETER_SMS", 64)
    a, b, _ = _operands(17, 130, 33, transposed=False)
    for _ in range(2):
        torch.testing.assert_close(gemm.mm(a, b), a @ b, **F32)
        assert gemm._cached_plan(17, 33, 130, 64, gemm.BLOCK_K) == gemm.plan(17, 33, 130, 64, gemm.BLOCK_K)


@pytest.mark.parametrize("stage", [True, False])
def test_tf32_operands_are_staged_k_major(stage, monkeypatch):
    """Captured for a TF32 GPU: a product whose operands have rows of K apart (a weight gradient: a^T b
    over time steps) launches on K-major copies (stride 1 along K: 16-byte loads, where a stride along K
    makes the compiled kernel copy 4 bytes at a time); with staging off it reads them in place."""
    monkeypatch.setattr(gemm, "STAGE_K_MAJOR", stage)
    a = torch.empty(6400, 2048, device="meta").t()  # [2048, 6400], K = 6400 rows apart
    b = torch.empty(6400, 512, device="meta")  # [6400, 512], N contiguous
    with _host.capture(_host.GPU("test", 132, tf32=True)) as launches:
        out = gemm.mm(a, b)
    assert out.shape == (2048, 512)
    (launch,) = [x for x in launches if x.kernel is gemm._mm_kernel]
    names = gemm._mm_kernel.arg_names
    stride_ak, stride_bk = launch.args[names.index("stride_ak")], launch.args[names.index("stride_bk")]
    assert (stride_ak, stride_bk) == ((1, 1) if stage else (2048, 512))
    assert launch.kwargs["PRECISION"] == "tf32"


def test_staging_keeps_the_product(force_triton, monkeypatch):
    """Under the interpreter with TF32 dots requested (the interpreter computes float32), staged operands
    give torch's product, with and without bias."""
    monkeypatch.setattr(_host, "fp32_dot_tf32", lambda device: True)
    monkeypatch.setattr(gemm, "STAGE_K_MAJOR", True)
    staged = []
    monkeypatch.setattr(gemm, "_run_kernel", lambda a, b, *rest, run=gemm._run_kernel: (
        staged.append((a.stride(1), b.stride(0))), run(a, b, *rest))[1])
    a, b, bias = _operands(17, 130, 33, transposed=True)
    assert (a.stride(1), b.stride(0)) != (1, 1)
    torch.testing.assert_close(gemm.mm(a, b), a @ b, **F32)
    torch.testing.assert_close(gemm.mm(a, b, bias), torch.addmm(bias, a, b), **F32)
    assert staged == [(1, 1), (1, 1)]


def test_gradients_through_the_kernel(force_triton):
    a, b, bias = _operands(7, 19, 5, transposed=False)
    leaves = [t.clone().requires_grad_() for t in (a, b, bias)]
    theirs = [t.clone().requires_grad_() for t in (a, b, bias)]
    g = torch.randn(7, 5)
    torch.autograd.backward(gemm.mm(*leaves), g)
    torch.autograd.backward(torch.addmm(theirs[2], theirs[0], theirs[1]), g)
    for ours, ref in zip(leaves, theirs, strict=True):
        torch.testing.assert_close(ours.grad, ref.grad, **F32)


def test_gradcheck_float64_and_opcheck():
    a, b, bias = (t.double().requires_grad_() for t in _operands(3, 4, 2, transposed=True))
    assert torch.autograd.gradcheck(gemm.mm, (a, b, bias))
    assert torch.autograd.gradgradcheck(gemm.mm, (a, b, bias))
    torch.library.opcheck(torch.ops.vgk.mm_triton, (a.detach(), b.detach(), bias.detach()))
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    w = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(gemm.linear(x, w, bias[:0].new_ones(5)), torch.nn.functional.linear(x, w) + 1)


def test_bad_inputs_raise():
    a, b, bias = _operands(3, 4, 2, transposed=False)
    with pytest.raises(ValueError,
                       match=r"expected a \[M, K\] and b \[K, N\], got a \(3, 4\) and b \(3, 2\)"):
        gemm.mm(a, b[:3])
    with pytest.raises(TypeError, match="one dtype, got torch.float32, torch.float64"):
        gemm.mm(a, b.double())
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\), got \(3,\)"):
        gemm.mm(a, b, torch.zeros(3))


def test_triton_only_where_the_switches_differ():
    """Captured for a GPU whose cuDNN switch says TF32 (torch's default) while torch's matmul switch says
    IEEE (its default): float32 products take the kernel; half and float64 ones, and float32 ones under
    an IEEE cuDNN switch, stay torch's."""
    meta = torch.empty(4, 4, device="meta")
    with _host.capture(_host.GPU("test", 132, tf32=True)):
        assert gemm.uses_triton(meta) and not gemm.uses_triton(meta.bfloat16())
        assert not gemm.uses_triton(meta.double())
    with _host.capture(_host.GPU("test", 132, tf32=False)):
        assert not gemm.uses_triton(meta)
    assert not gemm.uses_triton(torch.empty(4, 4))  # the interpreter: torch's product


def test_torch_products_skip_the_custom_op(monkeypatch):
    """Where torch's product is the right one, eager calls make it directly (the op's dispatch costs the
    host time per call); the Triton kernel still goes through the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    a, b, bias = (t.requires_grad_() for t in _operands(3, 4, 2, transposed=False))
    with Ops() as ops:
        out = gemm.mm(a, b, bias)
    assert not any("mm_triton" in name for name in ops.names) and "aten.addmm.default" in ops.names
    torch.testing.assert_close(out, a @ b + bias)
    out.sum().backward()  # torch's own autograd
    torch.testing.assert_close(a.grad, torch.ones(3, 2) @ b.detach().t())
    monkeypatch.setattr(gemm, "_FORCE_TRITON", True)
    with Ops() as ops:
        gemm.mm(a.detach(), b.detach(), bias.detach())
    assert any("mm_triton" in name for name in ops.names)


def test_matmul_switch_reading():
    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert gemm.matmul_tf32(torch.device("cuda"))
        matmul.fp32_precision = "ieee"
        assert not gemm.matmul_tf32(torch.device("cuda"))
        assert not gemm.matmul_tf32(torch.device("cpu"))
    finally:
        matmul.fp32_precision = old


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("tf32", [True, False])
def test_every_product_of_a_layer_follows_the_cudnn_switch(tf32, layer_norm):
    """The layer's five products (input projection, its two gradients, the gradients of W_hh and h0):
    with TF32 for cuDNN the Triton kernel in TF32, else torch's matmuls (IEEE by default)."""
    config = aot.Config("recurrent", "test", aot._recurrent("lstm", 16, 32, torch.float32, True, layer_norm,
                                                            False), {aot.LOOP_ENV: "step"}, tf32=tf32)
    with aot._environ({**config.env, "VGK_RNN_TRITON_GRAPH": "0"}), \
            _host.capture(_host.GPU("test", 132, tf32=tf32)) as launches:
        config.run()
    products = [launch for launch in launches if launch.kernel is gemm._mm_kernel]
    assert len(products) == (5 if tf32 else 0)
    assert all(launch.kwargs["PRECISION"] == "tf32" for launch in products)
    shapes = sorted((launch.args[4], launch.args[5], launch.args[6]) for launch in products)  # M, N, K
    T, B, H, G = aot.T, 16, 32, 4
    if tf32:
        assert shapes == sorted([(T * B, G * H, H), (T * B, H, G * H), (G * H, H, T * B), (G * H, H, T * B),
                                 (B, H, G * H)])


@pytest.mark.parametrize("mode, layer_norm", [("lstm", False), ("gru", True)])
def test_layers_with_the_kernel_match_cpp(mode, layer_norm, force_triton, monkeypatch):
    """A whole layer on the triton backend with every product through the Triton kernel: outputs and
    every parameter gradient as on the cpp backend, and no torch switch changed on the way."""
    launched = []
    launch = _host.launch

    def counted(kernel, *args, **kwargs):
        launched.append(kernel)
        return launch(kernel, *args, **kwargs)

    monkeypatch.setattr(_host, "launch", counted)
    cls = {"lstm": vgk.nn.LSTM, "gru": vgk.nn.GRU}[mode]
    switches = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.rnn.fp32_precision,
                torch.backends.cudnn.allow_tf32)
    torch.manual_seed(3)
    ours = cls(5, 7, num_layers=2, layer_norm=layer_norm, backend="triton")
    theirs = cls(5, 7, num_layers=2, layer_norm=layer_norm, backend="cpp")
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 5)
    results = []
    for m in (ours, theirs):
        xi = x.clone().requires_grad_()
        out, _ = m(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out, xi.grad, *(p.grad for p in m.parameters())])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert launched.count(gemm._mm_kernel) == 2 * 5  # two layers, five products each
    assert switches == (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.rnn.fp32_precision,
                        torch.backends.cudnn.allow_tf32)


def test_traces_without_graph_breaks():
    """torch.compile(fullgraph=True) traces the op, forward and backward (on CPU it is torch's product;
    the Triton kernel's trace under compile is a GPU test)."""
    x, w, bias = (t.requires_grad_() for t in _operands(6, 4, 3, transposed=False))
    compiled = torch.compile(lambda x, w, b: gemm.linear(x, w.t(), b), fullgraph=True, backend="aot_eager")
    out = compiled(x, w, bias)
    torch.testing.assert_close(out, torch.addmm(bias, x, w), **F32)
    out.sum().backward()
    torch.testing.assert_close(w.grad, x.detach().t() @ torch.ones(6, 3), **F32)
