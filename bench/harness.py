"""Recording of benchmark results under bench/results/; the timing itself is vgkernels.benchmark's
(candidates interleaved in one process, ratio of medians)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from vgkernels.benchmark import Comparison, interleaved, machine, saved_bytes  # noqa: F401  (re-exported)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cache_evictor(min_mb: int = 128):
    """A callable that reads a buffer of 4x the last-level cache (at least ``min_mb`` MB).

    As the untimed ``setup`` of ``interleaved``, every candidate starts from caches that hold none of
    its data, and the dirty lines a previous candidate left behind are written back before the clock
    starts, not charged to the next one.
    """
    try:
        llc = os.sysconf("SC_LEVEL3_CACHE_SIZE")
    except (ValueError, OSError):
        llc = 0
    buffer = torch.ones(max(4 * max(llc, 0), min_mb << 20) // 4)
    return lambda: buffer.sum()


# Independent FMA chains per thread: enough to cover the FMA latency on both pipes of current cores.
_FMA_PEAK_SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#ifdef __AVX512F__
typedef __m512 vec;
#define FMA _mm512_fmadd_ps
#define SET _mm512_set1_ps
#define LANES 16
#else
typedef __m256 vec;
#define FMA _mm256_fmadd_ps
#define SET _mm256_set1_ps
#define LANES 8
#endif
#define CHAINS 12
static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}
int main(int argc, char** argv) {
  const long iters = 50000000L;
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    float sink = 0;
    double t0 = now();
#pragma omp parallel reduction(+ : sink)
    {
      vec acc[CHAINS];
      const vec a = SET(1.0000001f), b = SET(1e-7f);
      for (int i = 0; i < CHAINS; ++i) acc[i] = SET((float)i);
      for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 12
        for (int i = 0; i < CHAINS; ++i) acc[i] = FMA(acc[i], a, b);  /* the chains stay in registers */
      }
      float lanes[LANES];
      for (int i = 0; i < CHAINS; ++i) {
        memcpy(lanes, &acc[i], sizeof(vec));
        sink += lanes[0];
      }
    }
    double flops = 2.0 * LANES * CHAINS * iters * omp_get_max_threads();
    double gflops = flops / (now() - t0) / 1e9;
    if (gflops > best) best = gflops;
    if (sink == 12345.f) printf("#");  /* keeps the chains live */
  }
  printf("%.1f\n", best);
  return 0;
}
"""


def fma_peak_gflops(threads: int | None = None) -> float | None:
    """The fp32 FMA throughput of this CPU on ``threads`` threads (default: torch's), in GFLOP/s.

    Measured by a small C program that runs independent FMA chains on every thread: the ceiling no fp32
    GEMM exceeds. It is compiled here with ``cc`` for the instruction-set level the kernels run at
    (AVX-512 vectors at the CPU's own level where it has them, AVX2 ones at a lowered level); None at
    the baseline level, which has no FMA.
    """
    from vgkernels.cpu import cpu_info

    flags = {"avx512": ["-march=native"], "avx2": ["-mavx2", "-mfma"]}.get(str(cpu_info().get("isa")))
    if flags is None:
        return None
    threads = threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp) / "fma_peak.c", Path(tmp) / "fma_peak"
        source.write_text(_FMA_PEAK_SOURCE)
        subprocess.run(["cc", "-O3", *flags, "-fopenmp", str(source), "-o", str(binary)], check=True,
                       capture_output=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run([str(binary)], check=True, capture_output=True, text=True, env=env).stdout
    return float(out.strip().lstrip("#"))


def device_tag() -> str:
    """File-name tag: the GPU's name when there is one, else ``cpu-<N>threads-<instruction set>``, with
    ``-pinned-malloc`` when glibc's allocator was pinned (so such runs never replace plain ones)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "_")
    info = machine()
    pinned = "-pinned-malloc" if info["malloc"] != "default" else ""
    return f"cpu-{torch.get_num_threads()}threads-{info['isa']}{pinned}"


def record(suite: str, results: list[Comparison | dict]) -> Path:
    """Write ``bench/results/<suite>_<device>.json`` and a markdown table beside it.

    ``results`` holds timing comparisons, or plain dicts for measurements that are not times (they
    need a "case" key).
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / f"{suite}_{device_tag()}"
    rows = [r.summary() if isinstance(r, Comparison) else r for r in results]
    payload = {"machine": machine(), "results": rows}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown_table(payload) + "\n")
    return stem.with_suffix(".json")


def markdown_table(payload: dict) -> str:
    """Ratios to the baseline; absolute medians only from a GPU (CPU times depend on the machine's load)."""
    m = payload["machine"]
    on_gpu = "gpu" in m
    where = m.get("gpu") or f"{m['cpu']}, instruction set {m.get('isa', '?')}, {m['torch_threads']} threads"
    pinned = m.get("malloc", "default") != "default"
    malloc = f"; allocator pinned: {m['malloc']}" if pinned else "; a plain process (allocator untuned)"
    lines = [f"Measured on {where}; torch {m['torch']}; {m['date']}{malloc}.", ""]
    lines += ["| case | candidate | " + ("median ms | " if on_gpu else "") + "ratio to baseline |",
              "|---|---|" + ("---|" if on_gpu else "") + "---|"]
    notes = []
    for row in payload["results"]:
        if "baseline" not in row:
            notes.append(row)
            continue
        base = row["baseline"]
        extra = {}
        for key, value in row.items():
            if key.endswith(" median ms"):
                name = key[: -len(" median ms")]
                ms = f"{value:.3f} | " if on_gpu else ""
                lines.append(f"| {row['case']} | {name} | {ms}{row[f'{name} / {base}']:.3f} |")
            elif key not in ("case", "baseline") and not key.endswith(f" / {base}"):
                extra[key] = value
        if extra:
            notes.append({"case": row["case"], **extra})
    for row in notes:
        lines += ["", f"**{row['case']}**: " + ", ".join(f"{k} = {v}" for k, v in row.items() if k != "case")]
    return "\n".join(lines)
