"""Drop-in replacements for ``torch.nn.LSTM``, ``GRU`` and ``RNN`` whose BPTT can be traced.

Parameter names, shapes, initialization, arguments and outputs are torch.nn's, so state_dicts load in
both directions. The extra keyword arguments are ``track``, ``grad_clip``, ``layer_norm`` and
``backend``; the last forward's :class:`~vgkernels.trace.BPTTTrace` is ``module.trace``.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from vgkernels.ops.recurrent import GATES, layer_norm_names, recurrent, weight_names
from vgkernels.trace import BPTTTrace

HiddenState = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class RecurrentBase(nn.Module):
    """Common machinery of :class:`LSTM`, :class:`GRU` and :class:`RNN` (not used directly)."""

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        *,
        track: bool = False,
        grad_clip: float | None = None,
        layer_norm: bool = False,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1 or isinstance(dropout, bool):
            raise ValueError(f"dropout: expected a number in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                f"expects num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                stacklevel=2,
            )
        if grad_clip is not None and not (isinstance(grad_clip, numbers.Real) and grad_clip > 0):
            raise ValueError(f"grad_clip: expected a positive number or None, got {grad_clip!r}")
        if layer_norm and mode not in ("lstm", "gru"):
            raise ValueError(f"layer_norm: layer-normalized cells exist for LSTM and GRU, not {mode!r}")
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.track = track
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.layer_norm = layer_norm
        self.backend = backend
        self.trace: BPTTTrace | None = None

        gate_size = GATES[mode] * hidden_size
        factory = {"device": device, "dtype": dtype}
        self._flat_weights_names = weight_names(num_layers, self.num_directions, bias)
        for name in self._flat_weights_names:
            layer = int(name.split("_l")[1].split("_")[0])
            layer_input = input_size if layer == 0 else hidden_size * self.num_directions
            shape = {"weight_ih": (gate_size, layer_input), "weight_hh": (gate_size, hidden_size)}.get(
                name[:9], (gate_size,))
            self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
        self._layer_norm_names = layer_norm_names(mode, num_layers, self.num_directions) if layer_norm else []
        for name in self._layer_norm_names:
            size = hidden_size if "_cell_" in name else gate_size
            self.register_parameter(name, nn.Parameter(torch.empty(size, **factory)))
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Per layer and direction, the parameters in torch.nn's order."""
        per = 4 if self.bias else 2
        flat = [getattr(self, n) for n in self._flat_weights_names]
        return [flat[i: i + per] for i in range(0, len(flat), per)]

    def reset_parameters(self) -> None:
        """torch.nn's initialization: weights and biases U(-1/sqrt(H), 1/sqrt(H)); layer-norm gains 1
        and shifts 0."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name in self._flat_weights_names:
            nn.init.uniform_(getattr(self, name), -bound, bound)
        for name in self._layer_norm_names:
            (nn.init.ones_ if name.endswith("weight", 0, name.rindex("_l")) else nn.init.zeros_)(
                getattr(self, name))

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        for name in ("track", "grad_clip", "layer_norm", "backend"):
            if getattr(self, name):
                s += f", {name}={getattr(self, name)!r}"
        return s

    def _check_hidden(self, hx, batched: bool) -> None:
        tensors = hx if isinstance(hx, tuple) else (hx,)
        expected = 3 if batched else 2
        kind = "batched 3-D" if batched else "unbatched 2-D"
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"hx: expected a tensor, got {type(t).__name__}")
            if t.dim() != expected:
                raise ValueError(
                    f"hx: for {kind} input, hx should also be {expected}-D but got a {t.dim()}-D tensor"
                )

    def forward(self, input: torch.Tensor | PackedSequence, hx: HiddenState | None = None):
        """Run the network; the same inputs and outputs as the torch.nn module.

        Args:
            input: [T, B, input_size] (or [B, T, input_size] with batch_first), [T, input_size]
                unbatched, or a PackedSequence. float32/float64 on the CPU (cpp backend); also
                bfloat16/float16 on CUDA (triton backend).
            hx: h0 [L, B, H] (LSTM: a tuple (h0, c0)), [L, H] when unbatched, or None for zeros;
                L = num_layers * num_directions.
        Returns:
            (output, h_n) for RNN and GRU, (output, (h_n, c_n)) for LSTM; output is
            [T, B, num_directions * H] (batch_first: [B, T, ...]; unbatched: [T, ...]) or a
            PackedSequence like the input.
        """
        packed = isinstance(input, PackedSequence)
        lengths = None
        if packed:
            x, lengths = pad_packed_sequence(input)
            batched = True
        else:
            if not isinstance(input, torch.Tensor):
                raise TypeError(f"input: expected a Tensor or PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"input: expected a 2-D (unbatched) or 3-D (batched) tensor, got {input.dim()}-D "
                    f"with shape {tuple(input.shape)}"
                )
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                x = x.transpose(0, 1)
        if x.shape[-1] != self.input_size:
            raise ValueError(f"input: expected input_size={self.input_size} features, got {x.shape[-1]}")
        if hx is not None:
            if self.mode == "lstm" and not isinstance(hx, tuple):
                raise TypeError(f"hx: the LSTM expects a tuple (h0, c0), got {type(hx).__name__}")
            if self.mode != "lstm" and isinstance(hx, tuple):
                raise TypeError(f"hx: {type(self).__name__} expects one tensor h0, got a tuple")
            self._check_hidden(hx, batched)
            if not batched:
                hx = tuple(t.unsqueeze(1) for t in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
        output, h_n, c_n, trace = recurrent(
            x,
            hx,
            [getattr(self, n) for n in self._flat_weights_names],
            mode=self.mode,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            bias=self.bias,
            dropout=self.dropout,
            training=self.training,
            bidirectional=self.bidirectional,
            lengths=lengths,
            track=self.track,
            grad_clip=self.grad_clip,
            layer_norm_weights=[getattr(self, n) for n in self._layer_norm_names] or None,
            backend=self.backend,
        )
        if trace is not None:
            self.trace = trace
        if packed:
            output = _repack(output, lengths, input)
        elif not batched:
            output, h_n = output.squeeze(1), h_n.squeeze(1)
            c_n = None if c_n is None else c_n.squeeze(1)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return (output, (h_n, c_n)) if self.mode == "lstm" else (output, h_n)


def _repack(padded: torch.Tensor, lengths: torch.Tensor, like: PackedSequence) -> PackedSequence:
    """Pack a padded [T, B, *] output with the batch order and sizes of the input sequence."""
    order = like.sorted_indices
    if order is not None:
        padded, lengths = padded.index_select(1, order), lengths.index_select(0, order.cpu())
    data = pack_padded_sequence(padded, lengths, enforce_sorted=True).data
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


class LSTM(RecurrentBase):
    """Drop-in ``torch.nn.LSTM`` (no ``proj_size``) with traced BPTT.

    Extra keyword arguments: ``track`` (record a BPTTTrace each forward), ``grad_clip`` (clamp the
    gate pre-activation gradients to [-c, c] at every BPTT step, Graves 2013), ``layer_norm`` (the
    layer-normalized cell of Ba et al. 2016: gates = LN(W_ih x) + LN(W_hh h) + b and
    h = o * tanh(LN(c)), with extra parameters ``layer_norm_{ih,hh,cell}_{weight,bias}_l<k>``),
    ``backend`` ("cpp", "triton", "reference" or None).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 **kwargs) -> None:
        super().__init__("lstm", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, **kwargs)


class GRU(RecurrentBase):
    """Drop-in ``torch.nn.GRU`` with traced BPTT; the same extra arguments as :class:`LSTM`."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 **kwargs) -> None:
        super().__init__("gru", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, **kwargs)


class RNN(RecurrentBase):
    """Drop-in ``torch.nn.RNN`` with traced BPTT; ``nonlinearity`` is "tanh", "relu" or "sigmoid".

    The same extra arguments as :class:`LSTM`.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, **kwargs) -> None:
        if nonlinearity not in ("tanh", "relu", "sigmoid"):
            raise ValueError(f"nonlinearity: expected 'tanh', 'relu' or 'sigmoid', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(f"rnn_{nonlinearity}", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, **kwargs)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", nonlinearity={self.nonlinearity!r}" if self.nonlinearity != "tanh" else "")
