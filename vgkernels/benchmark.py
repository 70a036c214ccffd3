"""Side-by-side timing of vgkernels against what users would otherwise run.

Candidates run interleaved (A, B, A, B, ...) in one process, so drift of the machine hits all of them
alike, and the result is the ratio of medians. ``python -m vgkernels bench`` prints the recurrent
table; the pytest-benchmark suites under ``bench/`` use the same functions and record the results.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


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
    setup: Callable[[], object] | None = None,
) -> Comparison:
    """Time every candidate ``rounds`` times, alternating between them each round.

    ``setup``, when given, runs untimed before every timed call (for example to evict the caches).
    """
    if baseline not in candidates:
        raise ValueError(f"baseline {baseline!r} is not among the candidates {list(candidates)}")
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    result = Comparison(case=case, baseline=baseline, times={name: [] for name in candidates})
    for _ in range(rounds):
        for name, fn in candidates.items():
            if setup is not None:
                setup()
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            result.times[name].append(time.perf_counter() - start)
    return result


# glibc gives freed blocks above its (adaptive) mmap threshold back to the kernel and trims the top of
# its heap, so a later call of the same size faults its pages in again: a 16 MB LayerNorm baseline
# swung between 3.2 and 14 ms with the process's allocation history. Pinning both thresholds takes
# that lottery out of the baselines (they run at their best); machine() reports it. With the
# thresholds pinned, torch.nn.LSTM (T=100, B=32, H=256) still faulted about 32 MB of fresh heap in
# on every call (8000 faults, 65 ms against 53 ms) until the heap had grown once; a heap faulted in
# up front, which a long training process has anyway, takes that out too.
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value
TRIM_THRESHOLD = 1 << 30
PREFAULTED_HEAP = 256 << 20
_malloc_settings = "default"


def _prefault_heap(libc: ctypes.CDLL, total: int) -> None:
    """Grow the main heap by ``total`` bytes of touched pages, then free them (they stay: trim is off)."""
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    chunk = MMAP_THRESHOLD - (1 << 20)  # below the threshold, so malloc takes it from the heap
    blocks = [libc.malloc(chunk) for _ in range(total // chunk)]
    for block in blocks:
        if block:
            ctypes.memset(block, 0, chunk)
    for block in blocks:
        libc.free(block)


def pin_glibc_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds for this process and fault a heap of 256 MiB in.

    Returns False where that is not possible (not glibc). A second call changes nothing.
    """
    global _malloc_settings
    if _malloc_settings != "default":
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
        settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        if any(libc.mallopt(option, value) != 1 for option, value in settings):
            return False
        _prefault_heap(libc, PREFAULTED_HEAP)
    except (OSError, AttributeError):
        return False
    _malloc_settings = (
        f"glibc mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB, "
        f"heap of {PREFAULTED_HEAP >> 20} MiB faulted in"
    )
    return True


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
        "malloc": _malloc_settings,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def saved_bytes(fn: Callable[[], object], exclude: list[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs.

    Storages shared with ``exclude`` (parameters, the input: they exist anyway) are not counted.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------------
# Recurrent cases.


def recurrent_candidates(
    cell: str, T: int, B: int, size: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
    backend: str | None = None,
) -> dict[str, Callable[[], object]]:
    """Forward+backward closures of one layer: vgkernels (tracking off and on) and torch.nn.

    ``cell`` is "lstm" or "gru"; input = hidden = ``size``; the loss is the sum of the output.
    """
    import vgkernels as vgk

    ours_cls, theirs_cls = {"lstm": (vgk.nn.LSTM, torch.nn.LSTM), "gru": (vgk.nn.GRU, torch.nn.GRU)}[cell]
    ours = ours_cls(size, size, backend=backend, device=device, dtype=dtype)
    tracked = ours_cls(size, size, backend=backend, device=device, dtype=dtype, track=True)
    theirs = theirs_cls(size, size, device=device, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    tracked.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, size, device=device, dtype=dtype, requires_grad=True)

    return {
        "vgkernels": training_step(ours, x),
        "vgkernels tracked": training_step(tracked, x, read_trace=True),
        f"torch.nn.{cell.upper()}": training_step(theirs, x),
    }


def training_step(model: torch.nn.Module, x: torch.Tensor, read_trace: bool = False) -> Callable[[], None]:
    """A closure running forward and backward of a recurrent ``model`` on ``x`` with loss = out.sum().

    With ``read_trace`` it also materialises the BPTT trace, as a user reading it would.
    """

    def run() -> None:
        for p in model.parameters():
            p.grad = None
        x.grad = None
        out, _ = model(x)
        out.sum().backward()
        if read_trace:
            model.trace.grad_norm_per_sample  # noqa: B018

    return run


def lstm_cell_loop_candidate(T: int, B: int, size: int, device: str = "cpu") -> Callable[[], object]:
    """The eager way to see per-step gradients today: an LSTMCell loop with retain_grad."""
    cell = torch.nn.LSTMCell(size, size, device=device)
    x = torch.randn(T, B, size, device=device, requires_grad=True)

    def run() -> None:
        for p in cell.parameters():
            p.grad = None
        h = c = torch.zeros(B, size, device=device)
        hs, cs = [], []
        for t in range(T):
            h, c = cell(x[t], (h, c))
            h.retain_grad()
            c.retain_grad()
            hs.append(h)
            cs.append(c)
        torch.stack(hs).sum().backward()
        torch.stack([h.grad.pow(2).sum(-1) for h in hs]).sqrt()
        torch.stack([c.grad.pow(2).sum(-1) for c in cs]).sqrt()

    return run


def run_benchmarks(quick: bool = False) -> list[Comparison]:
    """Print the recurrent table: vgkernels vs torch.nn, forward+backward, on this machine."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pin_glibc_malloc()
    T, B, size, rounds = (20, 8, 64, 5) if quick else (100, 32, 256, 15)
    print(f"machine: {machine()}")
    print(f"forward+backward, T={T}, B={B}, input=hidden={size}, fp32, {device}")
    results = []
    for cell in ("lstm", "gru"):
        candidates = recurrent_candidates(cell, T, B, size, device=device)
        if cell == "lstm":
            candidates["LSTMCell loop + retain_grad"] = lstm_cell_loop_candidate(T, B, size, device=device)
        comparison = interleaved(f"{cell} T={T} B={B} H={size}", candidates, f"torch.nn.{cell.upper()}",
                                 rounds=rounds, device=device)
        results.append(comparison)
        for name in candidates:
            print(f"  {cell:<5} {name:<30} {comparison.median(name) * 1e3:9.2f} ms   "
                  f"x{comparison.ratio(name):.3f} of torch.nn")
    return results
