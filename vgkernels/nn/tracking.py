"""``vgk.track(model)``: trace the BPTT of every vgkernels recurrent module (layers, cells) in a model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from vgkernels.nn.cell import CellBase
from vgkernels.nn.rnn import RecurrentBase
from vgkernels.ops.cell import CellTrace
from vgkernels.trace import BPTTTrace

# The modules that take ``track`` and set ``trace``.
TRACKABLE = (RecurrentBase, CellBase)


@contextmanager
def track(model: nn.Module) -> Iterator[dict[str, BPTTTrace | CellTrace]]:
    """Switch tracking on for every vgkernels recurrent module in ``model`` while the block runs.

    Yields a dict from qualified module name (as in ``named_modules()``, ``""`` for ``model`` itself)
    to the trace of that module's latest forward inside the block: a :class:`~vgkernels.trace.BPTTTrace`
    for the layers (LSTM, GRU, RNN), a :class:`~vgkernels.ops.cell.CellTrace` of the latest call for
    the cells (a cell called once per step leaves one trace per call in ``cell.trace`` as it goes).
    The gradient fields fill in when backward runs, inside or after the block. Each module's own
    ``track`` setting is restored on exit.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, TRACKABLE)]
    if not modules:
        raise ValueError(
            f"model: {type(model).__name__} contains no vgkernels recurrent module (LSTM, GRU, RNN or their "
            "cells) to track"
        )
    traces: dict[str, BPTTTrace] = {}
    saved = []

    def store(name: str):
        def hook(module: nn.Module, args, output) -> None:
            if module.trace is not None:
                traces[name] = module.trace

        return hook

    for name, module in modules:
        saved.append((module, module.track, module.register_forward_hook(store(name))))
        module.track = True
    try:
        yield traces
    finally:
        for module, previous, handle in saved:
            module.track = previous
            handle.remove()
