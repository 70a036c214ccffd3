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

    Statistics are computed in float32 (float64 for float64 input). ``weight`` and ``bias`` have shape
    ``normalized_shape``. With ``grad_clip=c`` the gradient reaching ``input`` is rescaled per row
    (the normalized dims flattened) to L2 norm at most c; the weight and bias gradients are unchanged.
    Returns a tensor of ``input``'s shape and dtype.
    """
    k = len(normalized_shape)
    x = input if grad_clip is None else _ClipRowGrad.apply(input, k, float(grad_clip))
    dims = tuple(range(x.dim() - k, x.dim()))
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    mean = xf.mean(dim=dims, keepdim=True)
    var = (xf - mean).square().mean(dim=dims, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(input.dtype)
