"""Tests of vgkernels.tasks: the adding problem, copy memory, their baselines and the deep-MLP probe.

Tolerances: the Monte Carlo estimate of the adding baseline must lie within 5 standard errors of
1/6 (SE = sqrt(Var((y-1)^2) / n) with Var = 1/15 - 1/36 = 7/180 for y - 1 triangular on [-1, 1]).
The copy-memory baseline is estimated with per-position frequencies fitted on one sample and scored
on another; it must match 10 ln 8 / (T + 20) within 1% (the estimator's bias is about 7/(2n) nats per
symbol, n = 40,000). The probe's norms must equal an independent autograd computation to 1e-6
relative (1e-4 with BatchNorm over a batch of 3); the per-step norms of the recurrent probe equal
vgkernels.nn.RNN's trace to 1e-4 (float32 kernels against float32 autograd) and the written-out step
equations to 1e-5; the structural checks are exact. The known results are bounds stated beside them.
"""

import math

import pytest
import torch

import vgkernels
from vgkernels import init as vinit
from vgkernels import tasks

# --- adding problem ---------------------------------------------------------------------------


@pytest.mark.parametrize("B, T", [(1, 2), (3, 3), (37, 37), (64, 100)])
def test_adding_structure(B, T):
    x, y = tasks.adding_problem(B, T, seed=1)
    assert x.shape == (B, T, 2) and y.shape == (B, 1)
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    values, markers = x[..., 0], x[..., 1]
    assert ((values >= 0) & (values <= 1)).all()
    assert set(markers.unique().tolist()) <= {0.0, 1.0}
    half = T // 2
    assert torch.equal(markers[:, :half].sum(1), torch.ones(B))  # exactly one marker per half
    assert torch.equal(markers[:, half:].sum(1), torch.ones(B))
    torch.testing.assert_close(y[:, 0], (values * markers).sum(1))


def test_adding_seeded_batched_and_device_aware():
    a = tasks.adding_problem(5, 11, seed=3)
    b = tasks.adding_problem(5, 11, seed=3, device="cpu")
    c = tasks.adding_problem(5, 11, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    g = torch.Generator().manual_seed(3)
    first, second = tasks.adding_problem(5, 11, generator=g), tasks.adding_problem(5, 11, generator=g)
    assert torch.equal(first[0], a[0]) and not torch.equal(second[0], a[0])  # the generator advances
    x, y = tasks.adding_problem(2, 4, seed=0, dtype=torch.float64, device=torch.device("cpu"))
    assert x.dtype == y.dtype == torch.float64 and x.device.type == "cpu"


def test_adding_baseline_monte_carlo():
    n = 400_000
    x, y = tasks.adding_problem(n, 10, seed=0, dtype=torch.float64)
    mse = ((y - 1.0) ** 2).mean().item()
    se = math.sqrt(7 / 180 / n)
    assert abs(mse - tasks.ADDING_BASELINE_MSE) < 5 * se, mse
    assert tasks.ADDING_BASELINE_MSE == 1 / 6
    assert abs(y.mean().item() - 1.0) < 5 * math.sqrt(1 / 6 / n)  # 1 is the best constant


def test_adding_marker_positions_cover_each_half():
    x, _ = tasks.adding_problem(20_000, 10, seed=0)
    counts = x[..., 1].sum(0)  # marker counts per position
    first, second = counts[:5], counts[5:]
    # uniform within each half: every position near 20,000 / 5 = 4000 (5 sigma is about 300)
    assert (first - 4000).abs().max() < 350 and (second - 4000).abs().max() < 350


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"batch_size": 0, "seq_len": 4}, ValueError, "batch_size"),
        ({"batch_size": 2, "seq_len": 1}, ValueError, "seq_len must be >= 2"),
        ({"batch_size": 2.0, "seq_len": 4}, TypeError, "batch_size"),
        ({"batch_size": 2, "seq_len": 4, "seed": 1, "generator": torch.Generator()}, ValueError, "at most"),
        ({"batch_size": 2, "seq_len": 4, "seed": "1"}, TypeError, "seed"),
        ({"batch_size": 2, "seq_len": 4, "dtype": torch.int32}, TypeError, "floating"),
    ],
)
def test_adding_bad_inputs(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        tasks.adding_problem(**kwargs)


# --- copy memory ------------------------------------------------------------------------------


@pytest.mark.parametrize("B, T", [(1, 1), (3, 37), (8, 100)])
def test_copy_memory_structure(B, T):
    x, y = tasks.copy_memory(B, T, seed=2)
    assert x.shape == y.shape == (B, T + 20) and x.dtype == y.dtype == torch.int64
    symbols = x[:, :10]
    assert ((symbols >= 1) & (symbols <= 8)).all()
    assert (x[:, 10 : T + 9] == tasks.COPY_BLANK).all()  # T - 1 blanks
    assert (x[:, T + 9] == tasks.COPY_DELIMITER).all()
    assert (x[:, T + 10 :] == tasks.COPY_BLANK).all()
    assert (y[:, : T + 10] == tasks.COPY_BLANK).all()
    assert torch.equal(y[:, T + 10 :], symbols)
    onehot, y2 = tasks.copy_memory(B, T, seed=2, one_hot=True)
    assert onehot.shape == (B, T + 20, tasks.COPY_NUM_CLASSES) and onehot.dtype == torch.float32
    assert torch.equal(onehot.argmax(-1), x) and torch.equal(y2, y)


def test_copy_memory_baseline_values():
    # Arjovsky et al. (2016): 10 ln 8 / (T + 20)
    for T, expected in [(100, 0.1733), (200, 0.0945), (300, 0.0650), (500, 0.0400)]:
        assert abs(tasks.copy_memory_baseline(T) - expected) < 5e-5
    with pytest.raises(ValueError, match="delay"):
        tasks.copy_memory_baseline(0)


@pytest.mark.parametrize("T", [5, 100])
def test_copy_memory_baseline_monte_carlo(T):
    """The best memoryless predictor is the per-position target distribution: fit it, score it."""
    n = 40_000
    _, fit = tasks.copy_memory(n, T, seed=0)
    _, test = tasks.copy_memory(n, T, seed=1)
    freq = torch.nn.functional.one_hot(fit, tasks.COPY_NUM_CLASSES).double().mean(0)  # [T+20, K]
    p = freq.gather(1, test.t()).t()  # probability of each test target under the fit
    ce = -p.log().mean().item()  # inf if a target never seen at its position
    assert abs(ce / tasks.copy_memory_baseline(T) - 1) < 0.01, ce


def test_copy_memory_bad_inputs():
    with pytest.raises(ValueError, match="delay"):
        tasks.copy_memory(2, 0)
    with pytest.raises(TypeError, match="batch_size"):
        tasks.copy_memory("2", 5)


# --- deep-MLP probe ---------------------------------------------------------------------------

ACT = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "leaky_relu": lambda z: torch.where(z > 0, z, 0.01 * z),
    "elu": lambda z: torch.where(z > 0, z, torch.expm1(z)),
    "selu": lambda z: 1.0507009873554805 * torch.where(z > 0, z, 1.6732632423543772 * torch.expm1(z)),
    "silu": lambda z: z * torch.sigmoid(z),
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),
}  # the activations written out from their definitions


def batch_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm's training-mode statistics: the mean and the biased variance over the batch."""
    return z.mean(0), z.var(0, unbiased=False)


def mlp_by_hand(model, x, width, activation, residual, highway, layer_norm, bn_stats=None):
    """The blocks' equations with torch.nn.functional; bn_stats: per block (mean, var), or None for
    the batch's own statistics."""
    act = ACT[activation]
    h, pre_bn = x, []
    for k, block in enumerate(model):
        u = h
        if layer_norm:
            u = torch.nn.functional.layer_norm(u, (width,), block.norm.weight, block.norm.bias)
        z = torch.nn.functional.linear(u, block.linear.weight, block.linear.bias)
        if block.batch_norm is not None:
            pre_bn.append(z)
            mean, var = batch_stats(z) if bn_stats is None else bn_stats[k]
            z = (z - mean) / torch.sqrt(var + 1e-5) * block.batch_norm.weight + block.batch_norm.bias
        a = act(z)
        if highway:
            gate = torch.sigmoid(torch.nn.functional.linear(u, block.gate.weight, block.gate.bias))
            h = gate * a + (1 - gate) * h
        else:
            h = h + a if residual else a
    return h, pre_bn


VARIANTS = [
    ("sigmoid", "standard", {}),
    ("relu", "he", {"residual": True, "layer_norm": True}),
    ("tanh", "xavier", {"layer_norm": True}),
    ("leaky_relu", "he", {"highway": True}),
    ("elu", "he", {"batch_norm": "train"}),
    ("selu", "lecun", {"batch_norm": "eval", "highway": True, "highway_bias": -1.5}),
    ("silu", "orthogonal", {"residual": True, "batch_norm": "eval"}),
    ("gelu", "negative_mean", {}),
]


@pytest.mark.parametrize("activation, init, kwargs", VARIANTS)
def test_mlp_probe_matches_autograd(activation, init, kwargs):
    depth, width, batch = 5, 37, 3
    batch_norm = kwargs.get("batch_norm")
    probe = tasks.mlp_gradient_probe(depth, width, activation, init, batch_size=batch, seed=4, **kwargs)
    g = torch.Generator().manual_seed(4)
    flags = {k: v for k, v in kwargs.items() if k != "batch_norm"}
    model = tasks.deep_mlp(
        depth, width, activation, init, batch_norm=batch_norm is not None, generator=g, **flags
    )
    x = torch.randn(batch, width, generator=g)
    residual, highway = kwargs.get("residual", False), kwargs.get("highway", False)
    layer_norm = kwargs.get("layer_norm", False)
    bn_stats = None
    if batch_norm == "eval":  # the running statistics: the average of the calibration batches' statistics
        sums = None
        for _ in range(tasks.CALIBRATION_BATCHES):
            with torch.no_grad():
                draw = torch.randn(batch, width, generator=g)
                _, pre = mlp_by_hand(model, draw, width, activation, residual, highway, layer_norm)
            stats = [(z.mean(0), z.var(0, unbiased=True)) for z in pre]  # BatchNorm keeps the unbiased one
            if sums is not None:
                stats = [(a + m, b + v) for (a, b), (m, v) in zip(sums, stats, strict=True)]
            sums = stats
        bn_stats = [(m / tasks.CALIBRATION_BATCHES, v / tasks.CALIBRATION_BATCHES) for m, v in sums]
    h, _ = mlp_by_hand(model, x, width, activation, residual, highway, layer_norm, bn_stats)
    grads = torch.autograd.grad(h.sum(), [b.linear.weight for b in model])
    expected = [gr.norm().item() for gr in grads]
    rel = 1e-4 if batch_norm else 1e-5  # BatchNorm over 3 samples amplifies float32 rounding
    assert probe.weight_grad_norms == pytest.approx(expected, rel=rel)
    assert probe.ratio == pytest.approx(expected[0] / expected[-1], rel=rel)
    assert probe.depth == depth and len(probe.weight_grad_norms) == depth
    assert ("LayerNorm" in probe.setup) == layer_norm and ("residual" in probe.setup) == residual
    assert ("highway" in probe.setup) == highway and probe.highway == highway
    assert probe.batch_norm == batch_norm and ("BatchNorm" in probe.setup) == (batch_norm is not None)


def test_mlp_inits():
    g = torch.Generator().manual_seed(0)
    std = tasks.deep_mlp(2, 512, "sigmoid", "standard", generator=g)
    w = std[0].linear.weight
    assert w.abs().max() <= 1 / math.sqrt(512) and abs(w.var().item() * 3 * 512 - 1) < 0.02
    neg = tasks.deep_mlp(2, 512, "sigmoid", "negative_mean", generator=g)
    assert abs(neg[0].linear.weight.mean().item() + 8 / 512) < 1e-3
    assert torch.equal(neg[0].linear.bias, torch.zeros(512))
    he = tasks.deep_mlp(1, 512, "relu", "he", generator=g)
    assert abs(he[0].linear.weight.var().item() * 512 / 2 - 1) < 0.02
    leaky = tasks.deep_mlp(1, 512, "leaky_relu", "he", generator=g)  # gain² = 2 / (1 + 0.01²)
    assert abs(leaky[0].linear.weight.var().item() * 512 * (1 + 1e-4) / 2 - 1) < 0.02
    lecun = tasks.deep_mlp(1, 512, "selu", "lecun", generator=g)
    assert abs(lecun[0].linear.weight.var().item() * 512 - 1) < 0.02
    orth = tasks.deep_mlp(1, 64, "tanh", "orthogonal", generator=g)[0].linear.weight
    torch.testing.assert_close(orth @ orth.t(), torch.eye(64), atol=1e-5, rtol=0)
    highway = tasks.deep_mlp(2, 64, "relu", "he", highway=True, highway_bias=-2.5, generator=g)
    assert torch.equal(highway[1].gate.bias, torch.full((64,), -2.5))
    assert abs(highway[1].gate.weight.var().item() * 64 / 2 - 1) < 0.25  # the block's init
    import vgkernels

    ln = tasks.deep_mlp(1, 8, layer_norm=True)
    assert isinstance(ln[0].norm, vgkernels.nn.LayerNorm)
    bn = tasks.deep_mlp(1, 8, batch_norm=True)[0].batch_norm
    assert isinstance(bn, torch.nn.BatchNorm1d) and bn.momentum is None
    assert torch.equal(bn.weight, torch.ones(8))
    assert set(tasks.USUAL_INIT) == set(tasks.ACTIVATIONS) and tasks.USUAL_INIT["selu"] == "lecun"


# The known results, at depth 20, width 256, batch 64, seeds 0-2, loss = sum of the outputs. Each
# bound held with at least a factor 1.7 to spare on these seeds when it was written.
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mlp_probe_known_results(seed):
    def ratio(activation, init, **kwargs):
        return tasks.mlp_gradient_probe(20, 256, activation, init, seed=seed, **kwargs).ratio

    # Sigmoid with torch's default init: each layer multiplies by at most 0.25 (Glorot & Bengio 2010).
    assert ratio("sigmoid", "standard") < 1e-8
    # SELU with LeCun normal weights is self-normalizing (Klambauer et al. 2017).
    assert 0.1 <= ratio("selu", "lecun") <= 10
    # Highway layers whose transform gates start closed carry the gradient (Srivastava et al. 2015).
    assert ratio("sigmoid", "standard", highway=True, highway_bias=-3.0) > 0.1
    # BatchNorm before the nonlinearity rescales every layer's pre-activation (Ioffe & Szegedy 2015),
    # with the batch's statistics and with running statistics.
    assert ratio("sigmoid", "standard", batch_norm="train") > 1e-3
    assert ratio("sigmoid", "standard", batch_norm="eval") > 1e-3
    # The rectifier family vanishes with torch's default init and not with He's (He et al. 2015).
    for activation in ("relu", "leaky_relu", "elu", "silu", "gelu"):
        assert ratio(activation, "standard") < 1e-3, activation
        assert 1e-2 <= ratio(activation, "he") <= 1e2, activation


def test_mlp_probe_shows_sigmoid_vanishing_and_he_not():
    sigmoid = tasks.mlp_gradient_probe(20, 64, "sigmoid", "standard", batch_size=16)
    relu = tasks.mlp_gradient_probe(20, 64, "relu", "he", batch_size=16)
    normed = tasks.mlp_gradient_probe(20, 64, "sigmoid", "standard", layer_norm=True, batch_size=16)
    assert sigmoid.ratio < 1e-8
    assert 1e-2 < relu.ratio < 1e2
    assert 1e-2 < normed.ratio < 1e2


def test_mlp_probe_odd_sizes():
    probe = tasks.mlp_gradient_probe(1, 1, "gelu", "he", batch_size=1, highway=True)
    assert len(probe.weight_grad_norms) == 1 and probe.ratio == 1.0
    probe = tasks.mlp_gradient_probe(3, 3, "selu", "lecun", batch_size=2, batch_norm="train")
    assert all(math.isfinite(v) for v in probe.weight_grad_norms)


def test_mlp_bad_inputs():
    with pytest.raises(ValueError, match="activation must be one of .* got 'swish'"):
        tasks.deep_mlp(2, 4, "swish")
    with pytest.raises(ValueError, match="init must be one of .* got 'glorot'"):
        tasks.deep_mlp(2, 4, "relu", "glorot")
    with pytest.raises(ValueError, match="depth"):
        tasks.mlp_gradient_probe(0, 4)
    with pytest.raises(ValueError, match="residual and highway"):
        tasks.deep_mlp(2, 4, residual=True, highway=True)
    with pytest.raises(ValueError, match="layer_norm and batch_norm"):
        tasks.mlp_gradient_probe(2, 4, layer_norm=True, batch_norm="train")
    with pytest.raises(ValueError, match="batch_norm must be one of .* got 'test'"):
        tasks.mlp_gradient_probe(2, 4, batch_norm="test")


# --- recurrent probe ----------------------------------------------------------------------------


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu", "sigmoid"])
@pytest.mark.parametrize("init", ["default", "orthogonal"])
def test_rnn_probe_matches_the_traced_vgkernels_rnn(nonlinearity, init):
    """Without extras the probe is vgkernels.nn.RNN: the same weights give the same per-step norms."""
    T, B, H = 37, 3, 5
    probe = tasks.rnn_gradient_probe(T, H, nonlinearity, init, batch_size=B, seed=2)
    g = torch.Generator().manual_seed(2)
    model = tasks.ProbeRNN(1, H, nonlinearity)
    vinit.init_recurrent_(model, init, generator=g)
    x = torch.rand(T, B, 1, generator=g)
    rnn = vgkernels.nn.RNN(1, H, nonlinearity=nonlinearity, track=True)
    rnn.load_state_dict({f"{k}_l0": v for k, v in model.state_dict().items()})
    out, _ = rnn(x)
    out[-1].sum().backward()
    expected = rnn.trace.grad_norm[0].double()
    got = torch.tensor(probe.grad_norms, dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-30)
    assert probe.last == pytest.approx(math.sqrt(B * H), rel=1e-6)  # ∂(sum h_{T-1})/∂h_{T-1} = 1


def rnn_by_hand(model, x, activation, bn_stats=None):
    """The probe's step equations with torch.nn.functional, states retained."""
    act = ACT[activation]
    H = model.hidden_size
    h = torch.zeros(x.shape[1], H)
    states = []
    for t in range(x.shape[0]):
        a_x, a_h = x[t] @ model.weight_ih.t(), h @ model.weight_hh.t()
        if model.batch_norm:
            def bn(a, side, t=t):
                mean, var = batch_stats(a) if bn_stats is None else bn_stats[side][t]
                weight, bias = getattr(model, f"norm_{side}_weight"), getattr(model, f"norm_{side}_bias")
                return (a - mean) / torch.sqrt(var + 1e-5) * weight + bias

            a = bn(a_x, "ih") + bn(a_h, "hh")
        elif model.layer_norm:
            s = a_x + a_h
            a = (s - s.mean(-1, keepdim=True)) / torch.sqrt(s.var(-1, unbiased=False, keepdim=True) + 1e-5)
            a = a * model.norm_weight + model.norm_bias
        else:
            a = a_x + a_h
        a = a + model.bias_ih + model.bias_hh
        if model.highway:
            gate = torch.sigmoid(a[:, H:])
            h = gate * act(a[:, :H]) + (1 - gate) * h
        else:
            h = act(a)
        h.retain_grad()
        states.append(h)
    return states


@pytest.mark.parametrize("activation, init, kwargs", [
    ("selu", "lecun", {"highway": True, "highway_bias": -1.0}),
    ("gelu", "he", {"layer_norm": True}),
    ("elu", "xavier", {"batch_norm": "train"}),
    ("silu", "orthogonal", {"batch_norm": "eval", "highway": True}),
    ("leaky_relu", "irnn", {}),
])
def test_rnn_probe_matches_the_equations(activation, init, kwargs):
    T, B, H = 6, 3, 4
    probe = tasks.rnn_gradient_probe(T, H, activation, init, batch_size=B, seed=1, **kwargs)
    g = torch.Generator().manual_seed(1)
    batch_norm = kwargs.get("batch_norm")
    model = tasks.ProbeRNN(
        1, H, activation, highway=kwargs.get("highway", False), layer_norm=kwargs.get("layer_norm", False),
        batch_norm=batch_norm is not None, max_steps=T,
    )
    vinit.init_recurrent_(model, init, generator=g)
    if model.highway:
        model.set_highway_bias(kwargs.get("highway_bias", tasks.HIGHWAY_BIAS))
    x = torch.rand(T, B, 1, generator=g)
    bn_stats = None
    if batch_norm == "eval":
        model.eval()
        runs = [torch.rand(T, B, 1, generator=g) for _ in range(tasks.CALIBRATION_BATCHES)]
        # the statistics of every step over the calibration batches (training-mode forward, no grad)
        per_run = []
        for run in runs:
            with torch.no_grad():
                stats = {"ih": [], "hh": []}
                h = torch.zeros(B, H)
                act = ACT[activation]
                for t in range(T):
                    parts = {"ih": run[t] @ model.weight_ih.t(), "hh": h @ model.weight_hh.t()}
                    a = model.bias_ih + model.bias_hh
                    for side, z in parts.items():
                        stats[side].append((z.mean(0), z.var(0, unbiased=True)))
                        mean, var = batch_stats(z)
                        a = a + (z - mean) / torch.sqrt(var + 1e-5) * getattr(model, f"norm_{side}_weight")
                    gate = torch.sigmoid(a[:, H:]) if model.highway else 1.0
                    h = gate * act(a[:, :H]) + (1 - gate) * h if model.highway else act(a)
                per_run.append(stats)
        n = len(per_run)
        bn_stats = {side: [(sum(r[side][t][0] for r in per_run) / n, sum(r[side][t][1] for r in per_run) / n)
                           for t in range(T)] for side in ("ih", "hh")}
    states = rnn_by_hand(model, x, activation, bn_stats)
    states[-1].sum().backward()
    expected = [s.grad.double().norm().item() for s in states]
    assert probe.grad_norms == pytest.approx(expected, rel=1e-5)
    assert probe.seq_len == T and probe.batch_norm == batch_norm and probe.init == init


# The known results through time: T = 100, H = 64, B = 32, seeds 0-2, loss = sum of h_{T-1}.
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rnn_probe_known_results(seed):
    def ratio(activation, init, **kwargs):
        return tasks.rnn_gradient_probe(100, 64, activation, init, seed=seed, **kwargs).ratio

    plain = ratio("tanh", "default")
    assert plain < 1e-15  # the tanh RNN with torch's default weights (Bengio et al. 1994)
    # IRNN: ReLU with W_hh = I carries the gradient (Le et al. 2015).
    assert 0.1 <= ratio("relu", "irnn") <= 10
    # A carry gate that starts open keeps it over 100 steps (Srivastava et al. 2015; Zilly et al. 2017).
    assert ratio("tanh", "default", highway=True, highway_bias=-3.0) > 1e-2
    # SELU with LeCun weights keeps it within two orders of magnitude (measured: 0.12-0.57).
    assert 1e-2 <= ratio("selu", "lecun") <= 1e2
    # Recurrent BatchNorm (Cooijmans et al. 2017) keeps at least a million times more than the plain RNN.
    assert ratio("tanh", "default", batch_norm="train") > 1e6 * plain
    assert ratio("tanh", "default", batch_norm="eval") > 1e6 * plain


def test_rnn_probe_module_and_bad_inputs():
    rnn = tasks.ProbeRNN(2, 3, "gelu", batch_norm=True, max_steps=4)
    assert torch.equal(rnn.norm_hh_weight, torch.full((3,), tasks.RECURRENT_BN_GAIN))
    assert rnn.running_mean_ih.shape == (4, 3)
    out, states = rnn(torch.rand(4, 5, 2))
    assert out.shape == (4, 5, 3) and len(states) == 4
    with pytest.raises(ValueError, match="max_steps = 4 steps, got T = 5"):
        rnn(torch.rand(5, 5, 2))
    with pytest.raises(ValueError, match=r"x must be a tensor \[T, B, 2\], got \(4, 2\)"):
        rnn(torch.rand(4, 2))
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        tasks.ProbeRNN(2, 3, batch_norm=True, max_steps=0)
    with pytest.raises(ValueError, match="no highway gate"):
        rnn.set_highway_bias(-1.0)
    highway = tasks.ProbeRNN(1, 3, highway=True, layer_norm=True, norm_gain=0.5)
    assert highway.weight_hh.shape == (6, 3) and torch.equal(highway.norm_weight, torch.full((6,), 0.5))
    highway.set_highway_bias(-4.0)
    torch.testing.assert_close(highway.bias_ih[3:] + highway.bias_hh[3:], torch.full((3,), -4.0))
    with pytest.raises(ValueError, match="init must be one of .* got 'standard'"):
        tasks.rnn_gradient_probe(5, 3, "tanh", "standard")
    with pytest.raises(ValueError, match="activation must be one of"):
        tasks.rnn_gradient_probe(5, 3, "softsign")
    with pytest.raises(ValueError, match="layer_norm and batch_norm"):
        tasks.rnn_gradient_probe(5, 3, layer_norm=True, batch_norm="eval")
    gain1 = tasks.rnn_gradient_probe(5, 3, batch_norm="train", norm_gain=1.0)
    assert gain1.grad_norms != tasks.rnn_gradient_probe(5, 3, batch_norm="train").grad_norms
    one = tasks.rnn_gradient_probe(1, 1, "silu", "he", batch_size=1)
    assert len(one.grad_norms) == 1 and one.ratio == 1.0
