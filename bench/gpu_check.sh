#!/usr/bin/env bash
# One prepared check for a CUDA machine (torch, triton, nvcc, cmake, ninja, pytest, pytest-benchmark;
# no network needed). In under 8 minutes it builds the package, runs the GPU tests, runs the GPU
# benchmarks, and writes everything into one folder:
#
#   bash bench/gpu_check.sh OUT_DIR        (or: OUT=OUT_DIR bash bench/gpu_check.sh)
#
# OUT_DIR receives env.txt, build.log, gpu_tests.log (+ .xml), profile.txt (device against wall time of
# the recurrent and LayerNorm calls, bench/gpu_profile.py), bench_recurrent.log, bench_other.log,
# the recorded results (recurrent_gpu_<gpu>.json / .md, copied from bench/results/), the
# pytest-benchmark JSON files and summary.md: one verdict per GPU target (the GPU tests; the LSTM
# against cuDNN in fp32 with TF32, bf16 and IEEE fp32, beside bench/perf_model.py's estimate; the eager
# cell loop; every other recorded case that states a target), then the launch strategies. Every phase has a time box; a benchmark cut short by its box still records the
# cases it finished. The exit status is non-zero if the build or a GPU test
# failed.
set -u -o pipefail

BUDGET_S=${VGK_CHECK_BUDGET_S:-465}   # the whole run stays under 8 minutes
PY=${PYTHON:-python}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${1:-${OUT:-}}

fail() { echo "gpu_check.sh: $*" >&2; exit 2; }

[ -n "$OUT_DIR" ] || fail "give the output folder as the first argument or in \$OUT"

# A CUDA device first, before anything is built or written.
if ! "$PY" - <<'EOF'
import sys
try:
    import torch
except ImportError as error:
    sys.exit(f"torch cannot be imported: {error}")
if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
    sys.exit(f"no CUDA device: torch {torch.__version__} reports torch.cuda.is_available() = "
             f"{torch.cuda.is_available()} (CUDA build: {torch.version.cuda})")
EOF
then
    fail "no CUDA device found; this check needs a GPU (nothing was built or run)"
fi

mkdir -p "$OUT_DIR" || fail "cannot create $OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$ROOT"
START=$SECONDS
# Results files older than this are earlier runs' (committed): the summary gives them no verdict.
export VGK_CHECK_SINCE=$(date +%s)
left() { echo $(( BUDGET_S - (SECONDS - START) )); }
status=0

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
    "$PY" -c "import torch, triton, platform; print('python', platform.python_version()); \
print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); \
print('gpu', torch.cuda.get_device_name())"
    command -v nvcc >/dev/null && nvcc --version | tail -1
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

echo "== build ($(left) s left)"
if ! timeout -k 10 150 "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT_DIR/build.log" 2>&1; then
    echo "build FAILED (see build.log)"; tail -20 "$OUT_DIR/build.log"
    exit 1
fi

echo "== GPU tests ($(left) s left)"
tests_box=$(( $(left) - 200 ))
tests_status="passed"
[ "$tests_box" -gt 240 ] && tests_box=240
[ "$tests_box" -lt 120 ] && tests_box=120   # 110 tests take 80 s on 8 workers (H200, 16 cores)
# Workers compile the Triton kernels in parallel where pytest-xdist is there; a hung test is cut alone.
parallel=()
"$PY" -c "import xdist" 2>/dev/null && parallel+=(-n 8)
"$PY" -c "import pytest_timeout" 2>/dev/null && parallel+=(--timeout 150)
VGK_TEST_CUDA=1 timeout -s INT -k 20 "$tests_box" "$PY" -m pytest -m gpu tests/ -q -p no:cacheprovider "${parallel[@]}" \
    --junitxml="$OUT_DIR/gpu_tests.xml" > "$OUT_DIR/gpu_tests.log" 2>&1
rc=$?
tail -5 "$OUT_DIR/gpu_tests.log"
if [ $rc -ne 0 ]; then
    echo "GPU tests FAILED or timed out (exit $rc; see gpu_tests.log)"; status=1
    tests_status="FAILED or timed out (exit $rc)"
fi

echo "== profile: device against wall time ($(left) s left)"
timeout -s INT -k 10 60 "$PY" bench/gpu_profile.py "$OUT_DIR/profile.txt" > "$OUT_DIR/profile.log" 2>&1
echo "profile exit $? (see profile.txt)"

echo "== recurrent benchmarks ($(left) s left)"
# The recurrent grid never finishes in the box (its B = 64, H = 512 cases run first); the other
# benchmarks keep OTHER_S of it.
OTHER_S=${VGK_CHECK_OTHER_S:-100}
bench_box=$(( $(left) - OTHER_S - 10 ))
[ "$bench_box" -lt 30 ] && bench_box=30
timeout -s INT -k 20 "$bench_box" "$PY" -m pytest -c bench/pytest.ini bench/bench_recurrent_gpu.py -m gpu -q \
    --benchmark-json="$OUT_DIR/pytest_benchmark_recurrent.json" > "$OUT_DIR/bench_recurrent.log" 2>&1
echo "recurrent benchmarks exit $? (a time box cut is exit 2 or 124; finished cases are recorded)"

other=$(ls bench/bench_*.py 2>/dev/null | grep -v bench_recurrent_gpu.py || true)
if [ -n "$other" ] && [ "$(left)" -gt 45 ]; then
    echo "== other GPU benchmarks ($(left) s left)"
    # shellcheck disable=SC2086
    timeout -s INT -k 10 $(( $(left) - 15 )) "$PY" -m pytest -c bench/pytest.ini $other -m gpu -q \
        --benchmark-json="$OUT_DIR/pytest_benchmark_other.json" > "$OUT_DIR/bench_other.log" 2>&1
    echo "other benchmarks exit $?"
fi

"$PY" bench/gpu_summary.py "$OUT_DIR" "$tests_status"

echo "== done in $(( SECONDS - START )) s; everything is in $OUT_DIR"
exit $status
