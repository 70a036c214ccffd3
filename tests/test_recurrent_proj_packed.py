"""The LSTM's projection (proj_size) and packed input in the C++ layer ops, the functional op and the modules.

Oracles: the eager reference layer (float64), the same op on padded input with lengths (packed against
padded), torch.nn.LSTM(proj_size=P) for the modules, and torch.autograd.functional.jacobian for the
Jacobian norm of the projected state.
Tolerances: float64 rtol 1e-10, atol 1e-12 against the reference and between layouts; float32 atol 1e-5,
rtol 1e-4 against torch.nn; the closed-form Jacobian norm rtol 1e-10 in float64; the traces' float32
Jacobian norms rtol 1e-5.
"""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence

import vgkernels as vgk
from vgkernels.ops.recurrent import recurrent, weight_names
from vgkernels.reference import recurrent as reference

F64 = {"rtol": 1e-10, "atol": 1e-12}
F32 = {"rtol": 1e-4, "atol": 1e-5}
OPS = torch.ops.vgk
MODES = ["lstm", "gru", "rnn_tanh", "rnn_relu", "rnn_sigmoid"]


def layer_inputs(mode, T, B, I, H, P=0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    G = reference.GATES[mode]
    Ph = P or H

    def rnd(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=dtype)

    return dict(
        x=rnd(T, B, I), h0=rnd(B, Ph, scale=0.5), c0=rnd(B, H) if mode == "lstm" else None,
        w_ih=rnd(G * H, I, scale=H**-0.5), w_hh=rnd(G * H, Ph, scale=Ph**-0.5), b_ih=rnd(G * H, scale=0.3),
        b_hh=rnd(G * H, scale=0.3), w_hr=rnd(Ph, H, scale=H**-0.5) if P else None,
    )


def sorted_lengths(T, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g).sort(descending=True).values
    lengths[0] = T
    return lengths


def op_forward(mode, inp, x, lengths, batch_sizes, reverse, track=True):
    return OPS.rnn_layer_forward(x, inp["h0"], inp["c0"], inp["w_ih"], inp["w_hh"], inp["b_ih"], inp["b_hh"],
                                 inp["w_hr"], lengths, batch_sizes, None, mode, reverse, track, None)


def op_backward(mode, inp, x, fwd, grads, lengths, batch_sizes, reverse, clip=None):
    out, _, _, cells, ws, _ = fwd
    return OPS.rnn_layer_backward(*grads, x, inp["h0"], inp["c0"], out, cells, ws, inp["w_ih"], inp["w_hh"],
                                  inp["w_hr"], lengths, batch_sizes, mode, reverse, clip, True, True, True)


FWD_NAMES = ("output", "h_n", "c_n", "cell_states", "workspace", "jac_sq")
BWD_NAMES = ("grad_x", "grad_h0", "grad_c0", "grad_w_ih", "grad_w_hh", "grad_b_ih", "grad_b_hh", "grad_w_hr",
             "grad_sq")


def reference_layer(mode, inp, lengths, reverse, grads):
    """Outputs, Jacobian norms, gradient norms and every gradient of the eager reference layer."""
    names = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")
    leaves = {n: None if inp[n] is None else inp[n].detach().clone().requires_grad_() for n in names}
    xproj = leaves["x"] @ leaves["w_ih"].t() + leaves["b_ih"] + (0 if mode == "gru" else leaves["b_hh"])
    res = reference.layer_forward(xproj, leaves["h0"], leaves["c0"], leaves["w_hh"],
                                  leaves["b_hh"] if mode == "gru" else None, lengths, mode, reverse,
                                  track=True, w_hr=leaves["w_hr"])
    T = xproj.shape[0]
    last, seq = (0, slice(0, T)) if reverse else (T, slice(1, T + 1))
    out, h_n = res.states[seq], res.states[last]
    go, ghn, gcn = grads
    loss = (out * go).sum() + (h_n * ghn).sum()
    got = {"output": out, "h_n": h_n, "jac_sq": res.jac_sq}
    if mode == "lstm":
        got.update(c_n=res.cell_states[last], cell_states=res.cell_states[seq])
        loss = loss + (res.cell_states[last] * gcn).sum()
    loss.backward()
    got.update({f"grad_{n}": t.grad for n, t in leaves.items() if t is not None})
    got["grad_sq"] = res.grad_sq()
    return got


def upstream(mode, rows, B, P, H, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*rows, P, generator=g, dtype=torch.float64), torch.randn(B, P, generator=g,
            dtype=torch.float64), torch.randn(B, H, generator=g, dtype=torch.float64) if mode == "lstm"
            else torch.empty(0, dtype=torch.float64))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("T,B,I,H,P", [(4, 3, 5, 6, 2), (1, 1, 1, 3, 1), (3, 9, 4, 7, 5), (5, 2, 3, 37, 3)])
def test_projection_op_matches_reference(reverse, lengths, T, B, I, H, P):
    # B >= 8 runs the input projection per step inside the time loop; fewer rows as one GEMM.
    inp = layer_inputs("lstm", T, B, I, H, P)
    lens = None
    if lengths:
        lens = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(3))
        lens[0] = T
    grads = upstream("lstm", (T, B), B, P, H)
    fwd = op_forward("lstm", inp, inp["x"], lens, None, reverse)
    bwd = op_backward("lstm", inp, inp["x"], fwd, grads, lens, None, reverse)
    got = dict(zip(FWD_NAMES, fwd, strict=True)) | dict(zip(BWD_NAMES, bwd, strict=True))
    want = reference_layer("lstm", inp, lens, reverse, grads)
    assert got["output"].shape == (T, B, P) and got["h_n"].shape == (B, P) and got["c_n"].shape == (B, H)
    assert got["workspace"].shape == (T, B, 5 * H) and got["grad_w_hr"].shape == (P, H)
    for name, value in want.items():
        torch.testing.assert_close(got[name].double(), value.double(), **(F64 if name != "jac_sq" else
                                   {"rtol": 1e-5, "atol": 1e-6}), msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("mode", MODES + ["lstm_proj"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T,B", [(5, 4), (6, 13), (1, 1), (3, 1)])
def test_packed_op_equals_padded_op(mode, reverse, T, B):
    """Packed rows (PackedSequence layout) give what padded input with lengths gives, row for row."""
    P = 2 if mode == "lstm_proj" else 0
    mode = mode.removesuffix("_proj")
    H = 5
    inp = layer_inputs(mode, T, B, 4, H, P, seed=2)
    lens = sorted_lengths(T, B)
    valid = (torch.arange(T)[:, None] < lens[None, :])[:, :, None]
    x = inp["x"] * valid
    batch_sizes = pack_padded_sequence(x, lens).batch_sizes
    packed_x = pack_padded_sequence(x, lens).data
    go, ghn, gcn = upstream(mode, (T, B), B, P or H, H)
    go = go * valid
    padded_fwd = op_forward(mode, inp, x, lens, None, reverse)
    packed_fwd = op_forward(mode, inp, packed_x, None, batch_sizes, reverse)

    def pack(t):
        return pack_padded_sequence(t, lens).data

    out_p, hn_p, cn_p, cells_p, ws_p, jac_p = padded_fwd
    out_k, hn_k, cn_k, cells_k, ws_k, jac_k = packed_fwd
    torch.testing.assert_close(out_k, pack(out_p), **F64)
    torch.testing.assert_close(hn_k, hn_p, **F64)
    torch.testing.assert_close(jac_k, jac_p, **F64)
    if mode == "lstm":
        torch.testing.assert_close(cn_k, cn_p, **F64)
        torch.testing.assert_close(cells_k, pack(cells_p), **F64)
    padded_bwd = op_backward(mode, inp, x, padded_fwd, (go, ghn, gcn), lens, None, reverse)
    packed_bwd = op_backward(mode, inp, packed_x, packed_fwd, (pack(go), ghn, gcn), None, batch_sizes,
                             reverse)
    for name, a, b in zip(BWD_NAMES, packed_bwd, padded_bwd, strict=True):
        if name == "grad_x":
            b = pack(b)
        torch.testing.assert_close(a, b, **F64, msg=lambda m, n=name: f"{n}: {m}")


def test_packed_op_bad_batch_sizes():
    inp = layer_inputs("gru", 3, 2, 4, 5)
    x = inp["x"].reshape(6, 4)
    with pytest.raises(ValueError, match="batch_sizes must be >= 1 and never grow"):
        op_forward("gru", inp, x, None, torch.tensor([2, 3, 1]), False)
    with pytest.raises(ValueError, match=r"packed x must have shape \[sum\(batch_sizes\), I\] = \[5, I\]"):
        op_forward("gru", inp, x, None, torch.tensor([2, 2, 1]), False)
    with pytest.raises(TypeError, match="batch_sizes must have dtype int64"):
        op_forward("gru", inp, x, None, torch.tensor([2.0, 2.0, 2.0]), False)
    with pytest.raises(ValueError, match="exclude each other"):
        op_forward("gru", inp, inp["x"], torch.tensor([3, 3]), torch.tensor([2, 2, 2]), False)
    with pytest.raises(ValueError, match="w_hr .* is for mode 'lstm' only"):
        OPS.rnn_layer_forward(inp["x"], inp["h0"], None, inp["w_ih"], inp["w_hh"], None, None,
                              torch.zeros(5, 5, dtype=torch.float64), None, None, None, "gru", False, False,
                              None)


def test_projection_op_opcheck_and_gradcheck():
    T, B, I, H, P = 3, 2, 2, 4, 2
    inp = layer_inputs("lstm", T, B, I, H, P, seed=5)
    order = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")
    lens = pack_sequence([torch.zeros(3, 1), torch.zeros(2, 1)]).batch_sizes
    packed_x = inp["x"].reshape(T * B, I)[: int(lens.sum())]
    for x, lengths, batch_sizes in ((inp["x"], None, None), (inp["x"], torch.tensor([3, 1]), None),
                                    (packed_x, None, lens)):
        leaves = [(x if n == "x" else inp[n]).clone().requires_grad_() for n in order]
        probe = torch.zeros(2, T, B, dtype=torch.float64, requires_grad=True)
        for reverse in (False, True):
            torch.library.opcheck(OPS.rnn_layer_forward.default,
                                  (*leaves, lengths, batch_sizes, probe, "lstm", reverse, True, 0.5))

            def fn(*args, reverse=reverse, lengths=lengths, batch_sizes=batch_sizes):
                return OPS.rnn_layer_forward(*args, lengths, batch_sizes, None, "lstm", reverse, False,
                                             None)[:3]

            assert torch.autograd.gradcheck(fn, leaves)


# ---------------------------------------------------------------------------------------------- modules


def make_proj_pair(backend, P=3, dtype=torch.float32, **kwargs):
    ours = vgk.nn.LSTM(4, 6, proj_size=P, backend=backend, dtype=dtype, **kwargs)
    theirs = torch.nn.LSTM(4, 6, proj_size=P, dtype=dtype, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def run(model, x, hx):
    out, (h, c) = model(x, hx)
    data = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    w = torch.linspace(-1, 1, data.numel(), dtype=data.dtype).reshape(data.shape)
    loss = (data * w).sum() + (h * h).sum() + (c * c).sum()
    inputs = [x.data if isinstance(x, torch.nn.utils.rnn.PackedSequence) else x, *hx, *model.parameters()]
    return [data, h, c], torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True), (2, False)])
@pytest.mark.parametrize("layout", ["batched", "batch_first", "unbatched", "packed"])
def test_projection_module_matches_torch(backend, num_layers, bidirectional, layout):
    ours, theirs = make_proj_pair(backend, num_layers=num_layers, bidirectional=bidirectional,
                                  batch_first=layout == "batch_first")
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert ours._flat_weights_names == theirs._flat_weights_names
    L, B, T = num_layers * (2 if bidirectional else 1), 3, 5
    if layout == "packed":
        x = pack_sequence([torch.randn(n, 4) for n in (3, 5, 1)], enforce_sorted=False)
        x.data.requires_grad_()
    else:
        shape = {"batched": (T, B, 4), "batch_first": (B, T, 4), "unbatched": (T, 4)}[layout]
        x = torch.randn(shape, requires_grad=True)
    lead = () if layout == "unbatched" else (B,)
    hx = (torch.randn(L, *lead, 3, requires_grad=True), torch.randn(L, *lead, 6, requires_grad=True))
    got, got_grads = run(ours, x, hx)
    want, want_grads = run(theirs, x, hx)
    for a, b in zip(got + list(got_grads), want + list(want_grads), strict=True):
        torch.testing.assert_close(a, b, **F32)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_projection_gradcheck_float64(bidirectional, packed):
    T, B, I, H, P = 3, 2, 2, 3, 2
    L = 2 * (2 if bidirectional else 1)
    m = vgk.nn.LSTM(I, H, num_layers=2, proj_size=P, bidirectional=bidirectional, dtype=torch.float64)
    weights = [p.detach().clone().requires_grad_() for p in m.parameters()]
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(L, B, P, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(L, B, H, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, 2]) if packed else None

    def fn(x, h0, c0, *weights):
        out, h_n, c_n, _ = recurrent(x, (h0, c0), list(weights), mode="lstm", hidden_size=H, num_layers=2,
                                     bidirectional=bidirectional, lengths=lengths, proj_size=P)
        return out, h_n, c_n

    assert torch.autograd.gradcheck(fn, (x, h0, c0, *weights))


def test_projection_weight_names_and_state_dicts_both_ways():
    assert weight_names(1, 2, True, proj_size=2) == [
        "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "weight_hr_l0",
        "weight_ih_l0_reverse", "weight_hh_l0_reverse", "bias_ih_l0_reverse", "bias_hh_l0_reverse",
        "weight_hr_l0_reverse"]
    assert weight_names(1, 1, False, proj_size=2) == ["weight_ih_l0", "weight_hh_l0", "weight_hr_l0"]
    for bias in (True, False):
        theirs = torch.nn.LSTM(3, 5, num_layers=2, proj_size=2, bias=bias, bidirectional=True)
        ours = vgk.nn.LSTM(3, 5, num_layers=2, proj_size=2, bias=bias, bidirectional=True)
        ours.load_state_dict(theirs.state_dict())
        back = torch.nn.LSTM(3, 5, num_layers=2, proj_size=2, bias=bias, bidirectional=True)
        back.load_state_dict(ours.state_dict())
        assert list(ours.state_dict()) == list(theirs.state_dict())
        for k, v in theirs.state_dict().items():
            assert torch.equal(back.state_dict()[k], v)
        x = torch.randn(4, 2, 3)
        torch.testing.assert_close(ours(x)[0], theirs(x)[0], **F32)


def test_projection_refused_where_not_implemented():
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        vgk.nn.GRU(3, 4, proj_size=2)
    with pytest.raises(ValueError, match="proj_size has to be smaller than hidden_size"):
        vgk.nn.LSTM(3, 4, proj_size=4)
    m = vgk.nn.LSTM(3, 4, proj_size=2)
    with pytest.raises(NotImplementedError, match="proj_size: the triton backend has no projection yet"):
        recurrent(torch.randn(2, 1, 3), None, m._flat_weights, mode="lstm", hidden_size=4, proj_size=2,
                  backend="triton")
    with pytest.raises(ValueError, match="proj_size: projections are for the LSTM only"):
        recurrent(torch.randn(2, 1, 3), None, m._flat_weights, mode="gru", hidden_size=4, proj_size=2)


# ------------------------------------------------------------------------- traces of the projected LSTM


def projected_jacobian_sq(xproj_t, h, c, w_hh, w_hr):
    """The closed form the C++ kernels use for ||d(h_t, c_t)/d(h_prev, c_prev)||_F^2, one sample.

    With a = W_hh h + xproj, (si, sf, tg, so) the activated gates, c_t = sf c + si tg, tc = tanh(c_t) and
    h_t = W_hr (so tc): alpha = (tg si(1-si), c sf(1-sf), si(1-tg^2)), kappa = so(1-tc^2), G_j the Gram
    matrix of row j of the blocks W_i, W_f, W_g of W_hh, q_j = ||W_hr[:, j]||^2, beta = (kappa alpha,
    tc so(1-so)) stacked over the four gate blocks [4H], and K = (W_hh W_hh^T) * (J_4 (x) W_hr^T W_hr):
        sum_j [alpha_j^T G_j alpha_j + sf_j^2 + (kappa_j sf_j)^2 q_j] + beta^T K beta.
    """
    H = c.shape[0]
    gates = xproj_t + w_hh @ h
    i, f, g, o = gates.chunk(4)
    si, sf, tg, so = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    tc = torch.tanh(sf * c + si * tg)
    alpha = torch.stack([tg * si * (1 - si), c * sf * (1 - sf), si * (1 - tg**2)], dim=1)  # [H, 3]
    kappa = so * (1 - tc**2)
    blocks = w_hh.reshape(4, H, -1)  # W_i, W_f, W_g, W_o
    gram = torch.einsum("ajk,bjk->jab", blocks[:3], blocks[:3])  # [H, 3, 3]
    q = w_hr.t() @ w_hr
    diag = (torch.einsum("ja,jab,jb->", alpha, gram, alpha) + (sf**2).sum()
            + ((kappa * sf) ** 2 * q.diagonal()).sum())
    beta = torch.cat([kappa * alpha[:, 0], kappa * alpha[:, 1], kappa * alpha[:, 2], tc * so * (1 - so)])
    K = (w_hh @ w_hh.t()) * q.repeat(4, 4)
    return diag + beta @ K @ beta


def test_projected_jacobian_formula_equals_autograd():
    torch.manual_seed(3)
    H, P, I = 7, 3, 2
    m = vgk.nn.LSTM(I, H, proj_size=P, dtype=torch.float64)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3)  # away from the linear regime
    x = torch.randn(I, dtype=torch.float64)
    h, c = torch.randn(P, dtype=torch.float64), torch.randn(H, dtype=torch.float64)
    xproj = m.weight_ih_l0 @ x + m.bias_ih_l0 + m.bias_hh_l0

    def step(s):
        h_new, c_new = reference.cell_step("lstm", xproj[None], s[None, :P], s[None, P:], m.weight_hh_l0,
                                           None, None, m.weight_hr_l0)
        return torch.cat([h_new[0], c_new[0]])

    with torch.no_grad():
        jac = torch.autograd.functional.jacobian(step, torch.cat([h, c]))
        formula = projected_jacobian_sq(xproj, h, c, m.weight_hh_l0, m.weight_hr_l0)
    assert jac.shape == (P + H, P + H)
    torch.testing.assert_close(formula, jac.pow(2).sum(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_projected_trace_matches_reference(bidirectional, packed):
    kw = dict(num_layers=2, proj_size=2, bidirectional=bidirectional, track=True)
    ours, ref = vgk.nn.LSTM(3, 5, backend="cpp", **kw), vgk.nn.LSTM(3, 5, backend="reference", **kw)
    ref.load_state_dict(ours.state_dict())
    if packed:
        x = pack_sequence([torch.randn(n, 3) for n in (2, 5, 3)], enforce_sorted=False)
    else:
        x = torch.randn(5, 3, 3)
    for model in (ours, ref):
        out, _ = model(x)
        data = out.data if packed else out
        (data * torch.linspace(-1, 1, data.numel()).reshape(data.shape)).sum().backward()
    a, b = ours.trace, ref.trace
    for name in ("grad_norm_per_sample", "grad_norm", "cell_grad_norm", "jacobian_norm_per_sample",
                 "jacobian_norm"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert (a.grad_norm > 0).all()
    if packed:  # samples in the input's order: sample 0 has 2 positions
        assert torch.all(a.grad_norm_per_sample[:, 2:, 0] == 0)
        assert torch.all(a.jacobian_norm_per_sample[:, 2:, 0] == 0)


def test_projected_trace_jacobian_equals_autograd():
    T, B, I, H, P = 3, 2, 2, 5, 3
    torch.manual_seed(4)
    m = vgk.nn.LSTM(I, H, proj_size=P, dtype=torch.float64, track=True)
    x = torch.randn(T, B, I, dtype=torch.float64)
    with torch.no_grad():
        out, _ = m(x)
        hs = torch.cat([torch.zeros(1, B, P, dtype=torch.float64), out])
        c = torch.zeros(B, H, dtype=torch.float64)
        xproj = x @ m.weight_ih_l0.t() + m.bias_ih_l0 + m.bias_hh_l0
        for t in range(T):
            for b in range(B):
                def step(s, t=t, b=b):
                    h_new, c_new = reference.cell_step("lstm", xproj[t, b][None], s[None, :P], s[None, P:],
                                                       m.weight_hh_l0, None, None, m.weight_hr_l0)
                    return torch.cat([h_new[0], c_new[0]])
                jac = torch.autograd.functional.jacobian(step, torch.cat([hs[t, b], c[b]]))
                got = m.trace.jacobian_norm_per_sample[0, t, b].double()
                torch.testing.assert_close(got, jac.pow(2).sum().sqrt(), rtol=1e-5, atol=0)
            c = reference.cell_step("lstm", xproj[t], hs[t], c, m.weight_hh_l0, None, None, m.weight_hr_l0)[1]
