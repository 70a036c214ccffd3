"""One step of a fused LSTM, GRU or Elman RNN cell, with opt-in tracking of the step's gradient flow.

Ops (each with a fake implementation and registered autograd):

- ``vgk::cell_forward(input, hx?, cx?, w_ih, w_hh, b_ih?, b_hh?, probe?, mode, track)``
  -> ``(h, c, workspace, jac_sq)``: input [B, I]; hx, cx [B, H] or None (zeros; cx for the LSTM only);
  w_ih [G*H, I], w_hh [G*H, H], b_ih and b_hh [G*H] or both None; G = 4 (LSTM), 3 (GRU), 1 (RNN).
  h [B, H]; c [B, H] for the LSTM, else [0]; workspace: what the backward reads (private to the
  backend); jac_sq float32 [B], the squared Frobenius norm of the step Jacobian ∂s'/∂s per sample
  (s = h for the RNN and GRU, (h, c) for the LSTM), or [0] without ``track``. ``probe`` is only read
  by the autograd: its gradient is the per-sample squared gradient norms (below).
- ``vgk::cell_backward(...)``: the gradients of input, hx, cx, w_ih, w_hh, b_ih, b_hh and, with
  ``track``, grad_sq float64 [2, K, B] (K = 2 for the LSTM: h then c; else 1): [0] the squared norms
  of the gradients reaching the input states, [1] those reaching the output states (for c', the
  total gradient, through h' included).
- ``vgk::cell_forward_triton`` / ``vgk::cell_backward_triton``: the same on CUDA tensors
  (:mod:`vgkernels.triton.cell`).
- ``vgk::cell_backward_differentiable`` and ``vgk::cell_forward_differentiable``: the backward and the
  step through differentiable torch operations, which the fused ops call under ``create_graph=True``
  and for inputs with tangents (forward-mode AD: ``torch.func.jvp``, ``torch.autograd.forward_ad``),
  so second derivatives and tangents are exact.

The C++ op's autograd is C++ (csrc/cpu/cell.cpp): at batch 1 a Python autograd wrapper would cost
more than the step. ``"reference"`` runs :mod:`vgkernels.reference.cell`; the torch.func transforms
and forward-mode AD take it too, as torch's own operations support them.

Tracking goes through autograd itself: a zero probe float64 [2, K, B] that requires grad is an input
of the op, and the op's backward returns the squared gradient norms as its gradient, so
``probe.grad`` holds them once backward has run. :class:`CellTrace` holds tensors only.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

from vgkernels._library import cpp_available
from vgkernels.backends import resolve_backend
from vgkernels.reference import cell as reference
from vgkernels.reference.recurrent import MODES
from vgkernels.trace import new_probe

CELL_NAMES = {"lstm": "LSTMCell", "gru": "GRUCell", "rnn_tanh": "RNNCell", "rnn_relu": "RNNCell",
              "rnn_sigmoid": "RNNCell"}
# Computed in float32 by the cpp and reference backends, and returned in their own dtype.
HALF_DTYPES = (torch.float16, torch.bfloat16)


class CellTrace:
    """What one call of a fused cell saw: the module's ``trace`` after a call with ``track=True``.

    B is the batch (1 for an unbatched call). Every tensor is float32 on the input's device.
    ``jacobian_norm_per_sample`` comes from the forward; the gradient fields are ``None`` until a
    backward has run through the call (and stay ``None`` for a call under ``torch.no_grad()``).

    Attributes:
        mode: ``"lstm"``, ``"gru"``, ``"rnn_tanh"``, ``"rnn_relu"`` or ``"rnn_sigmoid"``.
        jacobian_norm_per_sample: [B] the Frobenius norm ‖∂s'/∂s‖_F of the step Jacobian, with s = h
            for the RNN and GRU and s = concat(h, c) for the LSTM (exact; REFERENCES.md).
    """

    def __init__(self, mode: str, jac_sq: torch.Tensor, probe: torch.Tensor | None) -> None:
        self.mode = mode
        self.jacobian_norm_per_sample = jac_sq.detach().clamp_min(0).sqrt()
        self._probe = probe  # a leaf whose gradient the op's backward fills
        self._grad_sq: torch.Tensor | None = None  # the gradient, once detached from the probe

    @property
    def batch_size(self) -> int:
        return self.jacobian_norm_per_sample.shape[0]

    @property
    def jacobian_norm(self) -> torch.Tensor:
        """[]: batch mean of ``jacobian_norm_per_sample``."""
        return self.jacobian_norm_per_sample.mean()

    def grad_sq(self) -> torch.Tensor | None:
        """float64 [2, K, B] squared gradient norms ([0] input states, [1] output states), or None."""
        if self._grad_sq is None and self._probe is not None and self._probe.grad is not None:
            return self._probe.grad
        return self._grad_sq

    def _norm(self, side: int, state: int, per_sample: bool) -> torch.Tensor | None:
        if state == 1 and self.mode != "lstm":
            return None
        sq = self.grad_sq()
        if sq is None:
            return None
        sq = sq[side, state]
        # The root in float64, then float32: a norm is representable where its square is not.
        return (sq if per_sample else sq.sum()).clamp_min(0).sqrt().to(torch.float32)

    @property
    def grad_norm_per_sample(self) -> torch.Tensor | None:
        """[B]: ‖∂loss/∂h‖₂ for the call's input state h, the gradient the call passes back."""
        return self._norm(0, 0, True)

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """[]: ‖∂loss/∂h‖₂ for the input state h, over batch and hidden units."""
        return self._norm(0, 0, False)

    @property
    def cell_grad_norm_per_sample(self) -> torch.Tensor | None:
        """[B]: ‖∂loss/∂c‖₂ for the input cell state c (LSTM only; ``None`` otherwise)."""
        return self._norm(0, 1, True)

    @property
    def cell_grad_norm(self) -> torch.Tensor | None:
        """[]: ‖∂loss/∂c‖₂ for the input cell state c over the batch (LSTM only)."""
        return self._norm(0, 1, False)

    @property
    def output_grad_norm_per_sample(self) -> torch.Tensor | None:
        """[B]: ‖∂loss/∂h'‖₂ for the output state h', the total gradient that reached it."""
        return self._norm(1, 0, True)

    @property
    def output_grad_norm(self) -> torch.Tensor | None:
        """[]: ‖∂loss/∂h'‖₂ over batch and hidden units."""
        return self._norm(1, 0, False)

    @property
    def output_cell_grad_norm_per_sample(self) -> torch.Tensor | None:
        """[B]: ‖∂loss/∂c'‖₂ for the output cell state, its path through h' included (LSTM only)."""
        return self._norm(1, 1, True)

    @property
    def output_cell_grad_norm(self) -> torch.Tensor | None:
        """[]: ‖∂loss/∂c'‖₂ over the batch (LSTM only)."""
        return self._norm(1, 1, False)

    def __getstate__(self) -> dict:
        # The probe's gradient is not pickled with the probe: keep it as a plain tensor.
        sq = self.grad_sq()
        return {"mode": self.mode, "jacobian_norm_per_sample": self.jacobian_norm_per_sample, "_probe": None,
                "_grad_sq": None if sq is None else sq.detach()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        state = "with gradients" if self.grad_sq() is not None else "forward only"
        return f"CellTrace(mode={self.mode!r}, B={self.batch_size}, {state})"


# ---------------------------------------------------------------------------------------------------
# Fake implementations and the differentiable backward.


def _absent(grad: torch.Tensor) -> bool:
    """An empty 1-D tensor stands for an absent gradient."""
    return grad.dim() == 1 and grad.numel() == 0


def fake_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, probe, mode, track, workspace_dtype=None):
    """Outputs of a forward op for tracing; the workspace is [B, 4H] (LSTM, GRU) or [0]."""
    B, H = input.shape[0], w_hh.shape[1]
    lstm = mode == "lstm"
    h = input.new_empty(B, H)
    c = input.new_empty(B, H) if lstm else input.new_empty(0)
    ws_dtype = workspace_dtype or input.dtype
    ws = input.new_empty((B, 4 * H) if mode in ("lstm", "gru") else (0,), dtype=ws_dtype)
    jac = input.new_empty(B if track else 0, dtype=torch.float32)
    return h, c, ws, jac


def fake_backward(grad_h, grad_c, input, hx, cx, w_ih, w_hh, h, c, workspace, mode, track, has_bias,
                  input_grad, hidden_grad, weight_grad):
    B, H = input.shape[0], w_hh.shape[1]
    lstm = mode == "lstm"
    need_dh = hidden_grad or track

    def maybe(flag, *shape):
        return input.new_empty(*shape) if flag else input.new_empty(0)

    K = 2 if lstm else 1
    return (
        maybe(input_grad, *input.shape),
        maybe(need_dh, B, H),
        maybe(need_dh and lstm, B, H),
        maybe(weight_grad, *w_ih.shape),
        maybe(weight_grad, *w_hh.shape),
        maybe(weight_grad and has_bias, w_hh.shape[0]),
        maybe(weight_grad and has_bias, w_hh.shape[0]),
        input.new_empty((2, K, B) if track else (0,), dtype=torch.float64),
    )


def differentiable_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode):
    """[h', c'] of the reference step (c' empty but for the LSTM): tangents and graphs follow it."""
    h, c = reference.cell_forward(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    return [h, input.new_empty(0) if c is None else c]


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vjp, vmap, jvp, ...) is running (outside torch.compile)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def has_tangent(*tensors: torch.Tensor | None) -> bool:
    """Whether any of the tensors carries a forward-mode gradient (a dual or a torch.func.jvp input)."""
    return any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def differentiable_backward(grad_h, grad_c, input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode):
    """The gradients of (input, hx, cx, w_ih, w_hh, b_ih, b_hh) by differentiating the reference step,
    with create_graph: themselves differentiable. An input that does not require grad gets [0]."""
    tensors = (input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    wanted = [i for i, t in enumerate(tensors) if t is not None and t.requires_grad]
    grads = [input.new_empty(0) for _ in tensors]
    if not wanted:
        return grads
    with torch.enable_grad():
        h, c = reference.cell_forward(mode, *tensors)
        pairs = [(out, g) for out, g in ((h, grad_h), (c, grad_c)) if out is not None and not _absent(g)]
        got = torch.autograd.grad([out for out, _ in pairs], [tensors[i] for i in wanted],
                                  [g for _, g in pairs], create_graph=True, allow_unused=True)
    for i, g in zip(wanted, got, strict=True):
        grads[i] = torch.zeros_like(tensors[i]) if g is None else g
    return grads


_LIB = torch.library.Library("vgk", "FRAGMENT")  # noqa: TOR901  (keeps the Python kernel registered)
if cpp_available():  # without the build only the other backends work (and say why cpp does not)
    torch.library.register_fake("vgk::cell_forward")(fake_forward)
    torch.library.register_fake("vgk::cell_backward")(fake_backward)
    _LIB.impl("cell_backward_differentiable", differentiable_backward, "CompositeImplicitAutograd")
    _LIB.impl("cell_forward_differentiable", differentiable_forward, "CompositeImplicitAutograd")


# ---------------------------------------------------------------------------------------------------
# The Triton op's autograd (Python; the op lives in vgkernels.triton.cell).


def _triton_setup_context(ctx, inputs, output):
    input, hx, cx, w_ih, w_hh, b_ih, b_hh, probe, mode, track = inputs
    h, c, ws, _ = output
    ctx.save_for_backward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, h, c, ws)
    ctx.mode, ctx.track = mode, track and probe is not None
    ctx.set_materialize_grads(False)


def _triton_backward(ctx, grad_h, grad_c, _grad_ws, _grad_jac):
    input, hx, cx, w_ih, w_hh, b_ih, b_hh, h, c, ws = ctx.saved_tensors
    needs = ctx.needs_input_grad
    none = input.new_empty(0)
    grad_h = none if grad_h is None else grad_h
    grad_c = none if grad_c is None else grad_c
    if torch.is_grad_enabled():  # create_graph=True
        grads = list(differentiable_backward(grad_h, grad_c, input, hx, cx, w_ih, w_hh, b_ih, b_hh, ctx.mode))
        sq = None
        if ctx.track and needs[7]:
            with torch.no_grad():
                sq = torch.ops.vgk.cell_backward_triton(
                    grad_h, grad_c, input, hx, cx, w_ih, w_hh, h, c, ws, ctx.mode, True, b_ih is not None,
                    False, False, False)[7]
        grads.append(sq)
    else:
        grads = list(torch.ops.vgk.cell_backward_triton(
            grad_h, grad_c, input, hx, cx, w_ih, w_hh, h, c, ws, ctx.mode, ctx.track and needs[7],
            b_ih is not None, needs[0], needs[1] or needs[2], any(needs[3:7])))
    return tuple(g if need else None for g, need in zip(grads, needs[:8], strict=True)) + (None, None)


_triton_forward = None


def triton_forward():
    """The Triton forward op, importing triton (and registering its autograd) on first use."""
    global _triton_forward
    if _triton_forward is None:
        import vgkernels.triton.cell  # noqa: F401  (defines the Triton ops)

        torch.library.register_autograd("vgk::cell_forward_triton", _triton_backward,
                                        setup_context=_triton_setup_context)
        _triton_forward = torch.ops.vgk.cell_forward_triton.default
    return _triton_forward


# ---------------------------------------------------------------------------------------------------
# The step.


def make_probe(mode: str, B: int, device: torch.device) -> torch.Tensor | None:
    """The zero float64 [2, K, B] leaf whose gradient the backward fills, or None without autograd."""
    return new_probe((2, 2 if mode == "lstm" else 1, B), device, "tracking a cell's gradients")


def step(
    backend: str,
    mode: str,
    input: torch.Tensor,
    hx: torch.Tensor | None,
    cx: torch.Tensor | None,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
    track: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, CellTrace | None]:
    """One step on a resolved backend, without the argument checks of :func:`cell` (the module's path).

    Returns (h', c' (LSTM, else None), trace (None unless ``track``)).
    """
    if input.dtype in HALF_DTYPES and backend != "triton":
        # Computed in float32; what shares the input's dtype is cast (a mismatch stays one, and raises).
        dtype = input.dtype
        up = [t.float() if t is not None and t.dtype == dtype else t
              for t in (input, hx, cx, w_ih, w_hh, b_ih, b_hh)]
        h, c, trace = step(backend, mode, *up, track)
        return h.to(dtype), None if c is None else c.to(dtype), trace
    if backend != "reference" and functorch_active():
        backend = "reference"  # torch.func transforms (grad, vjp, vmap, jvp): torch's own operations
    elif backend == "triton" and has_tangent(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
        backend = "reference"  # forward-mode AD (the C++ op routes tangents itself)
    probe = make_probe(mode, input.shape[0], input.device) if track else None
    if backend == "cpp":
        h, c, _, jac = torch.ops.vgk.cell_forward.default(input, hx, cx, w_ih, w_hh, b_ih, b_hh, probe, mode,
                                                           track)
    elif backend == "triton":
        h, c, _, jac = triton_forward()(input, hx, cx, w_ih, w_hh, b_ih, b_hh, probe, mode, track)
    else:
        reference.check_step(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh)
        h, c = reference.cell_forward(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh, probe)
        jac = reference.jacobian_sq(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh) if track else None
    lstm = mode == "lstm"
    return h, c if lstm else None, CellTrace(mode, jac, probe) if track else None


def cell(
    input: torch.Tensor,
    hx: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor | None = None,
    bias_hh: torch.Tensor | None = None,
    *,
    mode: str,
    track: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, CellTrace | None]:
    """One step of an LSTM, GRU or Elman RNN cell with torch.nn's equations and gate order.

    Args:
        input: [B, input_size], float32/float64 (float16/bfloat16 are computed in float32 by the cpp
            and reference backends, natively with float32 arithmetic by triton).
        hx: None (zeros), h [B, H], or (h, c) for the LSTM; in the input's dtype and device.
        weight_ih: [G*H, input_size]; weight_hh: [G*H, H]; bias_ih, bias_hh: [G*H], both or neither;
            G = 4 (LSTM: gates i, f, g, o), 3 (GRU: r, z, n), 1 (RNN).
        mode: "lstm", "gru", "rnn_tanh", "rnn_relu" or "rnn_sigmoid".
        track: return a :class:`CellTrace` with the step Jacobian norm, and the gradient norms once
            backward has run.
        backend: "cpp", "triton", "reference" or None (automatic; ``VGK_BACKEND``).
    Returns:
        (h' [B, H], c' [B, H] for the LSTM else None, the trace or None).
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if not isinstance(input, torch.Tensor) or not torch.is_floating_point(input) or input.dim() != 2:
        got = (f"dtype {input.dtype}, shape {tuple(input.shape)}" if isinstance(input, torch.Tensor)
               else type(input).__name__)
        raise TypeError(f"input: expected a floating-point tensor [batch, input_size], got {got}")
    if mode == "lstm":
        if hx is not None and (isinstance(hx, torch.Tensor) or len(hx) != 2):
            raise TypeError("hx: the LSTM cell expects None or a tuple (h, c)")
        h0, c0 = (None, None) if hx is None else hx
    else:
        if hx is not None and not isinstance(hx, torch.Tensor):
            raise TypeError(f"hx: mode {mode!r} expects None or one tensor h, got {type(hx).__name__}")
        h0, c0 = hx, None
    if (bias_ih is None) != (bias_hh is None):
        raise ValueError("bias_ih, bias_hh: give both or neither")
    backend = resolve_backend(backend, input.device, op=f"vgkernels {CELL_NAMES[mode]}")
    return step(backend, mode, input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, track)
