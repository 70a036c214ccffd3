"""Tests of vgkernels.tasks: the adding problem, copy memory, their baselines and the deep-MLP probe.

Tolerances: the Monte Carlo estimate of the adding baseline must lie within 5 standard errors of
1/6 (SE = sqrt(Var((y-1)^2) / n) with Var = 1/15 - 1/36 = 7/180 for y - 1 triangular on [-1, 1]).
The copy-memory baseline is estimated with per-position frequencies fitted on one sample and scored
on another; it must match 10 ln 8 / (T + 20) within 1% (the estimator's bias is about 7/(2n) nats per
symbol, n = 40,000). The probe's norms must equal an independent autograd computation to 1e-6
relative; the structural checks are exact.
"""

import math

import pytest
import torch

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


@pytest.mark.parametrize(
    "activation, init, residual, layer_norm",
    [("sigmoid", "standard", False, False), ("relu", "he", True, True), ("tanh", "xavier", False, True)],
)
def test_mlp_probe_matches_autograd(activation, init, residual, layer_norm):
    depth, width, batch = 5, 37, 3
    probe = tasks.mlp_gradient_probe(
        depth, width, activation, init, residual=residual, layer_norm=layer_norm, batch_size=batch, seed=4
    )
    g = torch.Generator().manual_seed(4)
    model = tasks.deep_mlp(
        depth, width, activation, init, residual=residual, layer_norm=layer_norm, generator=g
    )
    x = torch.randn(batch, width, generator=g)
    act = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}[activation]
    h = x
    for block in model:  # the block equations written out with torch.nn.functional
        z = h
        if layer_norm:
            z = torch.nn.functional.layer_norm(z, (width,), block.norm.weight, block.norm.bias)
        z = act(torch.nn.functional.linear(z, block.linear.weight, block.linear.bias))
        h = h + z if residual else z
    grads = torch.autograd.grad(h.sum(), [b.linear.weight for b in model])
    expected = [gr.norm().item() for gr in grads]
    assert probe.weight_grad_norms == pytest.approx(expected, rel=1e-6)
    assert probe.ratio == pytest.approx(expected[0] / expected[-1], rel=1e-6)
    assert probe.depth == depth and len(probe.weight_grad_norms) == depth
    assert ("LayerNorm" in probe.setup) == layer_norm and ("residual" in probe.setup) == residual


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
    import vgkernels

    ln = tasks.deep_mlp(1, 8, layer_norm=True)
    assert isinstance(ln[0].norm, vgkernels.nn.LayerNorm)


def test_mlp_probe_shows_sigmoid_vanishing_and_he_not():
    sigmoid = tasks.mlp_gradient_probe(20, 64, "sigmoid", "standard", batch_size=16)
    relu = tasks.mlp_gradient_probe(20, 64, "relu", "he", batch_size=16)
    normed = tasks.mlp_gradient_probe(20, 64, "sigmoid", "standard", layer_norm=True, batch_size=16)
    assert sigmoid.ratio < 1e-8
    assert 1e-2 < relu.ratio < 1e2
    assert 1e-2 < normed.ratio < 1e2


def test_mlp_bad_inputs():
    with pytest.raises(ValueError, match="activation"):
        tasks.deep_mlp(2, 4, "gelu")
    with pytest.raises(ValueError, match="init"):
        tasks.deep_mlp(2, 4, "relu", "lecun")
    with pytest.raises(ValueError, match="depth"):
        tasks.mlp_gradient_probe(0, 4)
