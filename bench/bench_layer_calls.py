"""CPU benchmarks of the recurrent layers' call paths against torch.nn, fp32, 2 threads.

- One-step calls (T = 1), as a decoder or a time-series model calls a layer once per step: LSTM and GRU,
  B in {1, 32}, input = hidden in {256, 1024}, forward+backward (a backward per call) and no_grad forward.
  Each timed round makes CALLS consecutive calls, the state of one fed to the next, and the time per call
  is the round's time over CALLS. Target: <= 1.2x torch.nn's per-call time.
- A PackedSequence under no_grad (inference on variable-length batches): T = 100, B = 32, lengths drawn
  uniformly from 1..T (seeded), input = hidden = 256. Target: <= 1.0x torch.nn.

Candidates run interleaved in one process; each case records the ratio of the medians (vgkernels over
torch.nn) with the machine, under bench/results/layer_calls_<device>.json and .md.
"""

import pytest
import torch
from harness import interleaved
from torch.nn.utils.rnn import pack_padded_sequence

import vgkernels as vgk

CELLS = {"lstm": (vgk.nn.LSTM, torch.nn.LSTM), "gru": (vgk.nn.GRU, torch.nn.GRU)}
CALLS = {256: 20, 1024: 4}  # calls per timed round
ROUNDS = 30
PACKED_T, PACKED_B, PACKED_SIZE, PACKED_ROUNDS = 100, 32, 256, 15


def _pair(cell: str, size: int):
    torch.manual_seed(0)
    ours_cls, theirs_cls = CELLS[cell]
    ours, theirs = ours_cls(size, size), theirs_cls(size, size)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _step_calls(model: torch.nn.Module, x: torch.Tensor, calls: int, backward: bool):
    """A closure making ``calls`` one-step calls, each fed the previous state (detached), with a backward
    of out.sum() after every call when ``backward``."""
    lstm = isinstance(model, torch.nn.LSTM)

    def run() -> None:
        hx = None
        for p in model.parameters():
            p.grad = None
        for _ in range(calls):
            if backward:
                out, hx = model(x, hx)
                out.sum().backward()
                hx = tuple(h.detach() for h in hx) if lstm else hx.detach()
            else:
                with torch.no_grad():
                    out, hx = model(x, hx)

    return run


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("size", [256, 1024])
@pytest.mark.parametrize("backward", [True, False], ids=["fwd+bwd", "no_grad"])
def test_one_step_calls(cell, batch, size, backward, benchmark, compare_record):
    ours, theirs = _pair(cell, size)
    x = torch.randn(1, batch, size, requires_grad=backward)
    calls = CALLS[size]
    baseline = f"torch.nn.{cell.upper()}"
    candidates = {"vgkernels": _step_calls(ours, x, calls, backward),
                  baseline: _step_calls(theirs, x, calls, backward)}
    kind = "fwd+bwd" if backward else "no_grad fwd"
    comparison = compare_record(interleaved(
        f"{cell} T=1 {kind} B={batch} I=H={size} fp32, per call ({calls} calls per round)", candidates,
        baseline=baseline, rounds=ROUNDS, warmup=3))
    comparison.extra["target vgkernels / torch.nn"] = "<= 1.2"
    comparison.extra["vgkernels us per call"] = round(comparison.median("vgkernels") / calls * 1e6, 1)
    comparison.extra["torch.nn us per call"] = round(comparison.median(baseline) / calls * 1e6, 1)
    benchmark.extra_info.update(comparison.summary())
    benchmark.pedantic(candidates["vgkernels"], rounds=3, iterations=1)


@pytest.mark.parametrize("cell", list(CELLS))
def test_packed_no_grad_forward(cell, benchmark, compare_record):
    ours, theirs = _pair(cell, PACKED_SIZE)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, PACKED_T + 1, (PACKED_B,), generator=g)
    x = pack_padded_sequence(torch.randn(PACKED_T, PACKED_B, PACKED_SIZE, generator=g), lengths,
                             enforce_sorted=False)

    def forward(model):
        def run() -> None:
            with torch.no_grad():
                model(x)
        return run

    baseline = f"torch.nn.{cell.upper()}"
    candidates = {"vgkernels": forward(ours), baseline: forward(theirs)}
    comparison = compare_record(interleaved(
        f"{cell} packed no_grad fwd T={PACKED_T} B={PACKED_B} I=H={PACKED_SIZE} fp32, lengths U(1..T)",
        candidates, baseline=baseline, rounds=PACKED_ROUNDS, warmup=2))
    comparison.extra["target vgkernels / torch.nn"] = "<= 1.0"
    comparison.extra["positions held / padded"] = round(int(lengths.sum()) / (PACKED_T * PACKED_B), 3)
    benchmark.extra_info.update(comparison.summary())
    benchmark.pedantic(candidates["vgkernels"], rounds=3, iterations=1)
