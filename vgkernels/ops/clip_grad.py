"""Fused global gradient-norm clipping with exactly the semantics of ``torch.nn.utils``.

``get_total_norm``, ``clip_grads_with_norm_`` and ``clip_grad_norm_`` return what torch's functions of
the same names return, raise what they raise, and accept ``foreach`` (the fused kernels serve both
values). Tensors are grouped by (device, dtype) as torch groups them; each group costs one pass over
its data for the norm and one for the scaling:

- CPU tensors: the C++ ops ``vgk::multi_tensor_norm`` (Tensor[] -> norm of the group) and
  ``vgk::multi_tensor_scale_`` (in place on Tensor(a!)[]);
- CUDA tensors: their Triton versions ``vgk::multi_tensor_norm_triton`` and
  ``vgk::multi_tensor_scale_triton_`` (one launch over a table of pointers);
- anything else (other devices, complex or integer dtypes, p <= 0 or -inf, which torch defines per
  tensor): the eager reference, i.e. torch's own operations.

For p > 0 the total norm is the p-norm of the group norms, which equals torch's p-norm of the
per-tensor norms; the returned tensor has torch's dtype and device. Nothing reads a value back to
the host unless ``error_if_nonfinite=True``. Gradients that are tensor subclasses (DTensor under FSDP2
or tensor parallelism) are handed to ``torch.nn.utils`` itself, which reduces across ranks.

The ``backend`` keyword (``"cpp"``, ``"triton"``, ``"reference"`` or None) overrides the choice per
device, e.g. ``backend="triton"`` on CPU tensors under ``TRITON_INTERPRET=1``.

Autodiff: as in torch, the functions run under ``torch.no_grad()``, so their results carry no
gradient. Forward-mode AD is not stopped by no_grad: when a tensor carries a tangent, or a torch.func
transform (jvp, jacfwd, vmap, ...) is active, the reference (torch's own operations) runs, and the total
norm and the scaled gradients carry the tangents the fused kernels would drop.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterable

import torch
import torch.nn.utils as nn_utils
from torch.utils._foreach_utils import _device_has_foreach_support

from vgkernels._library import _C, cpp_available
from vgkernels.backends import resolve_backend
from vgkernels.ops.autodiff import transforms_active
from vgkernels.reference import clip_grad as reference

FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_PLAIN_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))

TensorOrTensors = torch.Tensor | Iterable[torch.Tensor]
Groups = dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]


# ---------------------------------------------------------------------------------------------------
# Fake implementations of the C++ ops, for torch.compile and opcheck


def _multi_tensor_norm_fake(tensors, norm_type):
    return tensors[0].new_empty(())


def _multi_tensor_scale_fake(tensors, scale):
    return None


if cpp_available():
    torch.library.register_fake("vgk::multi_tensor_norm")(_multi_tensor_norm_fake)
    torch.library.register_fake("vgk::multi_tensor_scale_")(_multi_tensor_scale_fake)


# ---------------------------------------------------------------------------------------------------
# Arguments: torch's conversions, with messages that name the argument


def _tensor_list(value, name: str) -> list[torch.Tensor]:
    """``value`` (a tensor or an iterable of tensors) as a list."""
    if isinstance(value, torch.Tensor):
        return [value]
    try:
        items = list(value)
    except TypeError:
        got = type(value).__name__
        raise TypeError(f"{name}: expected a tensor or an iterable of tensors, got {got}") from None
    if not set(map(type, items)) <= _PLAIN_TYPES:  # one C-level pass for the common case
        for i, t in enumerate(items):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}]: expected a tensor, got {type(t).__name__}")
    return items


def _number(value, name: str) -> float:
    """float(value), as torch converts max_norm and norm_type, raising the same exception type."""
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{name}: expected a number, got {value!r}") from None


# ---------------------------------------------------------------------------------------------------
# Dispatch


def _is_plain(tensors: list[torch.Tensor]) -> bool:
    """False when any tensor is a subclass (e.g. DTensor): those go to torch.nn.utils."""
    return set(map(type, tensors)) <= _PLAIN_TYPES


def _groups(tensors: list[torch.Tensor]) -> Groups:
    """The tensors by (device, dtype), in order of first appearance, as torch.nn.utils groups them."""
    if cpp_available() and not torch.compiler.is_compiling():  # one C++ pass; Python's reads a device
        # object per tensor
        return {(group[0].device, group[0].dtype): group for group in _C.group_by_device_dtype(tensors)}
    groups: Groups = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def _check_foreach(foreach: bool | None, device: torch.device) -> None:
    if foreach and not _device_has_foreach_support(device):
        raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")


def _group_backend(backend: str | None, device: torch.device, dtype: torch.dtype, op: str) -> str:
    if dtype not in FUSED_DTYPES:
        return "reference"
    if backend is None and device.type not in ("cpu", "cuda"):
        return "reference"
    return resolve_backend(backend, device, op)


def _group_norm(group: list[torch.Tensor], norm_type: float, backend: str) -> torch.Tensor:
    if backend == "reference":
        norms = reference.tensor_norms(group, norm_type)
        return reference.combine_norms(norms, norm_type, group[0].device)
    if norm_type == float("inf") and any(t.numel() == 0 for t in group):
        empty = next(t for t in group if t.numel() == 0)
        raise RuntimeError(
            "norm_type=inf: the infinity norm of an empty tensor is undefined (the maximum has no identity); "
            f"expected non-empty tensors, got one of shape {tuple(empty.shape)}"
        )
    if backend == "cpp":
        return torch.ops.vgk.multi_tensor_norm(group, norm_type)
    from vgkernels.triton import clip_grad as triton_clip  # registers the Triton ops

    if torch.compiler.is_compiling():
        return torch.ops.vgk.multi_tensor_norm_triton(group, norm_type)
    return triton_clip.norm_launch(group, norm_type)  # eager: the op's dispatch would walk the list in Python


def _group_scale_(group: list[torch.Tensor], scale: torch.Tensor, backend: str) -> None:
    if backend == "reference":
        for g in group:
            g.mul_(scale)
        return
    compiling = torch.compiler.is_compiling()
    if backend == "cpp":
        torch.ops.vgk.multi_tensor_scale_(group, scale)
    elif compiling:
        torch.ops.vgk.multi_tensor_scale_triton_(group, scale)
    else:
        from vgkernels.triton import clip_grad as triton_clip

        # Eager: the launch itself (the op's dispatch walks the list in Python, ~0.3 ms for 1000 gradients)
        triton_clip.scale_launch(group, scale)
    if not compiling:
        # Autograd must see the change, as after torch's foreach mul_; the C++ op's dispatch leaves the
        # version counters alone. One call for the whole group.
        torch.autograd.graph.increment_version(group)


def _total_norm(tensors: list[torch.Tensor], groups: Groups, norm_type: float, error_if_nonfinite: bool,
                foreach: bool | None, backend: str | None, op: str) -> torch.Tensor:
    """Total norm of the non-empty list ``tensors``, already grouped by (device, dtype) in ``groups``."""
    first_device = tensors[0].device
    for device, _ in groups:
        _check_foreach(foreach, device)
    if not norm_type > 0:
        # p <= 0, -inf and NaN are defined on the per-tensor norms, not on groups.
        norms = reference.tensor_norms(tensors, norm_type)
    else:
        norms = [_group_norm(group, norm_type, _group_backend(backend, device, dtype, op))
                 for (device, dtype), group in groups.items()]
    if len(norms) == 1 and norm_type > 0:
        total = norms[0]  # the group norm is the total (p-norm of a single norm is itself)
    else:
        total = reference.combine_norms(norms, norm_type, first_device)
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(reference.nonfinite_message(norm_type, total))
    return total


# ---------------------------------------------------------------------------------------------------
# Public functions


def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Total p-norm of ``tensors`` (any shapes, dtypes and devices) as if concatenated into one vector.

    As ``torch.nn.utils.get_total_norm``: ``norm_type`` is any float or ``inf``; the result is a 0-dim
    tensor on the first tensor's device, of the dtype torch gives (the tensors' dtype, promoted across
    groups), and ``tensor(0.)`` for no tensors. Raises RuntimeError when ``error_if_nonfinite`` and the
    norm is NaN or infinite (the only case that synchronises with the device), and when
    ``foreach=True`` meets a device without foreach support.
    """
    tensors = _tensor_list(tensors, "tensors")
    norm_type = _number(norm_type, "norm_type")
    for i, t in enumerate(tensors):
        if not (t.is_floating_point() or t.is_complex()):
            try:
                torch.linalg.vector_norm(t)  # torch's own error for this dtype, as torch raises it
            except RuntimeError as error:
                raise RuntimeError(f"tensors[{i}]: {error}") from None
    if not tensors:
        return torch.tensor(0.0)
    if not _is_plain(tensors):
        return nn_utils.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
    if transforms_active(*tensors):
        backend = "reference"  # torch's operations carry the tangents the fused kernels would drop
    with torch.no_grad():
        op = "vgkernels.get_total_norm"
        return _total_norm(tensors, _groups(tensors), norm_type, error_if_nonfinite, foreach, backend, op)


def _scale_groups_(groups: Groups, max_norm: float, total_norm: torch.Tensor, foreach: bool | None,
                   backend: str | None, op: str) -> None:
    coef = reference.clip_coefficient(max_norm, total_norm)
    for (device, dtype), group in groups.items():
        _check_foreach(foreach, device)
        group_backend = _group_backend(backend, device, dtype, op)
        _group_scale_(group, coef.to(device), group_backend)


def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    total_norm: torch.Tensor,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
) -> None:
    """Scale the ``.grad`` of every parameter in place by min(max_norm / (total_norm + 1e-6), 1).

    As ``torch.nn.utils.clip_grads_with_norm_``: ``total_norm`` is a tensor (typically from
    :func:`get_total_norm`); parameters without a gradient are skipped; returns None. The coefficient
    stays on the device (no host synchronisation).
    """
    parameters = _tensor_list(parameters, "parameters")
    grads = [g for g in [p.grad for p in parameters] if g is not None]  # one read of each .grad
    max_norm = _number(max_norm, "max_norm")
    if not isinstance(total_norm, torch.Tensor):
        raise TypeError(f"total_norm: expected a tensor, got {type(total_norm).__name__}")
    if total_norm.numel() != 1:
        raise RuntimeError(f"total_norm: expected a one-element tensor, got shape {list(total_norm.shape)}")
    if not grads:
        return
    if not _is_plain(grads) or type(total_norm) not in _PLAIN_TYPES:
        nn_utils.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
        return
    if transforms_active(*grads, total_norm):
        backend = "reference"
    with torch.no_grad():
        op = "vgkernels.clip_grads_with_norm_"
        _scale_groups_(_groups(grads), max_norm, total_norm, foreach, backend, op)


def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Clip the gradients of ``parameters`` in place to a total p-norm of at most ``max_norm``.

    As ``torch.nn.utils.clip_grad_norm_``: the total norm is that of :func:`get_total_norm` over the
    existing ``.grad`` tensors; every gradient is multiplied by min(max_norm / (total + 1e-6), 1); the
    total norm before clipping is returned as a 0-dim tensor. An empty generator warns.
    """
    is_generator = isinstance(parameters, types.GeneratorType)
    parameters = _tensor_list(parameters, "parameters")
    if is_generator and not parameters:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=2)
    grads = [g for g in [p.grad for p in parameters] if g is not None]  # one read of each .grad
    if not _is_plain(grads):
        return nn_utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)
    norm_type = _number(norm_type, "norm_type")
    max_norm = _number(max_norm, "max_norm")
    if not grads:
        return torch.tensor(0.0)
    op = "vgkernels.clip_grad_norm_"
    if transforms_active(*grads):
        backend = "reference"
    with torch.no_grad():
        groups = _groups(grads)  # once for both passes
        total = _total_norm(grads, groups, norm_type, error_if_nonfinite, foreach, backend, op)
        _scale_groups_(groups, max_norm, total, foreach, backend, op)
    return total
