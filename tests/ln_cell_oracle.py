"""Eager float64 oracle of the layer-normalized recurrent kernel ops (vgk::rnn_ln_forward/backward).

It follows the ops' semantics directly: F.layer_norm inside a Python loop over positions, lengths by
carrying the state, reverse order, gate pre-activation gradients clamped by hooks for grad_clip. Every
state h_t (and c_t) gets a zero perturbation whose gradient is the total derivative ∂loss/∂h_t (∂loss/∂c_t,
through h_t and c_{t+1}); h_t is computed from the perturbed c_t so that both paths count. The step
Jacobian norms come from torch.func.jacrev of one reference step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vgkernels.reference import recurrent as reference

GATES = {"lstm": 4, "gru": 3}
EPS = 1e-5
# (rtol, atol) of the ops against the oracle, by input dtype.
TOL = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-4, 1e-5)}


def make_inputs(mode, T, B, H, dtype=torch.float64, lengths=None, gru_bias=True, seed=0):
    """The forward op's tensor arguments as a dict (lengths int64 or None)."""
    G = GATES[mode]
    gen = torch.Generator().manual_seed(seed + 1000 * T + 100 * B + H)

    def rand(*shape, s=1.0, m=0.0):
        return (m + s * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    lstm = mode == "lstm"
    return dict(
        xproj=rand(T, B, G * H),
        h0=rand(B, H, s=0.5),
        c0=rand(B, H) if lstm else None,
        w_hh=rand(G * H, H, s=1.0 / H ** 0.5),
        b_hh=rand(G * H, s=0.5) if (mode == "gru" and gru_bias) else None,
        ln_hh_weight=rand(G * H, s=0.3, m=1.0),
        ln_hh_bias=rand(G * H, s=0.3),
        ln_cell_weight=rand(H, s=0.3, m=1.0) if lstm else None,
        ln_cell_bias=rand(H, s=0.3) if lstm else None,
        lengths=None if lengths is None else torch.tensor(lengths, dtype=torch.int64),
    )


def make_output_grads(mode, T, B, H, dtype=torch.float64, seed=0):
    """grad_states [T+1, B, H] and grad_cell_states ([T+1, B, H] for the LSTM, else [0])."""
    gen = torch.Generator().manual_seed(seed + 7)
    gs = torch.randn(T + 1, B, H, generator=gen, dtype=torch.float64).to(dtype)
    gcs = (torch.randn(T + 1, B, H, generator=gen, dtype=torch.float64).to(dtype) if mode == "lstm"
           else torch.zeros(0, dtype=dtype))
    return gs, gcs


def forward_args(inp, mode, reverse, track):
    """Positional arguments of vgk::rnn_ln_forward(_triton) from a make_inputs dict."""
    return (inp["xproj"], inp["h0"], inp["c0"], inp["w_hh"], inp["b_hh"], inp["ln_hh_weight"],
            inp["ln_hh_bias"], inp["ln_cell_weight"], inp["ln_cell_bias"], EPS, inp["lengths"], mode, reverse,
            track)


def backward_args(inp, fwd, gs, gcs, mode, reverse, clip, track):
    """Positional arguments of vgk::rnn_ln_backward(_triton)."""
    states, cells, ws, _ = fwd
    return (gs, gcs, states, cells, ws, inp["w_hh"], inp["ln_hh_weight"], inp["ln_cell_weight"],
            inp["lengths"], mode, reverse, clip, track, inp["b_hh"] is not None)


FORWARD_NAMES = ("states", "cell_states", "workspace", "jac_sq")
INPUT_NAMES = ("xproj", "h0", "c0", "w_hh", "b_hh", "ln_hh_weight", "ln_hh_bias", "ln_cell_weight",
               "ln_cell_bias")
BACKWARD_NAMES = ("grad_xproj", "grad_h0", "grad_c0", "grad_w_hh", "grad_b_hh", "grad_ln_hh_weight",
                  "grad_ln_hh_bias", "grad_ln_cell_weight", "grad_ln_cell_bias", "grad_sq")


def oracle(inp, mode, reverse, gs, gcs, clip=None, track=True):
    """Float64 forward outputs and every backward output of the ops, as a dict."""
    lstm = mode == "lstm"
    p = {k: None if inp[k] is None else inp[k].detach().double().requires_grad_() for k in INPUT_NAMES}
    x, w = p["xproj"], p["w_hh"]
    T, B, _ = x.shape
    H = w.shape[1]
    lengths = inp["lengths"]
    valid = (torch.ones(T, B, dtype=torch.bool) if lengths is None
             else torch.arange(T)[:, None] < lengths[None, :])
    dh_probe = torch.zeros(T, B, H, dtype=torch.float64, requires_grad=True)
    dc_probe = torch.zeros(T, B, H, dtype=torch.float64, requires_grad=True)
    norm = reference.CellNorm(p["ln_hh_weight"], p["ln_hh_bias"], p["ln_cell_weight"], p["ln_cell_bias"], EPS)
    clamp = (lambda g: g.clamp(-clip, clip)) if clip is not None else None

    def hook(t):
        if clamp is not None:
            t.register_hook(clamp)
        return t

    h, c = p["h0"], p["c0"]
    hs, cs = [None] * T, [None] * T
    jac = torch.zeros(T, B, dtype=torch.float64)
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        keep = valid[t][:, None]
        if track:
            with torch.no_grad():
                jac[t] = reference.step_jacobian_sq(mode, x[t].detach(), h.detach(),
                                                    None if c is None else c.detach(), w.detach(),
                                                    None if p["b_hh"] is None else p["b_hh"].detach(),
                                                    reference.CellNorm(*(None if v is None else v.detach()
                                                                         for v in norm[:4]), EPS)
                                                    ).double() * valid[t]
        gh = F.layer_norm(h @ w.t(), (w.shape[0],), norm.hh_weight, norm.hh_bias, EPS)
        if lstm:
            i, f, g, o = hook(x[t] + gh).chunk(4, -1)
            c = torch.where(keep, f.sigmoid() * c + i.sigmoid() * g.tanh(), c) + dc_probe[t]
            h_new = o.sigmoid() * F.layer_norm(c, (H,), norm.cell_weight, norm.cell_bias, EPS).tanh()
        else:
            if p["b_hh"] is not None:
                gh = gh + p["b_hh"]
            xr, xz, xn = x[t].chunk(3, -1)
            hr, hz, hn = gh.chunk(3, -1)
            r = hook(xr + hr).sigmoid()
            z = hook(xz + hz).sigmoid()
            n = hook(xn + r * hn).tanh()
            h_new = (1 - z) * n + z * h
        h = torch.where(keep, h_new, h) + dh_probe[t]
        hs[t], cs[t] = h, c
    states = torch.stack(hs + [p["h0"]] if reverse else [p["h0"]] + hs)
    cells = (torch.stack(cs + [p["c0"]] if reverse else [p["c0"]] + cs) if lstm
             else torch.zeros(0, dtype=torch.float64))
    loss = (states * gs.double()).sum() + ((cells * gcs.double()).sum() if lstm else 0)
    wrt = [p[k] for k in INPUT_NAMES if p[k] is not None] + [dh_probe] + ([dc_probe] if lstm else [])
    grads = dict(zip([k for k in INPUT_NAMES if p[k] is not None] + ["dh", "dc"][: 2 if lstm else 1],
                     torch.autograd.grad(loss, wrt), strict=True))
    empty = torch.zeros(0, dtype=torch.float64)
    sq = [grads["dh"].pow(2).sum(-1)] + ([grads["dc"].pow(2).sum(-1)] if lstm else [])
    return dict(
        states=states.detach(), cell_states=cells.detach(), jac_sq=jac if track else empty,
        grad_xproj=grads["xproj"], grad_h0=grads["h0"], grad_c0=grads.get("c0", empty),
        grad_w_hh=grads["w_hh"], grad_b_hh=grads.get("b_hh", empty),
        grad_ln_hh_weight=grads["ln_hh_weight"], grad_ln_hh_bias=grads["ln_hh_bias"],
        grad_ln_cell_weight=grads.get("ln_cell_weight", empty),
        grad_ln_cell_bias=grads.get("ln_cell_bias", empty),
        grad_sq=torch.stack(sq) * valid if track else empty,
    )


def assert_matches(got: dict, want: dict, rtol: float, atol: float, sq_scale: bool = True) -> None:
    """Compare op outputs to the oracle in float64.

    The squared norms jac_sq (float32) and grad_sq (float64) keep their dtype whatever the input's:
    rtol at least 1e-6, and atol relative to their largest value.
    """
    for name, w in want.items():
        g = got[name].double()
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        r, a = rtol, atol
        if name in ("jac_sq", "grad_sq") and w.numel():
            r = max(rtol, 1e-6)
            a = max(atol, 1e-7) * (max(1.0, w.abs().max().item()) if sq_scale else 1.0)
        torch.testing.assert_close(g, w, rtol=r, atol=a, msg=lambda m, n=name: f"{n}: {m}")


def run_ops(fwd_op, bwd_op, inp, mode, reverse, gs, gcs, clip=None, track=True) -> dict:
    """Every output of a forward/backward op pair (the C++ or the Triton ops) on make_inputs, by name."""
    fwd = fwd_op(*forward_args(inp, mode, reverse, track))
    bwd = bwd_op(*backward_args(inp, fwd, gs, gcs, mode, reverse, clip, track))
    got = dict(zip(FORWARD_NAMES, fwd, strict=True))
    got.update(zip(BACKWARD_NAMES, bwd, strict=True))
    return got


def check_ops(fwd_op, bwd_op, mode, T, B, H, dtype, reverse=False, lengths=None, clip=None, track=True,
              gru_bias=True):
    """Run an op pair on make_inputs and compare every output to the oracle at TOL[dtype].

    Also checks the output dtypes (the input dtype; float32 jac_sq, float64 grad_sq). Returns (inp, gs,
    gcs, got, want).
    """
    inp = make_inputs(mode, T, B, H, dtype, lengths=lengths, gru_bias=gru_bias)
    gs, gcs = make_output_grads(mode, T, B, H, dtype)
    got = run_ops(fwd_op, bwd_op, inp, mode, reverse, gs, gcs, clip, track)
    want = oracle(inp, mode, reverse, gs, gcs, clip, track)
    assert got["jac_sq"].dtype == torch.float32 and got["grad_sq"].dtype == torch.float64
    assert got["states"].dtype == dtype and got["grad_w_hh"].dtype == dtype
    assert got["grad_ln_hh_weight"].dtype == dtype
    assert_matches(got, want, *TOL[dtype])
    return inp, gs, gcs, got, want


def gradcheck_layer(mode: str, backend: str, reverse: bool, **gradcheck_kwargs) -> bool:
    """Float64 gradcheck of the layer-normalized recurrent_layer on backend, w.r.t. every tensor input."""
    from vgkernels.ops.recurrent import recurrent_layer

    inp = make_inputs(mode, 3, 2, 3, lengths=[3, 2])
    keys = [k for k in INPUT_NAMES if inp[k] is not None]

    def fn(*tensors):
        args = dict(zip(keys, tensors, strict=True))
        states, cells, _, _ = recurrent_layer(*(args.get(k) for k in INPUT_NAMES), inp["lengths"], None, mode,
                                              reverse, False, None, EPS, backend)
        return (states, cells) if mode == "lstm" else states

    return torch.autograd.gradcheck(fn, [inp[k].clone().requires_grad_() for k in keys], **gradcheck_kwargs)
