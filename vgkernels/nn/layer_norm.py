"""``LayerNorm``: a drop-in ``torch.nn.LayerNorm`` on the fused kernels, with an optional clip of dx."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vgkernels.backends import BACKENDS
from vgkernels.ops.layer_norm import layer_norm


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by :func:`vgkernels.ops.layer_norm`.

    The parameters (``weight``, ``bias``, shape ``normalized_shape``) and their initialisation are
    torch's, so state dicts load in both directions and ``isinstance(m, torch.nn.LayerNorm)`` holds.

    Args:
        normalized_shape, eps, elementwise_affine, bias, device, dtype: as in ``torch.nn.LayerNorm``.
        grad_clip: None, or c > 0: each row of the gradient passed on to the input (the normalized
            dims flattened) is rescaled to L2 norm at most c. The parameter gradients are unclipped.
        backend: ``"cpp"``, ``"triton"``, ``"reference"`` or None (chosen by the input's device).

    Shape: input [*, *normalized_shape] (float32, float64, float16 or bfloat16); output the same.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        *,
        grad_clip: float | None = None,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"LayerNorm: grad_clip must be None or a number > 0, got {grad_clip!r}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"LayerNorm: backend must be one of {BACKENDS} or None, got {backend!r}")
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(
            input, self.normalized_shape, self.weight, self.bias, self.eps, grad_clip=self.grad_clip,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        if self.grad_clip is not None:
            extra += f", grad_clip={self.grad_clip}"
        if self.backend is not None:
            extra += f", backend={self.backend!r}"
        return extra
