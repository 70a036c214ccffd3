"""Ahead-of-time compile check: every Triton launch the package makes, compiled for sm_80 and sm_90.

No GPU is needed. The package's own launchers run on ``meta`` tensors under
:func:`vgkernels.triton._host.capture`, which records each launch (kernel, grid, arguments) instead
of running it and makes the launch plans for an H200 (132 SMs). Each distinct launch (the same
specialisation triton's runtime would compile: argument types, divisibility, constexprs, options) is
then compiled with ``triton.compile`` for each target, with the ptxas the triton wheel bundles, and
the cubin's resource usage is read with the bundled ``cuobjdump``: registers, spill (local) memory
and static shared memory; dynamic shared memory, warps and stages come from triton's metadata.

``python -m vgkernels aot-check`` runs it (``--table full`` for the whole table of
bench/results/aot_*.md, ``--table ci`` for the subset CI runs, ``--out DIR`` to write the table);
it exits non-zero if any launch fails to compile or spills. Run it without ``TRITON_INTERPRET``: the
interpreter replaces the kernels that are compiled here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton

from vgkernels.triton import _host

TARGETS = {"sm_80": 80, "sm_90": 90}
H200 = _host.GPU("H200", 132)
MODES = ("lstm", "gru", "rnn_tanh", "rnn_relu", "rnn_sigmoid")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
LOOP_ENV = "VGK_RNN_TRITON_LOOP"
T = 100
# Per SM (sm_80 and sm_90): registers, shared memory a block may use, resident warps and blocks.
SM_LIMITS = {80: (65536, 163 * 1024, 64, 32), 90: (65536, 227 * 1024, 64, 32)}


@dataclasses.dataclass
class Config:
    """One call of the package's launchers, described for the table."""

    family: str
    name: str
    run: Callable[[], None]
    env: dict = dataclasses.field(default_factory=dict)
    tf32: bool = False
    auto: bool = True  # what the package picks by default (False: a forced loop kind)


# ---------------------------------------------------------------------------------------------------
# Configurations


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _recurrent(mode: str, B: int, H: int, dtype: torch.dtype, track: bool, layer_norm: bool,
               features: bool) -> Callable[[], None]:
    """Forward and backward of one layer-direction (input size H), as the recurrent op calls them: the
    input projection and its gradients, the layer's kernels."""
    from vgkernels.triton import gemm
    from vgkernels.triton import recurrent as tr
    from vgkernels.triton import recurrent_ln as trl

    G = tr.GATES[mode]
    lstm = mode == "lstm"
    lengths = torch.full((B,), T, dtype=torch.int64) if features else None
    clip = 1.0 if features else None

    def run():
        inputs, w_ih = _meta(T * B, H, dtype=dtype), _meta(G * H, H, dtype=dtype)
        x = gemm.mm(inputs, w_ih.t(), _meta(G * H, dtype=dtype)).reshape(T, B, G * H)
        gemm.mm(x.reshape(T * B, G * H), w_ih)
        gemm.mm(x.reshape(T * B, G * H).t(), inputs)
        h0 = _meta(B, H, dtype=dtype)
        c0 = _meta(B, H, dtype=dtype) if lstm else None
        w = _meta(G * H, H, dtype=dtype)
        b = _meta(G * H, dtype=dtype) if mode == "gru" else None
        if layer_norm:
            gam, beta = _meta(G * H, dtype=dtype), _meta(G * H, dtype=dtype)
            gc = _meta(H, dtype=dtype) if lstm else None
            bc = _meta(H, dtype=dtype) if lstm else None
            st, cs, ws, _ = trl._forward_impl(x, h0, c0, w, b, gam, beta, gc, bc, 1e-5, lengths, mode,
                                              features, track)
            trl._backward_impl(torch.empty_like(st), torch.empty_like(cs), st, cs, ws, w, gam, gc, lengths,
                               mode, features, clip, track, b is not None)
        else:
            st, cs, ws, _ = tr._forward_impl(x, h0, c0, w, b, lengths, mode, features, track)
            tr._backward_impl(torch.empty_like(st), torch.empty_like(cs), st, cs, ws, w, lengths, mode,
                              features, clip, track, b is not None)

    return run


def _recurrent_grid(table: str):
    """(mode, dtype name, track, (B, H) shapes) of the recurrent table."""
    shapes = list(itertools.product((16, 64, 256), (256, 512, 1024)))
    for mode, dtype_name, track in itertools.product(MODES, DTYPES, (True, False)):
        if table == "full":
            # The RNN's relu and sigmoid differ from its tanh in two lines of the element-wise code,
            # not in the plan: one shape for them, every shape for the tanh RNN.
            yield mode, dtype_name, track, [(64, 512)] if mode in ("rnn_relu", "rnn_sigmoid") else shapes
        elif (mode in ("lstm", "gru") and dtype_name != "fp16" and (track or dtype_name == "fp32")) or \
                (mode == "rnn_tanh" and dtype_name == "fp32"):
            # ci: every loop kind and cell at one shape, the corners of the table for the LSTM
            corners = mode == "lstm" and dtype_name == "fp32" and track
            yield mode, dtype_name, track, [(16, 256), (64, 512), (256, 1024)] if corners else [(64, 512)]


def recurrent_configs(table: str) -> list[Config]:
    """The recurrent table: T = 100; B x H x mode x dtype x tracking x loop kind x layer norm, and at
    B = 64, H = 512 also reverse direction, lengths and grad_clip together."""
    configs = []
    for mode, dtype_name, track, shapes in _recurrent_grid(table):
        dtype = DTYPES[dtype_name]
        for (B, H), loop in itertools.product(shapes, ("step", "persistent")):
            for layer_norm in (False, True) if mode in ("lstm", "gru") else (False,):
                with_features = (B, H) == (64, 512) and (table == "full" or dtype_name == "fp32")
                for features in (False, True) if with_features else (False,):
                    tag = " rev+len+clip" if features else ""
                    name = (f"{mode}{'-ln' if layer_norm else ''} B={B} H={H} {dtype_name} "
                            f"track={'on' if track else 'off'} loop={loop}{tag}")
                    configs.append(Config("recurrent-ln" if layer_norm else "recurrent", name,
                                          _recurrent(mode, B, H, dtype, track, layer_norm, features),
                                          {LOOP_ENV: loop}, auto=loop == "step"))
    # fp32 with TF32 dots, as torch's default for cuDNN's recurrent layers allows: the products around the
    # loop then run the Triton GEMM (torch's matmul switch is IEEE by default).
    shapes = list(itertools.product((16, 64, 256), (256, 512, 1024))) if table == "full" else [(64, 512)]
    for mode, layer_norm, (B, H) in itertools.product(("lstm", "gru"), (False, True), shapes):
        name = f"{mode}{'-ln' if layer_norm else ''} B={B} H={H} fp32-tf32 track=on loop=step"
        configs.append(Config("recurrent-ln" if layer_norm else "recurrent", name,
                              _recurrent(mode, B, H, torch.float32, True, layer_norm, False),
                              {LOOP_ENV: "step"}, tf32=True))
    return configs


def cell_configs(table: str) -> list[Config]:
    """The fused cells (one step, forward and backward with every gradient): mode x B x H x dtype x
    tracking, as vgk.nn.LSTMCell & co. call them."""
    from vgkernels.triton import cell as tc

    configs = []
    shapes = list(itertools.product((16, 64, 256), (256, 512, 1024)))
    for mode, dtype_name, track in itertools.product(MODES, DTYPES, (True, False)):
        if table == "ci":
            if dtype_name == "fp16" or (dtype_name != "fp32" and not track):
                continue
            grid = [(16, 256), (256, 1024)] if mode == "lstm" and dtype_name == "fp32" else [(64, 512)]
        else:
            grid = [(64, 512)] if mode in ("rnn_relu", "rnn_sigmoid") else shapes
        dtype = DTYPES[dtype_name]
        G = tc._GATES[mode]
        lstm = mode == "lstm"
        for B, H in grid:

            def run(B=B, H=H, dtype=dtype, G=G, lstm=lstm, mode=mode, track=track):
                x, hx = _meta(B, H, dtype=dtype), _meta(B, H, dtype=dtype)
                cx = _meta(B, H, dtype=dtype) if lstm else None
                w_ih, w_hh = _meta(G * H, H, dtype=dtype), _meta(G * H, H, dtype=dtype)
                b_ih, b_hh = _meta(G * H, dtype=dtype), _meta(G * H, dtype=dtype)
                h, c, ws, _ = tc._forward_impl(x, hx, cx, w_ih, w_hh, b_ih, b_hh, mode, track)
                grad_c = torch.empty_like(c) if lstm else c
                tc._backward_impl(torch.empty_like(h), grad_c, x, hx, cx, w_ih, w_hh, h, c, ws, mode, track,
                                  True, True, True, True)

            name = f"{mode} cell B={B} H={H} {dtype_name} track={'on' if track else 'off'}"
            configs.append(Config("cell", name, run))
    return configs


def layer_norm_configs(table: str) -> list[Config]:
    from vgkernels.triton import layer_norm as tln

    shapes = [(8192, 256), (8192, 1024), (8192, 4096), (8192, 8192), (8192, 16384)]
    dtypes = list(DTYPES)
    if table == "ci":
        shapes, dtypes = [(8192, 1024), (8192, 8192), (8192, 16384)], ["fp32", "bf16", "fp64"]
    configs = []
    for (M, N), dtype_name, clip in itertools.product(shapes, dtypes, (None, 1.0)):
        dtype = DTYPES[dtype_name]

        def run(M=M, N=N, dtype=dtype, clip=clip):
            x, w, b = _meta(M, N, dtype=dtype), _meta(N, dtype=dtype), _meta(N, dtype=dtype)
            y, mean, rstd = tln.forward_launch(x, w, b, 1, 1e-5)
            tln.backward_launch(torch.empty_like(y), x, mean, rstd, w, 1, clip, True, True)

        name = f"layer_norm ({M}, {N}) {dtype_name} clip={'on' if clip else 'off'}"
        configs.append(Config("layer_norm", name, run))
    return configs


def _gradient_sizes(n: int) -> list[int]:
    """n tensor sizes like a network's gradients: weights, biases and norms of several widths."""
    widths = (64, 256, 512, 1024, 4096)
    return [widths[i % 5] * (widths[(i // 5) % 5] if i % 3 else 1) for i in range(n)]


def clip_configs(table: str) -> list[Config]:
    from vgkernels.triton import clip_grad as tcg

    configs = []
    for dtype_name, norm_type in itertools.product(DTYPES, (2.0, 1.0, float("inf"), 3.0)):
        if table == "ci" and norm_type != 2.0 and (dtype_name != "fp32" or norm_type == 3.0):
            continue
        dtype = DTYPES[dtype_name]

        def run(dtype=dtype, norm_type=norm_type):
            grads = [_meta(n, dtype=dtype) for n in _gradient_sizes(1000)]
            norm = tcg.norm_launch(grads, norm_type)
            tcg.scale_launch(grads, torch.empty_like(norm, dtype=torch.float32))

        configs.append(Config("clip_grad", f"clip_grad_norm_ 1000 tensors {dtype_name} p={norm_type}", run))
    return configs


def monitor_configs(table: str) -> list[Config]:
    from vgkernels.ops.grad_stats import DEFAULT_BINS
    from vgkernels.triton import grad_stats as tgs

    configs = []
    for dtype_name, scaled in itertools.product(DTYPES, (False, True)):
        if table == "ci" and scaled != (dtype_name == "bf16"):
            continue
        dtype = DTYPES[dtype_name]

        def run(dtype=dtype, scaled=scaled):
            grads = [_meta(n, dtype=dtype) for n in _gradient_sizes(200)]
            scale = _meta(1) if scaled else None
            bins = DEFAULT_BINS
            tgs.grad_stats_launch(grads, scale, bins.log10_min, bins.log10_max, bins.bins)

        configs.append(Config("monitor", f"GradientMonitor.record 200 tensors {dtype_name} "
                              f"scaler={'on' if scaled else 'off'}", run))
    return configs


# One configuration per kernel and loop kind, for the test suite (about a minute to compile).
SMOKE = (
    "lstm B=16 H=256 fp32 track=on loop=step",
    "gru B=64 H=512 bf16 track=on loop=persistent",
    "lstm-ln B=64 H=512 fp32 track=on loop=persistent",
    "gru-ln B=64 H=512 fp32 track=on loop=persistent",
    "lstm-ln B=16 H=256 fp32 track=on loop=step",
    "gru-ln B=64 H=512 fp32-tf32 track=on loop=step",
    "lstm cell B=16 H=256 fp32 track=on",
    "gru cell B=64 H=512 bf16 track=on",
    "layer_norm (8192, 1024) fp32 clip=on",
    "layer_norm (8192, 16384) bf16 clip=off",
    "clip_grad_norm_ 1000 tensors fp32 p=2.0",
    "GradientMonitor.record 200 tensors bf16 scaler=on",
)


def configs(table: str = "full") -> list[Config]:
    """Every configuration of ``table``: "full", "ci" (a representative subset) or "smoke"."""
    if table not in ("full", "ci", "smoke"):
        raise ValueError(f"table: expected 'full', 'ci' or 'smoke', got {table!r}")
    base = "ci" if table == "smoke" else table
    every = (recurrent_configs(base) + cell_configs(base) + layer_norm_configs(base) + clip_configs(base)
             + monitor_configs(base))
    return [c for c in every if c.name in SMOKE] if table == "smoke" else every


# ---------------------------------------------------------------------------------------------------
# Capture and compile


@contextlib.contextmanager
def _environ(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def capture(config: Config, gpu: _host.GPU = H200) -> list[_host.Launch]:
    """The launches ``config`` makes on ``gpu``, recorded without running them."""
    gpu = dataclasses.replace(gpu, tf32=config.tf32)
    with _environ({**config.env, "VGK_RNN_TRITON_GRAPH": "0"}), _host.capture(gpu) as launches:
        config.run()
    # A step loop makes T launches that differ only in their step: keep one of each kind.
    distinct = {}
    for launch in launches:
        distinct.setdefault(_launch_class(launch), launch)
    return list(distinct.values())


def _arg_class(arg) -> tuple:
    """What triton's runtime specialises an argument on (a superset: equal classes, equal compiles)."""
    if isinstance(arg, torch.Tensor):
        return ("tensor", arg.dtype, arg.data_ptr() % 16 == 0)
    if isinstance(arg, bool) or arg is None or isinstance(arg, float | str):
        return (type(arg).__name__, arg if not isinstance(arg, float) else None)
    if isinstance(arg, int):
        return ("int", arg == 1, arg % 16 == 0, -2**31 <= arg < 2**31, 0 <= arg < 2**64)
    return (type(arg).__name__, repr(arg))


def _launch_class(launch: _host.Launch) -> tuple:
    return (launch.kernel, launch.grid, tuple(_arg_class(a) for a in launch.args),
            tuple(sorted((k, repr(v)) for k, v in launch.kwargs.items())))


def _binder(kernel, backend):
    # The specialisation triton's runtime computes at a launch (JITFunction.run), without a driver.
    from triton.runtime.jit import create_function_from_signature

    return create_function_from_signature(kernel.signature, kernel.params, backend)


@dataclasses.dataclass
class Specialised:
    """A launch reduced to what its compile depends on."""

    kernel: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict

    @property
    def key(self) -> str:
        return json.dumps([self.kernel.fn.__module__, self.kernel.__name__, self.signature,
                           sorted((str(k), str(v)) for k, v in self.constexprs.items()),
                           sorted((str(k), str(v)) for k, v in self.attrs.items()),
                           sorted((k, str(v)) for k, v in self.options.items())])


def specialise(launch: _host.Launch, cc: int) -> Specialised:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    kernel = launch.kernel
    if not hasattr(kernel, "params"):
        raise RuntimeError("aot: the kernels are interpreted (TRITON_INTERPRET is set); run the AOT check "
                           "in a process without it")
    backend = make_backend(GPUTarget("cuda", cc, 32))
    kwargs = {"debug": False, **launch.kwargs}
    bound, spec, opts = _binder(kernel, backend)(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    return Specialised(kernel, signature, constexprs, attrs, options.__dict__)


def _resources(cubin: bytes) -> dict:
    """Registers, stack and local (spill) bytes per thread and static shared bytes from the cubin."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = {}
    for line in text.splitlines():
        if "REG:" in line:
            for item in line.split():
                name, _, value = item.partition(":")
                if value.isdigit():
                    fields[name] = int(value)
    return {"regs": fields.get("REG", -1), "stack": fields.get("STACK", 0), "local": fields.get("LOCAL", 0),
            "static_smem": fields.get("SHARED", 0)}


def compile_one(spec: Specialised, cc: int) -> dict:
    """Compiles one specialisation for sm_<cc>: resources, or the error."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    try:
        src = ASTSource(spec.kernel, spec.signature, spec.constexprs, spec.attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=spec.options)
        res = _resources(compiled.asm["cubin"])
        md = compiled.metadata
        res.update(ok=True, smem=int(md.shared) + res["static_smem"], num_warps=int(md.num_warps),
                   num_stages=int(md.num_stages), spills=res["local"] + res["stack"])
    except Exception as error:  # recorded: the check reports every failure, not the first
        first = str(error).strip().splitlines()
        res = {"ok": False, "error": f"{type(error).__name__}: {' | '.join(first[-3:])[:400]}"}
    res["seconds"] = round(time.perf_counter() - start, 2)
    return res


def blocks_per_sm(regs: int, warps: int, smem: int, cc: int) -> int:
    """Resident blocks per SM, from registers (allocated per warp in units of 256), shared memory and
    the warp and block limits."""
    reg_file, smem_max, warps_max, blocks_max = SM_LIMITS[cc]
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = reg_file // (per_warp * warps)
    by_smem = smem_max // smem if smem else blocks_max
    return max(0, min(by_regs, by_smem, warps_max // warps, blocks_max))


_SPECS: list[Specialised] = []


def _worker(jobs, results, err_path: str) -> None:
    # LLVM aborts the process on some errors: stderr goes to a file the parent reads when that happens.
    fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    while (job := jobs.get()) is not None:
        results.put(("start", job, os.getpid()))
        results.put(("done", job, compile_one(_SPECS[job[0]], job[1])))


def _compile_all(jobs_list: list[tuple[int, int]], workers: int, say) -> dict:
    """Compiles in forked worker processes; a job whose process dies is recorded with its last stderr."""
    if workers <= 1:
        return {job: compile_one(_SPECS[job[0]], job[1]) for job in jobs_list}
    ctx = multiprocessing.get_context("fork")
    jobs, results = ctx.Queue(), ctx.Queue()
    for job in jobs_list:
        jobs.put(job)
    tmp = tempfile.mkdtemp(prefix="vgk-aot-")
    procs: dict[int, tuple] = {}

    def spawn():
        err = os.path.join(tmp, f"stderr{len(procs)}-{time.monotonic_ns()}")
        proc = ctx.Process(target=_worker, args=(jobs, results, err), daemon=True)
        proc.start()
        procs[proc.pid] = (proc, err)

    for _ in range(workers):
        spawn()
    running: dict[int, tuple] = {}
    done: dict[tuple[int, int], dict] = {}
    start = time.perf_counter()
    while len(done) < len(jobs_list):
        try:
            kind, job, payload = results.get(timeout=1.0)
        except Exception:  # queue.Empty: look for dead workers
            for pid, (proc, err) in list(procs.items()):
                if not proc.is_alive() and pid in running:
                    lost = running.pop(pid)
                    tail = Path(err).read_text(errors="replace").strip().splitlines()[-3:]
                    done[lost] = {"ok": False, "error": "compiler process died: " + " | ".join(tail)[:400]}
                    del procs[pid]
                    spawn()
            continue
        if kind == "start":
            running[payload] = job
        else:
            done[tuple(job)] = payload
            running = {pid: j for pid, j in running.items() if tuple(j) != tuple(job)}
            if len(done) % 50 == 0:
                say(f"  {len(done)}/{len(jobs_list)} compiled ({time.perf_counter() - start:.0f} s)")
    for _ in procs:
        jobs.put(None)
    for proc, _ in procs.values():
        proc.join(timeout=10)
    return done


def check(table: str = "full", jobs: int | None = None, progress: Callable[[str], None] | None = None,
          targets: dict | None = None) -> dict:
    """Captures every configuration of ``table``, compiles each distinct launch for every target and
    returns {"rows": [...], "kernels": {...}, "summary": {...}}."""
    targets = targets or TARGETS
    say = progress or (lambda _: None)
    start = time.perf_counter()
    rows, keys = [], {}
    _SPECS.clear()
    jobs_list = []
    all_configs = configs(table)
    for config in all_configs:
        seen = set()
        for launch in capture(config):
            # The options hold the target architecture: one specialisation per target.
            specs = {target: specialise(launch, cc) for target, cc in targets.items()}
            row_key = (tuple(spec.key for spec in specs.values()), launch.grid)
            if row_key in seen:
                continue
            seen.add(row_key)
            index = {}
            for target, spec in specs.items():
                if spec.key not in keys:
                    keys[spec.key] = len(_SPECS)
                    _SPECS.append(spec)
                    jobs_list.append((keys[spec.key], targets[target]))
                index[target] = keys[spec.key]
            spec = specs[next(iter(targets))]
            programs = 1
            for g in launch.grid:
                programs *= g
            rows.append({"family": config.family, "config": config.name, "auto": config.auto,
                         "kernel": launch.kernel.__name__, "grid": list(launch.grid), "programs": programs,
                         "sms_busy": min(programs, H200.sms), "spec": index,
                         "constexprs": {str(spec.kernel.arg_names[k[0]]): str(v)
                                        for k, v in spec.constexprs.items()},
                         "num_warps": spec.options.get("num_warps")})
    say(f"captured {len(rows)} launches of {len(all_configs)} configurations: {len(jobs_list)} compiles "
        f"({time.perf_counter() - start:.0f} s)")
    results = _compile_all(jobs_list, jobs or os.cpu_count() or 1, say)
    for row in rows:
        for target, cc in targets.items():
            res = results[(row["spec"][target], cc)]
            row[target] = {k: v for k, v in res.items() if k != "seconds"}
            if res.get("ok"):
                row[target]["blocks_per_sm"] = blocks_per_sm(res["regs"], res["num_warps"], res["smem"], cc)
    failures = [(r["config"], r["kernel"], t) for r in rows for t in targets if not r[t].get("ok")]
    spills = [(r["config"], r["kernel"], t) for r in rows for t in targets
              if r[t].get("ok") and r[t]["spills"] > 0]
    summary = {"triton": triton.__version__, "torch": torch.__version__, "table": table,
               "configurations": len(all_configs), "launch_rows": len(rows),
               "distinct_kernels": len(_SPECS) // len(targets),
               "compiles": len(jobs_list), "failures": len(failures), "spilling": len(spills),
               "seconds": round(time.perf_counter() - start, 1), "targets": list(targets)}
    return {"summary": summary, "rows": rows, "failures": failures, "spills": spills}


# ---------------------------------------------------------------------------------------------------
# Reports


def _cell(res: dict) -> str:
    if not res.get("ok"):
        return "FAIL"
    return f"{res['regs']} / {res['spills']} / {res['smem'] // 1024}K / {res['blocks_per_sm']}"


def markdown(result: dict) -> str:
    s = result["summary"]
    targets = s["targets"]
    lines = [f"# Ahead-of-time compile check, triton {s['triton']}", "",
             f"Generated by `python -m vgkernels aot-check --table {s['table']} --out bench/results` "
             f"(torch {s['torch']}, no GPU: `triton.compile` for {', '.join(targets)} with the ptxas and "
             "cuobjdump of the triton wheel). Launch plans are made for an H200 (132 SMs).", "",
             f"- configurations: {s['configurations']}; launches (kernel x config): {s['launch_rows']}; "
             f"distinct kernels: {s['distinct_kernels']}; compiles: {s['compiles']} in {s['seconds']} s",
             f"- **compile failures: {s['failures']}**; **kernels that spill: {s['spilling']}**", ""]
    by_family: dict[str, list] = {}
    for row in result["rows"]:
        by_family.setdefault(row["family"], []).append(row)
    lines += ["## Per family", "",
              "| family | launches | max regs | max smem (KB) | min SMs busy per launch (default plans) |",
              "|---|---|---|---|---|"]
    for family, rows in by_family.items():
        ok = [r[t] for r in rows for t in targets if r[t].get("ok")]
        default = [r["sms_busy"] for r in rows if r["auto"]]
        lines.append(f"| {family} | {len(rows)} | {max((o['regs'] for o in ok), default=0)} | "
                     f"{max((o['smem'] for o in ok), default=0) // 1024} | {min(default, default=0)} |")
    if result["failures"] or result["spills"]:
        lines += ["", "## Failures and spills", ""]
        lines += [f"- FAIL {c} {k} {t}: {r[t].get('error', '')}" for r in result["rows"]
                  for t in targets for c, k in [(r["config"], r["kernel"])] if not r[t].get("ok")]
        lines += [f"- SPILL {c} {k} {t}" for c, k, t in result["spills"]]
    lines += ["", "## Every launch", "",
              "Cells: registers per thread / spill bytes per thread / shared memory / resident blocks per "
              "SM. "
              "`SMs busy` = min(programs, 132); `default` marks the plan the package picks (the others "
              "force `VGK_RNN_TRITON_LOOP`).", "",
              f"| config | default | kernel | warps | grid | SMs busy | {' | '.join(targets)} |",
              "|---|---|---|---|---|---|" + "---|" * len(targets)]
    for r in result["rows"]:
        cells = " | ".join(_cell(r[t]) for t in targets)
        grid = "x".join(str(g) for g in r["grid"])
        lines.append(f"| {r['config']} | {'yes' if r['auto'] else 'no'} | {r['kernel']} | {r['num_warps']} | "
                     f"{grid} | {r['sms_busy']} | {cells} |")
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    summary = result["summary"]
    stem = f"aot_triton-{summary['triton']}" + ("" if summary["table"] == "full" else f"_{summary['table']}")
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    md.write_text(markdown(result))
    rows = [{k: v for k, v in r.items() if k != "spec"} for r in result["rows"]]
    js.write_text(json.dumps({"summary": result["summary"], "rows": rows}, indent=1) + "\n")
    return md, js
