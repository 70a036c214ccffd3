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
