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
    if grad_clip is None:
        x = input
    else:
        clip = float(grad_clip)
        x = clipped(input, lambda grad: clip_rows(grad, k, clip), "grad_clip")
    return normalize(x, k, weight, bias, eps)
