import os

# The Triton backend runs on CPU tensors only in the interpreter, which must be chosen before
# triton is first imported.
if os.environ.get("VGK_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

