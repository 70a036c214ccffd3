"""Eager LayerNorm with a per-row clipped input gradient: the oracle for the fused kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vgkernels.reference.backward_clip import clipped


def clip_rows(grad: torch.Tensor, normalized_ndim: int, max_norm: float) -> torch.Tensor:
    """Return ``grad`` with each row (its last ``normalized_ndim`` dims) rescaled to L2 norm <= max_norm.

    Rows whose norm is already at most ``max_norm`` are unchanged; longer rows are scaled to exactly
    ``max_norm``, keeping their direction.
    """
    rows = grad.reshape(*grad.shape[: grad.dim() - normalized_ndim], -1)
    norm = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
    # max_norm / max_norm is exactly 1; dividing by the norm only where it is larger keeps the double
    # backward of zero rows free of 0 * inf.
    scale = max_norm / torch.where(norm > max_norm, norm, torch.full_like(norm, max_norm))
    return (rows * scale).reshape(grad.shape)


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
    if grad_clip is None:
        x = input
    else:
        clip = float(grad_clip)
        x = clipped(input, lambda grad: clip_rows(grad, k, clip), "grad_clip")
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
