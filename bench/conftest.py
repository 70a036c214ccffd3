import os
import sys
from pathlib import Path

if os.environ.get("VGK_BENCH_SMOKE") == "1":
    # bench_recurrent_gpu.py's CPU smoke run: the interpreter must be on before vgkernels imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import record  # noqa: E402

from vgkernels.benchmark import PIN_MALLOC_ENV, pin_glibc_malloc  # noqa: E402

# The results are those of a plain process; pinning glibc's allocator is an explicit option, and
# machine() (recorded with every result) says when it was on.
if __import__("os").environ.get(PIN_MALLOC_ENV) == "1":
    pin_glibc_malloc()  # before any benchmark allocates

_collected: dict[str, list] = {}


@pytest.fixture
def compare_record(request):
    """Collect Comparison objects per bench file; each file's results are written once at session end."""
    suite = Path(request.node.fspath).stem.removeprefix("bench_").removeprefix("test_bench_")

    def add(comparison):
        _collected.setdefault(suite, []).append(comparison)
        print()
        row = comparison.summary() if hasattr(comparison, "summary") else comparison
        for key, value in row.items():
            print(f"  {key}: {value}")
        return comparison

    return add


def pytest_sessionfinish(session, exitstatus):
    for suite, comparisons in _collected.items():
        path = record(suite, comparisons)
        print(f"\nrecorded {path}")


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(int(__import__("os").environ.get("VGK_BENCH_THREADS", "2")))
