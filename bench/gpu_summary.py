"""summary.md of bench/gpu_check.sh: one verdict per GPU target, then the launch strategies.

    python bench/gpu_summary.py OUT_DIR TESTS_STATUS [GPU_NAME]

Reads the results the GPU benchmarks recorded under bench/results/ for this GPU (``*_<gpu>.json``),
copies them to OUT_DIR and writes OUT_DIR/summary.md. GPU_NAME defaults to torch's name of the
current CUDA device; the tests give one, so that this runs on a machine without a GPU too. With
``VGK_CHECK_SINCE`` (seconds since the epoch: when the check started), a results file written before
then is a committed one from an earlier run: it gives no verdict, and the summary names it as not
measured in this run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import perf_model  # noqa: E402

# The acceptance case is judged in every precision the benchmark runs, with the model's estimate beside.
ACCEPTANCE = perf_model.BENCH_PRECISIONS
LOOPS = ("vgkernels_persistent", "vgkernels_step_nograph", "vgkernels")
# The measured value a "target ..." key of a recorded row is judged on, where it is not named alike.
MEASURED_BY = {"target fraction": "vgkernels fraction of copy bandwidth"}


def _acceptance(rows: list[dict]) -> list[str]:
    lines, seen = [], set()
    for row in rows:
        if (row.get("mode"), row.get("B"), row.get("H")) != ("lstm", 64, 512):
            continue
        seen.add(row["dtype"])
        ours, cudnn = row.get("vgkernels median ms"), row.get("cudnn median ms")
        eager = row.get("eager_cell_loop median ms")
        case = f"LSTM T=100 B=64 H=512 {row['dtype']}"
        estimate = ""
        if row["dtype"] in ACCEPTANCE:
            precision, matmul_tf32 = ACCEPTANCE[row["dtype"]]
            c = perf_model.Case("lstm", 64, 512, precision=precision)
            o, d = perf_model.ours(c, matmul_tf32=matmul_tf32)["total"], perf_model.cudnn(c)["total"]
            estimate = f"; the model estimated {o / d:.2f} ({o * 1e3:.2f} ms against {d * 1e3:.2f} ms)"
        if ours and cudnn:
            verdict = "met" if ours <= 1.25 * cudnn else "NOT met"
            lines.append(f"- {case}: tracked vgkernels / cuDNN = {ours / cudnn:.3f} ({ours:.3f} ms against "
                         f"{cudnn:.3f} ms; goal <= 1.25: {verdict}){estimate}")
        if ours and eager:
            verdict = "met" if eager >= 5 * ours else "NOT met"
            lines.append(f"- {case}: eager tracked cell loop / vgkernels = {eager / ours:.2f} "
                         f"(goal >= 5: {verdict})")
    lines += [f"- LSTM T=100 B=64 H=512 {name}: not measured (see bench_recurrent.log)"
              for name in ACCEPTANCE if name not in seen]
    return lines


def _strategies(rows: list[dict]) -> list[str]:
    lines = ["| case | plan | persistent ms | step, no graph ms | step from CUDA graphs (default) ms | "
             "fastest |", "|---|---|---|---|---|---|"]
    for row in rows:
        times = {name: row.get(f"{name} median ms") for name in LOOPS}
        known = {k: v for k, v in times.items() if v}
        best = min(known, key=known.get) if known else "-"
        cells = " | ".join(f"{times[name]:.3f}" if times[name] else "-" for name in LOOPS)
        plan = f"{row.get('auto_loop', '-')} {row.get('plan', '')}"
        lines.append(f"| {row['case']} | {plan} | {cells} | {best} |")
    return lines


def _other_targets(results: Path, tag: str, recurrent: Path, since: float | None) -> list[str]:
    targets = []
    for path in sorted(results.glob(f"*_{tag}.json")):
        if path == recurrent:
            continue
        if not _this_run(path, since):
            targets.append(f"- {path.stem}: not measured in this run (the file is an earlier run's)")
            continue
        for row in json.loads(path.read_text())["results"]:
            for key, goal in row.items():
                if key.startswith("target "):
                    name = MEASURED_BY.get(key, key.removeprefix("target "))
                    targets.append(f"- {path.stem}: {row['case']}: {name} = {row.get(name, 'not recorded')} "
                                   f"(goal {goal})")
    return targets


def _this_run(path: Path, since: float | None) -> bool:
    return since is None or path.stat().st_mtime >= since


def summarize(out: Path, tests_status: str, gpu: str, results: Path = HERE / "results",
              since: float | None = None) -> str:
    """Writes out/summary.md (and copies this GPU's results recorded since ``since`` to out); returns its
    text. ``since``: when the check started (seconds since the epoch), None to take every file as this
    run's."""
    tag = gpu.replace(" ", "_")
    for path in sorted(results.glob(f"*_{tag}.*")):
        if _this_run(path, since):
            shutil.copy(path, out / path.name)
    recurrent = results / f"recurrent_gpu_{tag}.json"
    verdicts = [f"- GPU tests (pytest -m gpu): {tests_status}"]
    tables: list[str] = []
    if recurrent.exists() and not _this_run(recurrent, since):
        verdicts.append("- recurrent benchmarks: not measured in this run (the results file is an earlier "
                        "run's; see bench_recurrent.log)")
    elif recurrent.exists():
        rows = json.loads(recurrent.read_text())["results"]
        verdicts += _acceptance(rows)
        tables += ["", "## Launch strategy: fastest per case", ""] + _strategies(rows)
        table = recurrent.with_suffix(".md")
        if table.exists():
            tables += ["", "## All candidates", "", table.read_text()]
    else:
        verdicts.append("- recurrent benchmarks: no results were recorded (see bench_recurrent.log)")
    verdicts += _other_targets(results, tag, recurrent, since)
    text = "\n".join([f"# GPU check on {gpu}", "", "## Verdicts", "", *verdicts, *tables]) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print(__doc__)
        return 2
    if len(argv) == 4:
        gpu = argv[3]
    else:
        import torch

        gpu = torch.cuda.get_device_name()
    since = os.environ.get("VGK_CHECK_SINCE")
    text = summarize(Path(argv[1]), argv[2], gpu, since=float(since) if since else None)
    print("\n".join(text.splitlines()[:16]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
