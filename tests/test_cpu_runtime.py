"""The CPU kernels at run time: the block cache's memory, the instruction-set switch, the GEMM choice.

Most cases run in a fresh process: the cache, the instruction-set level and the GEMM choices are
process-wide, and oneDNN and MKL read their caps once.

Tolerances: float64 results of different paths (instruction sets, GEMM paths) agree to rtol 1e-10,
atol 1e-12; float32 ones to rtol 1e-4, atol 1e-5 (the paths round differently: FMA contraction, the
GEMMs' summation order, over sums of up to T*B products); float32 weight gradients against float64 to
rtol 1e-4, atol 1e-4. Memory:
RSS in the second half of a loop grows by at most 8 MiB; empty_cache() returns at least 90% of the
idle bytes to the system.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from vgkernels import _library
from vgkernels.cpu import ISA_LEVELS, isa_environment, subprocess_environment


def run_json(script: str, env: dict[str, str] | None = None, level: str = "native") -> object:
    """Runs ``script`` in a new process at ``level`` (plus ``env``); returns the JSON of its last line."""
    environ = subprocess_environment(level)
    environ.update(env or {})
    done = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def effective(level: str) -> str:
    """The level a process asked for ``level`` runs at on this CPU: the lower of the two."""
    native = _library._C.cpu_isa()["native"]
    return max(level, native, key=ISA_LEVELS.index)


# ------------------------------------------------------------------------------------------ block cache

CACHE_RSS_SCRIPT = """
import json, torch, vgkernels
from vgkernels._C import cpu_block_cache_stats as stats
from vgkernels.benchmark import resident_mib
torch.manual_seed(0)
lstm = vgkernels.nn.LSTM(256, 256)
for _ in range(2):
    out, _ = lstm(torch.randn(100, 32, 256, requires_grad=True))
    out.sum().backward()
del out
before, idle = resident_mib(), stats()["idle_bytes"]
vgkernels.empty_cache()
print(json.dumps({"idle": idle, "freed_mib": before - resident_mib(), "after": stats()}))
"""


def test_empty_cache_returns_the_idle_blocks_to_the_system():
    result = run_json(CACHE_RSS_SCRIPT)
    assert result["idle"] >= 8 << 20  # LSTM buffers of several MiB were cached
    assert result["after"]["idle_bytes"] == 0 and result["after"]["idle_blocks"] == 0
    assert result["freed_mib"] >= 0.9 * result["idle"] / 2**20


def test_empty_cache_without_idle_blocks_is_a_no_op():
    import vgkernels

    vgkernels.empty_cache()
    vgkernels.empty_cache()
    assert _library._C.cpu_block_cache_stats()["idle_bytes"] == 0


SHRINK_SCRIPT = """
import json, torch, vgkernels
from vgkernels._C import cpu_block_cache_stats as stats
lstm = vgkernels.nn.LSTM(128, 128)
def step(T, B):
    out, _ = lstm(torch.randn(T, B, 128, requires_grad=True))
    out.sum().backward()
for _ in range(3):
    step(200, 64)
big = stats()
for _ in range(200):  # 2 cached buffers a step: 800 allocations and releases, 6 windows
    step(40, 16)
print(json.dumps({"big": big, "small": stats()}))
"""


def test_cache_shrinks_when_the_shapes_do():
    result = run_json(SHRINK_SCRIPT)
    big, small = result["big"], result["small"]
    assert big["idle_bytes"] + big["in_use_bytes"] >= 64 << 20
    # What the small shapes need: a few MiB. The blocks of the large ones went back.
    assert small["budget_bytes"] <= big["budget_bytes"] // 8
    assert small["idle_bytes"] + small["in_use_bytes"] <= small["budget_bytes"]
    assert small["hits"] - big["hits"] >= 190 * 2  # the small shapes reuse their blocks


def test_close_sizes_share_a_size_class():
    from vgkernels.ops import layer_norm

    x1, x2 = torch.randn(1040, 1024), torch.randn(1100, 1024)  # 4.06 and 4.30 MiB: both class 4.5 MiB
    with torch.no_grad():
        layer_norm(x1, (1024,), backend="cpp")  # freed at once: its block goes idle
        before = _library._C.cpu_block_cache_stats()
        second = layer_norm(x2, (1024,), backend="cpp")
    after = _library._C.cpu_block_cache_stats()
    assert after["hits"] - before["hits"] == 1
    torch.testing.assert_close(second, torch.nn.functional.layer_norm(x2, (1024,)), rtol=1e-5, atol=1e-5)


def test_rss_stops_growing_under_changing_shapes():
    # A new (T, B) at nearly every step. Kernels compiled per shape and kept, or idle blocks of sizes no
    # longer asked for, would grow the process steadily: before the weight-gradient GEMMs had fixed
    # shapes, this loop grew by 19 MiB over its second half.
    from vgkernels.benchmark import recurrent_rss_in_subprocess

    result = recurrent_rss_in_subprocess("vgkernels", 200, 128, max_t=60, max_b=24)
    marks = result["marks_mib"]
    assert len(marks) == 10
    assert max(marks[5:]) - marks[4] <= 8, marks


# --------------------------------------------------------------------------------- instruction-set levels

# Forward and backward of every cell through the layer ops, float32 and float64, with lengths, tracking
# and clipping (the LSTM with and without a projection): 33 rows (T * B: below brgemm's minimum for the
# products of all rows, per-step GEMMs excluded) and 176 rows (brgemm's row tiles, two full and a
# partial one; one partial weight-gradient chunk).
KERNELS_SCRIPT = """
import json, sys, torch
import vgkernels
from vgkernels import _C
torch.manual_seed(0)
out = []
for dtype in (torch.float32, torch.float64):
    for mode, G in (("lstm", 4), ("gru", 3), ("rnn_tanh", 1)):
        T, H, I = 11, 37, 29
        for B in (3, 16):
            x = torch.randn(T, B, I, dtype=dtype)
            h0 = torch.randn(B, H, dtype=dtype)
            c0 = torch.randn(B, H, dtype=dtype) if mode == "lstm" else None
            w_ih = torch.randn(G * H, I, dtype=dtype) * I ** -0.5
            w_hh = torch.randn(G * H, H, dtype=dtype) * H ** -0.5
            b = torch.randn(G * H, dtype=dtype)
            lens = torch.randint(1, T + 1, (B,))
            ops = torch.ops.vgk
            # the LSTM also with a projection (P = 5) of its hidden state
            for w_hr in (None, torch.randn(5, H, dtype=dtype) * H ** -0.5) if mode == "lstm" else (None,):
                h = h0 if w_hr is None else h0[:, :5].contiguous()
                whh = w_hh if w_hr is None else w_hh[:, :5].contiguous()
                fwd = ops.rnn_layer_forward(x, h, c0, w_ih, whh, b, b, w_hr, lens, None, None, mode, False,
                                            True, None)
                grads = [torch.randn_like(t) for t in fwd[:3]]
                bwd = ops.rnn_layer_backward(*grads, x, h, c0, fwd[0], fwd[3], fwd[4], w_ih, whh, w_hr, lens,
                                             None, mode, False, 0.5, True, True, True)
                out += [t.double().tolist() for t in (*fwd, *bwd) if t.numel()]
print(json.dumps({"isa": _C.cpu_isa()["in_effect"], "aten": torch.backends.cpu.get_cpu_capability(),
                  "out": out}))
"""


def compare_nested(a, b, dtype_tolerances):
    assert len(a) == len(b)
    half = len(a) // 2  # float32 results first, then float64
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        rtol, atol = dtype_tolerances[0] if i < half else dtype_tolerances[1]
        torch.testing.assert_close(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64),
                                   rtol=rtol, atol=atol)


@pytest.mark.parametrize("level", ["avx2", "baseline"])
def test_forced_isa_level_matches_the_native_results(level):
    native = run_json(KERNELS_SCRIPT)
    lowered = run_json(KERNELS_SCRIPT, level=level)
    assert native["isa"] == _library._C.cpu_isa()["native"]
    assert lowered["isa"] == effective(level)
    if lowered["isa"] != native["isa"]:
        assert lowered["aten"].lower() == {"avx2": "avx2", "baseline": "default"}[level]
    compare_nested(native["out"], lowered["out"], [(1e-4, 1e-5), (1e-10, 1e-12)])


def test_isa_environment_names_every_cap():
    assert isa_environment("native") == {}
    env = isa_environment("avx2")
    assert env == {"VGK_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                   "ATEN_CPU_CAPABILITY": "avx2"}
    with pytest.raises(ValueError, match="level must be 'native' or one of"):
        isa_environment("avx3")
    # A subprocess environment drops caps inherited from this one.
    base = {"PATH": "/bin", "VGK_CPU_ISA": "baseline", "ONEDNN_MAX_CPU_ISA": "SSE41"}
    assert subprocess_environment("native", base) == {"PATH": "/bin"}
    assert subprocess_environment("avx2", base)["ONEDNN_MAX_CPU_ISA"] == "AVX2"


BAD_ENV_SCRIPT = """
import torch, vgkernels
try:
    vgkernels.nn.LSTM(8, 8)(torch.randn(3, 2, 8))
except ValueError as error:
    print(error)
"""


@pytest.mark.parametrize("name,expected", [("VGK_CPU_ISA", "'native', 'avx512', 'avx2', 'baseline'"),
                                           ("VGK_CPU_BLAS", "'auto', 'brgemm', 'blas', 'aten'")])
def test_unknown_switch_values_raise(name, expected):
    out = subprocess.run([sys.executable, "-c", BAD_ENV_SCRIPT], env={**os.environ, name: "fastest"},
                         check=True, capture_output=True, text=True, timeout=300).stdout
    assert f"{name} must be one of {expected}, got 'fastest'" in out


# ------------------------------------------------------------------------------------------ GEMM paths

CHOICES_SCRIPT = """
import json, torch, vgkernels
from vgkernels import _C
lstm = vgkernels.nn.LSTM(64, 96)
counts = []
for _ in range(2):
    out, _ = lstm(torch.randn(10, 16, 64, requires_grad=True))
    out.sum().backward()
    counts.append(len(_C.cpu_gemm_choices()))
print(json.dumps({"forced": _C.cpu_gemm_forced(), "counts": counts, "choices": _C.cpu_gemm_choices()}))
"""


def test_gemm_path_is_timed_once_per_shape_and_reported():
    result = run_json(CHOICES_SCRIPT)
    assert result["forced"] is None
    choices = result["choices"]
    brgemm_possible = effective("avx2") == "avx2" or effective("avx512") == "avx512"
    if not brgemm_possible:
        assert choices == []
        return
    # The input projection of all steps as one GEMM ([160, 64] x [64, 384] forward, [160, 384] x [384, 64]
    # for grad_x) if it takes brgemm tiles, else per step; the recurrent GEMMs per step, 8 rows a thread on
    # 2 threads ([8, 96] x [96, 384], [8, 384] x [384, 96]); the two weight gradients.
    rows = 16 // min(torch.get_num_threads(), 4)
    paths = {(c["kind"], c["n"], c["k"]): c["path"] for c in choices}
    expected = {("tiles", 0, 384, 64, True), ("tiles", 0, 64, 384, False), ("rows", rows, 384, 96, True),
                ("rows", rows, 96, 384, False), ("weight_grad", 0, 384, 64, False),
                ("weight_grad", 0, 384, 96, False)}
    if paths[("tiles", 384, 64)] != "brgemm":
        expected.add(("rows", rows, 384, 64, True))
    if paths[("tiles", 64, 384)] != "brgemm":
        expected.add(("rows", rows, 64, 384, False))
    assert {(c["kind"], c["rows"], c["n"], c["k"], c["transposed"]) for c in choices} == expected
    assert result["counts"][0] == result["counts"][1] == len(choices)  # measured at the first call only
    for c in choices:
        assert c["path"] in ("brgemm", "blas") and c["brgemm_us"] > 0 and c["library_us"] > 0
        assert c["path"] == ("brgemm" if c["brgemm_us"] <= c["library_us"] else "blas")


@pytest.mark.parametrize("env,level", [({"VGK_CPU_BLAS": "blas"}, "native"), ({}, "baseline")])
def test_no_measurement_where_the_path_is_decided(env, level):
    result = run_json(CHOICES_SCRIPT, env=env, level=level)
    assert result["forced"] == env.get("VGK_CPU_BLAS")
    assert result["choices"] == []


WEIGHT_GRAD_SCRIPT = """
import json, torch
import vgkernels
torch.manual_seed(0)
# 2 column tiles of 128 and a tail (N = 4 * 150 = 600), 2 row tiles (K = I = 300 > 256), and
# T * B = 7 * 41 = 287 rows: a full chunk of 256 and a tail of 31.
T, B, I, H = 7, 41, 300, 150
x = torch.randn(T, B, I, dtype=torch.float64)
h0, c0 = torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
w_ih = torch.randn(4 * H, I, dtype=torch.float64) * I ** -0.5
w_hh = torch.randn(4 * H, H, dtype=torch.float64) * H ** -0.5
res = {}
for dtype in (torch.float64, torch.float32):
    args = [t.to(dtype) for t in (x, h0, c0, w_ih, w_hh)]
    fwd = torch.ops.vgk.rnn_layer_forward(*args, None, None, None, None, None, None, "lstm", False, False,
                                          None)
    g = torch.ones_like(fwd[0])
    bwd = torch.ops.vgk.rnn_layer_backward(g, torch.zeros_like(fwd[1]), torch.zeros_like(fwd[2]), args[0],
                                           args[1], args[2], fwd[0], fwd[3], fwd[4], args[3], args[4], None,
                                           None, None, "lstm", False, None, False, False, True)
    res[str(dtype)] = [bwd[3].double().tolist(), bwd[4].double().tolist()]
print(json.dumps(res))
"""


@pytest.mark.parametrize("path", ["brgemm", "blas", "auto"])
def test_weight_gradients_agree_with_float64_on_every_path(path):
    result = run_json(WEIGHT_GRAD_SCRIPT, env={"VGK_CPU_BLAS": path})
    for exact, approx in zip(result["torch.float64"], result["torch.float32"], strict=True):
        torch.testing.assert_close(torch.tensor(approx), torch.tensor(exact), rtol=1e-4, atol=1e-4)
