"""torch.compile(fullgraph=True) over vgkernels recurrent modules, and torch.library.opcheck of the ops.

Tolerances: compiled against eager, float32 atol 1e-5, rtol 1e-4.
"""

import pytest
import torch

import vgkernels as vgk
from vgkernels.ops.recurrent import recurrent_layer


class Tagger(torch.nn.Module):
    def __init__(self, track=False):
        super().__init__()
        self.embed = torch.nn.Linear(3, 8)
        self.lstm = vgk.nn.LSTM(8, 6, num_layers=2, bidirectional=True, backend="cpp", track=track)
        self.gru = vgk.nn.GRU(12, 5, backend="cpp", track=track)
        self.rnn = vgk.nn.RNN(5, 4, nonlinearity="relu", backend="cpp")
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        h, _ = self.lstm(self.embed(x))
        h, _ = self.gru(h)
        h, _ = self.rnn(h)
        return self.head(h)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = Tagger()
    x = torch.randn(7, 3, 3)
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-4)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_compile_tracked_forward_under_no_grad_matches_eager():
    torch._dynamo.reset()
    model = Tagger(track=True)
    x = torch.randn(6, 2, 3)
    with torch.no_grad():
        model(x)
        eager = model.lstm.trace.jacobian_norm_per_sample.clone()
        model.lstm.trace = None
        torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert model.lstm.trace is not None and model.lstm.trace.grad_norm is None
    torch.testing.assert_close(model.lstm.trace.jacobian_norm_per_sample, eager, atol=1e-5, rtol=1e-4)


def test_compile_tracked_backward_raises_clearly():
    torch._dynamo.reset()
    with pytest.raises(Exception, match="BPTT tracking with gradients is not supported inside torch.compile"):
        torch.compile(Tagger(track=True), fullgraph=True, backend="aot_eager")(torch.randn(4, 2, 3))


def test_compile_has_no_graph_breaks():
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(Tagger())(torch.randn(5, 2, 3))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compile_inductor_runs():
    torch._dynamo.reset()
    model = Tagger()
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), atol=1e-5, rtol=1e-4)


def _layer_args(mode, T=4, B=3, H=5, dtype=torch.float64, track=True, lengths=None, reverse=False):
    G = {"lstm": 4, "gru": 3}.get(mode, 1)
    xproj = torch.randn(T, B, G * H, dtype=dtype, requires_grad=True)
    h0 = torch.randn(B, H, dtype=dtype, requires_grad=True)
    c0 = torch.randn(B, H, dtype=dtype, requires_grad=True) if mode == "lstm" else None
    w_hh = (0.5 * torch.randn(G * H, H, dtype=dtype)).requires_grad_()
    b_hh = torch.randn(G * H, dtype=dtype, requires_grad=True) if mode == "gru" else None
    K = 2 if mode == "lstm" else 1
    probe = torch.zeros(K, T, B, dtype=torch.float64, requires_grad=True) if track else None
    return (xproj, h0, c0, w_hh, b_hh, None, None, None, None, lengths, probe, mode, reverse, track, None,
            1e-5, "cpp")


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh", "rnn_relu", "rnn_sigmoid"])
@pytest.mark.parametrize("reverse", [False, True])
def test_opcheck_recurrent_layer(mode, reverse):
    for lengths in (None, torch.tensor([4, 1, 3])):
        args = _layer_args(mode, lengths=lengths, reverse=reverse)
        torch.library.opcheck(recurrent_layer, args)


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
def test_opcheck_kernel_ops(mode):
    xproj, h0, c0, w_hh, b_hh, *_, lengths, _, mode, reverse, track, _, _, _ = _layer_args(mode)
    fwd_args = tuple(t.detach() if isinstance(t, torch.Tensor) else t
                     for t in (xproj, h0, c0, w_hh, b_hh, lengths, None, mode, reverse, track))
    torch.library.opcheck(torch.ops.vgk.rnn_forward.default, fwd_args)
    states, cell_states, workspace, _ = torch.ops.vgk.rnn_forward(*fwd_args)
    bwd_args = (torch.randn_like(states), torch.randn_like(cell_states), states, cell_states, workspace,
                w_hh.detach(), None, mode, False, 0.5, True, mode == "gru")
    torch.library.opcheck(torch.ops.vgk.rnn_backward.default, bwd_args)
