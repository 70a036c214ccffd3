"""Identity in the forward, a clip of the gradient in the backward: the eager form of the kernels'
``grad_clip`` (recurrent gate pre-activations, LayerNorm input rows).

A clip of the backward is not the derivative of any forward function, so its higher derivatives need
care. The derivative of the clipped backward (what a double backward must compute) clips the
first-order gradient only; a gradient that reaches the same tensor in a later backward, through the
values saved by the first (a second-order flow), must pass unclipped. Two forms give that:

- :func:`first_order_clip` blocks: the clip is a tensor hook that lives only until the block ends. The
  fused ops' create_graph backward recomputes through the reference and takes the first-order gradient
  inside such a block, so the clip is recorded in that gradient's graph and nowhere else: exact to any
  order (see :mod:`vgkernels.ops.autodiff`).
- Elsewhere (the reference backend, forward-mode AD, torch.func): an autograd Function. Its tangent is
  the identity's (the clip changes the reverse pass only), so forward-mode AD and forward-over-reverse
  (``torch.func.hessian``) are exact. A second reverse pass would go through the same node and be
  clipped again, so ``create_graph=True`` and nested reverse transforms (``grad`` of ``grad``,
  ``jacrev`` of ``jacrev``) raise instead of returning a wrong second derivative.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch

ClipFn = Callable[[torch.Tensor], torch.Tensor]

_scope = threading.local()  # the backward that recomputes runs on one thread


@contextlib.contextmanager
def first_order_clip() -> Iterator[None]:
    """Within the block, :func:`clipped` clips through tensor hooks that are removed when it ends."""
    outer = getattr(_scope, "hooks", None)
    _scope.hooks = []
    try:
        yield
    finally:
        for handle in _scope.hooks:
            handle.remove()
        _scope.hooks = outer


def _nested_reverse_transforms() -> int:
    stack = torch._C._functorch.get_interpreter_stack() or []
    return sum(1 for interpreter in stack if interpreter.key() == torch._C._functorch.TransformType.Grad)


class _ClipBackward(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, clip_fn: ClipFn, name: str) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, ctx.clip_fn, ctx.name = inputs

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active():
            raise RuntimeError(
                f"{ctx.name}: create_graph=True through the eager reference's gradient clip is not "
                "supported (a second backward would clip the second-order gradient as well). The 'cpp' "
                "and 'triton' backends differentiate the clipped backward exactly."
            )
        return ctx.clip_fn(grad), None, None

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor, *_):
        return tangent


def clipped(x: torch.Tensor, clip_fn: ClipFn, name: str) -> torch.Tensor:
    """``x`` in the forward; in the backward the gradient reaching it is replaced by ``clip_fn(grad)``.

    ``clip_fn`` must be made of differentiable torch ops; ``name`` (e.g. "grad_clip") goes into the
    errors raised for the unsupported higher-order cases (see the module docstring).
    """
    hooks = getattr(_scope, "hooks", None)
    if hooks is not None and x.requires_grad:
        hooks.append(x.register_hook(clip_fn))
        return x
    if _nested_reverse_transforms() > 1:
        raise RuntimeError(
            f"{name}: a reverse-mode derivative of a reverse-mode derivative (torch.func.grad of grad, "
            "jacrev of jacrev) through the clipped backward is not supported; use forward over reverse "
            "(torch.func.hessian, jacfwd of jacrev) or create_graph=True on the 'cpp' or 'triton' backend"
        )
    return _ClipBackward.apply(x, clip_fn, name)
