"""Plain eager cells: one step of the LSTM, GRU or Elman RNN cell, the oracle of the fused cell kernels.

The step itself is that of the recurrent layers' reference (:mod:`vgkernels.reference.recurrent`:
torch.nn's equations and gate order) after the input projection; the step Jacobian norm is
:func:`vgkernels.reference.recurrent.step_jacobian_sq`, from the full Jacobian of the step.

The per-call gradient norms go through autograd: :func:`tap` leaves a state's value unchanged, and
its backward writes the per-sample squared norm of the gradient passing through into the gradient of
a probe tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vgkernels.reference.recurrent import GATES, cell_step, lstm_cell_state, lstm_hidden, step_jacobian_sq


def check_step(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh) -> None:
    """torch.nn's checks of a cell call, with its messages (for the Python backends; the C++ op makes them
    itself): input [B, I], hx and cx [B, H] or None, weights and biases of their shapes, one dtype and
    device."""
    H = w_hh.shape[1]
    if input.shape[1] != w_ih.shape[1]:
        raise RuntimeError(
            f"input has inconsistent input_size: got {input.shape[1]} expected {w_ih.shape[1]}")
    for label, state in enumerate((hx, cx)):
        if state is None:
            continue
        if state.dim() != 2:
            raise RuntimeError(f"hx[{label}] must be 2-D [batch, hidden_size] like the 2-D input, got "
                               f"{state.dim()}-D")
        if state.shape[0] != input.shape[0]:
            raise RuntimeError(f"Input batch size {input.shape[0]} doesn't match hidden{label} batch size "
                               f"{state.shape[0]}")
        if state.shape[1] != H:
            raise RuntimeError(
                f"hidden{label} has inconsistent hidden_size: got {state.shape[1]}, expected {H}")
    G = GATES[mode]
    expected = (("w_ih", w_ih, (G * H, input.shape[1])), ("w_hh", w_hh, (G * H, H)), ("b_ih", b_ih, (G * H,)),
                ("b_hh", b_hh, (G * H,)), ("hx", hx, None), ("cx", cx, None))
    for name, t, shape in expected:
        if t is None:
            continue
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        if t.dtype != input.dtype:
            raise TypeError(f"{name}: expected dtype {input.dtype} like input, got {t.dtype}")
        if t.device != input.device:
            raise RuntimeError(f"{name}: expected a tensor on {input.device} like input, got {t.device}")


def input_projection(
    mode: str, input: torch.Tensor, w_ih: torch.Tensor, b_ih: torch.Tensor | None, b_hh: torch.Tensor | None
) -> torch.Tensor:
    """x W_ih^T + b_ih [B, G*H], plus b_hh except for the GRU (whose b_hh stays in r * (W_hn h + b_hn))."""
    xproj = F.linear(input, w_ih, b_ih)
    return xproj if mode == "gru" or b_hh is None else xproj + b_hh


def states(
    mode: str, input: torch.Tensor, hx: torch.Tensor | None, cx: torch.Tensor | None, hidden_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The states a step starts from: (h, c), zeros [B, H] where not given; c is None but for the LSTM."""

    def given_or_zero(t):
        return input.new_zeros(input.shape[0], hidden_size) if t is None else t

    return given_or_zero(hx), given_or_zero(cx) if mode == "lstm" else None


def jacobian_sq(
    mode: str,
    input: torch.Tensor,
    hx: torch.Tensor | None,
    cx: torch.Tensor | None,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
) -> torch.Tensor:
    """Squared Frobenius norm of ∂s'/∂s per sample, float32 [B]; s = h (RNN, GRU) or (h, c) (LSTM)."""
    h, c = states(mode, input, hx, cx, w_hh.shape[1])
    xproj = input_projection(mode, input, w_ih, b_ih, b_hh).detach()
    c = None if c is None else c.detach()
    b_hh = None if b_hh is None else b_hh.detach()
    return step_jacobian_sq(mode, xproj, h.detach(), c, w_hh.detach(), b_hh)


class _Tap(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(state: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
        return state.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # nothing to save; the form torch.func needs
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.double().pow(2).sum(-1)

    @staticmethod
    def jvp(ctx, state_tangent: torch.Tensor, probe_tangent: torch.Tensor | None) -> torch.Tensor:
        return state_tangent


def tap(state: torch.Tensor, probe: torch.Tensor | None) -> torch.Tensor:
    """``state`` [B, H] itself; its backward adds ‖gradient‖² per sample (float64 [B]) to the probe's
    gradient."""
    return state if probe is None else _Tap.apply(state, probe)


def cell_forward(
    mode: str,
    input: torch.Tensor,
    hx: torch.Tensor | None,
    cx: torch.Tensor | None,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
    probe: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step: (h', c') for the LSTM, (h', None) otherwise.

    Args:
        input: [B, I]. hx, cx: [B, H] or None (zeros); cx for the LSTM only.
        w_ih: [G*H, I], w_hh: [G*H, H], b_ih, b_hh: [G*H] or None; G = 4 (LSTM), 3 (GRU), 1 (RNN).
        probe: float64 [2, K, B] or None. probe[0] collects the gradients reaching the input states (h,
            then c for the LSTM), probe[1] those reaching the output states (see :func:`tap`). The
            LSTM's c' is tapped before h' is computed from it, so that its gradient includes the path
            through h'.
    """
    row = (lambda i, k: None) if probe is None else (lambda i, k: probe[i, k])
    h, c = states(mode, input, hx, cx, w_hh.shape[1])
    h = tap(h, row(0, 0))
    xproj = input_projection(mode, input, w_ih, b_ih, b_hh)
    if mode == "lstm":
        c = tap(c, row(0, 1))
        c_new, o = lstm_cell_state(xproj, h, c, w_hh, None)
        c_new = tap(c_new, row(1, 1))
        return tap(lstm_hidden(o, c_new, None), row(1, 0)), c_new
    h_new, _ = cell_step(mode, xproj, h, None, w_hh, b_hh)
    return tap(h_new, row(1, 0)), None
