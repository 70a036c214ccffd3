"""CPU benchmarks of the recurrent core against torch.nn (oneDNN) and the eager tracked cell loop.

Targets, fp32, 2 threads, T=100, B=32, input = hidden = 256, forward+backward, in a plain process, at
each instruction-set level (the CPU's own and AVX2: ``python bench/run_isa_levels.py
bench/bench_recurrent.py``): LSTM <= 1.0x torch.nn.LSTM, GRU <= 0.75x torch.nn.GRU, tracking <= 5%
over no tracking, tracked LSTM >= 2.5x faster than the LSTMCell loop with retain_grad, and no more
bytes saved for backward than torch.nn.LSTM. The results file names the level
(recurrent_cpu-2threads-<level>.json), and its machine record the CPU model and the caps in force.
"""

import pytest
import torch
from harness import fma_peak_gflops, interleaved, saved_bytes

from vgkernels.benchmark import lstm_cell_loop_candidate, recurrent_candidates
from vgkernels.cpu import cpu_info

T, B, SIZE = 100, 32, 256
ROUNDS = 25
# GEMM work of one LSTM layer's forward+backward: x W_ih^T and h W_hh^T forward; dX, dh, dW_ih and
# dW_hh backward; each 2 * T * B * 4H * (I or H) flops.
LSTM_GEMM_FLOP = 24 * T * B * SIZE * (SIZE + SIZE)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_forward_backward_vs_torch(cell, benchmark, compare_record):
    candidates = recurrent_candidates(cell, T, B, SIZE, backend="cpp")
    if cell == "lstm":
        candidates["LSTMCell loop + retain_grad"] = lstm_cell_loop_candidate(T, B, SIZE)
    comparison = compare_record(
        interleaved(f"{cell} fwd+bwd T={T} B={B} I=H={SIZE} fp32", candidates,
                    baseline=f"torch.nn.{cell.upper()}", rounds=ROUNDS)
    )
    comparison.extra["tracked / untracked"] = round(
        comparison.median("vgkernels tracked") / comparison.median("vgkernels"), 4)
    if cell == "lstm":
        loop = comparison.median("LSTMCell loop + retain_grad")
        tracked = comparison.median("vgkernels tracked")
        comparison.extra["cell loop / tracked"] = round(loop / tracked, 4)
        comparison.extra["target cell loop / tracked"] = ">= 2.5"
        comparison.extra["target vgkernels / torch.nn.LSTM"] = "<= 1.0"
        comparison.extra["GEMM GFLOP"] = round(LSTM_GEMM_FLOP / 1e9, 3)
        untracked = comparison.median("vgkernels")
        comparison.extra["vgkernels GFLOP/s"] = round(LSTM_GEMM_FLOP / untracked / 1e9, 1)
        comparison.extra["vgkernels tracked GFLOP/s"] = round(LSTM_GEMM_FLOP / tracked / 1e9, 1)
        # The ceiling of every ratio for any implementation: its GEMMs alone, at the CPU's FMA peak
        # for the instruction set in use.
        peak = fma_peak_gflops()
        if peak is not None:
            floor_s = LSTM_GEMM_FLOP / (peak * 1e9)
            comparison.extra["fp32 FMA peak GFLOP/s"] = peak
            comparison.extra["GEMMs at FMA peak ms"] = round(floor_s * 1e3, 2)
            comparison.extra["cell loop / GEMMs at FMA peak"] = round(loop / floor_s, 4)
    else:
        comparison.extra["target vgkernels / torch.nn.GRU"] = "<= 0.75"
    comparison.extra["target tracked / untracked"] = "<= 1.05"
    # The GEMM paths the kernels chose for these shapes (vgkernels.cpu.cpu_info), with their timings.
    comparison.extra["gemm choices"] = [
        f"{c['kind']} rows={c['rows']} n={c['n']} k={c['k']}: {c['path']} "
        f"(brgemm {c['brgemm_us']:.0f} us, library {c['library_us']:.0f} us)"
        for c in cpu_info().get("gemm_choices", [])]
    benchmark.extra_info.update(comparison.summary())
    benchmark.pedantic(candidates["vgkernels"], rounds=5, iterations=1)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_saved_bytes_vs_torch(cell, compare_record):
    import vgkernels as vgk

    ours = {"lstm": vgk.nn.LSTM, "gru": vgk.nn.GRU}[cell](SIZE, SIZE, backend="cpp")
    theirs = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](SIZE, SIZE)
    x = torch.randn(T, B, SIZE, requires_grad=True)
    counts = {}
    for name, model in (("vgkernels", ours), (f"torch.nn.{cell.upper()}", theirs)):
        counts[name] = saved_bytes(lambda m=model: m(x)[0].sum(), exclude=[x, *model.parameters()])
    ratio = counts["vgkernels"] / counts[f"torch.nn.{cell.upper()}"]
    compare_record({
        "case": f"{cell} bytes saved for backward, T={T} B={B} I=H={SIZE} fp32",
        **{f"{name} MB": round(v / 2**20, 3) for name, v in counts.items()},
        "vgkernels / torch.nn": round(ratio, 4),
    })
