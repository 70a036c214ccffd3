"""Triton kernels of the fused cells (LSTMCell, GRUCell, RNNCell): one step on CUDA tensors.

``vgk::cell_forward_triton`` and ``vgk::cell_backward_triton`` take the arguments and return the
outputs of the C++ ops ``vgk::cell_forward`` / ``vgk::cell_backward`` (see ``vgkernels/ops/cell.py``),
so the autograd code can call either backend.

Forward: the GEMMs x W_ih^T and h W_hh^T are torch's (cuBLAS), then ONE fused pointwise kernel adds
the biases and computes the gates, the new state, the workspace the backward reads, and the
per-sample squared Frobenius norm of the step Jacobian (per-unit Gram matrices of W_hh's gate rows,
REFERENCES.md). Backward: ONE pointwise kernel writes the gate pre-activation gradients, the direct
parts of the state gradients and the squared norms of the gradients reaching the output states;
then torch's GEMMs give dx, dh, dW_ih, dW_hh and the bias sums.

Each program takes a [BLOCK_B, BLOCK_J] tile of (batch rows, hidden units), sized by :func:`plan` so
that the grid keeps at least 100 of an H200's 132 SMs busy; a tile's Jacobian and gradient-norm terms
are summed per row into a partial buffer [n_hidden_tiles, ...], reduced by torch afterwards (no
atomics: the result is deterministic). No tl.dot: the block sizes need not be 16. The gate math is
:mod:`vgkernels.triton.recurrent`'s, shared with the recurrent layers' kernels; every launch goes
through :func:`vgkernels.triton._host.launch`, so the ahead-of-time check compiles these kernels too.

Dtypes: float32, float64, float16, bfloat16 (all inputs in one dtype). The GEMMs run in the input
dtype; the pointwise arithmetic and the workspace in float64 for float64 inputs and float32
otherwise; h', c' and the gradients are returned in the input dtype, jac_sq in float32 and grad_sq
in float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from vgkernels.reference.cell import check_step
from vgkernels.triton import _host
from vgkernels.triton import recurrent as _plain
from vgkernels.triton.recurrent import (
    _elman,
    _elman_derivative,
    _elman_grad,
    _gram,
    _gram_terms,
    _gru_jacobian_term,
    _gru_state,
    _gru_step_grads,
    _ld,
    _lstm_gate_grads,
    _lstm_jacobian_term,
    _lstm_state,
    _tanh,
)

_MODE_ID = _plain._MODE_ID
_GATES = _plain.GATES
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Tests set this to nan so that any output element a kernel fails to write shows up.
_ALLOC_FILL: float | None = None


# ---------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _tile(B, H, G: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr):
    """This program's tile: rows, cols, their masks and the 2-D mask, and the offsets of its elements in
    [B, G*H], [B, H] and [B, 4H] buffers (int64)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    row_ok = rows < B
    col_ok = cols < H
    rows64 = tl.cast(rows, tl.int64)[:, None]
    return (rows, cols, row_ok, col_ok, row_ok[:, None] & col_ok[None, :], rows64 * (G * H) + cols[None, :],
            rows64 * H + cols[None, :], rows64 * (4 * H) + cols[None, :])


@triton.jit
def _cell_forward_kernel(
    acc_ptr, xr_ptr, bhh_ptr, hp_ptr, cp_ptr, h_ptr, c_ptr, ws_ptr, gram_ptr, diag_ptr, jac_ptr, B, H,
    MODE: tl.constexpr, G: tl.constexpr, HAS_BHH: tl.constexpr, TRACK: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """One step for a tile of rows and hidden units.

    acc [B, G*H]: x W_ih^T + b_ih + h W_hh^T (GRU: h W_hh^T + b_hh); bhh [G*H] added to acc, except for
    the GRU; xr [B, 3H] the GRU's x W_ih^T + b_ih; hp, cp [B, H] previous states; h, c [B, H] outputs;
    ws [B, 4H] workspace; gram [H, G*G], diag [H, 3] (GRU); jac [n_tiles, B] partial sums. The
    arithmetic runs in the workspace's dtype.
    """
    ACC = ws_ptr.dtype.element_ty
    rows, cols, row_ok, col_ok, m2, g_off, s_off, w_off = _tile(B, H, G, BLOCK_B, BLOCK_J)
    a_ptrs = acc_ptr + g_off
    ws_ptrs = ws_ptr + w_off
    if MODE == 1:  # GRU
        x_ptrs = xr_ptr + g_off
        h_prev = _ld(hp_ptr + s_off, m2, ACC)
        hn = _ld(a_ptrs + 2 * H, m2, ACC)
        r, z, n, h = _gru_state(_ld(x_ptrs, m2, ACC) + _ld(a_ptrs, m2, ACC),
                                _ld(x_ptrs + H, m2, ACC) + _ld(a_ptrs + H, m2, ACC),
                                _ld(x_ptrs + 2 * H, m2, ACC), hn, h_prev)
        tl.store(ws_ptrs, r, mask=m2)
        tl.store(ws_ptrs + H, z, mask=m2)
        tl.store(ws_ptrs + 2 * H, n, mask=m2)
        tl.store(ws_ptrs + 3 * H, hn, mask=m2)
        if TRACK:
            term = _gru_jacobian_term(r, z, n, hn, h_prev, gram_ptr, diag_ptr, cols, col_ok, ACC)
    else:
        pre0 = _ld(a_ptrs, m2, ACC)
        if HAS_BHH:
            pre0 += _ld(bhh_ptr + cols, col_ok, ACC)[None, :]
        if MODE == 0:  # LSTM
            pre1 = _ld(a_ptrs + H, m2, ACC)
            pre2 = _ld(a_ptrs + 2 * H, m2, ACC)
            pre3 = _ld(a_ptrs + 3 * H, m2, ACC)
            if HAS_BHH:
                pre1 += _ld(bhh_ptr + H + cols, col_ok, ACC)[None, :]
                pre2 += _ld(bhh_ptr + 2 * H + cols, col_ok, ACC)[None, :]
                pre3 += _ld(bhh_ptr + 3 * H + cols, col_ok, ACC)[None, :]
            c_prev = _ld(cp_ptr + s_off, m2, ACC)
            si, sf, tg, so, c = _lstm_state(pre0, pre1, pre2, pre3, c_prev)
            tc = _tanh(c)
            h = so * tc
            tl.store(ws_ptrs, si, mask=m2)
            tl.store(ws_ptrs + H, sf, mask=m2)
            tl.store(ws_ptrs + 2 * H, tg, mask=m2)
            tl.store(ws_ptrs + 3 * H, so, mask=m2)
            tl.store(c_ptr + s_off, c, mask=m2)
            if TRACK:
                term = _lstm_jacobian_term(si, sf, tg, so, c_prev, tc, gram_ptr, cols, col_ok, ACC)
        else:  # Elman RNN
            h = _elman(pre0, MODE)
            if TRACK:
                deriv = _elman_derivative(h, MODE)
                term = deriv * deriv * _gram(gram_ptr, cols, col_ok, 1, 0, 0, ACC)
    tl.store(h_ptr + s_off, h, mask=m2)
    if TRACK:
        partial = tl.sum(tl.where(m2, term, 0.0), axis=1)
        tl.store(jac_ptr + tl.cast(tl.program_id(1), tl.int64) * B + rows, partial, mask=row_ok)


@triton.jit
def _cell_backward_kernel(
    gh_ptr, gc_ptr, ws_ptr, h_ptr, c_ptr, hp_ptr, cp_ptr, d_ptr, rec_ptr, dhp_ptr, dcp_ptr, sq_ptr, B, H,
    MODE: tl.constexpr, G: tl.constexpr, NSQ: tl.constexpr, HAS_GH: tl.constexpr, HAS_GC: tl.constexpr,
    TRACK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Gate pre-activation gradients of one step for a tile of rows and hidden units.

    gh, gc [B, H] gradients reaching h' and c'; ws [B, 4H]; h, c [B, H] outputs; hp, cp [B, H] previous
    states. Writes d [B, G*H] (gradient of x W_ih^T + b_ih), for the GRU rec [B, 3H] (of h W_hh^T +
    b_hh) and dhp [B, H] (the direct z * dh' part of the gradient of h), for the LSTM dcp [B, H] (the
    gradient of c), and sq [n_tiles, NSQ, B] float64 partial squared norms of the gradients reaching h'
    (and c', its path through h' included). The arithmetic runs in d's dtype.
    """
    ACC = d_ptr.dtype.element_ty
    rows, cols, row_ok, col_ok, m2, g_off, s_off, w_off = _tile(B, H, G, BLOCK_B, BLOCK_J)
    d_ptrs = d_ptr + g_off
    ws_ptrs = ws_ptr + w_off
    if HAS_GH:
        dh = _ld(gh_ptr + s_off, m2, ACC)
    else:
        dh = tl.zeros([BLOCK_B, BLOCK_J], dtype=ACC)
    if MODE == 0:  # LSTM
        si = _ld(ws_ptrs, m2, ACC)
        sf = _ld(ws_ptrs + H, m2, ACC)
        tg = _ld(ws_ptrs + 2 * H, m2, ACC)
        so = _ld(ws_ptrs + 3 * H, m2, ACC)
        tc = _tanh(_ld(c_ptr + s_off, m2, ACC))
        dc = dh * so * (1.0 - tc * tc)
        if HAS_GC:
            dc += _ld(gc_ptr + s_off, m2, ACC)
        d_i, d_f, d_g, d_o = _lstm_gate_grads(dc, dh, si, sf, tg, so, _ld(cp_ptr + s_off, m2, ACC), tc, m2,
                                              0.0, False)
        tl.store(d_ptrs, d_i, mask=m2)
        tl.store(d_ptrs + H, d_f, mask=m2)
        tl.store(d_ptrs + 2 * H, d_g, mask=m2)
        tl.store(d_ptrs + 3 * H, d_o, mask=m2)
        tl.store(dcp_ptr + s_off, dc * sf, mask=m2)
    elif MODE == 1:  # GRU
        _, _, _, _, carry = _gru_step_grads(dh, ws_ptrs, _ld(hp_ptr + s_off, m2, ACC), d_ptrs,
                                            rec_ptr + g_off, H, m2, m2, 0.0, False, ACC)
        tl.store(dhp_ptr + s_off, carry, mask=m2)
    else:  # Elman RNN
        tl.store(d_ptrs, _elman_grad(dh, _ld(h_ptr + s_off, m2, ACC), MODE), mask=m2)
    if TRACK:
        sq_base = sq_ptr + tl.cast(tl.program_id(1), tl.int64) * NSQ * B + rows
        dh64 = tl.where(m2, dh, 0.0).to(tl.float64)
        tl.store(sq_base, tl.sum(dh64 * dh64, axis=1), mask=row_ok)
        if MODE == 0:
            dc64 = tl.where(m2, dc, 0.0).to(tl.float64)
            tl.store(sq_base + B, tl.sum(dc64 * dc64, axis=1), mask=row_ok)


# ---------------------------------------------------------------------------------------------------
# Host side


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _host.alloc(shape, dtype, device, _ALLOC_FILL)


# Tests set this to plan interpreted launches as if for a GPU with that many SMs (small tiles).
_INTERPRETER_SMS: int | None = None


def plan(B: int, H: int, sms: int | None) -> dict:
    """Tiles and warps of the element-wise cell kernels over [B, H]: on a GPU the largest tiles whose grid
    keeps at least 100 of an H200's 132 SMs busy (tiny tiles where B * H is small); under the interpreter
    (``sms`` None) few large ones."""
    if sms is None:
        return {"BLOCK_B": 16, "BLOCK_J": _plain._pow2_between(H, 16, 128), "num_warps": 4}
    block_b, block_j, warps = _plain.pointwise_tiles(B, H, _host.busy_target(sms))
    return {"BLOCK_B": block_b, "BLOCK_J": block_j, "num_warps": warps}


def _plan(B: int, H: int, device: torch.device) -> dict:
    sms = _host.sm_count(device)
    return plan(B, H, _INTERPRETER_SMS if sms is None else sms)


def _check(op: str, mode: str, input: torch.Tensor, hx, cx, w_ih, w_hh, b_ih, b_hh) -> None:
    if mode not in _GATES:
        raise ValueError(f"{op}: mode must be one of {tuple(_GATES)}, got {mode!r}")
    if not isinstance(input, torch.Tensor) or input.dim() != 2 or input.dtype not in _DTYPES:
        got = (f"{input.dtype} {tuple(input.shape)}" if isinstance(input, torch.Tensor)
               else type(input).__name__)
        raise TypeError(f"{op}: input must be a 2-D float32, float64, float16 or bfloat16 tensor, got {got}")
    _plain._check_device(op, input.device)
    if mode == "lstm" and (hx is None) != (cx is None):
        raise ValueError(f"{op}: the LSTM takes both hx and cx or neither")
    if mode != "lstm" and cx is not None:
        raise ValueError(f"{op}: cx must be None for mode {mode!r}")
    if (b_ih is None) != (b_hh is None):
        raise ValueError(f"{op}: b_ih and b_hh must both be given or both be None")
    check_step(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh)


def _forward_impl(input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode, track):
    _check("cell_forward_triton", mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    B, H, dtype, device = input.shape[0], w_hh.shape[1], input.dtype, input.device
    G = _GATES[mode]
    acc_dtype = _host.acc_dtype(dtype)
    gated = mode in ("lstm", "gru")
    h = _alloc((B, H), dtype, device)
    c = _alloc((B, H), dtype, device) if mode == "lstm" else input.new_empty(0)
    ws = _alloc((B, 4 * H), acc_dtype, device) if gated else input.new_empty(0, dtype=acc_dtype)
    if B == 0 or H == 0:
        return h, c, ws, input.new_zeros(B if track else 0, dtype=torch.float32)
    if mode == "gru":
        xr = torch.mm(input, w_ih.t()) if b_ih is None else torch.addmm(b_ih, input, w_ih.t())
        if hx is not None:
            acc = torch.mm(hx, w_hh.t()) if b_hh is None else torch.addmm(b_hh, hx, w_hh.t())
        else:
            acc = input.new_zeros(B, G * H) if b_hh is None else b_hh.expand(B, G * H).contiguous()
    else:
        xr = acc = torch.mm(input, w_ih.t()) if b_ih is None else torch.addmm(b_ih, input, w_ih.t())
        if hx is not None:
            acc = acc.addmm_(hx, w_hh.t())
    zeros = input.new_zeros(B, H) if hx is None and gated else None
    hp = (hx if hx is not None else zeros).contiguous() if gated else h
    cp = (cx if cx is not None else zeros).contiguous() if mode == "lstm" else h
    if track:
        gram, diag = _gram_terms(w_hh, mode)
    else:
        gram = diag = ws
    p = _plan(B, H, device)
    n_tiles = _host.cdiv(H, p["BLOCK_J"])
    jac_part = _alloc((n_tiles, B), acc_dtype, device) if track else ws
    bhh = b_hh.contiguous() if b_hh is not None and mode != "gru" else ws
    with _host.device_ctx(device):
        _host.launch(
            _cell_forward_kernel, (_host.cdiv(B, p["BLOCK_B"]), n_tiles),
            acc.contiguous(), xr.contiguous(), bhh, hp, cp, h, c, ws, gram, diag, jac_part, B, H,
            MODE=_MODE_ID[mode], G=G, HAS_BHH=b_hh is not None and mode != "gru", TRACK=bool(track), **p,
        )
    jac = jac_part.sum(0, dtype=torch.float32) if track else input.new_empty(0, dtype=torch.float32)
    return h, c, ws, jac


@triton_op("vgk::cell_forward_triton", mutates_args=())
def cell_forward_triton(
    input: torch.Tensor,
    hx: torch.Tensor | None,
    cx: torch.Tensor | None,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
    probe: torch.Tensor | None,
    mode: str,
    track: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of a cell (the Triton twin of ``vgk::cell_forward``).

    Args:
        input: [B, I]; hx, cx: [B, H] or None (zeros; cx for the LSTM only); w_ih [G*H, I], w_hh
            [G*H, H], b_ih and b_hh [G*H] or both None; all in one dtype (float32, float64, float16
            or bfloat16) on one device. probe: ignored (autograd routes the trace gradient to it).
        mode: "lstm", "gru", "rnn_tanh", "rnn_relu" or "rnn_sigmoid"; track: compute jac_sq.
    Returns:
        h [B, H], c [B, H] (LSTM) or [0] in the input dtype; workspace [B, 4H] (LSTM, GRU) or [0] in
        float32 (float64 for float64 input); jac_sq float32 [B] (or [0] without track).
    """
    return _forward_impl(input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode, track)


def _backward_impl(grad_h, grad_c, input, hx, cx, w_ih, w_hh, h, c, workspace, mode, track, has_bias,
                   input_grad, hidden_grad, weight_grad):
    B, H, dtype, device = input.shape[0], w_hh.shape[1], input.dtype, input.device
    G = _GATES[mode]
    lstm, gru = mode == "lstm", mode == "gru"
    acc_dtype = _host.acc_dtype(dtype)
    has_gh = not (grad_h.dim() == 1 and grad_h.numel() == 0)
    has_gc = lstm and not (grad_c.dim() == 1 and grad_c.numel() == 0)
    K = 2 if lstm else 1
    d = _alloc((B, G * H), acc_dtype, device)
    rec = _alloc((B, G * H), acc_dtype, device) if gru else d
    dhp = _alloc((B, H), acc_dtype, device) if gru else d
    dcp = _alloc((B, H), acc_dtype, device) if lstm else d
    p = _plan(B, H, device)
    n_tiles = _host.cdiv(H, p["BLOCK_J"]) if H else 0
    sq_part = _alloc((n_tiles, K, B), torch.float64, device) if track else d
    zeros = input.new_zeros(B, H) if hx is None else None
    hp = hx if hx is not None else zeros
    cp = cx if cx is not None else zeros
    if B and H:
        with _host.device_ctx(device):
            _host.launch(
                _cell_backward_kernel, (_host.cdiv(B, p["BLOCK_B"]), n_tiles),
                grad_h.contiguous() if has_gh else d, grad_c.contiguous() if has_gc else d,
                workspace.contiguous() if lstm or gru else d, h.contiguous(), c.contiguous() if lstm else d,
                hp.contiguous(), cp.contiguous() if lstm else d, d, rec, dhp, dcp, sq_part, B, H,
                MODE=_MODE_ID[mode], G=G, NSQ=K, HAS_GH=has_gh, HAS_GC=has_gc, TRACK=bool(track),
                **p,
            )
    else:
        d.zero_()
        rec.zero_()
        dhp.zero_()
        dcp.zero_()
    # The GEMMs in the input dtype (tensor cores for half inputs).
    dx_gates = d.to(dtype)
    dh_gates = rec.to(dtype) if gru else dx_gates
    need_dh = hidden_grad or track

    def none():  # a distinct empty tensor per output: the outputs of an op never alias each other
        return input.new_empty(0)

    grad_hx, grad_cx = none(), none()
    if need_dh:
        grad_hx = dh_gates @ w_hh
        if gru:
            grad_hx = grad_hx + dhp.to(dtype)
        if lstm:
            grad_cx = dcp.to(dtype)
    grad_x = dx_gates @ w_ih if input_grad else none()
    grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh = none(), none(), none(), none()
    if weight_grad:
        grad_w_ih = dx_gates.t() @ input
        grad_w_hh = dh_gates.t() @ hx if hx is not None else torch.zeros_like(w_hh)
        if has_bias:
            grad_b_ih = d.sum(0).to(dtype)
            grad_b_hh = rec.sum(0).to(dtype) if gru else grad_b_ih.clone()
    if track:
        inputs = [grad_hx] + ([grad_cx] if lstm else [])
        outputs = sq_part.sum(0) if n_tiles else input.new_zeros(K, B, dtype=torch.float64)
        grad_sq = torch.stack([torch.stack([g.double().pow(2).sum(-1) for g in inputs]), outputs])
    else:
        grad_sq = input.new_empty(0, dtype=torch.float64)
    return grad_x, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_sq


@triton_op("vgk::cell_backward_triton", mutates_args=())
def cell_backward_triton(
    grad_h: torch.Tensor,
    grad_c: torch.Tensor,
    input: torch.Tensor,
    hx: torch.Tensor | None,
    cx: torch.Tensor | None,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    workspace: torch.Tensor,
    mode: str,
    track: bool,
    has_bias: bool,
    input_grad: bool,
    hidden_grad: bool,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """Backward of :func:`cell_forward_triton` (the Triton twin of ``vgk::cell_backward``).

    Args:
        grad_h, grad_c: [B, H] gradients reaching h' and c' (LSTM), or [0] for none; the forward's
            inputs and outputs; has_bias: return the bias gradients; input_grad, hidden_grad,
            weight_grad: which gradients to compute (a gradient not asked for comes back as [0]);
            track: compute grad_sq.
    Returns:
        grad_input [B, I], grad_hx [B, H], grad_cx [B, H] (LSTM), grad_w_ih, grad_w_hh, grad_b_ih,
        grad_b_hh in the input dtype, and grad_sq float64 [2, K, B] ([0] input states, [1] output
        states; K = 2 for the LSTM, h then c) or [0].
    """
    return _backward_impl(grad_h, grad_c, input, hx, cx, w_ih, w_hh, h, c, workspace, mode, track, has_bias,
                          input_grad, hidden_grad, weight_grad)
