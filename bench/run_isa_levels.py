"""Run benchmark suites once per instruction-set level, each level in a process of its own.

    python bench/run_isa_levels.py [--levels all|LEVEL,LEVEL...] [pytest arguments...]

runs ``python -m pytest -c bench/pytest.ini <pytest arguments>`` with the caps of each level set in the
environment (vgkernels.cpu.isa_environment: VGK_CPU_ISA, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS,
ATEN_CPU_CAPABILITY). "all" (the default) is the CPU's own level and, below AVX-512, AVX2. Each level
records its own results file (bench/results/<suite>_cpu-<N>threads-<level>.json), which names the CPU
and the caps in force.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vgkernels.benchmark import isa_levels_to_compare, run_at_isa_levels

BENCH = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="all",
                        help="'all', or a comma-separated list of native, avx512, avx2, baseline")
    args, pytest_args = parser.parse_known_args(argv)
    levels = isa_levels_to_compare() if args.levels == "all" else args.levels.split(",")
    command = [sys.executable, "-m", "pytest", "-c", str(BENCH / "pytest.ini"), *pytest_args]
    return run_at_isa_levels(command, levels)


if __name__ == "__main__":
    sys.exit(main())
