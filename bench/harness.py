"""Side-by-side timing: candidates run interleaved in one process, and the ratio of medians is reported.

Interleaving (A, B, A, B, ...) spreads any drift of the machine (frequency, another process) over
every candidate alike, which separate timing loops do not.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Comparison:
    """Timings of several candidates on one case; ``times[name]`` holds seconds per round."""

    case: str
    baseline: str
    times: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, name: str) -> float:
        """Median time of ``name`` over the baseline's median time (below 1 is faster)."""
        return self.median(name) / self.median(self.baseline)

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {"case": self.case, "baseline": self.baseline, **self.extra}
        for name in self.times:
            out[f"{name} median ms"] = round(self.median(name) * 1e3, 4)
            out[f"{name} / {self.baseline}"] = round(self.ratio(name), 4)
        return out


def interleaved(
    case: str,
    candidates: dict[str, Callable[[], object]],
    baseline: str,
    rounds: int = 20,
    warmup: int = 3,
    device: str = "cpu",
) -> Comparison:
    """Time every candidate ``rounds`` times, alternating between them each round."""
    if baseline not in candidates:
        raise ValueError(f"baseline {baseline!r} is not among the candidates {list(candidates)}")
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    result = Comparison(case=case, baseline=baseline, times={name: [] for name in candidates})
    for _ in range(rounds):
        for name, fn in candidates.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            result.times[name].append(time.perf_counter() - start)
    return result


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, object] = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def device_tag() -> str:
    """File-name tag: the GPU's name when there is one, else ``cpu-<N>threads``."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "_")
    return f"cpu-{torch.get_num_threads()}threads"


def record(suite: str, comparisons: list[Comparison]) -> Path:
    """Write ``bench/results/<suite>_<device>.json`` and a markdown table beside it."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / f"{suite}_{device_tag()}"
    payload = {"machine": machine(), "results": [c.summary() for c in comparisons]}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown_table(payload) + "\n")
    return stem.with_suffix(".json")


def markdown_table(payload: dict) -> str:
    m = payload["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['torch_threads']} threads"
    lines = [f"Measured on {where}; torch {m['torch']}; {m['date']}.", ""]
    lines += ["| case | candidate | median ms | ratio to baseline |", "|---|---|---|---|"]
    for row in payload["results"]:
        base = row["baseline"]
        for key, value in row.items():
            if key.endswith(" median ms"):
                name = key[: -len(" median ms")]
                lines.append(f"| {row['case']} | {name} | {value:.3f} | {row[f'{name} / {base}']:.3f} |")
    return "\n".join(lines)
