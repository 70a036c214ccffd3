"""Recurrent layers (Elman RNN, LSTM, GRU) as torch.library ops with per-step BPTT tracking.

Structure:
- ``vgk::rnn_layer_forward`` (C++, CPU) runs one direction of one plain layer over the whole sequence,
  input projection included, on padded input (with optional lengths) or on the rows of a packed sequence
  (``batch_sizes``), with the LSTM's projection ``w_hr`` when given; its backward
  ``vgk::rnn_layer_backward`` returns the gradients of the input, the initial states, both weights, both
  biases and ``w_hr``. The autograd registration below is on the
  C++ op itself. It returns the output sequence, h_n and c_n as separate tensors, so no view of a
  [T+1, B, H] state tensor has to be assembled into a gradient.
- ``vgk::recurrent_layer`` is the autograd-aware op for the Triton backend and the layer-normalized
  cells: the input projection happens outside, and its forward and backward call one backend's kernel
  ops (``vgk::rnn_forward`` / ``vgk::rnn_backward`` and their Triton and layer-normalized twins).
- :func:`recurrent` stacks layers and directions: the layer op, dropout between layers. The
  ``"reference"`` backend runs the same stacking over the eager loop of
  :mod:`vgkernels.reference.recurrent`.

Tracking goes through autograd itself: with ``track=True`` every layer-direction gets a zero "probe"
tensor [K, T, B] that requires grad; the layer's backward returns the per-step squared gradient norms
as the probe's gradient, so ``probe.grad`` holds them once backward has run. The probe and the norms
are float64 (autograd casts a gradient to its input's dtype): in float32 the square of a gradient
below ~1e-19 underflows to 0.

Beyond first order (see :mod:`vgkernels.ops.autodiff`): a backward under ``create_graph=True`` recomputes
the layer with the eager reference and returns differentiable gradients, and :func:`recurrent` runs the
reference itself when a forward-mode tangent or a torch.func transform is active. bfloat16 and float16
run on the float32 kernels of the cpp backend (upcast copies, results cast back), and under
``torch.autocast`` the outputs get the dtypes torch.nn gives them there (:func:`_autocast_precision`).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from vgkernels._library import cpp_available
from vgkernels.backends import resolve_backend
from vgkernels.ops.autodiff import differentiable_vjp, mark_recomputable, recompute_recipe, transforms_active
from vgkernels.reference import recurrent as reference
from vgkernels.reference.backward_clip import refuse_create_graph
from vgkernels.trace import BPTTTrace, new_probe

GATES = reference.GATES
MODES = reference.MODES
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_AUTOCAST_ELIGIBLE = (torch.float32, torch.bfloat16, torch.float16)  # autocast leaves float64 alone
# The dtypes each backend computes in natively; the others run on float32 copies.
KERNEL_DTYPES = {
    "cpp": (torch.float32, torch.float64),
    "triton": FLOAT_DTYPES,
    "reference": FLOAT_DTYPES,
}


def _empty(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return like.new_empty(0, dtype=dtype or like.dtype)


def _kernel_ops(backend: str, layer_norm: bool):
    """The (forward, backward) kernel ops of a backend, plain or layer-normalized cells."""
    ops = torch.ops.vgk
    if backend == "cpp":
        if layer_norm:
            return ops.rnn_ln_forward, ops.rnn_ln_backward
        return ops.rnn_forward, ops.rnn_backward
    if layer_norm:
        import vgkernels.triton.recurrent_ln  # noqa: F401  (registers the Triton ops)

        return ops.rnn_ln_forward_triton, ops.rnn_ln_backward_triton
    import vgkernels.triton.recurrent  # noqa: F401  (registers the Triton ops)

    return ops.rnn_forward_triton, ops.rnn_backward_triton


def workspace_width(mode: str, hidden_size: int, layer_norm: bool, proj_size: int = 0) -> int:
    """Per position and sample, the number of values the forward saves for the backward.

    Plain cells: LSTM the 4 activated gates (and o * tanh(c) with a projection); GRU r, z, n and
    W_hn h + b_hn; RNN nothing (the activation derivative follows from h). Layer-normalized cells add the
    normalized W_hh h (G*H values) and its 1/std, and for the LSTM the normalized c, tanh(LN(c)) and the
    1/std of c.
    """
    H = hidden_size
    if not layer_norm:
        return {"lstm": 5 * H if proj_size else 4 * H, "gru": 4 * H}.get(mode, 0)
    return {"lstm": 10 * H + 2, "gru": 7 * H + 1}[mode]


# ---------------------------------------------------------------------------------------------------
# Fake (shape-only) implementations of the C++ kernel ops, for torch.compile and opcheck.


def _fake_saved(like, T, B, H, mode, track, layer_norm):
    """Workspace and jac_sq of a forward kernel op."""
    width = workspace_width(mode, H, layer_norm)
    workspace = like.new_empty(T, B, width) if width else _empty(like)
    jac_sq = like.new_empty(T, B, dtype=torch.float32) if track else _empty(like, torch.float32)
    return workspace, jac_sq


def _fake_grad_sq(like, T, B, mode, track):
    K = 2 if mode == "lstm" else 1
    return like.new_empty(K, T, B, dtype=torch.float64) if track else _empty(like, torch.float64)


def _fake_forward_shapes(xproj, w_hh, mode, track, layer_norm):
    T, B, _ = xproj.shape
    H = w_hh.shape[1]
    states = xproj.new_empty(T + 1, B, H)
    cell_states = xproj.new_empty(T + 1, B, H) if mode == "lstm" else _empty(xproj)
    return states, cell_states, *_fake_saved(xproj, T, B, H, mode, track, layer_norm)


def _fake_backward_shapes(states, w_hh, mode, track, has_b_hh):
    T = states.shape[0] - 1
    B, H = states.shape[1], states.shape[2]
    G = GATES[mode]
    grad_xproj = states.new_empty(T, B, G * H)
    grad_h0 = states.new_empty(B, H)
    grad_c0 = states.new_empty(B, H) if mode == "lstm" else _empty(states)
    grad_w_hh = w_hh.new_empty(w_hh.shape)
    grad_b_hh = states.new_empty(G * H) if has_b_hh else _empty(states)
    return grad_xproj, grad_h0, grad_c0, grad_w_hh, grad_b_hh, _fake_grad_sq(states, T, B, mode, track)


@torch.library.register_fake("vgk::rnn_forward")
def _(xproj, h0, c0, w_hh, b_hh, lengths, probe, mode, reverse, track):
    return _fake_forward_shapes(xproj, w_hh, mode, track, layer_norm=False)


@torch.library.register_fake("vgk::rnn_backward")
def _(grad_states, grad_cell_states, states, cell_states, workspace, w_hh, lengths, mode, reverse,
      grad_clip, track, has_b_hh):
    return _fake_backward_shapes(states, w_hh, mode, track, has_b_hh)


@torch.library.register_fake("vgk::rnn_layer_forward")
def _(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, batch_sizes, probe, mode, reverse, track, grad_clip):
    B, P = h0.shape
    H = P if w_hr is None else w_hr.shape[1]
    # Packed input [rows, I] keeps its rows; padded [T, B, I].
    T = x.shape[0] if batch_sizes is None else batch_sizes.shape[0]
    rows = x.shape[:-1]
    lstm = mode == "lstm"
    width = workspace_width(mode, H, layer_norm=False, proj_size=0 if w_hr is None else P)
    output, h_n = x.new_empty(*rows, P), x.new_empty(B, P)
    c_n, cell_states = (x.new_empty(B, H), x.new_empty(*rows, H)) if lstm else (_empty(x), _empty(x))
    workspace = x.new_empty(*rows, width) if width else _empty(x)
    jac_sq = x.new_empty(T, B, dtype=torch.float32) if track else _empty(x, torch.float32)
    return output, h_n, c_n, cell_states, workspace, jac_sq


@torch.library.register_fake("vgk::rnn_layer_backward")
def _(grad_output, grad_h_n, grad_c_n, x, h0, c0, output, cell_states, workspace, w_ih, w_hh, w_hr, lengths,
      batch_sizes, mode, reverse, grad_clip, track, has_bias, grad_input):
    B, P = h0.shape
    H = P if w_hr is None else w_hr.shape[1]
    T = x.shape[0] if batch_sizes is None else batch_sizes.shape[0]
    GH = w_hh.shape[0]
    grad_x = x.new_empty(x.shape) if grad_input else _empty(x)
    grad_c0 = h0.new_empty(B, H) if mode == "lstm" else _empty(h0)
    # Two distinct bias gradients: the kernels' outputs never alias each other.
    grad_b = tuple(w_hh.new_empty(GH) if has_bias else _empty(w_hh) for _ in range(2))
    grad_w_hr = _empty(w_hh) if w_hr is None else w_hr.new_empty(w_hr.shape)
    return (grad_x, h0.new_empty(B, P), grad_c0, w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape),
            *grad_b, grad_w_hr, _fake_grad_sq(x, T, B, mode, track))


@torch.library.register_fake("vgk::rnn_ln_forward")
def _(xproj, h0, c0, w_hh, b_hh, ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias, eps, lengths,
      mode, reverse, track):
    return _fake_forward_shapes(xproj, w_hh, mode, track, layer_norm=True)


@torch.library.register_fake("vgk::rnn_ln_backward")
def _(grad_states, grad_cell_states, states, cell_states, workspace, w_hh, ln_hh_weight, ln_cell_weight,
      lengths, mode, reverse, grad_clip, track, has_b_hh):
    grad_xproj, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_sq = _fake_backward_shapes(
        states, w_hh, mode, track, has_b_hh)
    # Two distinct tensors: the kernels' outputs never alias each other.
    cell = tuple(_empty(states) if ln_cell_weight is None else ln_cell_weight.new_empty(ln_cell_weight.shape)
                 for _ in range(2))
    return (grad_xproj, grad_h0, grad_c0, grad_w_hh, grad_b_hh, ln_hh_weight.new_empty(ln_hh_weight.shape),
            ln_hh_weight.new_empty(ln_hh_weight.shape), *cell, grad_sq)


# ---------------------------------------------------------------------------------------------------
# The autograd-aware layer op.


@torch.library.custom_op("vgk::recurrent_layer", mutates_args=())
def recurrent_layer(
    xproj: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor | None,
    w_hh: torch.Tensor,
    b_hh: torch.Tensor | None,
    ln_hh_weight: torch.Tensor | None,
    ln_hh_bias: torch.Tensor | None,
    ln_cell_weight: torch.Tensor | None,
    ln_cell_bias: torch.Tensor | None,
    lengths: torch.Tensor | None,
    probe: torch.Tensor | None,
    mode: str,
    reverse: bool,
    track: bool,
    grad_clip: float | None,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One direction of one layer over the whole sequence.

    Args:
        xproj: [T, B, G*H] input projection x W_ih^T + b_ih (+ b_hh except for the GRU); G = 4 (LSTM),
            3 (GRU), 1 (RNN). With layer normalization: LN(x W_ih^T) plus the same biases.
            float32/float64 (cpp); also bfloat16/float16 (triton).
        h0, c0: [B, H] initial states; c0 for the LSTM only.
        w_hh: [G*H, H]. b_hh: [G*H] for the GRU (None = no bias), None otherwise.
        ln_hh_weight, ln_hh_bias: [G*H] gain and shift of LN(W_hh h), or None for plain cells.
        ln_cell_weight, ln_cell_bias: [H] gain and shift of LN(c) (layer-normalized LSTM), else None.
        lengths: int64 [B] on the input's device, or None: past its length a sample's state is carried.
        probe: float64 [K, T, B] zeros that require grad (K = 2 for the LSTM, else 1), or None. Its
            gradient is the per-sample squared norm of ∂loss/∂h_t (and ∂loss/∂c_t), in float64.
        mode: "lstm", "gru", "rnn_tanh", "rnn_relu" or "rnn_sigmoid". reverse: run t = T-1 .. 0.
        track: compute the step Jacobian norms (forward) and gradient norms (backward).
        grad_clip: clamp the gate pre-activation gradients to [-c, c] at every step, or None.
        eps: the layer normalization's epsilon.
        backend: "cpp" or "triton".
    Returns:
        states [T+1, B, H] (h0 first, or last when reverse), cell_states (LSTM: same layout; else
        empty), workspace (saved for backward), jac_sq float32 [T, B] (empty unless track).
    """
    if ln_hh_weight is None:
        forward, _ = _kernel_ops(backend, layer_norm=False)
        return tuple(forward(xproj, h0, c0, w_hh, b_hh, lengths, None, mode, reverse, track))
    forward, _ = _kernel_ops(backend, layer_norm=True)
    return tuple(forward(xproj, h0, c0, w_hh, b_hh, ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias,
                         eps, lengths, mode, reverse, track))


@recurrent_layer.register_fake
def _(xproj, h0, c0, w_hh, b_hh, ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias, lengths, probe,
      mode, reverse, track, grad_clip, eps, backend):
    return _fake_forward_shapes(xproj, w_hh, mode, track, layer_norm=ln_hh_weight is not None)


def _setup_context(ctx, inputs, output):
    (xproj, h0, c0, w_hh, b_hh, ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias, lengths, probe,
     mode, reverse, track, grad_clip, eps, backend) = inputs
    states, cell_states, workspace, _ = output
    # The op's inputs too, for a create_graph backward, which recomputes; xproj through the tensors it
    # was computed from, which autograd keeps anyway.
    xproj_fn, xproj_inputs = recompute_recipe(xproj)
    ctx.save_for_backward(states, cell_states, workspace, w_hh, lengths, ln_hh_weight, ln_cell_weight,
                          h0, c0, b_hh, ln_hh_bias, ln_cell_bias, *xproj_inputs)
    ctx.xproj_fn = xproj_fn
    ctx.config = (mode, reverse, track and probe is not None, grad_clip, backend)
    ctx.eps = eps
    ctx.has_c0, ctx.has_b_hh, ctx.has_probe = c0 is not None, b_hh is not None, probe is not None


def _probe_grad(watched_grads, mode, T, like) -> torch.Tensor:
    """The probe's gradient from a recomputation: its own gradient, zeros when nothing reached it."""
    if watched_grads and watched_grads[0] is not None:
        return watched_grads[0]
    K = 2 if mode == "lstm" else 1
    return like.new_zeros(K, T, like.shape[0], dtype=torch.float64)


def _reference_states(mode, reverse, eps, lengths, track):
    """``forward`` for differentiable_vjp: the op's (states, cell_states) from its tensor inputs."""

    def forward(xproj, h0, c0, w_hh, b_hh, ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias):
        norm = None if ln_hh_weight is None else reference.CellNorm(
            ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias, eps)
        result = reference.layer_forward(xproj, h0, c0, w_hh, b_hh, lengths, mode, reverse, track, norm,
                                         jacobians=False)
        cells = result.cell_states if mode == "lstm" else None
        return (result.states, cells), (result.watched() if track else [])

    return forward


def _backward_differentiable(ctx, grad_states, grad_cell_states):
    """create_graph=True: the gradients of vgk::recurrent_layer through the reference, differentiable."""
    (_, _, _, w_hh, lengths, ln_hh_weight, ln_cell_weight, h0, c0, b_hh, ln_hh_bias, ln_cell_bias,
     *xproj_inputs) = ctx.saved_tensors
    mode, reverse, track, grad_clip, _ = ctx.config
    if grad_clip is not None:
        refuse_create_graph("grad_clip")
    xproj = ctx.xproj_fn(*xproj_inputs)
    forward = _reference_states(mode, reverse, ctx.eps, lengths, track and ctx.has_probe)
    grads, watched = differentiable_vjp(
        forward, (xproj, h0, c0, w_hh, b_hh, ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias),
        (grad_states, grad_cell_states if mode == "lstm" else None))
    grad_sq = _probe_grad(watched, mode, xproj.shape[0], h0) if (track and ctx.has_probe) else None
    return (*grads, None, grad_sq, None, None, None, None, None, None)


def _backward(ctx, grad_states, grad_cell_states, _grad_workspace, _grad_jac):
    if torch.is_grad_enabled():
        return _backward_differentiable(ctx, grad_states, grad_cell_states)
    states, cell_states, workspace, w_hh, lengths, ln_hh_weight, ln_cell_weight = ctx.saved_tensors[:7]
    mode, reverse, track, grad_clip, backend = ctx.config
    if grad_cell_states is None or grad_cell_states.shape != cell_states.shape:
        grad_cell_states = torch.zeros_like(cell_states)
    common = (grad_states.contiguous(), grad_cell_states.contiguous(), states, cell_states, workspace, w_hh)
    flags = (lengths, mode, reverse, grad_clip, track, ctx.has_b_hh)
    if ln_hh_weight is None:
        _, backward = _kernel_ops(backend, layer_norm=False)
        grad_xproj, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_sq = backward(*common, *flags)
        grad_norm = (None, None, None, None)
    else:
        _, backward = _kernel_ops(backend, layer_norm=True)
        (grad_xproj, grad_h0, grad_c0, grad_w_hh, grad_b_hh, g_hh_w, g_hh_b, g_c_w, g_c_b,
         grad_sq) = backward(*common, ln_hh_weight, ln_cell_weight, *flags)
        has_cell = ln_cell_weight is not None
        grad_norm = (g_hh_w, g_hh_b, g_c_w if has_cell else None, g_c_b if has_cell else None)
    return (
        grad_xproj,
        grad_h0,
        grad_c0 if ctx.has_c0 else None,
        grad_w_hh,
        grad_b_hh if ctx.has_b_hh else None,
        *grad_norm,
        None,
        grad_sq if (ctx.has_probe and track) else None,
        None, None, None, None, None, None,
    )


recurrent_layer.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# The plain C++ layer op (projection inside): its autograd is C++ (csrc/cpu/recurrent_autograd.cpp);
# its backward under create_graph=True calls vgk::rnn_layer_backward_differentiable, defined here.


def _reference_layer(mode, reverse, lengths, batch_sizes, track):
    """``forward`` for differentiable_vjp: vgk::rnn_layer_forward's (output, h_n, c_n) from its inputs,
    padded or packed (``batch_sizes``) like the op's."""

    def forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        seq_lengths = lengths
        if batch_sizes is not None:
            x, seq_lengths = _unpack(x, batch_sizes)
        xproj = _input_projection("reference", x, w_ih, b_ih, b_hh, mode, None)
        result = reference.layer_forward(xproj, h0, c0, w_hh, b_hh if mode == "gru" else None, seq_lengths,
                                         mode, reverse, track, w_hr=w_hr, jacobians=False)
        T = x.shape[0]
        last = 0 if reverse else T
        out = result.states[:T] if reverse else result.states[1:]
        if batch_sizes is not None:
            out = pack_padded_sequence(out, seq_lengths).data
        c_n = result.cell_states[last] if mode == "lstm" else None
        return (out, result.states[last], c_n), (result.watched() if track else [])

    return forward


def _layer_backward_differentiable(grad_output, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                   lengths, batch_sizes, mode, reverse, track, grad_clip):
    """vgk::rnn_layer_backward_differentiable: the gradients of vgk::rnn_layer_forward through the
    reference, differentiable (create_graph=True). Absent gradients (in and out) are empty tensors."""
    if grad_clip is not None:
        refuse_create_graph("grad_clip")
    forward = _reference_layer(mode, reverse, lengths, batch_sizes, track)
    incoming = tuple(None if g.numel() == 0 else g for g in (grad_output, grad_h_n, grad_c_n))
    grads, watched = differentiable_vjp(forward, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), incoming)
    T = x.shape[0] if batch_sizes is None else batch_sizes.shape[0]
    grad_sq = _probe_grad(watched, mode, T, h0) if track else None
    return [x.new_empty(0) if g is None else g for g in (*grads, grad_sq)]


_LIB = torch.library.Library("vgk", "FRAGMENT")  # noqa: TOR901  (keeps the Python kernel registered)
if cpp_available():
    _LIB.impl("rnn_layer_backward_differentiable", _layer_backward_differentiable,
              "CompositeImplicitAutograd")


# ---------------------------------------------------------------------------------------------------
# Stacking layers and directions.


def weight_names(num_layers: int, num_directions: int, bias: bool, proj_size: int = 0) -> list[str]:
    """torch.nn's parameter names in order (its ``_flat_weights_names``): per layer and direction
    weight_ih, weight_hh, bias_ih, bias_hh (with ``bias``), weight_hr (with ``proj_size`` > 0)."""
    return list(_weight_layout("lstm", 1, 1, num_layers, num_directions, bias, proj_size)[0])


_LAYOUTS: dict[tuple, tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]] = {}


def _weight_layout(mode: str, input_size: int, hidden_size: int, num_layers: int, num_directions: int,
                   bias: bool, proj_size: int) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """torch.nn's flat weight names and their shapes, remembered: the module path checks them every call.
    (A dict rather than functools.lru_cache, which Dynamo warns about.)"""
    key = (mode, input_size, hidden_size, num_layers, num_directions, bias, proj_size)
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = _LAYOUTS[key] = _build_weight_layout(*key)
    return layout


def _build_weight_layout(mode, input_size, hidden_size, num_layers, num_directions, bias, proj_size):
    G, H = GATES[mode], hidden_size
    P = proj_size or H
    names, shapes = [], []
    for layer in range(num_layers):
        layer_input = input_size if layer == 0 else P * num_directions
        for suffix in ("", "_reverse")[:num_directions]:
            kinds = [("weight_ih", (G * H, layer_input)), ("weight_hh", (G * H, P))]
            if bias:
                kinds += [("bias_ih", (G * H,)), ("bias_hh", (G * H,))]
            if proj_size:
                kinds.append(("weight_hr", (P, H)))
            names += [f"{kind}_l{layer}{suffix}" for kind, _ in kinds]
            shapes += [shape for _, shape in kinds]
    return tuple(names), tuple(shapes)


def _check_weights(weights: list[torch.Tensor], names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...],
                   input: torch.Tensor) -> None:
    """Check the flat weight list against its layout (:func:`_weight_layout`): per layer-direction
    (w_ih, w_hh[, b_ih, b_hh][, w_hr]) in torch.nn's order, each of the input's dtype and device. One pass,
    as it runs at every call (a decoder's T = 1 calls feel each microsecond)."""
    if len(weights) != len(names):
        raise ValueError(f"weights: expected {len(names)} tensors ({', '.join(names)}), got {len(weights)}")
    dtype, device = input.dtype, input.device
    for name, shape, tensor in zip(names, shapes, weights, strict=True):
        if tensor.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(tensor.shape)}")
        if tensor.dtype != dtype or tensor.device != device:
            _check_like_input(input, [(name, tensor)])


def _check_like_input(input: torch.Tensor, named: list[tuple[str, torch.Tensor | None]]) -> None:
    """Every given tensor is on the input's device and of its dtype."""
    for name, t in named:
        if t is None:
            continue
        if t.device != input.device:
            raise RuntimeError(f"{name}: expected a tensor on {input.device} like input, got {t.device}")
        if t.dtype != input.dtype:
            raise TypeError(f"{name}: expected dtype {input.dtype} like input, got {t.dtype}")


def _check_inputs(input, h0, c0, weights, names, shapes, lengths, backend, grad_clip):
    if not torch.is_floating_point(input):
        raise TypeError(f"input: expected a floating-point tensor, got dtype {input.dtype}")
    if input.shape[0] == 0:
        # torch.nn's error type and words
        raise RuntimeError("input: Expected sequence length to be larger than 0 in RNN, got T = 0")
    allowed = KERNEL_DTYPES[backend]
    if input.dtype not in allowed:
        raise TypeError(
            f"input: backend {backend!r} supports dtypes {[str(d) for d in allowed]} on "
            f"{input.device.type}, got {input.dtype}"
        )
    _check_like_input(input, [("h0", h0), ("c0", c0)])
    _check_weights(weights, names, shapes, input)
    if lengths is not None:
        B = input.shape[1]
        if lengths.dtype != torch.int64 or lengths.dim() != 1 or lengths.shape[0] != B:
            raise ValueError(
                f"lengths: expected an int64 tensor of shape [{B}], got dtype {lengths.dtype} "
                f"and shape {tuple(lengths.shape)}"
            )
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip: expected a positive number or None, got {grad_clip}")


def _probe(mode: str, T: int, B: int, device: torch.device) -> torch.Tensor | None:
    """The zero float64 [K, T, B] leaf whose gradient a layer's backward fills, or None without autograd."""
    return new_probe((2 if mode == "lstm" else 1, T, B), device, "BPTT tracking with gradients")


def _unpack(data: torch.Tensor, batch_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows [rows, *] to padded [T, B, *] (zeros past each length) and the lengths, in the sorted
    order of the packing."""
    return pad_packed_sequence(PackedSequence(data, batch_sizes))


def _run_layer(backend, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, ln_ih, norm, lengths, batch_sizes, mode,
               reverse, track, grad_clip):
    """One direction of one layer: (output, h_n, c_n (LSTM, else None), jac_sq [T, B], probe or None).

    x and the output are padded [T, B, *] or, with ``batch_sizes``, packed rows [rows, *].
    """
    if backend == "cpp" and norm is None:
        T, B = (x.shape[0], x.shape[1]) if batch_sizes is None else (batch_sizes.shape[0], h0.shape[0])
        probe = _probe(mode, T, B, x.device) if track else None
        out, h_n, c_n, _, _, jac_sq = torch.ops.vgk.rnn_layer_forward(
            x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, None if lengths is None else lengths.to(x.device),
            batch_sizes, probe, mode, reverse, track, grad_clip)
        return out, h_n, c_n if mode == "lstm" else None, jac_sq, probe
    if batch_sizes is not None:
        # The other backends take padded input with lengths: unpack around the layer.
        padded, lengths = _unpack(x, batch_sizes)
        out, h_n, c_n, jac_sq, probe = _run_layer(backend, padded, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                                  ln_ih, norm, lengths, None, mode, reverse, track, grad_clip)
        return pack_padded_sequence(out, lengths).data, h_n, c_n, jac_sq, probe
    T, B = x.shape[0], x.shape[1]
    xproj = _input_projection(backend, x, w_ih, b_ih, b_hh, mode, ln_ih)
    if mode != "gru":
        b_hh = None  # folded into xproj
    if backend == "reference":
        result = reference.layer_forward(xproj, h0, c0, w_hh, b_hh, lengths, mode, reverse, track, norm,
                                         w_hr, grad_clip)
        states, cell_states, jac_sq, probe = result.states, result.cell_states, result.jac_sq, result.probe
    else:
        probe = _probe(mode, T, B, x.device) if track else None
        ln = (None, None, None, None, 1e-5) if norm is None else norm
        states, cell_states, _, jac_sq = recurrent_layer(
            xproj.contiguous(), h0.contiguous(), None if c0 is None else c0.contiguous(), w_hh.contiguous(),
            b_hh, *ln[:4], None if lengths is None else lengths.to(x.device), probe, mode, reverse, track,
            grad_clip, ln[4], backend,
        )
    last = 0 if reverse else T
    out = states[:T] if reverse else states[1:]
    return out, states[last], cell_states[last] if mode == "lstm" else None, jac_sq, probe


def _layer_normalized(y, weight, bias, b, eps):
    """LN(y) + b in eager PyTorch (b may be None)."""
    out = F.layer_norm(y, y.shape[-1:], weight, bias, eps)
    return out if b is None else out + b


def _input_projection(backend, x, w_ih, b_ih, b_hh, mode, ln_ih):
    """x W_ih^T plus biases (b_hh too, except for the GRU), with LN(x W_ih^T) when ln_ih is given.

    The fused backends' result is marked recomputable from tensors autograd keeps anyway (x and the
    weights, or x W_ih^T, which the LayerNorm saves), so vgk::recurrent_layer need not keep it.
    """
    b = b_ih if (mode == "gru" or b_ih is None) else b_ih + b_hh
    linear = F.linear
    if backend == "triton":
        # float32 in the precision of the layer's recurrent dots (cuDNN's switch), as cuDNN computes it
        from vgkernels.triton.gemm import linear
    if ln_ih is None:
        xproj = linear(x, w_ih, b)
        return xproj if backend == "reference" else mark_recomputable(xproj, F.linear, x, w_ih, b)
    y = linear(x, w_ih)
    if backend == "reference":
        return _layer_normalized(y, *ln_ih[:2], b, ln_ih[2])
    from vgkernels.ops.layer_norm import layer_norm

    normalized = layer_norm(y, y.shape[-1:], ln_ih[0], ln_ih[1], ln_ih[2])
    xproj = normalized if b is None else normalized + b
    return mark_recomputable(xproj, partial(_layer_normalized, eps=ln_ih[2]), y, ln_ih[0], ln_ih[1], b)


class _Precision(NamedTuple):
    """How :func:`recurrent` runs a dtype its backend has no kernel for, or a torch.autocast region.

    compute: the dtype the layers run in. rounded: the dtype the input, weights and biases are rounded
    to first (autocast's GEMM operands), or None. states_rounded: round h0 and c0 too. output: the dtype
    of output, h_n and c_n.
    """

    compute: torch.dtype
    rounded: torch.dtype | None
    states_rounded: bool
    output: torch.dtype


@torch.compiler.assume_constant_result
def _onednn_support() -> tuple[bool, bool, bool]:
    """(oneDNN enabled, its bfloat16 kernels usable here, its float16 kernels usable here)."""
    enabled = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    return (enabled, enabled and torch.ops.mkldnn._is_mkldnn_bf16_supported(),
            enabled and torch.ops.mkldnn._is_mkldnn_fp16_supported())


def _torch_lstm_uses_onednn(input: torch.Tensor) -> bool:
    """Whether torch.nn.LSTM runs this padded CPU input through oneDNN (``aten::mkldnn_rnn_layer``).

    That op is on autocast's lower-precision list, so there every tensor is cast to the autocast dtype,
    while torch's native cells (GRU, RNN, packed input, float16 input with grad) keep their states in
    the dtype of h0/c0. The conditions are those of ``use_mkldnn`` in ATen's RNN.cpp.
    """
    enabled, bf16, fp16 = _onednn_support()
    return enabled and (input.dtype == torch.float32 or (input.dtype == torch.bfloat16 and bf16)
                        or (input.dtype == torch.float16 and fp16 and not torch.is_grad_enabled()))


def _torch_rnn_uses_cudnn() -> bool:
    """Whether torch.nn's RNNs run a floating CUDA input on cuDNN (``cudnn_is_acceptable``)."""
    return torch.backends.cudnn.enabled and torch.backends.cudnn.is_available()


def _autocast_precision(input, h0, c0, mode, packed) -> _Precision | None:
    """The outcome of torch.nn's RNNs under an active torch.autocast, or None outside one.

    On CUDA with cuDNN, input, states and weights are cast to float16 whatever A is (torch's autocast
    wrapper of ``_cudnn_rnn`` casts to half), and every output is float16. On CUDA without cuDNN and
    for the oneDNN LSTM on the CPU, they are cast to the autocast dtype A and every output is in A.
    torch's native CPU cells run their GEMMs in A and their state updates in the states' dtype D (the
    input's dtype when hx is None): the Elman RNN returns A (its state is the activation of an A sum),
    the GRU and LSTM promote(D, A). float64 inputs are not
    autocast (torch then fails on the float64/A GEMM, and so does the dtype check here).
    """
    device_type = input.device.type
    if not torch.is_autocast_enabled(device_type) or input.dtype not in _AUTOCAST_ELIGIBLE:
        return None
    low = torch.get_autocast_dtype(device_type)
    if device_type == "cuda" and _torch_rnn_uses_cudnn():
        return _Precision(torch.float16, torch.float16, True, torch.float16)
    if device_type != "cpu" or (mode == "lstm" and not packed and _torch_lstm_uses_onednn(input)):
        return _Precision(low, low, True, low)
    if mode.startswith("rnn"):
        output = low
    else:
        state = h0 if mode == "gru" else c0
        output = torch.promote_types(input.dtype if state is None else state.dtype, low)
    return _Precision(torch.float32, low, False, output)


def _precision(input, h0, c0, mode, packed, backend) -> _Precision | None:
    """None when ``backend`` runs ``input`` as it is; else how to run it (see :class:`_Precision`)."""
    plan = _autocast_precision(input, h0, c0, mode, packed)
    if plan is not None:
        native = plan.compute in KERNEL_DTYPES[backend]
        return plan if native else plan._replace(compute=torch.float32)
    if input.dtype in FLOAT_DTYPES and input.dtype not in KERNEL_DTYPES[backend]:
        return _Precision(torch.float32, None, False, input.dtype)  # half types on the float32 kernels
    return None


def _recurrent_in(plan: _Precision, input, h0_all, c0_all, weights, layer_norm_weights, **kwargs):
    """:func:`recurrent` in ``plan.compute`` with autocast off, its outputs cast to ``plan.output``."""

    def cast(t, rounded):
        if t is None or not t.is_floating_point() or t.dtype == torch.float64:
            return t  # float64 is never autocast; a mismatch is reported by the dtype checks
        if rounded and plan.rounded is not None:
            t = t.to(plan.rounded)
        return t.to(plan.compute)

    hx = None if h0_all is None else cast(h0_all, plan.states_rounded)
    if c0_all is not None:
        hx = (hx, cast(c0_all, plan.states_rounded))
    ln = None if layer_norm_weights is None else [cast(t, False) for t in layer_norm_weights]
    with torch.autocast(input.device.type, enabled=False):
        output, h_n, c_n, trace = recurrent(cast(input, True), hx, [cast(w, True) for w in weights],
                                            layer_norm_weights=ln, **kwargs)
    return output.to(plan.output), h_n.to(plan.output), None if c_n is None else c_n.to(plan.output), trace


def layer_norm_names(mode: str, num_layers: int, num_directions: int) -> list[str]:
    """Names of a layer-normalized cell's extra parameters, per layer and direction, in order."""
    kinds = ["ih_weight", "ih_bias", "hh_weight", "hh_bias"] + (["cell_weight", "cell_bias"] if mode == "lstm"
                                                               else [])
    return [f"layer_norm_{kind}_l{layer}{suffix}" for layer in range(num_layers)
            for suffix in ("", "_reverse")[:num_directions] for kind in kinds]


def _empty_batch(input, h0_all, c0_all, weights, layer_norm_weights, L, T, out_width, hidden_size, mode,
                 track, num_layers, num_directions):
    """The outputs for an empty batch (B = 0), as torch.nn gives them: empty tensors, and zero gradients
    for the input, the states and every weight; no kernel runs."""
    P = out_width // num_directions
    probes = [_probe(mode, T, 0, input.device) if track else None for _ in range(L)]
    # A zero that depends on every input, so that backward reaches them (all outputs are empty).
    leaves = [input, h0_all, c0_all, *weights, *(layer_norm_weights or []), *probes]
    anchor = sum(t.sum() for t in leaves if t is not None) * 0
    output = input.new_zeros(T, 0, out_width) + anchor.to(input.dtype)
    h_n = input.new_zeros(L, 0, P) + anchor.to(input.dtype)
    c_n = input.new_zeros(L, 0, hidden_size) + anchor.to(input.dtype) if mode == "lstm" else None
    trace = None
    if track:
        trace = BPTTTrace(mode, num_layers, num_directions, input.new_zeros(L, T, 0, dtype=torch.float32),
                          probes)
    return output, h_n, c_n, trace


def recurrent(
    input: torch.Tensor,
    hx: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None,
    weights: list[torch.Tensor],
    *,
    mode: str,
    hidden_size: int,
    num_layers: int = 1,
    bias: bool = True,
    dropout: float = 0.0,
    training: bool = False,
    bidirectional: bool = False,
    lengths: torch.Tensor | None = None,
    track: bool = False,
    grad_clip: float | None = None,
    layer_norm_weights: list[torch.Tensor] | None = None,
    eps: float = 1e-5,
    backend: str | None = None,
    proj_size: int = 0,
    batch_sizes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, BPTTTrace | None]:
    """A multi-layer, optionally bidirectional recurrent network over a time-major sequence.

    Args:
        input: [T, B, input_size] floating point; or, with ``batch_sizes``, the rows of a packed
            sequence [rows, input_size] (a ``PackedSequence``'s ``data``: the samples sorted by
            decreasing length, step t holding the first batch_sizes[t] of them).
        hx: None (zeros), h0 [L, B, P], or (h0, c0) for the LSTM with c0 [L, B, H]; L = num_layers *
            num_directions, P = proj_size or H. With packed input, in the sorted order.
        weights: per layer and direction, in torch.nn's order (its ``_flat_weights``), (weight_ih,
            weight_hh, bias_ih, bias_hh, weight_hr): [G*H, in], [G*H, P], [G*H], [G*H], [P, H]; the
            biases only with ``bias``, weight_hr only with ``proj_size``.
        mode: "lstm", "gru", "rnn_tanh", "rnn_relu" or "rnn_sigmoid".
        dropout, training: dropout on the outputs of every layer but the last, in training only; on
            packed input it is drawn over the packed rows, as torch.nn does.
        lengths: int64 [B] (CPU) lengths for padded variable-length input, or None.
        track: compute a :class:`~vgkernels.trace.BPTTTrace`.
        grad_clip: elementwise clamp of the gate pre-activation gradients at every step, or None.
        layer_norm_weights: layer-normalized LSTM/GRU cells (Ba et al. 2016): per layer and direction
            the gains and shifts named by :func:`layer_norm_names` ([G*H] for ih and hh, [H] for the
            LSTM's cell), giving gates = LN(W_ih x) + LN(W_hh h) + b and h = o * tanh(LN(c)). None for
            plain cells.
        eps: the layer normalization's epsilon.
        backend: "cpp", "triton", "reference" or None (automatic; ``VGK_BACKEND``).
        proj_size: the LSTM's projection P (torch.nn's proj_size): h_t = W_hr (o_t * tanh(c_t)), of
            size P, is the output and the recurrent state. 0: none. Not with layer_norm_weights, and
            not on the triton backend.
        batch_sizes: int64 [T] (CPU) of a packed input, or None.
    Returns:
        output [T, B, num_directions*P] (zeros past each length; packed: [rows, num_directions*P]),
        h_n [L, B, P], c_n [L, B, H] (LSTM; else None), and the trace (None unless ``track``; with packed
        input its samples are in the sorted order).

    Dtypes: the input, hx and all weights share one dtype: float32, float64, bfloat16 or float16 (the
    cpp backend runs the half types on float32 copies; outputs come back in the input's dtype). Under
    ``torch.autocast`` the outputs have the dtypes torch.nn's modules return there (see
    :func:`_autocast_precision`). Under forward-mode AD or a torch.func transform the reference backend
    runs; a backward with ``create_graph=True`` returns differentiable gradients.
    """
    if mode not in GATES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    backend = resolve_backend(backend, input.device, op=f"vgkernels {mode}")
    num_directions = 2 if bidirectional else 1
    L = num_layers * num_directions
    packed = batch_sizes is not None
    if packed:
        if lengths is not None:
            raise ValueError("lengths: padded lengths and packed batch_sizes exclude each other, got both")
        if input.dim() != 2:
            raise ValueError(f"input: expected packed rows [rows, input_size] with batch_sizes, got shape "
                             f"{tuple(input.shape)}")
        T, B = batch_sizes.shape[0], int(batch_sizes[0])
    else:
        if input.dim() != 3:
            raise ValueError(
                f"input: expected a 3-D tensor [T, B, input_size], got shape {tuple(input.shape)}")
        T, B = input.shape[0], input.shape[1]
    if proj_size:
        if mode != "lstm":
            raise ValueError(f"proj_size: projections are for the LSTM only, got mode {mode!r}")
        if layer_norm_weights is not None:
            raise ValueError("proj_size: the layer-normalized cells have no projection; use proj_size=0")
        if backend == "triton":
            raise NotImplementedError(
                "proj_size: the triton backend has no projection yet; use backend 'cpp' (CPU tensors) or "
                "'reference'")
    P = proj_size or hidden_size
    if isinstance(hx, tuple):
        h0_all, c0_all = hx
    else:
        h0_all, c0_all = hx, None
    ln_weights = layer_norm_weights or []
    if backend != "reference" and transforms_active(input, h0_all, c0_all, *weights, *ln_weights):
        backend = "reference"  # the kernels have no forward-mode or torch.func rules; the reference has all
    plan = _precision(input, h0_all, c0_all, mode, packed or lengths is not None, backend)
    if plan is not None:
        if plan.rounded is None:  # no autocast: the dtypes must agree before they are converted
            names = (["h0", "c0"] + weight_names(num_layers, num_directions, bias)
                     + layer_norm_names(mode, num_layers, num_directions))
            _check_like_input(input, list(zip(names, [h0_all, c0_all, *weights, *ln_weights], strict=False)))
        return _recurrent_in(plan, input, h0_all, c0_all, weights, layer_norm_weights, mode=mode,
                             hidden_size=hidden_size, num_layers=num_layers, bias=bias, dropout=dropout,
                             training=training, bidirectional=bidirectional, lengths=lengths, track=track,
                             grad_clip=grad_clip, eps=eps, backend=backend, proj_size=proj_size,
                             batch_sizes=batch_sizes)
    if mode == "lstm" and hx is not None and c0_all is None:
        raise ValueError(f"hx: the LSTM expects a tuple (h0, c0), got {type(hx).__name__}")
    if mode != "lstm" and c0_all is not None:
        raise ValueError(f"hx: mode {mode!r} expects one tensor h0, got a tuple")
    for name, t, size in (("h0", h0_all, P), ("c0", c0_all, hidden_size)):
        if t is not None and t.shape != (L, B, size):
            raise ValueError(f"hx: expected {name} of shape {(L, B, size)}, got {tuple(t.shape)}")
    names, shapes = _weight_layout(mode, input.shape[-1], hidden_size, num_layers, num_directions, bool(bias),
                                   proj_size)
    _check_inputs(input, h0_all, c0_all, weights, names, shapes, lengths, backend, grad_clip)
    if layer_norm_weights is not None:
        _check_layer_norm_weights(layer_norm_weights, input, mode, hidden_size, num_layers, num_directions)
    if B == 0:
        return _empty_batch(input, h0_all, c0_all, weights, layer_norm_weights, L, T, num_directions * P,
                            hidden_size, mode, track, num_layers, num_directions)
    if lengths is not None and (int(lengths.min()) < 1 or int(lengths.max()) > T):
        raise ValueError(f"lengths: expected values in [1, {T}], got min {int(lengths.min())}, "
                         f"max {int(lengths.max())}")
    if h0_all is None:
        h0_all = input.new_zeros(L, B, P)
    if mode == "lstm" and c0_all is None:
        c0_all = input.new_zeros(L, B, hidden_size)

    per = len(names) // L
    ln_per = 6 if mode == "lstm" else 4
    layer_input = input
    h_n, c_n, jac, probes = [], [], [], []
    for layer in range(num_layers):
        outputs = []
        for d in range(num_directions):
            idx = layer * num_directions + d
            w = weights[idx * per: (idx + 1) * per]
            w_ih, w_hh = w[0], w[1]
            b_ih, b_hh = (w[2], w[3]) if bias else (None, None)
            w_hr = w[-1] if proj_size else None
            ln_ih = norm = None
            if layer_norm_weights is not None:
                ln = layer_norm_weights[idx * ln_per: (idx + 1) * ln_per]
                ln_ih = (ln[0], ln[1], eps)
                norm = reference.CellNorm(ln[2], ln[3], *(ln[4:6] if mode == "lstm" else (None, None)), eps)
            out, h_last, c_last, jac_sq, probe = _run_layer(
                backend, layer_input, h0_all[idx], None if c0_all is None else c0_all[idx], w_ih, w_hh, b_ih,
                b_hh, w_hr, ln_ih, norm, lengths, batch_sizes, mode, bool(d), track, grad_clip,
            )
            h_n.append(h_last)
            if mode == "lstm":
                c_n.append(c_last)
            outputs.append(out)
            jac.append(jac_sq)
            probes.append(probe)
        layer_output = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=-1)
        if dropout > 0 and training and layer < num_layers - 1:
            # On packed rows as torch.nn draws it, so that masks match under the same seed.
            layer_output = F.dropout(layer_output, p=dropout, training=True)
        layer_input = layer_output
    output = layer_input
    if lengths is not None:
        valid = torch.arange(T, device=input.device)[:, None] < lengths.to(input.device)[None, :]
        output = output * valid[:, :, None].to(output.dtype)
    trace = None
    if track:
        output_probe = None
        if probes[0] is not None:
            output_probe = torch.zeros(T, B, dtype=torch.float64, device=input.device, requires_grad=True)
            output = _OutputGradProbe.apply(output, output_probe, batch_sizes)
        if packed:
            lengths = (batch_sizes[None, :] > torch.arange(B)[:, None]).sum(1)
        trace = BPTTTrace(
            mode=mode,
            num_layers=num_layers,
            num_directions=num_directions,
            jacobian_norm_per_sample=torch.stack(jac).detach().clamp_min(0).sqrt(),
            grad_sources=probes,
            lengths=None if lengths is None else lengths.cpu(),
            output_probe=output_probe,
        )
    return output, _stack(h_n), _stack(c_n) if mode == "lstm" else None, trace


class _OutputGradProbe(torch.autograd.Function):
    """Identity on the network's output whose backward writes, per position and sample, the squared norm
    of the gradient that reaches the output there (float64 [T, B]) into the probe's gradient: where a
    loss (or whatever reads the output) injects gradient, as opposed to gradient travelling back."""

    @staticmethod
    def forward(ctx, output, probe, batch_sizes):
        ctx.batch_sizes = batch_sizes
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        sq = grad.double().pow(2).sum(-1)
        if ctx.batch_sizes is not None:  # packed rows -> [T, B], sorted order
            sq = pad_packed_sequence(PackedSequence(sq, ctx.batch_sizes))[0]
        return grad, sq, None


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    # One layer-direction (the common case, and every T = 1 decoder step): a view, no copy.
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _check_layer_norm_weights(layer_norm_weights, input, mode, hidden_size, num_layers, num_directions):
    if mode not in ("lstm", "gru"):
        raise ValueError(
            f"layer_norm_weights: layer normalization is for 'lstm' and 'gru', got mode {mode!r}")
    ln_names = layer_norm_names(mode, num_layers, num_directions)
    if len(layer_norm_weights) != len(ln_names):
        raise ValueError(
            f"layer_norm_weights: expected {len(ln_names)} tensors, got {len(layer_norm_weights)}")
    G = GATES[mode]
    for name, t in zip(ln_names, layer_norm_weights, strict=True):
        size = hidden_size if "cell" in name else G * hidden_size
        if tuple(t.shape) != (size,) or t.dtype != input.dtype or t.device != input.device:
            raise ValueError(f"{name}: expected shape ({size},), dtype {input.dtype} on {input.device}; "
                             f"got shape {tuple(t.shape)}, dtype {t.dtype} on {t.device}")
