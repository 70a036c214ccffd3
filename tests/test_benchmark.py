"""The side-by-side timing that every benchmark uses (vgkernels.benchmark.interleaved)."""

import platform
import subprocess
import sys
import time

import pytest

from vgkernels.benchmark import interleaved


def test_candidates_alternate_and_setup_runs_untimed_before_each_call():
    calls = []
    candidates = {
        "a": lambda: calls.append("a"),
        "b": lambda: calls.append("b"),
    }

    def setup():
        calls.append("setup")
        time.sleep(0.02)

    result = interleaved("case", candidates, baseline="a", rounds=3, warmup=1, setup=setup)
    timed = calls[2:]  # after one warmup call of each candidate, without setup
    assert calls[:2] == ["a", "b"]
    assert timed == ["setup", "a", "setup", "b"] * 3
    assert all(len(times) == 3 for times in result.times.values())
    # The 20 ms sleeps of setup are not in the times.
    assert max(max(times) for times in result.times.values()) < 0.01
    assert result.ratio("a") == 1.0


def test_ratio_is_of_medians():
    result = interleaved("case", {"slow": lambda: time.sleep(0.004), "fast": lambda: None}, baseline="slow",
                         rounds=5, warmup=0)
    assert result.ratio("fast") < 0.5
    assert result.ratio("fast") == result.median("fast") / result.median("slow")


def test_unknown_baseline_is_an_error():
    with pytest.raises(ValueError, match="baseline 'c' is not among the candidates"):
        interleaved("case", {"a": lambda: None}, baseline="c")


def test_pinned_malloc_serves_a_new_16_mb_buffer_without_page_faults():
    # In a fresh process. The pin is glibc's: elsewhere it must say it did nothing. On glibc, without
    # the faulted-in heap, the first 16 MB buffer costs ~4096 page faults.
    script = (
        "import resource, torch\n"
        "from vgkernels.benchmark import machine, pin_glibc_malloc\n"
        "pinned = pin_glibc_malloc()\n"
        "assert pin_glibc_malloc() == pinned\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "torch.ones(4 << 20)\n"
        "faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "print(pinned, machine()['malloc'] != 'default', faults)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    pinned, reported, faults = out.split()[-3:]
    glibc = platform.libc_ver()[0] == "glibc"
    assert pinned == reported == str(glibc)
    if glibc:
        assert int(faults) < 400


def test_machine_names_the_cpu_and_the_instruction_set():
    from vgkernels import _library
    from vgkernels.benchmark import machine
    from vgkernels.cpu import cpu_model

    info = machine()
    assert info["cpu"] == cpu_model() and info["cpu"]
    assert info["isa"] == _library._C.cpu_isa()["in_effect"]
    assert info["native_isa"] == _library._C.cpu_isa()["native"]
    assert info["malloc"] == "default" or "mmap threshold" in info["malloc"]


def test_run_at_isa_levels_runs_each_level_in_a_process_with_its_caps(capfd, monkeypatch):
    from vgkernels.benchmark import run_at_isa_levels

    monkeypatch.setenv("VGK_CPU_ISA", "baseline")  # an inherited cap must not leak into "native"
    show = ("import os; env = os.environ.get\n"
            "print('caps', env('VGK_CPU_ISA'), env('ONEDNN_MAX_CPU_ISA'), '{level}')")
    status = run_at_isa_levels([sys.executable, "-c", show], ["native", "avx2"])
    out = capfd.readouterr().out
    assert status == 0
    assert "caps None None {level}" in out  # "{level}" inside an argument stays as it is
    assert "caps avx2 AVX2 {level}" in out
    assert run_at_isa_levels([sys.executable, "-c", "raise SystemExit(3)"], ["native"]) == 3


def test_level_argument_is_substituted():
    from vgkernels.benchmark import run_at_isa_levels

    code = "import sys, os; sys.exit(0 if sys.argv[1] == os.environ.get('VGK_CPU_ISA', 'native') else 1)"
    assert run_at_isa_levels([sys.executable, "-c", code, "{level}"], ["native", "avx2", "baseline"]) == 0
