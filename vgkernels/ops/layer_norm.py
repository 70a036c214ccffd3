"""Fused LayerNorm whose backward can clip the gradient it passes on.

:func:`layer_norm` has ``torch.nn.functional.layer_norm``'s signature plus ``grad_clip`` (and
``backend``). With ``grad_clip=c``, each row of the input gradient (the normalized dims flattened) is
rescaled to L2 norm at most c; rows within c are untouched, and the weight and bias gradients are
those of the unclipped upstream gradient.

Ops (each with a fake implementation and registered autograd):

- ``vgk::layer_norm_forward(input, weight?, bias?, normalized_ndim, eps, grad_clip?)``
  -> ``(output, mean, rstd)``; mean and rstd have the leading shape, in float32 (float64 for float64
  input). ``grad_clip`` is only carried to the backward.
- ``vgk::layer_norm_backward(grad_output, input, mean, rstd, weight?, normalized_ndim, grad_clip?,
  weight_grad, bias_grad)`` -> ``(grad_input, grad_weight, grad_bias)``; the parameter gradients are in
  the statistics' dtype, and one not asked for comes back with 0 elements.
- ``vgk::layer_norm_forward_triton`` / ``vgk::layer_norm_backward_triton``: the same in Triton.

Backends: ``"cpp"`` runs float32 and float64; float16 and bfloat16 inputs are computed in float32 and
the result cast back. ``"triton"`` runs all four dtypes natively with float32 statistics.
``"reference"`` is the eager oracle of :mod:`vgkernels.reference.layer_norm`.

Mixed precision, as ``F.layer_norm``: a float16/bfloat16 input may come with float32 weight and bias
(all given parameters float32); the output has the input's dtype, and each gradient its tensor's
dtype. Under ``torch.autocast("cuda")``, where torch casts layer_norm to float32, CUDA inputs of lower
precision are cast to float32 too, so the output is float32 as torch's; ``torch.autocast("cpu")``
leaves layer_norm alone, and so does this function.

Higher order: the backward ops have registered autograd of their own (:func:`_register_double_backward`),
so ``create_graph=True`` gives differentiable gradients through every backend (with ``grad_clip`` it
raises: see :mod:`vgkernels.reference.backward_clip`); under forward-mode AD or a torch.func transform
:func:`layer_norm` runs the reference (see :mod:`vgkernels.ops.autodiff`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from vgkernels._library import cpp_available
from vgkernels.backends import resolve_backend, triton_available
from vgkernels.ops.autodiff import differentiable_vjp, transforms_active
from vgkernels.reference import layer_norm as reference
from vgkernels.reference.backward_clip import refuse_create_graph

OP = "vgkernels.ops.layer_norm"
_CPP_DTYPES = (torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_FLOAT_DTYPES = (torch.float32, torch.float64, *_HALF_DTYPES)


# ---------------------------------------------------------------------------------------------------
# Fake implementations of the C++ ops


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward_fake(input, weight, bias, normalized_ndim, eps, grad_clip):
    lead = input.shape[: input.dim() - normalized_ndim]
    stats = input.new_empty(lead, dtype=_stat_dtype(input.dtype))
    return torch.empty_like(input, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


def _backward_fake(
    grad_output, input, mean, rstd, weight, normalized_ndim, grad_clip, weight_grad, bias_grad
):
    n = math.prod(input.shape[input.dim() - normalized_ndim:])
    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format)
    grad_weight = input.new_empty((n if weight_grad else 0,), dtype=_stat_dtype(input.dtype))
    grad_bias = input.new_empty((n if bias_grad else 0,), dtype=_stat_dtype(input.dtype))
    return grad_input, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------------
# Autograd


def _setup_context(ctx, inputs, output):
    input, weight, bias, normalized_ndim, _eps, grad_clip = inputs
    _, mean, rstd = output
    ctx.save_for_backward(input, weight, mean, rstd)
    ctx.normalized_ndim = normalized_ndim
    ctx.grad_clip = grad_clip
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.param_shape = input.shape[input.dim() - normalized_ndim:]
    ctx.mark_non_differentiable(mean, rstd)


def _make_backward(backward_op):
    def backward(ctx, grad_output, _grad_mean, _grad_rstd):
        input, weight, mean, rstd = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        weight_grad = weight is not None and need_weight
        bias_grad = ctx.has_bias and need_bias
        grad_input, grad_weight, grad_bias = backward_op(
            grad_output, input, mean, rstd, weight, ctx.normalized_ndim, ctx.grad_clip, weight_grad, bias_grad
        )
        # The parameter gradients come in the statistics' dtype: each goes back in its own parameter's.
        return (
            grad_input if need_input else None,
            grad_weight.view(ctx.param_shape).to(weight.dtype) if weight_grad else None,
            grad_bias.view(ctx.param_shape).to(ctx.bias_dtype) if bias_grad else None,
            None,
            None,
            None,
        )

    return backward


def _first_order_gradients(rstd, normalized_ndim, weight_grad, bias_grad):
    """``forward`` for differentiable_vjp: the backward op's outputs from (grad_output, input, weight).

    The statistics are recomputed from the input so that their dependence on it is differentiated;
    eps is not an argument of the backward op, so the saved rstd fixes it: 1/rstd² = var + eps.
    """

    def forward(grad_output, input, weight):
        dims = tuple(range(input.dim() - normalized_ndim, input.dim()))
        lead = tuple(range(input.dim() - normalized_ndim))
        x = input.to(_stat_dtype(input.dtype))
        centered = x - x.mean(dims, keepdim=True)
        var = centered.square().mean(dims, keepdim=True)
        eps = (rstd.reshape(var.shape).to(var.dtype).pow(-2) - var).detach()
        normalized = centered * torch.rsqrt(var + eps)
        g = grad_output.to(x.dtype)
        (grad_input,) = torch.autograd.grad(normalized, input, g if weight is None else g * weight,
                                            create_graph=True)
        grad_weight = (g * normalized).sum(lead).reshape(-1).to(weight.dtype) if weight_grad else None
        grad_bias = g.sum(lead).reshape(-1).to(input.dtype) if bias_grad else None
        return (grad_input.to(input.dtype), grad_weight, grad_bias), ()

    return forward


def _double_backward_setup(ctx, inputs, output):
    grad_output, input, _mean, rstd, weight, normalized_ndim, grad_clip, weight_grad, bias_grad = inputs
    if grad_clip is not None:  # runs in the create_graph backward, before it returns anything
        refuse_create_graph(f"{OP}: grad_clip")
    ctx.save_for_backward(grad_output, input, rstd, weight)
    ctx.config = (normalized_ndim, weight_grad, bias_grad)


def _double_backward(ctx, grad_grad_input, grad_grad_weight, grad_grad_bias):
    grad_output, input, rstd, weight = ctx.saved_tensors
    _, weight_grad, bias_grad = ctx.config
    (g_grad_output, g_input, g_weight), _ = differentiable_vjp(
        _first_order_gradients(rstd.detach(), *ctx.config), (grad_output, input, weight),
        (grad_grad_input, grad_grad_weight if weight_grad else None, grad_grad_bias if bias_grad else None))
    # mean and rstd are non-differentiable outputs of the forward: their dependence on the input is
    # inside g_input.
    return g_grad_output, g_input, None, None, g_weight, None, None, None, None


def _register_double_backward(backward: str) -> None:
    """Autograd of the backward op ``vgk::<backward>`` itself (create_graph=True), through the reference."""
    torch.library.register_autograd(
        f"vgk::{backward}", _double_backward, setup_context=_double_backward_setup
    )


def _register_autograd(forward: str, backward: str) -> None:
    """Autograd of ``vgk::<forward>`` through ``vgk::<backward>``, and of that one for double backward."""
    torch.library.register_autograd(
        f"vgk::{forward}", _make_backward(getattr(torch.ops.vgk, backward)), setup_context=_setup_context
    )
    _register_double_backward(backward)


if cpp_available():  # without the build only the other backends work (and say why cpp does not)
    torch.library.register_fake("vgk::layer_norm_forward")(_forward_fake)
    torch.library.register_fake("vgk::layer_norm_backward")(_backward_fake)
    # The forward's autograd is C++ (csrc/cpu/layer_norm.cpp): a Python one cost ~90 us per call. Its
    # backward calls the backward op with autograd on only under create_graph.
    _register_double_backward("layer_norm_backward")

_triton_forward = None


def _triton_ops():
    """The Triton forward op, importing triton (and registering its autograd) on first use."""
    global _triton_forward
    if _triton_forward is None:
        import vgkernels.triton.layer_norm  # noqa: F401  (defines the Triton ops)

        _register_autograd("layer_norm_forward_triton", "layer_norm_backward_triton")
        _triton_forward = torch.ops.vgk.layer_norm_forward_triton
    return _triton_forward


if torch.cuda.is_available() and triton_available():
    _triton_ops()  # registered up front, so that torch.compile never traces the registration


# ---------------------------------------------------------------------------------------------------
# Public function


def _normalized_shape(normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    if isinstance(normalized_shape, torch.Size | Sequence) and all(
        isinstance(s, numbers.Integral) for s in normalized_shape
    ):
        return tuple(int(s) for s in normalized_shape)
    raise TypeError(f"{OP}: normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")


def _param_dtype(input: torch.Tensor, weight, bias) -> torch.dtype:
    """The dtype the parameters must have: the input's, or float32 for all of them when a float16 or
    bfloat16 input comes with a float32 parameter (F.layer_norm's mixed precision)."""
    given = [p for p in (weight, bias) if isinstance(p, torch.Tensor)]
    if input.dtype in _HALF_DTYPES and any(p.dtype == torch.float32 for p in given):
        return torch.float32
    return input.dtype


def _check_param(name: str, p, input: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if p is None:
        return
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{OP}: {name} must be a tensor or None, got {type(p).__name__}")
    if tuple(p.shape) != shape:
        raise ValueError(f"{OP}: {name} must have shape normalized_shape={list(shape)}, got {list(p.shape)}")
    if p.dtype != dtype:
        mixed = " (with a float16/bfloat16 input: the input's dtype, or float32 for weight and bias both)"
        raise TypeError(
            f"{OP}: {name} must have dtype {dtype}{mixed if input.dtype in _HALF_DTYPES else ''}, the input "
            f"being {input.dtype}; got {p.dtype}"
        )
    if p.device != input.device:
        raise RuntimeError(f"{OP}: {name} must be on the input's device {input.device}, got {p.device}")


def _check_args(input, shape: tuple[int, ...], weight, bias, eps, grad_clip) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{OP}: input must be a tensor, got {type(input).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{OP}: input must be float32, float64, float16 or bfloat16, got {input.dtype}")
    if len(shape) == 0 or any(s < 1 for s in shape):
        raise ValueError(
            f"{OP}: normalized_shape must be a non-empty list of positive sizes, got {list(shape)}"
        )
    if tuple(input.shape[input.dim() - len(shape):]) != shape or input.dim() < len(shape):
        raise ValueError(
            f"{OP}: the input's trailing dims must equal normalized_shape={list(shape)}, got input shape "
            f"{list(input.shape)}"
        )
    dtype = _param_dtype(input, weight, bias)
    _check_param("weight", weight, input, shape, dtype)
    _check_param("bias", bias, input, shape, dtype)
    if not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"{OP}: eps must be a number >= 0, got {eps!r}")
    if grad_clip is not None and (not isinstance(grad_clip, numbers.Real) or not grad_clip > 0):
        raise ValueError(f"{OP}: grad_clip must be None or a number > 0, got {grad_clip!r}")


def _autocast_float32(t: torch.Tensor | None) -> torch.Tensor | None:
    """CUDA autocast's float32 policy (torch's for layer_norm): lower-precision floats become float32."""
    return t.float() if t is not None and t.dtype in _HALF_DTYPES else t


def layer_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    grad_clip: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm over the trailing ``normalized_shape`` dims of ``input``, with an optional clip of dx.

    Args:
        input: [*, *normalized_shape], float32/float64/float16/bfloat16, any strides.
        normalized_shape: the trailing shape to normalize over (an int or a sequence of ints).
        weight, bias: None or tensors of shape ``normalized_shape`` on the input's device, in the input's
            dtype or, for a float16/bfloat16 input, both float32.
        eps: added to the variance.
        grad_clip: None, or c > 0: each row of the input gradient is rescaled to L2 norm at most c.
        backend: ``"cpp"``, ``"triton"``, ``"reference"`` or None (by device; see vgkernels.backends).

    Returns:
        Tensor of ``input``'s shape and dtype (float32 for a half CUDA input under CUDA autocast, as torch).
    """
    shape = _normalized_shape(normalized_shape)
    _check_args(input, shape, weight, bias, eps, grad_clip)
    if input.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        input, weight, bias = (_autocast_float32(t) for t in (input, weight, bias))
    backend = resolve_backend(backend, input.device, OP)
    if backend != "reference" and transforms_active(input, weight, bias):
        backend = "reference"  # the kernels have no forward-mode or torch.func rules
    eps = float(eps)
    grad_clip = None if grad_clip is None else float(grad_clip)
    if backend == "reference":
        return reference.layer_norm(input, shape, weight, bias, eps, grad_clip=grad_clip)
    if backend == "triton":
        return _triton_ops()(input, weight, bias, len(shape), eps, grad_clip)[0]
    if input.dtype not in _CPP_DTYPES:  # cpp: half types are computed in float32
        upcast = [None if t is None else t.float() for t in (input, weight, bias)]
        return torch.ops.vgk.layer_norm_forward(*upcast, len(shape), eps, grad_clip)[0].to(input.dtype)
    return torch.ops.vgk.layer_norm_forward(input, weight, bias, len(shape), eps, grad_clip)[0]
