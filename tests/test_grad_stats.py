"""The fused gradient-statistics kernels (``vgk::grad_stats`` in C++, ``vgk::grad_stats_triton`` under the
interpreter) against the eager reference, torch.linalg.vector_norm and torch.histc of log10|g|.

Tolerances: sums of squares rtol 1e-12 (C++, accumulates in float64), rtol 1e-6 for float32-class
inputs and 1e-12 for float64 in Triton (float32 accumulation within a chunk); histogram counts exactly
equal (random values never sit within an ulp of a bin edge), except on a GPU, where log2 is approximate:
there a value within about 20 float32 ulps of a bin edge may land in the neighbouring bin.
"""

import pytest
import torch

from vgkernels.ops.grad_stats import DEFAULT_BINS, HistogramBins, grad_stats
from vgkernels.reference import grad_stats as reference
from vgkernels.triton.grad_stats import CHUNK as TRITON_CHUNK

BACKENDS = ["cpp", "triton"]
CPP_CHUNK = 1 << 15


def rtol_for(backend, dtype):
    return 1e-12 if backend == "cpp" or dtype == torch.float64 else 1e-6


def spread(n, dtype=torch.float32, low=-25.0, high=8.0):
    """Values whose magnitudes spread over many decades, both signs."""
    sign = torch.where(torch.rand(n) < 0.5, -1.0, 1.0).double()
    return (sign * 10 ** (low + (high - low) * torch.rand(n).double())).to(dtype)


def special_values(dtype=torch.float32):
    values = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-30, 1e-20, 1e5, 1e6, 3.0, -2e-7]
    return torch.tensor(values, dtype=dtype)


def tensor_list(big):
    """Odd sizes, a tensor spanning several chunks, empty, non-contiguous, special values, all dtypes."""
    return [
        spread(1),
        spread(3),
        spread(37),
        torch.randn(big) * 1e-3,
        torch.zeros(0),
        spread(5 * 7).reshape(5, 7).t(),  # non-contiguous
        spread(40)[::3],  # strided
        special_values(),
        spread(37, torch.float64, -30, 10),
        spread(37, torch.float16, -7, 4),
        spread(37, torch.bfloat16, -30, 30),
        torch.randn(3, 1, 5, dtype=torch.float64),
    ]


def check_equal(ours, theirs, rtols, movable=None):
    """Sums of squares within rtols; histograms equal, except that up to ``movable[i]`` values of tensor
    i may sit in a neighbouring column (each such move changes two counts by one)."""
    sumsq, hist = ours
    ref_sumsq, ref_hist = theirs
    assert sumsq.dtype == torch.float64 and hist.dtype == torch.int64
    assert hist.shape == ref_hist.shape
    for i, rtol in enumerate(rtols):
        torch.testing.assert_close(sumsq[i], ref_sumsq[i], rtol=rtol, atol=0, equal_nan=True)
    if movable is None:
        assert torch.equal(hist, ref_hist), (hist - ref_hist).nonzero()
        return
    assert torch.equal(hist.sum(1), ref_hist.sum(1))
    moved = (hist - ref_hist).abs().sum(1).cpu()
    assert (moved <= 2 * torch.tensor(movable)).all(), (moved.tolist(), movable)


def near_bin_edges(t, inv_scale, spec=DEFAULT_BINS, decades=1e-6):
    """How many values of t lie within ``decades`` of a bin edge in log10|g| (about 20 float32 ulps):
    where the GPU's approximate log2 and torch.log10 may disagree on the bin."""
    x = reference.scaled_values(t, inv_scale).double().abs().flatten()
    logs = torch.log10(x[(x > 0) & torch.isfinite(x)]).cpu()
    edges = spec.edges()
    right = torch.bucketize(logs, edges).clamp(max=len(edges) - 1)
    left = (right - 1).clamp(min=0)
    nearest = torch.minimum((logs - edges[left]).abs(), (logs - edges[right]).abs())
    return int((nearest < decades).sum())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [None, 0.25, 3.0])
def test_matches_reference(backend, scale):
    big = CPP_CHUNK + 5 if backend == "cpp" else 2 * TRITON_CHUNK + 3
    tensors = tensor_list(big)
    inv_scale = None if scale is None else torch.tensor([1 / scale], dtype=torch.float32)
    ours = grad_stats(tensors, inv_scale, backend=backend)
    theirs = reference.grad_stats(tensors, inv_scale)
    check_equal(ours, theirs, [rtol_for(backend, t.dtype) for t in tensors])
    # every element lands in exactly one column
    assert ours[1].sum(1).tolist() == [t.numel() for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
def test_norms_and_histc(backend):
    """The acceptance oracle itself: torch.linalg.vector_norm and torch.histc of log10|g|."""
    tensors = [spread(n) for n in (1, 3, 37, 1000)]
    sumsq, hist = grad_stats(tensors, backend=backend)
    spec = DEFAULT_BINS
    for i, g in enumerate(tensors):
        torch.testing.assert_close(sumsq[i].sqrt().float(), torch.linalg.vector_norm(g), rtol=1e-6, atol=0)
        logs = torch.log10(g.abs())
        expected = torch.histc(logs, bins=spec.bins, min=spec.log10_min, max=spec.log10_max).long()
        assert torch.equal(hist[i, reference.FIRST_BIN: reference.FIRST_BIN + spec.bins], expected)
        assert hist[i, reference.UNDERFLOW] == (logs < spec.log10_min).sum()
        assert hist[i, spec.overflow] == (logs > spec.log10_max).sum()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bin_edges_and_columns(backend):
    """Values placed at known spots: the half-decade bins, hi in the last bin, inf as overflow."""
    g = torch.tensor([0.0, 1e-21, 1.5e-20, 2.0, 4.0, 1e5, 2e5, float("inf"), float("nan")])
    _, hist = grad_stats([g], backend=backend)
    row = hist[0].tolist()
    bins = DEFAULT_BINS.bins
    expected = [0] * DEFAULT_BINS.num_columns
    expected[0] = 1  # 0
    expected[1] = 1  # 1e-21
    expected[2] = 1  # 1.5e-20: bin [-20, -19.5)
    expected[2 + 40] += 1  # 2.0: log10 = 0.30 in [0, 0.5)
    expected[2 + 41] += 1  # 4.0: log10 = 0.60 in [0.5, 1)
    expected[2 + bins - 1] += 1  # 1e5: log10 = 5 = hi, the last bin
    expected[bins + 2] = 2  # 2e5 and inf
    expected[bins + 3] = 1  # NaN
    assert row == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_bins(backend):
    spec = HistogramBins(-8.0, 2.0, 7)
    tensors = [spread(37, low=-10, high=4), spread(3)]
    ours = grad_stats(tensors, bins=spec, backend=backend)
    theirs = reference.grad_stats(tensors, None, spec.log10_min, spec.log10_max, spec.bins)
    check_equal(ours, theirs, [rtol_for(backend, torch.float32)] * 2)
    assert ours[1].shape == (2, 11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_and_batch_one(backend):
    ours = grad_stats([torch.tensor([0.5])], backend=backend)
    assert ours[0].tolist() == [0.25]
    assert ours[1].sum().item() == 1


def test_cpp_deterministic_across_threads():
    tensors = [torch.randn(5 * CPP_CHUNK + 7), torch.randn(37)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grad_stats(tensors, backend="cpp")
        torch.set_num_threads(2)
        two = grad_stats(tensors, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_empty_list():
    sumsq, hist = grad_stats([])
    assert sumsq.shape == (0,) and hist.shape == (0, DEFAULT_BINS.num_columns)


@pytest.mark.parametrize("name", ["grad_stats", "grad_stats_triton"])
def test_opcheck(name):
    """The C++ op, and the Triton one (an opaque custom op; under the interpreter here)."""
    op = getattr(torch.ops.vgk, name)
    tensors = [spread(37), torch.randn(3, 5).t(), spread(3, torch.float64)]
    if name == "grad_stats_triton":
        import vgkernels.triton.grad_stats  # noqa: F401  (registers the op)
    op_inputs = [(tensors, None, -20.0, 5.0, 50), (tensors, torch.tensor([0.5]), -20.0, 5.0, 50)]
    for args in op_inputs:
        torch.library.opcheck(op, args)


def test_fake_triton():
    tensors = [spread(37), spread(3)]
    torch.library.opcheck(
        torch.ops.vgk.grad_stats_triton, (tensors, None, -20.0, 5.0, 50),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_bad_inputs():
    g = torch.randn(3)
    with pytest.raises(TypeError, match="tensors: expected a list"):
        grad_stats(g)
    with pytest.raises(TypeError, match=r"tensors\[1\]: expected a torch.Tensor"):
        grad_stats([g, 3.0])
    with pytest.raises(TypeError, match=r"tensors\[0\]: expected dtype .* got torch.int64"):
        grad_stats([torch.arange(3)])
    with pytest.raises(TypeError, match="complex64"):
        grad_stats([torch.zeros(2, dtype=torch.complex64)])
    with pytest.raises(ValueError, match=r"tensors\[1\]: expected every tensor on cpu, got one on meta"):
        grad_stats([g, torch.empty(2, device="meta")])
    with pytest.raises(ValueError, match=r"inv_scale: expected a one-element .* shape \(2,\)"):
        grad_stats([g], torch.ones(2))
    with pytest.raises(ValueError, match="inv_scale: expected a one-element .* torch.int64"):
        grad_stats([g], torch.ones(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="inv_scale: expected a tensor on cpu, got one on meta"):
        grad_stats([g], torch.ones(1, device="meta"))
    with pytest.raises(ValueError, match="bins: expected a positive int"):
        grad_stats([g], bins=HistogramBins(bins=0))
    with pytest.raises(ValueError, match="log10_min < log10_max"):
        grad_stats([g], bins=HistogramBins(3.0, 1.0, 4))
    with pytest.raises(ValueError, match="backend must be one of"):
        grad_stats([g], backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_triton_cuda(dtype):
    tensors = [spread(n, dtype, -7 if dtype == torch.float16 else -25).cuda()
               for n in (1, 3, 37, 4 * TRITON_CHUNK + 1, 1_000_003)]
    tensors.append(torch.randn(64, 37, device="cuda", dtype=dtype).t())
    inv_scale = torch.tensor([1 / 3.0], device="cuda")
    ours = grad_stats(tensors, inv_scale)
    theirs = reference.grad_stats(tensors, inv_scale)
    movable = [near_bin_edges(t, inv_scale) for t in tensors]
    check_equal(ours, theirs, [rtol_for("triton", dtype)] * len(tensors), movable)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_whole(backend):
    """Opaque under torch.compile(fullgraph=True): the statistics of the eager call."""
    torch._dynamo.reset()
    tensors = [spread(37), spread(5 * 7).reshape(5, 7)]
    compiled = torch.compile(lambda ts: grad_stats(ts, backend=backend), fullgraph=True, backend="aot_eager")
    check_equal(compiled(tensors), grad_stats(tensors, backend=backend), [1e-12, 1e-12])
