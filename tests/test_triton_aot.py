"""The ahead-of-time compile check (vgkernels.triton.aot) and the launch plans it records.

The compile itself runs in a subprocess without TRITON_INTERPRET (this process runs the kernels in
the interpreter, see conftest.py): ``python -m vgkernels aot-check --table smoke`` must compile every
launch of the smoke table for sm_80 and sm_90 with no failure and no spill. CI runs the larger
``--table ci`` under triton 3.6.0 and the newest triton (.ci/run); the full table is in
bench/results/aot_triton-*.md.

Exact checks (no tolerances): launch counts, grids, plans, resource figures parsed from cuobjdump.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vgkernels.triton import _host, aot
from vgkernels.triton import recurrent as tr
from vgkernels.triton import recurrent_ln as trl

ROOT = Path(__file__).resolve().parents[1]
H200_SMS = 132


def _environment_without_interpreter() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_smoke_table_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vgkernels", "aot-check", "--table", "smoke", "--out", str(tmp_path)],
        cwd=ROOT, env=_environment_without_interpreter(), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = json.loads(next(tmp_path.glob("aot_triton-*_smoke.json")).read_text())
    summary = table["summary"]
    assert summary["failures"] == 0 and summary["spilling"] == 0
    assert summary["targets"] == ["sm_80", "sm_90"]
    kernels = {row["kernel"] for row in table["rows"]}
    # every kernel family of the package is in the smoke table
    assert {"_forward_kernel", "_backward_kernel", "_ln_forward_kernel", "_ln_backward_kernel",
            "_ln_fwd_dot_kernel", "_ln_fwd_gates_kernel", "_ln_fwd_cell_kernel", "_ln_bwd_dot_kernel",
            "_ln_bwd_cell_kernel", "_ln_bwd_dy_kernel", "_ln_jacobian_kernel", "_mm_kernel",
            "_cell_forward_kernel", "_cell_backward_kernel", "_forward_fused_kernel",
            "_backward_fused_kernel", "_norm_partial_kernel", "_scale_kernel", "_chunk_kernel",
            "_finalize_kernel"} <= kernels
    for row in table["rows"]:
        for target in ("sm_80", "sm_90"):
            res = row[target]
            assert res["ok"] and res["spills"] == 0 and 0 < res["regs"] <= 255, (row["config"], target, res)
    md = next(tmp_path.glob("aot_triton-*_smoke.md")).read_text()
    assert "compile failures: 0" in md and "kernels that spill: 0" in md


def test_aot_check_refuses_the_interpreter():
    env = _environment_without_interpreter()
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "vgkernels", "aot-check", "--table", "smoke"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "TRITON_INTERPRET" in proc.stdout


def test_capture_records_instead_of_launching():
    """A captured step loop records one launch per step on meta tensors: nothing runs, nothing is
    allocated, and the plan is made for the captured GPU."""
    gpu = _host.GPU("test", 132)
    x = torch.empty(7, 16, 4 * 256, device="meta")
    h0 = torch.empty(16, 256, device="meta")
    w = torch.empty(4 * 256, 256, device="meta")
    old = os.environ.get(tr.LOOP_ENV)
    os.environ[tr.LOOP_ENV] = "step"
    try:
        with _host.capture(gpu) as launches:
            tr._forward_impl(x, h0, h0, w, None, None, "lstm", False, True)
    finally:
        os.environ.pop(tr.LOOP_ENV) if old is None else os.environ.__setitem__(tr.LOOP_ENV, old)
    assert len(launches) == 7
    assert all(launch.kernel is tr._forward_kernel for launch in launches)
    plan = tr.plan(16, 256, 4, torch.float32, 132, "step")
    assert launches[0].grid == (1, 256 // plan["BLOCK_J"], plan["SPLIT_FWD"])
    assert [launch.args[15] for launch in launches] == list(range(7))  # s0: one step each
    assert not _host.capturing()
    with pytest.raises(RuntimeError, match="already being captured"), _host.capture(gpu), _host.capture(gpu):
        pass


def test_capture_refuses_interpreted_kernels():
    config = next(c for c in aot.configs("smoke") if c.family == "layer_norm")
    launch = aot.capture(config)[0]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.specialise(launch, 90)


@pytest.mark.parametrize("table", ["smoke", "ci", "full"])
def test_every_config_captures_launches(table):
    names = set()
    for config in aot.configs(table):
        assert config.name not in names, f"duplicate configuration {config.name}"
        names.add(config.name)
        launches = aot.capture(config)
        assert launches, config.name
        for launch in launches:
            assert all(isinstance(g, int) and g >= 1 for g in launch.grid), (config.name, launch.grid)
    assert len(names) == len(aot.configs(table))
    with pytest.raises(ValueError, match="table"):
        aot.configs("huge")


def test_smoke_table_finds_every_name():
    # a name missing from the CI table would silently drop a kernel from the smoke check
    assert sorted(c.name for c in aot.configs("smoke")) == sorted(aot.SMOKE)


def test_full_table_covers_the_recurrent_grid():
    names = [c.name for c in aot.configs("full")]
    for mode in ("lstm", "gru", "rnn_tanh", "rnn_relu", "rnn_sigmoid"):
        shapes = [(64, 512)] if mode in ("rnn_relu", "rnn_sigmoid") else None
        for B in (16, 64, 256):
            for H in (256, 512, 1024):
                if shapes is not None and (B, H) not in shapes:
                    continue
                for dtype in ("fp32", "bf16", "fp16", "fp64"):
                    for track in ("on", "off"):
                        for loop in ("step", "persistent"):
                            assert f"{mode} B={B} H={H} {dtype} track={track} loop={loop}" in names
                            if mode in ("lstm", "gru"):
                                assert f"{mode}-ln B={B} H={H} {dtype} track={track} loop={loop}" in names
                        assert f"{mode} cell B={B} H={H} {dtype} track={track}" in names
                if mode in ("lstm", "gru"):
                    for ln in ("", "-ln"):
                        assert f"{mode}{ln} B={B} H={H} fp32-tf32 track=on loop=step" in names


def test_default_launches_keep_100_sms_busy():
    """Every launch of the recurrent layers (plain and layer-normalized, forward and backward, the products
    around the loop included) and of the
    cells that the package makes by default for the full table (B >= 16) runs at least 100 programs on an
    H200."""
    families = {"recurrent", "recurrent-ln", "cell"}
    seen = set()
    for config in aot.configs("full"):
        if config.family not in families or not config.auto:
            continue
        for launch in aot.capture(config):
            programs = 1
            for g in launch.grid:
                programs *= g
            assert programs >= 100, (config.name, launch.kernel.__name__, launch.grid)
            seen.add(launch.kernel.__name__)
    assert {"_ln_fwd_dot_kernel", "_ln_fwd_gates_kernel", "_ln_fwd_cell_kernel", "_ln_bwd_dot_kernel",
            "_ln_bwd_cell_kernel", "_ln_bwd_dy_kernel", "_ln_jacobian_kernel", "_mm_kernel",
            "_cell_forward_kernel", "_cell_backward_kernel", "_forward_kernel", "_backward_kernel"} <= seen


@pytest.mark.parametrize("G", [4, 3, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_default_step_plans_keep_100_sms_busy(G, dtype):
    """At B >= 16 every default plan of the table runs at least 100 programs per step on an H200."""
    for B in (16, 64, 256):
        for H in (256, 512, 1024):
            p = tr.plan(B, H, G, dtype, H200_SMS)
            assert p["loop"] == "step"
            tiles = -(-B // p["BLOCK_B"]) * -(-H // p["BLOCK_J"])
            for split, K in ((p["SPLIT_FWD"], H), (p["SPLIT_BWD"], G * H)):
                chunk = tr._k_chunk(K, split, p["BLOCK_K"])
                assert -(-K // chunk) == split, "every split program gets a share of K"
                assert tiles * split >= 100, (B, H, p)
            assert min(p["BLOCK_B"], p["BLOCK_J"], p["BLOCK_K"]) >= 16
            assert G * p["BLOCK_B"] * p["BLOCK_J"] * (2 if dtype == torch.float64 else 1) <= tr.ACC_WORDS


@pytest.mark.parametrize("G", [4, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_layer_norm_step_plans(G, dtype):
    """The layer-normalized cells' step plans: dot tiles of at least 16 each way, every split program
    with a share of K, element-wise tiles of at least a warp."""
    for B in (16, 64, 256):
        for H in (256, 512, 1024):
            p = trl.plan(B, H, G, dtype, H200_SMS)
            assert p["loop"] == "step"
            for dot, K in ((p["fwd"], H), (p["bwd"], G * H)):
                assert min(dot["BLOCK_B"], dot["BLOCK_J"], dot["BLOCK_K"]) >= 16
                assert -(-K // tr._k_chunk(K, dot["SPLIT"], dot["BLOCK_K"])) == dot["SPLIT"]
            for pointwise in (p["gates"], p["dy"]):
                assert pointwise["BLOCK_B"] * pointwise["BLOCK_J"] >= 32 and pointwise["BLOCK_J"] >= 16
    assert trl.plan(16, 8, G, dtype, H200_SMS)["loop"] == "persistent"  # a tiny step: one launch
    for H in (256, 512, 1024):  # persistent: a power-of-two y tile, at most 128 tiles' statistics per row
        block_n = trl.plan(64, H, G, dtype, H200_SMS, "persistent")["BLOCK_N"]
        limit = trl.MAX_STAT_TILES // (2 if dtype == torch.float64 else 1)
        assert block_n & (block_n - 1) == 0 and -(-G * H // block_n) <= limit


def test_plan_rejects_unknown_loop():
    with pytest.raises(ValueError, match="VGK_RNN_TRITON_LOOP"):
        tr.plan(16, 256, 4, torch.float32, 132, "graph")


def test_resource_parsing_and_occupancy(monkeypatch):
    text = ("Resource usage:\n Common:\n  GLOBAL:11\n Function k:\n  REG:92 STACK:8 SHARED:1024 LOCAL:16 "
            "CONSTANT[0]:424 TEXTURE:0\n")

    class Done:
        stdout = text

    monkeypatch.setattr(aot.subprocess, "run", lambda *a, **k: Done())
    assert aot._resources(b"") == {"regs": 92, "stack": 8, "local": 16, "static_smem": 1024}
    # 92 registers -> 96 per thread allocated (256 per warp), 8 warps: 65536 // (3072 * 8) = 2 blocks
    assert aot.blocks_per_sm(92, 8, 17408, 90) == 2
    assert aot.blocks_per_sm(32, 4, 0, 90) == 16  # the warp limit: 64 warps per SM
    assert aot.blocks_per_sm(32, 1, 100 * 1024, 80) == 1  # shared memory: 163 KB on sm_80
