"""vgkernels: fused recurrent, LayerNorm and gradient-clipping kernels for PyTorch that make vanishing
and exploding gradients visible inside backpropagation."""

__version__ = "0.1.0"

from vgkernels import _library  # noqa: F401, I001  (registers torch.ops.vgk first)
from vgkernels import diagnostics, init, nn, ops, tasks
from vgkernels.cpu import empty_cache
from vgkernels.nn.tracking import track
from vgkernels.ops.cell import CellTrace
from vgkernels.ops.clip_grad import clip_grad_norm_, clip_grads_with_norm_, get_total_norm
from vgkernels.trace import BPTTTrace

__all__ = [
    "BPTTTrace",
    "CellTrace",
    "clip_grad_norm_",
    "clip_grads_with_norm_",
    "diagnostics",
    "empty_cache",
    "get_total_norm",
    "init",
    "nn",
    "ops",
    "tasks",
    "track",
]
