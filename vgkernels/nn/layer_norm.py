"""``LayerNorm``: a drop-in ``torch.nn.LayerNorm`` on the fused kernels, with an optional clip of dx."""

from collections.abc import Sequence
from typing import Optional

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

    Shape: input [*, *normalized_shape] (float32, float64, float16 or bfloat16; a half input may come
    with float32 parameters, as in torch); output the same shape and dtype.

    ``torch.jit.script`` works: the scripted module calls the C++ op directly, so it runs on CPU tensors
    with backend None or ``"cpp"`` (TorchScript cannot run the Triton kernels or the Python reference),
    and raises a RuntimeError that says so otherwise.
    """

    # TorchScript reads these annotations, as objects (hence no `from __future__ import annotations` in
    # this file) and in the spelling it knows.
    grad_clip: Optional[float]  # noqa: UP045
    backend: Optional[str]  # noqa: UP045

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
        if torch.jit.is_scripting():
            return self._scripted_forward(input)
        return self._forward(input)

    @torch.jit.unused
    def _forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(
            input, self.normalized_shape, self.weight, self.bias, self.eps, grad_clip=self.grad_clip,
            backend=self.backend,
        )

    def _scripted_forward(self, input: torch.Tensor) -> torch.Tensor:
        """The forward under TorchScript: the C++ op (``vgk::layer_norm_forward``) with its C++ autograd."""
        backend = self.backend
        if (backend is not None and backend != "cpp") or input.device.type != "cpu":
            raise RuntimeError(
                f"vgkernels.nn.LayerNorm (TorchScript): a scripted module runs the C++ kernels on CPU "
                f"tensors only (backend None or 'cpp'); got backend={backend}, input on {input.device}"
            )
        ndim = len(self.normalized_shape)
        trailing = input.shape[input.dim() - ndim:] if input.dim() >= ndim else input.shape
        if trailing != self.normalized_shape:
            raise ValueError(
                f"vgkernels.nn.LayerNorm (TorchScript): the input's trailing dims must equal "
                f"normalized_shape={self.normalized_shape}, got input shape {input.shape}"
            )
        x, weight, bias = input, self.weight, self.bias
        if input.dtype == torch.float16 or input.dtype == torch.bfloat16:
            # As vgkernels.ops.layer_norm: half inputs are computed in float32.
            x = x.float()
            if weight is not None:
                weight = weight.float()
            if bias is not None:
                bias = bias.float()
        out = torch.ops.vgk.layer_norm_forward(x, weight, bias, ndim, self.eps, self.grad_clip)[0]
        return out.to(input.dtype)

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        if self.grad_clip is not None:
            extra += f", grad_clip={self.grad_clip}"
        if self.backend is not None:
            extra += f", backend={self.backend!r}"
        return extra
