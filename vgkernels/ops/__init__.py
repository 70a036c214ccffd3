"""Functional ops. Each family checks its arguments, picks a backend and registers autograd."""

from vgkernels.ops.cell import CellTrace, cell
from vgkernels.ops.clip_grad import clip_grad_norm_, clip_grads_with_norm_, get_total_norm
from vgkernels.ops.layer_norm import layer_norm
from vgkernels.ops.recurrent import recurrent

__all__ = [
    "CellTrace",
    "cell",
    "clip_grad_norm_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "layer_norm",
    "recurrent",
]
