"""Where the time of a GPU call goes: device time against wall time, and the top operators.

    python bench/gpu_profile.py [OUT_FILE]

For the recurrent acceptance case (LSTM, T = 100, B = 64, input = hidden = 512, forward + backward;
float32 under torch's defaults, and bfloat16), tracked and untracked, and for LayerNorm forward +
backward at (8192, 4096) in bfloat16, beside cuDNN and torch: the median wall time of 10 calls each
run alone, and one call under torch.profiler (CPU and CUDA time per operator). A diagnostic for
bench/gpu_check.sh, not a benchmark: the interleaved comparisons are bench_recurrent_gpu.py's and
bench_layer_norm.py's. Needs a CUDA device.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

import vgkernels as vgk


def _median_ms(fn: Callable[[], None], calls: int = 10) -> float:
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _profile(name: str, fn: Callable[[], None], out) -> None:
    for _ in range(3):
        fn()
    wall = _median_ms(fn)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events)
    print(f"## {name}: wall {wall:.3f} ms alone (median of 10); device time {device_us / 1e3:.3f} ms in one "
          "profiled call", file=out, flush=True)
    print(events.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50), file=out)
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50), file=out,
          flush=True)


def _recurrent(dtype: torch.dtype, module: torch.nn.Module):
    x = torch.randn(100, 64, 512, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(100, 64, 512, device="cuda", dtype=dtype)

    def run() -> None:
        out, _ = module(x)
        out.backward(g)
    return run


def _layer_norm(norm: Callable[[torch.Tensor], torch.Tensor]):
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)

    def run() -> None:
        norm(x).backward(g)
    return run


def main(out=sys.stdout) -> int:
    if not torch.cuda.is_available():
        print("gpu_profile.py needs a CUDA device", file=sys.stderr)
        return 2
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False  # torch's defaults
    factory = {"device": "cuda"}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        for name, module in (("vgkernels tracked", vgk.nn.LSTM(512, 512, track=True, dtype=dtype, **factory)),
                             ("vgkernels untracked", vgk.nn.LSTM(512, 512, dtype=dtype, **factory)),
                             ("cuDNN", torch.nn.LSTM(512, 512, dtype=dtype, **factory))):
            _profile(f"LSTM T=100 B=64 H=512 {dtype} fwd+bwd, {name}", _recurrent(dtype, module), out)
    for name, norm in (("vgkernels", vgk.nn.LayerNorm(4096, dtype=torch.bfloat16, **factory)),
                       ("torch", torch.nn.LayerNorm(4096, dtype=torch.bfloat16, **factory))):
        _profile(f"LayerNorm (8192, 4096) bf16 fwd+bwd, {name}", _layer_norm(norm), out)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            sys.exit(main(f))
    sys.exit(main())
