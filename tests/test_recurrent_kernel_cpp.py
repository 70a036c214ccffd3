"""Raw-op tests of the C++ recurrent kernels ``vgk::rnn_forward`` / ``vgk::rnn_backward`` and of the
layer ops with the input projection inside, ``vgk::rnn_layer_forward`` / ``vgk::rnn_layer_backward``.

Oracle: ``vgkernels.reference.recurrent.layer_forward`` (eager autograd, ``retain_grad`` for the
per-step gradient norms, ``jacrev`` for the step Jacobians); for ``grad_clip`` a hooked eager loop
in this file that clamps every gate pre-activation gradient.

Tolerances:
- float64 against the float64 oracle: rtol 1e-9, atol 1e-10 (values, every gradient, traces).
- float32 against the float64 oracle on O(1) data: rtol 1e-4, atol 1e-5.
- float64 ``gradcheck``: torch's defaults (eps 1e-6, atol 1e-5, rtol 1e-3).
- The linear regime (tiny inputs, orthogonal W_hh scaled by rho): rtol 1e-3, since tanh' = 1 - h^2
  is 1 only up to the tiny h^2.
- Different GEMM paths (brgemm, BLAS, at::addmm) and thread counts: rtol 1e-4, atol 1e-5 (float32: the
  paths sum the products of a weight gradient over the T*B rows in different orders).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import vgkernels  # noqa: F401
from vgkernels import _library
from vgkernels.reference import recurrent as reference

_library.require_cpp()
OPS = torch.ops.vgk
MODES = ("lstm", "gru", "rnn_tanh", "rnn_relu", "rnn_sigmoid")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1, "rnn_sigmoid": 1}
F64 = {"rtol": 1e-9, "atol": 1e-10}
F32 = {"rtol": 1e-4, "atol": 1e-5}
# Output dtypes that do not follow the input's: the squared norms (grad_sq in float64 against underflow).
SQ_DTYPES = {"jac_sq": torch.float32, "grad_sq": torch.float64}


def make_inputs(mode, T, B, H, dtype=torch.float64, lengths=False, b_hh=True, seed=0):
    """Random layer inputs on the scale of torch.nn's initialisation (W ~ U(-1/sqrt(H), 1/sqrt(H)))."""
    g = torch.Generator().manual_seed(seed)
    G = GATES[mode]
    k = H**-0.5
    xproj = torch.randn(T, B, G * H, generator=g, dtype=dtype)
    h0 = 0.5 * torch.randn(B, H, generator=g, dtype=dtype)
    c0 = torch.randn(B, H, generator=g, dtype=dtype) if mode == "lstm" else None
    w_hh = (torch.rand(G * H, H, generator=g, dtype=dtype) * 2 - 1) * 2 * k
    bias = 0.3 * torch.randn(G * H, generator=g, dtype=dtype) if mode == "gru" and b_hh else None
    lens = None
    if lengths:
        lens = torch.randint(1, T + 1, (B,), generator=g)
        lens[0] = T
    return xproj, h0, c0, w_hh, bias, lens


def op_forward(mode, xproj, h0, c0, w_hh, b_hh, lengths, reverse, track=True):
    return OPS.rnn_forward(xproj, h0, c0, w_hh, b_hh, lengths, None, mode, reverse, track)


def op_backward(
    mode, fwd, grad_states, grad_cells, w_hh, lengths, reverse, grad_clip=None, track=True, has_b_hh=False
):
    states, cells, workspace, _ = fwd
    return OPS.rnn_backward(
        grad_states,
        grad_cells,
        states,
        cells,
        workspace,
        w_hh,
        lengths,
        mode,
        reverse,
        grad_clip,
        track,
        has_b_hh,
    )


def upstream(mode, T, B, H, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    gs = torch.randn(T + 1, B, H, generator=g, dtype=dtype)
    gc = torch.randn(T + 1, B, H, generator=g, dtype=dtype) if mode == "lstm" else torch.empty(0, dtype=dtype)
    return gs, gc


def oracle(mode, xproj, h0, c0, w_hh, b_hh, lengths, reverse, gs, gc):
    """Forward values, traces and every gradient from the eager reference (in float64)."""
    inputs = (xproj, h0, c0, w_hh, b_hh)
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    res = reference.layer_forward(*leaves, lengths, mode, reverse, track=True)
    loss = (res.states * gs.double()).sum()
    if mode == "lstm":
        loss = loss + (res.cell_states * gc.double()).sum()
    loss.backward()
    grads = [t.grad if t is not None else None for t in leaves]
    return res, grads


def check_against_oracle(mode, T, B, H, dtype, reverse, lengths, tol):
    xproj, h0, c0, w_hh, b_hh, lens = make_inputs(mode, T, B, H, dtype, lengths)
    gs, gc = upstream(mode, T, B, H, dtype)
    fwd = op_forward(mode, xproj, h0, c0, w_hh, b_hh, lens, reverse)
    states, cells, workspace, jac = fwd
    gx, gh0, gc0, gw, gb, gsq = op_backward(mode, fwd, gs, gc, w_hh, lens, reverse, has_b_hh=b_hh is not None)
    res, (dx, dh0, dc0, dw, db) = oracle(mode, xproj, h0, c0, w_hh, b_hh, lens, reverse, gs, gc)

    def close(actual, expected, name):
        assert actual.dtype == SQ_DTYPES.get(name, dtype), name
        torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{name}: {m}")

    close(states, res.states, "states")
    close(jac, res.jac_sq, "jac_sq")
    close(gx, dx, "grad_xproj")
    close(gh0, dh0, "grad_h0")
    close(gw, dw, "grad_w_hh")
    close(gsq, res.grad_sq(), "grad_sq")
    if mode == "lstm":
        close(cells, res.cell_states, "cell_states")
        close(gc0, dc0, "grad_c0")
        assert workspace.shape == (T, B, 4 * H)
    else:
        assert cells.shape == (0,) and gc0.shape == (0,)
    if mode == "gru":
        assert workspace.shape == (T, B, 4 * H)
        close(gb, db, "grad_b_hh")
    else:
        assert gb.shape == (0,)
    if mode.startswith("rnn"):
        assert workspace.shape == (0,)
    return fwd


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("T,B,H", [(5, 3, 4), (1, 1, 1), (4, 1, 3), (3, 2, 37)])
def test_float64_matches_reference(mode, reverse, lengths, T, B, H):
    check_against_oracle(mode, T, B, H, torch.float64, reverse, lengths, F64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reverse", [False, True])
def test_float32_matches_reference(mode, reverse):
    check_against_oracle(mode, 6, 5, 37, torch.float32, reverse, True, F32)


def test_float32_hidden_256_matches_reference():
    # The sizes of the benchmark (vector loops, GEMM micro-kernels) on a short sequence.
    for mode in ("lstm", "gru", "rnn_tanh"):
        check_against_oracle(mode, 3, 9, 256, torch.float32, False, True, F32)


def test_gru_without_b_hh():
    check_against_oracle("gru", 4, 3, 5, torch.float64, False, False, F64)
    xproj, h0, _, w_hh, b_hh, _ = make_inputs("gru", 4, 3, 5)
    a = op_forward("gru", xproj, h0, None, w_hh, None, None, False)
    b = op_forward("gru", xproj, h0, None, w_hh, torch.zeros_like(b_hh), None, False)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_lengths_carry_state_and_zero_the_rest(mode):
    T, B, H = 6, 4, 5
    xproj, h0, c0, w_hh, b_hh, _ = make_inputs(mode, T, B, H)
    lens = torch.tensor([6, 2, 4, 1])
    gs, gc = upstream(mode, T, B, H, torch.float64)
    for reverse in (False, True):
        fwd = op_forward(mode, xproj, h0, c0, w_hh, b_hh, lens, reverse)
        states, cells, workspace, jac = fwd
        gx, _, _, _, _, gsq = op_backward(mode, fwd, gs, gc, w_hh, lens, reverse, has_b_hh=b_hh is not None)
        valid = torch.arange(T)[:, None] < lens[None, :]
        assert (jac[~valid] == 0).all() and (jac[valid] > 0).all()
        assert (gsq[:, ~valid] == 0).all() and (gsq[:, valid] > 0).all()
        assert (gx[~valid] == 0).all()
        if workspace.numel():
            assert (workspace[~valid] == 0).all()
        for b in range(B):
            n = int(lens[b])
            if reverse:  # positions T-1 .. n carry h0; h_n lands in slot 0
                assert torch.equal(states[n:, b], h0[b].expand(T + 1 - n, H))
            else:  # h_n stays in every slot after position n - 1
                assert torch.equal(states[n:, b], states[n, b].expand(T + 1 - n, H))
            if mode == "lstm":
                ref = c0[b] if reverse else cells[n, b]
                assert torch.equal(cells[n:, b], ref.expand(T + 1 - n, H))


# ------------------------------------------------------------------------------------------ grad_clip


def clipped_loop(mode, xproj, h0, c0, w_hh, b_hh, reverse, clip):
    """Eager loop whose hooks clamp every gate pre-activation gradient to [-clip, clip]."""

    def hook(g):
        return g.clamp(-clip, clip)

    T, H = xproj.shape[0], h0.shape[1]
    h, c = h0, c0
    outs, cells = [None] * T, [None] * T
    for t in range(T - 1, -1, -1) if reverse else range(T):
        gh = h @ w_hh.t()
        if mode == "lstm":
            pre = xproj[t] + gh
            pre.register_hook(hook)
            i, f, g, o = pre.chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        elif mode == "gru":
            gh = gh + b_hh
            r_pre = xproj[t, :, :H] + gh[:, :H]
            z_pre = xproj[t, :, H : 2 * H] + gh[:, H : 2 * H]
            r, z = torch.sigmoid(r_pre), torch.sigmoid(z_pre)
            n_pre = xproj[t, :, 2 * H :] + r * gh[:, 2 * H :]
            for p in (r_pre, z_pre, n_pre):
                p.register_hook(hook)
            h = (1 - z) * torch.tanh(n_pre) + z * h
        else:
            pre = xproj[t] + gh
            pre.register_hook(hook)
            act = {"rnn_tanh": torch.tanh, "rnn_relu": torch.relu, "rnn_sigmoid": torch.sigmoid}[mode]
            h = act(pre)
        outs[t], cells[t] = h, c
    states = torch.stack(outs + [h0] if reverse else [h0] + outs)
    cell_states = torch.stack(cells + [c0] if reverse else [c0] + cells) if mode == "lstm" else None
    return states, cell_states


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reverse", [False, True])
def test_grad_clip_matches_hooked_loop(mode, reverse):
    T, B, H = 5, 3, 4
    xproj, h0, c0, w_hh, b_hh, _ = make_inputs(mode, T, B, H)
    gs, gc = upstream(mode, T, B, H, torch.float64)
    gs, gc = 3 * gs, 3 * gc  # large enough that the clip bites
    clip = 0.1
    fwd = op_forward(mode, xproj, h0, c0, w_hh, b_hh, None, reverse)
    has_b = b_hh is not None
    gx, gh0, gc0, gw, gb, _ = op_backward(mode, fwd, gs, gc, w_hh, None, reverse, clip, has_b_hh=has_b)
    unclipped = op_backward(mode, fwd, gs, gc, w_hh, None, reverse, None, has_b_hh=has_b)

    leaves = [t.clone().requires_grad_() if t is not None else None for t in (xproj, h0, c0, w_hh, b_hh)]
    states, cells = clipped_loop(mode, *leaves, reverse, clip)
    loss = (states * gs).sum() + ((cells * gc).sum() if cells is not None else 0)
    loss.backward()
    torch.testing.assert_close(gx, leaves[0].grad, **F64)
    torch.testing.assert_close(gh0, leaves[1].grad, **F64)
    torch.testing.assert_close(gw, leaves[3].grad, **F64)
    if mode == "lstm":
        torch.testing.assert_close(gc0, leaves[2].grad, **F64)
    if mode == "gru":
        torch.testing.assert_close(gb, leaves[4].grad, **F64)
    assert gx.abs().max() <= clip
    assert unclipped[0].abs().max() > clip  # the clip changed something


# ------------------------------------------------------------------------------------------ gradcheck


class Layer(torch.autograd.Function):
    """The two raw ops as one differentiable function, for gradcheck."""

    @staticmethod
    def forward(ctx, xproj, h0, c0, w_hh, b_hh, mode, reverse, lengths):
        states, cells, workspace, _ = OPS.rnn_forward(
            xproj, h0, c0, w_hh, b_hh, lengths, None, mode, reverse, False
        )
        ctx.save_for_backward(states, cells, workspace, w_hh)
        ctx.args = (mode, reverse, lengths, b_hh is not None)
        if mode != "lstm":
            ctx.mark_non_differentiable(cells)
        return states, cells

    @staticmethod
    def backward(ctx, grad_states, grad_cells):
        states, cells, workspace, w_hh = ctx.saved_tensors
        mode, reverse, lengths, has_b = ctx.args
        if grad_states is None:
            grad_states = torch.zeros_like(states)
        if grad_cells is None:
            grad_cells = torch.zeros_like(cells)
        gx, gh0, gc0, gw, gb, _ = OPS.rnn_backward(
            grad_states,
            grad_cells,
            states,
            cells,
            workspace,
            w_hh,
            lengths,
            mode,
            reverse,
            None,
            False,
            has_b,
        )
        return (gx, gh0, gc0 if mode == "lstm" else None, gw, gb if has_b else None, None, None, None)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reverse,lengths", [(False, False), (True, True)])
def test_gradcheck(mode, reverse, lengths):
    xproj, h0, c0, w_hh, b_hh, lens = make_inputs(mode, 3, 2, 3, lengths=lengths, seed=4)
    if mode == "rnn_relu":  # keep pre-activations away from the kink at 0
        xproj = xproj + torch.sign(xproj) * 0.2
    inputs = [t.requires_grad_() if t is not None else None for t in (xproj, h0, c0, w_hh, b_hh)]

    def fn(x, h, c, w, b):
        return Layer.apply(x, h, c, w, b, mode, reverse, lens)

    assert torch.autograd.gradcheck(fn, inputs)


# ------------------------------------------------------------------------------------------ traces


def test_linear_regime_traces():
    # Orthogonal W scaled by rho, tiny inputs and h0 = 0: the tanh RNN is linear, each step's Jacobian
    # is rho Q (squared Frobenius norm rho^2 H), and a loss on the last output gives
    # ||dL/dh_t|| = rho^(T-1-t) ||dL/dh_{T-1}||.
    T, B, H, rho = 8, 2, 16, 0.8
    q, _ = torch.linalg.qr(torch.randn(H, H, dtype=torch.float64))
    w_hh = rho * q
    xproj = 1e-4 * torch.randn(T, B, H, dtype=torch.float64)
    h0 = torch.zeros(B, H, dtype=torch.float64)
    fwd = op_forward("rnn_tanh", xproj, h0, None, w_hh, None, None, False)
    expected_jac = torch.full((T, B), rho**2 * H, dtype=torch.float64)
    torch.testing.assert_close(fwd[3].double(), expected_jac, rtol=1e-3, atol=0)
    gs = torch.zeros(T + 1, B, H, dtype=torch.float64)
    gs[T] = torch.randn(B, H, dtype=torch.float64)
    gsq = op_backward("rnn_tanh", fwd, gs, torch.empty(0), w_hh, None, False)[5][0]
    norms = gsq.double().sqrt()
    expected = rho ** torch.arange(T - 1, -1, -1, dtype=torch.float64)[:, None] * norms[T - 1]
    torch.testing.assert_close(norms, expected, rtol=1e-3, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_tracking_changes_no_value(mode):
    # Untracked traces are empty tensors of their dtypes, and tracking leaves every other output bit for bit.
    T, B, H = 3, 5, 37
    xproj, h0, c0, w_hh, b_hh, lens = make_inputs(mode, T, B, H, torch.float32, lengths=True)
    gs, gc = upstream(mode, T, B, H, torch.float32)
    has_b = b_hh is not None
    plain = op_forward(mode, xproj, h0, c0, w_hh, b_hh, lens, False, track=False)
    tracked = op_forward(mode, xproj, h0, c0, w_hh, b_hh, lens, False, track=True)
    assert plain[3].shape == (0,) and plain[3].dtype == SQ_DTYPES["jac_sq"]
    assert tracked[3].shape == (T, B)
    for a, b in zip(plain[:3], tracked[:3], strict=True):
        assert torch.equal(a, b)
    plain_b = op_backward(mode, plain, gs, gc, w_hh, lens, False, 0.5, track=False, has_b_hh=has_b)
    tracked_b = op_backward(mode, plain, gs, gc, w_hh, lens, False, 0.5, track=True, has_b_hh=has_b)
    assert plain_b[5].shape == (0,) and plain_b[5].dtype == SQ_DTYPES["grad_sq"]
    assert tracked_b[5].shape == ((2 if mode == "lstm" else 1), T, B)
    for a, b in zip(plain_b[:5], tracked_b[:5], strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ robustness


def test_non_contiguous_inputs():
    mode, T, B, H = "lstm", 4, 3, 5
    xproj, h0, c0, w_hh, _, _ = make_inputs(mode, T, B, H)
    gs, gc = upstream(mode, T, B, H, torch.float64)
    fwd = op_forward(mode, xproj, h0, c0, w_hh, None, None, False)
    out = op_backward(mode, fwd, gs, gc, w_hh, None, False)
    x_nc = xproj.transpose(0, 1).contiguous().transpose(0, 1)
    h0_nc = h0.t().contiguous().t()
    c0_nc = torch.stack([c0, c0], -1)[..., 0]
    w_nc = w_hh.t().contiguous().t()
    assert not any(t.is_contiguous() for t in (x_nc, h0_nc, c0_nc, w_nc))
    fwd_nc = op_forward(mode, x_nc, h0_nc, c0_nc, w_nc, None, None, False)
    for a, b in zip(fwd, fwd_nc, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    states, cells, ws, _ = fwd
    out_nc = OPS.rnn_backward(
        gs.transpose(1, 2).contiguous().transpose(1, 2),
        gc[:, :, :, None][..., 0],
        states,
        cells,
        ws,
        w_nc,
        None,
        mode,
        False,
        None,
        True,
        False,
    )
    for a, b in zip(out, out_nc, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_nonfinite_stays_in_its_sample():
    mode, T, B, H = "lstm", 4, 3, 8
    xproj, h0, c0, w_hh, _, _ = make_inputs(mode, T, B, H, torch.float32)
    xproj[1, 0, 3] = float("nan")
    states, cells, _, jac = op_forward(mode, xproj, h0, c0, w_hh, None, None, False)
    assert states[2:, 0].isnan().any() and cells[2:, 0].isnan().any() and jac[1:, 0].isnan().all()
    assert states[:, 1:].isfinite().all() and jac[:, 1:].isfinite().all()


def test_batch_zero():
    for mode in MODES:
        xproj, h0, c0, w_hh, b_hh, _ = make_inputs(mode, 3, 0, 4)
        fwd = op_forward(mode, xproj, h0, c0, w_hh, b_hh, None, False)
        assert fwd[0].shape == (4, 0, 4)
        gs, gc = upstream(mode, 3, 0, 4, torch.float64)
        gx, gh0, _, gw, gb, gsq = op_backward(mode, fwd, gs, gc, w_hh, None, False, has_b_hh=b_hh is not None)
        assert gx.shape == (3, 0, GATES[mode] * 4) and (gw == 0).all()
        assert gsq.shape == ((2 if mode == "lstm" else 1), 3, 0)


def test_lstm_empty_cell_gradient_means_zero():
    # The autograd layer may pass an empty grad_cell_states when no gradient reaches the cell states.
    T, B, H = 4, 5, 6
    xproj, h0, c0, w_hh, _, lens = make_inputs("lstm", T, B, H, torch.float32, lengths=True)
    gs, _ = upstream("lstm", T, B, H, torch.float32)
    for reverse in (False, True):
        fwd = op_forward("lstm", xproj, h0, c0, w_hh, None, lens, reverse)
        zeros = op_backward("lstm", fwd, gs, torch.zeros(T + 1, B, H), w_hh, lens, reverse)
        empty = op_backward("lstm", fwd, gs, torch.empty(0), w_hh, lens, reverse)
        for a, b in zip(zeros, empty, strict=True):
            assert torch.equal(a, b)


GEMM_PATH_SCRIPT = """
import sys, torch, vgkernels._C  # noqa
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]))
out = []
for mode, G in (("lstm", 4), ("gru", 3), ("rnn_tanh", 1)):
    T, B, H = 5, 26, 37  # T * B >= 128 rows: brgemm where enabled (kBrgemmMinRows in recurrent.cpp)
    x = torch.randn(T, B, G * H); h0 = torch.randn(B, H); c0 = torch.randn(B, H) if mode == "lstm" else None
    w = torch.randn(G * H, H) * H ** -0.5; b = torch.randn(G * H) if mode == "gru" else None
    lens = torch.tensor([5, 3, 5, 1, 4, 5, 2] * 3 + [5, 1, 2, 3, 5])
    for reverse in (False, True):
        st, cs, ws, jac = torch.ops.vgk.rnn_forward(x, h0, c0, w, b, lens, None, mode, reverse, True)
        gs = torch.randn(T + 1, B, H); gc = torch.randn_like(cs)
        res = torch.ops.vgk.rnn_backward(gs, gc, st, cs, ws, w, lens, mode, reverse, 0.5, True, b is not None)
        out += [st, cs, ws, jac, *res]
        for rows in (B, 2 * B):  # the projection as one GEMM, and per step
            xs = torch.randn(T, rows, 29)
            w_ih = torch.randn(G * H, 29) * 29 ** -0.5
            b_ih = torch.randn(G * H)
            h, n = h0.repeat(2, 1)[:rows], lens.repeat(2)[:rows]
            c = c0.repeat(2, 1)[:rows] if c0 is not None else None
            fwd = torch.ops.vgk.rnn_layer_forward(xs, h, c, w_ih, w, b_ih, b_ih, None, n, None, None, mode,
                                                  reverse, True, None)
            grads = (torch.randn_like(fwd[0]), torch.randn_like(fwd[1]), torch.randn_like(fwd[2]))
            res = torch.ops.vgk.rnn_layer_backward(*grads, xs, h, c, fwd[0], fwd[3], fwd[4], w_ih, w, None, n,
                                                   None, mode, reverse, 0.5, True, True, True)
            out += [*fwd, *res]
torch.save(out, sys.argv[2])
"""


@pytest.mark.parametrize("env,threads", [("", 2), ("blas", 1), ("aten", 2)])
def test_gemm_paths_and_threads_agree(tmp_path, env, threads):
    # The per-step GEMMs run on brgemm (float, default), the BLAS, or at::addmm; and the batch rows are
    # split over threads. All must give the same results as the default path on one thread.
    script = tmp_path / "run.py"
    script.write_text(GEMM_PATH_SCRIPT)
    results = []
    for e, n in (("", 1), (env, threads)):
        out = tmp_path / f"out_{e or 'default'}_{n}.pt"
        environ = {k: v for k, v in os.environ.items() if k != "VGK_CPU_BLAS"}
        if e:
            environ["VGK_CPU_BLAS"] = e
        subprocess.run([sys.executable, str(script), str(n), str(out)], check=True, env=environ, timeout=300)
        results.append(torch.load(out))
    assert len(results[0]) == len(results[1]) == 60 + 180  # 12 layer calls of 6 + 9 tensors
    for a, b in zip(*results, strict=True):
        # the weight gradients sum over T * B = 130 rows, in another order on each path
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ bad input


def test_bad_forward_inputs():
    xproj, h0, c0, w_hh, _, _ = make_inputs("lstm", 3, 2, 4)
    fwd = OPS.rnn_forward

    with pytest.raises(ValueError, match="mode"):
        fwd(xproj, h0, c0, w_hh, None, None, None, "lstm2", False, False)
    with pytest.raises(TypeError, match="float32 or float64"):
        fwd(xproj.half(), h0.half(), c0.half(), w_hh.half(), None, None, None, "lstm", False, False)
    with pytest.raises(TypeError, match="h0 must have dtype"):
        fwd(xproj, h0.float(), c0, w_hh, None, None, None, "lstm", False, False)
    with pytest.raises(ValueError, match=r"xproj must have shape \[T, B, G\*H\]"):
        fwd(xproj[0], h0, c0, w_hh, None, None, None, "lstm", False, False)
    with pytest.raises(ValueError, match="T >= 1"):
        fwd(xproj[:0], h0, c0, w_hh, None, None, None, "lstm", False, False)
    with pytest.raises(ValueError, match="xproj must have shape"):
        fwd(xproj[..., :-1], h0, c0, w_hh, None, None, None, "lstm", False, False)
    with pytest.raises(ValueError, match="w_hh must have shape"):
        fwd(xproj, h0, c0, w_hh[:, :-1], None, None, None, "lstm", False, False)
    with pytest.raises(ValueError, match="c0"):
        fwd(xproj, h0, None, w_hh, None, None, None, "lstm", False, False)
    with pytest.raises(ValueError, match="c0 must have shape"):
        fwd(xproj, h0, c0[:1], w_hh, None, None, None, "lstm", False, False)
    with pytest.raises(ValueError, match="b_hh must be None"):
        fwd(xproj, h0, c0, w_hh, torch.zeros(16, dtype=torch.float64), None, None, "lstm", False, False)
    with pytest.raises(ValueError, match="lengths must lie in"):
        fwd(xproj, h0, c0, w_hh, None, torch.tensor([3, 4]), None, "lstm", False, False)
    with pytest.raises(ValueError, match="lengths must lie in"):
        fwd(xproj, h0, c0, w_hh, None, torch.tensor([0, 1]), None, "lstm", False, False)
    with pytest.raises(TypeError, match="lengths must have dtype"):
        fwd(xproj, h0, c0, w_hh, None, torch.tensor([1.0, 2.0]), None, "lstm", False, False)
    with pytest.raises(ValueError, match="lengths must have shape"):
        fwd(xproj, h0, c0, w_hh, None, torch.tensor([1, 2, 3]), None, "lstm", False, False)

    gx, gh, _, gw, gb, _ = make_inputs("gru", 3, 2, 4)
    with pytest.raises(ValueError, match="c0 must be None"):
        fwd(gx, gh, c0, gw, gb, None, None, "gru", False, False)
    with pytest.raises(ValueError, match="b_hh must have shape"):
        fwd(gx, gh, None, gw, gb[:-1], None, None, "gru", False, False)


def test_bad_backward_inputs():
    mode, T, B, H = "lstm", 3, 2, 4
    xproj, h0, c0, w_hh, _, _ = make_inputs(mode, T, B, H)
    states, cells, ws, _ = op_forward(mode, xproj, h0, c0, w_hh, None, None, False)
    gs, gc = upstream(mode, T, B, H, torch.float64)
    bwd = OPS.rnn_backward

    with pytest.raises(ValueError, match="grad_states must have shape"):
        bwd(gs[1:], gc, states, cells, ws, w_hh, None, mode, False, None, False, False)
    with pytest.raises(ValueError, match="grad_cell_states must have shape"):
        bwd(gs, gc[1:], states, cells, ws, w_hh, None, mode, False, None, False, False)
    with pytest.raises(ValueError, match="workspace must have shape"):
        bwd(gs, gc, states, cells, ws[..., 1:], w_hh, None, mode, False, None, False, False)
    with pytest.raises(ValueError, match="cell_states must have shape"):
        bwd(gs, gc, states, cells[1:], ws, w_hh, None, mode, False, None, False, False)
    with pytest.raises(ValueError, match="grad_clip must be None or > 0"):
        bwd(gs, gc, states, cells, ws, w_hh, None, mode, False, 0.0, False, False)
    with pytest.raises(TypeError, match="grad_states must have dtype"):
        bwd(gs.float(), gc, states, cells, ws, w_hh, None, mode, False, None, False, False)
    with pytest.raises(ValueError, match="states must have shape"):
        bwd(gs, gc, states[:1], cells, ws, w_hh, None, mode, False, None, False, False)
    with pytest.raises(ValueError, match="lengths must lie in"):
        bwd(gs, gc, states, cells, ws, w_hh, torch.tensor([4, 1]), mode, False, None, False, False)


# ------------------------------------------------------------------------------------------ layer ops
# vgk::rnn_layer_forward / rnn_layer_backward: the same layer with its input projection inside, output,
# h_n and c_n apart. Oracle: x W_ih^T + biases fed to the reference layer.


def make_layer_inputs(mode, T, B, I, H, dtype=torch.float64, lengths=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = GATES[mode]
    x = torch.randn(T, B, I, generator=g, dtype=dtype)
    h0 = 0.5 * torch.randn(B, H, generator=g, dtype=dtype)
    c0 = torch.randn(B, H, generator=g, dtype=dtype) if mode == "lstm" else None
    w_ih = (torch.rand(G * H, I, generator=g, dtype=dtype) * 2 - 1) * 2 * H**-0.5
    w_hh = (torch.rand(G * H, H, generator=g, dtype=dtype) * 2 - 1) * 2 * H**-0.5
    b_ih = 0.3 * torch.randn(G * H, generator=g, dtype=dtype) if bias else None
    b_hh = 0.3 * torch.randn(G * H, generator=g, dtype=dtype) if bias else None
    lens = None
    if lengths:
        lens = torch.randint(1, T + 1, (B,), generator=g)
        lens[0] = T
    return x, h0, c0, w_ih, w_hh, b_ih, b_hh, lens


def layer_upstream(mode, T, B, H, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(T, B, H, generator=g, dtype=dtype)
    ghn = torch.randn(B, H, generator=g, dtype=dtype)
    gcn = torch.randn(B, H, generator=g, dtype=dtype) if mode == "lstm" else torch.empty(0, dtype=dtype)
    return go, ghn, gcn


def layer_op_forward(mode, inp, reverse, track=True):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, lens = inp
    return OPS.rnn_layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, lens, None, None, mode, reverse,
                                 track, None)


def layer_op_backward(mode, inp, fwd, grads, reverse, grad_clip=None, track=True, grad_input=True):
    x, h0, c0, w_ih, w_hh, b_ih, _, lens = inp
    out, _, _, cells, ws, _ = fwd
    return OPS.rnn_layer_backward(*grads, x, h0, c0, out, cells, ws, w_ih, w_hh, None, lens, None, mode,
                                  reverse, grad_clip, track, b_ih is not None, grad_input)


def layer_oracle(mode, inp, reverse, grads):
    """Outputs, traces and every gradient of the reference layer on x W_ih^T + biases (float64)."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inp[:7]]
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = leaves
    xproj = x @ w_ih.t()
    if b_ih is not None:
        xproj = xproj + b_ih + (0 if mode == "gru" else b_hh)
    T = x.shape[0]
    res = reference.layer_forward(xproj, h0, c0, w_hh, b_hh if mode == "gru" else None, inp[7], mode, reverse,
                                  track=True)
    last, seq = (0, slice(0, T)) if reverse else (T, slice(1, T + 1))
    out, h_n = res.states[seq], res.states[last]
    go, ghn, gcn = (g.double() for g in grads)
    loss = (out * go).sum() + (h_n * ghn).sum()
    expected = {"output": out, "h_n": h_n, "jac_sq": res.jac_sq}
    if mode == "lstm":
        expected.update(c_n=res.cell_states[last], cell_states=res.cell_states[seq])
        loss = loss + (res.cell_states[last] * gcn).sum()
    loss.backward()
    names = ("grad_x", "grad_h0", "grad_c0", "grad_w_ih", "grad_w_hh", "grad_b_ih", "grad_b_hh")
    expected.update({n: t.grad for n, t in zip(names, leaves, strict=True) if t is not None})
    expected["grad_sq"] = res.grad_sq()
    return expected


def check_layer_against_oracle(mode, T, B, I, H, dtype, reverse, lengths, tol, bias=True):
    inp = make_layer_inputs(mode, T, B, I, H, dtype, lengths, bias)
    grads = layer_upstream(mode, T, B, H, dtype)
    fwd = layer_op_forward(mode, inp, reverse)
    bwd = layer_op_backward(mode, inp, fwd, grads, reverse)
    expected = layer_oracle(mode, inp, reverse, grads)
    actual = dict(zip(("output", "h_n", "c_n", "cell_states", "workspace", "jac_sq"), fwd, strict=True))
    actual.update(zip(("grad_x", "grad_h0", "grad_c0", "grad_w_ih", "grad_w_hh", "grad_b_ih", "grad_b_hh",
                       "grad_w_hr", "grad_sq"), bwd, strict=True))
    for name, value in expected.items():
        assert actual[name].dtype == SQ_DTYPES.get(name, dtype), name
        torch.testing.assert_close(actual[name].double(), value.double(), **tol,
                                   msg=lambda m, n=name: f"{n}: {m}")
    lstm = mode == "lstm"
    assert actual["workspace"].shape == ((T, B, 4 * H) if mode in ("lstm", "gru") else (0,))
    if not lstm:
        assert actual["c_n"].shape == actual["cell_states"].shape == actual["grad_c0"].shape == (0,)
    if not bias:
        assert actual["grad_b_ih"].shape == actual["grad_b_hh"].shape == (0,)
    return inp, fwd, bwd


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("T,B,I,H", [(5, 3, 4, 6), (1, 1, 1, 1), (4, 1, 3, 3), (3, 2, 7, 37), (3, 9, 5, 4)])
def test_layer_float64_matches_reference(mode, reverse, lengths, T, B, I, H):
    # B >= 8 runs the input projection per step inside the time loop, fewer rows as one GEMM.
    check_layer_against_oracle(mode, T, B, I, H, torch.float64, reverse, lengths, F64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reverse", [False, True])
def test_layer_float32_matches_reference(mode, reverse):
    for B in (5, 10):
        check_layer_against_oracle(mode, 6, B, 11, 37, torch.float32, reverse, True, F32)


def test_layer_float32_size_256_matches_reference():
    # The sizes of the benchmark (brgemm on x_t W_ih^T and gx_t W_ih, the tiled weight GEMMs).
    for mode in ("lstm", "gru", "rnn_tanh"):
        for reverse in (False, True):
            check_layer_against_oracle(mode, 3, 9, 256, 256, torch.float32, reverse, True, F32)


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("mode,B,H",
                         [(mode, 3, 512) for mode in MODES] + [("lstm", 37, 256), ("gru", 37, 384)])
def test_layer_one_step_split_by_columns_matches_reference(mode, B, H, two_threads):
    # T = 1 calls of at least 2^20 multiply-adds (B * G*H * (I + H)) run both products over the threads by
    # blocks of columns where the weights take 4 MiB or more, or the batch has fewer than 4 rows a thread,
    # with fewer than 128 rows.
    G = GATES[mode]
    assert B < 128
    assert B * G * H * 2 * H >= 2**20
    assert B < 8 or G * H * 2 * H * 8 >= 4 << 20
    for reverse, lengths, bias in ((False, False, True), (True, True, True), (False, True, False)):
        check_layer_against_oracle(mode, 1, B, H, H, torch.float64, reverse, lengths, F64, bias=bias)
    if B < 8:
        check_layer_against_oracle(mode, 1, B, H, H, torch.float32, False, False, F32)


@pytest.mark.parametrize("mode", MODES)
def test_layer_without_bias(mode):
    for B in (3, 8):
        check_layer_against_oracle(mode, 4, B, 5, 6, torch.float64, False, False, F64, bias=False)


@pytest.mark.parametrize("mode", MODES)
def test_layer_matches_the_xproj_ops(mode):
    # The fused ops and rnn_forward/rnn_backward on x W_ih^T + b agree (same kernels underneath).
    T, B, I, H = 4, 5, 6, 7
    inp = make_layer_inputs(mode, T, B, I, H, lengths=True)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, lens = inp
    for reverse in (False, True):
        out, h_n, c_n, cells, ws, jac = layer_op_forward(mode, inp, reverse)
        xproj = x @ w_ih.t() + b_ih + (0 if mode == "gru" else b_hh)
        states, cs, ws2, jac2 = op_forward(mode, xproj, h0, c0, w_hh, b_hh if mode == "gru" else None, lens,
                                           reverse)
        seq, last = (slice(0, T), 0) if reverse else (slice(1, T + 1), T)
        torch.testing.assert_close(out, states[seq], **F64)
        torch.testing.assert_close(h_n, states[last], **F64)
        torch.testing.assert_close(ws, ws2, **F64)
        torch.testing.assert_close(jac, jac2, **F64)
        if mode == "lstm":
            torch.testing.assert_close(cells, cs[seq], **F64)
            torch.testing.assert_close(c_n, cs[last], **F64)


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("B", [5, 8])
def test_layer_absent_gradients_mean_zero(mode, B):
    # Empty grad_output / grad_h_n / grad_c_n stand for zeros; grad_input=False skips grad_x.
    T, I, H = 4, 3, 6
    inp = make_layer_inputs(mode, T, B, I, H, torch.float32, lengths=True)
    go, ghn, gcn = layer_upstream(mode, T, B, H, torch.float32)
    empty = torch.empty(0)
    for reverse in (False, True):
        fwd = layer_op_forward(mode, inp, reverse)
        cases = [((go, empty, empty), (go, torch.zeros_like(ghn), torch.zeros_like(ghn))),
                 ((empty, ghn, empty), (torch.zeros_like(go), ghn, torch.zeros_like(ghn)))]
        if mode == "lstm":
            cases.append(((empty, empty, gcn), (torch.zeros_like(go), torch.zeros_like(ghn), gcn)))
        for absent, zeros in cases:
            a = layer_op_backward(mode, inp, fwd, absent, reverse)
            b = layer_op_backward(mode, inp, fwd, zeros if mode == "lstm" else zeros[:2] + (empty,), reverse)
            for u, v in zip(a, b, strict=True):
                assert torch.equal(u, v)
        full = layer_op_backward(mode, inp, fwd, (go, ghn, gcn), reverse)
        no_x = layer_op_backward(mode, inp, fwd, (go, ghn, gcn), reverse, grad_input=False)
        assert no_x[0].shape == (0,)
        for u, v in zip(full[1:], no_x[1:], strict=True):
            assert torch.equal(u, v)


@pytest.mark.parametrize("mode", MODES)
def test_layer_lengths_carry_state_and_zero_the_rest(mode):
    T, B, I, H = 6, 4, 3, 5
    inp = make_layer_inputs(mode, T, B, I, H)
    x, h0, c0 = inp[:3]
    lens = torch.tensor([6, 2, 4, 1])
    inp = (*inp[:7], lens)
    grads = layer_upstream(mode, T, B, H, torch.float64)
    valid = torch.arange(T)[:, None] < lens[None, :]
    for reverse in (False, True):
        fwd = layer_op_forward(mode, inp, reverse)
        out, h_n, c_n, cells, _, jac = fwd
        gx, *_, gsq = layer_op_backward(mode, inp, fwd, grads, reverse)
        assert (jac[~valid] == 0).all() and (jac[valid] > 0).all()
        assert (gsq[:, ~valid] == 0).all() and (gsq[:, valid] > 0).all()
        assert (gx[~valid] == 0).all() and (gx[valid] != 0).any(-1).all()
        for b in range(B):
            n = int(lens[b])
            carried = h0[b] if reverse else out[n - 1, b]
            assert torch.equal(out[n:, b], carried.expand(T - n, H))
            assert torch.equal(h_n[b], out[0 if reverse else T - 1, b])
            if mode == "lstm":
                assert torch.equal(cells[n:, b], (c0[b] if reverse else cells[n - 1, b]).expand(T - n, H))
                assert torch.equal(c_n[b], cells[0 if reverse else T - 1, b])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("B", [3, 8])
def test_layer_grad_clip_matches_hooked_loop(mode, reverse, B):
    I, T, H = 4, 5, 4
    inp = make_layer_inputs(mode, T, B, I, H)
    go, ghn, gcn = (3 * g for g in layer_upstream(mode, T, B, H, torch.float64))  # large: the clip bites
    clip = 0.1
    fwd = layer_op_forward(mode, inp, reverse)
    got = layer_op_backward(mode, inp, fwd, (go, ghn, gcn), reverse, clip)

    leaves = [t.clone().requires_grad_() if t is not None else None for t in inp[:7]]
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = leaves
    xproj = x @ w_ih.t() + b_ih + (0 if mode == "gru" else b_hh)
    states, cells = clipped_loop(mode, xproj, h0, c0, w_hh, b_hh if mode == "gru" else None, reverse, clip)
    seq, last = (slice(0, T), 0) if reverse else (slice(1, T + 1), T)
    loss = (states[seq] * go).sum() + (states[last] * ghn).sum()
    if mode == "lstm":
        loss = loss + (cells[last] * gcn).sum()
    loss.backward()
    for value, leaf in zip(got[:7], leaves, strict=True):
        if leaf is not None:
            torch.testing.assert_close(value, leaf.grad, **F64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B", [5, 8])
def test_layer_tracking_changes_no_value(mode, B):
    T, I, H = 3, 4, 37
    inp = make_layer_inputs(mode, T, B, I, H, torch.float32, lengths=True)
    grads = layer_upstream(mode, T, B, H, torch.float32)
    plain = layer_op_forward(mode, inp, False, track=False)
    tracked = layer_op_forward(mode, inp, False, track=True)
    assert plain[5].shape == (0,) and plain[5].dtype == torch.float32 and tracked[5].shape == (T, B)
    for a, b in zip(plain[:5], tracked[:5], strict=True):
        assert torch.equal(a, b)
    plain_b = layer_op_backward(mode, inp, plain, grads, False, 0.5, track=False)
    tracked_b = layer_op_backward(mode, inp, plain, grads, False, 0.5, track=True)
    assert plain_b[8].shape == (0,) and tracked_b[8].shape == ((2 if mode == "lstm" else 1), T, B)
    for a, b in zip(plain_b[:8], tracked_b[:8], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("B", [3, 8])
def test_layer_non_contiguous_inputs(B):
    mode, T, I, H = "lstm", 4, 5, 6
    inp = make_layer_inputs(mode, T, B, I, H)
    grads = layer_upstream(mode, T, B, H, torch.float64)
    fwd = layer_op_forward(mode, inp, False)
    bwd = layer_op_backward(mode, inp, fwd, grads, False)

    def nc(t):
        return t if t is None or t.dim() < 2 else t.transpose(0, 1).contiguous().transpose(0, 1)

    inp_nc = tuple(nc(t) for t in inp)
    assert not any(t.is_contiguous() for t in inp_nc[:5])
    fwd_nc = layer_op_forward(mode, inp_nc, False)
    for a, b in zip(fwd, fwd_nc, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    out, _, _, cells, ws, _ = fwd
    grads_nc = tuple(nc(g) for g in grads)
    bwd_nc = OPS.rnn_layer_backward(*grads_nc, *(nc(t) for t in inp[:3]), nc(out), nc(cells), nc(ws),
                                    *(nc(t) for t in inp[3:5]), None, None, None, mode, False, None, True,
                                    True, True)
    for a, b in zip(bwd, bwd_nc, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B", [1, 8])
def test_layer_ops_leave_their_inputs_alone(mode, B):
    inp = make_layer_inputs(mode, 1, B, 3, 4)
    saved = [t.clone() if t is not None else None for t in inp]
    fwd = layer_op_forward(mode, inp, False)
    grads = layer_upstream(mode, 1, B, 4, torch.float64)
    saved_grads = [g.clone() for g in grads]
    layer_op_backward(mode, inp, fwd, grads, False)
    for a, b in zip(inp + grads, saved + saved_grads, strict=True):
        assert a is None or torch.equal(a, b)


def test_layer_batch_zero():  # few rows: the projection as one GEMM over no rows
    for mode in MODES:
        inp = make_layer_inputs(mode, 3, 0, 2, 4)
        fwd = layer_op_forward(mode, inp, False)
        assert fwd[0].shape == (3, 0, 4) and fwd[1].shape == (0, 4)
        bwd = layer_op_backward(mode, inp, fwd, layer_upstream(mode, 3, 0, 4, torch.float64), False)
        assert bwd[0].shape == (3, 0, 2)
        assert (bwd[3] == 0).all() and (bwd[4] == 0).all() and (bwd[5] == 0).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reverse,lengths", [(False, False), (True, True)])
def test_layer_gradcheck(mode, reverse, lengths):
    # Through the autograd registered on vgk::rnn_layer_forward (vgkernels.ops.recurrent).
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, lens = make_layer_inputs(mode, 3, 2, 2, 3, lengths=lengths, seed=4)
    if mode == "rnn_relu":  # keep pre-activations away from the kink at 0
        x = x + torch.sign(x) * 0.3
    inputs = [t.requires_grad_() if t is not None else None for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh)]

    def fn(*args):
        out, h_n, c_n = OPS.rnn_layer_forward(*args, None, lens, None, None, mode, reverse, False, None)[:3]
        return (out, h_n, c_n) if mode == "lstm" else (out, h_n)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
def test_layer_opcheck(mode):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, _ = make_layer_inputs(mode, 4, 3, 2, 5)
    K = 2 if mode == "lstm" else 1
    for lens, reverse in ((None, False), (torch.tensor([4, 1, 3]), True)):
        leaves = [t.requires_grad_() if t is not None else None for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh)]
        probe = torch.zeros(K, 4, 3, requires_grad=True)
        torch.library.opcheck(OPS.rnn_layer_forward.default,
                              (*leaves, None, lens, None, probe, mode, reverse, True, 0.5))
        detached = [t.detach() if t is not None else None for t in leaves]
        out, h_n, c_n, cells, ws, _ = OPS.rnn_layer_forward(*detached, None, lens, None, None, mode, reverse,
                                                            True, None)
        grads = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n))
        for grad_input in (True, False):
            args = (*grads, *detached[:3], out, cells, ws, *detached[3:5], None, lens, None, mode, reverse,
                    0.5, True, True, grad_input)
            torch.library.opcheck(OPS.rnn_layer_backward.default, args)


def test_layer_bad_inputs():
    mode, T, B, I, H = "lstm", 3, 2, 5, 4
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, _ = make_layer_inputs(mode, T, B, I, H)
    fwd = OPS.rnn_layer_forward

    def call(**kw):
        a = dict(x=x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=None, lengths=None,
                 batch_sizes=None)
        a.update(kw)
        return fwd(*a.values(), None, mode, False, False, None)

    with pytest.raises(ValueError, match=r"x must have shape \[T, B, I\]"):
        call(x=x[0])
    with pytest.raises(ValueError, match="T >= 1"):
        call(x=x[:0])
    with pytest.raises(TypeError, match="float32 or float64"):
        fwd(x.half(), h0, c0, w_ih, w_hh, b_ih, b_hh, None, None, None, None, mode, False, False, None)
    with pytest.raises(ValueError, match="w_ih must have shape"):
        call(w_ih=w_ih[:, :-1])
    with pytest.raises(ValueError, match="w_hh must have shape"):
        call(w_hh=w_hh[:-1])
    with pytest.raises(TypeError, match="w_hh must have dtype"):
        call(w_hh=w_hh.float())
    with pytest.raises(ValueError, match="b_ih must have shape"):
        call(b_ih=b_ih[:-1])
    with pytest.raises(ValueError, match="b_hh must have shape"):
        call(b_hh=b_hh[:-1])
    with pytest.raises(ValueError, match="c0"):
        call(c0=None)
    with pytest.raises(ValueError, match="h0 must have shape"):
        call(h0=h0[:1])
    with pytest.raises(ValueError, match="lengths must lie in"):
        call(lengths=torch.tensor([4, 1]))

    out, h_n, c_n, cells, ws, _ = fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, None, None, None, mode, False,
                                      False, None)
    bwd = OPS.rnn_layer_backward

    def call_b(clip=None, **kw):
        a = dict(go=torch.randn_like(out), ghn=torch.randn_like(h_n), gcn=torch.randn_like(c_n), x=x, h0=h0,
                 c0=c0, out=out, cells=cells, ws=ws, w_ih=w_ih, w_hh=w_hh, w_hr=None, lengths=None,
                 batch_sizes=None)
        a.update(kw)
        return bwd(*a.values(), mode, False, clip, False, True, True)

    with pytest.raises(ValueError, match="grad_output must have shape"):
        call_b(go=out[1:])
    with pytest.raises(ValueError, match="grad_h_n must have shape"):
        call_b(ghn=h_n[:1])
    with pytest.raises(ValueError, match="grad_c_n must have shape"):
        call_b(gcn=c_n[:, :1])
    with pytest.raises(ValueError, match="x must have shape"):
        call_b(x=x[1:])
    with pytest.raises(ValueError, match="cell_states must have shape"):
        call_b(cells=cells[1:])
    with pytest.raises(ValueError, match="workspace must have shape"):
        call_b(ws=ws[..., 1:])
    with pytest.raises(ValueError, match="grad_clip must be None or > 0"):
        call_b(clip=-1.0)
    with pytest.raises(TypeError, match="grad_output must have dtype"):
        call_b(go=torch.randn_like(out).float())


# Buffers of 1 MiB or more (outputs, workspace, temporaries) come from a cache of freed blocks.
CACHE_SCRIPT = """
import sys, torch, vgkernels._C  # noqa
torch.manual_seed(0)
T, B, I, H = 40, 16, 64, 128
out = []
for mode, G in (("lstm", 4), ("gru", 3), ("rnn_tanh", 1)):
    x = torch.randn(B, T, I).transpose(0, 1)  # not contiguous: copied into a cached buffer
    h0 = torch.randn(B, H); c0 = torch.randn(B, H) if mode == "lstm" else None
    w_ih = torch.randn(G * H, I) * I ** -0.5; w_hh = torch.randn(G * H, H) * H ** -0.5
    b = torch.randn(G * H)
    for reverse in (False, True):
        for _ in range(2):  # the second call reuses the blocks the first one freed
            fwd = torch.ops.vgk.rnn_layer_forward(x, h0, c0, w_ih, w_hh, b, b, None, None, None, None, mode,
                                                  reverse, True, None)
            ones = torch.ones(()).expand(T, B, H)  # the gradient of out.sum(): copied into a cached buffer
            grads = (ones, torch.randn_like(fwd[1]), torch.randn_like(fwd[2]))
            res = torch.ops.vgk.rnn_layer_backward(*grads, x, h0, c0, fwd[0], fwd[3], fwd[4], w_ih, w_hh,
                                                   None, None, None, mode, reverse, None, True, True, True)
        out += [*fwd, *res]
torch.save(out, sys.argv[1])
"""


def test_block_cache_changes_no_value(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(CACHE_SCRIPT)
    results = []
    for limit in (None, "0"):
        out = tmp_path / f"out_{limit}.pt"
        environ = {k: v for k, v in os.environ.items() if k != "VGK_CPU_CACHE_MB"}
        if limit is not None:
            environ["VGK_CPU_CACHE_MB"] = limit
        subprocess.run([sys.executable, str(script), str(out)], check=True, env=environ, timeout=300)
        results.append(torch.load(out))
    assert max(t.numel() * t.element_size() for t in results[0]) >= 2**20
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_layer_live_outputs_keep_their_values():
    # Later calls reuse only the blocks of freed tensors, never those of live ones.
    mode, T, B, I, H = "lstm", 40, 16, 64, 128
    inp = make_layer_inputs(mode, T, B, I, H, torch.float32)
    grads = layer_upstream(mode, T, B, H, torch.float32)
    fwd = layer_op_forward(mode, inp, False)
    bwd = layer_op_backward(mode, inp, fwd, grads, False)
    assert fwd[4].numel() * 4 >= 2**20
    kept = [t.clone() for t in fwd + bwd]
    for seed in (1, 2):
        other = make_layer_inputs(mode, T, B, I, H, torch.float32, seed=seed)
        o_fwd = layer_op_forward(mode, other, True)
        layer_op_backward(mode, other, o_fwd, grads, True)
        del o_fwd
    for a, b in zip(fwd + bwd, kept, strict=True):
        assert torch.equal(a, b)


EVICTION_SCRIPT = """
import json, sys, torch
import vgkernels
from vgkernels._C import cpu_block_cache_stats as stats

def outputs(rows, count):
    # count live LayerNorm outputs of rows x 1024 float32 (4 KiB a row), taken from the block cache
    with torch.no_grad():
        return [vgkernels.ops.layer_norm(torch.randn(rows, 1024), 1024, backend="cpp") for _ in range(count)]

held = outputs(1024, 2)   # two 4 MiB blocks
del held                  # both idle: the 8 MiB cap is full
full = stats()
for _ in range(3):        # a new size: 6 MiB, asked for again and again
    outputs(1536, 1)
after = stats()
print(json.dumps({"full": full, "after": after}))
"""


def test_block_cache_gives_back_the_longest_idle_blocks_for_new_sizes():
    # With the cap full of blocks of an old size, a new size must still be cached: the old blocks go.
    environ = {**os.environ, "VGK_CPU_CACHE_MB": "8"}
    out = subprocess.run([sys.executable, "-c", EVICTION_SCRIPT], check=True, env=environ, timeout=300,
                         capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    full, after = result["full"], result["after"]
    assert full["limit_bytes"] == 8 << 20
    assert full["idle_bytes"] == 8 << 20 and full["idle_blocks"] == 2
    # The first 6 MiB call misses; the next two reuse its block.
    assert after["misses"] - full["misses"] == 1
    assert after["hits"] - full["hits"] == 2
    assert after["idle_blocks"] == 1 and after["idle_bytes"] == 6 << 20
