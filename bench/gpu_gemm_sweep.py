"""GPU: the float32 products around an LSTM layer's time loop under torch's defaults (cuDNN's switch
TF32, torch's matmul switch IEEE), where the package's Triton GEMM makes them.

    python bench/gpu_gemm_sweep.py OUT_DIR

Part 1, each product of an LSTM layer at T = 100, B = 64, I = H = 512 (the input projection, the
input's gradient and the two weight gradients, in the layouts the layer hands over), timed 10 calls at a
time, the candidates interleaved, median of 15 rounds: the Triton GEMM with its operands read in place
or staged K-major (``gemm.STAGE_K_MAJOR``), 32 or 64 rows of K per step (``gemm.BLOCK_K``), against
cuBLAS in TF32 and in IEEE float32. Each result's largest error is given relative to the float64
product's largest magnitude.

Part 2, the whole layer (tracked, forward + backward, the default CUDA-graph step loop) with each GEMM
variant, interleaved with cuDNN's nn.LSTM on the same weights and data (bench_recurrent_gpu.candidates).

Writes OUT_DIR/gemm_sweep.md and .json; prints the tables as it goes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_recurrent_gpu import candidates  # noqa: E402
from harness import interleaved, machine  # noqa: E402

from vgkernels.triton import gemm  # noqa: E402

T, B, H = 100, 64, 512
VARIANTS = {  # name -> (STAGE_K_MAJOR, BLOCK_K)
    "triton_in_place_k32": (False, 32),
    "triton_staged_k32": (True, 32),
    "triton_in_place_k64": (False, 64),
    "triton_staged_k64": (True, 64),
}


class _Knobs:
    """Runs a callable with the GEMM's knobs set (and the old ones back after)."""

    def __init__(self, fn, stage: bool, block_k: int):
        self.fn, self.stage, self.block_k = fn, stage, block_k

    def __call__(self):
        old = gemm.STAGE_K_MAJOR, gemm.BLOCK_K
        gemm.STAGE_K_MAJOR, gemm.BLOCK_K = self.stage, self.block_k
        try:
            return self.fn()
        finally:
            gemm.STAGE_K_MAJOR, gemm.BLOCK_K = old


def _cublas(a, b, tf32: bool):
    def run():
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            return torch.mm(a, b)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    return run


def _products(device) -> dict:
    """The layer's four large products as the layer makes them: (a, b) of a @ b."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T * B, H, device=device, generator=g)
    w_ih = torch.randn(4 * H, H, device=device, generator=g) / H ** 0.5
    d_gates = torch.randn(T * B, 4 * H, device=device, generator=g)
    h_prev = torch.randn(T * B, H, device=device, generator=g)
    return {"input projection x W_ih^T": (x, w_ih.t()), "input gradient dG W_ih": (d_gates, w_ih),
            "W_ih gradient x^T dG": (x.t(), d_gates), "W_hh gradient dG^T h": (d_gates.t(), h_prev)}


def _times_ten(fn):
    def run():
        for _ in range(10):
            out = fn()
        return out
    return run


def products_table(device) -> list[dict]:
    rows = []
    for name, (a, b) in _products(device).items():
        M, K = a.shape
        flops = 2 * M * K * b.shape[1]
        exact = (a.double() @ b.double())
        scale = exact.abs().max().item()
        timed = {"cublas_tf32": _cublas(a, b, True), "cublas_ieee": _cublas(a, b, False)}
        for variant, (stage, block_k) in VARIANTS.items():
            timed[variant] = _Knobs(lambda a=a, b=b: gemm.mm(a, b), stage, block_k)
        errors = {k: ((fn().double() - exact).abs().max().item() / scale) for k, fn in timed.items()}
        comparison = interleaved(name, {k: _times_ten(fn) for k, fn in timed.items()}, baseline="cublas_tf32",
                                 rounds=15, warmup=2, device=device)
        row = {"product": name, "M": M, "K": K, "N": b.shape[1]}
        for k in timed:
            us = comparison.median(k) / 10 * 1e6
            row[k] = {"us": round(us, 1), "tflops": round(flops / us / 1e6, 1),
                      "vs_cublas_tf32": round(comparison.median(k) / comparison.median("cublas_tf32"), 3),
                      "max_error": float(f"{errors[k]:.2e}")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def layer_table(device) -> dict:
    found = candidates("lstm", B, H, torch.float32, device, T, compiled=False)
    timed = {"cudnn": found["cudnn"]}
    for variant, (stage, block_k) in VARIANTS.items():
        timed[variant] = _Knobs(found["vgkernels"], stage, block_k)
    comparison = interleaved(f"lstm T={T} B={B} H={H} fp32-default fwd+bwd, tracked", timed, baseline="cudnn",
                             rounds=12, warmup=3, device=device)
    result = {k: {"ms": round(comparison.median(k) * 1e3, 3),
                  "vs_cudnn": round(comparison.median(k) / comparison.median("cudnn"), 3)} for k in timed}
    print(json.dumps(result), flush=True)
    return result


def markdown(payload: dict) -> str:
    m = payload["machine"]
    lines = [f"# The Triton GEMM under torch's float32 defaults, on {m.get('gpu')}", "",
             f"torch {m.get('torch')}, triton {m.get('triton')}, {m.get('date')}. Medians of interleaved "
             "rounds; error: largest |result - float64 product| over the float64 product's largest "
             "magnitude.", "", "## The products of an LSTM layer (T = 100, B = 64, I = H = 512)", "",
             "| product | M x K x N | candidate | us | TFLOP/s | / cuBLAS TF32 | error |",
             "|---|---|---|---|---|---|---|"]
    for row in payload["products"]:
        for k, v in row.items():
            if isinstance(v, dict):
                lines.append(f"| {row['product']} | {row['M']} x {row['K']} x {row['N']} | {k} | {v['us']} | "
                             f"{v['tflops']} | {v['vs_cublas_tf32']} | {v['max_error']:.1e} |")
    lines += ["", "## The layer, tracked, forward + backward, against cuDNN", "",
              "| candidate | ms | / cuDNN |", "|---|---|---|"]
    for k, v in payload["layer"].items():
        lines.append(f"| {k} | {v['ms']} | {v['vs_cudnn']} |")
    return "\n".join(lines) + "\n"


def main(out_dir: str) -> None:
    if not torch.cuda.is_available():
        sys.exit("gpu_gemm_sweep.py needs a CUDA device")
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False  # torch's defaults
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    payload = {"machine": {**machine(), "gpu": torch.cuda.get_device_name()}, "products": [], "layer": {}}
    try:
        payload["products"] = products_table("cuda")
        payload["layer"] = layer_table("cuda")
    finally:
        payload["seconds"] = round(time.perf_counter() - start, 1)
        (out / "gemm_sweep.json").write_text(json.dumps(payload, indent=1))
        (out / "gemm_sweep.md").write_text(markdown(payload))
        print(markdown(payload))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/gpu_gemm_sweep.py OUT_DIR")
    main(sys.argv[1])
