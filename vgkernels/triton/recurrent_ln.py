"""Triton kernels of the layer-normalized LSTM and GRU cells (Ba et al. 2016): one direction of one layer.

The ops ``vgk::rnn_ln_forward_triton`` and ``vgk::rnn_ln_backward_triton`` take the arguments and return
the outputs of the C++ ops ``vgk::rnn_ln_forward`` / ``vgk::rnn_ln_backward`` (see
``vgkernels/ops/recurrent.py`` and ``csrc/cpu/recurrent_ln.cpp``): gates = xproj + LN(W_hh h) (the GRU
adds b_hh after the LN, inside r * (...)), and for the LSTM h = o * tanh(LN(c)).

Kernels. LN couples all G*H units of a sample, so one program owns a block of batch rows with all their
columns and walks over the whole sequence (all its data dependencies stay inside the program; block
barriers separate the passes):

- forward, per step: ``h_{t-1} W_hh^T`` with ``tl.dot`` into a scratch row buffer and its mean, the
  variance from the stored row (two passes), the gates, the new state, and for the LSTM the cell LN
  (mean, variance, tanh(LN(c)));
- backward, per step in reverse: the recurrent term ``dY_{t+1} W_hh`` with ``tl.dot``, the cell LN
  backward (LSTM), the clamped gate gradients (``grad_clip``), and the LN backward into ``dY_t``, the
  gradient of ``W_hh h_{t-1}``; grad_w_hh is one GEMM after the loop, the gains' and shifts' gradients
  are sums over all rows after the loop (deterministic).

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

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from vgkernels.triton import _host
from vgkernels.triton import recurrent as _plain
from vgkernels.triton.layer_norm import _row_scale
from vgkernels.triton.recurrent import (
    MAXNREG,
    _dot,
    _gru_gate_grads,
    _ld,
    _lstm_gate_grads,
    _pow2_between,
    _rec_dot,
    _row_lengths,
    _row_sq,
    _sigmoid,
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
# Kernels


@triton.jit
def _ln_gate(yp, yhp, gp, sp, m, col_ok, keep, mean, rstd, ACC: tl.constexpr):
    """gamma * yh + shift at one gate's columns of the tile; yh = (y - mean) * rstd is saved at yhp."""
    yh = (_ld(yp, m, ACC) - mean[:, None]) * rstd[:, None]
    tl.store(yhp, tl.where(keep, yh, 0.0), mask=m)
    return _ld(gp, col_ok, ACC)[None, :] * yh + _ld(sp, col_ok, ACC)[None, :]


@triton.jit
def _ln_forward_kernel(
    x_ptr, st_ptr, cs_ptr, ws_ptr, y_ptr, wt_ptr, gam_ptr, sh_ptr, gc_ptr, bc_ptr, len_ptr, eps_ptr,
    T, B, H,
    LSTM: tl.constexpr, REVERSE: tl.constexpr, HAS_LEN: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """All T steps for one block of batch rows.

    x [T, B, N]; st, cs [T+1, B, H]; ws [T, B, WS]; y [B, N] scratch; wt = W_hh^T [H, N]; gam, sh [N]
    (sh includes the GRU's b_hh); gc, bc [H]; len [B]; eps [1] (a tensor: a float argument would be
    float32 on a GPU).
    """
    pid = tl.program_id(0)
    eps = tl.load(eps_ptr).to(ACC)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    if LSTM:
        N = 4 * H
        WS = 10 * H + 2
    else:
        N = 3 * H
        WS = 7 * H + 1
    BH = tl.cast(B, tl.int64) * H
    lens = _row_lengths(len_ptr, rows, row_ok, HAS_LEN)
    for s in range(T):
        pos, _, in_base, out_base, valid = _step(s, T, BH, row_ok, lens, REVERSE, HAS_LEN)
        x_base = tl.cast(pos, tl.int64) * B * N
        ws_base = tl.cast(pos, tl.int64) * B * WS
        # y = h_prev W^T into the scratch rows, and its row sums.
        sum_y = tl.zeros([BLOCK_B], dtype=ACC)
        max_y = tl.zeros([BLOCK_B], dtype=ACC)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=ACC)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < H
                hk = tl.load(st_ptr + in_base + rows[:, None] * H + ks[None, :],
                             mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                wk = tl.load(wt_ptr + ks[:, None] * N + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                             other=0.0)
                acc = _dot(hk, wk, acc, DOT, PRECISION)
            m = row_ok[:, None] & col_ok[None, :]
            tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc, mask=m)
            sum_y += tl.sum(tl.where(m, acc, 0.0), axis=1)
            max_y = tl.maximum(max_y, tl.max(tl.where(m, tl.abs(acc), 0.0), axis=1))
        mean = sum_y / N
        # The variance of (y - mean) / max|y| where max|y| > 2^50 (large W_hh): float32 squares of
        # values beyond ~1e19 overflow. 1 for other rows, which changes nothing.
        inv = _row_scale(max_y)
        tl.debug_barrier()
        ssq = tl.zeros([BLOCK_B], dtype=ACC)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            m = row_ok[:, None] & (cols < N)[None, :]
            d = tl.where(m, _ld(y_ptr + rows[:, None] * N + cols[None, :], m, ACC) - mean[:, None], 0.0)
            d = d * inv[:, None]
            ssq += tl.sum(d * d, axis=1)
        rstd = inv / tl.sqrt(ssq / N + eps * inv * inv)
        # Gates and new state, a tile of hidden units at a time.
        sum_c = tl.zeros([BLOCK_B], dtype=ACC)
        for j0 in range(0, H, BLOCK_J):
            cols = j0 + tl.arange(0, BLOCK_J)
            col_ok = cols < H
            m = row_ok[:, None] & col_ok[None, :]
            keep = valid[:, None] & col_ok[None, :]
            hoff = rows[:, None] * H + cols[None, :]
            xp = x_ptr + x_base + rows[:, None] * N + cols[None, :]
            yp = y_ptr + rows[:, None] * N + cols[None, :]
            wp = ws_ptr + ws_base + rows[:, None] * WS + cols[None, :]
            # LN(W_hh h_prev) per gate (yh at 4H.. of the workspace).
            ln0 = _ln_gate(yp, wp + 4 * H, gam_ptr + cols, sh_ptr + cols, m, col_ok, keep, mean, rstd, ACC)
            ln1 = _ln_gate(yp + H, wp + 5 * H, gam_ptr + H + cols, sh_ptr + H + cols, m, col_ok, keep, mean,
                           rstd, ACC)
            ln2 = _ln_gate(yp + 2 * H, wp + 6 * H, gam_ptr + 2 * H + cols, sh_ptr + 2 * H + cols, m, col_ok,
                           keep, mean, rstd, ACC)
            if LSTM:
                ln3 = _ln_gate(yp + 3 * H, wp + 7 * H, gam_ptr + 3 * H + cols, sh_ptr + 3 * H + cols, m,
                               col_ok, keep, mean, rstd, ACC)
                si = _sigmoid(_ld(xp, m, ACC) + ln0)
                sf = _sigmoid(_ld(xp + H, m, ACC) + ln1)
                tg = _tanh(_ld(xp + 2 * H, m, ACC) + ln2)
                so = _sigmoid(_ld(xp + 3 * H, m, ACC) + ln3)
                c_prev = _ld(cs_ptr + in_base + hoff, m, ACC)
                c = sf * c_prev + si * tg
                tl.store(wp, tl.where(keep, si, 0.0), mask=m)
                tl.store(wp + H, tl.where(keep, sf, 0.0), mask=m)
                tl.store(wp + 2 * H, tl.where(keep, tg, 0.0), mask=m)
                tl.store(wp + 3 * H, tl.where(keep, so, 0.0), mask=m)
                tl.store(cs_ptr + out_base + hoff, tl.where(keep, c, c_prev), mask=m)
                sum_c += tl.sum(tl.where(keep, c, 0.0), axis=1)
            else:
                h_prev = _ld(st_ptr + in_base + hoff, m, ACC)
                r = _sigmoid(_ld(xp, m, ACC) + ln0)
                z = _sigmoid(_ld(xp + H, m, ACC) + ln1)
                n = _tanh(_ld(xp + 2 * H, m, ACC) + r * ln2)
                h = (1.0 - z) * n + z * h_prev
                tl.store(wp, tl.where(keep, r, 0.0), mask=m)
                tl.store(wp + H, tl.where(keep, z, 0.0), mask=m)
                tl.store(wp + 2 * H, tl.where(keep, n, 0.0), mask=m)
                tl.store(wp + 3 * H, tl.where(keep, ln2, 0.0), mask=m)
                tl.store(st_ptr + out_base + hoff, tl.where(keep, h, h_prev), mask=m)
        row_ws = ws_ptr + ws_base + rows * WS
        if LSTM:
            # The cell LN: statistics of the stored c, then h = so * tanh(LN(c)).
            mean_c = sum_c / H
            tl.debug_barrier()
            ssq_c = tl.zeros([BLOCK_B], dtype=ACC)
            for j0 in range(0, H, BLOCK_J):
                cols = j0 + tl.arange(0, BLOCK_J)
                keep = valid[:, None] & (cols < H)[None, :]
                d = tl.where(keep, _ld(cs_ptr + out_base + rows[:, None] * H + cols[None, :], keep, ACC)
                             - mean_c[:, None], 0.0)
                ssq_c += tl.sum(d * d, axis=1)
            rstd_c = 1.0 / tl.sqrt(ssq_c / H + eps)
            for j0 in range(0, H, BLOCK_J):
                cols = j0 + tl.arange(0, BLOCK_J)
                col_ok = cols < H
                m = row_ok[:, None] & col_ok[None, :]
                keep = valid[:, None] & col_ok[None, :]
                hoff = rows[:, None] * H + cols[None, :]
                wp = ws_ptr + ws_base + rows[:, None] * WS + cols[None, :]
                ch = (_ld(cs_ptr + out_base + hoff, m, ACC) - mean_c[:, None]) * rstd_c[:, None]
                t = _tanh(_ld(gc_ptr + cols, col_ok, ACC)[None, :] * ch
                          + _ld(bc_ptr + cols, col_ok, ACC)[None, :])
                h = _ld(wp + 3 * H, m, ACC) * t
                tl.store(wp + 8 * H, tl.where(keep, ch, 0.0), mask=m)
                tl.store(wp + 9 * H, tl.where(keep, t, 0.0), mask=m)
                h_prev = _ld(st_ptr + in_base + hoff, m, ACC)
                tl.store(st_ptr + out_base + hoff, tl.where(keep, h, h_prev), mask=m)
            tl.store(row_ws + 10 * H, tl.where(valid, rstd, 0.0), mask=row_ok)
            tl.store(row_ws + 10 * H + 1, tl.where(valid, rstd_c, 0.0), mask=row_ok)
        else:
            tl.store(row_ws + 7 * H, tl.where(valid, rstd, 0.0), mask=row_ok)
        # The next step reads the states this step wrote, from every tile of the block.
        tl.debug_barrier()


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
def _ln_backward_kernel(
    gs_ptr, gcs_ptr, st_ptr, cs_ptr, ws_ptr, w_ptr, gam_ptr, gc_ptr, len_ptr,
    gx_ptr, dl_ptr, dy_ptr, dh_ptr, ch_ptr, cc_ptr, gsq_ptr, clip_ptr,
    T, B, H,
    LSTM: tl.constexpr, REVERSE: tl.constexpr, HAS_LEN: tl.constexpr, HAS_CLIP: tl.constexpr,
    TRACK: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """All T steps of the backward, in reverse processing order, for one block of batch rows.

    gs, gcs, st, cs [T+1, B, H]; ws [T, B, WS]; w = W_hh [N, H]; gx [T, B, N] (grad_xproj); dl [T, B, N]
    (GRU: gradient of LN(W_hh h) + b_hh) or [T, B, H] (LSTM: of LN(c)); dy [T, B, N] gradient of
    W_hh h_prev; dh [B, H] scratch; ch, cc [2, B, H] ping-pong buffers of the gradients carried to the
    previous state (zeros on entry; step s reads slot (s+1) % 2 and writes slot s % 2, so the final ones
    are in slot 0); gsq float64 [K, T, B]; clip [1].
    """
    pid = tl.program_id(0)
    clip = tl.load(clip_ptr).to(ACC)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    if LSTM:
        N = 4 * H
        WS = 10 * H + 2
        DL = H
        R_OFF = 10 * H
    else:
        N = 3 * H
        WS = 7 * H + 1
        DL = N
        R_OFF = 7 * H
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
        row_ws = ws_ptr + ws_base + rows * WS
        rstd = _ld(row_ws + R_OFF, row_ok, ACC)
        rd = tl.cast((s + 1) % 2, tl.int64) * BH
        wr = tl.cast(s % 2, tl.int64) * BH
        sq_h = tl.zeros([BLOCK_B], dtype=tl.float64)
        sq_c = tl.zeros([BLOCK_B], dtype=tl.float64)
        # Sums of the LN(W_hh h) backward: g = (its output's gradient) * gamma; sum g and sum g * yh.
        sg = tl.zeros([BLOCK_B], dtype=ACC)
        sgy = tl.zeros([BLOCK_B], dtype=ACC)
        # Cell LN backward sums (LSTM).
        sgc = tl.zeros([BLOCK_B], dtype=ACC)
        sgcc = tl.zeros([BLOCK_B], dtype=ACC)
        for j0 in range(0, H, BLOCK_J):
            cols = j0 + tl.arange(0, BLOCK_J)
            col_ok = cols < H
            m = row_ok[:, None] & col_ok[None, :]
            keep = valid[:, None] & col_ok[None, :]
            hoff = rows[:, None] * H + cols[None, :]
            rec = _rec_dot(dy_ptr + next_base, w_ptr, rows, row_ok, cols, col_ok, 0, k_end, N, H,
                           tl.zeros([BLOCK_B, BLOCK_J], dtype=ACC), DOT, PRECISION, BLOCK_K)
            dh = _ld(gs_ptr + out_base + hoff, m, ACC) + _ld(ch_ptr + rd + hoff, m, ACC) + rec
            if TRACK:
                sq_h += _row_sq(dh, keep)
            wp = ws_ptr + ws_base + rows[:, None] * WS + cols[None, :]
            if LSTM:
                t = _ld(wp + 9 * H, m, ACC)
                dlc = tl.where(keep, dh * _ld(wp + 3 * H, m, ACC) * (1.0 - t * t), 0.0)
                tl.store(dl_ptr + l_base + hoff, dlc, mask=m)
                tl.store(dh_ptr + hoff, dh, mask=m)
                g = dlc * _ld(gc_ptr + cols, col_ok, ACC)[None, :]
                sgc += tl.sum(g, axis=1)
                sgcc += tl.sum(g * _ld(wp + 8 * H, m, ACC), axis=1)
                tl.store(ch_ptr + wr + hoff, tl.where(keep, 0.0, dh), mask=m)
            else:
                r = _ld(wp, m, ACC)
                z = _ld(wp + H, m, ACC)
                n = _ld(wp + 2 * H, m, ACC)
                hn = _ld(wp + 3 * H, m, ACC)
                h_prev = _ld(st_ptr + in_base + hoff, m, ACC)
                d_r, d_z, d_n = _gru_gate_grads(dh, r, z, n, hn, h_prev, keep, clip, HAS_CLIP)
                gp = gx_ptr + n_base + rows[:, None] * N + cols[None, :]
                tl.store(gp, d_r, mask=m)
                tl.store(gp + H, d_z, mask=m)
                tl.store(gp + 2 * H, d_n, mask=m)
                lp = dl_ptr + l_base + rows[:, None] * N + cols[None, :]
                tl.store(lp, d_r, mask=m)
                tl.store(lp + H, d_z, mask=m)
                tl.store(lp + 2 * H, d_n * r, mask=m)
                tile_g, tile_gy = _ln_grad_sums(d_r, d_z, d_n * r, d_n, gam_ptr, wp, cols, col_ok, m, H, ACC,
                                                False)
                sg += tile_g
                sgy += tile_gy
                tl.store(ch_ptr + wr + hoff, tl.where(keep, dh * z, dh), mask=m)
        if LSTM:
            # dc = dc_carried + grad_cell_states + the cell LN backward of dlc; then the gate gradients.
            tl.debug_barrier()
            rstd_c = _ld(row_ws + 10 * H + 1, row_ok, ACC)
            mg = sgc / H
            mgc = sgcc / H
            for j0 in range(0, H, BLOCK_J):
                cols = j0 + tl.arange(0, BLOCK_J)
                col_ok = cols < H
                m = row_ok[:, None] & col_ok[None, :]
                keep = valid[:, None] & col_ok[None, :]
                hoff = rows[:, None] * H + cols[None, :]
                wp = ws_ptr + ws_base + rows[:, None] * WS + cols[None, :]
                dh = _ld(dh_ptr + hoff, m, ACC)
                ch = _ld(wp + 8 * H, m, ACC)
                dlc = _ld(dl_ptr + l_base + hoff, m, ACC)
                from_h = rstd_c[:, None] * (dlc * _ld(gc_ptr + cols, col_ok, ACC)[None, :] - mg[:, None]
                                            - ch * mgc[:, None])
                dc = (_ld(gcs_ptr + out_base + hoff, m, ACC) + _ld(cc_ptr + rd + hoff, m, ACC)
                      + tl.where(keep, from_h, 0.0))
                if TRACK:
                    sq_c += _row_sq(dc, keep)
                si = _ld(wp, m, ACC)
                sf = _ld(wp + H, m, ACC)
                tg = _ld(wp + 2 * H, m, ACC)
                so = _ld(wp + 3 * H, m, ACC)
                t = _ld(wp + 9 * H, m, ACC)
                c_prev = _ld(cs_ptr + in_base + hoff, m, ACC)
                d_i, d_f, d_g, d_o = _lstm_gate_grads(dc, dh, si, sf, tg, so, c_prev, t, keep, clip, HAS_CLIP)
                gp = gx_ptr + n_base + rows[:, None] * N + cols[None, :]
                tl.store(gp, d_i, mask=m)
                tl.store(gp + H, d_f, mask=m)
                tl.store(gp + 2 * H, d_g, mask=m)
                tl.store(gp + 3 * H, d_o, mask=m)
                tl.store(cc_ptr + wr + hoff, tl.where(keep, dc * sf, dc), mask=m)
                tile_g, tile_gy = _ln_grad_sums(d_i, d_f, d_g, d_o, gam_ptr, wp, cols, col_ok, m, H, ACC,
                                                True)
                sg += tile_g
                sgy += tile_gy
        # The LN backward into dy = d(W_hh h_prev), from the gradients this step stored.
        tl.debug_barrier()
        mean_g = sg / N
        mean_gy = sgy / N
        if LSTM:
            src_ptr = gx_ptr + n_base
        else:
            src_ptr = dl_ptr + l_base
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            m = row_ok[:, None] & col_ok[None, :]
            keep = valid[:, None] & col_ok[None, :]
            g = (_ld(src_ptr + rows[:, None] * N + cols[None, :], m, ACC)
                 * _ld(gam_ptr + cols, col_ok, ACC)[None, :])
            yh = _ld(ws_ptr + ws_base + rows[:, None] * WS + 4 * H + cols[None, :], m, ACC)
            dy = rstd[:, None] * (g - mean_g[:, None] - yh * mean_gy[:, None])
            tl.store(dy_ptr + n_base + rows[:, None] * N + cols[None, :], tl.where(keep, dy, 0.0), mask=m)
        if TRACK:
            sq_ptr = gsq_ptr + tl.cast(pos, tl.int64) * B + rows
            tl.store(sq_ptr, tl.where(valid, sq_h, 0.0), mask=row_ok)
            if LSTM:
                tl.store(sq_ptr + tl.cast(T, tl.int64) * B, tl.where(valid, sq_c, 0.0), mask=row_ok)
        # The next step reads dy and the carries this step wrote, from every tile of the block.
        tl.debug_barrier()


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
    if LSTM:
        N = 4 * H
        WS = 10 * H + 2
        R_OFF = 10 * H
    else:
        N = 3 * H
        WS = 7 * H + 1
        R_OFF = 7 * H
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
            a0 = tg * si * (1.0 - si) * sc0
            a1 = cp * sf * (1.0 - sf) * sc1
            a2 = si * (1.0 - tg * tg) * sc2
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
            dn = (1.0 - z) * (1.0 - n * n)
            w0 = dn * hn * r * (1.0 - r) * sc0
            w1 = (hp - n) * z * (1.0 - z) * sc1
            w2 = dn * r * sc2
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


def _plan(H: int, G: int, dtype: torch.dtype) -> dict:
    """Block sizes. tl.dot needs every block dimension >= 16 on a GPU, so all are at least 16.

    A program keeps all G gates of its tile live through the gate update: tiles of 32 columns (16 for
    float64) over 8 warps keep it within the registers (bench/results/aot_*.md).
    """
    half = dtype in (torch.bfloat16, torch.float16)
    cols = 16 if dtype == torch.float64 else 32
    return {"BLOCK_B": 16, "BLOCK_N": _pow2_between(G * H, 16, cols), "BLOCK_J": _pow2_between(H, 16, cols),
            "BLOCK_K": _pow2_between(H, 16, 64 if half else 32), "num_warps": 8}


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
        grid = (triton.cdiv(R, 16),)
        _host.launch(_ln_jacobian_kernel, grid, wsc.contiguous(), hp, hp, gamma.contiguous(),
                     gamma_c.contiguous() if lstm else gamma.contiguous(), v.contiguous(), q.contiguous(),
                     u.contiguous(), wu, gram, diag, len_dev, jac[t0:t1].view(-1),
                     R, B, H, t0,
                     LSTM=lstm, HAS_LEN=lengths is not None, BLOCK_R=16, BLOCK_J=16, num_warps=8,
                     maxnreg=MAXNREG)
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
    plan = _plan(H, G, dtype)
    alloc = _plain._alloc
    states, cells = _plain._initial_states(T, h0, c0, reverse, acc)
    ws = alloc((T, B, workspace_width(mode, H)), acc, device)
    y = alloc((B, G * H), acc, device)
    shift = ln_hh_bias if b_hh is None else ln_hh_bias + b_hh
    gc = ln_cell_weight.contiguous() if lstm else states.new_empty(0)
    bc = ln_cell_bias.contiguous() if lstm else states.new_empty(0)
    len_dev = lengths.to(device) if lengths is not None else states.new_empty(0, dtype=torch.int64)
    with _plain._device_ctx(device):
        _host.launch(
            _ln_forward_kernel, (triton.cdiv(B, plan["BLOCK_B"]),), xproj.contiguous(), states, cells, ws, y,
            w_hh.t().contiguous(), ln_hh_weight.contiguous(),
            shift.contiguous(), gc, bc, len_dev, torch.tensor([eps], dtype=acc, device=device), T, B, H,
            LSTM=lstm, REVERSE=bool(reverse), HAS_LEN=lengths is not None, ACC=_TL[acc],
            DOT=_dot_tl(dtype, device), PRECISION=_plain._precision(dtype, device), BLOCK_B=plan["BLOCK_B"],
            BLOCK_N=plan["BLOCK_N"],
            BLOCK_J=plan["BLOCK_J"], BLOCK_K=plan["BLOCK_K"], num_warps=plan["num_warps"], maxnreg=MAXNREG,
        )
        if track:
            jac_sq = _jacobian_sq(ws, states, cells, w_hh, ln_hh_weight, ln_cell_weight, lengths, mode,
                                  reverse)
        else:
            jac_sq = states.new_empty(0, dtype=torch.float32)
    return states.to(dtype), cells.to(dtype), ws, jac_sq


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

    plan = _plan(H, G, dtype)
    alloc = _plain._alloc
    gs = grad_states.to(acc).contiguous()
    gcs = grad_cell_states.to(acc).contiguous() if lstm else gs.new_empty(0)
    st = states.to(acc).contiguous()
    cs = cell_states.to(acc).contiguous() if lstm else st.new_empty(0)
    ws = workspace.contiguous()
    w = w_hh.to(acc).contiguous()
    gx = alloc((T, B, N), acc, device)
    dl = alloc((T, B, H if lstm else N), acc, device)
    dy = alloc((T, B, N), acc, device)
    dh = alloc((B, H), acc, device)
    carry_h = torch.zeros(2, B, H, dtype=acc, device=device)
    carry_c = torch.zeros(2, B, H, dtype=acc, device=device) if lstm else carry_h
    gsq = alloc((2 if lstm else 1, T, B), torch.float64, device) if track else gs.new_empty(0)
    len_dev = lengths.to(device) if lengths is not None else gs.new_empty(0, dtype=torch.int64)
    gc = ln_cell_weight.contiguous() if lstm else gs.new_empty(0)
    with _plain._device_ctx(device):
        _host.launch(
            _ln_backward_kernel, (triton.cdiv(B, plan["BLOCK_B"]),), gs, gcs, st, cs, ws, w,
            ln_hh_weight.contiguous(), gc, len_dev, gx, dl, dy, dh, carry_h, carry_c,
            gsq, torch.tensor([grad_clip if grad_clip is not None else 0.0], dtype=acc, device=device),
            T, B, H,
            LSTM=lstm, REVERSE=bool(reverse), HAS_LEN=lengths is not None, HAS_CLIP=grad_clip is not None,
            TRACK=bool(track), ACC=_TL[acc], DOT=_dot_tl(dtype, device),
            PRECISION=_plain._precision(dtype, device), BLOCK_B=plan["BLOCK_B"],
            BLOCK_N=plan["BLOCK_N"], BLOCK_J=plan["BLOCK_J"], BLOCK_K=plan["BLOCK_K"],
            num_warps=plan["num_warps"], maxnreg=MAXNREG,
        )
    # The step processed first leaves its dy for the initial state.
    first, init = (T - 1, T) if reverse else (0, 0)
    grad_h0 = gs[init] + carry_h[0] + dy[first] @ w
    grad_c0 = (gcs[init] + carry_c[0]).to(dtype) if lstm else st.new_empty(0, dtype=dtype)
    h_prev = st[1:] if reverse else st[:-1]
    # One GEMM over all steps for grad_w_hh; the gains and shifts: sums over all rows.
    grad_w_hh = dy.reshape(T * B, N).t() @ h_prev.reshape(T * B, H)
    ln_grad = (gx if lstm else dl).reshape(T * B, N)
    ws2 = ws.reshape(T * B, -1)
    g_gamma = (ln_grad * ws2[:, 4 * H: 4 * H + N]).sum(0)
    g_beta = ln_grad.sum(0)
    if lstm:
        dl2 = dl.reshape(T * B, H)
        g_gamma_c, g_beta_c = (dl2 * ws2[:, 8 * H: 9 * H]).sum(0).to(dtype), dl2.sum(0).to(dtype)
    else:
        g_gamma_c = g_beta_c = None
    empty = st.new_empty(0, dtype=dtype)
    # b_hh and the LN shift enter the GRU's gates as one sum; a copy, since outputs may not alias.
    grad_b_hh = g_beta.to(dtype, copy=True) if has_b_hh else empty
    grad_sq = gsq if track else st.new_empty(0, dtype=torch.float64)
    return (gx.to(dtype), grad_h0.to(dtype), grad_c0, grad_w_hh.to(w_hh.dtype), grad_b_hh, g_gamma.to(dtype),
            g_beta.to(dtype), empty.clone() if g_gamma_c is None else g_gamma_c,
            empty.clone() if g_beta_c is None else g_beta_c, grad_sq)


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
