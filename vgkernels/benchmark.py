"""Side-by-side timing of vgkernels against what users would otherwise run.

Candidates run interleaved (A, B, A, B, ...) in one process, so drift of the machine hits all of them
alike, and the result is the ratio of medians. ``python -m vgkernels bench`` prints the recurrent
table; the pytest-benchmark suites under ``bench/`` use the same functions and record the results.
Every result names the CPU and the instruction-set level it ran at (``machine()``);
``run_at_isa_levels`` runs a command once per level, each in a process of its own.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import platform
import statistics
import subprocess
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


# A plain process leaves glibc's mmap and trim thresholds adaptive, and that is how the results are
# measured. pin_glibc_malloc() is an explicit option (``--pin-malloc``, VGK_BENCH_PIN_MALLOC=1) for a
# second question: how the kernels compare once the allocator no longer matters. glibc gives freed
# blocks above its mmap threshold back to the kernel and trims the top of its heap, so a later call of
# the same size faults its pages in again: a 16 MB LayerNorm baseline swung between 3.2 and 14 ms with
# the process's allocation history, and torch.nn.LSTM (T=100, B=32, H=256) faulted about 32 MB of fresh
# heap in on every call (65 ms against 53 ms) until its heap had grown once. Pinned, with a heap
# faulted in up front, the baselines run at their best; machine() reports the setting with every result.
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value
TRIM_THRESHOLD = 1 << 30
PREFAULTED_HEAP = 256 << 20
PIN_MALLOC_ENV = "VGK_BENCH_PIN_MALLOC"
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
    """What the numbers were measured on: the CPU, the instruction-set level, versions, threads, malloc."""
    from vgkernels.cpu import cpu_info

    cpu = cpu_info()
    info: dict[str, object] = {
        "cpu": cpu["cpu"],
        "isa": cpu.get("isa", "unknown (no compiled extension)"),
        "native_isa": cpu.get("native_isa", "unknown"),
        "isa_caps": {k: cpu[k] for k in ("VGK_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                                         "ATEN_CPU_CAPABILITY") if cpu[k] is not None},
        "aten_capability": cpu["aten_capability"],
        "gemm_forced": cpu.get("gemm_forced"),
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


def run_benchmarks(quick: bool = False, pin_malloc: bool = False) -> list[Comparison]:
    """Print the recurrent table: vgkernels vs torch.nn, forward+backward, on this machine.

    A plain process unless ``pin_malloc`` (then glibc's allocator is pinned first: see
    pin_glibc_malloc, and the printed machine says so).
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if pin_malloc:
        pin_glibc_malloc()
    T, B, size, rounds = (20, 8, 64, 5) if quick else (100, 32, 256, 15)
    info = machine()
    print(f"cpu: {info['cpu']}, instruction set {info['isa']} (the CPU's: {info['native_isa']}), "
          f"{info['torch_threads']} threads, malloc {info['malloc']}")
    print(f"machine: {info}")
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
        tracked = comparison.median("vgkernels tracked")
        print(f"  {cell:<5} tracked / untracked            x{tracked / comparison.median('vgkernels'):.3f}")
        if cell == "lstm":
            loop = comparison.median("LSTMCell loop + retain_grad")
            print(f"  {cell:<5} cell loop / tracked            x{loop / tracked:.3f}")
    return results


def run_at_isa_levels(command: list[str], levels: list[str]) -> int:
    """Run ``command`` once per instruction-set level, each in a new process with that level's caps.

    ``levels`` holds "native", "avx512", "avx2" or "baseline" (see vgkernels.cpu.isa_environment); an
    argument "{level}" in ``command`` is replaced by the level. Returns the first non-zero exit status,
    or 0.
    """
    from vgkernels.cpu import subprocess_environment

    status = 0
    for level in levels:
        args = [level if part == "{level}" else part for part in command]
        print(f"==> instruction-set level {level}: {' '.join(args)}", flush=True)
        code = subprocess.run(args, env=subprocess_environment(level)).returncode
        status = status or code
    return status


def isa_levels_to_compare() -> list[str]:
    """The levels the benchmarks compare on this CPU: its own, and AVX2 below AVX-512."""
    from vgkernels.cpu import available_isa_levels

    return ["native", *[level for level in available_isa_levels()[1:] if level == "avx2"]]


# ---------------------------------------------------------------------------------------------------
# Memory under changing shapes.


def resident_mib() -> float:
    """The resident set size of this process now, in MiB (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def recurrent_rss(impl: str, iterations: int, size: int, max_t: int = 200, max_b: int = 64, seed: int = 0,
                  threads: int = 2) -> dict[str, object]:
    """Memory of a training loop with changing shapes, in this process (run it in a fresh one).

    ``iterations`` forward+backward steps of a one-layer LSTM (input = hidden = ``size``; ``impl`` is
    "vgkernels" or "torch.nn") on float32 input with T and B drawn uniformly from [1, max_t] and
    [1, max_b] (the same draws for both, from ``seed``); loss = sum of the output. Returns the peak RSS
    of the process (getrusage), the RSS at the end, after every tenth of the loop, and after
    ``vgkernels.empty_cache()``, in MiB.
    """
    import random
    import resource

    import vgkernels as vgk

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = {"vgkernels": vgk.nn.LSTM, "torch.nn": torch.nn.LSTM}[impl](size, size)
    draws = random.Random(seed)
    marks = []
    for i in range(iterations):
        T, B = draws.randint(1, max_t), draws.randint(1, max_b)
        out, _ = model(torch.randn(T, B, size))
        out.sum().backward()
        for p in model.parameters():
            p.grad = None
        if (i + 1) % max(1, iterations // 10) == 0:
            marks.append(round(resident_mib(), 1))
    final = resident_mib()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    vgk.empty_cache()
    return {"impl": impl, "peak_mib": round(peak, 1), "final_mib": round(final, 1), "marks_mib": marks,
            "after_empty_cache_mib": round(resident_mib(), 1)}


def recurrent_rss_in_subprocess(impl: str, iterations: int, size: int, level: str | None = None,
                                **kwargs: object) -> dict[str, object]:
    """recurrent_rss in a new Python process; its result, plus its machine().

    The process runs at instruction-set ``level``, or with this process's environment when None.
    """
    import json
    import sys

    from vgkernels.cpu import subprocess_environment

    args = ", ".join([repr(impl), str(iterations), str(size), *(f"{k}={v!r}" for k, v in kwargs.items())])
    script = ("import json\nfrom vgkernels.benchmark import machine, recurrent_rss\n"
              f"result = recurrent_rss({args})\nprint(json.dumps({{**result, 'machine': machine()}}))\n")
    env = None if level is None else subprocess_environment(level)
    out = subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])
