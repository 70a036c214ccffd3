"""Memory of a training loop with changing shapes: vgkernels' LSTM against torch.nn.LSTM.

1000 forward+backward steps of a one-layer LSTM (input = hidden = SIZE), float32, 2 threads, T drawn
uniformly from 1..200 and B from 1..64 (the same draws for both), each implementation in a fresh
process of its own. Recorded: the peak RSS (getrusage) and the RSS at the end of the loop, both in MiB,
and what vgkernels.empty_cache() then gives back. Target: vgkernels' peak and final RSS at most
torch.nn's plus 64 MiB. A plain process: no allocator tuning.

    python -m pytest -c bench/pytest.ini bench/bench_memory.py      (or bench/run_isa_levels.py)
"""

import os

import pytest

from vgkernels.benchmark import recurrent_rss_in_subprocess

ITERATIONS = int(os.environ.get("VGK_BENCH_MEMORY_ITERATIONS", "1000"))
MAX_T, MAX_B = 200, 64
TARGET_MIB = 64


@pytest.mark.parametrize("size", [64, 256])
def test_rss_under_changing_shapes_vs_torch(size, compare_record):
    # The subprocesses inherit this one's instruction-set caps (bench/run_isa_levels.py sets them).
    results = {impl: recurrent_rss_in_subprocess(impl, ITERATIONS, size, max_t=MAX_T, max_b=MAX_B)
               for impl in ("vgkernels", "torch.nn")}
    ours, theirs = results["vgkernels"], results["torch.nn"]
    compare_record({
        "case": f"LSTM I=H={size}, {ITERATIONS} fwd+bwd steps, T in 1..{MAX_T}, B in 1..{MAX_B}, fp32",
        "vgkernels peak MiB": ours["peak_mib"],
        "torch.nn peak MiB": theirs["peak_mib"],
        "vgkernels final MiB": ours["final_mib"],
        "torch.nn final MiB": theirs["final_mib"],
        "peak difference MiB": round(ours["peak_mib"] - theirs["peak_mib"], 1),
        "final difference MiB": round(ours["final_mib"] - theirs["final_mib"], 1),
        f"target: differences <= {TARGET_MIB} MiB": ours["peak_mib"] - theirs["peak_mib"] <= TARGET_MIB
        and ours["final_mib"] - theirs["final_mib"] <= TARGET_MIB,
        "vgkernels after empty_cache MiB": ours["after_empty_cache_mib"],
        "vgkernels RSS every tenth MiB": ours["marks_mib"],
        "torch.nn RSS every tenth MiB": theirs["marks_mib"],
        "each in its own process, isa": ours["machine"]["isa"],
    })
