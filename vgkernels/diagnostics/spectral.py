"""``spectral_norms``: the spectral norm of every step's state Jacobian ∂s_t/∂s_prev of a recurrent
module, per sample, by power iteration with Jacobian-vector products.

The trace's ``jacobian_norm`` (Frobenius) is exact and nearly free but only bounds the spectral norm
from above; the spectral norm is the largest factor by which one step can stretch a gradient. It costs
``iters`` forward-mode and reverse-mode products of one cell step, batched over all steps and samples
at once: opt in when you need it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from vgkernels.reference.recurrent import cell_step

__all__ = ["spectral_norms"]

_MODES = {"lstm": "lstm", "gru": "gru", "rnn_tanh": "rnn_tanh", "rnn_relu": "rnn_relu",
          "rnn_sigmoid": "rnn_sigmoid"}


def _mode_of(module: nn.Module) -> str:
    mode = getattr(module, "mode", None)
    if not isinstance(mode, str) or mode.lower() not in _MODES or not hasattr(module, "weight_hh_l0"):
        raise TypeError(
            "module: expected a recurrent module (vgkernels.nn.LSTM/GRU/RNN or torch.nn.LSTM/GRU/RNN), "
            f"got {type(module).__name__}"
        )
    if getattr(module, "proj_size", 0):
        raise ValueError(f"module: LSTMs with projections are not covered, got proj_size={module.proj_size}")
    if getattr(module, "layer_norm", False):
        raise ValueError("module: layer-normalized cells (layer_norm=True) are not covered")
    return _MODES[mode.lower()]


def _weights(module: nn.Module, layer: int, direction: int, dtype: torch.dtype):
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    get = lambda name: getattr(module, name + suffix, None)  # noqa: E731
    cast = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    return cast(get("weight_ih")), cast(get("weight_hh")), cast(get("bias_ih")), cast(get("bias_hh"))


def _projection(mode: str, x: torch.Tensor, w_ih, b_ih, b_hh) -> torch.Tensor:
    """x W_ih^T + b_ih, plus b_hh except for the GRU (where b_hn sits inside r * (W_hn h + b_hn))."""
    xproj = x @ w_ih.t()
    if b_ih is not None:
        xproj = xproj + b_ih
    if b_hh is not None and mode != "gru":
        xproj = xproj + b_hh
    return xproj


def _previous_states(mode, xproj, h0, c0, w_hh, b_hh, reverse):
    """The state before every position in processing order, and every position's output h_t.

    Returns s_prev [T, B, S] (S = H, or 2H as concat(h, c) for the LSTM) and outputs [T, B, H].
    """
    T = xproj.shape[0]
    h, c = h0, c0
    prev: list[torch.Tensor | None] = [None] * T
    out: list[torch.Tensor | None] = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        prev[t] = torch.cat([h, c], -1) if mode == "lstm" else h
        h, c = cell_step(mode, xproj[t], h, c, w_hh, b_hh if mode == "gru" else None)
        out[t] = h
    return torch.stack(prev), torch.stack(out)


def spectral_norms(
    module: nn.Module,
    input: torch.Tensor,
    *,
    hx: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    layer: int = 0,
    direction: int = 0,
    iters: int = 100,
    tol: float = 1e-7,
    seed: int = 0,
) -> torch.Tensor:
    """Spectral norm ‖∂s_t/∂s_prev‖₂ of every step and sample of one layer-direction. Costly: opt in.

    The state s is h for the RNN and GRU and concat(h, c) for the LSTM; s_prev is the state before
    position t in processing order (s_{t-1} forward, s_{t+1} in the reverse direction, the initial
    state at the first processed step), as for ``BPTTTrace.jacobian_norm``. The cell equations are
    rebuilt from the module's weights with torch's gate order: LSTM (i, f, g, o); GRU (r, z, n) with
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); Elman RNN with tanh, relu (or sigmoid for
    vgkernels' RNN).

    Covered: ``torch.nn.LSTM/GRU/RNN`` and ``vgkernels.nn.LSTM/GRU/RNN``, any layer and direction,
    ``batch_first``, unbatched input. Not covered: ``PackedSequence`` input (pad it), LSTM projections
    (``proj_size``), layer-normalized cells. Layers above 0 see the outputs of the layers below
    without dropout (evaluation mode).

    Method: power iteration on JᵀJ, batched over all T·B steps and samples at once. The vector-Jacobian
    product Jᵀu is a backward through one retained graph of the step; the Jacobian-vector product J v
    is the vjp of that (linear) vjp map in u, a second retained graph. It stops after ``iters``
    iterations, or earlier once no estimate of σ² moved by more than ``tol`` (relative) in one
    iteration. Each iteration costs about three backward passes of one cell step over the whole
    sequence, plus one host synchronisation for the stopping test; convergence is slow where the two
    largest singular values are close.

    Args:
        module: the recurrent module.
        input: [T, B, input_size] ([B, T, input_size] with batch_first), or [T, input_size] unbatched.
        hx: the initial state as the module takes it (h0, or (h0, c0) for the LSTM), or None for zeros.
        layer, direction: which layer-direction (direction 1 is the reverse one of a bidirectional
            module).
        iters: the most power iterations. tol: the relative stopping tolerance. seed: of the random
            start vectors.
    Returns:
        float32 [T, B] (B = 1 for unbatched input), indexed by input position; computed in the dtype of
        the input and the weights promoted together.
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
    if not (isinstance(layer, int) and 0 <= layer < num_layers):
        raise ValueError(f"layer: expected an int in [0, {num_layers}), got {layer!r}")
    if not (isinstance(direction, int) and 0 <= direction < num_directions):
        raise ValueError(f"direction: expected an int in [0, {num_directions}), got {direction!r}")
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

    # The input of `layer`: the outputs of the layers below, both directions concatenated.
    with torch.no_grad():
        for below in range(layer):
            outputs = []
            for d in range(num_directions):
                w_ih, w_hh, b_ih, b_hh = _weights(module, below, d, dtype)
                index = below * num_directions + d
                c0 = initial(c0_all, index) if mode == "lstm" else None
                xproj = _projection(mode, x, w_ih, b_ih, b_hh)
                h0 = initial(h0_all, index)
                outputs.append(_previous_states(mode, xproj, h0, c0, w_hh, b_hh, d == 1)[1])
            x = torch.cat(outputs, -1)
        w_ih, w_hh, b_ih, b_hh = _weights(module, layer, direction, dtype)
        index = layer * num_directions + direction
        c0 = initial(c0_all, index) if mode == "lstm" else None
        xproj = _projection(mode, x, w_ih, b_ih, b_hh)
        s_prev, _ = _previous_states(mode, xproj, initial(h0_all, index), c0, w_hh, b_hh, direction == 1)

    def step(s: torch.Tensor) -> torch.Tensor:
        """One cell step at every position at once: s_prev [T, B, S] -> s_t [T, B, S]."""
        if mode == "lstm":
            h, c = s.chunk(2, dim=-1)
            h_new, c_new = cell_step(mode, xproj, h, c, w_hh, None)
            return torch.cat([h_new, c_new], -1)
        return cell_step(mode, xproj, s, None, w_hh, b_hh if mode == "gru" else None)[0]

    # One graph of the step at every position, built once: vjp(u) = Jᵀu, and its own vjp in u, which is
    # the jvp J v (Jᵀu is linear in u). Both reuse the retained graphs; torch.func.jvp re-traces the
    # step at every call and costs far more on small states.
    with torch.enable_grad():
        s_in = s_prev.detach().requires_grad_()
        s_out = step(s_in)
        u = torch.zeros_like(s_out, requires_grad=True)
        (vjp_u,) = torch.autograd.grad(s_out, s_in, u, create_graph=True)

    def jvp(v: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(vjp_u, u, v, retain_graph=True)[0]

    def vjp(w: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(s_out, s_in, w, retain_graph=True)[0]

    generator = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(s_prev.shape, generator=generator, dtype=dtype).to(s_prev.device)
    v = v / v.norm(dim=-1, keepdim=True)
    tiny = torch.finfo(dtype).tiny
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
    return jvp(v).norm(dim=-1).detach().to(torch.float32)
