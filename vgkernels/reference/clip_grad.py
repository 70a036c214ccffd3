"""Eager global gradient-norm clipping, one tensor at a time: the oracle for the fused kernels.

The total norm is the p-norm of the vector of per-tensor p-norms, exactly as ``torch.nn.utils``
defines it (for p > 0 that is the p-norm of all elements together).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def nonfinite_message(norm_type: float, total_norm: torch.Tensor) -> str:
    """The error raised when ``error_if_nonfinite=True`` meets a NaN or infinite total norm."""
    return (
        f"The total norm of order {norm_type} for gradients from `parameters` is non-finite "
        f"({total_norm.item()}), so the gradients cannot be clipped. Set `error_if_nonfinite=False` to "
        "scale them by the non-finite norm anyway."
    )


def tensor_norms(tensors: list[torch.Tensor], norm_type: float) -> list[torch.Tensor]:
    """The p-norm of each tensor, each a 0-dim tensor of that tensor's dtype and device."""
    return [torch.linalg.vector_norm(t, norm_type) for t in tensors]


def combine_norms(norms: list[torch.Tensor], norm_type: float, device: torch.device) -> torch.Tensor:
    """The p-norm of a list of 0-dim norms, gathered on ``device`` (dtypes promote as in torch.stack)."""
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)


@torch.no_grad()
def get_total_norm(
    tensors: torch.Tensor | Iterable[torch.Tensor],
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """Total p-norm of ``tensors`` as if concatenated into one vector.

    Returns a 0-dim tensor on the first tensor's device (float32 ``tensor(0.)`` for no tensors).
    Raises RuntimeError when ``error_if_nonfinite`` and the norm is NaN or infinite.
    """
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    norm_type = float(norm_type)
    if not tensors:
        return torch.tensor(0.0)
    total = combine_norms(tensor_norms(tensors, norm_type), norm_type, tensors[0].device)
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(nonfinite_message(norm_type, total))
    return total


def clip_coefficient(max_norm: float, total_norm: torch.Tensor) -> torch.Tensor:
    """min(max_norm / (total_norm + 1e-6), 1) as a tensor, computed without a host synchronisation."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    total_norm: torch.Tensor,
) -> None:
    """Multiply every ``.grad`` of ``parameters`` in place by min(max_norm / (total_norm + 1e-6), 1)."""
    parameters = [parameters] if isinstance(parameters, torch.Tensor) else parameters
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    coef = clip_coefficient(float(max_norm), total_norm)
    for g in grads:
        g.mul_(coef.to(g.device))


@torch.no_grad()
def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """Clip the gradients of ``parameters`` to a total p-norm of ``max_norm``; return the norm before."""
    parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    total = get_total_norm([p.grad for p in parameters if p.grad is not None], norm_type, error_if_nonfinite)
    clip_grads_with_norm_(parameters, max_norm, total)
    return total
