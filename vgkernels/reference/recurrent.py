"""Plain eager recurrent layers: one Python step per position, autograd by PyTorch itself.

This is the oracle for the fused kernels. It follows torch.nn's equations and gate order:
LSTM (i, f, g, o), GRU (r, z, n) with n = tanh(x_n + r * (W_hn h + b_hn)), Elman RNN with tanh, relu
or sigmoid. The per-step gradient norms come from ``retain_grad`` on every state, and the step
Jacobians from ``torch.func.jacrev`` of one step, so nothing here relies on the closed forms the
kernels use.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vgkernels.reference.layer_norm import normalize

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1, "rnn_sigmoid": 1}
MODES = tuple(GATES)


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step of the cell.

    Args:
        xproj_t: [B, G*H] input projection x_t W_ih^T + b_ih (plus b_hh except for the GRU); with
            ``norm``, LN(x_t W_ih^T) + biases.
        h, c: [B, H] previous hidden and (LSTM) cell state.
        w_hh: [G*H, H]. b_hh: [G*H] or None, used by the GRU only.
        norm: layer normalization of W_hh h (and of c for the LSTM), or None.
    Returns:
        (h_t, c_t), c_t None except for the LSTM.
    """
    if mode == "lstm":
        c_new, o = lstm_cell_state(xproj_t, h, c, w_hh, norm)
        return lstm_hidden(o, c_new, norm), c_new
    gh = h @ w_hh.t()
    if norm is not None:
        gh = normalize(gh, 1, norm.hh_weight, norm.hh_bias, norm.eps)
    if mode == "gru":
        if b_hh is not None:
            gh = gh + b_hh
        xr, xz, xn = xproj_t.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, None
    pre = xproj_t + gh
    if mode == "rnn_tanh":
        return torch.tanh(pre), None
    if mode == "rnn_relu":
        return torch.relu(pre), None
    if mode == "rnn_sigmoid":
        return torch.sigmoid(pre), None
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def lstm_cell_state(
    xproj_t: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_hh: torch.Tensor, norm: CellNorm | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSTM's new cell state c_t [B, H] and its output gate pre-activation o [B, H]."""
    gh = h @ w_hh.t()
    if norm is not None:
        gh = normalize(gh, 1, norm.hh_weight, norm.hh_bias, norm.eps)
    i, f, g, o = (xproj_t + gh).chunk(4, dim=-1)
    return torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g), o


def lstm_hidden(o: torch.Tensor, c: torch.Tensor, norm: CellNorm | None) -> torch.Tensor:
    """h_t = sigmoid(o) * tanh(c_t), with LN(c_t) in the layer-normalized cell."""
    if norm is not None:
        c = normalize(c, 1, norm.cell_weight, norm.cell_bias, norm.eps)
    return torch.sigmoid(o) * torch.tanh(c)


def step_jacobian_sq(
    mode: str,
    xproj_t: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor | None,
    w_hh: torch.Tensor,
    b_hh: torch.Tensor | None,
    norm: CellNorm | None = None,
) -> torch.Tensor:
    """Squared Frobenius norm of ∂s_t/∂s_prev per sample, float32 [B].

    s is h for the RNN and GRU, concat(h, c) for the LSTM. Computed from the full [S, S] Jacobian of
    one step per sample.
    """

    def step(x1: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        if mode == "lstm":
            h1, c1 = s1.chunk(2)
            h_new, c_new = cell_step(mode, x1[None], h1[None], c1[None], w_hh, b_hh, norm)
            return torch.cat([h_new[0], c_new[0]])
        return cell_step(mode, x1[None], s1[None], None, w_hh, b_hh, norm)[0][0]

    with torch.enable_grad():
        s = torch.cat([h, c], dim=-1) if mode == "lstm" else h
        jac = torch.func.vmap(torch.func.jacrev(step, argnums=1))(xproj_t.detach(), s.detach())
    return jac.detach().pow(2).sum((-2, -1)).to(torch.float32)


class LayerResult:
    """Outputs of :func:`layer_forward`.

    Attributes:
        states: [T+1, B, H]; forward: states[0] = h0, states[t+1] = h after position t; reverse:
            states[T] = h0, states[t] = h after position t.
        cell_states: the same layout for c (LSTM), else an empty tensor.
        jac_sq: float32 [T, B] squared step-Jacobian Frobenius norms (0 past a sequence's end), or an
            empty tensor when not tracked.
        hidden, cell: the per-position states h_t, c_t (index = position), whose ``.grad`` after
            backward is ∂loss/∂h_t, ∂loss/∂c_t when tracked.
    """

    def __init__(self, states, cell_states, jac_sq, hidden, cell, valid):
        self.states = states
        self.cell_states = cell_states
        self.jac_sq = jac_sq
        self.hidden = hidden
        self.cell = cell
        self.valid = valid

    def grad_sq(self) -> torch.Tensor | None:
        """float64 [K, T, B] of per-sample ‖∂loss/∂h_t‖² (and ‖∂loss/∂c_t‖² for the LSTM), or None.

        float64 whatever the states' dtype: in float32 the square of a gradient below ~1e-19 underflows.
        """
        rows = [self.hidden] + ([self.cell] if self.cell is not None else [])
        if all(s.grad is None for row in rows for s in row):
            return None
        out = []
        for row in rows:
            sq = [
                s.grad.double().pow(2).sum(-1) if s.grad is not None
                else torch.zeros_like(s[:, 0], dtype=torch.float64)
                for s in row
            ]
            out.append(torch.stack(sq) * self.valid)
        return torch.stack(out)


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
) -> LayerResult:
    """One direction of one layer over the whole sequence (the semantics of ``vgk::rnn_forward``).

    Args:
        xproj: [T, B, G*H] input projection (b_hh folded in except for the GRU).
        h0, c0: [B, H] initial states (c0 for the LSTM only).
        w_hh: [G*H, H]; b_hh: [G*H] for the GRU, or None.
        lengths: int64 [B] sequence lengths, or None. Past its length a sample's state is carried
            unchanged.
        reverse: process positions T-1 down to 0.
        track: retain every state's gradient and compute the step Jacobian norms.
        norm: layer normalization inside the cell (LSTM, GRU), or None.
    """
    T, B = xproj.shape[0], xproj.shape[1]
    positions = range(T - 1, -1, -1) if reverse else range(T)
    if lengths is None:
        valid = torch.ones(T, B, dtype=torch.bool, device=xproj.device)
    else:
        valid = torch.arange(T, device=xproj.device)[:, None] < lengths.to(xproj.device)[None, :]
    h, c = h0, c0
    hidden: list[torch.Tensor | None] = [None] * T
    cell: list[torch.Tensor | None] = [None] * T
    jac = torch.zeros(T, B, dtype=torch.float32, device=xproj.device)
    for t in positions:
        if track:
            jac[t] = step_jacobian_sq(mode, xproj[t], h, c, w_hh, b_hh, norm) * valid[t]
        keep = valid[t][:, None]
        if mode == "lstm":
            # h_t is computed from the retained c_t so that c_t's gradient includes the path through h_t
            c_new, o = lstm_cell_state(xproj[t], h, c, w_hh, norm)
            c = torch.where(keep, c_new, c)
            if track and c.requires_grad:
                c.retain_grad()
            h = torch.where(keep, lstm_hidden(o, c, norm), h)
        else:
            h = torch.where(keep, cell_step(mode, xproj[t], h, c, w_hh, b_hh, norm)[0], h)
        if track and h.requires_grad:
            h.retain_grad()
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
        jac_sq=jac if track else xproj.new_empty(0, dtype=torch.float32),
        hidden=hidden,
        cell=cell if c0 is not None else None,
        valid=valid.to(torch.float32),
    )
