"""Identity in the forward, a clip of the gradient in the backward: the eager form of the kernels'
``grad_clip`` (recurrent gate pre-activations, LayerNorm input rows).

A clip of the backward is not the derivative of any forward function, and a reverse pass cannot tell
the training gradient from a second-order flow: both reach the layer's node and both would be clipped,
so a reverse-over-reverse derivative through a clipped layer would be wrong. It is refused instead
(:func:`refuse_create_graph`): ``create_graph=True`` through a clipped layer (every backend) and nested
reverse transforms (``torch.func.grad`` of ``grad``, ``jacrev`` of ``jacrev``) raise.

Forward mode is exact: the tangent of the clip is the identity's (the clip changes the reverse pass
only), so ``jvp``/``jacfwd`` give the derivative of the forward function, and forward over reverse
(``torch.func.hessian``, ``jacfwd`` of ``jacrev``) gives the exact derivative of the clipped backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ClipFn = Callable[[torch.Tensor], torch.Tensor]


def refuse_create_graph(name: str) -> None:
    """Raise the error for a reverse-over-reverse derivative through a clipped backward."""
    raise RuntimeError(
        f"{name}: create_graph=True (a second reverse-mode derivative) through a layer with a gradient "
        "clip is not supported: the clip replaces the layer's backward, and a second backward through "
        "the layer would clip the second-order gradient as well. Use grad_clip=None for higher-order "
        "gradients, or forward over reverse (torch.func.hessian, jacfwd of jacrev), which is exact."
    )


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
        # Outside torch.func, a backward with grad mode on is a create_graph backward.
        if torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active():
            refuse_create_graph(ctx.name)
        return ctx.clip_fn(grad), None, None

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor, *_):
        return tangent


def clipped(x: torch.Tensor, clip_fn: ClipFn, name: str) -> torch.Tensor:
    """``x`` in the forward; in the backward the gradient reaching it is replaced by ``clip_fn(grad)``.

    ``clip_fn`` must be made of differentiable torch ops (forward over reverse differentiates it);
    ``name`` (e.g. "grad_clip") goes into the errors of the refused cases (see the module docstring).
    """
    if _nested_reverse_transforms() > 1:
        raise RuntimeError(
            f"{name}: a reverse-mode derivative of a reverse-mode derivative (torch.func.grad of grad, "
            "jacrev of jacrev) through a gradient clip is not supported: the outer pass would be clipped "
            "as well. Use forward over reverse (torch.func.hessian, jacfwd of jacrev), which is exact."
        )
    return _ClipBackward.apply(x, clip_fn, name)
