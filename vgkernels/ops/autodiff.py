"""Higher-order and forward-mode autodiff for ops whose fast kernels only know the first-order backward.

The fused kernels compute a forward and one backward. Everything beyond that goes through the eager
reference implementation of the same op (:mod:`vgkernels.reference`), which autograd differentiates to
any order:

- **create_graph** (double backward, Hessian-vector products, gradient penalties). A backward runs with
  grad mode on exactly when the caller asked for ``create_graph=True``. An op's registered backward then
  calls :func:`differentiable_vjp` with the reference forward and the saved inputs instead of the
  backward kernel, and returns gradients that are themselves differentiable. Without create_graph the
  backward kernel runs as before.
- **Forward mode and torch.func** (``torch.autograd.forward_ad``, ``torch.func.jvp``, ``jacfwd``,
  ``jacrev``, ``grad``, ``vmap``, ``hessian``). An op's Python entry point asks
  :func:`transforms_active` before it dispatches, and runs the reference implementation when a tangent
  or a functorch transform would meet the kernel, which has no rule for either.

An op with a clipped backward (``grad_clip``) refuses create_graph: see
:mod:`vgkernels.reference.backward_clip` for why, and for what forward mode gives there.

How an op uses it (a fused cell op does the same)::

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*tensor_inputs)           # everything the reference forward needs
                                                        # (a large input: see mark_recomputable)

    def backward(ctx, *grads):
        if torch.is_grad_enabled():                      # create_graph=True
            return differentiable_vjp(reference_forward, ctx.saved_tensors, grads)[0] + (None,) * n_flags
        ...                                              # the fast backward kernel

    def public_op(*tensors, backend=None):
        if transforms_active(*tensors):
            backend = "reference"
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as forward_ad

Tensors = Sequence[torch.Tensor | None]


def transforms_active(*tensors: torch.Tensor | None) -> bool:
    """True when a torch.func transform is active, or one of ``tensors`` carries a forward-mode tangent.

    Cheap on the plain path (two flag reads). Dynamo traces the functorch check, so torch.compile around
    a torch.func transform runs the reference too. Tangents are not looked for while torch.compile
    traces: a compiled function called on dual tensors raises in torch (no jvp for the compiled graph).
    """
    if torch._C._are_functorch_transforms_active():
        return True
    if torch.compiler.is_compiling() or forward_ad._current_level < 0:  # outside a dual_level: no tangent
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


_RECIPE = "_vgk_recompute"


def mark_recomputable(t: torch.Tensor, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor | None
                      ) -> torch.Tensor:
    """Record that ``t == fn(*inputs)``, so that an op saving ``t`` only for a create_graph backward can
    save ``inputs`` instead (see :func:`recompute_recipe`). Worth it when ``t`` is large and nothing else
    keeps it, while autograd keeps ``inputs`` anyway. ``fn`` must be eager and differentiable. Returns
    ``t``. Nothing is recorded while torch.compile traces (its partitioner drops unused saved tensors).
    """
    if not torch.compiler.is_compiling():
        setattr(t, _RECIPE, (fn, inputs))
    return t


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def recompute_recipe(t: torch.Tensor) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor | None, ...]]:
    """``(fn, inputs)`` with ``fn(*inputs) == t``: the recipe :func:`mark_recomputable` recorded, else
    ``(identity, (t,))``. Save ``inputs`` with ``ctx.save_for_backward`` and call ``fn`` on the saved
    tensors in the create_graph backward, under grad mode, to get ``t`` back attached to the graph."""
    return getattr(t, _RECIPE, None) or (_identity, (t,))


def _local_leaf(t: torch.Tensor | None, create_graph: bool) -> torch.Tensor | None:
    """A tensor to differentiate the recomputation with respect to.

    With create_graph, a tensor that requires grad stays attached to the caller's graph (through an
    alias, so that two arguments that are one tensor still get separate gradients); every other
    floating-point tensor becomes a fresh leaf.
    """
    if t is None or not t.is_floating_point():
        return t
    if create_graph and t.requires_grad:
        return t.view_as(t)
    return t.detach().requires_grad_()


def differentiable_vjp(
    forward: Callable[..., tuple[Tensors, Sequence[torch.Tensor]]],
    inputs: Tensors,
    grad_outputs: Tensors,
) -> tuple[tuple[torch.Tensor | None, ...], tuple[torch.Tensor | None, ...]]:
    """The vector-Jacobian product of ``forward`` at ``inputs``, recomputed with autograd.

    Args:
        forward: ``forward(*inputs) -> (outputs, watched)``: the op's differentiable (reference)
            implementation. ``outputs`` pair up with ``grad_outputs`` (None entries are skipped);
            ``watched`` are intermediate tensors whose gradients the caller also wants (e.g. the
            per-step states of a traced recurrent layer), or an empty sequence.
        inputs: the op's tensor arguments as saved in the forward (None for absent optional ones;
            integer tensors such as lengths are passed through untouched).
        grad_outputs: the incoming gradients, None for outputs that received none.
    Returns:
        ``(grads, watched_grads)``: one gradient per input (None for None, integer and unused inputs)
        and one per watched tensor (None when unused), in order. When grad mode is on (the backward
        runs under create_graph) the gradients are differentiable functions of the inputs and
        ``grad_outputs``, so autograd can take further derivatives; otherwise they are detached.
    """
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = [_local_leaf(t, create_graph) for t in inputs]
        outputs, watched = forward(*leaves)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True)
                 if o is not None and g is not None and o.requires_grad]
        slots = [i for i, t in enumerate(leaves) if t is not None and t.is_floating_point()]
        wanted = [leaves[i] for i in slots] + list(watched)
        if pairs and wanted:
            found = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                        create_graph=create_graph, allow_unused=True)
        else:
            found = (None,) * len(wanted)
    grads: list[torch.Tensor | None] = [None] * len(leaves)
    for i, g in zip(slots, found[: len(slots)], strict=True):
        grads[i] = g
    return tuple(grads), tuple(found[len(slots):])
