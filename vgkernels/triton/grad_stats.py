"""Fused gradient statistics in Triton: ``vgk::grad_stats_triton``.

Per tensor of a list, the sum of squares and the log10-magnitude histogram defined in
:mod:`vgkernels.reference.grad_stats`, in one pass over the data of all tensors:

- A pointer table (int64, built on the host and copied to the device once per call) holds every
  tensor's address and length, and a chunk table splits the tensors into chunks of ``CHUNK`` elements.
- ``_chunk_kernel``: one program per chunk, one launch for all tensors of one dtype. It writes the
  chunk's partial sum of squares and histogram (``tl.histogram`` per block) into its own slot.
- ``_finalize_kernel``: one program per tensor sums its chunks' partials in chunk order.

No atomics: the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vgkernels.triton import _host

BLOCK = 1024
BLOCKS_PER_CHUNK = 16
CHUNK = BLOCK * BLOCKS_PER_CHUNK
LOG10_2: tl.constexpr = tl.constexpr(0.30102999566398120)  # a global read in a kernel must be constexpr

# dtype codes for the kernel's constexpr DTYPE
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


@triton.jit
def _chunk_kernel(
    meta_ptr, scale_ptr, part_sumsq_ptr, part_hist_ptr,
    n_tensors, n_chunks, chunk_base, log10_min, log10_max, per_unit,
    BINS: tl.constexpr, DTYPE: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, NCOL_PAD: tl.constexpr,
):
    c = chunk_base + tl.program_id(0)
    # meta layout (int64): pointers [N], numels [N], chunk begin [N], chunk end [N],
    # chunk's tensor [C], chunk's first element [C]
    tid = tl.load(meta_ptr + 4 * n_tensors + c)
    start = tl.load(meta_ptr + 4 * n_tensors + n_chunks + c)
    numel = tl.load(meta_ptr + n_tensors + tid)
    addr = tl.load(meta_ptr + tid)
    if DTYPE == 0:
        base = addr.to(tl.pointer_type(tl.float32))
    elif DTYPE == 1:
        base = addr.to(tl.pointer_type(tl.float16))
    elif DTYPE == 2:
        base = addr.to(tl.pointer_type(tl.bfloat16))
    else:
        base = addr.to(tl.pointer_type(tl.float64))
    # Squares are summed in float64, as in the C++ kernel: float32 squares overflow above |g| ~ 1.8e19.
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    if HAS_SCALE:
        scale = tl.load(scale_ptr)  # float32; promoted to float64 for float64 tensors
    hist = tl.zeros([NCOL_PAD], dtype=tl.int32)
    end = tl.minimum(start + CHUNK, numel)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        x = tl.load(base + offs, mask=mask, other=0.0)
        if DTYPE != 3:
            x = x.to(tl.float32)  # float64 stays float64
        if HAS_SCALE:
            x = x * scale
        x64 = x.to(tl.float64)
        acc += x64 * x64
        a = tl.abs(x)
        regular = (a > 0) & (a < float("inf"))  # False for zero, inf and NaN
        lg = tl.log2(tl.where(regular, a, 1.0)) * LOG10_2
        pos = tl.minimum(tl.maximum((lg - log10_min) * per_unit, 0.0), BINS - 1.0)
        col = 2 + tl.floor(pos).to(tl.int32)
        col = tl.where(lg < log10_min, 1, col)
        col = tl.where(lg > log10_max, BINS + 2, col)
        col = tl.where(a == float("inf"), BINS + 2, col)
        col = tl.where(a == 0, 0, col)
        col = tl.where(a != a, BINS + 3, col)
        col = tl.where(mask, col, NCOL_PAD - 1)  # masked lanes go to a column nobody reads
        hist += tl.histogram(col, NCOL_PAD)
    tl.store(part_sumsq_ptr + c, tl.sum(acc, axis=0))
    tl.store(part_hist_ptr + c * NCOL_PAD + tl.arange(0, NCOL_PAD), hist)


@triton.jit
def _finalize_kernel(
    meta_ptr, part_sumsq_ptr, part_hist_ptr, sumsq_ptr, hist_ptr, n_tensors,
    NCOL: tl.constexpr, NCOL_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    first = tl.load(meta_ptr + 2 * n_tensors + t)
    last = tl.load(meta_ptr + 3 * n_tensors + t)
    cols = tl.arange(0, NCOL_PAD)
    one = tl.arange(0, 1)
    total = tl.zeros([1], dtype=tl.float64)
    counts = tl.zeros([NCOL_PAD], dtype=tl.int64)
    for c in range(first, last):
        total += tl.load(part_sumsq_ptr + c + one)
        counts += tl.load(part_hist_ptr + c * NCOL_PAD + cols).to(tl.int64)
    tl.store(sumsq_ptr + t + one, total)
    tl.store(hist_ptr + t * NCOL + cols, counts, mask=cols < NCOL)


# An opaque op: its host side reads data pointers, which torch.compile's tensors lack.
@torch.library.custom_op("vgk::grad_stats_triton", mutates_args=())
def grad_stats_triton(
    tensors: list[torch.Tensor],
    inv_scale: torch.Tensor | None,
    log10_min: float,
    log10_max: float,
    bins: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of squares (float64 [N]) and log10-magnitude histogram (int64 [N, bins + 4]) per tensor.

    ``tensors`` are N >= 1 floating-point tensors on one device (float32, float16, bfloat16, float64);
    ``inv_scale`` is None or a one-element tensor on that device. Arguments are checked by
    :func:`vgkernels.ops.grad_stats.grad_stats`.
    """
    return grad_stats_launch(tensors, inv_scale, log10_min, log10_max, bins)


def grad_stats_launch(tensors, inv_scale, log10_min, log10_max, bins):
    """The launches behind :func:`grad_stats_triton` (also called directly by the AOT check)."""
    device = tensors[0].device
    n = len(tensors)
    ncol = bins + 4
    ncol_pad = _host.next_power_of_2(ncol + 1)  # one spare column for masked lanes
    data = [t.detach().contiguous() for t in tensors]

    # Tensors grouped by dtype (one launch per dtype); each group's chunks are contiguous.
    order = sorted(range(n), key=lambda i: _DTYPE_CODES[data[i].dtype])
    chunk_begin, chunk_end = [0] * n, [0] * n
    chunk_tensor: list[int] = []
    chunk_start: list[int] = []
    groups: list[tuple[int, int, int]] = []  # (dtype code, first chunk, number of chunks)
    for i in order:
        code = _DTYPE_CODES[data[i].dtype]
        if not groups or groups[-1][0] != code:
            groups.append((code, len(chunk_tensor), 0))
        chunk_begin[i] = len(chunk_tensor)
        for begin in range(0, data[i].numel(), CHUNK):
            chunk_tensor.append(i)
            chunk_start.append(begin)
        chunk_end[i] = len(chunk_tensor)
        groups[-1] = (code, groups[-1][1], len(chunk_tensor) - groups[-1][1])
    n_chunks = len(chunk_tensor)
    meta_host = [t.data_ptr() for t in data] + [t.numel() for t in data]
    meta_host += chunk_begin + chunk_end + chunk_tensor + chunk_start
    meta = torch.tensor(meta_host, dtype=torch.int64, pin_memory=device.type == "cuda")
    meta = meta.to(device, non_blocking=True)

    part_sumsq = torch.empty(max(n_chunks, 1), dtype=torch.float64, device=device)
    part_hist = torch.empty(max(n_chunks, 1), ncol_pad, dtype=torch.int32, device=device)
    # Filled so that an entry the kernels fail to write shows up as NaN / -1.
    sumsq = torch.full((n,), float("nan"), dtype=torch.float64, device=device)
    hist = torch.full((n, ncol), -1, dtype=torch.int64, device=device)
    has_scale = inv_scale is not None
    scale = inv_scale.reshape(1) if has_scale else sumsq
    per_unit = bins / (log10_max - log10_min)
    with _host.device_ctx(device):
        for code, first, count in groups:
            if count == 0:
                continue
            _host.launch(
                _chunk_kernel, (count,), meta, scale, part_sumsq, part_hist,
                n, n_chunks, first, log10_min, log10_max, per_unit,
                BINS=bins, DTYPE=code, HAS_SCALE=has_scale,
                BLOCK=BLOCK, CHUNK=CHUNK, NCOL_PAD=ncol_pad, num_warps=8,
            )
        _host.launch(
            _finalize_kernel, (n,), meta, part_sumsq, part_hist, sumsq, hist, n, NCOL=ncol, NCOL_PAD=ncol_pad,
        )
    return sumsq, hist


@grad_stats_triton.register_fake
def _(tensors, inv_scale, log10_min, log10_max, bins):
    # The real function reads data pointers, which fake tensors do not have.
    from vgkernels.ops.grad_stats import fake_grad_stats

    return fake_grad_stats(tensors, inv_scale, log10_min, log10_max, bins)
