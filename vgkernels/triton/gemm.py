"""The large matrix products of the Triton recurrent layers, in the precision cuDNN would use.

torch runs a whole float32 recurrent layer on cuDNN in the precision of its RNN switch
(``torch.backends.cudnn.rnn.fp32_precision``, set also by ``torch.backends.cudnn.allow_tf32``: TF32
by default), input projection and weight gradients included. Our recurrent dots follow that switch
(:func:`vgkernels.triton._host.fp32_dot_tf32`); the products around the time loop (the input projection,
its gradients, the gradients of W_hh and of the initial state) would be torch matmuls, which follow
another switch, ``torch.backends.cuda.matmul`` (IEEE by default). :func:`mm` makes them follow the
cuDNN switch too, without touching any global setting: where torch's matmul switch already gives the
cuDNN switch's precision (or the operands are not float32) it is a torch matmul (cuBLAS); where the two
differ (torch's defaults: TF32 for cuDNN, IEEE for matmuls) it is the Triton kernel below, whose
``tl.dot`` takes the cuDNN switch's precision.

``vgk::mm_triton`` is the autograd-aware op (its backward runs the same products), so a layer's input
projection and its gradients stay one precision; :func:`linear` applies it to ``x W^T + b``.

The kernel: one [BLOCK_M, BLOCK_N] tile of C = A B (+ bias) per program, in TF32 on operands copied
K-major first where they are not (``STAGE_K_MAJOR``), K in BLOCK_K steps with float32
accumulation, programs grouped along M for L2 reuse; where the tiles alone would leave SMs idle
(the weight gradients: few output tiles, long K), SPLIT programs share each tile's K range and torch
sums their partials (a fixed order: deterministic, no atomics). Any strides: IEEE products read
transposed operands in place.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from vgkernels.triton import _host

MAX_SPLIT = 8
# Hopper's TF32 wgmma reads float32 operands K-major only; an operand with K strided (the weight
# gradients': time steps along K) compiles to 4-byte copies into shared memory. On an H200 those two
# products ran 1.9x faster on K-major copies, copies included (bench/results/gemm_sweep_*).
STAGE_K_MAJOR = True
# 64 was no faster for a whole layer on an H200, and 128 x 128 tiles would need 192 KB of shared
# memory, over an A100's 164 KB.
BLOCK_K = 32
# Tests set these: run the Triton kernel wherever a product is float32 (also under the interpreter), and
# plan as if for a GPU with that many SMs.
_FORCE_TRITON = False
_INTERPRETER_SMS: int | None = None


@triton.jit
def _mm_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr, M, N, K, k_chunk,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cs, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c[k] = a[:, K range k] @ b[K range k, :] (+ bias [N]), float32 accumulation.

    Program (i, k): output tile i (grouped: GROUP_M row tiles share their column tiles), K rows
    k * k_chunk .. of split k; c holds one [M, N] result per split (stride_cs apart).
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    a_rows = a_ptr + tl.cast(rm, tl.int64)[:, None] * stride_am
    b_cols = b_ptr + tl.cast(rn, tl.int64)[None, :] * stride_bn
    k_begin = pid_k * k_chunk
    k_end = tl.minimum(k_begin + k_chunk, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        a = tl.load(a_rows + tl.cast(ks, tl.int64)[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(b_cols + tl.cast(ks, tl.int64)[:, None] * stride_bk, mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c = (c_ptr + tl.cast(pid_k, tl.int64) * stride_cs + tl.cast(rm, tl.int64)[:, None] * stride_cm
         + tl.cast(rn, tl.int64)[None, :] * stride_cn)
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def plan(M: int, N: int, K: int, sms: int | None, block_k: int = BLOCK_K) -> dict:
    """Tiles, split and warps of an [M, K] x [K, N] product on a GPU of ``sms`` SMs (None: the
    interpreter, one large tile per program), ``block_k`` rows of K per step.

    Large tiles (128 x 128 from 1024 rows or columns, else 64, down to 16 for a small M or N), the
    longer side halved while the tiles leave SMs idle (to 16 x 16); still short of the SMs, SPLIT
    programs share each tile's K range, at least two K tiles each.
    """
    if sms is None:
        return {"BLOCK_M": max(16, min(64, _host.next_power_of_2(M))),
                "BLOCK_N": max(16, min(64, _host.next_power_of_2(N))), "BLOCK_K": 16, "SPLIT": 1,
                "num_warps": 4, "num_stages": 1}

    def side(n: int) -> int:
        return 128 if n >= 1024 else 64 if n >= 64 else max(16, _host.next_power_of_2(n))

    block_m, block_n = side(M), side(N)
    target = _host.busy_target(sms)

    def tiles() -> int:
        return _host.cdiv(M, block_m) * _host.cdiv(N, block_n)

    while tiles() < target and max(block_m, block_n) > 16:
        # N gives way on a tie: 64 rows keep Hopper's warpgroup MMA (a 32-row tile falls back to
        # mma.sync, and TF32 at 32 x 64 needed a stack frame on sm_90)
        if block_m > block_n:
            block_m //= 2
        else:
            block_n //= 2
    split = 1
    if tiles() < target:
        split = min(MAX_SPLIT, _host.next_power_of_2(_host.cdiv(target, tiles())),
                    max(1, K // (2 * block_k)))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT": split,
            "num_warps": 8 if block_m * block_n >= 128 * 128 else 4, "num_stages": 3}


_cached_plan = functools.lru_cache(maxsize=256)(plan)  # a pure function, asked at every product


def matmul_tf32(device: torch.device) -> bool:
    """Whether a torch float32 matmul on ``device`` runs in TF32 (``torch.backends.cuda.matmul``)."""
    if device.type != "cuda":
        return False  # the interpreter, and a capture for a GPU: torch's default, IEEE
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # torch refuses the legacy reading once the new switch has been set
        return torch.backends.cuda.matmul.fp32_precision == "tf32"


def uses_triton(a: torch.Tensor) -> bool:
    """Whether :func:`mm` of float32 operands like ``a`` runs the Triton kernel (see the module docstring)."""
    if a.dtype != torch.float32:
        return False
    if _FORCE_TRITON:
        return True
    return _host.on_gpu(a.device) and _host.fp32_dot_tf32(a.device) != matmul_tf32(a.device)


def _k_major(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a and b with K as their contiguous axis, copied where it is not (a [M, K], b [K, N])."""
    return (a if a.stride(1) == 1 else a.contiguous(),
            b if b.stride(0) == 1 else b.t().contiguous().t())


def _run_kernel(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, launch: dict,
               precision: str) -> torch.Tensor:
    """The Triton product ``a @ b (+ bias)`` (float32 [M, K], [K, N], [N] or None) with the launch
    parameters of :func:`plan` (``launch``, not changed), dots in ``precision`` ("tf32" or "ieee");
    returns float32 [M, N]."""
    M, K = a.shape
    N = b.shape[1]
    device = a.device
    p = dict(launch)
    split = p.pop("SPLIT")
    k_chunk = _host.cdiv(_host.cdiv(K, split), p["BLOCK_K"]) * p["BLOCK_K"]
    out = torch.empty((split, M, N) if split > 1 else (M, N), dtype=torch.float32, device=device)
    grid = (_host.cdiv(M, p["BLOCK_M"]) * _host.cdiv(N, p["BLOCK_N"]), split)
    in_kernel = bias is not None and split == 1  # with split K the bias comes after the partials' sum
    if M and N:
        with _host.device_ctx(device):
            _host.launch(_mm_kernel, grid, a, b, bias if in_kernel else out, out, M, N, K, k_chunk,
                         a.stride(0), a.stride(1), b.stride(0), b.stride(1), M * N, out.stride(-2),
                         out.stride(-1), HAS_BIAS=in_kernel, PRECISION=precision, GROUP_M=8, **p)
    if split == 1:
        return out
    out = out.sum(0)
    return out if bias is None else out + bias


def _mm_impl(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if not uses_triton(a):
        return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
    M, K = a.shape
    N = b.shape[1]
    sms = _host.sm_count(a.device)
    precision = "tf32" if _host.fp32_dot_tf32(a.device) else "ieee"
    if precision == "tf32" and STAGE_K_MAJOR:
        a, b = _k_major(a, b)
    return _run_kernel(a, b, bias, _cached_plan(M, N, K, _INTERPRETER_SMS if sms is None else sms, BLOCK_K),
                      precision)


def _check(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"mm_triton: expected a [M, K] and b [K, N], got a {tuple(a.shape)} and b "
                         f"{tuple(b.shape)}")
    if b.dtype != a.dtype or (bias is not None and bias.dtype != a.dtype):
        raise TypeError(f"mm_triton: a, b and bias must share one dtype, got {a.dtype}, {b.dtype}"
                        f"{'' if bias is None else ', ' + str(bias.dtype)}")
    if bias is not None and tuple(bias.shape) != (b.shape[1],):
        raise ValueError(f"mm_triton: bias must have shape ({b.shape[1]},), got {tuple(bias.shape)}")
    if b.device != a.device or (bias is not None and bias.device != a.device):
        raise RuntimeError(f"mm_triton: a, b and bias must be on one device, got {a.device}, {b.device}")


@triton_op("vgk::mm_triton", mutates_args=())
def mm_triton(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``a @ b (+ bias)`` in the precision of cuDNN's switch for float32 (see the module docstring).

    Args:
        a: [M, K]; b: [K, N]; bias: [N] or None; one dtype (float32, float64, bfloat16 or float16) and
            device, any strides.
    Returns:
        [M, N] in that dtype.
    """
    _check(a, b, bias)
    return _mm_impl(a, b, bias)


@mm_triton.register_fake
def _mm_fake(a, b, bias):
    _check(a, b, bias)
    return a.new_empty(a.shape[0], b.shape[1])


def _mm_setup_context(ctx, inputs, output):
    a, b, bias = inputs
    ctx.save_for_backward(a, b)
    ctx.has_bias = bias is not None


def _mm_backward(ctx, grad):
    a, b = ctx.saved_tensors
    op = torch.ops.vgk.mm_triton
    grad_a = op(grad, b.t(), None) if ctx.needs_input_grad[0] else None
    grad_b = op(a.t(), grad, None) if ctx.needs_input_grad[1] else None
    grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_a, grad_b, grad_bias


mm_triton.register_autograd(_mm_backward, setup_context=_mm_setup_context)


def mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b (+ bias)`` (2-D, one dtype), float32 in cuDNN's precision; differentiable."""
    if _host.capturing():  # the launch itself (the op would take its fake implementation on meta tensors)
        _check(a, b, bias)
        return _mm_impl(a, b, bias)
    if not torch.compiler.is_compiling() and not uses_triton(a):
        # torch's own product, differentiable as it is: the custom op's dispatch and autograd node cost
        # the host ~100 us a call (profiled on an H200), and a step loop's layer makes five such calls.
        _check(a, b, bias)
        return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
    return torch.ops.vgk.mm_triton(a, b, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (x [..., I], weight [O, I], bias [O] or None) through :func:`mm`."""
    out = mm(x.reshape(-1, x.shape[-1]), weight.t(), bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])
