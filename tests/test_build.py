"""The compiled extension must be present: a missing build is a failure, never a skip."""

import platform
import subprocess
import sys

import torch

import vgkernels
from vgkernels import _library


def test_extension_is_built_and_loaded():
    assert _library.cpp_available(), f"vgkernels._C failed to load: {_library.LOAD_ERROR}"
    info = _library._C.build_info()
    assert info["build_type"]
    assert info["openmp"] > 0


def test_ops_are_registered():
    for name in ("rnn_forward", "rnn_backward"):
        assert hasattr(torch.ops.vgk, name), name


def test_info_command_runs(capsys):
    from vgkernels.__main__ import main

    main(["info"])
    out = capsys.readouterr().out
    assert vgkernels.__version__ in out
    assert torch.__version__ in out
    assert "cpp" in out and "usable" in out


def test_bench_command_quick(capsys):
    from vgkernels.__main__ import main
    from vgkernels.cpu import cpu_model

    main(["bench", "--quick"])
    out = capsys.readouterr().out
    for name in ("torch.nn.LSTM", "torch.nn.GRU", "vgkernels tracked", "LSTMCell loop + retain_grad"):
        assert name in out
    assert out.count("of torch.nn") == 7
    assert "tracked / untracked" in out and "cell loop / tracked" in out
    # The CPU model and the instruction set with every result; a plain process unless asked.
    native = _library._C.cpu_isa()["native"]
    assert f"cpu: {cpu_model()}, instruction set {native} (the CPU's: {native})" in out
    assert "malloc default" in out and "mmap threshold" not in out


def test_bench_command_pins_malloc_only_when_asked():
    # In a process of its own: the pin lasts for the life of the process.
    out = subprocess.run([sys.executable, "-m", "vgkernels", "bench", "--quick", "--pin-malloc"], check=True,
                         capture_output=True, text=True, timeout=600).stdout
    pinned = platform.libc_ver()[0] == "glibc"
    assert ("mmap threshold 32 MiB" in out) == pinned
    assert ("heap of 256 MiB faulted in" in out) == pinned
