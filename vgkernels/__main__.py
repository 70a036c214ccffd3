"""Command line: ``python -m vgkernels demo | bench | info | aot-check``."""

from __future__ import annotations

import argparse
import sys


def _info(args: argparse.Namespace) -> int:
    import platform

    import torch

    import vgkernels
    from vgkernels import _library
    from vgkernels.backends import available_backends

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"vgkernels {vgkernels.__version__}")
    print(f"torch     {torch.__version__}")
    print(f"triton    {triton_version}")
    print(f"python    {platform.python_version()} on {platform.machine()}, {torch.get_num_threads()} threads")
    print(f"cuda      {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'}")
    from vgkernels.cpu import cpu_info

    cpu = cpu_info()
    caps = ", ".join(f"{k}={cpu[k]}" for k in ("VGK_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                                                 "ATEN_CPU_CAPABILITY") if cpu[k] is not None)
    print(f"cpu       {cpu['cpu']}")
    print(f"isa       {cpu.get('isa', '?')} (the CPU's: {cpu.get('native_isa', '?')}; torch's loops: "
          f"{cpu['aten_capability']}){'; caps ' + caps if caps else ''}")
    print(f"gemm      {cpu.get('gemm_forced') or 'chosen per shape (VGK_CPU_BLAS unset)'}")
    print("backends:")
    for name, status in available_backends().items():
        print(f"  {name:<10}{status}")
    if _library.cpp_available():
        info = _library._C.build_info()
        print("compiled library:")
        print(f"  path      {_library._C.__file__}")
        print(f"  build     {info['build_type']}, {info['compiler']}, flags {info['cxx_flags']!r}, "
              f"OpenMP {info['openmp']}, against torch {info.get('torch_version', '?')}")
    else:
        print(f"compiled library: not loaded ({_library.LOAD_ERROR})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vgkernels.demo import run_demo

    run_demo(out=args.out, device=args.device, quick=args.quick, seed=args.seed)
    return 0


def _bench(args: argparse.Namespace) -> int:
    import os

    from vgkernels import benchmark
    from vgkernels.cpu import isa_environment

    levels = benchmark.isa_levels_to_compare() if args.isa == "all" else [args.isa]
    in_place = len(levels) == 1 and all(os.environ.get(k) == v for k, v in isa_environment(levels[0]).items())
    if not in_place:  # oneDNN and MKL read their caps at first use: a new process per level
        command = [sys.executable, "-m", "vgkernels", "bench", "--isa", "{level}"]
        command += ["--quick"] * args.quick + ["--pin-malloc"] * args.pin_malloc
        return benchmark.run_at_isa_levels(command, levels)
    benchmark.run_benchmarks(quick=args.quick, pin_malloc=args.pin_malloc or os.environ.get(
        benchmark.PIN_MALLOC_ENV) == "1")
    return 0


def _aot_check(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot-check: TRITON_INTERPRET=1 is set; unset it (the check compiles the real kernels)")
        return 2
    from vgkernels.triton import aot

    result = aot.check(args.table, jobs=args.jobs, progress=lambda line: print(line, flush=True))
    s = result["summary"]
    if args.out:
        md, js = aot.write(result, Path(args.out))
        print(f"wrote {md} and {js}")
    for config, kernel, target in result["failures"]:
        row = next(r for r in result["rows"] if (r["config"], r["kernel"]) == (config, kernel))
        print(f"FAIL {target} {kernel} [{config}]: {row[target]['error']}")
    for config, kernel, target in result["spills"]:
        print(f"SPILL {target} {kernel} [{config}]")
    print(f"triton {s['triton']}: {s['distinct_kernels']} distinct kernels of {s['configurations']} "
          f"configurations, {s['compiles']} compiles for {', '.join(s['targets'])} in {s['seconds']} s: "
          f"{s['failures']} failures, {s['spilling']} spilling")
    return 1 if s["failures"] or s["spilling"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vgkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, usable backends and the compiled library").set_defaults(func=_info)
    demo = sub.add_parser("demo", help="reproduce the classic vanishing/exploding gradient results")
    demo.add_argument("--out", default="vgkernels-demo", help="folder for report.md and the PNGs")
    demo.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    demo.add_argument("--quick", action="store_true", help="tiny sizes, for tests (about 30 s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", help="time the recurrent layers against torch.nn, side by side")
    bench.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    bench.add_argument("--isa", default="native", choices=["native", "avx512", "avx2", "baseline", "all"],
                       help="instruction-set level to run at, each in a process of its own; 'all': the CPU's "
                            "own and AVX2 (default: native)")
    bench.add_argument("--pin-malloc", action="store_true",
                       help="pin glibc's mmap/trim thresholds and fault a heap in first (not a plain "
                            "process; labelled in the output)")
    bench.set_defaults(func=_bench)
    aot = sub.add_parser("aot-check", help="compile every Triton launch for sm_80 and sm_90 (no GPU needed)")
    aot.add_argument("--table", default="ci", choices=["smoke", "ci", "full"],
                     help="smoke: one launch per kernel (a minute); ci: a representative subset (minutes); "
                          "full: the whole table (bench/results/aot_*.md)")
    aot.add_argument("--out", default=None, help="folder for the table (aot_triton-<version>[_ci].md/.json)")
    aot.add_argument("--jobs", type=int, default=None, help="compile processes (default: all CPUs)")
    aot.set_defaults(func=_aot_check)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
