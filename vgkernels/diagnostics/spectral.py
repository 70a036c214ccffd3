"""``spectral_norms``: the spectral norm of every step's state Jacobian ∂s_t/∂s_prev of a recurrent
module, per sample.

The trace's ``jacobian_norm`` (Frobenius) is exact and nearly free but only bounds the spectral norm
from above; the spectral norm is the largest factor by which one step can stretch a gradient, so the
product of the spectral norms over k steps bounds how much a gradient can grow (or must shrink) over
those k steps. It costs far more than the Frobenius norm: opt in when you need it.

Two methods, both batched over all steps and samples at once:

- ``"exact"``: builds the S×S Jacobian of every step and sample (S = H, or 2H for the LSTM) with S
  reverse-mode passes through one cell step of all rows at once, then takes the square root of the
  largest eigenvalue of JᵀJ. O(T·B·S³) time (the eigenvalues dominate) and O(S²) memory per row, in
  chunks of at most :data:`CHUNK_ELEMENTS` Jacobian elements. Exact to the rounding of the dtype.
- ``"power"``: power iteration on JᵀJ with Jacobian-vector products, about three backward passes of
  one cell step per iteration, O(iters·T·B·S·G·H) time: for large states, where building J is too
  costly. It converges slowly where the two largest singular values are close.

``"auto"`` (the default) is exact up to S = :data:`EXACT_MAX_STATE`, power iteration above.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from vgkernels.reference.recurrent import CellNorm, cell_step

__all__ = ["CHUNK_ELEMENTS", "EXACT_MAX_STATE", "METHODS", "spectral_norms"]

METHODS = ("auto", "exact", "power")
EXACT_MAX_STATE = 256
"""Largest state size S for which ``method="auto"`` builds the Jacobians."""
CHUNK_ELEMENTS = 1 << 24
"""The most Jacobian elements ``"exact"`` holds at once (128 MiB in float64)."""
LAYER_NORM_EPS = 1e-5  # the epsilon of vgkernels' layer-normalized cells
_MODES = ("lstm", "gru", "rnn_tanh", "rnn_relu", "rnn_sigmoid")


class _Cell(NamedTuple):
    """One layer-direction's weights, in the computation dtype."""

    mode: str
    w_ih: torch.Tensor
    w_hh: torch.Tensor
    b_ih: torch.Tensor | None
    b_hh: torch.Tensor | None
    ln_ih: tuple[torch.Tensor, torch.Tensor] | None  # gain and shift of LN(x W_ih^T)
    norm: CellNorm | None  # LN(h W_hh^T) and the LSTM's LN(c)


def _mode_of(module: nn.Module) -> str:
    """"lstm", "gru" or "rnn_<nonlinearity>" from torch's or vgkernels' attributes."""
    mode = getattr(module, "mode", None)
    name = mode.lower() if isinstance(mode, str) else ""
    if name.startswith("rnn"):
        name = f"rnn_{getattr(module, 'nonlinearity', name[4:])}"
    if name not in _MODES or not hasattr(module, "weight_hh_l0"):
        raise TypeError(
            "module: expected a recurrent module (vgkernels.nn.LSTM/GRU/RNN or torch.nn.LSTM/GRU/RNN), "
            f"got {type(module).__name__}"
        )
    if getattr(module, "proj_size", 0):
        raise ValueError(f"module: LSTMs with projections are not covered, got proj_size={module.proj_size}")
    return name


def _cell_of(module: nn.Module, mode: str, layer: int, direction: int, dtype: torch.dtype) -> _Cell:
    suffix = f"_l{layer}" + ("_reverse" if direction else "")

    def get(name: str) -> torch.Tensor | None:
        value = getattr(module, name + suffix, None)
        return None if value is None else value.detach().to(dtype)

    ln_ih = norm = None
    if getattr(module, "layer_norm", False):
        get_ln = lambda kind: get(f"layer_norm_{kind}")  # noqa: E731
        ln_ih = (get_ln("ih_weight"), get_ln("ih_bias"))
        norm = CellNorm(get_ln("hh_weight"), get_ln("hh_bias"), get_ln("cell_weight"), get_ln("cell_bias"),
                        LAYER_NORM_EPS)
    return _Cell(mode, get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"), ln_ih, norm)


def _projection(cell: _Cell, x: torch.Tensor) -> torch.Tensor:
    """x W_ih^T (layer-normalized in an LN cell) + b_ih, plus b_hh except for the GRU, where b_hn sits
    inside r * (W_hn h + b_hn)."""
    xproj = x @ cell.w_ih.t()
    if cell.ln_ih is not None:
        xproj = F.layer_norm(xproj, xproj.shape[-1:], cell.ln_ih[0], cell.ln_ih[1], LAYER_NORM_EPS)
    if cell.b_ih is not None:
        xproj = xproj + cell.b_ih
    if cell.b_hh is not None and cell.mode != "gru":
        xproj = xproj + cell.b_hh
    return xproj


def _step(cell: _Cell, xproj: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """One cell step from the state before it, batched over the leading dims: [..., S] -> [..., S]."""
    b_hh = cell.b_hh if cell.mode == "gru" else None
    if cell.mode == "lstm":
        h, c = s.chunk(2, dim=-1)
        h_new, c_new = cell_step(cell.mode, xproj, h, c, cell.w_hh, None, cell.norm)
        return torch.cat([h_new, c_new], -1)
    return cell_step(cell.mode, xproj, s, None, cell.w_hh, b_hh, cell.norm)[0]


def _run(cell: _Cell, xproj: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None, reverse: bool):
    """The state before every position in processing order, s_prev [T, B, S], and the outputs h_t
    [T, B, H]."""
    T = xproj.shape[0]
    s = torch.cat([h0, c0], -1) if cell.mode == "lstm" else h0
    prev: list[torch.Tensor | None] = [None] * T
    out: list[torch.Tensor | None] = [None] * T
    for t in range(T - 1, -1, -1) if reverse else range(T):
        prev[t] = s
        s = _step(cell, xproj[t], s)
        out[t] = s[..., : h0.shape[-1]]
    return torch.stack(prev), torch.stack(out)


def _exact(cell: _Cell, xproj: torch.Tensor, s_prev: torch.Tensor) -> torch.Tensor:
    """‖J‖₂ = sqrt(λ_max(JᵀJ)) from the full Jacobian of every row, [T, B]."""
    lead = s_prev.shape[:-1]
    rows_x, rows_s = xproj.reshape(-1, xproj.shape[-1]), s_prev.reshape(-1, s_prev.shape[-1])
    size = rows_s.shape[-1]
    chunk = max(1, CHUNK_ELEMENTS // (size * size))
    out = []
    for start in range(0, rows_s.shape[0], chunk):
        with torch.enable_grad():
            s_in = rows_s[start : start + chunk].detach().requires_grad_()
            s_out = _step(cell, rows_x[start : start + chunk], s_in)
        # Row i of every J is the vector-Jacobian product with the unit vector e_i: one backward
        # through the retained graph of the whole chunk per state unit.
        jac = s_out.new_empty(s_out.shape[0], size, size)
        unit = torch.zeros_like(s_out)
        for i in range(size):
            unit[:, i] = 1
            jac[:, i] = torch.autograd.grad(s_out, s_in, unit, retain_graph=i < size - 1)[0]
            unit[:, i] = 0
        out.append(torch.linalg.eigvalsh(jac.mT @ jac)[..., -1].clamp_min(0).sqrt())
    return torch.cat(out).reshape(lead)


def _power(cell: _Cell, xproj: torch.Tensor, s_prev: torch.Tensor, iters: int, tol: float, seed: int):
    """Power iteration on JᵀJ for every row at once, [T, B]."""
    # One graph of the step at every position, built once: vjp(u) = Jᵀu, and its own vjp in u, which is
    # the jvp J v (Jᵀu is linear in u). Both reuse the retained graphs; torch.func.jvp re-traces the
    # step at every call and costs far more on small states.
    with torch.enable_grad():
        s_in = s_prev.detach().requires_grad_()
        s_out = _step(cell, xproj, s_in)
        u = torch.zeros_like(s_out, requires_grad=True)
        (vjp_u,) = torch.autograd.grad(s_out, s_in, u, create_graph=True)

    def jvp(v: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(vjp_u, u, v, retain_graph=True)[0]

    def vjp(w: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(s_out, s_in, w, retain_graph=True)[0]

    generator = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(s_prev.shape, generator=generator, dtype=s_prev.dtype).to(s_prev.device)
    v = v / v.norm(dim=-1, keepdim=True)
    tiny = torch.finfo(s_prev.dtype).tiny
    estimate = None
    for _ in range(iters):
        w = vjp(jvp(v))  # JᵀJ v
        rayleigh = (w * v).sum(-1)  # vᵀJᵀJv = ‖Jv‖², which rises to σ_max² as v converges
        norm = w.norm(dim=-1, keepdim=True)
        v = torch.where(norm > tiny, w / norm.clamp_min(tiny), v)
        if estimate is not None and tol > 0:
            change = (rayleigh - estimate).abs() / estimate.abs().clamp_min(tiny)
            if bool((change <= tol).all()):
                break
        estimate = rayleigh
    return jvp(v).norm(dim=-1)


def spectral_norms(
    module: nn.Module,
    input: torch.Tensor,
    *,
    hx: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    layer: int | None = 0,
    direction: int = 0,
    method: str = "auto",
    iters: int = 100,
    tol: float = 1e-7,
    seed: int = 0,
) -> torch.Tensor:
    """Spectral norm ‖∂s_t/∂s_prev‖₂ of every step and sample. Costly: opt in (see the module docstring).

    The state s is h for the RNN and GRU and concat(h, c) for the LSTM; s_prev is the state before
    position t in processing order (s_{t-1} forward, s_{t+1} in the reverse direction, the initial
    state at the first processed step), as for ``BPTTTrace.jacobian_norm``. The cell equations are
    rebuilt from the module's weights with torch's gate order: LSTM (i, f, g, o); GRU (r, z, n) with
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); Elman RNN with tanh, relu (or sigmoid for
    vgkernels' RNN); and for vgkernels' layer-normalized cells (``layer_norm=True``) gates =
    LN(W_ih x) + LN(W_hh h) + b and, for the LSTM, h = o * tanh(LN(c)) (Ba et al. 2016).

    Covered: ``torch.nn.LSTM/GRU/RNN`` and ``vgkernels.nn.LSTM/GRU/RNN``, any layer and direction,
    ``batch_first``, unbatched input. Not covered: ``PackedSequence`` input (pad it), LSTM projections
    (``proj_size``). Layers above 0 see the outputs of the layers below without dropout (evaluation
    mode).

    Args:
        module: the recurrent module.
        input: [T, B, input_size] ([B, T, input_size] with batch_first), or [T, input_size] unbatched.
        hx: the initial state as the module takes it (h0, or (h0, c0) for the LSTM), or None for zeros.
        layer: which layer; ``None``: every layer and direction.
        direction: which direction of ``layer`` (1 is the reverse one of a bidirectional module);
            ignored when ``layer`` is None.
        method: ``"exact"``, ``"power"`` or ``"auto"`` (exact up to a state of
            :data:`EXACT_MAX_STATE`).
        iters, tol, seed: power iteration only: the most iterations, the relative change of every
            σ² estimate in one iteration at which it stops, and the seed of the start vectors.
    Returns:
        float32 [T, B] for one layer-direction (B = 1 for unbatched input), or [L, T, B] for
        ``layer=None`` with L = num_layers * num_directions in h_n's order, indexed by input position.
        Computed in the dtype of the input and the weights promoted together.
    """
    mode = _mode_of(module)
    if isinstance(input, PackedSequence):
        raise TypeError("input: PackedSequence is not covered; pad it (pad_packed_sequence) first")
    if not isinstance(input, torch.Tensor) or not torch.is_floating_point(input):
        got = input.dtype if isinstance(input, torch.Tensor) else type(input).__name__
        raise TypeError(f"input: expected a floating-point tensor, got {got}")
    if input.dim() not in (2, 3):
        raise ValueError(f"input: expected a 2-D or 3-D tensor, got shape {tuple(input.shape)}")
    num_layers = module.num_layers
    num_directions = 2 if module.bidirectional else 1
    if not (layer is None or (isinstance(layer, int) and 0 <= layer < num_layers)):
        raise ValueError(f"layer: expected None or an int in [0, {num_layers}), got {layer!r}")
    if layer is not None and not (isinstance(direction, int) and 0 <= direction < num_directions):
        raise ValueError(f"direction: expected an int in [0, {num_directions}), got {direction!r}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if not (isinstance(iters, int) and iters >= 1):
        raise ValueError(f"iters: expected a positive int, got {iters!r}")
    if not tol >= 0:
        raise ValueError(f"tol: expected a non-negative number, got {tol!r}")
    batched = input.dim() == 3
    x = input.detach()
    if not batched:
        x = x.unsqueeze(1)
    elif module.batch_first:
        x = x.transpose(0, 1)
    if x.shape[-1] != module.input_size:
        raise ValueError(f"input: expected {module.input_size} features, got shape {tuple(input.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"input: expected at least one step and one sample, got shape {tuple(input.shape)}")
    dtype = torch.promote_types(x.dtype, module.weight_hh_l0.dtype)
    x = x.to(dtype)
    B, H = x.shape[1], module.hidden_size
    S = 2 * H if mode == "lstm" else H
    exact = method == "exact" or (method == "auto" and S <= EXACT_MAX_STATE)

    h0_all, c0_all = (hx if mode == "lstm" else (hx, None)) if hx is not None else (None, None)

    def initial(state, index):
        if state is None:
            return x.new_zeros(B, H)
        state = state.detach().to(dtype)
        state = state if batched else state.unsqueeze(1)
        expected = (num_layers * num_directions, B, H)
        if tuple(state.shape) != expected:
            raise ValueError(f"hx: expected states of shape {expected}, got {tuple(state.shape)}")
        return state[index]

    wanted = range(num_layers) if layer is None else [layer]
    norms = []
    for current in range(max(wanted) + 1):
        outputs = []
        for d in range(num_directions):
            cell = _cell_of(module, mode, current, d, dtype)
            index = current * num_directions + d
            with torch.no_grad():
                xproj = _projection(cell, x)
                c0 = initial(c0_all, index) if mode == "lstm" else None
                s_prev, out = _run(cell, xproj, initial(h0_all, index), c0, reverse=d == 1)
            outputs.append(out)
            if current in wanted and (layer is None or d == direction):
                if exact:
                    norms.append(_exact(cell, xproj, s_prev))
                else:
                    norms.append(_power(cell, xproj, s_prev, iters, tol, seed))
        x = torch.cat(outputs, -1)  # the input of the next layer: both directions' outputs
    result = torch.stack(norms).detach().to(torch.float32)
    return result if layer is None else result[0]
