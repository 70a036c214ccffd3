"""``BPTTTrace``: what one forward and backward of a recurrent module saw at every time step."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# A source holds the per-sample squared gradient norms of one layer-direction, float64 [K, T, B]
# (K = 2 for the LSTM: hidden then cell state; K = 1 otherwise), once backward has run. float64
# because in float32 the square of a gradient below ~1e-19 underflows to 0. The recurrent ops give a
# probe tensor, whose .grad autograd fills (so a trace holds tensors only, and pickles and deep-copies
# with its module); a callable returning the squares (or None before backward) is accepted as well;
# None stands for a forward that records no gradients (run under torch.no_grad()).
GradSource = torch.Tensor | Callable[[], "torch.Tensor | None"] | None


def new_probe(shape: tuple[int, ...], device: torch.device, owner: str) -> torch.Tensor | None:
    """A zero float64 leaf of ``shape`` that requires grad, whose gradient a tracked op's backward fills
    with squared gradient norms; None without autograd (nothing to record).

    Raises RuntimeError inside torch.compile: the probe must be a fresh leaf, which Dynamo cannot create
    in a graph. ``owner`` says what is tracked, for that message.
    """
    if not torch.is_grad_enabled():
        return None
    if torch.compiler.is_compiling():
        raise RuntimeError(
            f"track: {owner} is not supported inside torch.compile; compile the "
            "model with track=False, run tracked steps eagerly, or trace the forward only under "
            "torch.no_grad()"
        )
    return torch.zeros(shape, dtype=torch.float64, device=device, requires_grad=True)


class BPTTTrace:
    """Per-step gradient and Jacobian norms of one recurrent module's last forward.

    L = num_layers * num_directions, indexed ``layer * num_directions + direction`` as in ``h_n``;
    T = sequence length (input positions, in both directions); B = batch. Every tensor is float32
    on the input's device. Gradient fields are ``None`` until a backward has reached the module.

    Attributes:
        mode: ``"lstm"``, ``"gru"``, ``"rnn_tanh"``, ``"rnn_relu"`` or ``"rnn_sigmoid"``.
        num_layers, num_directions: the module's layout.
        lengths: int64 [B] sequence lengths on the CPU for a ``PackedSequence`` input, else ``None``.
        jacobian_norm_per_sample: [L, T, B] Frobenius norm of ∂s_t/∂s_prev per sample (0 past a
            sequence's end). s is h for the RNN and GRU and (h, c) for the LSTM; with the LSTM's
            projection (proj_size P), h = W_hr (o * tanh(c)) has P entries and s = (h, c) has P + H.

    The per-sample tensors may be stored in another batch order (a ``PackedSequence`` is processed
    sorted by length): ``batch_index`` [B], when given, selects the samples in the input's order.
    """

    def __init__(
        self,
        mode: str,
        num_layers: int,
        num_directions: int,
        jacobian_norm_per_sample: torch.Tensor,
        grad_sources: Sequence[GradSource],
        lengths: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
        output_probe: torch.Tensor | None = None,
    ) -> None:
        self.mode = mode
        self.num_layers = num_layers
        self.num_directions = num_directions
        if batch_index is not None:
            jacobian_norm_per_sample = jacobian_norm_per_sample.index_select(
                2, batch_index.to(jacobian_norm_per_sample.device))
            lengths = None if lengths is None else lengths.index_select(0, batch_index.to(lengths.device))
        self.lengths = lengths
        self.jacobian_norm_per_sample = jacobian_norm_per_sample
        self._grad_sources = list(grad_sources)
        self._batch_index = batch_index
        self._output_probe = output_probe

    def __getstate__(self) -> dict:
        # Pickling (torch.save, copy.deepcopy) keeps what backward has recorded so far, as tensors:
        # pickle drops a tensor's .grad, and a callable source would not pickle at all.
        recorded = self._squared_stored()
        output_sq = self._output_squared_stored()
        state = self.__dict__.copy()
        state["_grad_sources"] = None
        state["_recorded"] = None if recorded is None else recorded.detach()
        state["_output_probe"] = None
        state["_output_recorded"] = None if output_sq is None else output_sq.detach()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def with_batch_index(self, batch_index: torch.Tensor) -> BPTTTrace:
        """The same trace with its samples read through ``batch_index`` [B] (see the class docstring); for
        a trace built without one."""
        if self._batch_index is not None:
            raise ValueError("batch_index: this trace already reads its samples through one")
        return BPTTTrace(self.mode, self.num_layers, self.num_directions, self.jacobian_norm_per_sample,
                         self._grad_sources, self.lengths, batch_index, self._output_probe)

    @property
    def seq_len(self) -> int:
        return self.jacobian_norm_per_sample.shape[1]

    @property
    def batch_size(self) -> int:
        return self.jacobian_norm_per_sample.shape[2]

    def valid_mask(self) -> torch.Tensor:
        """Bool [T, B]: True where position t lies inside sample b's sequence."""
        device = self.jacobian_norm_per_sample.device
        steps = torch.arange(self.seq_len, device=device).unsqueeze(1)
        if self.lengths is None:
            return torch.ones(self.seq_len, self.batch_size, dtype=torch.bool, device=device)
        return steps < self.lengths.to(device).unsqueeze(0)

    @property
    def jacobian_norm(self) -> torch.Tensor:
        """[L, T]: batch mean of ``jacobian_norm_per_sample`` over the samples alive at step t."""
        valid = self.valid_mask().to(torch.float32)
        count = valid.sum(1).clamp_min(1.0)
        return (self.jacobian_norm_per_sample * valid).sum(-1) / count

    def _squared_stored(self) -> torch.Tensor | None:
        """float64 [L, K, T, B] squared norms in the stored batch order, or None before backward."""
        if self._grad_sources is None:  # unpickled
            return self._recorded
        parts = [source if source is None else source.grad if isinstance(source, torch.Tensor) else source()
                 for source in self._grad_sources]
        if any(p is None for p in parts):
            return None
        return torch.stack([p.to(torch.float64) for p in parts])

    def _squared(self) -> torch.Tensor | None:
        """float64 [L, K, T, B] squared norms, or None before backward."""
        sq = self._squared_stored()
        if sq is not None and self._batch_index is not None:
            sq = sq.index_select(3, self._batch_index.to(sq.device))
        return sq

    def _output_squared_stored(self) -> torch.Tensor | None:
        """float64 [T, B] squared norms of the gradient reaching the output, stored order; or None."""
        if self._grad_sources is None:  # unpickled
            return getattr(self, "_output_recorded", None)
        probe = getattr(self, "_output_probe", None)
        if probe is None:
            return None
        if probe.grad is None and self._squared_stored() is not None:
            # backward reached the layers but not the output: no gradient entered through it
            return torch.zeros(probe.shape, dtype=torch.float64, device=probe.device)
        return probe.grad

    @property
    def output_grad_norm_per_sample(self) -> torch.Tensor | None:
        """[T, B]: ‖∂loss/∂output_t‖₂ per sample: the gradient that enters the module through its output
        at position t (from a loss on that step, or the layers after the module), as opposed to gradient
        that travelled back through time. ``None`` before backward, or when it reached no output."""
        sq = self._output_squared_stored()
        if sq is None:
            return None
        if self._batch_index is not None:
            sq = sq.index_select(1, self._batch_index.to(sq.device))
        return self._norm(sq)

    @property
    def output_grad_norm(self) -> torch.Tensor | None:
        """[T]: ‖∂loss/∂output_t‖₂ over batch and features (see :attr:`output_grad_norm_per_sample`)."""
        sq = self._output_squared_stored()
        return None if sq is None else self._norm(sq.sum(-1))

    @staticmethod
    def _norm(sq: torch.Tensor) -> torch.Tensor:
        # The root in float64, then float32: a norm is representable where its square is not.
        return sq.clamp_min(0).sqrt().to(torch.float32)

    @property
    def grad_norm_per_sample(self) -> torch.Tensor | None:
        """[L, T, B]: ‖∂loss/∂h_t‖₂ per sample, or ``None`` before backward."""
        sq = self._squared()
        return None if sq is None else self._norm(sq[:, 0])

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """[L, T]: ‖∂loss/∂h_t‖₂ over batch and hidden units, or ``None`` before backward."""
        sq = self._squared()
        return None if sq is None else self._norm(sq[:, 0].sum(-1))

    @property
    def cell_grad_norm(self) -> torch.Tensor | None:
        """[L, T]: ‖∂loss/∂c_t‖₂ over batch and hidden units (LSTM only; ``None`` otherwise)."""
        if self.mode != "lstm":
            return None
        sq = self._squared()
        return None if sq is None else self._norm(sq[:, 1].sum(-1))

    def __repr__(self) -> str:
        state = "with gradients" if self._squared() is not None else "forward only"
        return (
            f"BPTTTrace(mode={self.mode!r}, layers={self.num_layers}, directions={self.num_directions}, "
            f"T={self.seq_len}, B={self.batch_size}, {state})"
        )
