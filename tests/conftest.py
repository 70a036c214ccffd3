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
