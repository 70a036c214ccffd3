"""``vgkernels.clip_grad_norm_``, ``get_total_norm`` and ``clip_grads_with_norm_`` against torch.nn.utils.

Backends: "cpp" natively, "triton" under TRITON_INTERPRET=1 on CPU tensors (with tiles of 16
elements, so that tensors span several tiles and programs), and "reference". The tests marked ``gpu``
run on CUDA (VGK_TEST_CUDA=1).

Oracle: torch.nn.utils on clones of the same gradients: same exceptions (type and message), same
return dtype and device, same None handling.

Tolerances: float32 total norm rtol 1e-5 (the fused kernels sum in a different order, in float64);
clipped float32 gradients rtol 1e-5, atol 1e-7; float64 rtol 1e-12; float16/bfloat16 rtol 1e-2 /
2e-2 (torch rounds each tensor's norm to the tensor's dtype, the kernels round each group's norm);
gradients that are not clipped (coefficient clamped at 1) must be bitwise equal.
"""

import math
import os

import pytest
import torch
import torch.nn.utils as tu

import vgkernels as vgk
import vgkernels.ops.clip_grad as clip_ops
import vgkernels.triton.clip_grad as tcg

BACKENDS = ("cpp", "triton", "reference")
NORMS = (1.0, 2.0, 3.5, math.inf)
SHAPES = [(3,), (37, 5), (1,), (2, 3, 4), (1, 1), (300,)]
CUDA = os.environ.get("VGK_TEST_CUDA") == "1"


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setattr(tcg, "TILE", 16)


def make_params(shapes=SHAPES, dtypes=(torch.float32,), scale=1.0, none_at=(), device="cpu"):
    """Parameters with random gradients (dtype cycling through ``dtypes``); no gradient at ``none_at``."""
    params = []
    for i, shape in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        p = torch.nn.Parameter(torch.randn(shape, dtype=dtype, device=device))
        if i not in none_at:
            p.grad = torch.randn(shape, dtype=dtype, device=device) * scale
        params.append(p)
    return params


def clone_params(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def assert_same_grads(ours, theirs, rtol=1e-5, atol=1e-7):
    for p, q in zip(ours, theirs, strict=True):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert p.grad.dtype == q.grad.dtype
            torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, equal_nan=True)


def assert_same_norm(ours, theirs, rtol=1e-5):
    assert isinstance(ours, torch.Tensor) and ours.dim() == 0
    assert ours.dtype == theirs.dtype and ours.device == theirs.device
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------------
# Values against torch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("foreach", (None, True, False))
def test_clip_grad_norm_matches_torch(backend, norm_type, foreach):
    ours = make_params(scale=3.0)
    theirs = clone_params(ours)
    total = vgk.clip_grad_norm_(ours, 1.0, norm_type, foreach=foreach, backend=backend)
    want = tu.clip_grad_norm_(theirs, 1.0, norm_type, foreach=foreach)
    assert_same_norm(total, want)
    assert want > 1.0  # the gradients were clipped
    assert_same_grads(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", NORMS + (0.5, 0.0, -1.0, -math.inf))
def test_get_total_norm_matches_torch(backend, norm_type):
    tensors = [p.grad for p in make_params()]
    tensors[2].zero_()  # a zero tensor matters for p <= 0
    ours = vgk.get_total_norm(tensors, norm_type, backend=backend)
    assert_same_norm(ours, tu.get_total_norm(tensors, norm_type))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_is_exact_to_rounding(backend):
    ours = make_params(dtypes=(torch.float64,), scale=2.0)
    theirs = clone_params(ours)
    total = vgk.clip_grad_norm_(ours, 0.5, backend=backend)
    want = tu.clip_grad_norm_(theirs, 0.5)
    assert_same_norm(total, want, rtol=1e-12)
    assert_same_grads(ours, theirs, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_clipping_leaves_gradients_bitwise_equal(backend):
    params = make_params()
    before = [p.grad.clone() for p in params]
    total = vgk.clip_grad_norm_(params, 1e6, backend=backend)
    assert total < 1e6
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.grad, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", (2.0, math.inf))
def test_mixed_dtypes_match_torch(backend, norm_type):
    dtypes = (torch.float32, torch.float16, torch.float64, torch.bfloat16)
    ours = make_params(dtypes=dtypes, scale=2.0)
    theirs = clone_params(ours)
    total = vgk.clip_grad_norm_(ours, 1.0, norm_type, backend=backend)
    want = tu.clip_grad_norm_(theirs, 1.0, norm_type)
    assert_same_norm(total, want, rtol=2e-2)
    for p, q in zip(ours, theirs, strict=True):
        assert p.grad.dtype == q.grad.dtype
        rtol = {torch.float16: 1e-2, torch.bfloat16: 2e-2}.get(p.grad.dtype, 1e-5)
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 1e-2), (torch.bfloat16, 2e-2)])
def test_half_types_match_torch(backend, dtype, rtol):
    ours = make_params(dtypes=(dtype,), scale=2.0)
    theirs = clone_params(ours)
    total = vgk.clip_grad_norm_(ours, 1.0, backend=backend)
    want = tu.clip_grad_norm_(theirs, 1.0)
    assert_same_norm(total, want, rtol=rtol)
    assert_same_grads(ours, theirs, rtol=rtol, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_none_grads_are_skipped(backend):
    ours = make_params(none_at=(0, 3), scale=3.0)
    theirs = clone_params(ours)
    total = vgk.clip_grad_norm_(ours, 1.0, backend=backend)
    assert_same_norm(total, tu.clip_grad_norm_(theirs, 1.0))
    assert ours[0].grad is None and ours[3].grad is None
    assert_same_grads(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_tensor(backend):
    (ours,) = make_params(shapes=[(37,)], scale=3.0)
    (theirs,) = clone_params([ours])
    assert_same_norm(vgk.clip_grad_norm_(ours, 1.0, backend=backend), tu.clip_grad_norm_(theirs, 1.0))
    assert_same_grads([ours], [theirs])
    g = torch.randn(3, 37)
    assert_same_norm(vgk.get_total_norm(g, 3.5, backend=backend), tu.get_total_norm(g, 3.5))
    g = torch.randn(37) * 3
    ours.grad, theirs.grad = g.clone(), g.clone()
    total = tu.get_total_norm(g)
    assert vgk.clip_grads_with_norm_(ours, 1.0, total, backend=backend) is None
    tu.clip_grads_with_norm_(theirs, 1.0, total)
    assert_same_grads([ours], [theirs])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    for ours, theirs in (
        (vgk.get_total_norm([], backend=backend), tu.get_total_norm([])),
        (vgk.clip_grad_norm_([], 1.0, backend=backend), tu.clip_grad_norm_([], 1.0)),
        (vgk.clip_grad_norm_(make_params(none_at=range(6)), 1.0, backend=backend),
         tu.clip_grad_norm_([], 1.0)),
    ):
        assert_same_norm(ours, theirs, rtol=0)
    assert vgk.clip_grads_with_norm_([], 1.0, torch.tensor(2.0), backend=backend) is None
    with pytest.warns(UserWarning, match="empty generator"):
        vgk.clip_grad_norm_((p for p in []), 1.0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_tensor_in_list(backend):
    tensors = [torch.randn(3), torch.empty(0), torch.randn(2, 0)]
    assert_same_norm(vgk.get_total_norm(tensors, backend=backend), tu.get_total_norm(tensors))
    with pytest.raises(RuntimeError, match="norm on an empty tensor|norm of an empty tensor"):
        tu.get_total_norm(tensors, math.inf)
    with pytest.raises(RuntimeError, match="norm on an empty tensor|norm of an empty tensor"):
        vgk.get_total_norm(tensors, math.inf, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_gradients(backend):
    ours = make_params(shapes=[(5, 7), (37, 3), (4,)], scale=3.0)
    for p in ours[:2]:
        p.grad = torch.randn(p.shape[::-1]).t() * 3  # transposed storage
    theirs = clone_params(ours)
    assert not ours[0].grad.is_contiguous() and not ours[1].grad.is_contiguous()
    assert_same_norm(vgk.clip_grad_norm_(ours, 1.0, backend=backend), tu.clip_grad_norm_(theirs, 1.0))
    assert_same_grads(ours, theirs)


# ---------------------------------------------------------------------------------------------------
# Non-finite gradients


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf * 0
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", (math.nan, math.inf, -math.inf))
@pytest.mark.parametrize("norm_type", NORMS)
def test_nonfinite_without_error(backend, bad, norm_type):
    ours = make_params()
    ours[1].grad[4, 2] = bad
    theirs = clone_params(ours)
    total = vgk.clip_grad_norm_(ours, 1.0, norm_type, backend=backend)
    want = tu.clip_grad_norm_(theirs, 1.0, norm_type)
    assert not torch.isfinite(want)
    assert_same_norm(total, want)
    assert_same_grads(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", (math.nan, math.inf))
def test_nonfinite_with_error(backend, bad):
    ours = make_params()
    ours[0].grad[1] = bad
    before = [p.grad.clone() for p in ours]
    theirs = clone_params(ours)
    with pytest.raises(RuntimeError) as want:
        tu.clip_grad_norm_(theirs, 1.0, error_if_nonfinite=True)
    message = r"total norm of order 2.0 .* non-finite.*error_if_nonfinite=False"
    with pytest.raises(type(want.value), match=message):
        vgk.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True, backend=backend)
    with pytest.raises(RuntimeError, match="non-finite"):
        vgk.get_total_norm([p.grad for p in ours], error_if_nonfinite=True, backend=backend)
    for p, b in zip(ours, before, strict=True):  # nothing was scaled
        torch.testing.assert_close(p.grad, b, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------------
# Arguments, delegation and kernels


def test_foreach_true_on_a_device_without_foreach_support():
    tensors = [torch.empty(3, device="meta")]
    with pytest.raises(RuntimeError) as want:
        tu.get_total_norm(tensors, foreach=True)
    with pytest.raises(RuntimeError, match=str(want.value)):
        vgk.get_total_norm(tensors, foreach=True)


def test_integer_gradients_raise_like_torch():
    tensors = [torch.ones(3, dtype=torch.int64)]
    with pytest.raises(RuntimeError) as want:
        tu.get_total_norm(tensors)
    with pytest.raises(RuntimeError, match=str(want.value)):
        vgk.get_total_norm(tensors)


def test_total_norm_must_be_a_tensor_like_torch():
    params = make_params()
    with pytest.raises(TypeError):
        tu.clip_grads_with_norm_(clone_params(params), 1.0, 2.0)
    with pytest.raises(TypeError):
        vgk.clip_grads_with_norm_(params, 1.0, 2.0)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        vgk.get_total_norm([torch.randn(3)], backend="fast")


class _Subclass(torch.Tensor):
    pass


def test_tensor_subclasses_are_delegated_to_torch(monkeypatch):
    calls = []
    real = tu.get_total_norm
    monkeypatch.setattr(clip_ops.nn_utils, "get_total_norm", lambda *a, **k: calls.append(a) or real(*a, **k))
    tensors = [torch.randn(3).as_subclass(_Subclass), torch.randn(4)]
    assert_same_norm(vgk.get_total_norm(tensors).as_subclass(torch.Tensor),
                     real([t.as_subclass(torch.Tensor) for t in tensors]).as_subclass(torch.Tensor))
    assert len(calls) == 1


def test_dtensor_gradients_give_the_global_norm():
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        grads = [torch.randn(8, 4), torch.randn(5)]
        ours, theirs = [], []
        for g in grads:
            for out in (ours, theirs):
                p = torch.nn.Parameter(distribute_tensor(torch.zeros_like(g), mesh, [Shard(0)]))
                p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
                out.append(p)
        total = vgk.clip_grad_norm_(ours, 1.0)
        want = tu.clip_grad_norm_(theirs, 1.0)
        torch.testing.assert_close(total.full_tensor(), want.full_tensor())
        exact = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
        torch.testing.assert_close(total.full_tensor(), exact)
        for p, q in zip(ours, theirs, strict=True):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad.full_tensor())
    finally:
        dist.destroy_process_group()


def test_cpp_norm_does_not_depend_on_thread_count():
    tensors = [torch.randn(70000), torch.randn(300, 300), torch.randn(7)]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(torch.ops.vgk.multi_tensor_norm(tensors, 2.0))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("ops", [("multi_tensor_norm", "multi_tensor_scale_"),
                                 ("multi_tensor_norm_triton", "multi_tensor_scale_triton_")],
                         ids=["cpp", "triton"])
def test_opcheck(ops):
    """The C++ ops, and the Triton ones (opaque custom ops; under the interpreter here)."""
    tensors = [torch.randn(3), torch.randn(4, 5), torch.randn(1)]
    norm, scale = (getattr(torch.ops.vgk, name) for name in ops)
    for p in (1.0, 2.0, 3.5, math.inf):
        torch.library.opcheck(norm, (tensors, p))
    torch.library.opcheck(scale, (tensors, torch.tensor(0.5)))


def test_cpp_ops_reject_mixed_groups():
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is Double"):
        torch.ops.vgk.multi_tensor_norm([torch.randn(3), torch.randn(3, dtype=torch.float64)], 2.0)
    with pytest.raises(RuntimeError, match="norm_type must be > 0"):
        torch.ops.vgk.multi_tensor_norm([torch.randn(3)], 0.0)


@pytest.mark.parametrize("norm_type", (1.0, 2.0, 3.5, math.inf))
def test_triton_norm_over_many_tiles_and_programs(norm_type):
    tensors = [torch.randn(n) for n in (1, 3, 37, 16, 17, 200)]  # 1 + 1 + 3 + 1 + 2 + 13 tiles of 16
    got = torch.ops.vgk.multi_tensor_norm_triton(tensors, norm_type)
    want = torch.linalg.vector_norm(torch.cat(tensors), norm_type)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_triton_unaligned_views():
    storage = torch.randn(300)
    tensors = [storage[1:38], storage[40:41], storage[43:243]]  # odd element offsets: not 16-byte aligned
    want_norm = torch.linalg.vector_norm(torch.cat(tensors))
    got_norm = torch.ops.vgk.multi_tensor_norm_triton(tensors, 2.0)
    torch.testing.assert_close(got_norm, want_norm, rtol=1e-5, atol=0)
    want = storage.clone()
    for lo, hi in ((1, 38), (40, 41), (43, 243)):
        want[lo:hi] *= 0.5
    torch.ops.vgk.multi_tensor_scale_triton_(tensors, torch.tensor(0.5))
    torch.testing.assert_close(storage, want, rtol=0, atol=0)


def test_triton_scale_over_many_tiles():
    tensors = [torch.randn(n) for n in (1, 3, 37, 16, 17, 200)]
    want = [t * 0.25 for t in tensors]
    torch.ops.vgk.multi_tensor_scale_triton_(tensors, torch.tensor(0.25))
    for t, w in zip(tensors, want, strict=True):
        torch.testing.assert_close(t, w, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# GPU (VGK_TEST_CUDA=1 on a CUDA machine)


@pytest.mark.gpu
@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_gpu_matches_torch_without_host_sync(norm_type, dtype, monkeypatch):
    assert CUDA and torch.cuda.is_available()
    monkeypatch.setattr(tcg, "TILE", 4096)
    shapes = [(1000, 1000), (37,), (4096, 3), (1,), (513, 257)]
    ours = make_params(shapes=shapes, dtypes=(dtype,), scale=3.0, device="cuda")
    theirs = clone_params(ours)
    vgk.clip_grad_norm_(ours, 1.0, norm_type)  # warm up: compiles the kernels
    ours = make_params(shapes=shapes, dtypes=(dtype,), scale=3.0, device="cuda")
    theirs = clone_params(ours)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = vgk.clip_grad_norm_(ours, 1.0, norm_type)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = tu.clip_grad_norm_(theirs, 1.0, norm_type)
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_same_norm(total, want, rtol=rtol)
    assert_same_grads(ours, theirs, rtol=rtol, atol=1e-3 if dtype != torch.float32 else 1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaling_in_place_bumps_version_counters_as_torch(backend):
    """Autograd sees the in-place scaling of every gradient (a graph that saved one then refuses to
    backpropagate), as after torch's clip_grad_norm_."""
    params = [torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(3, 4))]
    for p in params:
        p.grad = torch.randn_like(p) * 10
    before = [p.grad._version for p in params]
    vgk.clip_grad_norm_(params, 0.1, backend=backend)
    assert all(p.grad._version > v for p, v in zip(params, before, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_whole_and_matches_torch(backend):
    """Under torch.compile(fullgraph=True) the fused ops are opaque (their host side reads data pointers,
    which compile's fake tensors lack): the same norm and gradients as torch's eager function."""
    torch._dynamo.reset()
    grads = [torch.randn(5) * 10, torch.randn(3, 4) * 10]
    ours, theirs = ([torch.nn.Parameter(torch.zeros_like(g)) for g in grads] for _ in range(2))
    for a, b, g in zip(ours, theirs, grads, strict=True):
        a.grad, b.grad = g.clone(), g.clone()
    clip = torch.compile(lambda ps: vgk.clip_grad_norm_(ps, 0.1, backend=backend), fullgraph=True,
                         backend="aot_eager")
    torch.testing.assert_close(clip(ours), tu.clip_grad_norm_(theirs, 0.1))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_host_table_in_cpp_equals_the_numpy_one(monkeypatch):
    """The launch table (addresses, lengths, each tile's tensor and first element) and the alignment,
    from the C++ pass and from numpy (used without the C++ build); None for a non-contiguous tensor."""
    base = torch.zeros(3 * tcg.TILE + 40)
    tensors = [torch.zeros(1), torch.zeros(tcg.TILE), base[1:2 * tcg.TILE + 6], torch.zeros(0),
               torch.zeros(5, 7)]
    table, n_tiles, aligned = tcg._host_table(tensors)
    monkeypatch.setattr(tcg, "cpp_available", lambda: False)
    want, want_tiles, want_aligned = tcg._host_table(tensors)
    assert torch.equal(table, want)
    assert n_tiles == want_tiles == sum(-(-t.numel() // tcg.TILE) for t in tensors)
    assert aligned is want_aligned is False  # base[1:] starts 4 bytes into an allocation
    assert tcg._host_table([torch.zeros(4, 4).t()]) is None
    monkeypatch.undo()
    assert tcg._host_table([torch.zeros(4, 4).t()]) is None
    assert tcg._host_table(tensors[:2])[2] is True


def test_groups_keep_torchs_order(monkeypatch):
    a, b, c = torch.zeros(2), torch.zeros(3, dtype=torch.float64), torch.zeros(4)
    d = torch.zeros(1, dtype=torch.bfloat16)
    groups = clip_ops._groups([a, b, c, d])
    monkeypatch.setattr(clip_ops, "cpp_available", lambda: False)
    assert list(groups) == list(clip_ops._groups([a, b, c, d])) == [
        (a.device, torch.float32), (a.device, torch.float64), (a.device, torch.bfloat16)]
    assert [[id(t) for t in g] for g in groups.values()] == [[id(a), id(c)], [id(b)], [id(d)]]
