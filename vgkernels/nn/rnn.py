"""Drop-in replacements for ``torch.nn.LSTM``, ``GRU`` and ``RNN`` whose BPTT can be traced.

The classes subclass torch.nn's and are built by torch.nn's own ``__init__``: parameter names, shapes,
initialization, arguments and their errors, ``proj_size``, ``flatten_parameters``, ``_flat_weights``,
``all_weights``, ``check_forward_args``, ``permute_hidden``, ``.to()`` and pickling are torch.nn's, and
state_dicts load in both directions. Only ``forward`` is ours: it reads the current weights every call
(so parametrizations, pruning and weight norm apply, as in torch.nn) and runs the vgkernels ops. The
extra keyword arguments are ``track``, ``grad_clip``, ``layer_norm`` and ``backend``; the last tracked
forward's :class:`~vgkernels.trace.BPTTTrace` is ``module.trace``.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from vgkernels.backends import BACKENDS
from vgkernels.nn import _torch_tools
from vgkernels.ops.recurrent import GATES, layer_norm_names, recurrent
from vgkernels.trace import BPTTTrace

HiddenState = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

# The defaults of the extra arguments, also for modules unpickled from before they existed.
_EXTRA_DEFAULTS = {"track": False, "grad_clip": None, "layer_norm": False, "backend": None, "trace": None,
                   "_layer_norm_names": []}


class RecurrentBase(nn.RNNBase):
    """What :class:`LSTM`, :class:`GRU` and :class:`RNN` add to torch.nn's ``RNNBase`` (not used directly).

    ``mode`` is torch.nn's: ``"LSTM"``, ``"GRU"``, ``"RNN_TANH"``, ``"RNN_RELU"``, and ``"RNN_SIGMOID"``
    for the sigmoid RNN, a mode torch.nn has no kernel for (its code paths reject it instead of
    running another cell; ``flatten_parameters`` leaves it alone).
    """

    def _init_extras(self, track: bool, grad_clip: float | None, layer_norm: bool,
                     backend: str | None) -> None:
        """Check and set the extra arguments; add the layer-normalized cells' parameters."""
        for name, value in (("track", track), ("layer_norm", layer_norm)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
        if grad_clip is not None and not (
            isinstance(grad_clip, numbers.Real) and not isinstance(grad_clip, bool) and grad_clip > 0
        ):
            raise ValueError(f"grad_clip: expected a positive number or None, got {grad_clip!r}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
        if layer_norm and self.mode not in ("LSTM", "GRU"):
            raise ValueError(f"layer_norm: layer-normalized cells exist for LSTM and GRU, not {self.mode}")
        if layer_norm and self.proj_size:
            raise ValueError(f"layer_norm: the layer-normalized LSTM has no projection, got proj_size="
                             f"{self.proj_size}")
        self.track = track
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.layer_norm = layer_norm
        self.backend = backend
        self.trace: BPTTTrace | None = None
        # Beside torch.nn's flat weights, never among them: flatten_parameters and cuDNN see torch's list.
        self._layer_norm_names = (
            layer_norm_names(self.mode.lower(), self.num_layers, 2 if self.bidirectional else 1)
            if layer_norm else []
        )
        gate_size = GATES[self.mode.lower()] * self.hidden_size
        weight = self._flat_weights[0]
        for name in self._layer_norm_names:
            size = self.hidden_size if "_cell_" in name else gate_size
            self.register_parameter(
                name, nn.Parameter(torch.empty(size, device=weight.device, dtype=weight.dtype)))
        self._reset_layer_norm()

    def reset_parameters(self) -> None:
        """torch.nn's initialization, U(-1/sqrt(H), 1/sqrt(H)) for every weight and bias (the same random
        draws as torch.nn under the same seed); layer-norm gains 1 and shifts 0."""
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        layer_norm = set(getattr(self, "_layer_norm_names", ()))
        for name, weight in self.named_parameters():
            if layer_norm.isdisjoint(name.split(".")):
                nn.init.uniform_(weight, -stdv, stdv)
        self._reset_layer_norm()

    def _reset_layer_norm(self) -> None:
        layer_norm = set(getattr(self, "_layer_norm_names", ()))
        for name, weight in self.named_parameters():
            owner = layer_norm.intersection(name.split("."))
            if owner:
                # names are layer_norm_<ih|hh|cell>_<weight|bias>_l<k>[_reverse]
                gain = owner.pop().rsplit("_l", 1)[0].endswith("weight")
                (nn.init.ones_ if gain else nn.init.zeros_)(weight)

    def flatten_parameters(self) -> None:
        """torch.nn's, except for the sigmoid RNN: cuDNN has no such cell (torch.nn's version raises on
        its mode), so on a GPU its weights stay apart, as torch.nn leaves weights it cannot flatten."""
        if self.mode != "RNN_SIGMOID":
            super().flatten_parameters()

    def _weights_have_changed(self) -> bool:
        """torch.nn's check at every forward that no weight was replaced since the flat list was built
        (torch.func.functional_call, parametrizations), with one lookup a weight instead of two through
        Module.__getattr__: a decoder's T = 1 call feels each microsecond."""
        parameters = self._parameters
        for ref, name in zip(self._flat_weight_refs, self._flat_weights_names, strict=True):
            weight = parameters.get(name)
            if weight is None:
                # Parametrized (a property of the class, computed at each access: spectral_norm steps its
                # power iteration there), assigned otherwise, or absent: torch.nn's two accesses, so that
                # such state moves as under torch.nn.
                weight = getattr(self, name) if hasattr(self, name) else None
            if weight is not None and ref is not None and ref() is not weight:
                return True
        return False

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.mode == "RNN_SIGMOID":
            s += ", nonlinearity='sigmoid'"
        for name in ("track", "grad_clip", "layer_norm", "backend"):
            if getattr(self, name):
                s += f", {name}={getattr(self, name)!r}"
        return s

    def __setstate__(self, d: dict) -> None:
        super().__setstate__(d)
        for name, default in _EXTRA_DEFAULTS.items():
            if name not in d:
                setattr(self, name, list(default) if isinstance(default, list) else default)

    def forward(self, input: torch.Tensor | PackedSequence, hx: HiddenState | None = None):
        """Run the network; the same inputs, outputs and argument errors as the torch.nn module.

        Args:
            input: [T, B, input_size] (or [B, T, input_size] with batch_first), [T, input_size]
                unbatched, or a PackedSequence. float32/float64 on the CPU (cpp backend); also
                bfloat16/float16 on CUDA (triton backend).
            hx: h0 [L, B, P] (LSTM: a tuple (h0, c0) with c0 [L, B, H]), [L, P] when unbatched, or None
                for zeros; L = num_layers * num_directions, P = proj_size or H.
        Returns:
            (output, h_n) for RNN and GRU, (output, (h_n, c_n)) for LSTM; output is
            [T, B, num_directions * P] (batch_first: [B, T, ...]; unbatched: [T, ...]) or a
            PackedSequence like the input.
        """
        if torch.compiler.is_compiling():
            # What torch.nn's weak-reference bookkeeping would find, without it (Dynamo would break there).
            weights = [getattr(self, name) for name in self._flat_weights_names]
        else:
            self._update_flat_weights()
            weights = self._flat_weights
        lstm = self.mode == "LSTM"
        num_directions = 2 if self.bidirectional else 1
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        if hx is not None and lstm != isinstance(hx, (tuple, list)):  # noqa: UP038  (faster than a union)
            expected = "a tuple (h_0, c_0)" if lstm else "one tensor h_0"
            raise TypeError(f"hx: {type(self).__name__} expects {expected}, got {type(hx).__name__}")
        if isinstance(input, PackedSequence):
            orig_packed = input
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = int(batch_sizes[0])
            is_batched, batch_dim = True, 1
            if hx is not None:
                hx = self.permute_hidden(hx, sorted_indices)
        else:
            orig_packed = None
            batch_sizes = sorted_indices = unsorted_indices = None
            if not isinstance(input, torch.Tensor):
                raise TypeError(f"input: expected a Tensor or PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"{self.mode.split('_')[0]}: Expected input to be 2D or 3D, got "
                                 f"{input.dim()}D tensor instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            if hx is not None:
                _check_hidden_dims(hx, is_batched, lstm)
                if not is_batched:
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1)) if lstm else hx.unsqueeze(1)
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
        if hx is None:
            L = self.num_layers * num_directions
            h_zeros = torch.zeros(L, max_batch_size, real_hidden_size, dtype=input.dtype, device=input.device)
            hx = (h_zeros, torch.zeros(L, max_batch_size, self.hidden_size, dtype=input.dtype,
                                       device=input.device)) if lstm else h_zeros
        elif lstm:
            hx = tuple(hx)
        self.check_forward_args(input, hx, batch_sizes)

        time_major = input.transpose(0, 1) if self.batch_first and batch_sizes is None else input
        output, h_n, c_n, trace = recurrent(
            time_major,
            hx,
            weights,
            mode=self.mode.lower(),
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            bias=self.bias,
            dropout=self.dropout,
            training=self.training,
            bidirectional=bool(self.bidirectional),
            track=self.track,
            grad_clip=self.grad_clip,
            layer_norm_weights=[getattr(self, n) for n in self._layer_norm_names] or None,
            backend=self.backend,
            proj_size=self.proj_size,
            batch_sizes=batch_sizes,
        )
        if trace is not None:
            # A packed input runs sorted by length; the trace lists the samples in the input's order.
            self.trace = trace if unsorted_indices is None else trace.with_batch_index(unsorted_indices)
        hidden = (h_n, c_n) if lstm else h_n
        if orig_packed is not None:
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return output, self.permute_hidden(hidden, unsorted_indices)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1)) if lstm else hidden.squeeze(1)
        return output, hidden


def _check_hidden_dims(hx: HiddenState, is_batched: bool, lstm: bool) -> None:
    """torch.nn's RuntimeError for a hidden state of the wrong rank."""
    expected = 3 if is_batched else 2
    kind = "batched 3-D" if is_batched else "unbatched 2-D"
    if lstm:
        if hx[0].dim() != expected or hx[1].dim() != expected:
            raise RuntimeError(f"For {kind} input, hx and cx should also be {expected}-D but got "
                               f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
    elif hx.dim() != expected:
        raise RuntimeError(f"For {kind} input, hx should also be {expected}-D but got {hx.dim()}-D tensor")


class LSTM(RecurrentBase, nn.LSTM):
    """Drop-in ``torch.nn.LSTM`` (``proj_size`` included) with traced BPTT.

    Extra keyword arguments: ``track`` (record a BPTTTrace each forward), ``grad_clip`` (clamp the
    gate pre-activation gradients to [-c, c] at every BPTT step, Graves 2013), ``layer_norm`` (the
    layer-normalized cell of Ba et al. 2016: gates = LN(W_ih x) + LN(W_hh h) + b and
    h = o * tanh(LN(c)), with extra parameters ``layer_norm_{ih,hh,cell}_{weight,bias}_l<k>``; not with
    ``proj_size``), ``backend`` ("cpp", "triton", "reference" or None).

    With ``proj_size`` P > 0 the state is s = (h, c), h = W_hr (o * tanh(c)) of size P, c of size H:
    the trace's gradient norms are those of h (size P) and c, and its Jacobian norms those of
    ∂(h_t, c_t)/∂(h_{t-1}, c_{t-1}) (the formula is in the README). The triton backend has no projection
    yet (it raises).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, *, track: bool = False, grad_clip: float | None = None,
                 layer_norm: bool = False, backend: str | None = None) -> None:
        nn.LSTM.__init__(self, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device=device, dtype=dtype)
        self._init_extras(track, grad_clip, layer_norm, backend)


class GRU(RecurrentBase, nn.GRU):
    """Drop-in ``torch.nn.GRU`` with traced BPTT; the same extra arguments as :class:`LSTM`."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                 track: bool = False, grad_clip: float | None = None, layer_norm: bool = False,
                 backend: str | None = None, **kwargs) -> None:
        # kwargs: what torch.nn.GRU refuses (proj_size) reaches it and raises as it does there.
        nn.GRU.__init__(self, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                        device=device, dtype=dtype, **kwargs)
        self._init_extras(track, grad_clip, layer_norm, backend)


class RNN(RecurrentBase, nn.RNN):
    """Drop-in ``torch.nn.RNN`` with traced BPTT; ``nonlinearity`` is "tanh", "relu" or "sigmoid" (mode
    ``"RNN_SIGMOID"``, which torch.nn has not). The same extra arguments as :class:`LSTM`."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, *, track: bool = False, grad_clip: float | None = None,
                 layer_norm: bool = False, backend: str | None = None, **kwargs) -> None:
        if nonlinearity not in ("tanh", "relu", "sigmoid"):
            raise ValueError(f"nonlinearity: Unknown nonlinearity {nonlinearity!r}; expected 'tanh', 'relu' "
                             "or 'sigmoid'")
        # torch.nn builds the sigmoid RNN's parameters as for tanh (same shapes and initialization).
        sigmoid = nonlinearity == "sigmoid"
        nn.RNN.__init__(self, input_size, hidden_size, num_layers, "tanh" if sigmoid else nonlinearity, bias,
                        batch_first, dropout, bidirectional, device=device, dtype=dtype, **kwargs)
        if sigmoid:
            self.nonlinearity, self.mode = "sigmoid", "RNN_SIGMOID"
        self._init_extras(track, grad_clip, layer_norm, backend)


# torch.load's default weights_only unpickler refuses classes it does not know: whole-model checkpoints
# holding these modules (and their traces) load with it once vgkernels is imported.
torch.serialization.add_safe_globals([LSTM, GRU, RNN, BPTTTrace])
# torch.compile traces them (Dynamo refuses torch.nn's RNN classes otherwise; see _torch_tools.py).
_torch_tools.allow_dynamo(lambda module: isinstance(module, RecurrentBase))
