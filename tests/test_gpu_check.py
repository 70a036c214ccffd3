"""bench/gpu_check.sh, the one prepared script for a GPU machine, checked on a machine without one:
it parses, it stops at once without a GPU, and its summary (bench/gpu_summary.py) states a verdict
for every GPU target from recorded results. Also the performance model it quotes
(bench/perf_model.py). Exact checks, no tolerances (the model's figures only by their relations).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_summary  # noqa: E402
import perf_model  # noqa: E402


def test_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], check=True)


def test_script_stops_without_a_gpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and not (tmp_path / "out").exists()


def test_profile_stops_without_a_gpu_and_its_smoke_run_works(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "bench" / "gpu_profile.py"), str(tmp_path / "p.txt")]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr
    proc = subprocess.run(command, env={**env, "VGK_PROFILE_SMOKE": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    headers = [line for line in (tmp_path / "p.txt").read_text().splitlines() if line.startswith("## ")]
    assert len(headers) == 13 and all("wall" in line and "device time" in line for line in headers)


def test_gpu_benchmark_smoke_run_on_the_cpu_records_nothing():
    # VGK_BENCH_SMOKE=1 runs one tiny case of bench_recurrent_gpu.py under the Triton interpreter: the
    # file works without a GPU, and a CPU run leaves no GPU result behind.
    results = ROOT / "bench" / "results"
    before = set(results.iterdir())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(VGK_BENCH_SMOKE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "bench" / "pytest.ini"), "-q",
                           str(ROOT / "bench" / "bench_recurrent_gpu.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 passed" in proc.stdout
    assert set(results.iterdir()) == before


def _row(dtype, ours, cudnn, eager=None, **extra):
    row = {"case": f"lstm T=100 B=64 H=512 {dtype} fwd+bwd", "mode": "lstm", "B": 64, "H": 512,
           "dtype": dtype, "auto_loop": "step", "vgkernels median ms": ours, "cudnn median ms": cudnn,
           "vgkernels_persistent median ms": 9.0, "vgkernels_step_nograph median ms": 4.0}
    if eager:
        row["eager_cell_loop median ms"] = eager
    row.update(extra)
    return row


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_gpu_benchmark_times_graph_replays_not_captures(mode, graph_calls):
    """The interleaved GPU benchmark, simulated on the CPU: after the warmup, every step-loop call of its
    bf16 candidates (forward and backward, plain and layer-normalized, tracked and not) finds a captured
    graph entry; none captures again or runs without a graph. Every timed call runs beside fresh
    allocations, as the other candidates move a GPU's allocator. Before the forward's bf16 outputs lived
    in static buffers, half of the timed backward calls captured and the other half ran without a graph."""
    import bench_recurrent_gpu

    from vgkernels.benchmark import interleaved

    held = []

    def timed_call_setup():
        graph_calls.phase = "timed"
        held[:] = [torch.empty(1 << k) for k in range(8, 14)]  # alive through the timed call

    candidates = bench_recurrent_gpu.candidates(mode, 2, 16, torch.bfloat16, "cpu", 3, compiled=False)
    interleaved("sim", candidates, baseline="cudnn", rounds=3, warmup=2, setup=timed_call_setup)
    timed = graph_calls.of("timed")
    assert {kind for _, kind, _ in timed} == {"fwd", "bwd", "ln-fwd", "ln-bwd"}, graph_calls
    assert all(outcome == "found" for _, _, outcome in timed), timed


def test_summary_states_every_verdict(tmp_path):
    results = tmp_path / "results"
    out = tmp_path / "out"
    results.mkdir()
    out.mkdir()
    rows = [_row("fp32-tf32", 2.0, 1.8, eager=20.0), _row("bf16", 3.0, 2.0)]
    (results / "recurrent_gpu_Test_GPU.json").write_text(json.dumps({"results": rows}))
    other = {"results": [{"case": "layer_norm (4096, 1024)", "target fraction": ">= 0.8",
                          "vgkernels fraction of copy bandwidth": 0.91}]}
    (results / "layer_norm_Test_GPU.json").write_text(json.dumps(other))
    text = gpu_summary.summarize(out, "passed", "Test GPU", results)
    assert (out / "summary.md").read_text() == text
    assert (out / "recurrent_gpu_Test_GPU.json").exists()
    assert "- GPU tests (pytest -m gpu): passed" in text
    assert ("fp32-tf32: tracked vgkernels / cuDNN = 1.111 (2.000 ms against 1.800 ms; goal <= 1.25: met)"
            in text)
    assert ("bf16: tracked vgkernels / cuDNN = 1.500 (3.000 ms against 2.000 ms; goal <= 1.25: NOT met)"
            in text)
    assert "eager tracked cell loop / vgkernels = 10.00 (goal >= 5: met)" in text
    assert "fp32-ieee: not measured" in text
    assert "the model estimated" in text
    assert "vgkernels fraction of copy bandwidth = 0.91 (goal >= 0.8)" in text
    assert "| lstm T=100 B=64 H=512 fp32-tf32 fwd+bwd | step  | 9.000 | 4.000 | 2.000 | vgkernels |" in text


def test_summary_gives_no_verdict_on_an_earlier_runs_results(tmp_path):
    """Files written before the check started are committed results of an earlier run: named as not
    measured in this run, not copied, and no verdict is drawn from them; a file written since is judged."""
    results = tmp_path / "results"
    out = tmp_path / "out"
    results.mkdir()
    out.mkdir()
    (results / "recurrent_gpu_Test_GPU.json").write_text(json.dumps({"results": [_row("bf16", 3.0, 2.0)]}))
    old = {"results": [{"case": "clip", "target ratio": "<= 0.5", "ratio": 0.75}]}
    (results / "clip_grad_Test_GPU.json").write_text(json.dumps(old))
    since = max(p.stat().st_mtime for p in results.iterdir()) + 1
    fresh = {"results": [{"case": "ln", "target ratio": "<= 1", "ratio": 0.9}]}
    (results / "layer_norm_Test_GPU.json").write_text(json.dumps(fresh))
    os.utime(results / "layer_norm_Test_GPU.json", (since + 1, since + 1))
    text = gpu_summary.summarize(out, "passed", "Test GPU", results, since=since)
    assert "recurrent benchmarks: not measured in this run" in text
    assert "tracked vgkernels / cuDNN" not in text
    assert "- clip_grad_Test_GPU: not measured in this run" in text and "0.75" not in text
    assert "- layer_norm_Test_GPU: ln: ratio = 0.9 (goal <= 1)" in text
    assert sorted(p.name for p in out.iterdir()) == ["layer_norm_Test_GPU.json", "summary.md"]


def test_summary_without_results(tmp_path):
    text = gpu_summary.summarize(tmp_path, "FAILED or timed out (exit 1)", "Test GPU", tmp_path)
    assert "GPU tests (pytest -m gpu): FAILED" in text and "no results were recorded" in text


def test_perf_model_report_states_it_is_an_estimate():
    text, acceptance = perf_model.report()
    assert "An estimate from first principles, not a measurement" in text
    for field in ("l2_bytes", "graph_gap_s", "tf32_flops", "hbm_bytes", "sms"):
        assert f"`{field}`" in text
    assert set(acceptance) >= {"bf16", "fp32, IEEE everywhere (both TF32 switches off)"}
    c = perf_model.Case("lstm", 64, 512, precision="tf32")
    # the graph saves the host's launch cost; the persistent loop runs on 4 SMs and is the slowest
    assert perf_model.ours(c)["total"] < perf_model.ours(c, graph=False)["total"]
    assert perf_model.ours(c, loop="persistent")["total"] > perf_model.ours(c)["total"]
    assert perf_model.ours(c)["sms_busy"] >= 100
    # more L2 bandwidth never makes anything slower
    fast = perf_model.Machine(l2_bytes=12e12)
    assert perf_model.ours(c, fast)["total"] <= perf_model.ours(c)["total"]


def test_perf_model_sets_every_recorded_gpu_measurement_beside_its_estimate():
    import json

    text, _ = perf_model.report()
    section = text.split("## Measured on a GPU, beside the model")[1]
    recorded = sorted((perf_model.ROOT / "bench" / "results").glob("recurrent_gpu_*.json"))
    assert recorded, "no GPU measurement is committed"
    for path in recorded:
        for row in json.loads(path.read_text())["results"]:
            ratio = row["vgkernels median ms"] / row["cudnn median ms"]
            key = f"| {path.name} | {row['case']} |"
            line = next(line for line in section.splitlines() if line.startswith(key))
            assert line.rstrip(" |").endswith(f"{ratio:.2f}")


def test_gemm_sweep_records_and_the_model_reads_them(tmp_path):
    """The committed GEMM sweep renders as its committed table; the model states each product's fraction
    of the TF32 peak from it; the sweep stops without a GPU."""
    import gpu_gemm_sweep

    recorded = sorted((ROOT / "bench" / "results").glob("gemm_sweep_*.json"))
    assert recorded, "no GEMM sweep is committed"
    text, _ = perf_model.report()
    for path in recorded:
        payload = json.loads(path.read_text())
        assert gpu_gemm_sweep.markdown(payload) == path.with_suffix(".md").read_text()
        for row in payload["products"]:
            fraction = row["triton_staged_k32"]["tflops"] * 1e12 / perf_model.H200.tf32_flops
            line = next(line for line in text.splitlines() if line.startswith(f"| {row['product']} |"))
            assert f" {fraction:.2f} |" in line
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_gemm_sweep.py"), str(tmp_path)],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "needs a CUDA device" in proc.stderr and not list(tmp_path.iterdir())


def test_perf_model_calibration_recovers_what_made_the_measurements():
    """Rows made by the model itself with a known cuDNN step cost and our residual: calibrate() finds
    both, and the calibrated model then gives those rows' times back."""
    step, residual = 30e-6, 2e-3
    fit_rows = []
    for dtype in perf_model.BENCH_PRECISIONS:
        row = {"mode": "gru", "B": 64, "H": 512, "T": 100, "dtype": dtype}
        c, matmul_tf32 = perf_model._case_of(row)
        row["vgkernels median ms"] = (perf_model.ours(c, matmul_tf32=matmul_tf32)["total"] + residual) * 1e3
        row["cudnn median ms"] = perf_model.cudnn(c, step_s=step)["total"] * 1e3
        fit_rows.append(row)
    fit = perf_model.calibrate(fit_rows)
    assert fit["cudnn_step_s"] == pytest.approx(step) and fit["residual_s"] == pytest.approx(residual)
    c, matmul_tf32 = perf_model._case_of(fit_rows[0])
    o, d = perf_model.calibrated(c, fit, matmul_tf32=matmul_tf32)
    assert o * 1e3 == pytest.approx(fit_rows[0]["vgkernels median ms"])
    assert d * 1e3 == pytest.approx(fit_rows[0]["cudnn median ms"])


def test_perf_model_layer_normalized_step_loop():
    """The layer-normalized cells' step loop keeps 100 SMs busy and, at the acceptance shape, beats their
    persistent loop (4 programs) in the model; the TF32 products around the loop run the Triton GEMM
    under torch's defaults and cuBLAS where torch's matmul switch says TF32 too."""
    for mode in ("lstm", "gru"):
        c = perf_model.Case(mode, 64, 512, precision="tf32")
        step = perf_model.ours_ln(c)
        assert step["sms_busy"] >= 100
        assert perf_model.ours_ln(c, loop="persistent")["total"] > step["total"]
        assert step["total"] == pytest.approx(step["recurrence"] + step["gemms"] + step["elementwise"],
                                              rel=1e-12)
    c = perf_model.Case("lstm", 64, 512, precision="tf32")
    assert perf_model.ours(c)["gemms"] == perf_model.big_gemms_s(c, triton_gemm=True)
    assert perf_model.ours(c, matmul_tf32=True)["gemms"] == perf_model.big_gemms_s(c)


@pytest.mark.parametrize("precision", ["tf32", "bf16", "ieee", "fp64"])
def test_perf_model_parts_add_up(precision):
    c = perf_model.Case("gru", 16, 256, precision=precision)
    o = perf_model.ours(c)
    assert o["total"] == pytest.approx(o["recurrence"] + o["gemms"] + o["elementwise"], rel=1e-12)
    assert all(o[k] > 0 for k in ("recurrence", "gemms", "elementwise"))
