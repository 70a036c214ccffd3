import os

# The Triton backend runs on CPU tensors only in the interpreter, which must be chosen before
# triton is first imported.
if os.environ.get("VGK_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Node ids of the tests measured slow (see the file's header); the fast selection leaves them out.
SLOW_TESTS = frozenset(
    line.strip() for line in (Path(__file__).parent / "slow_tests.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield



@pytest.fixture
def ieee_float32():
    """IEEE float32 everywhere on CUDA for the test, then torch's switches as they were: torch's matmuls,
    cuDNN, and our float32 dots, which follow cuDNN's TF32 switch (TF32 rounds operands to 10 bits)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class GraphCalls(list):
    """(phase, loop kind, outcome) per step-loop call: outcome "new" (a new graph entry), "found" (an
    entry captured before) or "ungraphed"; ``phase`` is whatever the test last set (a name, a round)."""

    phase: object = "first"

    def of(self, phase: object) -> list[tuple[object, str, str]]:
        return [call for call in self if call[0] == phase]


@pytest.fixture
def graph_calls(monkeypatch):
    """Step loops in the CPU's graph simulation (``replay``: launches on the graph entries' static
    buffers, the addresses a graph replays on), the step loop forced, every loop's entry recorded;
    the entries are dropped before and after."""
    from vgkernels.triton import _graphs
    from vgkernels.triton import recurrent as tr

    monkeypatch.setenv(_graphs.ENV, "replay")
    monkeypatch.setenv(tr.LOOP_ENV, "step")
    calls = GraphCalls()
    make = _graphs.StepLoop.__init__

    def recorded(self, key, device, adopted):
        make(self, key, device, adopted)
        if key is not None and self.kind != "off":
            outcome = "new" if self.fresh else "ungraphed" if self.entry is None else "found"
            calls.append((calls.phase, key[0], outcome))

    monkeypatch.setattr(_graphs.StepLoop, "__init__", recorded)
    _graphs.clear()
    yield calls
    _graphs.clear()
