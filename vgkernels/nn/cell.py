"""Drop-in ``torch.nn.LSTMCell``, ``GRUCell`` and ``RNNCell``: one fused step per call, optionally traced.

They are subclasses of torch's cells, built by torch's own ``__init__``: the same parameters
(``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``), shapes and initialization, so state_dicts
load in both directions, and the same inputs, outputs and errors. The extra keyword arguments are
``track`` (``module.trace`` is then the :class:`~vgkernels.ops.cell.CellTrace` of the latest call) and
``backend``.
"""

from __future__ import annotations

import torch
from torch import nn

from vgkernels.backends import BACKENDS, resolve_backend
from vgkernels.ops.cell import CELL_NAMES, CellTrace, step

HiddenState = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
_RNN_MODES = {"tanh": "rnn_tanh", "relu": "rnn_relu", "sigmoid": "rnn_sigmoid"}


def _autocast_dtypes(
    mode: str, input: torch.Tensor, state: torch.Tensor | None
) -> tuple[torch.dtype, torch.dtype] | None:
    """(compute dtype, output dtype) of torch.nn's cell under autocast, or None outside autocast.

    torch.nn's cells are compositions: under CPU autocast their products run in the autocast dtype
    and the rest follows type promotion, so the RNN cell returns the autocast dtype, and the LSTM and
    GRU cells the promotion of it with their state's dtype (that of the input for a zero state). Ours
    computes those in float32. On CUDA the three cells autocast to the lower precision.
    """
    device_type = input.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    low = torch.get_autocast_dtype(device_type)
    if device_type != "cpu":
        return low, low
    if mode in ("lstm", "gru"):
        return torch.float32, torch.promote_types(low, (input if state is None else state).dtype)
    return torch.float32, low


class CellBase(nn.RNNCellBase):
    """Common machinery of :class:`LSTMCell`, :class:`GRUCell` and :class:`RNNCell` (not used directly)."""

    track: bool
    backend: str | None
    trace: CellTrace | None

    def _init_extras(self, track: bool, backend: str | None) -> None:
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
        self.track = track
        self.backend = backend
        self.trace = None

    def _mode(self) -> str:
        raise NotImplementedError

    def extra_repr(self) -> str:
        s = super().extra_repr()
        for name in ("track", "backend"):
            if getattr(self, name):
                s += f", {name}={getattr(self, name)!r}"
        return s

    def forward(self, input: torch.Tensor, hx: HiddenState | None = None) -> HiddenState:
        """One step; the same inputs, outputs and errors as the torch.nn cell.

        Args:
            input: [B, input_size] or [input_size] (unbatched). float32/float64; float16/bfloat16 are
                computed in float32 on the CPU.
            hx: None (zeros), or h [B, hidden_size] ([hidden_size] when unbatched); for the LSTM a
                tuple (h, c).
        Returns:
            h' [B, hidden_size] (unbatched: [hidden_size]); for the LSTM the tuple (h', c').
        """
        mode = self._mode()
        lstm = mode == "lstm"
        dim = input.dim()
        if dim not in (1, 2):
            raise ValueError(f"{CELL_NAMES[mode]}: Expected input to be 1D or 2D, got {dim}D instead")
        h0 = c0 = None
        if hx is not None:
            if lstm:
                for idx, value in enumerate(hx):
                    if value.dim() not in (1, 2):
                        raise ValueError(
                            f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
                h0, c0 = hx
            else:
                if hx.dim() not in (1, 2):
                    raise ValueError(
                        f"{CELL_NAMES[mode]}: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
                h0 = hx
        batched = dim == 2
        if not batched:
            input = input.unsqueeze(0)
            h0 = None if h0 is None else h0.unsqueeze(0)
            c0 = None if c0 is None else c0.unsqueeze(0)
        weights = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        autocast = _autocast_dtypes(mode, input, c0 if lstm else h0)
        if autocast is not None:
            compute = autocast[0]
            input, h0, c0, *weights = (t if t is None or t.dtype in (compute, torch.float64)
                                       else t.to(compute) for t in (input, h0, c0, *weights))
        backend = resolve_backend(self.backend, input.device, op=f"vgkernels {CELL_NAMES[mode]}")
        h, c, trace = step(backend, mode, input, h0, c0, *weights, self.track)
        if trace is not None:
            self.trace = trace
        if autocast is not None:
            h = h.to(autocast[1])
            c = None if c is None else c.to(autocast[1])
        if not batched:
            h = h.squeeze(0)
            c = None if c is None else c.squeeze(0)
        return (h, c) if lstm else h


class LSTMCell(CellBase, nn.LSTMCell):
    """Drop-in ``torch.nn.LSTMCell``, fused: one GEMM pair and one pointwise pass per call.

    ``track=True``: ``module.trace`` is the :class:`~vgkernels.ops.cell.CellTrace` of the latest call,
    with the Frobenius norm of ∂(h', c')/∂(h, c) per sample and, after backward, the norms of the
    gradients reaching the input and output states. ``backend``: "cpp", "triton", "reference" or None.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, *, track: bool = False,
                 backend: str | None = None, device=None, dtype=None) -> None:
        nn.LSTMCell.__init__(self, input_size, hidden_size, bias, device=device, dtype=dtype)
        self._init_extras(track, backend)

    def _mode(self) -> str:
        return "lstm"


class GRUCell(CellBase, nn.GRUCell):
    """Drop-in ``torch.nn.GRUCell``, fused; the same extra arguments as :class:`LSTMCell`
    (the Jacobian is ∂h'/∂h)."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, *, track: bool = False,
                 backend: str | None = None, device=None, dtype=None) -> None:
        nn.GRUCell.__init__(self, input_size, hidden_size, bias, device=device, dtype=dtype)
        self._init_extras(track, backend)

    def _mode(self) -> str:
        return "gru"


class RNNCell(CellBase, nn.RNNCell):
    """Drop-in ``torch.nn.RNNCell``, fused; ``nonlinearity`` is "tanh", "relu" or "sigmoid".

    The same extra arguments as :class:`LSTMCell` (the Jacobian is ∂h'/∂h).
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh", *,
                 track: bool = False, backend: str | None = None, device=None, dtype=None) -> None:
        if nonlinearity not in _RNN_MODES:
            raise ValueError(f"nonlinearity: expected 'tanh', 'relu' or 'sigmoid', got {nonlinearity!r}")
        nn.RNNCell.__init__(self, input_size, hidden_size, bias, nonlinearity, device=device, dtype=dtype)
        self._init_extras(track, backend)

    def _mode(self) -> str:
        mode = _RNN_MODES.get(self.nonlinearity)
        if mode is None:  # torch.nn raises the same at call time
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        return mode


# Whole-model checkpoints of these modules load under torch.load's default weights_only=True.
torch.serialization.add_safe_globals([LSTMCell, GRUCell, RNNCell, CellTrace])
