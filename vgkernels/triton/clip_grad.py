"""Triton kernels behind ``vgkernels.clip_grad_norm_``: ``vgk::multi_tensor_norm_triton`` and
``vgk::multi_tensor_scale_triton_``.

Both take one (device, dtype) group of tensors, like the C++ ops ``vgk::multi_tensor_norm`` and
``vgk::multi_tensor_scale_`` (see ``vgkernels/ops/clip_grad.py``).

- A table (int64, built on the host, copied to the device from pinned memory without a host
  synchronisation) holds every tensor's address and length, and splits all tensors into tiles of
  ``TILE`` elements. Kernels cast a loaded address back to a typed pointer.
- Norm: one launch of a persistent grid; each program walks its tiles and writes one partial (sum of
  |x|^p, or max |x| with NaN kept) to its own slot. A one-program kernel then reduces the partials in
  a fixed order and writes the norm in the group's dtype. No atomics: the result is deterministic.
- Scale: one launch; each program multiplies its tiles in place by the scale read from device memory.

The table is cached for the last (addresses, lengths) seen, so the norm and the scaling of one
``clip_grad_norm_`` call, and later steps whose gradients reuse their memory, share one copy.
Arithmetic runs in float64 for float64 tensors and in float32 otherwise.

The tables hold real addresses, so these ops cannot be traced by ``torch.compile`` (their fake
implementations give shapes only); the public clipping functions call them eagerly.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from vgkernels._library import _C, cpp_available
from vgkernels.triton import _host

TILE = 4096  # elements per tile; tests lower it to cover several tiles on tiny tensors
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Norm kinds (constexpr KIND)
_ONE, _TWO, _INF, _POW = 0, 1, 2, 3


@triton.jit
def _tile(meta_ptr, like_ptr, n_tensors, n_tiles, tile, TILE: tl.constexpr, ALIGNED: tl.constexpr):
    """Typed base pointer of tile ``tile``'s tensor, the tile's offsets, the tensor's length, and
    whether the tile is full (its loads need no mask)."""
    # meta layout (int64): addresses [N], lengths [N], tile's tensor [T], tile's first element [T]
    tensor = tl.load(meta_ptr + 2 * n_tensors + tile)
    start = tl.load(meta_ptr + 2 * n_tensors + n_tiles + tile)
    numel = tl.load(meta_ptr + n_tensors + tensor)
    base = tl.load(meta_ptr + tensor).to(like_ptr.dtype)
    if ALIGNED:
        # Every address is 16-byte aligned and TILE is a multiple of 16: full tiles load as vectors.
        base = tl.multiple_of(base, 16)
        start = tl.multiple_of(start, 16)
    offs = start + tl.arange(0, TILE)
    return base, offs, numel, start + TILE <= numel


@triton.jit
def _norm_partial_kernel(meta_ptr, like_ptr, part_ptr, n_tensors, n_tiles, p, KIND: tl.constexpr,
                         TILE: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    acc_ty = part_ptr.dtype.element_ty
    acc = tl.zeros([TILE], dtype=acc_ty)
    nans = tl.zeros([TILE], dtype=tl.int32)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        base, offs, numel, full = _tile(meta_ptr, like_ptr, n_tensors, n_tiles, tile, TILE, ALIGNED)
        if full:
            x = tl.load(base + offs)
        else:
            x = tl.load(base + offs, mask=offs < numel, other=0.0)
        a = tl.abs(x.to(acc_ty))
        if KIND == 0:
            acc += a
        elif KIND == 1:
            acc += a * a
        elif KIND == 2:
            acc = tl.maximum(acc, a)
            nans += (a != a).to(tl.int32)
        else:
            # |x|^p = 2^(p log2 |x|), and 0 for x = 0 (p > 0); NaN and inf pass through
            acc += tl.where(a == 0, 0.0, tl.exp2(p * tl.log2(tl.where(a == 0, 1.0, a))))
    if KIND == 2:
        part = tl.max(acc, axis=0)
        part = tl.where(tl.sum(nans, axis=0) > 0, float("nan"), part)
    else:
        part = tl.sum(acc, axis=0)
    tl.store(part_ptr + pid, part)


@triton.jit
def _norm_finish_kernel(part_ptr, out_ptr, n_parts, inv_p, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n_parts
    part = tl.load(part_ptr + offs, mask=mask, other=0.0)
    if KIND == 2:
        total = tl.max(part, axis=0)
        total = tl.where(tl.sum((part != part).to(tl.int32), axis=0) > 0, float("nan"), total)
    else:
        total = tl.sum(part, axis=0)
        if KIND == 1:
            total = tl.sqrt(total)
        elif KIND == 3:
            total = tl.exp2(inv_p * tl.log2(total))
    tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))


@triton.jit
def _scale_kernel(meta_ptr, like_ptr, scale_ptr, n_tensors, n_tiles, TILE: tl.constexpr, F64: tl.constexpr,
                  ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    if F64:
        s = tl.load(scale_ptr).to(tl.float64)
    else:
        s = tl.load(scale_ptr).to(tl.float32)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        base, offs, numel, full = _tile(meta_ptr, like_ptr, n_tensors, n_tiles, tile, TILE, ALIGNED)
        if full:
            x = tl.load(base + offs)
            tl.store(base + offs, (x.to(s.dtype) * s).to(x.dtype))
        else:
            mask = offs < numel
            x = tl.load(base + offs, mask=mask)
            tl.store(base + offs, (x.to(s.dtype) * s).to(x.dtype), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Host side

_cache: dict[str, object] = {"host": None, "device": None, "meta": None}


def _host_table(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, int, bool] | None:
    """The int64 host table (addresses [N], lengths [N], each tile's tensor and first element), the tile
    count, and whether every address is 16-byte aligned; None when a tensor is not contiguous."""
    if cpp_available():
        return _C.tensor_table(tensors, TILE)
    if not all(t.is_contiguous() for t in tensors):  # without the C++ build: the same table in numpy
        return None
    addresses = np.asarray([t.data_ptr() for t in tensors], dtype=np.int64)
    lengths = np.asarray([t.numel() for t in tensors], dtype=np.int64)
    tiles = (lengths + TILE - 1) // TILE
    tile_tensor = np.repeat(np.arange(len(tensors), dtype=np.int64), tiles)
    first_tile = np.cumsum(tiles) - tiles
    tile_start = (np.arange(tile_tensor.size, dtype=np.int64) - np.repeat(first_tile, tiles)) * TILE
    aligned = TILE % 16 == 0 and bool((addresses % 16 == 0).all())
    table = torch.from_numpy(np.concatenate([addresses, lengths, tile_tensor, tile_start]))
    return table, int(tile_tensor.size), aligned


def _meta(tensors: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, int, bool] | None:
    """The table of :func:`_host_table` on ``device`` (the copy kept for the last table seen: a training
    loop's gradients sit at the same addresses step after step), the tile count and the alignment; None
    when a tensor is not contiguous."""
    made = _host_table(tensors)
    if made is None:
        return None
    host, n_tiles, aligned = made
    cached = _cache["host"]
    if _cache["device"] == device and cached is not None and torch.equal(cached, host):
        return _cache["meta"]
    staged = host.pin_memory() if device.type == "cuda" else host
    meta = (staged.to(device, non_blocking=True), n_tiles, aligned)
    _cache["host"], _cache["device"], _cache["meta"] = host, device, meta
    return meta


def _programs(n_tiles: int, device: torch.device) -> int:
    sms = _host.sm_count(device)
    if sms is not None:
        return max(1, min(n_tiles, 4 * sms))
    return max(1, min(n_tiles, 4))  # interpreter: a few programs, enough to exercise the striding


def _kind(norm_type: float) -> int:
    if norm_type == 1.0:
        return _ONE
    if norm_type == 2.0:
        return _TWO
    if norm_type == float("inf"):
        return _INF
    return _POW


# An opaque op: its host side reads data pointers, which torch.compile's tensors lack.
@torch.library.custom_op("vgk::multi_tensor_norm_triton", mutates_args=())
def multi_tensor_norm_triton(tensors: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """p-norm (p > 0 or inf) of all elements of ``tensors`` together: a 0-dim tensor of their dtype.

    ``tensors``: N >= 1 tensors of one dtype (float32, float64, float16, bfloat16) on one device, any
    shapes; checked by :mod:`vgkernels.ops.clip_grad`. Non-contiguous tensors are read through a
    contiguous copy.
    """
    return norm_launch(tensors, norm_type)


def norm_launch(tensors, norm_type):
    """The launches behind :func:`multi_tensor_norm_triton` (also called directly by the AOT check)."""
    data = tensors
    made = _meta(data, data[0].device)
    if made is None:  # read non-contiguous tensors through contiguous copies
        data = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        made = _meta(data, data[0].device)
    device, dtype = data[0].device, data[0].dtype
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    kind = _kind(norm_type)
    out = torch.empty((), dtype=dtype, device=device)
    with _host.device_ctx(device):
        meta, n_tiles, aligned = made
        programs = _programs(n_tiles, device)
        partials = torch.zeros(programs, dtype=acc_dtype, device=device)
        if n_tiles > 0:
            _host.launch(
                _norm_partial_kernel, (programs,), meta, data[0], partials, len(data), n_tiles,
                float(norm_type), KIND=kind, TILE=TILE, ALIGNED=aligned, num_warps=8,
            )
        _host.launch(
            _norm_finish_kernel, (1,), partials, out, programs, 1.0 / float(norm_type), KIND=kind,
            BLOCK=_host.next_power_of_2(programs),
        )
    return out


@multi_tensor_norm_triton.register_fake
def _(tensors, norm_type):
    return tensors[0].new_empty(())


# An opaque op: its host side reads data pointers, which torch.compile's tensors lack.
@torch.library.custom_op("vgk::multi_tensor_scale_triton_", mutates_args={"tensors"})
def multi_tensor_scale_triton_(tensors: list[torch.Tensor], scale: torch.Tensor) -> None:
    """In place: every tensor of ``tensors`` (one dtype, one device) *= ``scale`` (one element there)."""
    scale_launch(tensors, scale)


def scale_launch(tensors, scale):
    """The launches behind :func:`multi_tensor_scale_triton_` (also called directly by the AOT check)."""
    if not tensors:
        return
    dense, made = tensors, _meta(tensors, tensors[0].device)
    if made is None:
        dense = [t for t in tensors if t.is_contiguous()]
        for t in tensors:
            if not t.is_contiguous():  # rare for gradients: torch's own kernel
                t.mul_(scale)
        if not dense:
            return
        made = _meta(dense, dense[0].device)
    device = dense[0].device
    with _host.device_ctx(device):
        meta, n_tiles, aligned = made
        if n_tiles > 0:
            _host.launch(
                _scale_kernel, (_programs(n_tiles, device),), meta, dense[0], scale, len(dense), n_tiles,
                TILE=TILE, F64=dense[0].dtype == torch.float64,
                ALIGNED=aligned, num_warps=8,
            )


@multi_tensor_scale_triton_.register_fake
def _(tensors, scale):
    return None
