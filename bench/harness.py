"""Recording of benchmark results under bench/results/; the timing itself is vgkernels.benchmark's
(candidates interleaved in one process, ratio of medians)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vgkernels.benchmark import Comparison, interleaved, machine, saved_bytes  # noqa: F401  (re-exported)

RESULTS_DIR = Path(__file__).resolve().parent / "results"

def device_tag() -> str:
    """File-name tag: the GPU's name when there is one, else ``cpu-<N>threads``."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "_")
    return f"cpu-{torch.get_num_threads()}threads"


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
    where = m.get("gpu") or f"{m['cpu']}, {m['torch_threads']} threads"
    malloc = f"; {m['malloc']}" if m.get("malloc", "default") != "default" else ""
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
