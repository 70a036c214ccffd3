"""The side-by-side timing that every benchmark uses (vgkernels.benchmark.interleaved)."""

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
