"""Triton LayerNorm kernels: ``vgk::layer_norm_forward_triton`` and ``vgk::layer_norm_backward_triton``.

They take the arguments and return the outputs of the C++ ops ``vgk::layer_norm_forward`` /
``vgk::layer_norm_backward`` (see ``vgkernels/ops/layer_norm.py``), so the autograd code calls either.

- Rows of up to ``MAX_FUSED`` elements are held whole in registers: the forward reads x once, the
  backward reads x and dy once. Longer rows are walked in chunks of ``LOOP_BLOCK`` (a few more reads,
  served mostly by the L2 cache).
- The backward is persistent: a grid of G programs, each walking rows pid, pid + G, ... and keeping its
  share of dW and db in float32 registers (or in its own row of the partial buffer for long rows),
  written to a [G, N] partial buffer; a second kernel sums the G rows in order. No atomics, so the
  parameter gradients are deterministic for a given device.
- ``grad_clip``: each row of dx is rescaled to L2 norm at most c before it is stored.

Dtypes: float32, float64, float16 and bfloat16, with weight and bias in the input's dtype or, for half
inputs, float32. Statistics and arithmetic are float64 for float64 input and float32 otherwise; mean,
rstd and the parameter gradients are returned in that type (the autograd casts each parameter's
gradient to its dtype), the output and the input gradient in the input's dtype.
Arguments are checked by :func:`vgkernels.ops.layer_norm.layer_norm` before any kernel runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from vgkernels.triton import _host
from vgkernels.triton._host import acc_dtype as _acc_dtype
from vgkernels.triton._host import device_ctx as _device_ctx

MAX_FUSED = 8192  # longest row held whole in registers; tests lower it to cover the looped kernels
LOOP_BLOCK = 4096  # chunk of a longer row

# Tests set this to nan so that any output element a kernel fails to write shows up.
_ALLOC_FILL: float | None = None


# ---------------------------------------------------------------------------------------------------
# Forward


# Overflow of the statistics. A float32 beyond ~1.8e19 has no float32 square, so the variance of a row
# holding such values is inf (and torch's LayerNorm returns the bias, or NaN). A row whose largest |x|
# exceeds 2^50 is therefore normalized as x / max|x|: its squares stay below N, and the LayerNorm, which
# does not change when its input is scaled, is the same up to eps (scaled along). Other rows are
# computed exactly as before (the scale is 1). The backward meets such a row through its small rstd
# (below 2^-50 only for these), and then forms x * rstd - mean * rstd, where x - mean could overflow.


@triton.jit
def _row_scale(max_abs):
    """1 / max|x| for a row whose squares could overflow (max|x| > 2^50), else 1."""
    return tl.where(max_abs > 1125899906842624.0, 1.0 / max_abs, 1.0)


@triton.jit
def _normalized(x, mean, rstd):
    """(x - mean) * rstd, formed as x * rstd - mean * rstd for the rows of huge values (rstd < 2^-50)."""
    return tl.where(rstd < 8.881784197001252e-16, x * rstd - mean * rstd, (x - mean) * rstd)


@triton.jit
def _forward_fused_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, N, eps,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc_ty = mean_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(acc_ty)
    inv = _row_scale(tl.max(tl.abs(x), axis=0))
    xs = x * inv
    mean_s = tl.sum(xs, axis=0) / N
    d = tl.where(mask, xs - mean_s, 0.0)
    rstd_s = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / N + eps * inv * inv)
    y = d * rstd_s
    mean = mean_s / inv
    rstd = rstd_s * inv
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(acc_ty)
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(acc_ty)
    tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _forward_looped_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, N, eps,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc_ty = mean_ptr.dtype.element_ty
    x_row = x_ptr + row * N
    y_row = y_ptr + row * N
    acc = tl.zeros([BLOCK], dtype=acc_ty)
    big = tl.zeros([BLOCK], dtype=acc_ty)
    for off in range(0, N, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < N, other=0.0).to(acc_ty)
        acc += x
        big = tl.maximum(big, tl.abs(x))
    inv = _row_scale(tl.max(big, axis=0))
    total = tl.sum(acc, axis=0)
    mean_s = total / N * inv
    if total - total != 0.0:
        # The sum is not finite: it overflowed (values near float32's max), or the row holds inf or NaN.
        # Sum the scaled values instead.
        acc = tl.zeros([BLOCK], dtype=acc_ty)
        for off in range(0, N, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            acc += tl.load(x_row + cols, mask=cols < N, other=0.0).to(acc_ty) * inv
        mean_s = tl.sum(acc, axis=0) / N
    acc = tl.zeros([BLOCK], dtype=acc_ty)
    for off in range(0, N, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < N
        d = tl.where(mask, tl.load(x_row + cols, mask=mask, other=0.0).to(acc_ty) * inv - mean_s, 0.0)
        acc += d * d
    rstd_s = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps * inv * inv)
    mean = mean_s / inv
    rstd = rstd_s * inv
    for off in range(0, N, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < N
        y = (tl.load(x_row + cols, mask=mask, other=0.0).to(acc_ty) * inv - mean_s) * rstd_s
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(acc_ty)
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(acc_ty)
        tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


# ---------------------------------------------------------------------------------------------------
# Backward. With xh = (x - mean) * rstd and g = dy * w:  dx = rstd * (g - mean(g) - xh * mean(g * xh)).


@triton.jit
def _clip_scale(sq, clip, HAS_CLIP: tl.constexpr):
    """Factor that brings a row of squared norm ``sq`` down to norm ``clip`` (1 when within it)."""
    scale = 1.0
    if HAS_CLIP:
        scale = tl.where(sq > clip * clip, clip / tl.sqrt(sq), 1.0)
    return scale


@triton.jit
def _backward_fused_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
                           M, N, clip, HAS_W: tl.constexpr, DW: tl.constexpr, DB: tl.constexpr,
                           HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc_ty = mean_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(acc_ty)
    dw_acc = tl.zeros([BLOCK], dtype=acc_ty)
    db_acc = tl.zeros([BLOCK], dtype=acc_ty)
    for r in range(pid, M, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(acc_ty)
        dy = tl.load(dy_ptr + row * N + cols, mask=mask, other=0.0).to(acc_ty)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        xh = tl.where(mask, _normalized(x, mean, rstd), 0.0)
        g = dy * w if HAS_W else dy
        a = tl.sum(g, axis=0) / N
        c = tl.sum(g * xh, axis=0) / N
        dx = tl.where(mask, rstd * (g - a - xh * c), 0.0)
        dx = dx * _clip_scale(tl.sum(dx * dx, axis=0), clip, HAS_CLIP)
        tl.store(dx_ptr + row * N + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if DW:
            dw_acc += dy * xh
        if DB:
            db_acc += dy
    if DW:
        tl.store(dw_part_ptr + pid * N + cols, dw_acc, mask=mask)
    if DB:
        tl.store(db_part_ptr + pid * N + cols, db_acc, mask=mask)


@triton.jit
def _backward_looped_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
                            M, N, clip, HAS_W: tl.constexpr, DW: tl.constexpr, DB: tl.constexpr,
                            HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr):
    # The partial rows start at zero; each program reads back only the elements it stored itself,
    # through the same block layout.
    pid = tl.program_id(0)
    acc_ty = mean_ptr.dtype.element_ty
    dw_row = dw_part_ptr + pid * N
    db_row = db_part_ptr + pid * N
    for r in range(pid, M, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        x_row = x_ptr + row * N
        dy_row = dy_ptr + row * N
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        sum_g = tl.zeros([BLOCK], dtype=acc_ty)
        sum_gx = tl.zeros([BLOCK], dtype=acc_ty)
        for off in range(0, N, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < N
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(acc_ty)
            dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(acc_ty)
            xh = tl.where(mask, _normalized(x, mean, rstd), 0.0)
            g = dy * tl.load(w_ptr + cols, mask=mask, other=0.0).to(acc_ty) if HAS_W else dy
            sum_g += g
            sum_gx += g * xh
            if DW:
                tl.store(dw_row + cols, tl.load(dw_row + cols, mask=mask, other=0.0) + dy * xh, mask=mask)
            if DB:
                tl.store(db_row + cols, tl.load(db_row + cols, mask=mask, other=0.0) + dy, mask=mask)
        a = tl.sum(sum_g, axis=0) / N
        c = tl.sum(sum_gx, axis=0) / N
        scale = 1.0
        if HAS_CLIP:
            sq = tl.zeros([BLOCK], dtype=acc_ty)
            for off in range(0, N, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                mask = cols < N
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(acc_ty)
                dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(acc_ty)
                g = dy * tl.load(w_ptr + cols, mask=mask, other=0.0).to(acc_ty) if HAS_W else dy
                dx = tl.where(mask, rstd * (g - a - _normalized(x, mean, rstd) * c), 0.0)
                sq += dx * dx
            scale = _clip_scale(tl.sum(sq, axis=0), clip, HAS_CLIP)
        for off in range(0, N, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < N
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(acc_ty)
            dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(acc_ty)
            g = dy * tl.load(w_ptr + cols, mask=mask, other=0.0).to(acc_ty) if HAS_W else dy
            dx = rstd * (g - a - _normalized(x, mean, rstd) * c) * scale
            tl.store(dx_ptr + row * N + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, G, N, BLOCK: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros([BLOCK], dtype=part_ptr.dtype.element_ty)
    for g in range(0, G):
        acc += tl.load(part_ptr + g * N + cols, mask=mask, other=0.0)
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Host side


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _host.alloc(shape, dtype, device, _ALLOC_FILL)


def _rows_cols(input: torch.Tensor, normalized_ndim: int) -> tuple[int, int]:
    n = 1
    for s in input.shape[input.dim() - normalized_ndim:]:
        n *= s
    return input.numel() // n, n


def _launch_shape(n: int, dtype: torch.dtype) -> tuple[bool, int, int]:
    """(fused, block, num_warps) for rows of n elements; float64 rows are held whole up to half the
    length (the backward's registers would spill above)."""
    fused = n <= (MAX_FUSED // 2 if dtype == torch.float64 else MAX_FUSED)
    block = _host.next_power_of_2(n) if fused else LOOP_BLOCK
    return fused, block, min(16, max(1, block // 512))


def _programs(m: int, device: torch.device) -> int:
    sms = _host.sm_count(device)
    if sms is not None:
        return max(1, min(m, 2 * sms))
    return max(1, min(m, 4))  # interpreter: a few programs, enough to exercise the row striding


@triton_op("vgk::layer_norm_forward_triton", mutates_args=())
def layer_norm_forward_triton(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    normalized_ndim: int,
    eps: float,
    grad_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm over the last ``normalized_ndim`` dims: (output like input, mean, rstd [leading shape]).

    ``grad_clip`` is not used by the forward; it is an argument so that the autograd context sees it.
    """
    return forward_launch(input, weight, bias, normalized_ndim, eps)


def forward_launch(input, weight, bias, normalized_ndim, eps):
    """The launches behind :func:`layer_norm_forward_triton` (also called directly by the AOT check)."""
    x = input.contiguous()
    m, n = _rows_cols(x, normalized_ndim)
    lead = x.shape[: x.dim() - normalized_ndim]
    out = _alloc(x.shape, x.dtype, x.device)
    mean = _alloc(lead, _acc_dtype(x.dtype), x.device)
    rstd = _alloc(lead, _acc_dtype(x.dtype), x.device)
    if m == 0:
        return out, mean, rstd
    fused, block, warps = _launch_shape(n, x.dtype)
    kernel = _forward_fused_kernel if fused else _forward_looped_kernel
    w = weight.contiguous() if weight is not None else x
    b = bias.contiguous() if bias is not None else x
    with _device_ctx(x.device):
        _host.launch(
            kernel, (m,), x, out, w, b, mean, rstd, n, eps, HAS_W=weight is not None, HAS_B=bias is not None,
            BLOCK=block, num_warps=warps,
        )
    return out, mean, rstd


@triton_op("vgk::layer_norm_backward_triton", mutates_args=())
def layer_norm_backward_triton(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    normalized_ndim: int,
    grad_clip: float | None,
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight, grad_bias); a parameter gradient not asked for has 0 elements."""
    return backward_launch(grad_output, input, mean, rstd, weight, normalized_ndim, grad_clip, weight_grad,
                           bias_grad)


def backward_launch(grad_output, input, mean, rstd, weight, normalized_ndim, grad_clip, weight_grad,
                    bias_grad):
    """The launches behind :func:`layer_norm_backward_triton` (also called directly by the AOT check)."""
    x = input.contiguous()
    dy = grad_output.contiguous()
    m, n = _rows_cols(x, normalized_ndim)
    device = x.device
    acc = _acc_dtype(x.dtype)
    grad_input = _alloc(x.shape, x.dtype, device)
    grad_weight = _alloc((n if weight_grad else 0,), acc, device)
    grad_bias = _alloc((n if bias_grad else 0,), acc, device)
    if m == 0:
        grad_weight.zero_()
        grad_bias.zero_()
        return grad_input, grad_weight, grad_bias
    fused, block, warps = _launch_shape(n, x.dtype)
    programs = _programs(m, device)
    alloc_part = _alloc if fused else (lambda shape, dtype, dev: torch.zeros(shape, dtype=dtype, device=dev))
    dw_part = alloc_part((programs, n), acc, device) if weight_grad else grad_input
    db_part = alloc_part((programs, n), acc, device) if bias_grad else grad_input
    w = weight.contiguous() if weight is not None else x
    kernel = _backward_fused_kernel if fused else _backward_looped_kernel
    with _device_ctx(device):
        _host.launch(
            kernel, (programs,), dy, x, w, mean, rstd, grad_input, dw_part, db_part, m, n,
            grad_clip if grad_clip is not None else 0.0,
            HAS_W=weight is not None, DW=weight_grad, DB=bias_grad, HAS_CLIP=grad_clip is not None,
            BLOCK=block, num_warps=warps,
        )
        sum_block = min(1024, _host.next_power_of_2(n))
        for part, out, wanted in ((dw_part, grad_weight, weight_grad), (db_part, grad_bias, bias_grad)):
            if wanted:
                _host.launch(
                    _sum_partials_kernel, (_host.cdiv(n, sum_block),), part, out, programs, n,
                    BLOCK=sum_block, num_warps=4,
                )
    return grad_input, grad_weight, grad_bias
