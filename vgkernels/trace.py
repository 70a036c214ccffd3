"""``BPTTTrace``: what one forward and backward of a recurrent module saw at every time step."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# A source yields the per-sample squared gradient norms of one layer-direction, float64 [K, T, B]
# (K = 2 for the LSTM: hidden then cell state; K = 1 otherwise), or None before backward. float64
# because in float32 the square of a gradient below ~1e-19 underflows to 0.
GradSource = Callable[[], "torch.Tensor | None"]


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
            sequence's end).
    """

    def __init__(
        self,
        mode: str,
        num_layers: int,
        num_directions: int,
        jacobian_norm_per_sample: torch.Tensor,
        grad_sources: Sequence[GradSource],
        lengths: torch.Tensor | None = None,
    ) -> None:
        self.mode = mode
        self.num_layers = num_layers
        self.num_directions = num_directions
        self.lengths = lengths
        self.jacobian_norm_per_sample = jacobian_norm_per_sample
        self._grad_sources = list(grad_sources)

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

    def _squared(self) -> torch.Tensor | None:
        """float64 [L, K, T, B] squared norms, or None before backward."""
        parts = [source() for source in self._grad_sources]
        if any(p is None for p in parts):
            return None
        return torch.stack([p.to(torch.float64) for p in parts])

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
