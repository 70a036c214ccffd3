"""The compiled extension must be present: a missing build is a failure, never a skip. The build
directory persists, so that reinstalling without source changes compiles nothing."""

import filecmp
import importlib.util
import platform
import shutil
import subprocess
import sys
from pathlib import Path

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


ROOT = Path(__file__).resolve().parents[1]


def setup_script():
    """setup.py as a module (its setup() call runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("vgkernels_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_directory_is_persistent_and_keyed(monkeypatch):
    """One directory under build/ per environment: the same each time, another for another torch,
    compiler or build type (whose objects must not be reused)."""
    setup = setup_script()
    here = setup.build_dir()
    assert here.parent == ROOT / "build" and here == setup.build_dir()
    assert f"torch{torch.__version__.replace('+', '_')}" in here.name
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    other_torch = setup.build_dir()
    monkeypatch.undo()
    monkeypatch.setenv("VGK_BUILD_TYPE", "Debug")
    debug = setup.build_dir()
    monkeypatch.undo()
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    other_compiler = setup.build_dir()
    assert len({here, other_torch, debug, other_compiler}) == 4


def test_unchanged_sources_rebuild_nothing():
    """The loaded extension is the product of this environment's build directory, and a build there
    (what a second `pip install -e .` runs) has nothing to compile or link: ninja's dry run lists no
    step beyond re-checking the source globs."""
    directory = setup_script().build_dir()
    cache = directory / "CMakeCache.txt"
    assert cache.exists(), f"the extension was not built in {directory}"
    assert "CMAKE_GENERATOR:INTERNAL=Ninja" in cache.read_text()
    assert filecmp.cmp(_library._C.__file__, directory / Path(_library._C.__file__).name, shallow=False)
    ninja = shutil.which("ninja")
    assert ninja, "ninja is not on the PATH"
    dry_run = subprocess.run([ninja, "-C", str(directory), "-n"], capture_output=True, text=True, check=True)
    plan = dry_run.stdout
    steps = [line for line in plan.splitlines() if "Building" in line or "Linking" in line]
    assert not steps, f"the sources changed since the build (rebuild it): {steps}"


def test_ci_runs_the_readme_test_command_as_written():
    """.ci/run holds the README's setup-and-test command verbatim, so CI runs what a new user runs."""
    readme = (ROOT / "README.md").read_text()
    commands = [block.split("```")[0].strip() for block in readme.split("```bash\n")[1:3]]
    demo, tests = commands
    assert demo.startswith("python -m venv .venv && . .venv/bin/activate && ") and "vgkernels demo" in demo
    assert tests.endswith('python -m pytest -q -m "not slow and not gpu"')
    assert tests in (ROOT / ".ci" / "run").read_text()
