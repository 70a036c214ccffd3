"""Triton kernels of the layer-normalized LSTM and GRU cells (Ba et al. 2016): one direction of one layer.

The ops ``vgk::rnn_ln_forward_triton`` and ``vgk::rnn_ln_backward_triton`` take the arguments and return
the outputs of the C++ ops ``vgk::rnn_ln_forward`` / ``vgk::rnn_ln_backward`` (see
``vgkernels/ops/recurrent.py`` and ``csrc/cpu/recurrent_ln.cpp``): gates = xproj + LN(W_hh h) (the GRU
adds b_hh after the LN, inside r * (...)), and for the LSTM h = o * tanh(LN(c)).

A step, forward: y = h_prev W_hh^T (N = G*H columns) and its row statistics, LN(y) and the gates, the
new cell c and (LSTM) the statistics of c, then h = o * tanh(LN(c)). Backward, in reverse: the recurrent
term dY_{t+1} W_hh and dh, (LSTM) the cell LN's backward and the gate gradients, then the LN backward
into dY_t, the gradient of W_hh h_{t-1}. LN couples all units of a row twice per step (three times
with the cell LN), so a step is a few kernels that each cover the GPU, in the order the row statistics
need:

- the *step* loop (the default on a GPU): forward, per step, a dot kernel (a grid of [rows, gate
  columns] tiles, split K where the tiles alone leave SMs idle, as in :mod:`vgkernels.triton.recurrent`)
  that stores y and each tile's row (mean, sqrt(M2)); an element-wise kernel over [rows, hidden units]
  that combines them into the row's mean and variance (the exact pairwise formula, in a fixed order,
  squares scaled where they could overflow), applies LN and the gates and, for the LSTM, stores each
  tile's (mean, sqrt(M2)) of c; and for the LSTM an element-wise kernel that combines those and
  computes h. Backward, per step, a dot kernel with dh and (GRU) the gate
  gradients; (LSTM) an element-wise kernel for the cell LN backward and the gate gradients; an
  element-wise kernel for dY. Row sums go through [tiles, 2, B] buffers summed in a fixed order: no
  float atomics, deterministic. On CUDA the step loop is replayed from CUDA graphs (:mod:`._graphs`).
  Each kernel's grid keeps at least 100 of an H200's 132 SMs busy for B >= 16 (bench/results/aot_*.md).
- the *persistent* loop: one program owns a block of 16 batch rows with all their columns and walks the
  whole sequence (block barriers separate the passes; all its data dependencies stay inside the
  program). It runs on ceil(B / 16) SMs; the plain cells' rule picks it (tiny steps, or a batch that
  fills the GPU alone; under the interpreter). ``VGK_RNN_TRITON_LOOP`` = ``persistent`` | ``step`` |
  ``auto`` and ``VGK_RNN_TRITON_GRAPH`` act as for the plain cells.

Both loops run the same tile functions below (one piece of code per pass). grad_w_hh is one GEMM after
the loop (:func:`vgkernels.triton.gemm.mm`), the gains' and shifts' gradients are sums over all rows
after the loop (deterministic).

Jacobian norms (track=True only; exact, see recurrent_ln.cpp for the derivation): after the forward,
over chunks of positions, the left operands Z (yh / N; for the LSTM also rstd P(gamma alpha) and
rstd P(gamma ch alpha)) are formed from the workspace, V = Z W_hh and Q = V W_hh^T are two float64
GEMMs of K*T*B rows (K = 1 GRU, 3 LSTM; about 2K times the forward's own GEMM work), and one Triton
kernel evaluates the per-row quadratic forms in float64. Float64 keeps the strongly cancelling
expansion exact also where the cell LN's projector nearly annihilates a row (small H).

Dtypes: float32, float64, bfloat16 and float16 inputs (all tensors in one dtype). Arithmetic and the
internal buffers are float64 for float64 inputs and float32 otherwise. ``states``, ``cell_states`` and
the gradients are returned in the input dtype; the ``workspace`` stays in that accumulation dtype
(float32 for half inputs) so that the backward sees the normalized values unrounded; ``jac_sq`` is
float32 and ``grad_sq`` float64. The recurrent dots take half-precision operands (tensor cores, float32
accumulation) for half inputs, and float32 dots follow torch's cuDNN TF32 switch as in
:mod:`vgkernels.triton.recurrent`.

Workspace layout (the C++ backend's): LSTM [T, B, 10H+2] = (si, sf, tg, so | yh (4H) | ch | tl | rstd |
rstd_c); GRU [T, B, 7H+1] = (r, z, n, hn | yh (3H) | rstd).
"""

import functools

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from vgkernels.triton import _graphs, _host
from vgkernels.triton import gemm as _gemm
from vgkernels.triton import recurrent as _plain
from vgkernels.triton.layer_norm import _row_scale
from vgkernels.triton.recurrent import (
    MAXNREG,
    _gru_gamma,
    _gru_state,
    _gru_step_grads,
    _ld,
    _lstm_alpha,
    _lstm_gate_grads,
    _lstm_state,
    _pow2_between,
    _rec_dot,
    _row_lengths,
    _row_sq,
    _split_fixup,
    _step,
    _tanh,
)

GATES = {"lstm": 4, "gru": 3}
_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
       torch.float16: tl.float16}
# Bytes of one float64 GEMM operand of the Jacobian post-pass, per chunk of positions.
_JAC_CHUNK_BYTES = 1 << 25


def workspace_width(mode: str, H: int) -> int:
    """Values per position and sample that the forward saves for the backward."""
    return 10 * H + 2 if mode == "lstm" else 7 * H + 1


# ---------------------------------------------------------------------------------------------------
# Kernels: row statistics over tiles


@triton.jit
def _widths(H, LSTM: tl.constexpr):
    """(N, WS, R_OFF): gate columns, workspace row width, and where rstd sits in a workspace row (the
    LSTM's rstd_c follows it)."""
    if LSTM:
        N = 4 * H
        WS = 10 * H + 2
        R_OFF = 10 * H
    else:
        N = 3 * H
        WS = 7 * H + 1
        R_OFF = 7 * H
    return N, WS, R_OFF


@triton.jit
def _tile_stats(v, m, count):
    """Per row of a tile: the mean of v where m holds (over ``count`` columns) and the root of the sum of
    squared deviations, sqrt(M2), summed over (v - mean) / max|v| where the squares could overflow
    (max|v| > 2^50: a huge W_hh)."""
    mean = tl.sum(tl.where(m, v, 0.0), axis=1) / count
    inv = _row_scale(tl.max(tl.where(m, tl.abs(v), 0.0), axis=1))
    d = tl.where(m, (v - mean[:, None]) * inv[:, None], 0.0)
    return mean, tl.sqrt(tl.sum(d * d, axis=1)) / inv


@triton.jit
def _store_pair(ptr, tile, B, rows, mask, a, b):
    """Two values per row at tile ``tile`` of a [tiles, 2, B] buffer of per-tile row values."""
    off = tile * (2 * B) + rows
    tl.store(ptr + off, a, mask=mask)
    tl.store(ptr + off + B, b, mask=mask)


@triton.jit
def _load_pairs(ptr, rows, row_ok, B, n_tiles, NT: tl.constexpr):
    """Both values of every tile of a [n_tiles, 2, B] buffer for the rows ([BLOCK_B, NT] each, zeros past
    n_tiles), and the tile indices [NT]."""
    t = tl.arange(0, NT)
    m = row_ok[:, None] & (t < n_tiles)[None, :]
    off = t[None, :] * (2 * B) + rows[:, None]
    return tl.load(ptr + off, mask=m, other=0.0), tl.load(ptr + off + B, mask=m, other=0.0), t


@triton.jit
def _row_moments(ptr, rows, row_ok, B, total, n_tiles, eps, TILE: tl.constexpr, NT: tl.constexpr):
    """Mean and 1 / sqrt(variance + eps) of rows of ``total`` columns from their tiles' (mean, sqrt(M2))
    (:func:`_tile_stats`) in a [n_tiles, 2, B] buffer, tiles of TILE columns (the last one may be
    shorter): the exact pairwise formula, each sum in one fixed order, the squares scaled as in
    :func:`_tile_stats` by a bound of the row's |values| (no value is further from its tile's mean than
    the tile's root)."""
    means, roots, t = _load_pairs(ptr, rows, row_ok, B, n_tiles, NT)
    count = tl.where(t < n_tiles, tl.minimum(total - t * TILE, TILE), 0).to(means.dtype)[None, :]
    mean = tl.sum(means * count, axis=1) / total
    inv = _row_scale(tl.max(tl.abs(means) + roots, axis=1))
    d = (means - mean[:, None]) * inv[:, None]
    r = roots * inv[:, None]
    var = tl.sum(r * r + count * d * d, axis=1) / total
    return mean, inv / tl.sqrt(var + eps * inv * inv)


@triton.jit
def _row_sums(ptr, rows, row_ok, B, n_tiles, NT: tl.constexpr):
    """Row sums of both values of a [n_tiles, 2, B] buffer, each in one fixed order."""
    a, b, _ = _load_pairs(ptr, rows, row_ok, B, n_tiles, NT)
    return tl.sum(a, axis=1), tl.sum(b, axis=1)


@triton.jit
def _first_tile(rows, row_ok, pid):
    """row_ok where ``pid`` is 0 (the program that writes per-row values), as a block mask: the
    interpreter cannot combine a scalar condition with a block."""
    return row_ok & ((rows * 0 + pid) == 0)


# ---------------------------------------------------------------------------------------------------
# Kernels: the passes of a forward step, per tile


@triton.jit
def _ln_gate(yp, yhp, gp, sp, m, col_ok, keep, mean, rstd, ACC: tl.constexpr):
    """gamma * yh + shift at one gate's columns of the tile; yh = (y - mean) * rstd is saved at yhp."""
    yh = (_ld(yp, m, ACC) - mean[:, None]) * rstd[:, None]
    tl.store(yhp, tl.where(keep, yh, 0.0), mask=m)
    return _ld(gp, col_ok, ACC)[None, :] * yh + _ld(sp, col_ok, ACC)[None, :]


@triton.jit
def _ln_grad_sums(d0, d1, d2, d3, gam_ptr, wp, cols, col_ok, m, H, ACC: tl.constexpr, LSTM: tl.constexpr):
    """Row sums of g = d * gamma and of g * yh over this tile's gate columns, for the LN backward.

    d0..d3 are the gradients of LN(W_hh h)'s outputs at the gate columns (d3 only for the LSTM); wp points
    at the tile in the workspace rows, where yh starts at 4H.
    """
    g0 = d0 * _ld(gam_ptr + cols, col_ok, ACC)[None, :]
    g1 = d1 * _ld(gam_ptr + H + cols, col_ok, ACC)[None, :]
    g2 = d2 * _ld(gam_ptr + 2 * H + cols, col_ok, ACC)[None, :]
    g = g0 + g1 + g2
    gy = g0 * _ld(wp + 4 * H, m, ACC) + g1 * _ld(wp + 5 * H, m, ACC) + g2 * _ld(wp + 6 * H, m, ACC)
    if LSTM:
        g3 = d3 * _ld(gam_ptr + 3 * H + cols, col_ok, ACC)[None, :]
        g = g + g3
        gy = gy + g3 * _ld(wp + 7 * H, m, ACC)
    return tl.sum(g, axis=1), tl.sum(gy, axis=1)


@triton.jit
def _ln_y_tile(acc, y_ptr, ystat_ptr, rows, row_out, cols, m, tile, B, N, BLOCK_N: tl.constexpr):
    """Stores a tile of y = h_prev W_hh^T (where m holds) and its rows' (mean, sqrt(M2)) (rows of row_out)."""
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc, mask=m)
    mean, root = _tile_stats(acc, m, tl.minimum(N - tile * BLOCK_N, BLOCK_N))
    _store_pair(ystat_ptr, tile, B, rows, row_out, mean, root)


@triton.jit
def _ln_gates_tile(x_ptr, x_base, st_ptr, cs_ptr, in_base, out_base, ws_ptr, ws_base, y_ptr, gam_ptr, sh_ptr,
                   rows, cols, col_ok, m, keep, mean, rstd, H, LSTM: tl.constexpr, ACC: tl.constexpr):
    """One tile of hidden units of a forward step, after y's row statistics: LN(y) per gate (yh saved
    in the workspace), the gates (saved), and the new cell (LSTM) or state (GRU), stored (carried past
    a row's length) and returned."""
    N, WS, _ = _widths(H, LSTM)
    hoff = rows[:, None] * H + cols[None, :]
    xp = x_ptr + x_base + rows[:, None] * N + cols[None, :]
    yp = y_ptr + rows[:, None] * N + cols[None, :]
    wp = ws_ptr + ws_base + rows[:, None] * WS + cols[None, :]
    ln0 = _ln_gate(yp, wp + 4 * H, gam_ptr + cols, sh_ptr + cols, m, col_ok, keep, mean, rstd, ACC)
    ln1 = _ln_gate(yp + H, wp + 5 * H, gam_ptr + H + cols, sh_ptr + H + cols, m, col_ok, keep, mean, rstd,
                   ACC)
    ln2 = _ln_gate(yp + 2 * H, wp + 6 * H, gam_ptr + 2 * H + cols, sh_ptr + 2 * H + cols, m, col_ok, keep,
                   mean, rstd, ACC)
    if LSTM:
        ln3 = _ln_gate(yp + 3 * H, wp + 7 * H, gam_ptr + 3 * H + cols, sh_ptr + 3 * H + cols, m, col_ok, keep,
                       mean, rstd, ACC)
        c_prev = _ld(cs_ptr + in_base + hoff, m, ACC)
        si, sf, tg, so, new = _lstm_state(_ld(xp, m, ACC) + ln0, _ld(xp + H, m, ACC) + ln1,
                                          _ld(xp + 2 * H, m, ACC) + ln2, _ld(xp + 3 * H, m, ACC) + ln3,
                                          c_prev)
        tl.store(wp, tl.where(keep, si, 0.0), mask=m)
        tl.store(wp + H, tl.where(keep, sf, 0.0), mask=m)
        tl.store(wp + 2 * H, tl.where(keep, tg, 0.0), mask=m)
        tl.store(wp + 3 * H, tl.where(keep, so, 0.0), mask=m)
        tl.store(cs_ptr + out_base + hoff, tl.where(keep, new, c_prev), mask=m)
    else:
        h_prev = _ld(st_ptr + in_base + hoff, m, ACC)
        r, z, n, new = _gru_state(_ld(xp, m, ACC) + ln0, _ld(xp + H, m, ACC) + ln1, _ld(xp + 2 * H, m, ACC),
                                  ln2, h_prev)
        tl.store(wp, tl.where(keep, r, 0.0), mask=m)
        tl.store(wp + H, tl.where(keep, z, 0.0), mask=m)
        tl.store(wp + 2 * H, tl.where(keep, n, 0.0), mask=m)
        tl.store(wp + 3 * H, tl.where(keep, ln2, 0.0), mask=m)
        tl.store(st_ptr + out_base + hoff, tl.where(keep, new, h_prev), mask=m)
    return new


@triton.jit
def _ln_cell_tile(st_ptr, cs_ptr, in_base, out_base, ws_ptr, ws_base, gc_ptr, bc_ptr, rows, cols, col_ok, m,
                  keep, mean_c, rstd_c, H, ACC: tl.constexpr):
    """LSTM, one tile of hidden units after c's row statistics: h = so * tanh(LN(c)) stored (carried past
    a row's length); the normalized c and tanh(LN(c)) saved in the workspace."""
    WS = 10 * H + 2
    hoff = rows[:, None] * H + cols[None, :]
    wp = ws_ptr + ws_base + rows[:, None] * WS + cols[None, :]
    ch = (_ld(cs_ptr + out_base + hoff, m, ACC) - mean_c[:, None]) * rstd_c[:, None]
    t = _tanh(_ld(gc_ptr + cols, col_ok, ACC)[None, :] * ch + _ld(bc_ptr + cols, col_ok, ACC)[None, :])
    h = _ld(wp + 3 * H, m, ACC) * t
    tl.store(wp + 8 * H, tl.where(keep, ch, 0.0), mask=m)
    tl.store(wp + 9 * H, tl.where(keep, t, 0.0), mask=m)
    h_prev = _ld(st_ptr + in_base + hoff, m, ACC)
    tl.store(st_ptr + out_base + hoff, tl.where(keep, h, h_prev), mask=m)


# ---------------------------------------------------------------------------------------------------
# Kernels: the passes of a backward step, per tile


@triton.jit
def _ln_bwd_state_tile(rec, gs_ptr, st_ptr, ws_ptr, gam_ptr, gc_ptr, gx_ptr, dl_ptr, dh_ptr, ch_ptr, in_base,
                       out_base, n_base, l_base, ws_base, rd, wr, rows, cols, col_ok, m, keep, clip, H,
                       LSTM: tl.constexpr, HAS_CLIP: tl.constexpr, ACC: tl.constexpr):
    """One tile of hidden units of a backward step, from rec = dY_next W_hh there: dh = dloss/dh and the
    carry of h to the previous step (ping-pong slot wr; rd holds the next step's). LSTM: the gradient dl
    of LN(c)'s output, stored with dh; GRU: the gate gradients (gx, and dl of LN(W_hh h) + b_hh).

    Returns dh's squared row norms and the tile's row sums for the next LN backward: LSTM (sum g,
    sum g * ch) with g = dl * gamma_c; GRU (sum g, sum g * yh) with g = dl * gamma.
    """
    N, WS, _ = _widths(H, LSTM)
    hoff = rows[:, None] * H + cols[None, :]
    dh = _ld(gs_ptr + out_base + hoff, m, ACC) + _ld(ch_ptr + rd + hoff, m, ACC) + rec
    sq = _row_sq(dh, keep)
    wp = ws_ptr + ws_base + rows[:, None] * WS + cols[None, :]
    if LSTM:
        t = _ld(wp + 9 * H, m, ACC)
        dlc = tl.where(keep, dh * _ld(wp + 3 * H, m, ACC) * (1.0 - t * t), 0.0)
        tl.store(dl_ptr + l_base + hoff, dlc, mask=m)
        tl.store(dh_ptr + hoff, dh, mask=m)
        g = dlc * _ld(gc_ptr + cols, col_ok, ACC)[None, :]
        s1 = tl.sum(g, axis=1)
        s2 = tl.sum(g * _ld(wp + 8 * H, m, ACC), axis=1)
        tl.store(ch_ptr + wr + hoff, tl.where(keep, 0.0, dh), mask=m)
    else:
        tile = rows[:, None] * N + cols[None, :]
        d_r, d_z, d_n, r, carry = _gru_step_grads(dh, wp, _ld(st_ptr + in_base + hoff, m, ACC),
                                                  gx_ptr + n_base + tile, dl_ptr + l_base + tile, H, m, keep,
                                                  clip, HAS_CLIP, ACC)
        s1, s2 = _ln_grad_sums(d_r, d_z, d_n * r, d_n, gam_ptr, wp, cols, col_ok, m, H, ACC, False)
        tl.store(ch_ptr + wr + hoff, carry, mask=m)
    return sq, s1, s2


@triton.jit
def _ln_bwd_cell_tile(gcs_ptr, cs_ptr, ws_ptr, gam_ptr, gc_ptr, gx_ptr, dl_ptr, dh_ptr, cc_ptr, in_base,
                      out_base, n_base, l_base, ws_base, rd, wr, rows, cols, col_ok, m, keep, mg, mgc, rstd_c,
                      clip, H, HAS_CLIP: tl.constexpr, ACC: tl.constexpr):
    """LSTM, one tile of hidden units after the cell LN's row means (mg of g = dl * gamma_c, mgc of g * ch):
    dc, the gate gradients (gx) and the carry of c. Returns dc's squared row norms and the tile's row sums
    (sum g, sum g * yh) for LN(W_hh h)'s backward, g = gx * gamma."""
    N = 4 * H
    WS = 10 * H + 2
    hoff = rows[:, None] * H + cols[None, :]
    wp = ws_ptr + ws_base + rows[:, None] * WS + cols[None, :]
    dh = _ld(dh_ptr + hoff, m, ACC)
    ch = _ld(wp + 8 * H, m, ACC)
    dlc = _ld(dl_ptr + l_base + hoff, m, ACC)
    gain = _ld(gc_ptr + cols, col_ok, ACC)[None, :]
    from_h = rstd_c[:, None] * (dlc * gain - mg[:, None] - ch * mgc[:, None])
    carried = _ld(gcs_ptr + out_base + hoff, m, ACC) + _ld(cc_ptr + rd + hoff, m, ACC)
    dc = carried + tl.where(keep, from_h, 0.0)
    sq = _row_sq(dc, keep)
    sf = _ld(wp + H, m, ACC)
    d_i, d_f, d_g, d_o = _lstm_gate_grads(dc, dh, _ld(wp, m, ACC), sf, _ld(wp + 2 * H, m, ACC),
                                          _ld(wp + 3 * H, m, ACC), _ld(cs_ptr + in_base + hoff, m, ACC),
                                          _ld(wp + 9 * H, m, ACC), keep, clip, HAS_CLIP)
    gp = gx_ptr + n_base + rows[:, None] * N + cols[None, :]
    tl.store(gp, d_i, mask=m)
    tl.store(gp + H, d_f, mask=m)
    tl.store(gp + 2 * H, d_g, mask=m)
    tl.store(gp + 3 * H, d_o, mask=m)
    tl.store(cc_ptr + wr + hoff, tl.where(keep, dc * sf, dc), mask=m)
    s1, s2 = _ln_grad_sums(d_i, d_f, d_g, d_o, gam_ptr, wp, cols, col_ok, m, H, ACC, True)
    return sq, s1, s2


@triton.jit
def _ln_bwd_dy_tile(src_ptr, ws_ptr, gam_ptr, dy_ptr, n_base, ws_base, rows, cols, col_ok, m, keep, mean_g,
                    mean_gy, rstd, H, LSTM: tl.constexpr, ACC: tl.constexpr):
    """One tile of gate columns of dY = d(W_hh h_prev): LN(W_hh h)'s backward from the gradient of its
    output (src: gx for the LSTM, dl for the GRU) and the row means of g = src * gamma and of g * yh."""
    N, WS, _ = _widths(H, LSTM)
    noff = rows[:, None] * N + cols[None, :]
    g = _ld(src_ptr + n_base + noff, m, ACC) * _ld(gam_ptr + cols, col_ok, ACC)[None, :]
    yh = _ld(ws_ptr + ws_base + rows[:, None] * WS + 4 * H + cols[None, :], m, ACC)
    dy = rstd[:, None] * (g - mean_g[:, None] - yh * mean_gy[:, None])
    tl.store(dy_ptr + n_base + noff, tl.where(keep, dy, 0.0), mask=m)


# ---------------------------------------------------------------------------------------------------
# Kernels: the persistent loop


@triton.jit
def _ln_forward_kernel(
    x_ptr, st_ptr, cs_ptr, ws_ptr, y_ptr, ystat_ptr, cstat_ptr, wt_ptr, gam_ptr, sh_ptr, gc_ptr, bc_ptr,
    len_ptr, eps_ptr, T, B, H,
    LSTM: tl.constexpr, REVERSE: tl.constexpr, HAS_LEN: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr, NT_Y: tl.constexpr, NT_C: tl.constexpr,
):
    """All T steps for one block of batch rows.

    x [T, B, N]; st, cs [T+1, B, H]; ws [T, B, WS]; y [B, N] scratch; ystat [N / BLOCK_N, 2, B] and cstat
    [H / BLOCK_J, 2, B] per-tile (mean, sqrt(M2)) scratch; wt = W_hh^T [H, N]; gam, sh [N] (sh includes the
    GRU's b_hh); gc, bc [H]; len [B]; eps [1] (a tensor: a float argument would be float32 on a GPU).
    """
    pid = tl.program_id(0)
    eps = tl.load(eps_ptr).to(ACC)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    N, WS, R_OFF = _widths(H, LSTM)
    BH = tl.cast(B, tl.int64) * H
    lens = _row_lengths(len_ptr, rows, row_ok, HAS_LEN)
    n_ytiles = tl.cdiv(N, BLOCK_N)
    n_ctiles = tl.cdiv(H, BLOCK_J)
    for s in range(T):
        pos, _, in_base, out_base, valid = _step(s, T, BH, row_ok, lens, REVERSE, HAS_LEN)
        x_base = tl.cast(pos, tl.int64) * B * N
        ws_base = tl.cast(pos, tl.int64) * B * WS
        for yt in range(n_ytiles):
            cols = yt * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            acc = _rec_dot(st_ptr + in_base, wt_ptr, rows, row_ok, cols, col_ok, 0, H, H, N,
                           tl.zeros([BLOCK_B, BLOCK_N], dtype=ACC), DOT, PRECISION, BLOCK_K)
            _ln_y_tile(acc, y_ptr, ystat_ptr, rows, row_ok, cols, row_ok[:, None] & col_ok[None, :], yt, B, N,
                       BLOCK_N)
        tl.debug_barrier()
        mean, rstd = _row_moments(ystat_ptr, rows, row_ok, B, N, n_ytiles, eps, BLOCK_N, NT_Y)
        for ct in range(n_ctiles):
            cols = ct * BLOCK_J + tl.arange(0, BLOCK_J)
            col_ok = cols < H
            m = row_ok[:, None] & col_ok[None, :]
            new = _ln_gates_tile(x_ptr, x_base, st_ptr, cs_ptr, in_base, out_base, ws_ptr, ws_base, y_ptr,
                                 gam_ptr, sh_ptr, rows, cols, col_ok, m, valid[:, None] & col_ok[None, :],
                                 mean, rstd, H, LSTM, ACC)
            if LSTM:
                mean_t, root_t = _tile_stats(new, m, tl.minimum(H - ct * BLOCK_J, BLOCK_J))
                _store_pair(cstat_ptr, ct, B, rows, row_ok, mean_t, root_t)
        row_ws = ws_ptr + ws_base + rows * WS + R_OFF
        tl.store(row_ws, tl.where(valid, rstd, 0.0), mask=row_ok)
        if LSTM:
            tl.debug_barrier()
            mean_c, rstd_c = _row_moments(cstat_ptr, rows, row_ok, B, H, n_ctiles, eps, BLOCK_J, NT_C)
            for ct in range(n_ctiles):
                cols = ct * BLOCK_J + tl.arange(0, BLOCK_J)
                col_ok = cols < H
                _ln_cell_tile(st_ptr, cs_ptr, in_base, out_base, ws_ptr, ws_base, gc_ptr, bc_ptr, rows, cols,
                              col_ok, row_ok[:, None] & col_ok[None, :], valid[:, None] & col_ok[None, :],
                              mean_c, rstd_c, H, ACC)
            tl.store(row_ws + 1, tl.where(valid, rstd_c, 0.0), mask=row_ok)
        # The next step reads the states this step wrote, from every tile of the block.
        tl.debug_barrier()


@triton.jit
def _ln_backward_kernel(
    gs_ptr, gcs_ptr, st_ptr, cs_ptr, ws_ptr, w_ptr, gam_ptr, gc_ptr, len_ptr,
    gx_ptr, dl_ptr, dy_ptr, dh_ptr, ch_ptr, cc_ptr, gsq_h_ptr, gsq_c_ptr, clip_ptr,
    T, B, H,
    LSTM: tl.constexpr, REVERSE: tl.constexpr, HAS_LEN: tl.constexpr, HAS_CLIP: tl.constexpr,
    TRACK: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """All T steps of the backward, in reverse processing order, for one block of batch rows.

    gs, gcs, st, cs [T+1, B, H]; ws [T, B, WS]; w = W_hh [N, H]; gx [T, B, N] (grad_xproj); dl [T, B, N]
    (GRU: gradient of LN(W_hh h) + b_hh) or [T, B, H] (LSTM: of LN(c)'s output); dy [T, B, N] gradient
    of W_hh h_prev; dh [B, H] scratch; ch, cc [2, B, H] ping-pong buffers of the gradients carried to the
    previous state (zeros on entry; step s reads slot (s+1) % 2 and writes slot s % 2, so the final ones
    are in slot 0); gsq_h, gsq_c float64 [1, T, B] squared norms of dh, dc; clip [1].
    """
    pid = tl.program_id(0)
    clip = tl.load(clip_ptr).to(ACC)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    N, WS, R_OFF = _widths(H, LSTM)
    if LSTM:
        DL = H
    else:
        DL = N
    BH = tl.cast(B, tl.int64) * H
    lens = _row_lengths(len_ptr, rows, row_ok, HAS_LEN)
    for i in range(T):
        s = T - 1 - i
        pos, pos_next, in_base, out_base, valid = _step(s, T, BH, row_ok, lens, REVERSE, HAS_LEN)
        # The last processed step has no successor: its recurrent term is empty.
        k_end = tl.minimum((T - 1 - s) * N, N)
        next_base = tl.cast(pos_next, tl.int64) * B * N
        n_base = tl.cast(pos, tl.int64) * B * N
        l_base = tl.cast(pos, tl.int64) * B * DL
        ws_base = tl.cast(pos, tl.int64) * B * WS
        row_ws = ws_ptr + ws_base + rows * WS + R_OFF
        rd = tl.cast((s + 1) % 2, tl.int64) * BH
        wr = tl.cast(s % 2, tl.int64) * BH
        sq_h = tl.zeros([BLOCK_B], dtype=tl.float64)
        sq_c = tl.zeros([BLOCK_B], dtype=tl.float64)
        s1 = tl.zeros([BLOCK_B], dtype=ACC)
        s2 = tl.zeros([BLOCK_B], dtype=ACC)
        for j0 in range(0, H, BLOCK_J):
            cols = j0 + tl.arange(0, BLOCK_J)
            col_ok = cols < H
            rec = _rec_dot(dy_ptr + next_base, w_ptr, rows, row_ok, cols, col_ok, 0, k_end, N, H,
                           tl.zeros([BLOCK_B, BLOCK_J], dtype=ACC), DOT, PRECISION, BLOCK_K)
            t_sq, t1, t2 = _ln_bwd_state_tile(rec, gs_ptr, st_ptr, ws_ptr, gam_ptr, gc_ptr, gx_ptr, dl_ptr,
                                              dh_ptr, ch_ptr, in_base, out_base, n_base, l_base, ws_base, rd,
                                              wr, rows, cols, col_ok, row_ok[:, None] & col_ok[None, :],
                                              valid[:, None] & col_ok[None, :], clip, H, LSTM, HAS_CLIP, ACC)
            sq_h += t_sq
            s1 += t1
            s2 += t2
        if LSTM:
            # dc = dc_carried + grad_cell_states + the cell LN backward of dl; then the gate gradients.
            tl.debug_barrier()
            rstd_c = _ld(row_ws + 1, row_ok, ACC)
            mg = s1 / H
            mgc = s2 / H
            s1 = tl.zeros([BLOCK_B], dtype=ACC)
            s2 = tl.zeros([BLOCK_B], dtype=ACC)
            for j0 in range(0, H, BLOCK_J):
                cols = j0 + tl.arange(0, BLOCK_J)
                col_ok = cols < H
                t_sq, t1, t2 = _ln_bwd_cell_tile(gcs_ptr, cs_ptr, ws_ptr, gam_ptr, gc_ptr, gx_ptr, dl_ptr,
                                                 dh_ptr, cc_ptr, in_base, out_base, n_base, l_base, ws_base,
                                                 rd, wr, rows, cols, col_ok,
                                                 row_ok[:, None] & col_ok[None, :],
                                                 valid[:, None] & col_ok[None, :], mg, mgc, rstd_c, clip, H,
                                                 HAS_CLIP, ACC)
                sq_c += t_sq
                s1 += t1
                s2 += t2
        # The LN backward into dy = d(W_hh h_prev), from the gradients this step stored.
        tl.debug_barrier()
        rstd = _ld(row_ws, row_ok, ACC)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            if LSTM:
                src_ptr = gx_ptr
            else:
                src_ptr = dl_ptr
            _ln_bwd_dy_tile(src_ptr, ws_ptr, gam_ptr, dy_ptr, n_base, ws_base, rows, cols, col_ok,
                            row_ok[:, None] & col_ok[None, :], valid[:, None] & col_ok[None, :], s1 / N,
                            s2 / N, rstd, H, LSTM, ACC)
        if TRACK:
            tl.store(gsq_h_ptr + tl.cast(pos, tl.int64) * B + rows, sq_h, mask=row_ok)
            if LSTM:
                tl.store(gsq_c_ptr + tl.cast(pos, tl.int64) * B + rows, sq_c, mask=row_ok)
        # The next step reads dy and the carries this step wrote, from every tile of the block.
        tl.debug_barrier()


# ---------------------------------------------------------------------------------------------------
# Kernels: the step loop (one launch per pass and step; ``s`` the processed step)


@triton.jit
def _step_tile(len_ptr, T, B, H, s, n_cols, REVERSE: tl.constexpr, HAS_LEN: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr):
    """Program (b, j)'s [BLOCK_B, BLOCK_J] tile of a step's [B, n_cols]: (rows, row_ok, cols, col_ok) and
    :func:`_step`'s (pos, pos_next, in_base, out_base, valid) for processed step s."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    cols = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    col_ok = cols < n_cols
    lens = _row_lengths(len_ptr, rows, row_ok, HAS_LEN)
    pos, pos_next, in_base, out_base, valid = _step(s, T, tl.cast(B, tl.int64) * H, row_ok, lens, REVERSE,
                                                    HAS_LEN)
    return rows, row_ok, cols, col_ok, pos, pos_next, in_base, out_base, valid


@triton.jit(do_not_specialize=["s"])
def _ln_fwd_dot_kernel(
    st_ptr, wt_ptr, y_ptr, ystat_ptr, part_ptr, cnt_ptr, T, B, H, s, k_chunk,
    LSTM: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Forward: one [BLOCK_B, BLOCK_N] tile of y = h_prev W_hh^T into y [B, N] and its rows' (mean, sqrt(M2))
    into ystat [tiles, 2, B]. Split K (SPLIT > 1): program (b, n, k) takes rows k * k_chunk .. of W_hh^T,
    partials in part [SPLIT, B, N], arrival counters cnt [tiles]; the last to arrive finishes the tile."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    N, _, _ = _widths(H, LSTM)
    # every row steps: the lengths only decide, in the gates kernel, which rows keep their state
    rows, row_ok, cols, col_ok, _, _, in_base, _, _ = _step_tile(st_ptr, T, B, H, s, N, REVERSE, False,
                                                                 BLOCK_B, BLOCK_N)
    k_begin = pid_k * k_chunk
    acc = _rec_dot(st_ptr + in_base, wt_ptr, rows, row_ok, cols, col_ok, k_begin,
                   tl.minimum(k_begin + k_chunk, H), H, N, tl.zeros([BLOCK_B, BLOCK_N], dtype=ACC), DOT,
                   PRECISION, BLOCK_K)
    m = row_ok[:, None] & col_ok[None, :]
    row_out = row_ok
    if SPLIT > 1:
        acc, last = _split_fixup(acc, part_ptr, cnt_ptr, pid_b * tl.num_programs(1) + pid_n, pid_k,
                                 rows[:, None] * N + cols[None, :], m, tl.cast(B, tl.int64) * N, BLOCK_B,
                                 SPLIT)
        m = m & last[:, None]
        row_out = row_ok & last
    _ln_y_tile(acc, y_ptr, ystat_ptr, rows, row_out, cols, m, pid_n, B, N, BLOCK_N)


@triton.jit(do_not_specialize=["s"])
def _ln_fwd_gates_kernel(
    x_ptr, st_ptr, cs_ptr, ws_ptr, y_ptr, ystat_ptr, cstat_ptr, gam_ptr, sh_ptr, len_ptr, eps_ptr,
    T, B, H, s, n_ytiles,
    LSTM: tl.constexpr, REVERSE: tl.constexpr, HAS_LEN: tl.constexpr, ACC: tl.constexpr, Y_TILE: tl.constexpr,
    NT_Y: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Forward: y's row statistics from ystat (tiles of Y_TILE columns), then :func:`_ln_gates_tile` for one
    [BLOCK_B, BLOCK_J] tile; the LSTM's tile of c leaves its rows' (mean, sqrt(M2)) in cstat [tiles, 2, B]."""
    pid_j = tl.program_id(1)
    eps = tl.load(eps_ptr).to(ACC)
    N, WS, R_OFF = _widths(H, LSTM)
    rows, row_ok, cols, col_ok, pos, _, in_base, out_base, valid = _step_tile(len_ptr, T, B, H, s, H, REVERSE,
                                                                              HAS_LEN, BLOCK_B, BLOCK_J)
    ws_base = tl.cast(pos, tl.int64) * B * WS
    mean, rstd = _row_moments(ystat_ptr, rows, row_ok, B, N, n_ytiles, eps, Y_TILE, NT_Y)
    m = row_ok[:, None] & col_ok[None, :]
    new = _ln_gates_tile(x_ptr, tl.cast(pos, tl.int64) * B * N, st_ptr, cs_ptr, in_base, out_base, ws_ptr,
                         ws_base, y_ptr, gam_ptr, sh_ptr, rows, cols, col_ok, m,
                         valid[:, None] & col_ok[None, :], mean, rstd, H, LSTM, ACC)
    tl.store(ws_ptr + ws_base + rows * WS + R_OFF, tl.where(valid, rstd, 0.0),
             mask=_first_tile(rows, row_ok, pid_j))
    if LSTM:
        mean_t, root_t = _tile_stats(new, m, tl.minimum(H - pid_j * BLOCK_J, BLOCK_J))
        _store_pair(cstat_ptr, pid_j, B, rows, row_ok, mean_t, root_t)


@triton.jit(do_not_specialize=["s"])
def _ln_fwd_cell_kernel(
    st_ptr, cs_ptr, ws_ptr, cstat_ptr, gc_ptr, bc_ptr, len_ptr, eps_ptr, T, B, H, s,
    REVERSE: tl.constexpr, HAS_LEN: tl.constexpr, ACC: tl.constexpr, NT_C: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Forward, LSTM: c's row statistics from cstat (tiles of BLOCK_J columns), then :func:`_ln_cell_tile`
    for one [BLOCK_B, BLOCK_J] tile."""
    pid_j = tl.program_id(1)
    eps = tl.load(eps_ptr).to(ACC)
    _, WS, R_OFF = _widths(H, True)
    rows, row_ok, cols, col_ok, pos, _, in_base, out_base, valid = _step_tile(len_ptr, T, B, H, s, H, REVERSE,
                                                                              HAS_LEN, BLOCK_B, BLOCK_J)
    ws_base = tl.cast(pos, tl.int64) * B * WS
    mean_c, rstd_c = _row_moments(cstat_ptr, rows, row_ok, B, H, tl.cdiv(H, BLOCK_J), eps, BLOCK_J, NT_C)
    _ln_cell_tile(st_ptr, cs_ptr, in_base, out_base, ws_ptr, ws_base, gc_ptr, bc_ptr, rows, cols, col_ok,
                  row_ok[:, None] & col_ok[None, :], valid[:, None] & col_ok[None, :], mean_c, rstd_c, H, ACC)
    tl.store(ws_ptr + ws_base + rows * WS + R_OFF + 1, tl.where(valid, rstd_c, 0.0),
             mask=_first_tile(rows, row_ok, pid_j))


@triton.jit(do_not_specialize=["s"])
def _ln_bwd_dot_kernel(
    gs_ptr, st_ptr, ws_ptr, w_ptr, gam_ptr, gc_ptr, len_ptr, gx_ptr, dl_ptr, dy_ptr, dh_ptr, ch_ptr,
    hstat_ptr, gsq_ptr, part_ptr, cnt_ptr, clip_ptr, T, B, H, s, k_chunk,
    LSTM: tl.constexpr, REVERSE: tl.constexpr, HAS_LEN: tl.constexpr, HAS_CLIP: tl.constexpr,
    TRACK: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward: rec = dY_next W_hh for one [BLOCK_B, BLOCK_J] tile of hidden units (split K as in
    :func:`_ln_fwd_dot_kernel`, partials [SPLIT, B, H]), then :func:`_ln_bwd_state_tile`; the tile's row
    sums go to hstat [tiles, 2, B] and dh's squared norms to gsq [tiles, T, B]."""
    pid_b = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_k = tl.program_id(2)
    clip = tl.load(clip_ptr).to(ACC)
    N, WS, _ = _widths(H, LSTM)
    if LSTM:
        DL = H
    else:
        DL = N
    BH = tl.cast(B, tl.int64) * H
    rows, row_ok, cols, col_ok, pos, pos_next, in_base, out_base, valid = _step_tile(
        len_ptr, T, B, H, s, H, REVERSE, HAS_LEN, BLOCK_B, BLOCK_J)
    # The last processed step has no successor: its recurrent term is empty.
    k_end = tl.minimum((T - 1 - s) * N, N)
    k_begin = pid_k * k_chunk
    rec = _rec_dot(dy_ptr + tl.cast(pos_next, tl.int64) * B * N, w_ptr, rows, row_ok, cols, col_ok, k_begin,
                   tl.minimum(k_end, k_begin + k_chunk), N, H, tl.zeros([BLOCK_B, BLOCK_J], dtype=ACC), DOT,
                   PRECISION, BLOCK_K)
    m = row_ok[:, None] & col_ok[None, :]
    keep = valid[:, None] & col_ok[None, :]
    row_out = row_ok
    if SPLIT > 1:
        rec, last = _split_fixup(rec, part_ptr, cnt_ptr, pid_b * tl.num_programs(1) + pid_j, pid_k,
                                 rows[:, None] * H + cols[None, :], m, BH, BLOCK_B, SPLIT)
        m = m & last[:, None]
        keep = keep & last[:, None]
        row_out = row_ok & last
    sq, s1, s2 = _ln_bwd_state_tile(rec, gs_ptr, st_ptr, ws_ptr, gam_ptr, gc_ptr, gx_ptr, dl_ptr, dh_ptr,
                                    ch_ptr, in_base, out_base, tl.cast(pos, tl.int64) * B * N,
                                    tl.cast(pos, tl.int64) * B * DL, tl.cast(pos, tl.int64) * B * WS,
                                    tl.cast((s + 1) % 2, tl.int64) * BH, tl.cast(s % 2, tl.int64) * BH, rows,
                                    cols, col_ok, m, keep, clip, H, LSTM, HAS_CLIP, ACC)
    _store_pair(hstat_ptr, pid_j, B, rows, row_out, s1, s2)
    if TRACK:
        tl.store(gsq_ptr + (tl.cast(pid_j, tl.int64) * T + pos) * B + rows, sq, mask=row_out)


@triton.jit(do_not_specialize=["s"])
def _ln_bwd_cell_kernel(
    gcs_ptr, cs_ptr, ws_ptr, gam_ptr, gc_ptr, len_ptr, gx_ptr, dl_ptr, dh_ptr, cc_ptr, hstat_ptr, gstat_ptr,
    gsq_ptr, clip_ptr, T, B, H, s, n_htiles,
    REVERSE: tl.constexpr, HAS_LEN: tl.constexpr, HAS_CLIP: tl.constexpr, TRACK: tl.constexpr,
    ACC: tl.constexpr, NT_H: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Backward, LSTM: the cell LN's row sums from hstat [n_htiles, 2, B], then :func:`_ln_bwd_cell_tile`
    for one [BLOCK_B, BLOCK_J] tile; its row sums go to gstat [tiles, 2, B], dc's squared norms to gsq
    [tiles, T, B]."""
    pid_j = tl.program_id(1)
    clip = tl.load(clip_ptr).to(ACC)
    _, WS, R_OFF = _widths(H, True)
    BH = tl.cast(B, tl.int64) * H
    rows, row_ok, cols, col_ok, pos, _, in_base, out_base, valid = _step_tile(len_ptr, T, B, H, s, H, REVERSE,
                                                                              HAS_LEN, BLOCK_B, BLOCK_J)
    ws_base = tl.cast(pos, tl.int64) * B * WS
    s1, s2 = _row_sums(hstat_ptr, rows, row_ok, B, n_htiles, NT_H)
    rstd_c = _ld(ws_ptr + ws_base + rows * WS + R_OFF + 1, row_ok, ACC)
    sq, t1, t2 = _ln_bwd_cell_tile(gcs_ptr, cs_ptr, ws_ptr, gam_ptr, gc_ptr, gx_ptr, dl_ptr, dh_ptr, cc_ptr,
                                   in_base, out_base, tl.cast(pos, tl.int64) * B * 4 * H,
                                   tl.cast(pos, tl.int64) * B * H, ws_base,
                                   tl.cast((s + 1) % 2, tl.int64) * BH, tl.cast(s % 2, tl.int64) * BH, rows,
                                   cols, col_ok, row_ok[:, None] & col_ok[None, :],
                                   valid[:, None] & col_ok[None, :], s1 / H, s2 / H, rstd_c, clip, H,
                                   HAS_CLIP, ACC)
    _store_pair(gstat_ptr, pid_j, B, rows, row_ok, t1, t2)
    if TRACK:
        tl.store(gsq_ptr + (tl.cast(pid_j, tl.int64) * T + pos) * B + rows, sq, mask=row_ok)


@triton.jit(do_not_specialize=["s"])
def _ln_bwd_dy_kernel(
    ws_ptr, gam_ptr, len_ptr, src_ptr, dy_ptr, gstat_ptr, T, B, H, s, n_gtiles,
    LSTM: tl.constexpr, REVERSE: tl.constexpr, HAS_LEN: tl.constexpr, ACC: tl.constexpr, NT_G: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward: the row sums of LN(W_hh h)'s backward from gstat [n_gtiles, 2, B], then
    :func:`_ln_bwd_dy_tile` for one [BLOCK_B, BLOCK_N] tile of gate columns (src: gx for the LSTM, dl for
    the GRU)."""
    N, WS, R_OFF = _widths(H, LSTM)
    rows, row_ok, cols, col_ok, pos, _, _, _, valid = _step_tile(len_ptr, T, B, H, s, N, REVERSE, HAS_LEN,
                                                                 BLOCK_B, BLOCK_N)
    ws_base = tl.cast(pos, tl.int64) * B * WS
    s1, s2 = _row_sums(gstat_ptr, rows, row_ok, B, n_gtiles, NT_G)
    rstd = _ld(ws_ptr + ws_base + rows * WS + R_OFF, row_ok, ACC)
    _ln_bwd_dy_tile(src_ptr, ws_ptr, gam_ptr, dy_ptr, tl.cast(pos, tl.int64) * B * N, ws_base, rows, cols,
                    col_ok, row_ok[:, None] & col_ok[None, :], valid[:, None] & col_ok[None, :], s1 / N,
                    s2 / N, rstd, H, LSTM, ACC)


# ---------------------------------------------------------------------------------------------------
# Kernels: the Jacobian norms (after the forward)


@triton.jit
def _quad(w0, w1, w2, w3, gram_ptr, cols, col_ok, H, G: tl.constexpr):
    """w^T G_j w for the per-unit Gram matrices gram [G, G, H] (w3 unused when G = 3)."""
    base = gram_ptr + cols
    q = (w0 * w0 * tl.load(base, mask=col_ok, other=0.0)[None, :]
         + w1 * w1 * tl.load(base + (G + 1) * H, mask=col_ok, other=0.0)[None, :]
         + w2 * w2 * tl.load(base + 2 * (G + 1) * H, mask=col_ok, other=0.0)[None, :]
         + 2.0 * (w0 * w1 * tl.load(base + H, mask=col_ok, other=0.0)[None, :]
                  + w0 * w2 * tl.load(base + 2 * H, mask=col_ok, other=0.0)[None, :]
                  + w1 * w2 * tl.load(base + (G + 2) * H, mask=col_ok, other=0.0)[None, :]))
    if G == 4:
        q += (w3 * w3 * tl.load(base + 15 * H, mask=col_ok, other=0.0)[None, :]
              + 2.0 * (w0 * w3 * tl.load(base + 3 * H, mask=col_ok, other=0.0)[None, :]
                       + w1 * w3 * tl.load(base + 7 * H, mask=col_ok, other=0.0)[None, :]
                       + w2 * w3 * tl.load(base + 11 * H, mask=col_ok, other=0.0)[None, :]))
    return q


@triton.jit
def _ln_jacobian_kernel(
    ws_ptr, hp_ptr, cp_ptr, gam_ptr, gc_ptr, v_ptr, q_ptr, u_ptr, wu_ptr, gram_ptr, diag_ptr, len_ptr,
    jac_ptr, R, B, H, t0,
    LSTM: tl.constexpr, HAS_LEN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Squared Frobenius norms of the step Jacobians of R = (positions t0..) x B rows, in float64.

    ws [R, WS], hp / cp [R, H] (h_prev for the GRU, c_prev for the LSTM), v [K, R, H] = Z W, q [K, R, N]
    = V W^T, u [H], wu [N], gram [G, G, H], diag [G, H] (GRU), jac [R] float64. Row j of the step
    Jacobian is sum_a wt_a D_(aH+j) plus dense vectors, D_k = gamma_k rstd (W_k - u - yh_k v); see
    csrc/cpu/recurrent_ln_kernels.h.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    valid = row_ok
    if HAS_LEN:
        lens = tl.load(len_ptr + rows % B, mask=row_ok, other=0)
        valid = valid & (t0 + rows // B < lens)
    N, WS, R_OFF = _widths(H, LSTM)
    rows64 = tl.cast(rows, tl.int64)
    RH = tl.cast(R, tl.int64) * H
    RN = tl.cast(R, tl.int64) * N
    rstd = tl.load(ws_ptr + rows64 * WS + R_OFF, mask=row_ok, other=0.0).to(tl.float64)[:, None]
    # Gram entries of the dense vectors x = (u, v, m1, m2) per row.
    x_uu = tl.zeros([BLOCK_R], dtype=tl.float64)
    x_uv = tl.zeros([BLOCK_R], dtype=tl.float64)
    x_vv = tl.zeros([BLOCK_R], dtype=tl.float64)
    x_u1 = tl.zeros([BLOCK_R], dtype=tl.float64)
    x_u2 = tl.zeros([BLOCK_R], dtype=tl.float64)
    x_v1 = tl.zeros([BLOCK_R], dtype=tl.float64)
    x_v2 = tl.zeros([BLOCK_R], dtype=tl.float64)
    x_11 = tl.zeros([BLOCK_R], dtype=tl.float64)
    x_12 = tl.zeros([BLOCK_R], dtype=tl.float64)
    x_22 = tl.zeros([BLOCK_R], dtype=tl.float64)
    s1 = tl.zeros([BLOCK_R], dtype=tl.float64)
    s2 = tl.zeros([BLOCK_R], dtype=tl.float64)
    s12 = tl.zeros([BLOCK_R], dtype=tl.float64)
    for j0 in range(0, H, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_ok = cols < H
        m = row_ok[:, None] & col_ok[None, :]
        hoff = rows64[:, None] * H + cols[None, :]
        u = tl.load(u_ptr + cols, mask=col_ok, other=0.0)[None, :]
        v = tl.load(v_ptr + hoff, mask=m, other=0.0)
        x_uu += tl.sum(tl.broadcast_to(u * u, [BLOCK_R, BLOCK_J]), axis=1)
        x_uv += tl.sum(u * v, axis=1)
        x_vv += tl.sum(v * v, axis=1)
        if LSTM:
            m1 = tl.load(v_ptr + RH + hoff, mask=m, other=0.0)
            m2 = tl.load(v_ptr + 2 * RH + hoff, mask=m, other=0.0)
            x_u1 += tl.sum(u * m1, axis=1)
            x_u2 += tl.sum(u * m2, axis=1)
            x_v1 += tl.sum(v * m1, axis=1)
            x_v2 += tl.sum(v * m2, axis=1)
            x_11 += tl.sum(m1 * m1, axis=1)
            x_12 += tl.sum(m1 * m2, axis=1)
            x_22 += tl.sum(m2 * m2, axis=1)
            wp = ws_ptr + rows64[:, None] * WS + cols[None, :]
            sf = tl.load(wp + H, mask=m, other=0.0).to(tl.float64)
            ch = tl.load(wp + 8 * H, mask=m, other=0.0).to(tl.float64)
            s1 += tl.sum(sf * sf, axis=1)
            s2 += tl.sum(ch * ch * sf * sf, axis=1)
            s12 += tl.sum(ch * sf * sf, axis=1)
    uu = x_uu[:, None]
    x_uv = x_uv[:, None]
    x_vv = x_vv[:, None]
    x_u1 = x_u1[:, None]
    x_u2 = x_u2[:, None]
    x_v1 = x_v1[:, None]
    x_v2 = x_v2[:, None]
    x_11 = x_11[:, None]
    x_12 = x_12[:, None]
    x_22 = x_22[:, None]
    s1 = s1[:, None]
    s2 = s2[:, None]
    s12 = s12[:, None]
    acc = tl.zeros([BLOCK_R], dtype=tl.float64)
    for j0 in range(0, H, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_ok = cols < H
        m = row_ok[:, None] & col_ok[None, :]
        hoff = rows64[:, None] * H + cols[None, :]
        noff = rows64[:, None] * N + cols[None, :]
        wp = ws_ptr + rows64[:, None] * WS + cols[None, :]
        sc0 = tl.load(gam_ptr + cols, mask=col_ok, other=0.0).to(tl.float64)[None, :] * rstd
        sc1 = tl.load(gam_ptr + H + cols, mask=col_ok, other=0.0).to(tl.float64)[None, :] * rstd
        sc2 = tl.load(gam_ptr + 2 * H + cols, mask=col_ok, other=0.0).to(tl.float64)[None, :] * rstd
        y0 = tl.load(wp + 4 * H, mask=m, other=0.0).to(tl.float64)
        y1 = tl.load(wp + 5 * H, mask=m, other=0.0).to(tl.float64)
        y2 = tl.load(wp + 6 * H, mask=m, other=0.0).to(tl.float64)
        # <W_k, x> at the unit's gate rows: u's from wu, v's (and m1's, m2's) from q.
        wu0 = tl.load(wu_ptr + cols, mask=col_ok, other=0.0)[None, :]
        wu1 = tl.load(wu_ptr + H + cols, mask=col_ok, other=0.0)[None, :]
        wu2 = tl.load(wu_ptr + 2 * H + cols, mask=col_ok, other=0.0)[None, :]
        wv0 = tl.load(q_ptr + noff, mask=m, other=0.0)
        wv1 = tl.load(q_ptr + noff + H, mask=m, other=0.0)
        wv2 = tl.load(q_ptr + noff + 2 * H, mask=m, other=0.0)
        if LSTM:
            sc3 = tl.load(gam_ptr + 3 * H + cols, mask=col_ok, other=0.0).to(tl.float64)[None, :] * rstd
            y3 = tl.load(wp + 7 * H, mask=m, other=0.0).to(tl.float64)
            wu3 = tl.load(wu_ptr + 3 * H + cols, mask=col_ok, other=0.0)[None, :]
            wv3 = tl.load(q_ptr + noff + 3 * H, mask=m, other=0.0)
            w10 = tl.load(q_ptr + RN + noff, mask=m, other=0.0)
            w11 = tl.load(q_ptr + RN + noff + H, mask=m, other=0.0)
            w12 = tl.load(q_ptr + RN + noff + 2 * H, mask=m, other=0.0)
            w13 = tl.load(q_ptr + RN + noff + 3 * H, mask=m, other=0.0)
            w20 = tl.load(q_ptr + 2 * RN + noff, mask=m, other=0.0)
            w21 = tl.load(q_ptr + 2 * RN + noff + H, mask=m, other=0.0)
            w22 = tl.load(q_ptr + 2 * RN + noff + 2 * H, mask=m, other=0.0)
            w23 = tl.load(q_ptr + 2 * RN + noff + 3 * H, mask=m, other=0.0)
            si = tl.load(wp, mask=m, other=0.0).to(tl.float64)
            sf = tl.load(wp + H, mask=m, other=0.0).to(tl.float64)
            tg = tl.load(wp + 2 * H, mask=m, other=0.0).to(tl.float64)
            so = tl.load(wp + 3 * H, mask=m, other=0.0).to(tl.float64)
            ch = tl.load(wp + 8 * H, mask=m, other=0.0).to(tl.float64)
            t = tl.load(wp + 9 * H, mask=m, other=0.0).to(tl.float64)
            cp = tl.load(cp_ptr + hoff, mask=m, other=0.0).to(tl.float64)
            rstd_c = tl.load(ws_ptr + rows64 * WS + 10 * H + 1, mask=row_ok, other=0.0).to(tl.float64)
            gcj = tl.load(gc_ptr + cols, mask=col_ok, other=0.0).to(tl.float64)
            kappa = so * (1.0 - t * t) * gcj[None, :] * rstd_c[:, None]
            # dc_j/dh_prev (alpha on the rows i, f, g) and dh_j/dh_prev (kappa * alpha, beta_o on the row o).
            a0, a1, a2 = _lstm_alpha(si, sf, tg, cp)
            a0 = a0 * sc0
            a1 = a1 * sc1
            a2 = a2 * sc2
            b0 = kappa * a0
            b1 = kappa * a1
            b2 = kappa * a2
            b3 = t * so * (1.0 - so) * sc3
            zero = a0 * 0.0
            for r_ in tl.static_range(2):
                if r_ == 0:
                    w0, w1, w2, w3 = a0, a1, a2, zero
                    l2 = zero
                    l3 = zero
                else:
                    w0, w1, w2, w3 = b0, b1, b2, b3
                    l2 = -kappa / H
                    l3 = -kappa * ch / H
                l0 = -(w0 + w1 + w2 + w3)
                l1 = -(w0 * y0 + w1 * y1 + w2 * y2 + w3 * y3)
                c0 = w0 * wu0 + w1 * wu1 + w2 * wu2 + w3 * wu3
                c1 = w0 * wv0 + w1 * wv1 + w2 * wv2 + w3 * wv3
                c2 = w0 * w10 + w1 * w11 + w2 * w12 + w3 * w13
                c3 = w0 * w20 + w1 * w21 + w2 * w22 + w3 * w23
                lin = l0 * c0 + l1 * c1 + l2 * c2 + l3 * c3
                dd = (l0 * l0 * uu + l1 * l1 * x_vv + l2 * l2 * x_11 + l3 * l3 * x_22
                      + 2.0 * (l0 * l1 * x_uv + l0 * l2 * x_u1 + l0 * l3 * x_u2 + l1 * l2 * x_v1
                               + l1 * l3 * x_v2 + l2 * l3 * x_12))
                term = _quad(w0, w1, w2, w3, gram_ptr, cols, col_ok, H, 4) + 2.0 * lin + dd
                acc += tl.sum(tl.where(m, term, 0.0), axis=1)
            # c_prev columns: dc/dc_prev = diag(sf);
            # dh/dc_prev = diag(kappa) (I - 11^T/H - ch ch^T/H) diag(sf).
            cterm = sf * sf + kappa * kappa * (sf * sf + (s1 + ch * ch * s2 + 2.0 * ch * s12) / (H * H)
                                               - 2.0 * sf * sf * (1.0 + ch * ch) / H)
            acc += tl.sum(tl.where(m, cterm, 0.0), axis=1)
        else:
            r = tl.load(wp, mask=m, other=0.0).to(tl.float64)
            z = tl.load(wp + H, mask=m, other=0.0).to(tl.float64)
            n = tl.load(wp + 2 * H, mask=m, other=0.0).to(tl.float64)
            hn = tl.load(wp + 3 * H, mask=m, other=0.0).to(tl.float64)
            hp = tl.load(hp_ptr + hoff, mask=m, other=0.0).to(tl.float64)
            w0, w1, w2 = _gru_gamma(r, z, n, hn, hp)
            w0 = w0 * sc0
            w1 = w1 * sc1
            w2 = w2 * sc2
            s = w0 + w1 + w2
            p = w0 * y0 + w1 * y1 + w2 * y2
            ru = w0 * wu0 + w1 * wu1 + w2 * wu2
            rv = w0 * wv0 + w1 * wv1 + w2 * wv2
            rd = (w0 * tl.load(diag_ptr + cols, mask=col_ok, other=0.0)[None, :]
                  + w1 * tl.load(diag_ptr + H + cols, mask=col_ok, other=0.0)[None, :]
                  + w2 * tl.load(diag_ptr + 2 * H + cols, mask=col_ok, other=0.0)[None, :])
            u = tl.load(u_ptr + cols, mask=col_ok, other=0.0)[None, :]
            v = tl.load(v_ptr + hoff, mask=m, other=0.0)
            # Row j: z e_j + sum_a wt_a W_(aH+j) - s u - p v.
            term = (_quad(w0, w1, w2, w2, gram_ptr, cols, col_ok, H, 3) + s * s * uu + p * p * x_vv
                    + 2.0 * s * p * x_uv - 2.0 * s * ru - 2.0 * p * rv + z * z
                    + 2.0 * z * (rd - s * u - p * v))
            acc += tl.sum(tl.where(m, term, 0.0), axis=1)
    tl.store(jac_ptr + rows, tl.where(valid, acc, 0.0), mask=row_ok)


# ---------------------------------------------------------------------------------------------------
# Launch planning and checks


MAX_STAT_TILES = 128


def plan(B: int, H: int, G: int, dtype: torch.dtype, sms: int | None, loop: str = "auto") -> dict:
    """Loop kind and launch parameters for a layer of batch B, hidden size H and G gates.

    ``sms``: the GPU's multiprocessor count, None under the interpreter. ``loop``: "auto", "persistent" or
    "step" (auto: the plain cells' rule, :func:`vgkernels.triton.recurrent.loop_kind`). tl.dot needs every
    block dimension >= 16 on a GPU.

    Persistent: 16 rows per program; a program keeps all G gates of its tile live through the gate update,
    so tiles of 32 columns (16 for float64) over 8 warps, and no software pipelining of the K loops (their
    prefetched tiles stay live across the loops over tiles and steps), keep it within the registers.

    Step: "fwd" and "bwd" are the dot kernels' tiles over [B, G*H] (K = H) and [B, H] (K = G*H), chosen
    like the plain cells' step tiles (fewest reads among the tiles that keep the SMs busy, split K
    where even 16 x 16 tiles do not); "gates" the element-wise tiles over [B, H] (the gates, the cell LN
    and its backward) and "dy" those over [B, G*H] (LN(W_hh h)'s backward), the largest that keep the
    SMs busy (bench/results/aot_*.md has every launch's registers and grid).
    """
    loop = _plain.loop_kind(B, H, G, sms, loop)
    word = 2 if dtype == torch.float64 else 1
    if loop == "persistent":
        cols = 16 if word == 2 else 32
        # The row statistics hold every y tile's (mean, sqrt(M2)) of 16 rows at once: at most 128 tiles;
        # for float64 at most 64 tiles of at most 64 columns (more tiles, or wider ones, spill on sm_90).
        if word == 2:
            y_cols = min(64, _host.next_power_of_2(_host.cdiv(G * H, MAX_STAT_TILES // 4)))
        else:
            y_cols = _host.next_power_of_2(_host.cdiv(G * H, MAX_STAT_TILES))
        y_cols = max(cols, y_cols)
        return {"loop": loop, "BLOCK_B": 16, "BLOCK_N": _pow2_between(G * H, 16, y_cols),
                "BLOCK_J": _pow2_between(H, 16, cols), "BLOCK_K": _plain.k_tile(H, dtype), "num_warps": 8,
                "num_stages": 1}
    target = _host.busy_target(sms)
    max_tile = 512 if word == 2 else 1024
    return {"loop": loop, "fwd": _dot_plan(B, G * H, H, 1, dtype, target),
            "bwd": _dot_plan(B, H, G * H, G, dtype, target),
            "gates": _pointwise_plan(B, H, target, max_tile),
            "dy": _pointwise_plan(B, G * H, target, max_tile)}


def _dot_plan(B: int, cols: int, K: int, live: int, dtype: torch.dtype, target: int) -> dict:
    """Tiles, split and warps of a step's dot kernel over [B, cols] with K-long dots; ``live``: the gate
    tiles its epilogue keeps live (register budget)."""
    word = 2 if dtype == torch.float64 else 1
    block_b, block_j, programs = _plain.cover(B, cols, live, word, target)
    wanted = _plain.wanted_split(programs, target)
    block_k = _plain.k_tile(K, dtype)
    if wanted > 1:
        block_k = _plain.split_block_k(K, wanted, block_k)
    num_warps, block_k = _plain.dot_warps(live, block_b, block_j, word, block_k)
    return {"BLOCK_B": block_b, "BLOCK_J": block_j, "BLOCK_K": block_k,
            "SPLIT": max(1, min(wanted, _host.cdiv(K, block_k))), "num_warps": num_warps, "num_stages": 3}


def _pointwise_plan(B: int, cols: int, target: int, max_tile: int) -> dict:
    block_b, block_j, num_warps = _plain.pointwise_tiles(B, cols, target, max_tile)
    return {"BLOCK_B": block_b, "BLOCK_J": block_j, "num_warps": num_warps}


_cached_plan = functools.lru_cache(maxsize=256)(plan)  # a pure function, asked at every call of a layer


def _plan(B: int, H: int, G: int, device: torch.device, dtype: torch.dtype) -> dict:
    """:func:`plan` for a launch on ``device``, with the loop kind from ``VGK_RNN_TRITON_LOOP``; the
    same dict for the same arguments (read it, never change it)."""
    return _cached_plan(B, H, G, dtype, *_plain.sms_and_loop(device))


def _nt(tiles: int) -> int:
    """Block width that holds ``tiles`` per-tile values (a power of two, at least 2)."""
    return max(2, _host.next_power_of_2(tiles))


def _freeze(p: dict) -> tuple:
    return tuple(sorted((k, _freeze(v) if isinstance(v, dict) else v) for k, v in p.items()))


def _dot_tl(dtype: torch.dtype, device: torch.device):
    # The interpreter computes bfloat16 dots wrongly; there they run on float32 operands.
    if dtype == torch.bfloat16 and not _host.on_gpu(device):
        return tl.float32
    return _TL[dtype]


def _check_ln_mode(op: str, mode: str) -> int:
    if mode not in GATES:
        _plain._fail(op, ValueError,
                     f"mode must be 'lstm' or 'gru' (the layer-normalized cells), got {mode!r}")
    return GATES[mode]


def _check_optional(op, name, t, required, mode, shape, dtype, device) -> None:
    if required:
        if t is None:
            _plain._fail(op, ValueError,
                         f"{name} of shape {tuple(shape)} is required for mode {mode!r}, got None")
        _plain._check_tensor(op, name, t, shape, dtype, device)
    elif t is not None:
        _plain._fail(op, ValueError, f"{name} must be None for mode {mode!r}, got {_plain._given(t)}")


# ---------------------------------------------------------------------------------------------------
# Forward


def _jacobian_rows(R: int, device: torch.device) -> int:
    """BLOCK_R of the Jacobian post-pass over R rows: 16, halved (to 2) while the grid would leave SMs
    idle."""
    target = _host.busy_target(_plain.sms_and_loop(device)[0])
    block_r = 16
    while block_r > 2 and _host.cdiv(R, block_r) < target:
        block_r //= 2
    return block_r


def _ln_project(g, gamma, yh, rstd):
    """rstd * P (gamma * g) with P = I - 11^T/N - yh yh^T/N, row by row (the LN backward's projection)."""
    g = g * gamma
    N = g.shape[-1]
    return rstd * (g - g.mean(-1, keepdim=True) - yh * (g * yh).sum(-1, keepdim=True) / N)


def _jacobian_sq(ws, states, cells, w_hh, gamma, gamma_c, lengths, mode, reverse) -> torch.Tensor:
    """Exact squared step-Jacobian Frobenius norms float32 [T, B] from the forward's outputs."""
    T, B, _ = ws.shape
    H = w_hh.shape[1]
    G = GATES[mode]
    N = G * H
    lstm = mode == "lstm"
    K = 3 if lstm else 1
    device = ws.device
    wd = w_hh.to(torch.float64)
    u = wd.mean(0)
    wu = (wd @ u).contiguous()
    blocks = wd.reshape(G, H, H)
    gram = torch.einsum("ajk,bjk->abj", blocks, blocks).contiguous()
    diag = torch.diagonal(blocks, dim1=1, dim2=2).contiguous()
    gam = gamma.to(torch.float64)
    prev = states[1:] if reverse else states[:-1]
    prev_c = (cells[1:] if reverse else cells[:-1]) if lstm else prev
    jac = torch.empty(T, B, dtype=torch.float64, device=device)
    steps = max(1, _JAC_CHUNK_BYTES // (8 * K * B * N))
    len_dev = lengths.to(device) if lengths is not None else jac.new_empty(0)
    for t0 in range(0, T, steps):
        t1 = min(T, t0 + steps)
        R = (t1 - t0) * B
        wsc = ws[t0:t1].reshape(R, -1)
        yh = wsc[:, 4 * H: 4 * H + N].to(torch.float64)
        rstd = wsc[:, -2 if lstm else -1].to(torch.float64)[:, None]
        z = [yh / N]
        if lstm:
            si, sf, tg = (wsc[:, a * H:(a + 1) * H].to(torch.float64) for a in range(3))
            cp = prev_c[t0:t1].reshape(R, H).to(torch.float64)
            # The coefficients of the gate rows in dc/dh_prev (none on o).
            alpha = torch.cat([tg * si * (1 - si), cp * sf * (1 - sf), si * (1 - tg * tg), 0 * si], -1)
            ch = wsc[:, 8 * H: 9 * H].to(torch.float64)
            z += [_ln_project(alpha, gam, yh, rstd), _ln_project(alpha * ch.repeat(1, G), gam, yh, rstd)]
        v = torch.stack(z) @ wd  # [K, R, H]
        q = v @ wd.t()  # [K, R, N]
        hp = (prev_c if lstm else prev)[t0:t1].reshape(R, H).contiguous()
        block_r = _jacobian_rows(R, device)
        _host.launch(_ln_jacobian_kernel, (_host.cdiv(R, block_r),), wsc.contiguous(), hp, hp,
                     gamma.contiguous(), gamma_c.contiguous() if lstm else gamma.contiguous(), v.contiguous(),
                     q.contiguous(), u.contiguous(), wu, gram, diag, len_dev, jac[t0:t1].view(-1), R, B, H,
                     t0, LSTM=lstm, HAS_LEN=lengths is not None, BLOCK_R=block_r, BLOCK_J=16,
                     num_warps=max(1, block_r // 2), maxnreg=MAXNREG)
    return jac.to(torch.float32)


def _forward_impl(xproj, h0, c0, w_hh, b_hh, ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias, eps,
                  lengths, mode, reverse, track):
    op = "rnn_ln_forward_triton"
    G = _check_ln_mode(op, mode)
    lstm = mode == "lstm"
    device, dtype = _plain._check_leading(op, "xproj", xproj, "[T, B, G*H]")
    T, B, N = xproj.shape
    if not isinstance(w_hh, torch.Tensor) or w_hh.dim() != 2:
        got = f"shape {tuple(w_hh.shape)}" if isinstance(w_hh, torch.Tensor) else type(w_hh).__name__
        _plain._fail(op, ValueError, f"w_hh must be a 2-D tensor [G*H, H], got {got}")
    H = w_hh.shape[1]
    if T < 1 or B < 1 or H < 1:
        _plain._fail(op, ValueError, f"T, B and H must be positive, got T={T}, B={B}, H={H}")
    if not eps >= 0:
        _plain._fail(op, ValueError, f"eps must be a number >= 0, got {eps}")
    _plain._check_tensor(op, "w_hh", w_hh, (G * H, H), dtype, device)
    _plain._check_tensor(op, "xproj", xproj, (T, B, G * H), dtype, device)
    _plain._check_tensor(op, "h0", h0, (B, H), dtype, device)
    _plain._check_tensor(op, "ln_hh_weight", ln_hh_weight, (G * H,), dtype, device)
    _plain._check_tensor(op, "ln_hh_bias", ln_hh_bias, (G * H,), dtype, device)
    _check_optional(op, "c0", c0, lstm, mode, (B, H), dtype, device)
    _check_optional(op, "ln_cell_weight", ln_cell_weight, lstm, mode, (H,), dtype, device)
    _check_optional(op, "ln_cell_bias", ln_cell_bias, lstm, mode, (H,), dtype, device)
    if b_hh is not None:
        if lstm:
            _plain._fail(op, ValueError,
                         f"b_hh must be None for mode 'lstm' (add it to xproj), got {_plain._given(b_hh)}")
        _plain._check_tensor(op, "b_hh", b_hh, (G * H,), dtype, device)
    _plain._check_lengths(op, lengths, B)

    acc = _plain._acc_dtype(dtype)
    N = G * H
    p = _plan(B, H, G, device, dtype)
    persistent = p["loop"] == "persistent"
    meta = dict(LSTM=lstm, REVERSE=bool(reverse), ACC=_TL[acc])
    dots = dict(DOT=_dot_tl(dtype, device), PRECISION=_plain._precision(dtype, device))
    key = None if persistent else ("ln-fwd", T, B, H, dtype, device, lengths is not None, _freeze(p),
                                   tuple(sorted(meta.items())), tuple(sorted(dots.items())))
    loop = _graphs.StepLoop(key, device, {})
    empty = xproj.new_empty(0, dtype=acc)
    x = loop.copy_in("xproj", xproj)
    wt = loop.copy_in("wt", w_hh.t())
    gam = loop.copy_in("gam", ln_hh_weight)
    # b_hh enters the GRU's gates as one shift with LN(W_hh h)'s.
    sh = loop.copy_in("shift", ln_hh_bias if b_hh is None else ln_hh_bias + b_hh)
    gc = loop.copy_in("gc", ln_cell_weight) if lstm else empty
    bc = loop.copy_in("bc", ln_cell_bias) if lstm else empty
    len_dev = loop.copy_in("lengths", lengths.to(device)) if lengths is not None else empty
    eps_t = loop.copy_in("eps", torch.full((1,), eps, dtype=acc, device=device))
    states, cells = _plain._initial_states(loop, T, h0, c0, reverse, acc)
    alloc = _plain._alloc
    ws = loop.buffer("ws", lambda: alloc((T, B, workspace_width(mode, H)), acc, device))
    y = loop.buffer("y", lambda: alloc((B, N), acc, device))
    y_tile, c_tile = (p["BLOCK_N"], p["BLOCK_J"]) if persistent else (p["fwd"]["BLOCK_J"],
                      p["gates"]["BLOCK_J"])
    n_y, n_c = _host.cdiv(N, y_tile), _host.cdiv(H, c_tile)
    ystat = loop.buffer("ystat", lambda: alloc((n_y, 2, B), acc, device))
    cstat = loop.buffer("cstat", lambda: alloc((n_c, 2, B), acc, device)) if lstm else empty
    if persistent:
        split = 1
    else:
        fwd, gates = p["fwd"], p["gates"]
        split = fwd["SPLIT"]
        n_fb, n_gb = _host.cdiv(B, fwd["BLOCK_B"]), _host.cdiv(B, gates["BLOCK_B"])
        chunk = _plain._k_chunk(H, split, fwd["BLOCK_K"])
    part, counters = _plain._split_buffers(loop, split, (split, B, N), (n_fb * n_y) if split > 1 else 1, acc,
                                           device)
    has_len = lengths is not None

    def launch_all():
        with _plain._device_ctx(device):
            if persistent:
                _host.launch(_ln_forward_kernel, (_host.cdiv(B, p["BLOCK_B"]),), x, states, cells, ws, y,
                             ystat, cstat, wt, gam, sh, gc, bc, len_dev, eps_t, T, B, H, HAS_LEN=has_len,
                             BLOCK_B=p["BLOCK_B"], BLOCK_N=p["BLOCK_N"], BLOCK_J=p["BLOCK_J"],
                             BLOCK_K=p["BLOCK_K"], NT_Y=_nt(n_y), NT_C=_nt(n_c), num_warps=p["num_warps"],
                             num_stages=p["num_stages"], maxnreg=MAXNREG, **meta, **dots)
                return
            for s in range(T):
                _host.launch(_ln_fwd_dot_kernel, (n_fb, n_y, split), states, wt, y, ystat, part, counters, T,
                             B, H, s, chunk, SPLIT=split, BLOCK_B=fwd["BLOCK_B"], BLOCK_N=fwd["BLOCK_J"],
                             BLOCK_K=fwd["BLOCK_K"], num_warps=fwd["num_warps"], num_stages=fwd["num_stages"],
                             maxnreg=MAXNREG, **meta, **dots)
                _host.launch(_ln_fwd_gates_kernel, (n_gb, n_c), x, states, cells, ws, y, ystat, cstat, gam,
                             sh, len_dev, eps_t, T, B, H, s, n_y, HAS_LEN=has_len, Y_TILE=y_tile,
                             NT_Y=_nt(n_y), BLOCK_B=gates["BLOCK_B"], BLOCK_J=gates["BLOCK_J"],
                             num_warps=gates["num_warps"], maxnreg=MAXNREG, **meta)
                if lstm:
                    _host.launch(_ln_fwd_cell_kernel, (n_gb, n_c), states, cells, ws, cstat, gc, bc, len_dev,
                                 eps_t, T, B, H, s, REVERSE=bool(reverse), HAS_LEN=has_len, ACC=_TL[acc],
                                 NT_C=_nt(n_c), BLOCK_B=gates["BLOCK_B"], BLOCK_J=gates["BLOCK_J"],
                                 num_warps=gates["num_warps"], maxnreg=MAXNREG)

    loop.run(launch_all)
    if track:
        with _plain._device_ctx(device):
            jac_sq = _jacobian_sq(ws, states, cells, w_hh, ln_hh_weight, ln_cell_weight, lengths, mode,
                                  reverse)
    else:
        jac_sq = states.new_empty(0, dtype=torch.float32)
    return loop.cast_out("states_out", states, dtype), loop.cast_out("cells_out", cells, dtype), ws, jac_sq


@triton_op("vgk::rnn_ln_forward_triton", mutates_args=())
def rnn_ln_forward_triton(
    xproj: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor | None,
    w_hh: torch.Tensor,
    b_hh: torch.Tensor | None,
    ln_hh_weight: torch.Tensor,
    ln_hh_bias: torch.Tensor,
    ln_cell_weight: torch.Tensor | None,
    ln_cell_bias: torch.Tensor | None,
    eps: float,
    lengths: torch.Tensor | None,
    mode: str,
    reverse: bool,
    track: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One direction of one layer of a layer-normalized LSTM/GRU (Triton twin of ``vgk::rnn_ln_forward``).

    Args:
        xproj: [T, B, G*H] LN(x W_ih^T) + b_ih (+ b_hh for the LSTM); float32, float64, bfloat16 or
            float16. G = 4 (lstm), 3 (gru).
        h0: [B, H]; c0: [B, H] for the LSTM, else None; w_hh: [G*H, H]; b_hh: [G*H] (GRU) or None.
        ln_hh_weight, ln_hh_bias: [G*H] gain and shift of LN(W_hh h). ln_cell_weight, ln_cell_bias: [H]
            gain and shift of LN(c) (LSTM), else None. All in xproj's dtype and on its device.
        eps: the layer normalization's epsilon (>= 0).
        lengths: int64 [B] (any device), or None: past its length a sample's state is carried.
        mode: "lstm" or "gru"; reverse: run t = T-1 .. 0; track: compute jac_sq.
    Returns:
        states [T+1, B, H], cell_states [T+1, B, H] (LSTM) or [0], in xproj's dtype; workspace
        [T, B, 10H+2] (LSTM) or [T, B, 7H+1] (GRU) in float64 for float64 input, else float32;
        jac_sq float32 [T, B] (or [0] without track).
    """
    return _forward_impl(xproj, h0, c0, w_hh, b_hh, ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias,
                         eps, lengths, mode, reverse, track)


@rnn_ln_forward_triton.register_fake
def _forward_fake(xproj, h0, c0, w_hh, b_hh, ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias, eps,
                  lengths, mode, reverse, track):
    return _plain._fake_forward(xproj, w_hh, mode, track, workspace_width(mode, w_hh.shape[1]),
                                _plain._acc_dtype(xproj.dtype))


# ---------------------------------------------------------------------------------------------------
# Backward


def _backward_impl(grad_states, grad_cell_states, states, cell_states, workspace, w_hh, ln_hh_weight,
                   ln_cell_weight, lengths, mode, reverse, grad_clip, track, has_b_hh):
    op = "rnn_ln_backward_triton"
    G = _check_ln_mode(op, mode)
    lstm = mode == "lstm"
    device, dtype = _plain._check_leading(op, "states", states, "[T+1, B, H]")
    T, B, H = states.shape[0] - 1, states.shape[1], states.shape[2]
    if T < 1 or B < 1 or H < 1:
        _plain._fail(op, ValueError, f"states must have shape [T+1, B, H] with T, B, H >= 1, got "
                     f"{tuple(states.shape)}")
    acc = _plain._acc_dtype(dtype)
    N = G * H
    _plain._check_tensor(op, "w_hh", w_hh, (N, H), dtype, device)
    _plain._check_tensor(op, "grad_states", grad_states, (T + 1, B, H), None, device)
    _plain._check_tensor(op, "workspace", workspace, (T, B, workspace_width(mode, H)), acc, device)
    _plain._check_tensor(op, "ln_hh_weight", ln_hh_weight, (N,), dtype, device)
    _check_optional(op, "ln_cell_weight", ln_cell_weight, lstm, mode, (H,), dtype, device)
    if lstm:
        _plain._check_tensor(op, "cell_states", cell_states, (T + 1, B, H), dtype, device)
        _plain._check_tensor(op, "grad_cell_states", grad_cell_states, (T + 1, B, H), None, device)
    _plain._check_lengths(op, lengths, B)
    _plain._check_grad_clip(op, grad_clip)
    if has_b_hh and lstm:
        _plain._fail(op, ValueError, "has_b_hh is for mode 'gru' only (the LSTM's b_hh is in xproj), got "
                     "has_b_hh=True with mode 'lstm'")

    p = _plan(B, H, G, device, dtype)
    persistent = p["loop"] == "persistent"
    meta = dict(REVERSE=bool(reverse), HAS_LEN=lengths is not None, ACC=_TL[acc])
    flags = dict(HAS_CLIP=grad_clip is not None, TRACK=bool(track))
    dots = dict(DOT=_dot_tl(dtype, device), PRECISION=_plain._precision(dtype, device))
    alloc = _plain._alloc
    empty = states.new_empty(0, dtype=acc)
    # The forward's outputs are read in place (in their own dtypes): a graph captured on them replays for
    # the backward of every forward that returned the same buffers. The weights are copied in: a
    # parametrized or autocast weight is a fresh tensor at every call, whose address would miss the graph.
    st = states.contiguous()
    cs = cell_states.contiguous() if lstm else empty
    ws = workspace.contiguous()
    adopted = {"states": st, "cells": cs, "ws": ws}
    key = None if persistent else ("ln-bwd", T, B, H, dtype, device, mode, _freeze(p),
                                   tuple(sorted(meta.items())), tuple(sorted(flags.items())),
                                   tuple(sorted(dots.items())))
    loop = _graphs.StepLoop(key, device, adopted)
    w = loop.copy_in("w", w_hh)
    gam = loop.copy_in("gam", ln_hh_weight)
    gc = loop.copy_in("gc", ln_cell_weight) if lstm else empty
    gs = loop.copy_in("gs", grad_states.to(acc))
    gcs = loop.copy_in("gcs", grad_cell_states.to(acc)) if lstm else empty
    len_dev = loop.copy_in("lengths", lengths.to(device)) if lengths is not None else empty
    clip_t = loop.copy_in("clip", torch.full((1,), grad_clip if grad_clip is not None else 0.0, dtype=acc,
                                             device=device))
    gx = loop.buffer("gx", lambda: alloc((T, B, N), acc, device))
    dl = loop.buffer("dl", lambda: alloc((T, B, H if lstm else N), acc, device))
    dy = loop.buffer("dy", lambda: alloc((T, B, N), acc, device))
    dh = loop.buffer("dh", lambda: alloc((B, H), acc, device)) if lstm else empty
    carry_h = loop.buffer("carry_h", lambda: torch.empty(2, B, H, dtype=acc, device=device))
    carry_h.zero_()
    if lstm:
        carry_c = loop.buffer("carry_c", lambda: torch.empty(2, B, H, dtype=acc, device=device))
        carry_c.zero_()
    else:
        carry_c = carry_h
    if persistent:
        n_h = n_c = 1
        split = 1
    else:
        bwd, gates, dyp = p["bwd"], p["gates"], p["dy"]
        n_h, n_c = _host.cdiv(H, bwd["BLOCK_J"]), _host.cdiv(H, gates["BLOCK_J"])
        n_bb = _host.cdiv(B, bwd["BLOCK_B"])
        split = bwd["SPLIT"]
        chunk = _plain._k_chunk(N, split, bwd["BLOCK_K"])
        hstat = loop.buffer("hstat", lambda: alloc((n_h, 2, B), acc, device))
        gstat = loop.buffer("gstat", lambda: alloc((n_c, 2, B), acc, device)) if lstm else hstat
        n_g = n_c if lstm else n_h
    gsq_h = loop.buffer("gsq_h", lambda: alloc((n_h, T, B), torch.float64, device)) if track else empty
    gsq_c = (loop.buffer("gsq_c", lambda: alloc((n_c, T, B), torch.float64, device)) if track and lstm
             else empty)
    part, counters = _plain._split_buffers(loop, split, (split, B, H), (n_bb * n_h) if split > 1 else 1, acc,
                                           device)

    def launch_all():
        with _plain._device_ctx(device):
            if persistent:
                _host.launch(_ln_backward_kernel, (_host.cdiv(B, p["BLOCK_B"]),), gs, gcs, st, cs, ws, w,
                             gam, gc, len_dev, gx, dl, dy, dh, carry_h, carry_c, gsq_h, gsq_c, clip_t, T, B,
                             H, LSTM=lstm, BLOCK_B=p["BLOCK_B"], BLOCK_N=p["BLOCK_N"], BLOCK_J=p["BLOCK_J"],
                             BLOCK_K=p["BLOCK_K"], num_warps=p["num_warps"], num_stages=p["num_stages"],
                             maxnreg=MAXNREG, **meta, **flags, **dots)
                return
            for s in range(T - 1, -1, -1):
                _host.launch(_ln_bwd_dot_kernel, (n_bb, n_h, split), gs, st, ws, w, gam, gc, len_dev, gx, dl,
                             dy, dh, carry_h, hstat, gsq_h, part, counters, clip_t, T, B, H, s, chunk,
                             LSTM=lstm, SPLIT=split, BLOCK_B=bwd["BLOCK_B"], BLOCK_J=bwd["BLOCK_J"],
                             BLOCK_K=bwd["BLOCK_K"], num_warps=bwd["num_warps"], num_stages=bwd["num_stages"],
                             maxnreg=MAXNREG, **meta, **flags, **dots)
                if lstm:
                    _host.launch(_ln_bwd_cell_kernel, (_host.cdiv(B, gates["BLOCK_B"]), n_c), gcs, cs, ws,
                                 gam, gc, len_dev, gx, dl, dh, carry_c, hstat, gstat, gsq_c, clip_t, T, B, H,
                                 s, n_h, NT_H=_nt(n_h), BLOCK_B=gates["BLOCK_B"], BLOCK_J=gates["BLOCK_J"],
                                 num_warps=gates["num_warps"], maxnreg=MAXNREG, **meta, **flags)
                _host.launch(_ln_bwd_dy_kernel,
                             (_host.cdiv(B, dyp["BLOCK_B"]), _host.cdiv(N, dyp["BLOCK_J"])), ws, gam,
                             len_dev, gx if lstm else dl, dy, gstat, T, B, H, s, n_g, LSTM=lstm,
                             NT_G=_nt(n_g), BLOCK_B=dyp["BLOCK_B"], BLOCK_N=dyp["BLOCK_J"],
                             num_warps=dyp["num_warps"], maxnreg=MAXNREG, **meta)

    loop.run(launch_all)
    # The step processed first leaves its dy for the initial state.
    first, init = (T - 1, T) if reverse else (0, 0)
    w_acc = w.to(acc)
    grad_h0 = gs[init] + carry_h[0] + _gemm.mm(dy[first], w_acc)
    grad_c0 = (gcs[init] + carry_c[0]).to(dtype) if lstm else st.new_empty(0, dtype=dtype)
    h_prev = st[1:] if reverse else st[:-1]
    # One GEMM over all steps for grad_w_hh; the gains and shifts: sums over all rows.
    grad_w_hh = _gemm.mm(dy.reshape(T * B, N).t(), h_prev.reshape(T * B, H).to(acc))
    ln_grad = (gx if lstm else dl).reshape(T * B, N)
    ws2 = ws.reshape(T * B, -1)
    g_gamma = (ln_grad * ws2[:, 4 * H: 4 * H + N]).sum(0)
    g_beta = ln_grad.sum(0)
    if lstm:
        dl2 = dl.reshape(T * B, H)
        g_gamma_c, g_beta_c = (dl2 * ws2[:, 8 * H: 9 * H]).sum(0).to(dtype), dl2.sum(0).to(dtype)
    else:
        g_gamma_c = g_beta_c = None
    out_empty = st.new_empty(0, dtype=dtype)
    # b_hh and the LN shift enter the GRU's gates as one sum; a copy, since outputs may not alias.
    grad_b_hh = g_beta.to(dtype, copy=True) if has_b_hh else out_empty
    if track:
        grad_sq = torch.stack([gsq_h.sum(0), gsq_c.sum(0)]) if lstm else gsq_h.sum(0)[None]
    else:
        grad_sq = st.new_empty(0, dtype=torch.float64)
    return (gx.to(dtype), grad_h0.to(dtype), grad_c0, grad_w_hh.to(w_hh.dtype), grad_b_hh, g_gamma.to(dtype),
            g_beta.to(dtype), out_empty.clone() if g_gamma_c is None else g_gamma_c,
            out_empty.clone() if g_beta_c is None else g_beta_c, grad_sq)


@triton_op("vgk::rnn_ln_backward_triton", mutates_args=())
def rnn_ln_backward_triton(
    grad_states: torch.Tensor,
    grad_cell_states: torch.Tensor,
    states: torch.Tensor,
    cell_states: torch.Tensor,
    workspace: torch.Tensor,
    w_hh: torch.Tensor,
    ln_hh_weight: torch.Tensor,
    ln_cell_weight: torch.Tensor | None,
    lengths: torch.Tensor | None,
    mode: str,
    reverse: bool,
    grad_clip: float | None,
    track: bool,
    has_b_hh: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`rnn_ln_forward_triton` (the Triton twin of ``vgk::rnn_ln_backward``).

    Args:
        grad_states: [T+1, B, H] gradient of ``states`` (the initial-state slot is added to grad_h0);
        grad_cell_states: [T+1, B, H] for the LSTM, else [0]; states, cell_states, workspace: the
            forward's outputs; w_hh [G*H, H]; ln_hh_weight [G*H]; ln_cell_weight [H] (LSTM) or None;
            lengths, mode, reverse as in the forward.
        grad_clip: clamp the gradients w.r.t. the gate pre-activations (after the LN sum) to [-c, c] at
            every step, or None.
        track: compute grad_sq. has_b_hh: return grad_b_hh (GRU).
    Returns:
        grad_xproj [T, B, G*H], grad_h0 [B, H], grad_c0 [B, H] (LSTM) or [0], grad_w_hh [G*H, H],
        grad_b_hh [G*H] (GRU with has_b_hh) or [0], grad_ln_hh_weight, grad_ln_hh_bias [G*H],
        grad_ln_cell_weight, grad_ln_cell_bias [H] (LSTM) or [0], all in the states' dtype; grad_sq
        float64 [K, T, B] (K = 2 for the LSTM: h then c; else 1), or [0] without track.
    """
    return _backward_impl(grad_states, grad_cell_states, states, cell_states, workspace, w_hh, ln_hh_weight,
                          ln_cell_weight, lengths, mode, reverse, grad_clip, track, has_b_hh)


@rnn_ln_backward_triton.register_fake
def _backward_fake(grad_states, grad_cell_states, states, cell_states, workspace, w_hh, ln_hh_weight,
                   ln_cell_weight, lengths, mode, reverse, grad_clip, track, has_b_hh):
    *grads, grad_sq = _plain._fake_backward(states, w_hh, mode, track, has_b_hh)
    H = states.shape[2]
    N = GATES[mode] * H
    # The LN gains' and shifts' gradients sit between the plain cell's gradients and grad_sq.
    cell = (H,) if mode == "lstm" else (0,)
    return (*grads, states.new_empty(N), states.new_empty(N), states.new_empty(cell), states.new_empty(cell),
            grad_sq)
