"""CPU benchmarks of one call of the fused cells, and of a T = 1 layer call, against torch.nn, fp32.

Target: per-call time of vgk.nn.LSTMCell / GRUCell / RNNCell <= 1.2x torch.nn's cells at B in {1, 32}
and input = hidden = H in {256, 1024}, forward + backward and forward under no_grad, on 2 threads
(VGK_BENCH_THREADS). Each timed round runs CALLS[H] calls, so that a round is long against the
clock's resolution; the ratio is of the medians of the rounds, the candidates interleaved. A
forward + backward call is one step and the backward of its outputs' sum, the input and the state
requiring grad (as in a decoder). Also measured, for information: the tracked cell, and a T = 1 call
of the recurrent layers against torch.nn's layers.
"""

import pytest
import torch
from harness import interleaved

import vgkernels as vgk

KINDS = {"lstm": ("LSTMCell", "LSTM"), "gru": ("GRUCell", "GRU"), "rnn_tanh": ("RNNCell", "RNN")}
SHAPES = [(1, 256), (32, 256), (1, 1024), (32, 1024)]
PHASES = ["forward+backward", "no_grad forward"]
CALLS = {256: 40, 1024: 4}  # calls per timed round
ROUNDS = 15
TARGET = 1.2


def _one_call(module, x, state, phase: str, calls: int):
    """A closure running ``calls`` calls of ``module`` (a cell, or a layer on [1, B, H] input)."""

    def step():
        return torch.utils._pytree.tree_leaves(module(x, state))  # every output tensor

    if phase == "no_grad forward":
        def run():
            with torch.no_grad():
                for _ in range(calls):
                    step()
    else:
        def run():
            for _ in range(calls):
                sum(t.sum() for t in step()).backward()
    return run


def _candidates(kind: str, B: int, H: int, phase: str, layer: bool) -> dict:
    """vgkernels (and, for the cells, vgkernels tracked) and torch.nn with the same weights, on one
    input [B, H] (a layer: [1, B, H]) and state."""
    name = KINDS[kind][1 if layer else 0]
    ours = getattr(vgk.nn, name)(H, H, backend="cpp")
    models = {"vgkernels": ours}
    if not layer:
        models["vgkernels tracked"] = getattr(vgk.nn, name)(H, H, backend="cpp", track=True)
    models[f"torch.nn.{name}"] = getattr(torch.nn, name)(H, H)
    for model in models.values():
        model.load_state_dict(ours.state_dict())
    grad = phase != "no_grad forward"
    shape = (1, B, H) if layer else (B, H)
    x, h, c = (torch.randn(shape, requires_grad=grad) for _ in range(3))
    state = (h, c) if kind == "lstm" else h
    return {label: _one_call(model, x, state, phase, CALLS[H]) for label, model in models.items()}


def _compare(case: str, candidates: dict, baseline: str, H: int, compare_record):
    comparison = compare_record(interleaved(case, candidates, baseline=baseline, rounds=ROUNDS))
    comparison.extra["vgkernels us per call"] = round(comparison.median("vgkernels") / CALLS[H] * 1e6, 1)
    return comparison


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("B, H", SHAPES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_cell_call_vs_torch(kind, B, H, phase, benchmark, compare_record):
    name = KINDS[kind][0]
    candidates = _candidates(kind, B, H, phase, layer=False)
    comparison = _compare(f"{name} {phase} B={B} I=H={H} fp32, {CALLS[H]} calls per round", candidates,
                          f"torch.nn.{name}", H, compare_record)
    comparison.extra["target vgkernels / torch.nn"] = f"<= {TARGET}"
    comparison.extra["met"] = comparison.ratio("vgkernels") <= TARGET
    benchmark.extra_info.update(comparison.summary())
    benchmark.pedantic(candidates["vgkernels"], rounds=3, iterations=1)


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("B, H", SHAPES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_layer_t1_call_vs_torch(kind, B, H, phase, benchmark, compare_record):
    name = KINDS[kind][1]
    candidates = _candidates(kind, B, H, phase, layer=True)
    comparison = _compare(f"{name} T=1 {phase} B={B} I=H={H} fp32, {CALLS[H]} calls per round", candidates,
                          f"torch.nn.{name}", H, compare_record)
    benchmark.extra_info.update(comparison.summary())
    benchmark.pedantic(candidates["vgkernels"], rounds=3, iterations=1)
