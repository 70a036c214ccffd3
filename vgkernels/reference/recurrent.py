"""Plain eager recurrent layers: one Python step per position, autograd by PyTorch itself.

This is the oracle for the fused kernels. It follows torch.nn's equations and gate order:
LSTM (i, f, g, o), GRU (r, z, n) with n = tanh(x_n + r * (W_hn h + b_hn)), Elman RNN with tanh, relu
or sigmoid. The per-step gradient norms come from an identity probe on every state, and the step
Jacobians from ``torch.func.jacrev`` of one step, so nothing here relies on the closed forms the
kernels use. ``grad_clip`` clamps the gradient of every gate pre-activation in the backward
(:func:`clip_gradient`), as the kernels do.

Everything here is differentiable to any order and under every torch.func transform, so the fused ops
fall back to it for double backward and forward-mode AD (see :mod:`vgkernels.ops.autodiff`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vgkernels.reference.backward_clip import clipped
from vgkernels.reference.layer_norm import normalize

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1, "rnn_sigmoid": 1}
MODES = tuple(GATES)


def clip_gradient(x: torch.Tensor, clip: float | None) -> torch.Tensor:
    """``x`` itself, whose gradient is clamped elementwise to [-clip, clip] in the backward (None: off).

    Clamping keeps NaN, as the kernels do. See :mod:`vgkernels.reference.backward_clip` for its higher
    derivatives.
    """
    if clip is None:
        return x
    return clipped(x, lambda grad: grad.clamp(-clip, clip), "grad_clip")


class CellNorm(NamedTuple):
    """Layer-normalization parameters inside a cell (Ba et al. 2016).

    hh_weight, hh_bias: [G*H] gain and shift of LN(W_hh h). cell_weight, cell_bias: [H] gain and shift
    of LN(c) in h = o * tanh(LN(c)) (LSTM only, else None).
    """

    hh_weight: torch.Tensor
    hh_bias: torch.Tensor
    cell_weight: torch.Tensor | None
    cell_bias: torch.Tensor | None
    eps: float = 1e-5


def cell_step(
    mode: str,
    xproj_t: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor | None,
    w_hh: torch.Tensor,
    b_hh: torch.Tensor | None,
    norm: CellNorm | None = None,
    w_hr: torch.Tensor | None = None,
    grad_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step of the cell.

    Args:
        xproj_t: [B, G*H] input projection x_t W_ih^T + b_ih (plus b_hh except for the GRU); with
            ``norm``, LN(x_t W_ih^T) + biases.
        h, c: [B, P] previous hidden and [B, H] (LSTM) cell state; P = H without a projection.
        w_hh: [G*H, P]. b_hh: [G*H] or None, used by the GRU only.
        norm: layer normalization of W_hh h (and of c for the LSTM), or None.
        w_hr: [P, H] the LSTM's projection (proj_size P): h_t = (o * tanh(c_t)) W_hr^T; or None.
        grad_clip: clamp the gradient of every gate pre-activation to [-c, c] in the backward, or None.
    Returns:
        (h_t, c_t), c_t None except for the LSTM.
    """
    if mode == "lstm":
        c_new, o = lstm_cell_state(xproj_t, h, c, w_hh, norm, grad_clip)
        return lstm_hidden(o, c_new, norm, w_hr), c_new
    gh = h @ w_hh.t()
    if norm is not None:
        gh = normalize(gh, 1, norm.hh_weight, norm.hh_bias, norm.eps)
    if mode == "gru":
        if b_hh is not None:
            gh = gh + b_hh
        xr, xz, xn = xproj_t.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r = torch.sigmoid(clip_gradient(xr + hr, grad_clip))
        z = torch.sigmoid(clip_gradient(xz + hz, grad_clip))
        n = torch.tanh(clip_gradient(xn + r * hn, grad_clip))
        return (1 - z) * n + z * h, None
    pre = clip_gradient(xproj_t + gh, grad_clip)
    if mode == "rnn_tanh":
        return torch.tanh(pre), None
    if mode == "rnn_relu":
        return torch.relu(pre), None
    if mode == "rnn_sigmoid":
        return torch.sigmoid(pre), None
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def lstm_cell_state(
    xproj_t: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_hh: torch.Tensor, norm: CellNorm | None,
    grad_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSTM's new cell state c_t [B, H] and its output gate pre-activation o [B, H]."""
    gh = h @ w_hh.t()
    if norm is not None:
        gh = normalize(gh, 1, norm.hh_weight, norm.hh_bias, norm.eps)
    i, f, g, o = clip_gradient(xproj_t + gh, grad_clip).chunk(4, dim=-1)
    return torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g), o


def lstm_hidden(o: torch.Tensor, c: torch.Tensor, norm: CellNorm | None,
                w_hr: torch.Tensor | None = None) -> torch.Tensor:
    """h_t = sigmoid(o) * tanh(c_t), with LN(c_t) in the layer-normalized cell, projected by W_hr if given."""
    if norm is not None:
        c = normalize(c, 1, norm.cell_weight, norm.cell_bias, norm.eps)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h if w_hr is None else h @ w_hr.t()


def step_jacobian_sq(
    mode: str,
    xproj_t: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor | None,
    w_hh: torch.Tensor,
    b_hh: torch.Tensor | None,
    norm: CellNorm | None = None,
    w_hr: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared Frobenius norm of ∂s_t/∂s_prev per sample, float32 [B].

    s is h for the RNN and GRU, concat(h, c) for the LSTM (with a projection, h is the projected state
    of size P, so s has P + H entries). Computed from the full [S, S] Jacobian of one step per sample.
    """
    P = h.shape[-1]

    def step(x1: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        if mode == "lstm":
            h1, c1 = s1[:P], s1[P:]
            h_new, c_new = cell_step(mode, x1[None], h1[None], c1[None], w_hh, b_hh, norm, w_hr)
            return torch.cat([h_new[0], c_new[0]])
        return cell_step(mode, x1[None], s1[None], None, w_hh, b_hh, norm)[0][0]

    with torch.enable_grad():
        s = torch.cat([h, c], dim=-1) if mode == "lstm" else h
        jac = torch.func.vmap(torch.func.jacrev(step, argnums=1))(xproj_t.detach(), s.detach())
    return jac.detach().pow(2).sum((-2, -1)).to(torch.float32)


class _GradNormProbe(torch.autograd.Function):
    """Identity on a state h_t [B, S] whose backward writes the squared norm of the gradient passing
    through, per sample and in float64, into row (k, t) of the probe's gradient (0 where ``valid`` is 0)."""

    @staticmethod
    def forward(ctx, state, probe, k, t, valid):
        ctx.index, ctx.shape = (k, t), probe.shape
        ctx.save_for_backward(valid)
        return state.view_as(state)

    @staticmethod
    def backward(ctx, grad):
        (valid,) = ctx.saved_tensors
        grad_probe = grad.new_zeros(ctx.shape, dtype=torch.float64)
        grad_probe[ctx.index] = grad.double().pow(2).sum(-1) * valid
        return grad, grad_probe, None, None, None


class LayerResult:
    """Outputs of :func:`layer_forward`.

    Attributes:
        states: [T+1, B, P]; forward: states[0] = h0, states[t+1] = h after position t; reverse:
            states[T] = h0, states[t] = h after position t.
        cell_states: the same layout for c (LSTM), else an empty tensor.
        jac_sq: float32 [T, B] squared step-Jacobian Frobenius norms (0 past a sequence's end), or an
            empty tensor when not tracked.
        probe: when tracked with gradients, float64 [K, T, B] zeros that require grad (K = 2 for the
            LSTM: h then c; else 1): after backward its gradient is the per-sample squared norm of
            ∂loss/∂h_t (and ∂loss/∂c_t), 0 past a sequence's end; else None.
    """

    def __init__(self, states, cell_states, jac_sq, probe):
        self.states = states
        self.cell_states = cell_states
        self.jac_sq = jac_sq
        self.probe = probe

    def grad_sq(self) -> torch.Tensor | None:
        """float64 [K, T, B] of per-sample ‖∂loss/∂h_t‖² (and ‖∂loss/∂c_t‖² for the LSTM), or None
        before backward.

        float64 whatever the states' dtype: in float32 the square of a gradient below ~1e-19 underflows.
        """
        return None if self.probe is None else self.probe.grad

    def watched(self) -> list[torch.Tensor]:
        """The probe (when tracked with gradients), for autograd.grad: its gradient is :meth:`grad_sq`."""
        return [] if self.probe is None else [self.probe]


def layer_forward(
    xproj: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor | None,
    w_hh: torch.Tensor,
    b_hh: torch.Tensor | None,
    lengths: torch.Tensor | None,
    mode: str,
    reverse: bool,
    track: bool = False,
    norm: CellNorm | None = None,
    w_hr: torch.Tensor | None = None,
    grad_clip: float | None = None,
    jacobians: bool = True,
) -> LayerResult:
    """One direction of one layer over the whole sequence (the semantics of ``vgk::rnn_forward``).

    Args:
        xproj: [T, B, G*H] input projection (b_hh folded in except for the GRU).
        h0, c0: [B, P] and [B, H] initial states (c0 for the LSTM only); P = H without a projection.
        w_hh: [G*H, P]; b_hh: [G*H] for the GRU, or None.
        lengths: int64 [B] sequence lengths, or None. Past its length a sample's state is carried
            unchanged.
        reverse: process positions T-1 down to 0.
        track: record every state's gradient norm (with gradients enabled, and not under torch.func
            transforms, which the probe cannot pass) and compute the step Jacobian norms.
        norm: layer normalization inside the cell (LSTM, GRU), or None.
        w_hr: [P, H] the LSTM's projection, or None.
        grad_clip: clamp every gate pre-activation gradient to [-c, c] at every step, or None.
        jacobians: with ``track``, also compute the step Jacobian norms (a recomputation for the
            gradient norms alone does without).
    """
    T, B = xproj.shape[0], xproj.shape[1]
    positions = range(T - 1, -1, -1) if reverse else range(T)
    if lengths is None:
        valid = torch.ones(T, B, dtype=torch.bool, device=xproj.device)
    else:
        valid = torch.arange(T, device=xproj.device)[:, None] < lengths.to(xproj.device)[None, :]
    probe = None
    # torch.func transforms cannot pass the probe's autograd.Function: there the trace keeps its Jacobian
    # norms only.
    if track and torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active():
        K = 2 if mode == "lstm" else 1
        probe = torch.zeros(K, T, B, dtype=torch.float64, device=xproj.device, requires_grad=True)
    valid_f64 = valid.to(torch.float64)
    h, c = h0, c0
    hidden: list[torch.Tensor | None] = [None] * T
    cell: list[torch.Tensor | None] = [None] * T
    jac: list[torch.Tensor | None] = [None] * T  # stacked at the end: no in-place write, so vmap works
    for t in positions:
        if track and jacobians:
            jac[t] = step_jacobian_sq(mode, xproj[t], h, c, w_hh, b_hh, norm, w_hr) * valid[t]
        keep = valid[t][:, None]
        if mode == "lstm":
            # h_t is computed from the probed c_t so that c_t's gradient includes the path through h_t
            c_new, o = lstm_cell_state(xproj[t], h, c, w_hh, norm, grad_clip)
            c = torch.where(keep, c_new, c)
            if probe is not None:
                c = _GradNormProbe.apply(c, probe, 1, t, valid_f64[t])
            h = torch.where(keep, lstm_hidden(o, c, norm, w_hr), h)
        else:
            h_new = cell_step(mode, xproj[t], h, c, w_hh, b_hh, norm, grad_clip=grad_clip)[0]
            h = torch.where(keep, h_new, h)
        if probe is not None:
            h = _GradNormProbe.apply(h, probe, 0, t, valid_f64[t])
        hidden[t], cell[t] = h, c
    ordered = [h0] + hidden if not reverse else hidden + [h0]
    states = torch.stack(ordered)
    if c0 is not None:
        cell_states = torch.stack([c0] + cell if not reverse else cell + [c0])
    else:
        cell_states = xproj.new_empty(0)
    return LayerResult(
        states=states,
        cell_states=cell_states,
        jac_sq=torch.stack(jac) if track and jacobians else xproj.new_empty(0, dtype=torch.float32),
        probe=probe,
    )
