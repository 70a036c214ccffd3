"""GradientMonitor's fused record against the per-parameter torch loop people use today.

The baseline computes the same results the usual way (Lightning's ``grad_norm``, TensorBoard's
per-tensor histograms): per parameter, ``torch.linalg.vector_norm(g).item()`` and ``torch.histc`` of
``log10|g|`` with zero, underflow and overflow counts, each read back to the host. The candidate is
one ``GradientMonitor.record()``: one fused pass per device, one host copy. Both see the same
gradients; times include all host work, synchronised after each call.

Cases: a model-like mix of large and small gradients (CPU: about 4.2M elements in 62 tensors) and many
small gradients (400 tensors of 1000 elements), where per-tensor overhead dominates. GPU cases (marked
``gpu``) use larger models.
"""

import pytest
import torch
from harness import interleaved

from vgkernels.diagnostics import GradientMonitor
from vgkernels.reference.grad_stats import DEFAULT_BINS

ROUNDS = 15
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Params(torch.nn.Module):
    """A parameter per shape, each with a random gradient spread over several decades."""

    def __init__(self, shapes, device="cpu", dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.params = torch.nn.ParameterList()
        for shape in shapes:
            p = torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
            p.grad = torch.randn(shape, device=device, dtype=dtype) * 10 ** torch.empty(
                shape, device=device).uniform_(-8, 1).to(dtype)
            self.params.append(p)


def model_like(layers, width):
    """``layers`` blocks of a width x width weight, a 4*width x width weight, and three small vectors."""
    shapes = []
    for _ in range(layers):
        shapes += [(width, width), (width,), (4 * width, width), (4 * width,), (width,)]
    return shapes + [(1000, width), (1000,)]


def torch_loop(model):
    """The per-parameter loop: one host read per norm and per histogram."""
    spec = DEFAULT_BINS

    def run():
        norms, total = [], None
        for p in model.parameters():
            g = p.grad
            norms.append(torch.linalg.vector_norm(g).item())
            logs = torch.log10(g.abs())
            hist = torch.histc(logs, bins=spec.bins, min=spec.log10_min, max=spec.log10_max)
            counts = torch.stack([(g == 0).sum(), ((logs < spec.log10_min) & (g != 0)).sum(),
                                  (logs > spec.log10_max).sum()]).tolist()
            hist = hist.tolist() + counts
            total = hist if total is None else [a + b for a, b in zip(total, hist, strict=True)]
        return norms, total

    return run


def run_case(case, shapes, benchmark, compare_record, device="cpu"):
    model = Params(shapes, device=device)
    monitor = GradientMonitor(model, hook=False)
    candidates = {
        "vgkernels GradientMonitor": lambda: monitor.record(force=True),
        "torch per-parameter loop": torch_loop(model),
    }
    comparison = interleaved(case, candidates, baseline="torch per-parameter loop", rounds=ROUNDS,
                             device=device)
    comparison.extra["speedup over the loop"] = round(1 / comparison.ratio("vgkernels GradientMonitor"), 3)
    comparison.extra["tensors"] = len(shapes)
    comparison.extra["elements"] = sum(p.numel() for p in model.parameters())
    compare_record(comparison)
    benchmark.extra_info.update(comparison.summary())
    benchmark.pedantic(candidates["vgkernels GradientMonitor"], rounds=5, iterations=1)
    monitor.history.clear()


def test_model_like_cpu(benchmark, compare_record):
    run_case("record, 12 blocks of width 256 + head, fp32, CPU", model_like(12, 256), benchmark,
             compare_record)


def test_many_small_cpu(benchmark, compare_record):
    run_case("record, 400 gradients of 1000, fp32, CPU", [(1000,)] * 400, benchmark, compare_record)


@pytest.mark.gpu
@NEEDS_CUDA
def test_model_like_gpu(benchmark, compare_record):
    run_case("record, 24 blocks of width 1024 + head, fp32, CUDA", model_like(24, 1024), benchmark,
             compare_record, device="cuda")


@pytest.mark.gpu
@NEEDS_CUDA
def test_many_small_gpu(benchmark, compare_record):
    run_case("record, 1000 gradients of 4096, fp32, CUDA", [(4096,)] * 1000, benchmark, compare_record,
             device="cuda")
