"""GPU benchmarks of the recurrent layers: forward + backward of one layer over T = 100 steps.

Candidates, all on the same input, output gradient and weights:
- ``cudnn`` (baseline): torch.nn.LSTM / GRU on cuDNN; blind to per-step gradients.
- ``vgkernels``: vgk.nn.LSTM / GRU, Triton backend, with ``track=True`` (per-step Jacobian and gradient
  norms), the loop kind chosen automatically; ``vgkernels_untracked``: the same without the trace.
- ``vgkernels_persistent``: tracked, the persistent loop forced (``VGK_RNN_TRITON_LOOP``);
  ``vgkernels_step_nograph``: the step loop launched step by step (``VGK_RNN_TRITON_GRAPH=0``);
  ``vgkernels`` itself is the step loop replayed from CUDA graphs (the default). These answer which
  launch strategy wins.
- ``vgkernels_ln`` and ``vgkernels_ln_persistent``: the layer-normalized layer (``layer_norm=True``,
  tracked), its step loop (the default) and its persistent loop: which of the two wins (cuDNN has no
  such cell; the baseline only anchors the times).
- ``eager_cell_loop``: an nn.LSTMCell / GRUCell loop with ``retain_grad`` on every state and the
  per-step gradient norms read after backward: what users do today to see BPTT gradients.
- ``compiled_cell_loop``: the same loop with the cell compiled by torch.compile (dynamic shapes, so
  one compile per cell type and dtype).

Grid: mode in {lstm, gru}, B in {16, 64, 256}, input = hidden in {256, 512, 1024}; precisions
``fp32-default`` (torch's defaults: ``torch.backends.cudnn.allow_tf32`` on, so cuDNN and every product
of our layer run TF32, the products around the loop by the package's Triton GEMM;
``torch.backends.cuda.matmul.allow_tf32`` off), ``fp32-tf32`` (float32 with both of torch's TF32
switches on: those products by cuBLAS), ``bf16``, and ``fp32-ieee`` (both switches off: IEEE float32
everywhere). The B = 64, H = 512 cases (fastrnns' size), LSTM then GRU in
every precision, run first. ``VGK_BENCH_GRID=quick`` keeps only the B = 64, H = 512 cases;
``VGK_BENCH_ROUNDS`` sets the rounds per case (default 10). ``VGK_BENCH_SMOKE=1`` runs one tiny case on
the CPU under the Triton interpreter, only to check that the file works.
"""

import os

SMOKE = os.environ.get("VGK_BENCH_SMOKE") == "1"  # bench/conftest.py turns the interpreter on for it

import pytest  # noqa: E402
import torch  # noqa: E402
from harness import interleaved  # noqa: E402

import vgkernels as vgk  # noqa: E402
from vgkernels.triton import recurrent as triton_recurrent  # noqa: E402

pytestmark = pytest.mark.gpu

T = 100
MODES = ("lstm", "gru")
# precision name -> (dtype, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
DTYPES = {"fp32-default": (torch.float32, True, False), "fp32-tf32": (torch.float32, True, True),
          "bf16": (torch.bfloat16, True, True), "fp32-ieee": (torch.float32, False, False)}
ROUNDS = int(os.environ.get("VGK_BENCH_ROUNDS", "10"))


def _grid() -> list[tuple[str, int, int, str]]:
    if SMOKE:
        return [("lstm", 2, 16, "fp32-tf32")]
    cases = [(m, b, h, d) for d in DTYPES for m in MODES for b in (16, 64, 256) for h in (256, 512, 1024)]
    if os.environ.get("VGK_BENCH_GRID") == "quick":
        cases = [c for c in cases if c[1] == 64 and c[2] == 512]
    first = [(m, 64, 512, d) for m in MODES for d in DTYPES]
    return first + [c for c in cases if c not in first]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _Env:
    """Runs a callable with environment variables set (the launchers read them at every call)."""

    def __init__(self, fn, **values: str):
        self.fn, self.values = fn, values

    def __call__(self):
        old = {k: os.environ.get(k) for k in self.values}
        os.environ.update(self.values)
        try:
            return self.fn()
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


_COMPILED: dict[tuple[str, torch.dtype], object] = {}


def _compiled_cell(mode: str, cell: torch.nn.Module):
    # One compiled function per cell type and dtype; the weights are arguments, so any cell of that
    # type reuses it, and dynamic shapes avoid a compile per size.
    key = (mode, next(cell.parameters()).dtype)
    if key not in _COMPILED:
        if mode == "lstm":
            def step(x, h, c, w_ih, w_hh, b_ih, b_hh):
                i, f, g, o = (x @ w_ih.t() + b_ih + h @ w_hh.t() + b_hh).chunk(4, 1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                return torch.sigmoid(o) * torch.tanh(c), c
        else:
            def step(x, h, c, w_ih, w_hh, b_ih, b_hh):
                xr, xz, xn = (x @ w_ih.t() + b_ih).chunk(3, 1)
                hr, hz, hn = (h @ w_hh.t() + b_hh).chunk(3, 1)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                n = torch.tanh(xn + r * hn)
                return (1 - z) * n + z * h, c
        _COMPILED[key] = torch.compile(step, dynamic=True)
    return _COMPILED[key]


def _cell_loop(mode, cell, x, g_out, compiled):
    """Tracked cell loop: retain_grad on every state, per-step gradient norms after backward."""
    B, H = x.shape[1], cell.hidden_size
    h = x.new_zeros(B, H)
    c = x.new_zeros(B, H)
    step = _compiled_cell(mode, cell) if compiled else None
    hs, cs = [], []
    for t in range(x.shape[0]):
        if step is not None:
            h, c = step(x[t], h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
        elif mode == "lstm":
            h, c = cell(x[t], (h, c))
        else:
            h = cell(x[t], h)
        h.retain_grad()
        hs.append(h)
        if mode == "lstm":
            c.retain_grad()
            cs.append(c)
    torch.stack(hs).backward(g_out)
    norms = torch.stack([s.grad.norm() for s in hs])
    if cs:  # the last cell state reaches no output: no gradient
        norms = norms + torch.stack([s.grad.norm() if s.grad is not None else norms.new_zeros(())
                                     for s in cs])
    return norms


def candidates(mode: str, B: int, H: int, dtype: torch.dtype, device: str, steps: int,
               compiled: bool) -> dict:
    """The benchmark's candidates for one case (see the module docstring), on one input, output gradient
    and weights; ``compiled`` adds the compiled cell loop."""
    torch.manual_seed(0)
    nn_cls, vgk_cls = (torch.nn.LSTM, vgk.nn.LSTM) if mode == "lstm" else (torch.nn.GRU, vgk.nn.GRU)
    cell_cls = torch.nn.LSTMCell if mode == "lstm" else torch.nn.GRUCell
    factory = {"device": device, "dtype": dtype}
    ours = vgk_cls(H, H, backend="triton", track=True, **factory)
    ours_plain = vgk_cls(H, H, backend="triton", track=False, **factory)
    cudnn = nn_cls(H, H, **factory)
    ours_ln = vgk_cls(H, H, backend="triton", track=True, layer_norm=True, **factory)
    cell = cell_cls(H, H, **factory)
    for net in (ours_plain, cudnn):
        net.load_state_dict(ours.state_dict())
    cell.load_state_dict({k.removesuffix("_l0"): v for k, v in ours.state_dict().items()})
    x = torch.randn(steps, B, H, **factory, requires_grad=True)
    g_out = torch.randn(steps, B, H, **factory)

    def layer(net):
        def run():
            out, _ = net(x)
            out.backward(g_out)
            if getattr(net, "track", False):
                return net.trace.grad_norm
            return out
        return run

    found = {
        "cudnn": layer(cudnn),
        "vgkernels": layer(ours),
        "vgkernels_untracked": layer(ours_plain),
        "vgkernels_persistent": _Env(layer(ours), VGK_RNN_TRITON_LOOP="persistent"),
        "vgkernels_step_nograph": _Env(layer(ours), VGK_RNN_TRITON_LOOP="step", VGK_RNN_TRITON_GRAPH="0"),
        "vgkernels_ln": layer(ours_ln),
        "vgkernels_ln_persistent": _Env(layer(ours_ln), VGK_RNN_TRITON_LOOP="persistent"),
        "eager_cell_loop": lambda: _cell_loop(mode, cell, x, g_out, compiled=False),
    }
    if compiled:
        found["compiled_cell_loop"] = lambda: _cell_loop(mode, cell, x, g_out, compiled=True)
    return found


@pytest.mark.parametrize("mode,B,H,dtype_name", _grid())
def test_recurrent_fwd_bwd(mode, B, H, dtype_name, benchmark, compare_record):
    device = "cpu" if SMOKE else "cuda"
    if not SMOKE and not torch.cuda.is_available():
        pytest.fail("bench_recurrent_gpu.py needs a CUDA device (or VGK_BENCH_SMOKE=1 for a CPU smoke run)")
    dtype, tf32, matmul_tf32 = DTYPES[dtype_name]
    # cuDNN and every product of our layer follow cuDNN's switch; torch's matmuls only the cell loops'.
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    steps = 3 if SMOKE else T
    timed = candidates(mode, B, H, dtype, device, steps, compiled=not SMOKE)
    plan = triton_recurrent._plan(B, H, 4 if mode == "lstm" else 3, torch.device(device), dtype)
    extra = {"mode": mode, "T": steps, "B": B, "H": H, "dtype": dtype_name, "tf32": tf32,
             "matmul_tf32": matmul_tf32,
             "auto_loop": plan["loop"], "plan": {k: v for k, v in plan.items() if k != "loop"}}
    comparison = interleaved(f"{mode} T={steps} B={B} H={H} {dtype_name} fwd+bwd", timed,
                             baseline="cudnn", rounds=2 if SMOKE else ROUNDS, warmup=1 if SMOKE else 2,
                             device=device)
    comparison.extra.update(extra)
    if SMOKE:
        print(comparison.summary())  # a check that the file runs, not a result to record
    else:
        compare_record(comparison)
    benchmark.extra_info.update(comparison.summary())
    benchmark.pedantic(lambda: (timed["vgkernels"](), _sync()), rounds=2 if SMOKE else 5,
                       iterations=1, warmup_rounds=1)
    for name in comparison.times:
        assert comparison.median(name) > 0
