"""The CPU kernels at run time: their buffer cache, the CPU they run on and the instruction set they use.

``empty_cache()`` gives the idle buffers of the C++ CPU kernels back to the operating system, as
``torch.cuda.empty_cache()`` does for CUDA memory. ``cpu_info()`` names the CPU, the instruction-set
level in effect and the GEMM paths chosen; ``isa_environment(level)`` is the environment that makes a
process run at a lower level (the benchmark and the tests run the kernels at each level that way).
"""

from __future__ import annotations

import os
import platform

import torch

from vgkernels import _library

ISA_LEVELS = ("avx512", "avx2", "baseline")  # highest first

# What each library reads to cap its instruction set, per level: vgkernels (pointwise passes, GEMM
# choice), oneDNN (brgemm, torch.nn's RNNs), MKL (the BLAS) and ATen (torch's own vectorised loops).
# oneDNN and MKL read theirs at their first use, so they must be set before the process starts.
_ISA_ENV = {
    "avx512": {"VGK_CPU_ISA": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512", "ATEN_CPU_CAPABILITY": "avx512"},
    "avx2": {"VGK_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "baseline": {"VGK_CPU_ISA": "baseline", "ONEDNN_MAX_CPU_ISA": "SSE41",
                 "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ATEN_CPU_CAPABILITY": "default"},
}
_ISA_VARIABLES = tuple(_ISA_ENV["avx2"])


def empty_cache() -> None:
    """Give every idle buffer of the C++ CPU kernels' block cache back to the operating system.

    The recurrent layers and LayerNorm on CPU tensors take their buffers of 1 MiB or more from a cache
    of freed blocks, sized by what the recent calls needed at once (it shrinks by itself when the
    shapes do). Call this, like ``torch.cuda.empty_cache()``, to release the idle part at once, for
    example after the last training step; buffers still in use stay. Does nothing without the compiled
    extension. CUDA memory is torch's: use ``torch.cuda.empty_cache()`` for it.
    """
    if _library.cpp_available():
        _library._C.cpu_block_cache_empty()


def cpu_model() -> str:
    """The CPU's name with its family and model numbers, e.g. "AMD EPYC (family 25 model 1)" (Linux)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def isa_environment(level: str) -> dict[str, str]:
    """The environment variables that make a new process run at instruction-set ``level``.

    ``level`` is "native" (removes every cap), "avx512", "avx2" or "baseline". Apply them to the
    environment of a subprocess: oneDNN and MKL read theirs once, at their first use.
    """
    if level == "native":
        return {}
    if level not in _ISA_ENV:
        raise ValueError(f"level must be 'native' or one of {ISA_LEVELS}, got {level!r}")
    return dict(_ISA_ENV[level])


def subprocess_environment(level: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) without any ISA cap, plus those of ``level``."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _ISA_VARIABLES}
    env.update(isa_environment(level))
    return env


def available_isa_levels() -> list[str]:
    """The levels this CPU can run, highest first (its own and every lower one)."""
    _library.require_cpp()
    native = _library._C.cpu_isa()["native"]
    return list(ISA_LEVELS[ISA_LEVELS.index(native):])


def cpu_info() -> dict[str, object]:
    """The CPU and what the CPU kernels use on it.

    Keys: ``cpu``; ``isa`` (the level in effect), ``native_isa`` (the CPU's), the caps set in the
    environment (``VGK_CPU_ISA``, ``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``,
    ``ATEN_CPU_CAPABILITY``), ``aten_capability`` (the level torch's own loops use), ``gemm_forced``
    (``VGK_CPU_BLAS``, None: chosen per shape) and ``gemm_choices`` (the paths chosen so far).
    """
    info: dict[str, object] = {"cpu": cpu_model()}
    if _library.cpp_available():
        isa = _library._C.cpu_isa()
        info["isa"], info["native_isa"] = isa["in_effect"], isa["native"]
    info.update({name: os.environ.get(name) for name in _ISA_VARIABLES})
    info["aten_capability"] = torch.backends.cpu.get_cpu_capability().lower()
    if _library.cpp_available():
        info["gemm_forced"] = _library._C.cpu_gemm_forced()
        info["gemm_choices"] = _library._C.cpu_gemm_choices()
    return info
