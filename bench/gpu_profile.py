"""Where the time of a GPU call goes: device time against wall time, and the top operators.

    python bench/gpu_profile.py [OUT_FILE]

For the recurrent acceptance case (LSTM, T = 100, B = 64, input = hidden = 512, forward + backward;
float32 under torch's defaults, and bfloat16), tracked and untracked, and tracked in float32 with both
TF32 switches on (where the products around the loop are cuBLAS's, not the Triton GEMM's); the large
LSTM (B = 256, H = 1024, float32 under torch's defaults, tracked), where the step loop measured 2x
cuDNN's time and ran as long without its CUDA graphs: which step kernel takes the time; for
LayerNorm forward + backward at (8192, 4096) in bfloat16; and for clip_grad_norm_ over 1000 gradients;
beside cuDNN and torch: the
median wall time of 10 calls each run alone, and one call under torch.profiler (CPU and CUDA time per
operator). A diagnostic for bench/gpu_check.sh, not a benchmark: the interleaved comparisons are
bench_recurrent_gpu.py's, bench_layer_norm.py's and bench_clip_grad.py's. Needs a CUDA device;
``VGK_PROFILE_SMOKE=1`` runs it on the CPU at tiny sizes, only to check that the file works.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

import vgkernels as vgk
from vgkernels.benchmark import interleaved

SMOKE = os.environ.get("VGK_PROFILE_SMOKE") == "1"
DEVICE = "cpu" if SMOKE else "cuda"
T, B, H = (3, 2, 8) if SMOKE else (100, 64, 512)
LARGE_B, LARGE_H = (4, 16) if SMOKE else (256, 1024)
ROWS, COLS = (4, 16) if SMOKE else (8192, 4096)


def _profile(name: str, fn: Callable[[], None], out) -> None:
    alone = interleaved(name, {"alone": fn}, baseline="alone", rounds=10, warmup=3, device=DEVICE)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events)
    print(f"## {name}: wall {alone.median('alone') * 1e3:.3f} ms alone (median of 10); device time "
          f"{device_us / 1e3:.3f} ms in one profiled call", file=out, flush=True)
    print(events.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50), file=out)
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50), file=out,
          flush=True)


def _recurrent(dtype: torch.dtype, module: torch.nn.Module, batch: int = B) -> Callable[[], None]:
    x = torch.randn(T, batch, module.input_size, device=DEVICE, dtype=dtype, requires_grad=True)
    g = torch.randn(T, batch, module.hidden_size, device=DEVICE, dtype=dtype)

    def run() -> None:
        out, _ = module(x)
        out.backward(g)
    return run


def _layer_norm(norm: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
    x = torch.randn(ROWS, COLS, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(ROWS, COLS, device=DEVICE, dtype=torch.bfloat16)

    def run() -> None:
        norm(x).backward(g)
    return run


def main(out=sys.stdout) -> int:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_profile.py needs a CUDA device (VGK_PROFILE_SMOKE=1 checks the file on the CPU)",
              file=sys.stderr)
        return 2
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False  # torch's defaults
    factory = {"device": DEVICE}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        for name, module in (("vgkernels tracked", vgk.nn.LSTM(H, H, track=True, dtype=dtype, **factory)),
                             ("vgkernels untracked", vgk.nn.LSTM(H, H, dtype=dtype, **factory)),
                             ("torch.nn", torch.nn.LSTM(H, H, dtype=dtype, **factory))):
            _profile(f"LSTM T={T} B={B} H={H} {dtype} fwd+bwd, {name}", _recurrent(dtype, module), out)
    # The same float32 layer with torch's matmul switch on TF32 too: the products around the loop by
    # cuBLAS instead of the package's Triton GEMM (the only difference from torch's defaults).
    torch.backends.cuda.matmul.allow_tf32 = True
    module = vgk.nn.LSTM(H, H, track=True, **factory)
    _profile(f"LSTM T={T} B={B} H={H} {torch.float32} fwd+bwd, both TF32 switches on, vgkernels tracked",
             _recurrent(torch.float32, module), out)
    torch.backends.cuda.matmul.allow_tf32 = False
    for name, module in (("vgkernels tracked", vgk.nn.LSTM(LARGE_H, LARGE_H, track=True, **factory)),
                         ("torch.nn", torch.nn.LSTM(LARGE_H, LARGE_H, **factory))):
        _profile(f"LSTM T={T} B={LARGE_B} H={LARGE_H} {torch.float32} fwd+bwd, {name}",
                 _recurrent(torch.float32, module, LARGE_B), out)
    for name, norm in (("vgkernels", vgk.nn.LayerNorm(COLS, dtype=torch.bfloat16, **factory)),
                       ("torch", torch.nn.LayerNorm(COLS, dtype=torch.bfloat16, **factory))):
        _profile(f"LayerNorm ({ROWS}, {COLS}) bf16 fwd+bwd, {name}", _layer_norm(norm), out)
    params = []
    for shape in [(H // 2, H // 2), (H // 2,)] * 500:
        params.append(torch.nn.Parameter(torch.empty(shape, **factory)))
        params[-1].grad = torch.randn(shape, **factory)
    for name, clip in (("vgkernels", lambda: vgk.clip_grad_norm_(params, 1.0)),
                       ("torch foreach", lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True))):
        side = H // 2
        _profile(f"clip_grad_norm_ 1000 gradients ({side}, {side}) and ({side},) fp32, {name}", clip, out)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            sys.exit(main(f))
    sys.exit(main())
