"""Recurrent layers (Elman RNN, LSTM, GRU) as torch.library ops with per-step BPTT tracking.

Structure:
- ``vgk::rnn_layer_forward`` (C++, CPU) runs one direction of one plain layer over the whole sequence,
  input projection included; its backward ``vgk::rnn_layer_backward`` returns the gradients of the
  input, the initial states, both weights and both biases. The autograd registration below is on the
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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vgkernels.backends import resolve_backend
from vgkernels.reference import recurrent as reference
from vgkernels.trace import BPTTTrace

GATES = reference.GATES
MODES = reference.MODES
KERNEL_DTYPES = {
    "cpp": (torch.float32, torch.float64),
    "triton": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "reference": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
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


def workspace_width(mode: str, hidden_size: int, layer_norm: bool) -> int:
    """Per position and sample, the number of values the forward saves for the backward.

    Plain cells: LSTM the 4 activated gates; GRU r, z, n and W_hn h + b_hn; RNN nothing (the activation
    derivative follows from h). Layer-normalized cells add the normalized W_hh h (G*H values) and its
    1/std, and for the LSTM the normalized c, tanh(LN(c)) and the 1/std of c.
    """
    H = hidden_size
    if not layer_norm:
        return {"lstm": 4 * H, "gru": 4 * H}.get(mode, 0)
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
def _(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, probe, mode, reverse, track, grad_clip):
    T, B, _ = x.shape
    H = w_hh.shape[1]
    lstm = mode == "lstm"
    output, h_n = x.new_empty(T, B, H), x.new_empty(B, H)
    c_n, cell_states = (x.new_empty(B, H), x.new_empty(T, B, H)) if lstm else (_empty(x), _empty(x))
    return output, h_n, c_n, cell_states, *_fake_saved(x, T, B, H, mode, track, layer_norm=False)


@torch.library.register_fake("vgk::rnn_layer_backward")
def _(grad_output, grad_h_n, grad_c_n, x, h0, c0, output, cell_states, workspace, w_ih, w_hh, lengths, mode,
      reverse, grad_clip, track, has_bias, grad_input):
    T, B, H = output.shape
    GH = w_hh.shape[0]
    grad_x = x.new_empty(x.shape) if grad_input else _empty(x)
    grad_c0 = h0.new_empty(B, H) if mode == "lstm" else _empty(h0)
    # Two distinct bias gradients: the kernels' outputs never alias each other.
    grad_b = tuple(w_hh.new_empty(GH) if has_bias else _empty(w_hh) for _ in range(2))
    return (grad_x, h0.new_empty(B, H), grad_c0, w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape),
            *grad_b, _fake_grad_sq(x, T, B, mode, track))


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
    ctx.save_for_backward(states, cell_states, workspace, w_hh, lengths, ln_hh_weight, ln_cell_weight)
    ctx.config = (mode, reverse, track and probe is not None, grad_clip, backend)
    ctx.has_c0, ctx.has_b_hh, ctx.has_probe = c0 is not None, b_hh is not None, probe is not None


def _backward(ctx, grad_states, grad_cell_states, _grad_workspace, _grad_jac):
    states, cell_states, workspace, w_hh, lengths, ln_hh_weight, ln_cell_weight = ctx.saved_tensors
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
# The autograd of the plain C++ layer op (projection inside).


def _layer_setup_context(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, probe, mode, reverse, track, grad_clip = inputs
    out, _, _, cell_states, workspace, _ = output
    ctx.save_for_backward(x, h0, c0, out, cell_states, workspace, w_ih, w_hh, lengths)
    # Unused outputs get no zero-filled gradients: the backward reads None as zero.
    ctx.set_materialize_grads(False)
    ctx.config = (mode, reverse, track and probe is not None, grad_clip)
    ctx.has = (c0 is not None, b_ih is not None, b_hh is not None, probe is not None)


def _layer_backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_cells, _grad_workspace, _grad_jac):
    x, h0, c0, out, cell_states, workspace, w_ih, w_hh, lengths = ctx.saved_tensors
    mode, reverse, track, grad_clip = ctx.config
    has_c0, has_b_ih, has_b_hh, has_probe = ctx.has
    grad_input = ctx.needs_input_grad[0]
    empty = _empty(out)
    grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_sq = (
        torch.ops.vgk.rnn_layer_backward(
            empty if grad_output is None else grad_output, empty if grad_h_n is None else grad_h_n,
            empty if grad_c_n is None else grad_c_n, x, h0, c0, out, cell_states, workspace, w_ih, w_hh,
            lengths, mode, reverse, grad_clip, track, has_b_ih or has_b_hh, grad_input,
        )
    )
    return (
        grad_x if grad_input else None,
        grad_h0,
        grad_c0 if has_c0 else None,
        grad_w_ih,
        grad_w_hh,
        grad_b_ih if has_b_ih else None,
        grad_b_hh if has_b_hh else None,
        None,
        grad_sq if (has_probe and track) else None,
        None, None, None, None,
    )


torch.library.register_autograd("vgk::rnn_layer_forward", _layer_backward, setup_context=_layer_setup_context)


# ---------------------------------------------------------------------------------------------------
# Stacking layers and directions.


def weight_names(num_layers: int, num_directions: int, bias: bool) -> list[str]:
    """torch.nn's parameter names in order: per layer and direction weight_ih, weight_hh, bias_ih, bias_hh."""
    kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")[: 4 if bias else 2]
    return [f"{kind}_l{layer}{suffix}" for layer in range(num_layers)
            for suffix in ("", "_reverse")[:num_directions] for kind in kinds]


def check_weights(
    weights: list[torch.Tensor], mode: str, input_size: int, hidden_size: int, num_layers: int,
    num_directions: int, bias: bool,
) -> None:
    """Check the flat weight list: per layer-direction (w_ih, w_hh[, b_ih, b_hh]) in torch.nn order."""
    names = weight_names(num_layers, num_directions, bias)
    if len(weights) != len(names):
        raise ValueError(f"weights: expected {len(names)} tensors ({', '.join(names)}), got {len(weights)}")
    G = GATES[mode]
    for name, tensor in zip(names, weights, strict=True):
        layer = int(name.split("_l")[1].split("_")[0])
        in_size = input_size if layer == 0 else hidden_size * num_directions
        shape = {"weight_ih": (G * hidden_size, in_size), "weight_hh": (G * hidden_size, hidden_size)}.get(
            name[:9], (G * hidden_size,))
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(tensor.shape)}")


def _check_inputs(input, h0, c0, weights, names, mode, lengths, backend, grad_clip):
    if not torch.is_floating_point(input):
        raise TypeError(f"input: expected a floating-point tensor, got dtype {input.dtype}")
    if input.dim() != 3:
        raise ValueError(f"input: expected a 3-D tensor [T, B, input_size], got shape {tuple(input.shape)}")
    if input.shape[0] == 0:
        raise ValueError("input: the sequence is empty (T = 0); expected at least one time step")
    if input.shape[1] == 0:
        raise ValueError("input: the batch is empty (B = 0); expected at least one sequence")
    allowed = KERNEL_DTYPES[backend]
    if input.dtype not in allowed:
        raise TypeError(
            f"input: backend {backend!r} supports dtypes {[str(d) for d in allowed]} on "
            f"{input.device.type}, got {input.dtype}"
        )
    for name, t in [("h0", h0), ("c0", c0)] + list(zip(names, weights, strict=False)):
        if t is None:
            continue
        if t.device != input.device:
            raise RuntimeError(f"{name}: expected a tensor on {input.device} like input, got {t.device}")
        if t.dtype != input.dtype:
            raise TypeError(f"{name}: expected dtype {input.dtype} like input, got {t.dtype}")
    if lengths is not None:
        if lengths.dtype != torch.int64 or lengths.dim() != 1 or lengths.shape[0] != input.shape[1]:
            raise ValueError(
                f"lengths: expected an int64 tensor of shape [{input.shape[1]}], got dtype {lengths.dtype} "
                f"and shape {tuple(lengths.shape)}"
            )
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip: expected a positive number or None, got {grad_clip}")


def _probe(mode: str, T: int, B: int, device: torch.device) -> torch.Tensor | None:
    if not torch.is_grad_enabled():
        return None
    if torch.compiler.is_compiling():
        # The probe must be a fresh leaf that requires grad, which dynamo cannot create in a graph.
        raise RuntimeError(
            "track: BPTT tracking with gradients is not supported inside torch.compile; compile the "
            "model with track=False, run tracked steps eagerly, or trace the forward only under "
            "torch.no_grad()"
        )
    K = 2 if mode == "lstm" else 1
    return torch.zeros(K, T, B, dtype=torch.float64, device=device, requires_grad=True)


def _run_layer(backend, x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, norm, lengths, mode, reverse, track,
               grad_clip):
    """One direction of one layer: (output [T, B, H], h_n, c_n (LSTM, else None), jac_sq, grad source)."""
    T, B = x.shape[0], x.shape[1]
    kernel_lengths = None if lengths is None else lengths.to(x.device)
    grad_source = (lambda: None)
    if backend == "cpp" and norm is None:
        probe = _probe(mode, T, B, x.device) if track else None
        out, h_n, c_n, _, _, jac_sq = torch.ops.vgk.rnn_layer_forward(
            x, h0, c0, w_ih, w_hh, b_ih, b_hh, kernel_lengths, probe, mode, reverse, track, grad_clip)
        if probe is not None:
            grad_source = (lambda: probe.grad)
        return out, h_n, c_n if mode == "lstm" else None, jac_sq, grad_source
    xproj = _input_projection(backend, x, w_ih, b_ih, b_hh, mode, ln_ih)
    if mode != "gru":
        b_hh = None  # folded into xproj
    if backend == "reference":
        if grad_clip is not None:
            raise ValueError(f"grad_clip: the reference backend does not clip, so it expects None, got "
                             f"{grad_clip}; use backend 'cpp' or 'triton'")
        result = reference.layer_forward(xproj, h0, c0, w_hh, b_hh, lengths, mode, reverse, track, norm)
        states, cell_states, jac_sq, grad_source = (result.states, result.cell_states, result.jac_sq,
                                                    result.grad_sq)
    else:
        probe = _probe(mode, T, B, x.device) if track else None
        ln = (None, None, None, None, 1e-5) if norm is None else norm
        states, cell_states, _, jac_sq = recurrent_layer(
            xproj.contiguous(), h0.contiguous(), None if c0 is None else c0.contiguous(), w_hh.contiguous(),
            b_hh, *ln[:4], kernel_lengths, probe, mode, reverse, track, grad_clip, ln[4], backend,
        )
        if probe is not None:
            grad_source = (lambda: probe.grad)
    last = 0 if reverse else T
    out = states[:T] if reverse else states[1:]
    return out, states[last], cell_states[last] if mode == "lstm" else None, jac_sq, grad_source


def _input_projection(backend, x, w_ih, b_ih, b_hh, mode, ln_ih):
    """x W_ih^T plus biases (b_hh too, except for the GRU), with LN(x W_ih^T) when ln_ih is given."""
    b = b_ih if (mode == "gru" or b_ih is None) else b_ih + b_hh
    if ln_ih is None:
        return F.linear(x, w_ih, b)
    y = F.linear(x, w_ih)
    if backend == "reference":
        y = F.layer_norm(y, y.shape[-1:], ln_ih[0], ln_ih[1], ln_ih[2])
    else:
        from vgkernels.ops.layer_norm import layer_norm

        y = layer_norm(y, y.shape[-1:], ln_ih[0], ln_ih[1], ln_ih[2])
    return y if b is None else y + b


def layer_norm_names(mode: str, num_layers: int, num_directions: int) -> list[str]:
    """Names of a layer-normalized cell's extra parameters, per layer and direction, in order."""
    kinds = ["ih_weight", "ih_bias", "hh_weight", "hh_bias"] + (["cell_weight", "cell_bias"] if mode == "lstm"
                                                               else [])
    return [f"layer_norm_{kind}_l{layer}{suffix}" for layer in range(num_layers)
            for suffix in ("", "_reverse")[:num_directions] for kind in kinds]


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, BPTTTrace | None]:
    """A multi-layer, optionally bidirectional recurrent network over a padded, time-major sequence.

    Args:
        input: [T, B, input_size], floating point.
        hx: None (zeros), h0 [L, B, H], or (h0, c0) for the LSTM; L = num_layers * num_directions.
        weights: per layer and direction, in torch.nn's order, (weight_ih, weight_hh, bias_ih, bias_hh)
            ([G*H, in], [G*H, H], [G*H], [G*H]), without the biases when ``bias`` is False.
        mode: "lstm", "gru", "rnn_tanh", "rnn_relu" or "rnn_sigmoid".
        dropout, training: dropout on the outputs of every layer but the last, in training only.
        lengths: int64 [B] (CPU) lengths for padded variable-length input, or None.
        track: compute a :class:`~vgkernels.trace.BPTTTrace`.
        grad_clip: elementwise clamp of the gate pre-activation gradients at every step, or None.
        layer_norm_weights: layer-normalized LSTM/GRU cells (Ba et al. 2016): per layer and direction
            the gains and shifts named by :func:`layer_norm_names` ([G*H] for ih and hh, [H] for the
            LSTM's cell), giving gates = LN(W_ih x) + LN(W_hh h) + b and h = o * tanh(LN(c)). None for
            plain cells.
        eps: the layer normalization's epsilon.
        backend: "cpp", "triton", "reference" or None (automatic; ``VGK_BACKEND``).
    Returns:
        output [T, B, num_directions*H] (zeros past each length), h_n [L, B, H], c_n [L, B, H] (LSTM;
        else None), and the trace (None unless ``track``).
    """
    if mode not in GATES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    backend = resolve_backend(backend, input.device, op=f"vgkernels {mode}")
    num_directions = 2 if bidirectional else 1
    L = num_layers * num_directions
    T, B = input.shape[0], (input.shape[1] if input.dim() == 3 else 0)
    if isinstance(hx, tuple):
        h0_all, c0_all = hx
    else:
        h0_all, c0_all = hx, None
    if mode == "lstm" and hx is not None and c0_all is None:
        raise ValueError(f"hx: the LSTM expects a tuple (h0, c0), got {type(hx).__name__}")
    if mode != "lstm" and c0_all is not None:
        raise ValueError(f"hx: mode {mode!r} expects one tensor h0, got a tuple")
    for name, t in (("h0", h0_all), ("c0", c0_all)):
        if t is not None and tuple(t.shape) != (L, B, hidden_size):
            raise ValueError(f"hx: expected {name} of shape {(L, B, hidden_size)}, got {tuple(t.shape)}")
    names = weight_names(num_layers, num_directions, bias)
    _check_inputs(input, h0_all, c0_all, weights, names, mode, lengths, backend, grad_clip)
    check_weights(weights, mode, input.shape[-1], hidden_size, num_layers, num_directions, bias)
    if lengths is not None and (int(lengths.min()) < 1 or int(lengths.max()) > T):
        raise ValueError(f"lengths: expected values in [1, {T}], got min {int(lengths.min())}, "
                         f"max {int(lengths.max())}")
    if h0_all is None:
        h0_all = input.new_zeros(L, B, hidden_size)
    if mode == "lstm" and c0_all is None:
        c0_all = input.new_zeros(L, B, hidden_size)

    per = 4 if bias else 2
    ln_per = 6 if mode == "lstm" else 4
    if layer_norm_weights is not None:
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
    layer_input = input
    h_n, c_n, jac, sources = [], [], [], []
    for layer in range(num_layers):
        outputs = []
        for d in range(num_directions):
            idx = layer * num_directions + d
            w = weights[idx * per: (idx + 1) * per]
            w_ih, w_hh = w[0], w[1]
            b_ih, b_hh = (w[2], w[3]) if bias else (None, None)
            ln_ih = norm = None
            if layer_norm_weights is not None:
                ln = layer_norm_weights[idx * ln_per: (idx + 1) * ln_per]
                ln_ih = (ln[0], ln[1], eps)
                norm = reference.CellNorm(ln[2], ln[3], *(ln[4:6] if mode == "lstm" else (None, None)), eps)
            out, h_last, c_last, jac_sq, source = _run_layer(
                backend, layer_input, h0_all[idx], None if c0_all is None else c0_all[idx], w_ih, w_hh, b_ih,
                b_hh, ln_ih, norm, lengths, mode, bool(d), track, grad_clip,
            )
            h_n.append(h_last)
            if mode == "lstm":
                c_n.append(c_last)
            outputs.append(out)
            jac.append(jac_sq)
            sources.append(source)
        layer_output = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=2)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_output = F.dropout(layer_output, p=dropout, training=True)
        layer_input = layer_output
    output = layer_input
    if lengths is not None:
        valid = torch.arange(T, device=input.device)[:, None] < lengths.to(input.device)[None, :]
        output = output * valid[:, :, None].to(output.dtype)
    trace = None
    if track:
        trace = BPTTTrace(
            mode=mode,
            num_layers=num_layers,
            num_directions=num_directions,
            jacobian_norm_per_sample=torch.stack(jac).detach().clamp_min(0).sqrt(),
            grad_sources=sources,
            lengths=None if lengths is None else lengths.cpu(),
        )
    return output, torch.stack(h_n), torch.stack(c_n) if mode == "lstm" else None, trace
