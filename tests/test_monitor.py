"""GradientMonitor: norms against a per-parameter torch computation, the histogram against torch.histc of
log10|g|, one host transfer per record, AMP with a GradScaler, writers, flags, summary, plot and DDP.

Tolerances: norms rtol 1e-6 against torch.linalg.vector_norm (float32 gradients; the monitor sums
squares in float64); histogram counts exactly equal.
"""

import math
import struct

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import vgkernels as vgk
import vgkernels.diagnostics.monitor as monitor_module
from vgkernels.diagnostics import GradientMonitor
from vgkernels.reference.grad_stats import DEFAULT_BINS, FIRST_BIN, UNDERFLOW, ZERO

RTOL = 1e-6
BINS = DEFAULT_BINS


class Net(nn.Module):
    """Odd sizes, a recurrent layer, a parameter of the model itself, an unused and a frozen layer."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 37)
        self.rnn = nn.GRU(37, 5, batch_first=True)
        self.head = nn.Linear(5, 1)
        self.unused = nn.Linear(2, 2)
        self.frozen = nn.Linear(5, 5)
        self.frozen.requires_grad_(False)
        self.gain = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        out, _ = self.rnn(torch.tanh(self.inp(x)))
        return (self.head(self.frozen(out)) * self.gain).pow(2).mean()


def backward(model, batch=1, steps=4, seed=0):
    torch.manual_seed(seed)
    model.zero_grad()
    loss = model(torch.randn(batch, steps, 3))
    loss.backward()
    return loss


def expected_stats(model, inv_scale=1.0):
    """Per-parameter norms and the histogram of all gradients, straight from torch."""
    norms, hist = [], torch.zeros(BINS.num_columns, dtype=torch.int64)
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            norms.append(math.nan)
            continue
        g = p.grad.float().cpu() * inv_scale
        norms.append(torch.linalg.vector_norm(g).item())
        logs = torch.log10(g.abs())
        hist[FIRST_BIN: FIRST_BIN + BINS.bins] += torch.histc(
            logs, bins=BINS.bins, min=BINS.log10_min, max=BINS.log10_max
        ).long()
        hist[ZERO] += (g == 0).sum()
        hist[UNDERFLOW] += ((logs < BINS.log10_min) & (g != 0)).sum()  # log10(0) = -inf is no underflow
        hist[BINS.overflow] += (logs > BINS.log10_max).sum()
        hist[BINS.nan] += torch.isnan(g).sum()
    return np.array(norms), hist.numpy()


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("batch", [1, 3])
def test_norms_and_histogram_match_torch(backend, batch):
    model = Net()
    with GradientMonitor(model, backend=backend) as mon:
        backward(model, batch=batch)
    assert len(mon.history) == 1
    entry = mon.history[0]
    norms, hist = expected_stats(model)
    np.testing.assert_allclose(entry.param_norms, norms, rtol=RTOL)
    assert np.isnan(entry.param_norms[mon.param_names.index("unused.weight")])
    assert "frozen.weight" not in mon.param_names
    assert np.array_equal(entry.histogram, hist)
    # modules: the norm over the parameters each owns directly
    for i, name in enumerate(mon.module_names):
        owned = [j for j, p in enumerate(mon.param_names) if p.rpartition(".")[0] == name]
        sq = np.nansum(norms[owned] ** 2)
        expected = math.sqrt(sq) if not np.isnan(norms[owned]).all() else math.nan
        np.testing.assert_allclose(entry.module_norms[i], expected, rtol=RTOL)
    assert mon.module_names == ["", "inp", "rnn", "head", "unused"]
    np.testing.assert_allclose(entry.total_norm, math.sqrt(np.nansum(norms**2)), rtol=RTOL)
    assert entry.flags == {} and entry.step == 0 and entry.inv_scale == 1.0


def test_one_transfer_per_record(monkeypatch):
    """The monitor funnels its one device-to-host copy through _to_host, and nothing else syncs."""
    calls = {"to_host": 0, "item": 0, "tolist": 0, "numpy": 0, "cpu": 0}
    original = monitor_module._to_host

    def counting(packed):
        calls["to_host"] += 1
        return original(packed)

    monkeypatch.setattr(monitor_module, "_to_host", counting)
    for name in ("item", "tolist", "numpy", "cpu"):
        method = getattr(torch.Tensor, name)

        def wrapped(self, *args, _method=method, _name=name, **kwargs):
            calls[_name] += 1
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)

    class CountScalarReads(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                CountScalarReads.reads += 1
            return func(*args, **(kwargs or {}))

    model = Net()
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    mon = GradientMonitor(model, scaler=scaler, hook=False)
    torch.manual_seed(0)
    scaler.scale(model(torch.randn(2, 4, 3))).backward()
    for k in range(3):
        before = dict(calls)
        with CountScalarReads():
            mon.record()
        assert calls["to_host"] - before["to_host"] == 1, k
        assert calls["cpu"] - before["cpu"] == 1 and calls["numpy"] - before["numpy"] == 1
        assert calls["item"] == before["item"] and calls["tolist"] == before["tolist"]
    assert CountScalarReads.reads == 0
    assert len(mon.history) == 3


def test_every_and_force():
    model = Net()
    mon = GradientMonitor(model, every=3)
    for seed in range(7):
        backward(model, seed=seed)
    assert [e.step for e in mon.history] == [0, 3, 6]
    assert mon.steps == 7
    entry = mon.record(force=True)
    assert entry is mon.history[-1] and entry.step == 7
    assert mon.record() is None  # step 8 is not due
    mon.close()
    backward(model)
    assert mon.steps == 9  # no hook any more


def test_hook_fires_once_per_backward_with_final_gradients():
    """Two backwards through one graph accumulate; each record sees the gradient at its end."""
    model = Net()
    mon = GradientMonitor(model)
    torch.manual_seed(0)
    loss = model(torch.randn(2, 4, 3))
    loss.backward(retain_graph=True)
    first, _ = expected_stats(model)
    loss.backward()
    second, _ = expected_stats(model)
    assert len(mon.history) == 2
    np.testing.assert_allclose(mon.history[0].param_norms, first, rtol=RTOL)
    np.testing.assert_allclose(mon.history[1].param_norms, second, rtol=RTOL)
    np.testing.assert_allclose(second[1:3], 2 * first[1:3], rtol=RTOL)
    torch.autograd.grad(model(torch.randn(2, 4, 3)), list(model.inp.parameters()))
    assert len(mon.history) == 2  # .grad untouched: nothing to record


def test_backward_error_does_not_block_later_records():
    model = Net()
    mon = GradientMonitor(model)

    class Fail(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("boom")

    torch.manual_seed(0)
    x = torch.randn(2, 4, 3)
    # the gain's gradient accumulates (and its hook fires) before the failing node is reached
    loss = Fail.apply(model.inp(x)).sum() + model.gain * 2
    with pytest.raises(RuntimeError, match="boom"):
        loss.backward()
    assert mon._pending_task is not None  # a hook fired in the failed backward
    backward(model)
    assert len(mon.history) == 1


def test_amp_grad_scaler_reports_unscaled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 37), nn.ReLU(), nn.Linear(37, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=3000.0)  # not a power of two: the division shows
    mon = GradientMonitor(model, scaler=scaler)
    for _ in range(2):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randn(4, 3)).float().pow(2).mean()
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaled_norms, _ = expected_stats(model)
        scaler.unscale_(optimizer)
        norms, hist = expected_stats(model)  # the gradients as GradScaler unscaled them
        entry = mon.history[-1]
        np.testing.assert_allclose(entry.param_norms, norms, rtol=RTOL)
        np.testing.assert_allclose(entry.param_norms * scale, scaled_norms, rtol=1e-5)
        assert np.array_equal(entry.histogram, hist)
        assert entry.inv_scale == np.float32(1 / np.float64(scale))
        # after unscale_, the gradients are not divided again
        again = mon.record(force=True)
        np.testing.assert_allclose(again.param_norms, norms, rtol=RTOL)
        assert again.inv_scale == 1.0
        scaler.step(optimizer)
        scaler.update()


class FakeWriter:
    def __init__(self):
        self.scalars, self.histograms = [], []

    def add_scalar(self, tag, value, global_step=None):
        self.scalars.append((tag, float(value), global_step))

    def add_histogram(self, tag, values, global_step=None, bins="tensorflow"):
        self.histograms.append((tag, np.asarray(values), global_step, bins))


class FakeRawWriter(FakeWriter):
    def __init__(self):
        super().__init__()
        self.raw = []

    def add_histogram_raw(self, tag, min, max, num, sum, sum_squares, bucket_limits, bucket_counts,
                          global_step=None):
        self.raw.append(dict(tag=tag, min=min, max=max, num=num, limits=bucket_limits, counts=bucket_counts,
                             step=global_step))


def test_fake_writer():
    model = Net()
    writer = FakeWriter()
    mon = GradientMonitor(model, writer=writer, every=2)
    for seed in range(3):
        backward(model, seed=seed)
    tags = {tag for tag, _, _ in writer.scalars}
    assert {"grad/total_norm", "grad/norm/model", "grad/norm/inp", "grad/norm/rnn", "grad/norm/head",
            "grad/zero_fraction", "grad/nan_count"} <= tags
    assert "grad/norm/unused" not in tags  # no gradient, nothing logged
    totals = [(v, s) for tag, v, s in writer.scalars if tag == "grad/total_norm"]
    assert totals == [(pytest.approx(e.total_norm), e.step) for e in mon.history]
    logged = [(tag, step) for tag, _, step, _ in writer.histograms]
    assert logged == [("grad/log10_abs", 0), ("grad/log10_abs", 2)]
    _, values, _, edges = writer.histograms[-1]
    counts, _ = np.histogram(values, bins=edges)
    hist = mon.history[-1].histogram
    assert np.array_equal(counts, hist[UNDERFLOW: BINS.overflow + 1])  # few elements: exact


def test_fake_writer_raw_histogram():
    model = Net()
    writer = FakeRawWriter()
    GradientMonitor(model, writer=writer)
    backward(model)
    norms_hist = expected_stats(model)[1]
    (raw,) = writer.raw
    assert raw["tag"] == "grad/log10_abs" and raw["step"] == 0
    assert raw["counts"] == norms_hist[UNDERFLOW: BINS.overflow + 1].tolist()
    assert raw["num"] == sum(raw["counts"])
    assert raw["limits"][0] == BINS.log10_min and raw["limits"][BINS.bins] == BINS.log10_max
    assert raw["min"] < raw["max"]
    assert writer.histograms == []


def test_real_summary_writer(tmp_path):
    # tensorboard is in the test extras: missing, this test fails rather than skips
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model = Net()
    writer = SummaryWriter(log_dir=str(tmp_path))
    mon = GradientMonitor(model, writer=writer)
    for seed in range(2):
        backward(model, seed=seed)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    totals = [(e.step, e.value) for e in events.Scalars("grad/total_norm")]
    assert totals == [(e.step, pytest.approx(e.total_norm, rel=1e-6)) for e in mon.history]
    histograms = events.Histograms("grad/log10_abs")
    assert [h.step for h in histograms] == [0, 1]
    assert histograms[-1].histogram_value.num == mon.history[-1].histogram[UNDERFLOW: BINS.overflow + 1].sum()


def set_grads(model, values):
    for name, p in model.named_parameters():
        p.grad = torch.full_like(p, values[name.partition(".")[0]])


def test_flags():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3))
    mon = GradientMonitor(model, hook=False)
    set_grads(model, {"0": 1e-6, "1": 1.0, "2": 2.0})
    assert mon.record().flags == {"0": ("vanishing",)}
    # 250x the previous largest module, below the absolute threshold; module 0 grows 1e5x, but stays small
    set_grads(model, {"0": 1e-1, "1": 500.0, "2": 2.0})
    assert mon.record().flags == {"1": ("exploding",)}
    set_grads(model, {"0": 1.0, "1": 2e3, "2": float("nan")})  # absolute threshold; NaN
    assert mon.record().flags == {"1": ("exploding",), "2": ("nonfinite",)}
    set_grads(model, {"0": float("inf"), "1": 1.0, "2": 0.0})  # zero gradients vanish
    assert mon.record().flags == {"0": ("nonfinite",), "2": ("vanishing",)}
    model[1].weight.grad = model[1].bias.grad = None  # no gradient: no flag
    set_grads(model[2], {"weight": 1.0, "bias": 1.0})
    assert mon.record().flags == {"0": ("nonfinite",)}
    lenient = GradientMonitor(model, hook=False, vanish_ratio=1e-9, explode_norm=1e9, explode_growth=1e9)
    set_grads(model, {"0": 1e-2, "1": 1e5, "2": 1.0})
    assert lenient.record().flags == {}
    assert mon.record().flags == {"0": ("vanishing",), "1": ("exploding",), "2": ("vanishing",)}


def test_sparse_gradient():
    emb = nn.Embedding(11, 3, sparse=True)
    mon = GradientMonitor(emb)
    emb(torch.tensor([1, 4, 4])).sum().backward()
    entry = mon.history[0]
    dense = emb.weight.grad.to_dense()
    np.testing.assert_allclose(entry.param_norms, [dense.norm().item()], rtol=RTOL)
    assert entry.histogram[ZERO] == (dense == 0).sum().item()
    assert entry.histogram.sum() == dense.numel()


def test_summary_table_and_rows():
    model = Net()
    mon = GradientMonitor(model)
    assert "nothing recorded" in mon.summary()
    for seed in range(3):
        backward(model, seed=seed)
    table = mon.summary()
    assert isinstance(table, str)
    assert [r["module"] for r in table.rows] == ["(model)", "inp", "rnn", "head", "unused"]
    steps, norms = mon.module_norms()
    assert steps.tolist() == [0, 1, 2] and norms.shape == (3, 5)
    rnn = table.rows[2]
    assert rnn["norm"] == norms[-1, 2] and rnn["min"] == norms[:, 2].min() and rnn["max"] == norms[:, 2].max()
    assert rnn["numel"] == sum(p.numel() for p in model.rnn.parameters())
    assert max(r["relative"] for r in table.rows if not math.isnan(r["relative"])) == 1.0
    for r in table.rows:
        assert r["module"] in table
    assert "3 records" in table


def test_plot(tmp_path):
    model = Net()
    mon = GradientMonitor(model)
    with pytest.raises(RuntimeError, match="nothing recorded"):
        mon.plot(tmp_path / "none.png")
    for seed in range(4):
        backward(model, seed=seed)
    path = mon.plot(tmp_path / "monitor.png")
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    assert width > 1000 and height > 400


def test_bad_inputs():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got list"):
        GradientMonitor([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="every: expected a positive int, got 0"):
        GradientMonitor(nn.Linear(2, 2), every=0)
    with pytest.raises(TypeError, match="writer: expected an object with add_scalar and add_histogram"):
        GradientMonitor(nn.Linear(2, 2), writer=object())
    with pytest.raises(TypeError, match="scaler: expected a torch.amp.GradScaler, got float"):
        GradientMonitor(nn.Linear(2, 2), scaler=2.0)
    with pytest.raises(ValueError, match="vanish_ratio: expected a positive number, got 0"):
        GradientMonitor(nn.Linear(2, 2), vanish_ratio=0)
    model = nn.Linear(2, 2)
    model.extra = nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="parameter 'extra' has dtype torch.complex64"):
        GradientMonitor(model)
    with pytest.raises(ValueError, match="backend must be one of"):
        mon = GradientMonitor(nn.Linear(2, 2), backend="gpu", hook=False)
        mon.model.weight.grad = torch.ones(2, 2)
        mon.record()


def test_public_name():
    assert vgk.diagnostics.GradientMonitor is GradientMonitor


def _ddp_worker(rank, world, init_file, results):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        local = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        local.load_state_dict(model.state_dict())
        ddp = DistributedDataParallel(model)
        mon = GradientMonitor(ddp)
        torch.manual_seed(100 + rank)  # different data on every rank
        x = torch.randn(5, 3)
        ddp(x).pow(2).sum().backward()
        local(x).pow(2).sum().backward()
        results[rank] = (
            mon.history[0].param_norms.tolist(),
            [p.grad.norm().item() for p in ddp.parameters()],
            [p.grad.norm().item() for p in local.parameters()],
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_records_reduced_gradients(tmp_path):
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    for rank in range(2):
        recorded, reduced, local = results[rank]
        np.testing.assert_allclose(recorded, reduced, rtol=RTOL)
        assert not np.allclose(recorded, local, rtol=1e-3)
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=RTOL)


@pytest.mark.gpu
def test_cuda_one_device_to_host_copy():
    class CountCopies(TorchDispatchMode):
        to_host = 0
        scalar_reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func is torch.ops.aten._local_scalar_dense.default:
                CountCopies.scalar_reads += 1
            src = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
                dst = out if func is torch.ops.aten._to_copy.default else args[0]
                src = args[0] if func is torch.ops.aten._to_copy.default else args[1]
                if src.device.type == "cuda" and dst.device.type == "cpu":
                    CountCopies.to_host += 1
            return out

    model = Net().cuda()
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    mon = GradientMonitor(model, scaler=scaler, hook=False)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(torch.randn(2, 4, 3, device="cuda"))
    scaler.scale(loss).backward()
    with CountCopies():
        entry = mon.record()
    assert CountCopies.to_host == 1 and CountCopies.scalar_reads == 0
    scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.1))
    norms, hist = expected_stats(model)
    np.testing.assert_allclose(entry.param_norms, norms, rtol=RTOL)
    assert np.array_equal(entry.histogram, hist)
