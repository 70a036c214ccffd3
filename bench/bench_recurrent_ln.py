"""CPU benchmarks of the layer-normalized LSTM/GRU (layer_norm=True), fp32, 2 threads, forward+backward.

There is no speed target for these cells. Baseline: the eager layer-normalized cell loop (the reference
backend, what a user would write without the fused kernels). Also measured: the cost of track=True,
whose exact Jacobian norms add two GEMMs per step of K*B rows (K = 3 LSTM, 1 GRU) in float64, and the
plain torch.nn cell without LN, for scale.
"""

import pytest
import torch
from harness import interleaved

import vgkernels as vgk
from vgkernels.benchmark import training_step

T, B, SIZE = 50, 32, 128
ROUNDS = 10


def _candidates(cell: str) -> dict:
    ours_cls, theirs_cls = {"lstm": (vgk.nn.LSTM, torch.nn.LSTM), "gru": (vgk.nn.GRU, torch.nn.GRU)}[cell]
    models = {
        "vgkernels": ours_cls(SIZE, SIZE, layer_norm=True, backend="cpp"),
        "vgkernels tracked": ours_cls(SIZE, SIZE, layer_norm=True, backend="cpp", track=True),
        "eager LN loop": ours_cls(SIZE, SIZE, layer_norm=True, backend="reference"),
        f"torch.nn.{cell.upper()} (no LN)": theirs_cls(SIZE, SIZE),
    }
    state = models["vgkernels"].state_dict()
    for name in ("vgkernels tracked", "eager LN loop"):
        models[name].load_state_dict(state)
    x = torch.randn(T, B, SIZE, requires_grad=True)

    return {name: training_step(m, x, read_trace=name == "vgkernels tracked") for name, m in models.items()}


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_layer_norm_cells_forward_backward(cell, benchmark, compare_record):
    candidates = _candidates(cell)
    comparison = compare_record(
        interleaved(f"LN-{cell} fwd+bwd T={T} B={B} I=H={SIZE} fp32", candidates, baseline="eager LN loop",
                    rounds=ROUNDS)
    )
    comparison.extra["tracked / untracked"] = round(
        comparison.median("vgkernels tracked") / comparison.median("vgkernels"), 4)
    benchmark.extra_info.update(comparison.summary())
    benchmark.pedantic(candidates["vgkernels"], rounds=3, iterations=1)
