"""Build of the C++ kernels in csrc/ into ``vgkernels._C`` through CMake and ninja.

The extension needs torch at build time, so install with ``pip install --no-build-isolation``.

The CMake build directory persists in the source tree, under ``build/cmake-<key>``: a second
``pip install -e .`` (or ``python setup.py build_ext --inplace``) without source changes compiles
nothing, and an edit recompiles only what it touches. (setuptools gives each editable build a fresh
temporary directory, which made every install a full rebuild.) The key names what the objects depend
on beyond the sources, so that another Python, torch, C++ compiler or build type gets a directory of
its own instead of reusing stale objects. ``rm -rf build`` forgets them all.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def build_type() -> str:
    return os.environ.get("VGK_BUILD_TYPE", "Release")


def cxx_compiler() -> str:
    """The C++ compiler CMake is told to use: $CXX, else c++ on the PATH, as an absolute path."""
    name = os.environ.get("CXX") or "c++"
    return shutil.which(name) or name


def build_key() -> str:
    """A directory name for the objects of this Python ABI, torch, compiler and build type.

    Readable parts, then a hash of everything they depend on: torch's version, git revision and
    location (another environment's torch is another build), and the compiler's path and version
    banner (an upgraded compiler at the same path is another build too).
    """
    import torch

    compiler = cxx_compiler()
    try:
        banner = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    except OSError:
        banner = ""
    abi = sysconfig.get_config_var("SOABI") or f"py{sys.version_info.major}{sys.version_info.minor}"
    facts = [abi, torch.__version__, str(torch.version.git_version), str(Path(torch.__file__).parent),
             compiler, banner, build_type()]
    digest = hashlib.sha256("\n".join(facts).encode()).hexdigest()[:12]
    python = "-".join(abi.split("-")[:2])  # e.g. cpython-311
    return f"{python}-torch{torch.__version__.replace('+', '_')}-{build_type().lower()}-{digest}"


def build_dir() -> Path:
    """The persistent CMake build directory for this environment."""
    return ROOT / "build" / f"cmake-{build_key()}"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch

        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        cmake_dir = build_dir()
        cmake_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake",
            str(ROOT),
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={build_type()}",
            f"-DCMAKE_CXX_COMPILER={cxx_compiler()}",
            # The module is linked inside the build directory, whatever the target (an editable build
            # asks for a fresh temporary one each time), so that an unchanged build links nothing.
            f"-DVGK_OUTPUT_DIR={cmake_dir}",
        ]
        # The generator is fixed at the first configure of a directory; asking for another one fails.
        if not (cmake_dir / "CMakeCache.txt").exists() and shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        subprocess.run(configure, cwd=cmake_dir, check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=cmake_dir, check=True)
        built = cmake_dir / target.name
        if not built.exists():
            raise RuntimeError(f"the CMake build did not produce {built}")
        # A fresh copy, through a new file: a process that has the old module loaded keeps its copy
        # intact, and the copy is newer than the in-tree module, which setuptools' in-place and
        # editable builds replace only with a newer file.
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        shutil.copyfile(built, partial)
        shutil.copymode(built, partial)
        os.replace(partial, target)


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import build_dir() from it
    setup(ext_modules=[CMakeExtension("vgkernels._C")], cmdclass={"build_ext": CMakeBuild})
