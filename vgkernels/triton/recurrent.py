"""Triton kernels of the recurrent core: one direction of one layer over the whole sequence.

The ops ``vgk::rnn_forward_triton`` and ``vgk::rnn_backward_triton`` take the arguments and return the
outputs of the C++ ops ``vgk::rnn_forward`` / ``vgk::rnn_backward`` (see ``vgkernels/ops/recurrent.py``
for their meaning), so the autograd code can call either backend.

Kernels. One fused kernel does a time step for a block of batch rows and a tile of hidden units:

- forward: ``h_{t-1} W_hh^T`` with ``tl.dot`` (one accumulator per gate), plus the precomputed input
  projection, the gate nonlinearities, the state update, the values the backward needs, and the
  per-sample squared Frobenius norm of the step Jacobian (closed form over per-unit Gram matrices of
  the rows of W_hh, computed once per call);
- backward: ``dG_{t+1} W_hh`` with ``tl.dot``, plus the direct gradient, the gate gradients (clamped for
  ``grad_clip``) and the per-sample squared gradient norms of h_t (and c_t).

Two loops drive it. The *persistent* loop launches once: each program owns a block of batch rows,
walks over all hidden tiles of a step, and then to the next step; all its data dependencies stay
inside the program (a block barrier separates the steps), so no grid-wide synchronisation is needed.
It runs on ceil(B / 16) SMs. The *step* loop launches once per step with a grid of (batch block,
hidden tile, K split) programs, sized by :func:`plan` to keep at least 100 of an H200's 132 SMs busy;
where even 16 x 16 tiles are too few (small B * H), several programs share a tile's K range and the
last to arrive sums their partials in a fixed order (no atomics on data, deterministic). On CUDA the
step loop's launches are replayed from CUDA graphs over static buffers (:mod:`._graphs`), so a step
costs no host launch. ``VGK_RNN_TRITON_LOOP`` = ``persistent`` | ``step`` | ``auto`` (default: the
step loop on a GPU unless a step is tiny or the batch alone fills the GPU, the persistent loop under
the interpreter); ``VGK_RNN_TRITON_GRAPH=0`` launches step by step. bench/results/perf_model.md has
the estimate behind these choices and bench/results/aot_*.md every launch's registers and grid.

The input projection is the caller's GEMM; the weight gradient is one GEMM after the time loop
(:func:`vgkernels.triton.gemm.mm`: for float32 in the precision of the recurrent dots).

Dtypes: float32, float64, bfloat16 and float16 inputs (all inputs in one dtype). Arithmetic and the
intermediate buffers are float64 for float64 inputs and float32 otherwise; the outputs ``states``,
``cell_states``, ``workspace`` and the gradients are returned in the input dtype (``grad_w_hh`` in
w_hh's), ``jac_sq`` always in float32 and ``grad_sq`` in float64 (a float32 square of a gradient below
~1e-19 underflows to 0). The recurrent dots take half-precision operands (tensor cores, float32
accumulation) for half inputs, IEEE float64 for float64, and for float32 TF32 where torch's switch
for its own recurrent layers on cuDNN allows it (``torch.backends.cudnn.rnn.fp32_precision`` /
``torch.backends.cudnn.allow_tf32``, on by default, like cuDNN) and IEEE float32 otherwise. (The
Triton interpreter computes bfloat16 dots wrongly, so there bfloat16 dots run on float32 operands;
it always computes float32 dots in IEEE.)

Workspace layout (private to this backend): LSTM [T, B, 4H] activated gates (i, f, g, o); GRU
[T, B, 4H] (r, z, n, W_hn h + b_hn); Elman RNN: empty, the derivative follows from h.
"""

import functools
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from vgkernels.triton import _graphs, _host
from vgkernels.triton import gemm as _gemm
from vgkernels.triton._host import acc_dtype as _acc_dtype
from vgkernels.triton._host import device_ctx as _device_ctx

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1, "rnn_sigmoid": 1}
_MODE_ID = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3, "rnn_sigmoid": 4}
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LOOP_ENV = "VGK_RNN_TRITON_LOOP"

# Tests set this to nan so that any output element a kernel fails to write shows up.
_ALLOC_FILL: float | None = None


# ---------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # From one exp of a non-positive argument: no overflow, exact limits. 1 - 2e / (1 + e) rather than
    # (1 - e) / (1 + e): near saturation the latter rounds to 1 where torch's correctly rounded tanh is
    # still 0.99999994 (|x| near 9).
    e = tl.exp(-2.0 * tl.abs(x))
    t = 1.0 - 2.0 * e / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _ld(ptr, mask, ACC: tl.constexpr):
    return tl.load(ptr, mask=mask, other=0.0).to(ACC)


@triton.jit
def _row_sq(x, keep):
    """Per-row sum of squares of the kept elements of a [BLOCK_B, BLOCK_J] tile, in float64: in float32
    the square of a gradient below ~1e-19 underflows to 0."""
    x = tl.where(keep, x, 0.0).to(tl.float64)
    return tl.sum(x * x, axis=1)


@triton.jit
def _gram(gram_ptr, cols, col_ok, G: tl.constexpr, a: tl.constexpr, b: tl.constexpr, ACC: tl.constexpr):
    """Entry (a, b) of the per-unit Gram matrices of the hidden tile, as a [1, BLOCK_J] row."""
    return tl.load(gram_ptr + cols * (G * G) + (a * G + b), mask=col_ok, other=0.0).to(ACC)[None, :]


@triton.jit
def _quad3(u0, u1, u2, gram_ptr, cols, col_ok, G: tl.constexpr, ACC: tl.constexpr):
    """u^T G_j u over the first three gates, per sample and unit."""
    g00 = _gram(gram_ptr, cols, col_ok, G, 0, 0, ACC)
    g11 = _gram(gram_ptr, cols, col_ok, G, 1, 1, ACC)
    g22 = _gram(gram_ptr, cols, col_ok, G, 2, 2, ACC)
    g01 = _gram(gram_ptr, cols, col_ok, G, 0, 1, ACC)
    g02 = _gram(gram_ptr, cols, col_ok, G, 0, 2, ACC)
    g12 = _gram(gram_ptr, cols, col_ok, G, 1, 2, ACC)
    cross = u0 * u1 * g01 + u0 * u2 * g02 + u1 * u2 * g12
    return u0 * u0 * g00 + u1 * u1 * g11 + u2 * u2 * g22 + 2.0 * cross


@triton.jit
def _dot(a, b, acc, DOT: tl.constexpr, PRECISION: tl.constexpr):
    # float32 operands take PRECISION ("ieee" or "tf32", see _host.fp32_dot_tf32); float64 operands
    # "ieee"; half operands the default (tensor cores). The result keeps acc's dtype: triton 3.6
    # would return float32 for a float64 accumulator. One return: 3.6 type-checks every branch.
    if DOT == tl.float32 or DOT == tl.float64:
        out = tl.dot(a.to(DOT), b.to(DOT), acc, input_precision=PRECISION, out_dtype=acc.dtype)
    else:
        out = tl.dot(a.to(DOT), b.to(DOT), acc, out_dtype=acc.dtype)
    return out


@triton.jit
def _gate_dot(hk, w_ptrs, w_mask, acc, DOT: tl.constexpr, PRECISION: tl.constexpr):
    return _dot(hk, tl.load(w_ptrs, mask=w_mask, other=0.0), acc, DOT, PRECISION)


@triton.jit
def _split_sum(part_ptr, offs, m, split_stride, SPLIT: tl.constexpr):
    """Sum of the SPLIT partial tiles at part_ptr + s * split_stride + offs, in split order.

    Read past the L1 cache (".cg"): other programs wrote them, and this SM's L1 may hold an older step's.
    """
    total = tl.load(part_ptr + offs, mask=m, other=0.0, cache_modifier=".cg")
    for s in tl.static_range(1, SPLIT):
        total += tl.load(part_ptr + s * split_stride + offs, mask=m, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def _arrive(cnt_ptr, tile, lanes, SPLIT: tl.constexpr):
    """Counts this program in for its tile; per lane of ``lanes`` (an arange), True for the last of the
    SPLIT programs to arrive.

    The partials each program stored before are then visible to the last one (a block barrier, then
    an acquire-release atomic), which sums them and resets the counter for the next step. No program
    waits for another, so this needs no grid-wide synchronisation. (The result is a vector, not a
    scalar: the interpreter cannot combine a scalar mask with a block.)
    """
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
    last = (lanes * 0 + ticket) == SPLIT - 1
    tl.store(cnt_ptr + tile + lanes * 0, lanes * 0, mask=last & (lanes == 0))
    return last


@triton.jit
def _clamp(d, clip, HAS_CLIP: tl.constexpr):
    if HAS_CLIP:
        d = tl.minimum(tl.maximum(d, -clip), clip)
    return d


@triton.jit
def _row_lengths(len_ptr, rows, row_ok, HAS_LEN: tl.constexpr):
    """The rows' sequence lengths; without lengths a placeholder that _step ignores."""
    lens = rows
    if HAS_LEN:
        lens = tl.load(len_ptr + rows, mask=row_ok, other=0)
    return lens


@triton.jit
def _step(s, T, BH, row_ok, lens, REVERSE: tl.constexpr, HAS_LEN: tl.constexpr):
    """Where processed step s works: (pos, pos_next, in_base, out_base, valid).

    pos is its position and pos_next its successor's; in_base and out_base are the offsets of the state
    slots it reads and writes in [T+1, B, H] buffers (BH = B*H as int64): the forward direction reads
    slot pos and writes pos+1, the reverse one reads pos+1 and writes pos; valid marks the rows within
    their length.
    """
    if REVERSE:
        pos = T - 1 - s
        pos_next = pos - 1
        slot_in = pos + 1
        slot_out = pos
    else:
        pos = s
        pos_next = pos + 1
        slot_in = pos
        slot_out = pos + 1
    valid = row_ok
    if HAS_LEN:
        valid = valid & (pos < lens)
    return pos, pos_next, tl.cast(slot_in, tl.int64) * BH, tl.cast(slot_out, tl.int64) * BH, valid


@triton.jit
def _rec_dot(d_ptr, w_ptr, rows, row_ok, cols, col_ok, k_begin, k_end, K, H, acc, DOT: tl.constexpr,
             PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + d[rows, k_begin:k_end] @ w[k_begin:k_end, cols]: the recurrent term of the backward.

    d rows have K entries, w = W_hh [K, H]; k_end <= K (0 for the last processed step).
    """
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        d = tl.load(d_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + ks[:, None] * H + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(d, w, acc, DOT, PRECISION)
    return acc


@triton.jit
def _lstm_gate_grads(dc, dh, si, sf, tg, so, c_prev, tc, keep, clip, HAS_CLIP: tl.constexpr):
    """Clamped gradients of the LSTM gate pre-activations (i, f, g, o), zero outside keep.

    tc = tanh of the (normalized) cell that h = so * tc reads.
    """
    d_i = tl.where(keep, _clamp(dc * tg * si * (1.0 - si), clip, HAS_CLIP), 0.0)
    d_f = tl.where(keep, _clamp(dc * c_prev * sf * (1.0 - sf), clip, HAS_CLIP), 0.0)
    d_g = tl.where(keep, _clamp(dc * si * (1.0 - tg * tg), clip, HAS_CLIP), 0.0)
    d_o = tl.where(keep, _clamp(dh * tc * so * (1.0 - so), clip, HAS_CLIP), 0.0)
    return d_i, d_f, d_g, d_o


@triton.jit
def _gru_gate_grads(dh, r, z, n, hn, h_prev, keep, clip, HAS_CLIP: tl.constexpr):
    """Clamped gradients of the GRU gate pre-activations (r, z, n), zero outside keep.

    hn is what r multiplies inside n's pre-activation.
    """
    # n_pre's gradient is clamped before it reaches r through n_pre = xn + r * hn.
    d_n = tl.where(keep, _clamp(dh * (1.0 - z) * (1.0 - n * n), clip, HAS_CLIP), 0.0)
    d_z = tl.where(keep, _clamp(dh * (h_prev - n) * z * (1.0 - z), clip, HAS_CLIP), 0.0)
    d_r = tl.where(keep, _clamp(d_n * hn * r * (1.0 - r), clip, HAS_CLIP), 0.0)
    return d_r, d_z, d_n


@triton.jit
def _gru_step_grads(dh, ws_ptrs, h_prev, gx_ptrs, dr_ptrs, H, m, keep, clip, HAS_CLIP: tl.constexpr,
                    ACC: tl.constexpr):
    """A GRU step's backward on one tile, from dh and the saved gates (r, z, n, hn at ws_ptrs, blocks H
    apart): the gate gradients (d_r, d_z, d_n) stored at gx_ptrs, those of W_hh h + b_hh's blocks
    (d_r, d_z, d_n * r) at dr_ptrs. Returns (d_r, d_z, d_n, r, the carry of dh to the previous step)."""
    r = _ld(ws_ptrs, m, ACC)
    z = _ld(ws_ptrs + H, m, ACC)
    n = _ld(ws_ptrs + 2 * H, m, ACC)
    hn = _ld(ws_ptrs + 3 * H, m, ACC)
    d_r, d_z, d_n = _gru_gate_grads(dh, r, z, n, hn, h_prev, keep, clip, HAS_CLIP)
    tl.store(gx_ptrs, d_r, mask=m)
    tl.store(gx_ptrs + H, d_z, mask=m)
    tl.store(gx_ptrs + 2 * H, d_n, mask=m)
    tl.store(dr_ptrs, d_r, mask=m)
    tl.store(dr_ptrs + H, d_z, mask=m)
    tl.store(dr_ptrs + 2 * H, d_n * r, mask=m)
    return d_r, d_z, d_n, r, tl.where(keep, dh * z, dh)


@triton.jit
def _lstm_state(pre_i, pre_f, pre_g, pre_o, c_prev):
    """The LSTM's activated gates (si, sf, tg, so) and new cell c = sf * c_prev + si * tg."""
    si = _sigmoid(pre_i)
    sf = _sigmoid(pre_f)
    tg = _tanh(pre_g)
    so = _sigmoid(pre_o)
    return si, sf, tg, so, sf * c_prev + si * tg


@triton.jit
def _gru_state(pre_r, pre_z, x_n, hn, h_prev):
    """The GRU's gates r, z, n = tanh(x_n + r * hn) and new state h = (1 - z) * n + z * h_prev."""
    r = _sigmoid(pre_r)
    z = _sigmoid(pre_z)
    n = _tanh(x_n + r * hn)
    return r, z, n, (1.0 - z) * n + z * h_prev


@triton.jit
def _elman(pre, MODE: tl.constexpr):
    """The Elman cell's activation: tanh (MODE 2), relu (3) or sigmoid (4)."""
    if MODE == 2:
        h = _tanh(pre)
    elif MODE == 3:
        h = tl.where(pre < 0.0, 0.0, pre)  # keeps NaN, as torch's relu (maximum may not)
    else:
        h = _sigmoid(pre)
    return h


@triton.jit
def _elman_derivative(h, MODE: tl.constexpr):
    """The activation's derivative, from its output."""
    if MODE == 2:
        d = 1.0 - h * h
    elif MODE == 3:
        d = tl.where(h > 0.0, 1.0, 0.0)
    else:
        d = h * (1.0 - h)
    return d


@triton.jit
def _elman_grad(dh, h, MODE: tl.constexpr):
    """The gradient of the activation's input from dh and the output h; relu selects, as torch's
    threshold_backward: 0 where h <= 0 even for an inf or NaN dh."""
    if MODE == 3:
        d = tl.where(h <= 0.0, 0.0, dh)
    else:
        d = dh * _elman_derivative(h, MODE)
    return d


@triton.jit
def _lstm_alpha(si, sf, tg, c_prev):
    """Coefficients of the gate rows (W_i, W_f, W_g) in dc/dh_prev (W_o has none)."""
    return tg * si * (1.0 - si), c_prev * sf * (1.0 - sf), si * (1.0 - tg * tg)


@triton.jit
def _gru_gamma(r, z, n, hn, h_prev):
    """Coefficients of the gate rows (W_r, W_z, W_n) in dh/dh_prev (besides the diagonal z)."""
    dn = (1.0 - z) * (1.0 - n * n)
    return dn * hn * r * (1.0 - r), (h_prev - n) * z * (1.0 - z), dn * r


@triton.jit
def _lstm_jacobian_term(si, sf, tg, so, c_prev, tc, gram_ptr, cols, col_ok, ACC: tl.constexpr):
    """Squared norm of row j of d(h, c)/d(h_prev, c_prev) per sample and unit: alpha weighs
    (W_i, W_f, W_g) in dc/dh_prev, kappa = dh/dc, beta_o weighs W_o in dh/dh_prev; dc/dc_prev = sf and
    dh/dc_prev = kappa * sf. tc = tanh(c)."""
    a_i, a_f, a_g = _lstm_alpha(si, sf, tg, c_prev)
    kappa = so * (1.0 - tc * tc)
    b_o = tc * so * (1.0 - so)
    qa = _quad3(a_i, a_f, a_g, gram_ptr, cols, col_ok, 4, ACC)
    g_io = _gram(gram_ptr, cols, col_ok, 4, 0, 3, ACC)
    cross = (a_i * g_io + a_f * _gram(gram_ptr, cols, col_ok, 4, 1, 3, ACC)
             + a_g * _gram(gram_ptr, cols, col_ok, 4, 2, 3, ACC))
    g_oo = _gram(gram_ptr, cols, col_ok, 4, 3, 3, ACC)
    qb = kappa * kappa * qa + 2.0 * kappa * b_o * cross + b_o * b_o * g_oo
    return qa + sf * sf + qb + kappa * kappa * sf * sf


@triton.jit
def _gru_jacobian_term(r, z, n, hn, h_prev, gram_ptr, diag_ptr, cols, col_ok, ACC: tl.constexpr):
    """Squared norm of row j of dh/dh_prev per sample and unit: gamma weighs (W_r, W_z, W_n), plus the
    diagonal z. diag [H, 3] holds the diagonals of the three blocks of W_hh."""
    g_r, g_z, g_n = _gru_gamma(r, z, n, hn, h_prev)
    d0 = tl.load(diag_ptr + cols * 3, mask=col_ok, other=0.0).to(ACC)[None, :]
    d1 = tl.load(diag_ptr + cols * 3 + 1, mask=col_ok, other=0.0).to(ACC)[None, :]
    d2 = tl.load(diag_ptr + cols * 3 + 2, mask=col_ok, other=0.0).to(ACC)[None, :]
    quad = _quad3(g_r, g_z, g_n, gram_ptr, cols, col_ok, 3, ACC)
    return z * z + 2.0 * z * (g_r * d0 + g_z * d1 + g_n * d2) + quad


@triton.jit
def _split_fixup(acc, part_ptr, cnt_ptr, tile, pid_k, offs, m, part_stride, BLOCK_B: tl.constexpr,
                 SPLIT: tl.constexpr):
    """Split K for one accumulator tile: stores this program's partial at part_ptr + pid_k * part_stride +
    offs and counts it in; returns (the sum of the tile's SPLIT partials in split order, last [BLOCK_B]):
    True where this program is the last of the tile to arrive, the only one to finish the tile."""
    tl.store(part_ptr + tl.cast(pid_k, tl.int64) * part_stride + offs, acc, mask=m)
    last = _arrive(cnt_ptr, tile, tl.arange(0, BLOCK_B), SPLIT)
    return _split_sum(part_ptr, offs, m & last[:, None], part_stride, SPLIT), last


@triton.jit(do_not_specialize=["s0"])
def _forward_kernel(
    x_ptr, st_ptr, cs_ptr, ws_ptr, wt_ptr, bhh_ptr, len_ptr, gram_ptr, diag_ptr, jac_ptr, part_ptr, cnt_ptr,
    T, B, H, s0, n_steps, tiles_per_prog, k_chunk,
    MODE: tl.constexpr, G: tl.constexpr, REVERSE: tl.constexpr, HAS_LEN: tl.constexpr,
    HAS_BHH: tl.constexpr, TRACK: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Processing steps s0 .. s0+n_steps-1 for one batch block and ``tiles_per_prog`` hidden tiles.

    x [T, B, G*H]; st, cs [T+1, B, H]; ws [T, B, 4H]; wt = W_hh^T [H, G*H]; bhh [G*H]; len [B];
    gram [H, G*G]; diag [H, 3]; jac [n_tile_programs, T, B] partial sums over this program's tiles.
    Arithmetic runs in the dtype of st (float32 or float64); the dots take W_hh's dtype, or float32
    with DOT_F32.

    Split K (SPLIT > 1, one step per launch): program (b, j, k) sums h_{t-1} W_hh^T over rows
    k*k_chunk .. of W_hh^T into part [SPLIT, B, G*H]; the last of a tile's programs to arrive (counter
    cnt [tiles]) adds the partials in order and finishes the tile, so the result does not depend on the
    order of arrival.
    """
    ACC = st_ptr.dtype.element_ty
    if DOT_F32:
        DOT = tl.float32
    else:
        DOT = wt_ptr.dtype.element_ty
    pid_b = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    GH = G * H
    BH = tl.cast(B, tl.int64) * H
    k_begin = pid_k * k_chunk
    k_stop = tl.minimum(k_begin + k_chunk, H)
    lens = _row_lengths(len_ptr, rows, row_ok, HAS_LEN)
    for s in range(s0, s0 + n_steps):
        pos, _, in_base, out_base, valid = _step(s, T, BH, row_ok, lens, REVERSE, HAS_LEN)
        x_base = tl.cast(pos, tl.int64) * B * GH
        ws_base = tl.cast(pos, tl.int64) * B * (4 * H)
        jac_row = tl.zeros([BLOCK_B], dtype=ACC)
        row_out = row_ok  # the rows this program writes the step's norms of
        for q in range(tiles_per_prog):
            cols = (pid_j * tiles_per_prog + q) * BLOCK_J + tl.arange(0, BLOCK_J)
            col_ok = cols < H
            m2 = row_ok[:, None] & col_ok[None, :]
            keep = valid[:, None] & col_ok[None, :]
            acc0 = tl.zeros([BLOCK_B, BLOCK_J], dtype=ACC)
            acc1 = tl.zeros([BLOCK_B, BLOCK_J], dtype=ACC)
            acc2 = tl.zeros([BLOCK_B, BLOCK_J], dtype=ACC)
            acc3 = tl.zeros([BLOCK_B, BLOCK_J], dtype=ACC)
            for k0 in range(k_begin, k_stop, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < k_stop
                hk = tl.load(st_ptr + in_base + rows[:, None] * H + ks[None, :],
                             mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w_mask = k_ok[:, None] & col_ok[None, :]
                w_ptrs = wt_ptr + ks[:, None] * GH + cols[None, :]
                acc0 = _gate_dot(hk, w_ptrs, w_mask, acc0, DOT, PRECISION)
                if G > 1:
                    acc1 = _gate_dot(hk, w_ptrs + H, w_mask, acc1, DOT, PRECISION)
                    acc2 = _gate_dot(hk, w_ptrs + 2 * H, w_mask, acc2, DOT, PRECISION)
                if G > 3:
                    acc3 = _gate_dot(hk, w_ptrs + 3 * H, w_mask, acc3, DOT, PRECISION)
            if SPLIT > 1:
                # Partials out, and the last program of the tile takes their sum; the others' stores
                # below are masked off.
                poff = (tl.cast(pid_k, tl.int64) * B + rows[:, None]) * GH + cols[None, :]
                tl.store(part_ptr + poff, acc0, mask=m2)
                if G > 1:
                    tl.store(part_ptr + poff + H, acc1, mask=m2)
                    tl.store(part_ptr + poff + 2 * H, acc2, mask=m2)
                if G > 3:
                    tl.store(part_ptr + poff + 3 * H, acc3, mask=m2)
                last = _arrive(cnt_ptr, pid_b * tl.num_programs(1) + pid_j, tl.arange(0, BLOCK_B), SPLIT)
                m2 = m2 & last[:, None]
                keep = keep & last[:, None]
                row_out = row_ok & last
                sum_off = rows[:, None] * GH + cols[None, :]
                split_stride = tl.cast(B, tl.int64) * GH
                acc0 = _split_sum(part_ptr, sum_off, m2, split_stride, SPLIT)
                if G > 1:
                    acc1 = _split_sum(part_ptr, sum_off + H, m2, split_stride, SPLIT)
                    acc2 = _split_sum(part_ptr, sum_off + 2 * H, m2, split_stride, SPLIT)
                if G > 3:
                    acc3 = _split_sum(part_ptr, sum_off + 3 * H, m2, split_stride, SPLIT)
            hoff = rows[:, None] * H + cols[None, :]
            x_ptrs = x_ptr + x_base + rows[:, None] * GH + cols[None, :]
            ws_ptrs = ws_ptr + ws_base + rows[:, None] * (4 * H) + cols[None, :]
            if MODE == 0:  # LSTM
                c_prev = _ld(cs_ptr + in_base + hoff, m2, ACC)
                si, sf, tg, so, c = _lstm_state(_ld(x_ptrs, m2, ACC) + acc0, _ld(x_ptrs + H, m2, ACC) + acc1,
                                                _ld(x_ptrs + 2 * H, m2, ACC) + acc2,
                                                _ld(x_ptrs + 3 * H, m2, ACC) + acc3, c_prev)
                tc = _tanh(c)
                h = so * tc
                tl.store(ws_ptrs, si, mask=m2)
                tl.store(ws_ptrs + H, sf, mask=m2)
                tl.store(ws_ptrs + 2 * H, tg, mask=m2)
                tl.store(ws_ptrs + 3 * H, so, mask=m2)
                if HAS_LEN:
                    h = tl.where(keep, h, _ld(st_ptr + in_base + hoff, m2, ACC))
                    c = tl.where(keep, c, c_prev)
                tl.store(cs_ptr + out_base + hoff, c, mask=m2)
                if TRACK:
                    term = _lstm_jacobian_term(si, sf, tg, so, c_prev, tc, gram_ptr, cols, col_ok, ACC)
            elif MODE == 1:  # GRU
                h_prev = _ld(st_ptr + in_base + hoff, m2, ACC)
                if HAS_BHH:
                    acc0 += _ld(bhh_ptr + cols, col_ok, ACC)[None, :]
                    acc1 += _ld(bhh_ptr + H + cols, col_ok, ACC)[None, :]
                    acc2 += _ld(bhh_ptr + 2 * H + cols, col_ok, ACC)[None, :]
                r, z, n, h = _gru_state(_ld(x_ptrs, m2, ACC) + acc0, _ld(x_ptrs + H, m2, ACC) + acc1,
                                        _ld(x_ptrs + 2 * H, m2, ACC), acc2, h_prev)
                tl.store(ws_ptrs, r, mask=m2)
                tl.store(ws_ptrs + H, z, mask=m2)
                tl.store(ws_ptrs + 2 * H, n, mask=m2)
                tl.store(ws_ptrs + 3 * H, acc2, mask=m2)
                if HAS_LEN:
                    h = tl.where(keep, h, h_prev)
                if TRACK:
                    term = _gru_jacobian_term(r, z, n, acc2, h_prev, gram_ptr, diag_ptr, cols, col_ok, ACC)
            else:  # Elman RNN
                h = _elman(_ld(x_ptrs, m2, ACC) + acc0, MODE)
                if TRACK:
                    deriv = _elman_derivative(h, MODE)
                    term = deriv * deriv * _gram(gram_ptr, cols, col_ok, G, 0, 0, ACC)
                if HAS_LEN:
                    h = tl.where(keep, h, _ld(st_ptr + in_base + hoff, m2, ACC))
            tl.store(st_ptr + out_base + hoff, h, mask=m2)
            if TRACK:
                jac_row += tl.sum(tl.where(keep, term, 0.0), axis=1)
        if TRACK:
            tl.store(jac_ptr + (tl.cast(pid_j, tl.int64) * T + pos) * B + rows, jac_row, mask=row_out)
        # The next step reads the states this step wrote, from every tile of the block.
        tl.debug_barrier()


@triton.jit(do_not_specialize=["s_hi"])
def _backward_kernel(
    gs_ptr, gcs_ptr, st_ptr, cs_ptr, ws_ptr, w_ptr, len_ptr, dx_ptr, dr_ptr, ch_ptr, cc_ptr, gsq_ptr,
    part_ptr, cnt_ptr,
    T, B, H, s_hi, n_steps, tiles_per_prog, clip, k_chunk,
    MODE: tl.constexpr, G: tl.constexpr, NSQ: tl.constexpr, REVERSE: tl.constexpr,
    HAS_LEN: tl.constexpr, HAS_CLIP: tl.constexpr, TRACK: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Processing steps s_hi down to s_hi-n_steps+1 of the backward.

    gs, gcs, st, cs [T+1, B, H]; ws [T, B, 4H]; w = W_hh [G*H, H]; dx [T, B, G*H] gradient of the
    input projection; dr [T, B, G*H] gradient of the recurrent pre-activations (dx itself but for the
    GRU); ch, cc [2, B, H] ping-pong buffers of the direct gradient carried to the previous state;
    gsq [n_tile_programs, NSQ, T, B] float64 partial squared norms. Arithmetic runs in the dtype of gs.
    Split K (SPLIT > 1) as in the forward: program (b, j, k) takes rows k*k_chunk .. of W_hh, partials
    in part [SPLIT, B, H], counters cnt [tiles].
    """
    ACC = gs_ptr.dtype.element_ty
    if DOT_F32:
        DOT = tl.float32
    else:
        DOT = w_ptr.dtype.element_ty
    pid_b = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    GH = G * H
    BH = tl.cast(B, tl.int64) * H
    k_begin = pid_k * k_chunk
    lens = _row_lengths(len_ptr, rows, row_ok, HAS_LEN)
    for i in range(n_steps):
        s = s_hi - i
        pos, pos_next, in_base, out_base, valid = _step(s, T, BH, row_ok, lens, REVERSE, HAS_LEN)
        # The last processed step has no successor: its recurrent term is empty.
        k_end = tl.minimum((T - 1 - s) * GH, GH)
        next_base = tl.cast(pos_next, tl.int64) * B * GH
        d_base = tl.cast(pos, tl.int64) * B * GH
        ws_base = tl.cast(pos, tl.int64) * B * (4 * H)
        rd = tl.cast((s + 1) % 2, tl.int64) * BH
        wr = tl.cast(s % 2, tl.int64) * BH
        sq_h = tl.zeros([BLOCK_B], dtype=tl.float64)
        sq_c = tl.zeros([BLOCK_B], dtype=tl.float64)
        row_out = row_ok  # the rows this program writes the step's norms of
        for q in range(tiles_per_prog):
            cols = (pid_j * tiles_per_prog + q) * BLOCK_J + tl.arange(0, BLOCK_J)
            col_ok = cols < H
            m2 = row_ok[:, None] & col_ok[None, :]
            keep = valid[:, None] & col_ok[None, :]
            acc = _rec_dot(dr_ptr + next_base, w_ptr, rows, row_ok, cols, col_ok, k_begin,
                           tl.minimum(k_end, k_begin + k_chunk), GH, H,
                           tl.zeros([BLOCK_B, BLOCK_J], dtype=ACC), DOT, PRECISION, BLOCK_K)
            hoff = rows[:, None] * H + cols[None, :]
            if SPLIT > 1:
                tile = pid_b * tl.num_programs(1) + pid_j
                acc, last = _split_fixup(acc, part_ptr, cnt_ptr, tile, pid_k, hoff, m2, BH, BLOCK_B, SPLIT)
                m2 = m2 & last[:, None]
                keep = keep & last[:, None]
                row_out = row_ok & last
            dh = _ld(gs_ptr + out_base + hoff, m2, ACC) + _ld(ch_ptr + rd + hoff, m2, ACC) + acc
            if TRACK:
                sq_h += _row_sq(dh, keep)
            d_ptrs = d_base + rows[:, None] * GH + cols[None, :]
            ws_ptrs = ws_ptr + ws_base + rows[:, None] * (4 * H) + cols[None, :]
            if MODE == 0:  # LSTM
                si = _ld(ws_ptrs, m2, ACC)
                sf = _ld(ws_ptrs + H, m2, ACC)
                tg = _ld(ws_ptrs + 2 * H, m2, ACC)
                so = _ld(ws_ptrs + 3 * H, m2, ACC)
                c_prev = _ld(cs_ptr + in_base + hoff, m2, ACC)
                tc = _tanh(_ld(cs_ptr + out_base + hoff, m2, ACC))
                # Past a sample's length c is carried, and h does not depend on it.
                dc = (tl.where(keep, dh * so * (1.0 - tc * tc), 0.0) + _ld(cc_ptr + rd + hoff, m2, ACC)
                      + _ld(gcs_ptr + out_base + hoff, m2, ACC))
                if TRACK:
                    sq_c += _row_sq(dc, keep)
                d_i, d_f, d_g, d_o = _lstm_gate_grads(dc, dh, si, sf, tg, so, c_prev, tc, keep, clip,
                                                      HAS_CLIP)
                tl.store(dx_ptr + d_ptrs, d_i, mask=m2)
                tl.store(dx_ptr + d_ptrs + H, d_f, mask=m2)
                tl.store(dx_ptr + d_ptrs + 2 * H, d_g, mask=m2)
                tl.store(dx_ptr + d_ptrs + 3 * H, d_o, mask=m2)
                tl.store(cc_ptr + wr + hoff, tl.where(keep, dc * sf, dc), mask=m2)
                carry = tl.where(keep, 0.0, dh)
            elif MODE == 1:  # GRU
                _, _, _, _, carry = _gru_step_grads(dh, ws_ptrs, _ld(st_ptr + in_base + hoff, m2, ACC),
                                                    dx_ptr + d_ptrs, dr_ptr + d_ptrs, H, m2, keep, clip,
                                                    HAS_CLIP, ACC)
            else:  # Elman RNN: the activation derivative from h
                d_pre = _elman_grad(dh, _ld(st_ptr + out_base + hoff, m2, ACC), MODE)
                tl.store(dx_ptr + d_ptrs, tl.where(keep, _clamp(d_pre, clip, HAS_CLIP), 0.0), mask=m2)
                carry = tl.where(keep, 0.0, dh)
            tl.store(ch_ptr + wr + hoff, carry, mask=m2)
        if TRACK:
            sq_base = (tl.cast(pid_j, tl.int64) * NSQ * T + pos) * B + rows
            tl.store(gsq_ptr + sq_base, sq_h, mask=row_out)
            if NSQ == 2:
                tl.store(gsq_ptr + sq_base + T * B, sq_c, mask=row_out)
        # The next step reads the gate gradients and carries this step wrote, from every tile.
        tl.debug_barrier()


# ---------------------------------------------------------------------------------------------------
# Launch planning


def _interpreted(device: torch.device) -> bool:
    return not _host.on_gpu(device)


def _pow2_between(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, _host.next_power_of_2(n)))


# Tests set this to plan interpreted launches as if for a GPU with that many SMs (to cover split K).
_INTERPRETER_SMS: int | None = None
MAX_SPLIT = 8  # most programs sharing one tile's K range (more partials cost more than they spread)
# Accumulator words (4 bytes) of a program, G * BLOCK_B * BLOCK_J (twice that for float64): at most
# ACC_WORDS, and 8 warps above WARP_WORDS (and for float64), keep the step kernels free of spills; the
# persistent kernels carry more live state per tile and get PERSISTENT_WORDS and 8 warps
# (bench/results/aot_*.md has the registers of every launch).
ACC_WORDS = 8192
WARP_WORDS = 2048
PERSISTENT_WORDS = 2048
# Without a register limit ptxas may spill a few bytes to fit more blocks per SM; these kernels run
# about one block per SM, so they may take every register a thread can have.
MAXNREG = 255


def cover(B: int, cols: int, G: int, word: int, target: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_J, programs) of a step's dot tiles over [B, cols] with G accumulators each.

    Among the tiles (16 to 64 each way; tl.dot needs >= 16) whose grid covers ``target`` programs, the
    one that reads least: the programs read the left operand once per column tile and the G weight
    tiles once per row block, B * cols * K * (1/BLOCK_J + G/BLOCK_B) elements in all; short of
    covering, the most programs. ``word``: 2 for float64 accumulators (twice the registers).
    """
    candidates = []
    for block_b in (16, 32, 64):
        for block_j in (16, 32, 64):
            if block_b > _pow2_between(B, 16, 64) or block_j > _pow2_between(cols, 16, 64):
                continue
            if G * block_b * block_j * word > ACC_WORDS:
                continue
            programs = _host.cdiv(B, block_b) * _host.cdiv(cols, block_j)
            reads = 1 / block_j + G / block_b
            rank = (0, reads, -block_b) if programs >= target else (1, -programs, reads)
            candidates.append((rank, block_b, block_j, programs))
    _, block_b, block_j, programs = min(candidates)
    return block_b, block_j, programs


def wanted_split(programs: int, target: int) -> int:
    """Programs to share each tile's K range so that ``programs`` tiles make ``target`` programs: a power
    of two (with K a power of two every program then gets an equal share, in whole K tiles)."""
    if programs >= target:
        return 1
    return min(_host.next_power_of_2(_host.cdiv(target, programs)), MAX_SPLIT)


def split_block_k(K: int, wanted: int, block_k: int) -> int:
    """Shorter K tiles where K split ``wanted`` ways would not give every program whole ones: the largest
    power of two up to ``block_k`` that divides K / wanted (at least 16)."""
    share = _host.cdiv(K, wanted)
    while block_k > 16 and share % block_k:
        block_k //= 2
    return block_k


def loop_kind(B: int, H: int, G: int, sms: int | None, loop: str = "auto") -> str:
    """"persistent" or "step": ``loop`` unless it is "auto" (the rule of the plain and the
    layer-normalized cells alike)."""
    if loop not in ("auto", "persistent", "step"):
        raise ValueError(f"{LOOP_ENV}: expected 'auto', 'persistent' or 'step', got {loop!r}")
    if loop != "auto":
        return loop
    # One program per 16 rows does a whole step: worth it while a step is tiny (its launches would
    # cost more than its work) or while the batch alone fills the GPU.
    small = G * H * H <= 16384
    return "persistent" if sms is None or small or _host.cdiv(B, 16) >= sms else "step"


def k_tile(K: int, dtype: torch.dtype) -> int:
    """BLOCK_K of a step kernel's dots: 64 for half operands, 32 otherwise (at most K's power of two)."""
    return _pow2_between(K, 16, 64 if dtype in (torch.bfloat16, torch.float16) else 32)


def dot_warps(G: int, block_b: int, block_j: int, word: int, block_k: int) -> tuple[int, int]:
    """(num_warps, BLOCK_K) of a step kernel's dot tiles: 8 warps for float64 and above WARP_WORDS
    accumulator words, else 4; a wide tile on 4 warps (the RNN at large B, H) takes 16-row K tiles, as
    32-row ones spill."""
    num_warps = 8 if word == 2 or G * block_b * block_j > WARP_WORDS else 4
    if num_warps == 4 and block_b * block_j >= 2048:
        block_k = 16
    return num_warps, block_k


def plan(B: int, H: int, G: int, dtype: torch.dtype, sms: int | None, loop: str = "auto") -> dict:
    """Loop kind, tiles, split and warps for a layer of batch B, hidden size H and G gates.

    ``sms``: the GPU's multiprocessor count, None under the interpreter. ``loop``: "auto",
    "persistent" or "step". tl.dot needs every block dimension >= 16 on a GPU.

    The step loop launches a grid of ceil(B / BLOCK_B) x ceil(H / BLOCK_J) x SPLIT programs per step,
    tiles chosen by :func:`cover` to keep the SMs busy. Where even 16 x 16 tiles leave SMs idle (small
    B * H), SPLIT programs share each tile's K range, so that the grid still covers the SMs
    (bench/results/perf_model.md weighs this against fewer, longer programs).
    """
    loop = loop_kind(B, H, G, sms, loop)
    # Shorter K tiles for float32/float64 dots keep the pipelined weight tiles of all gates well
    # inside shared memory (float64 LSTM with 64 would need 278 KB on sm_90).
    block_k = k_tile(H, dtype)
    word = 2 if dtype == torch.float64 else 1
    if loop == "persistent":
        block_j = 32 if H > 16 and G * 16 * 32 * word <= PERSISTENT_WORDS else 16
        if word == 2:
            block_k = 16  # float64 LSTM with lengths and tracking spills with 32
        # No software pipelining of the K loop: its prefetched tiles, live across the loops over tiles
        # and steps, would spill (float64 LSTM with tracking).
        return {"loop": loop, "BLOCK_B": 16, "BLOCK_J": block_j, "BLOCK_K": block_k,
                "SPLIT_FWD": 1, "SPLIT_BWD": 1, "num_warps": 8, "num_stages": 1}
    target = _host.busy_target(sms)
    block_b, block_j, programs = cover(B, H, G, word, target)
    wanted = wanted_split(programs, target)
    if wanted > 1:
        block_k = split_block_k(H, wanted, block_k)

    def split(k: int) -> int:
        return max(1, min(wanted, _host.cdiv(k, block_k)))

    num_warps, block_k = dot_warps(G, block_b, block_j, word, block_k)
    return {"loop": loop, "BLOCK_B": block_b, "BLOCK_J": block_j, "BLOCK_K": block_k,
            "SPLIT_FWD": split(H), "SPLIT_BWD": split(G * H), "num_warps": num_warps, "num_stages": 3}


def pointwise_tiles(B: int, cols: int, target: int, max_tile: int = 1024) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_J, num_warps) of an element-wise kernel over [B, cols] (no tl.dot).

    The largest tile (at most ``max_tile`` elements, at least a warp's 32, BLOCK_J >= 16 for whole
    memory sectors) whose grid still covers ``target`` programs; short of that, the most programs.
    """
    candidates = []
    for block_j in (16, 32, 64, 128):
        if block_j > max(16, _host.next_power_of_2(cols)):
            continue
        for block_b in (2, 4, 8, 16):
            area = block_b * block_j
            if block_b > max(2, _host.next_power_of_2(B)) or not 32 <= area <= max_tile:
                continue
            programs = _host.cdiv(B, block_b) * _host.cdiv(cols, block_j)
            rank = (0, -area, -block_j) if programs >= target else (1, -programs, -block_j)
            candidates.append((rank, block_b, block_j))
    _, block_b, block_j = min(candidates)
    return block_b, block_j, max(1, min(8, block_b * block_j // 128))


_cached_plan = functools.lru_cache(maxsize=256)(plan)  # a pure function, asked at every call of a layer


def _plan(B: int, H: int, G: int, device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """:func:`plan` for a launch on ``device``, with the loop kind from ``VGK_RNN_TRITON_LOOP``; the
    same dict for the same arguments (read it, never change it)."""
    return _cached_plan(B, H, G, dtype, *sms_and_loop(device))


def sms_and_loop(device: torch.device) -> tuple[int | None, str]:
    """The SM count to plan for and the loop kind asked for (``VGK_RNN_TRITON_LOOP``) on ``device``."""
    loop = os.environ.get(LOOP_ENV, "auto")
    sms = _host.sm_count(device)
    if sms is None:
        sms = _INTERPRETER_SMS
        # Under the interpreter auto stays persistent (fast there); split K only where asked for.
        if loop == "auto":
            loop = "persistent"
    return sms, loop


def _k_chunk(K: int, split: int, block_k: int) -> int:
    """Rows of the K range per split program: a multiple of BLOCK_K."""
    return _host.cdiv(_host.cdiv(K, split), block_k) * block_k


def _dot_f32(dtype: torch.dtype, device: torch.device) -> bool:
    # The interpreter computes bfloat16 dots wrongly; there they run on float32 operands.
    return dtype == torch.bfloat16 and _interpreted(device)


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot input precision of float32 operands: "tf32" where torch's switch allows it, else "ieee"."""
    return "tf32" if dtype == torch.float32 and _host.fp32_dot_tf32(device) else "ieee"


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _host.alloc(shape, dtype, device, _ALLOC_FILL)


# ---------------------------------------------------------------------------------------------------
# Argument checks (cheap, before any kernel runs)


def _fail(op: str, cls, message: str):
    raise cls(f"{op}: {message}")


def _given(t) -> str:
    """What an argument that should be None was, for a message."""
    return f"a tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_tensor(op, name, t, shape, dtype, device) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, TypeError, f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        _fail(op, ValueError, f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        _fail(op, TypeError, f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.device != device:
        _fail(op, RuntimeError, f"{name} must be on {device} like xproj, got {t.device}")


def _check_mode(op: str, mode: str) -> int:
    if mode not in GATES:
        _fail(op, ValueError, f"mode must be one of {tuple(GATES)}, got {mode!r}")
    return GATES[mode]


def _kernels_interpreted() -> bool:
    # Triton picks the interpreter when a kernel is decorated, from TRITON_INTERPRET at that time.
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_forward_kernel, InterpretedFunction)


def _check_device(op: str, device: torch.device) -> None:
    if device.type == "cuda" or (device.type == "meta" and _host.capturing()):
        return
    if device.type == "cpu" and _kernels_interpreted():
        return
    _fail(op, RuntimeError, f"the Triton kernels run on CUDA tensors (or on CPU tensors with "
          f"TRITON_INTERPRET=1 set before triton is imported), got tensors on {device}; use the cpp "
          "backend for CPU tensors")


def _check_leading(op: str, name: str, t, layout: str) -> tuple[torch.device, torch.dtype]:
    """Checks the 3-D tensor whose device and dtype all other arguments must share; returns them."""
    if not isinstance(t, torch.Tensor) or t.dim() != 3:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        _fail(op, ValueError, f"{name} must be a 3-D tensor {layout}, got {got}")
    if t.dtype not in _DTYPES:
        _fail(op, TypeError, f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")
    _check_device(op, t.device)
    return t.device, t.dtype


def _check_grad_clip(op: str, grad_clip: float | None) -> None:
    if grad_clip is not None and not grad_clip > 0:
        _fail(op, ValueError, f"grad_clip must be a positive number or None, got {grad_clip}")


def _check_lengths(op: str, lengths: torch.Tensor | None, B: int) -> None:
    if lengths is None:
        return
    if lengths.dtype != torch.int64 or tuple(lengths.shape) != (B,):
        _fail(op, ValueError, f"lengths must be int64 of shape ({B},), got {lengths.dtype} of shape "
              f"{tuple(lengths.shape)}")


# ---------------------------------------------------------------------------------------------------
# Forward


def _initial_states(loop: _graphs.StepLoop, T: int, h0: torch.Tensor, c0: torch.Tensor | None, reverse: bool,
                    acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop's states [T+1, B, H] and cell states ([T+1, B, H] with c0, else [0]) in acc, the initial
    slot set (slot T for the reverse direction) and the others left to the kernels."""
    B, H = h0.shape
    init = T if reverse else 0
    states = loop.buffer("states", lambda: _alloc((T + 1, B, H), acc, h0.device))
    states[init] = h0
    if c0 is None:
        return states, h0.new_empty(0, dtype=acc)  # outputs may not alias each other
    cells = loop.buffer("cells", lambda: _alloc((T + 1, B, H), acc, h0.device))
    cells[init] = c0
    return states, cells


def _gram_terms(w_hh: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit Gram matrices [H, G*G] of the gate blocks' rows, and for the GRU the diagonals [H, 3]."""
    G = GATES[mode]
    H = w_hh.shape[1]
    blocks = w_hh.to(_acc_dtype(w_hh.dtype)).reshape(G, H, H)
    gram = torch.einsum("ajk,bjk->jab", blocks, blocks).reshape(H, G * G).contiguous()
    if mode == "gru":
        diag = torch.diagonal(blocks, dim1=1, dim2=2).t().contiguous()
    else:
        diag = gram
    return gram, diag


def _forward_impl(xproj, h0, c0, w_hh, b_hh, lengths, mode, reverse, track):
    op = "rnn_forward_triton"
    G = _check_mode(op, mode)
    device, dtype = _check_leading(op, "xproj", xproj, "[T, B, G*H]")
    T, B, GH = xproj.shape
    if w_hh.dim() != 2:
        _fail(op, ValueError, f"w_hh must be 2-D [G*H, H], got shape {tuple(w_hh.shape)}")
    H = w_hh.shape[1]
    if T < 1 or B < 1 or H < 1:
        _fail(op, ValueError, f"T, B and H must be positive, got T={T}, B={B}, H={H}")
    _check_tensor(op, "w_hh", w_hh, (G * H, H), dtype, device)
    if GH != G * H:
        _fail(op, ValueError, f"xproj must have shape {(T, B, G * H)} for mode {mode!r} and H={H}, "
              f"got {tuple(xproj.shape)}")
    _check_tensor(op, "h0", h0, (B, H), dtype, device)
    if mode == "lstm":
        if c0 is None:
            _fail(op, ValueError, "c0 is required for mode 'lstm', got None")
        _check_tensor(op, "c0", c0, (B, H), dtype, device)
    elif c0 is not None:
        _fail(op, ValueError, f"c0 must be None for mode {mode!r}, got {_given(c0)}")
    if b_hh is not None:
        if mode != "gru":
            _fail(op, ValueError,
                  f"b_hh must be None for mode {mode!r} (fold it into xproj), got {_given(b_hh)}")
        _check_tensor(op, "b_hh", b_hh, (G * H,), dtype, device)
    _check_lengths(op, lengths, B)

    acc = _acc_dtype(dtype)
    plan = _plan(B, H, G, device, dtype)
    persistent = plan["loop"] == "persistent"
    n_b = _host.cdiv(B, plan["BLOCK_B"])
    n_tiles = _host.cdiv(H, plan["BLOCK_J"])
    split = plan["SPLIT_FWD"]
    meta = dict(
        MODE=_MODE_ID[mode], G=G, REVERSE=bool(reverse), HAS_LEN=lengths is not None,
        HAS_BHH=b_hh is not None, TRACK=bool(track), DOT_F32=_dot_f32(dtype, device),
        PRECISION=_precision(dtype, device), SPLIT=split, BLOCK_B=plan["BLOCK_B"], BLOCK_J=plan["BLOCK_J"],
        BLOCK_K=plan["BLOCK_K"], num_warps=plan["num_warps"], num_stages=plan["num_stages"],
        maxnreg=MAXNREG,
    )
    key = None if persistent else ("fwd", T, B, H, dtype, device, tuple(sorted(meta.items())))
    loop = _graphs.StepLoop(key, device, {})
    empty = xproj.new_empty(0, dtype=acc)
    x = loop.copy_in("xproj", xproj)
    wt = loop.copy_in("wt", w_hh.t())
    states, cells = _initial_states(loop, T, h0, c0, reverse, acc)
    ws = loop.buffer("ws", lambda: _alloc((T, B, 4 * H), acc, device)) if mode in ("lstm", "gru") \
        else xproj.new_empty(0, dtype=acc)
    if track:
        gram, diag = (loop.copy_in(name, t) for name, t in zip(("gram", "diag"), _gram_terms(w_hh, mode),
                                                                strict=True))
        jac_part = loop.buffer("jac", lambda: _alloc((1 if persistent else n_tiles, T, B), acc, device))
    else:
        gram = diag = jac_part = empty
    len_dev = loop.copy_in("lengths", lengths.to(device)) if lengths is not None else empty
    bhh = loop.copy_in("b_hh", b_hh) if b_hh is not None else empty
    part, counters = _split_buffers(loop, split, (split, B, G * H), n_b * n_tiles, acc, device)
    args = (x, states, cells, ws, wt, bhh, len_dev, gram, diag, jac_part, part, counters)

    def launch_all():
        with _device_ctx(device):
            if persistent:
                _host.launch(_forward_kernel, (n_b, 1, 1), *args, T, B, H, 0, T, n_tiles, H, **meta)
            else:
                chunk = _k_chunk(H, split, plan["BLOCK_K"])
                for s in range(T):
                    _host.launch(_forward_kernel, (n_b, n_tiles, split), *args, T, B, H, s, 1, 1, chunk,
                                 **meta)

    loop.run(launch_all)
    if track:
        jac_sq = jac_part.sum(0, dtype=torch.float32) if jac_part.shape[0] > 1 else jac_part[0].float()
    else:
        jac_sq = states.new_empty(0, dtype=torch.float32)
    return (loop.cast_out("states_out", states, dtype), loop.cast_out("cells_out", cells, dtype),
            loop.cast_out("ws_out", ws, dtype), jac_sq)


def _split_buffers(loop, split: int, shape: tuple, tiles: int, acc: torch.dtype, device: torch.device):
    """Partials [split, ...] and zeroed arrival counters [tiles] of a split-K step loop (empty without)."""
    if split == 1:
        empty = torch.empty(0, dtype=acc, device=device)
        return empty, empty.to(torch.int32)
    part = loop.buffer("part", lambda: torch.empty(shape, dtype=acc, device=device))
    # The last program of each tile resets its counter, so they are zero again after every step.
    counters = loop.buffer("counters", lambda: torch.zeros(tiles, dtype=torch.int32, device=device))
    return part, counters


@triton_op("vgk::rnn_forward_triton", mutates_args=())
def rnn_forward_triton(
    xproj: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor | None,
    w_hh: torch.Tensor,
    b_hh: torch.Tensor | None,
    lengths: torch.Tensor | None,
    probe: torch.Tensor | None,
    mode: str,
    reverse: bool,
    track: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One direction of one layer over the sequence (the Triton twin of ``vgk::rnn_forward``).

    Args:
        xproj: [T, B, G*H] input projection (plus b_hh except for the GRU); float32, float64,
            bfloat16 or float16. G = 4 (lstm), 3 (gru), 1 (rnn_*).
        h0: [B, H]; c0: [B, H] for the LSTM, else None; w_hh: [G*H, H]; b_hh: [G*H] (GRU) or None.
            All in xproj's dtype and on its device.
        lengths: int64 [B] (any device), or None: past its length a sample's state is carried.
        probe: ignored (autograd routes the trace gradient to it).
        mode: "lstm", "gru", "rnn_tanh", "rnn_relu" or "rnn_sigmoid"; reverse: run t = T-1 .. 0;
        track: compute jac_sq.
    Returns:
        states [T+1, B, H], cell_states [T+1, B, H] (LSTM) or [0], workspace [T, B, 4H] (LSTM, GRU)
        or [0], all in xproj's dtype; jac_sq float32 [T, B] (or [0] without track).
    """
    return _forward_impl(xproj, h0, c0, w_hh, b_hh, lengths, mode, reverse, track)


def _fake_forward(xproj, w_hh, mode: str, track: bool, ws_width: int, ws_dtype: torch.dtype):
    """Outputs of a forward op for tracing: states, cell_states, workspace [T, B, ws_width] ([0] for
    width 0) and jac_sq; shared by the plain and the layer-normalized cells."""
    T, B, _ = xproj.shape
    H = w_hh.shape[1]
    states = xproj.new_empty(T + 1, B, H)
    cells = xproj.new_empty(T + 1, B, H) if mode == "lstm" else xproj.new_empty(0)
    ws = xproj.new_empty(T, B, ws_width, dtype=ws_dtype) if ws_width else xproj.new_empty(0)
    jac_sq = xproj.new_empty((T, B) if track else (0,), dtype=torch.float32)
    return states, cells, ws, jac_sq


@rnn_forward_triton.register_fake
def _forward_fake(xproj, h0, c0, w_hh, b_hh, lengths, probe, mode, reverse, track):
    width = 4 * w_hh.shape[1] if mode in ("lstm", "gru") else 0
    return _fake_forward(xproj, w_hh, mode, track, width, xproj.dtype)


# ---------------------------------------------------------------------------------------------------
# Backward


def _backward_impl(grad_states, grad_cell_states, states, cell_states, workspace, w_hh, lengths, mode,
                   reverse, grad_clip, track, has_b_hh):
    op = "rnn_backward_triton"
    G = _check_mode(op, mode)
    device, dtype = _check_leading(op, "states", states, "[T+1, B, H]")
    T, B, H = states.shape[0] - 1, states.shape[1], states.shape[2]
    if T < 1 or B < 1 or H < 1:
        _fail(op, ValueError, f"states must have shape [T+1, B, H] with T, B, H >= 1, got "
              f"{tuple(states.shape)}")
    _check_tensor(op, "w_hh", w_hh, (G * H, H), dtype, device)
    _check_tensor(op, "grad_states", grad_states, (T + 1, B, H), None, device)
    if mode == "lstm":
        _check_tensor(op, "cell_states", cell_states, (T + 1, B, H), dtype, device)
        _check_tensor(op, "grad_cell_states", grad_cell_states, (T + 1, B, H), None, device)
    if mode in ("lstm", "gru"):
        _check_tensor(op, "workspace", workspace, (T, B, 4 * H), dtype, device)
    _check_lengths(op, lengths, B)
    _check_grad_clip(op, grad_clip)
    if has_b_hh and mode != "gru":
        _fail(op, ValueError, f"has_b_hh is for mode 'gru' only, got has_b_hh=True with mode {mode!r}")

    acc = _acc_dtype(dtype)
    plan = _plan(B, H, G, device, dtype)
    persistent = plan["loop"] == "persistent"
    n_b = _host.cdiv(B, plan["BLOCK_B"])
    n_tiles = _host.cdiv(H, plan["BLOCK_J"])
    split = plan["SPLIT_BWD"]
    nsq = 2 if mode == "lstm" else 1
    clip = float(grad_clip) if grad_clip is not None else 0.0
    meta = dict(
        MODE=_MODE_ID[mode], G=G, NSQ=nsq, REVERSE=bool(reverse), HAS_LEN=lengths is not None,
        HAS_CLIP=grad_clip is not None, TRACK=bool(track), DOT_F32=_dot_f32(dtype, device),
        PRECISION=_precision(dtype, device), SPLIT=split, BLOCK_B=plan["BLOCK_B"], BLOCK_J=plan["BLOCK_J"],
        BLOCK_K=plan["BLOCK_K"], num_warps=plan["num_warps"], num_stages=plan["num_stages"],
        maxnreg=MAXNREG,
    )
    st = states.contiguous()
    cs = cell_states.contiguous() if mode == "lstm" else st.new_empty(0)
    ws = workspace.contiguous() if mode in ("lstm", "gru") else st.new_empty(0)
    # The forward's outputs are read in place: a graph captured on them replays for the backward of
    # every forward that returned the same buffers. The weights are copied in: a parametrized or
    # autocast weight is a fresh tensor at every call, whose address would miss the graph.
    adopted = {"states": st, "cells": cs, "ws": ws}
    key = None if persistent else ("bwd", T, B, H, dtype, device, clip, tuple(sorted(meta.items())))
    loop = _graphs.StepLoop(key, device, adopted)
    w = loop.copy_in("w", w_hh)
    gs = loop.copy_in("gs", grad_states.to(acc))
    gcs = loop.copy_in("gcs", grad_cell_states.to(acc)) if mode == "lstm" else gs.new_empty(0)
    len_dev = (loop.copy_in("lengths", lengths.to(device)) if lengths is not None
               else st.new_empty(0, dtype=acc))
    dx = loop.buffer("dx", lambda: _alloc((T, B, G * H), acc, device))
    dr = loop.buffer("dr", lambda: _alloc((T, B, G * H), acc, device)) if mode == "gru" else dx
    carry_h = loop.buffer("carry_h", lambda: torch.empty(2, B, H, dtype=acc, device=device))
    carry_h.zero_()
    if mode == "lstm":
        carry_c = loop.buffer("carry_c", lambda: torch.empty(2, B, H, dtype=acc, device=device))
        carry_c.zero_()
    else:
        carry_c = carry_h
    gsq_part = loop.buffer("gsq", lambda: _alloc((1 if persistent else n_tiles, nsq, T, B), torch.float64,
                                                 device)) if track else gs.new_empty(0)
    part, counters = _split_buffers(loop, split, (split, B, H), n_b * n_tiles, acc, device)
    args = (gs, gcs, st, cs, ws, w, len_dev, dx, dr, carry_h, carry_c, gsq_part, part, counters)

    def launch_all():
        with _device_ctx(device):
            if persistent:
                _host.launch(_backward_kernel, (n_b, 1, 1), *args, T, B, H, T - 1, T, n_tiles, clip, G * H,
                             **meta)
            else:
                chunk = _k_chunk(G * H, split, plan["BLOCK_K"])
                for s in range(T - 1, -1, -1):
                    _host.launch(_backward_kernel, (n_b, n_tiles, split), *args, T, B, H, s, 1, 1, clip,
                                 chunk, **meta)

    loop.run(launch_all)

    # The step processed first (s = 0) leaves the gradient of the initial state.
    first, init = (T - 1, T) if reverse else (0, 0)
    grad_h0 = gs[init] + carry_h[0] + _gemm.mm(dr[first], w.to(acc))
    grad_c0 = (carry_c[0] + gcs[init]).to(dtype) if mode == "lstm" else st.new_empty(0)
    h_prev = st[1:] if reverse else st[:-1]
    # One GEMM over all steps, in the input dtype (tensor cores for half inputs; float32 in the precision
    # of the recurrent dots).
    grad_w_hh = _gemm.mm(dr.reshape(T * B, G * H).t().to(dtype), h_prev.reshape(T * B, H)).to(w_hh.dtype)
    grad_b_hh = dr.sum((0, 1)).to(dtype) if has_b_hh else st.new_empty(0)
    if track:
        grad_sq = gsq_part.sum(0) if gsq_part.shape[0] > 1 else gsq_part[0]
    else:
        grad_sq = st.new_empty(0, dtype=torch.float64)
    return dx.to(dtype), grad_h0.to(dtype), grad_c0, grad_w_hh, grad_b_hh, grad_sq


@triton_op("vgk::rnn_backward_triton", mutates_args=())
def rnn_backward_triton(
    grad_states: torch.Tensor,
    grad_cell_states: torch.Tensor,
    states: torch.Tensor,
    cell_states: torch.Tensor,
    workspace: torch.Tensor,
    w_hh: torch.Tensor,
    lengths: torch.Tensor | None,
    mode: str,
    reverse: bool,
    grad_clip: float | None,
    track: bool,
    has_b_hh: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`rnn_forward_triton` (the Triton twin of ``vgk::rnn_backward``).

    Args:
        grad_states: [T+1, B, H] gradient of ``states`` (the initial-state slot is added to grad_h0);
        grad_cell_states: [T+1, B, H] for the LSTM, else [0]; states, cell_states, workspace: the
            forward's outputs; w_hh [G*H, H]; lengths, mode, reverse as in the forward.
        grad_clip: clamp the gate pre-activation gradients to [-c, c] at every step, or None.
        track: compute grad_sq. has_b_hh: return grad_b_hh (GRU).
    Returns:
        grad_xproj [T, B, G*H], grad_h0 [B, H], grad_c0 [B, H] (LSTM) or [0], grad_w_hh [G*H, H],
        grad_b_hh [G*H] (GRU with has_b_hh) or [0], all in the states' dtype (grad_w_hh in w_hh's);
        grad_sq float64 [K, T, B] (K = 2 for the LSTM: h then c; else 1), or [0] without track.
    """
    return _backward_impl(grad_states, grad_cell_states, states, cell_states, workspace, w_hh, lengths,
                          mode, reverse, grad_clip, track, has_b_hh)


def _fake_backward(states, w_hh, mode: str, track: bool, has_b_hh: bool):
    """grad_xproj, grad_h0, grad_c0, grad_w_hh, grad_b_hh and grad_sq of a backward op, for tracing;
    shared by the plain and the layer-normalized cells."""
    T, B, H = states.shape[0] - 1, states.shape[1], states.shape[2]
    G = GATES[mode]
    K = 2 if mode == "lstm" else 1
    return (
        states.new_empty(T, B, G * H),
        states.new_empty(B, H),
        states.new_empty(B, H) if mode == "lstm" else states.new_empty(0),
        w_hh.new_empty(w_hh.shape),
        states.new_empty(G * H) if has_b_hh else states.new_empty(0),
        states.new_empty((K, T, B) if track else (0,), dtype=torch.float64),
    )


@rnn_backward_triton.register_fake
def _backward_fake(grad_states, grad_cell_states, states, cell_states, workspace, w_hh, lengths, mode,
                   reverse, grad_clip, track, has_b_hh):
    return _fake_backward(states, w_hh, mode, track, has_b_hh)
