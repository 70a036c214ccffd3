"""Eager LayerNorm with a per-row clipped input gradient: the oracle for the fused kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def clip_rows(grad: torch.Tensor, normalized_ndim: int, max_norm: float) -> torch.Tensor:
    """Return ``grad`` with each row (its last ``normalized_ndim`` dims) rescaled to L2 norm <= max_norm.

    Rows whose norm is already at most ``max_norm`` are unchanged; longer rows are scaled to exactly
    ``max_norm``, keeping their direction.
    """
    rows = grad.reshape(*grad.shape[: grad.dim() - normalized_ndim], -1)
    norm = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
    scale = torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm))
    return (rows * scale).reshape(grad.shape)


class _ClipRowGrad(torch.autograd.Function):
    """Identity forward; the backward clips each row of the incoming gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, normalized_ndim: int, max_norm: float) -> torch.Tensor:
        ctx.normalized_ndim = normalized_ndim
        ctx.max_norm = max_norm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return clip_rows(grad, ctx.normalized_ndim, ctx.max_norm), None, None


def normalize(
    x: torch.Tensor,
    normalized_ndim: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LayerNorm of the last ``normalized_ndim`` dims of ``x``, returned in ``x``'s dtype.

    The statistics and the normalization are computed in float64, whatever ``x``'s dtype: the squares
    of float32 values beyond ~1e19 overflow float32 (torch's float32 LayerNorm then returns the bias, or
    NaN), but not float64, so every finite float32 row has its exact LayerNorm. ``weight`` and ``bias``
    (shape of the normalized dims, any float dtype) multiply and shift in float64 too.
    """
    dims = tuple(range(x.dim() - normalized_ndim, x.dim()))
    xd = x.to(torch.float64)
    mean = xd.mean(dim=dims, keepdim=True)
    var = (xd - mean).square().mean(dim=dims, keepdim=True)
    y = (xd - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(torch.float64)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)


def layer_norm(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    grad_clip: float | None = None,
) -> torch.Tensor:
    """LayerNorm over the trailing ``normalized_shape`` dims of ``input`` (any float dtype).

    Computed by :func:`normalize` (float64 statistics). ``weight`` and ``bias`` have shape
    ``normalized_shape``, in the input's dtype or, for float16/bfloat16 input, float32 (as
    ``F.layer_norm`` accepts). With ``grad_clip=c`` the gradient reaching ``input`` is rescaled per row
    (the normalized dims flattened) to L2 norm at most c; the weight and bias gradients are unchanged.
    Returns a tensor of ``input``'s shape and dtype.
    """
    k = len(normalized_shape)
    x = input if grad_clip is None else _ClipRowGrad.apply(input, k, float(grad_clip))
    return normalize(x, k, weight, bias, eps)
