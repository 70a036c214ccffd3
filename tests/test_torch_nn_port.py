"""PyTorch's own RNN/GRU/LSTM layer tests, written again here and run against torch.nn and vgkernels.

Each test names the PyTorch test it re-implements: from pytorch's test/test_nn.py (TestNN,
TestNNDeviceType) and the RNN/GRU/LSTM entries of torch/testing/_internal/common_modules.py's module_db
as test/test_modules.py runs them. Every test is parametrized over the implementation ``impl``
("torch.nn" or "vgkernels"); the checks are the same for both, so a test passing on torch.nn and failing
on vgkernels is a difference from torch.nn. Tests of CUDA-only behaviour (cuDNN, multi-GPU device checks)
are re-read as CPU checks against torch.nn where the behaviour they guard exists on the CPU.
Not here: the cell tests (tests/test_cell_torch_port.py) and module_db's test_grad and test_gradgrad
(tests/test_autodiff_module_db.py).

Tolerances: float64 comparisons against torch.nn atol 1e-10, rtol 1e-8 (the kernels and oneDNN differ in
summation order); float32 atol 1e-5, rtol 1e-4; gradcheck with torch's defaults.
"""

import copy
import io
import itertools
import warnings
from functools import partial

import pytest
import torch
import torch.nn.utils.rnn as rnn_utils
from torch.utils._pytree import tree_flatten

import vgkernels as vgk

IMPLS = ["torch.nn", "vgkernels"]
F64 = {"atol": 1e-10, "rtol": 1e-8}
F32 = {"atol": 1e-5, "rtol": 1e-4}


def nn_of(impl):
    """The namespace whose RNN, GRU and LSTM are under test."""
    return torch.nn if impl == "torch.nn" else vgk.nn


def close(a, b, **tol):
    """assert_close over nested tuples/lists of tensors (torch's assertEqual on RNN outputs)."""
    flat_a, flat_b = tree_flatten(a)[0], tree_flatten(b)[0]
    assert len(flat_a) == len(flat_b)
    for x, y in zip(flat_a, flat_b, strict=True):
        torch.testing.assert_close(x, y, **tol)


# ------------------------------------------------------------------------------------------ test_nn.py


@pytest.mark.parametrize("impl", IMPLS)
def test_RNN_nonlinearity(impl):  # TestNN.test_RNN_nonlinearity
    nn = nn_of(impl)
    assert nn.RNN(1, 10).nonlinearity == "tanh"
    assert nn.RNN(1, 10, nonlinearity="relu").nonlinearity == "relu"
    with pytest.raises(ValueError, match="Unknown nonlinearity"):
        nn.RNN(1, 10, nonlinearity="garbage")


@pytest.mark.parametrize("impl", IMPLS)
def test_RNN_nonlinearity_passed_as_arg(impl):  # TestNN.test_RNN_nonlinearity_passed_as_arg
    assert nn_of(impl).RNN(2, 3, 1, "relu").nonlinearity == "relu"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,proj_size", [("weight_ih_l0", 0), ("weight_hr_l0", 16)])
def test_rnn_weight_norm(impl, name, proj_size):  # TestNN.test_rnn_weight_norm
    lstm = nn_of(impl).LSTM(32, 32, proj_size=proj_size)
    count = 5 if proj_size else 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        lstm = torch.nn.utils.weight_norm(lstm, name=name)
    # the reparametrized weight is a plain tensor in the flat weights now
    assert sum(isinstance(w, torch.nn.Parameter) for w in lstm._flat_weights) == count - 1
    lstm = torch.nn.utils.remove_weight_norm(lstm, name=name)
    assert sum(isinstance(w, torch.nn.Parameter) for w in lstm._flat_weights) == count
    params = dict(lstm.named_parameters())
    assert lstm._parameters.get(name) is not None and params.get(name) is not None
    for part in ("_v", "_g"):
        assert name + part not in lstm._parameters and name + part not in params


def _bad_size_cases(input_size, hidden_size, num_layers, batch, seq_len, bad, proj_size=0):
    """(input shape, h shape, c shape) triples that torch.nn refuses: wrong batch of the input or of the
    states, wrong input size, wrong state sizes, wrong number of layers in the states."""
    x = (seq_len, batch, input_size)
    h = (num_layers, batch, proj_size or hidden_size)
    c = (num_layers, batch, hidden_size)

    def at(shape, dim, value):
        return tuple(value if i == dim else s for i, s in enumerate(shape))

    cases = [(at(x, 1, bad), h, c), (x, at(h, 1, bad), at(c, 1, bad)), (at(x, 2, bad), h, c),
             (x, at(h, 2, bad), at(c, 2, bad)), (x, at(h, 0, bad), at(c, 0, bad))]
    if proj_size:
        cases += [(x, at(h, 0, hidden_size), c), (x, at(h, 0, bad), c), (x, h, at(c, 0, bad))]
    return cases


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["RNN", "GRU", "LSTM"])
def test_rnn_args_check(impl, mode):  # TestNN.test_rnn_args_check
    input_size, hidden_size, num_layers, batch, seq_len, bad = 3, 5, 2, 4, 6, 7
    for x_shape, h_shape, _ in _bad_size_cases(input_size, hidden_size, num_layers, batch, seq_len, bad):
        model = getattr(nn_of(impl), mode)(input_size, hidden_size, num_layers)
        x, h = torch.randn(x_shape), torch.randn(h_shape)
        if mode != "LSTM":
            hiddens = [h]
        elif h_shape == (num_layers, batch, hidden_size):
            hiddens = [(h, h)]
        else:  # one bad state of the two
            good = torch.randn(num_layers, batch, hidden_size)
            hiddens = [(h, good), (good, h)]
        for hx in hiddens:
            with pytest.raises(RuntimeError):
                model(x, hx)


@pytest.mark.parametrize("impl", IMPLS)
def test_projections_lstm_args_check(impl):  # TestNN.test_projections_lstm_args_check
    input_size, hidden_size, proj_size, num_layers, batch, seq_len, bad = 3, 5, 2, 2, 4, 6, 7
    for x_shape, h_shape, c_shape in _bad_size_cases(input_size, hidden_size, num_layers, batch, seq_len, bad,
                                                     proj_size):
        model = nn_of(impl).LSTM(input_size, hidden_size, num_layers, proj_size=proj_size)
        with pytest.raises(RuntimeError):
            model(torch.randn(x_shape), (torch.randn(h_shape), torch.randn(c_shape)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["RNN", "GRU", "LSTM"])
def test_rnn_initial_hidden_state(impl, mode):  # TestNN.test_rnn_initial_hidden_state
    rnn = getattr(nn_of(impl), mode)(30, 20, 2)
    x = torch.randn(10, 32, 30)
    zeros = torch.zeros(2, 32, 20)
    given = rnn(x, (zeros, zeros) if mode == "LSTM" else zeros)
    close(given, rnn(x), atol=0, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_projections_lstm_initial_hidden_state(impl, bidirectional):
    # TestNN.test_projections_lstm_initial_hidden_state
    rnn = nn_of(impl).LSTM(30, 20, 2, bidirectional=bidirectional, proj_size=10)
    L = 2 * (2 if bidirectional else 1)
    x = torch.randn(10, 32, 30)
    given = rnn(x, (torch.zeros(L, 32, 10), torch.zeros(L, 32, 20)))
    close(given, rnn(x), atol=0, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["RNN", "GRU"])
def test_projections_errors_on_gru_and_rnn(impl, mode):  # TestNN.test_projections_errors_on_gru_and_rnn
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM, not RNN or GRU"):
        getattr(nn_of(impl), mode)(30, 20, 2, proj_size=10)


def _noncontiguous(t):
    """The same values in a tensor whose last dimension is strided."""
    return torch.stack([torch.zeros_like(t), t], t.dim()).select(t.dim(), 1)


def _forward_backward(rnn, x, hx, grad_output, grad_h, grad_c=None):
    """Forward and backward with given upstream gradients; returns every output and gradient."""
    lstm = isinstance(rnn, torch.nn.LSTM)
    if isinstance(x, rnn_utils.PackedSequence):
        data = x.data.detach().clone().requires_grad_()
        x = rnn_utils.PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
    else:
        data = x = x.detach().clone().requires_grad_()
    leaf = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    hx = tuple(leaf(t) for t in hx) if lstm else leaf(hx)
    output, hy = rnn(x, hx)
    if isinstance(output, rnn_utils.PackedSequence):
        output = output.data
    if lstm:
        torch.autograd.backward([output, hy[0], hy[1]], [grad_output, grad_h, grad_c])
    else:
        torch.autograd.backward([output, hy], [grad_output, grad_h])
    states = list(hx) if lstm else [hx]
    return ([output.detach(), *(t.detach() for t in (hy if lstm else [hy]))]
            + [data.grad] + [s.grad for s in states] + [p.grad for p in rnn.parameters()])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["RNN_TANH", "RNN_RELU", "GRU", "LSTM", "LSTM_PROJ"])
@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_RNN_cpu_vs_cudnn(impl, mode, dropout):
    # TestNN.test_RNN_cpu_vs_cudnn_no_dropout / _with_dropout: there the CPU layer against cuDNN; here the
    # layer under test against torch.nn's CPU layer, over bias, bidirectional, batch_first, contiguous
    # or strided tensors, and padded or packed input (lengths as a list or a tensor), in float64.
    # dropout=1 drops all between the layers, so that results are still deterministic.
    input_size, hidden_size, proj_size, num_layers, seq_len, batch = 10, 6, 3, 2, 7, 6
    rnn_modes = {"RNN_TANH": ("RNN", "tanh"), "RNN_RELU": ("RNN", "relu")}
    cls_name, nonlinearity = rnn_modes.get(mode, (mode, None))
    cls_name = cls_name.removesuffix("_PROJ")
    proj = proj_size if mode == "LSTM_PROJ" else 0
    out_size = proj or hidden_size
    torch.manual_seed(0)
    for bias, bidirectional, batch_first, contiguous, variable_len, lens_as_tensor in itertools.product(
            (True, False), repeat=6):
        if lens_as_tensor and not variable_len:
            continue
        D = 2 if bidirectional else 1
        kwargs = dict(bias=bias, dropout=dropout, bidirectional=bidirectional, batch_first=batch_first)
        if nonlinearity:
            kwargs["nonlinearity"] = nonlinearity
        if proj:
            kwargs["proj_size"] = proj
        ours = getattr(nn_of(impl), cls_name)(input_size, hidden_size, num_layers, **kwargs).double()
        theirs = getattr(torch.nn, cls_name)(input_size, hidden_size, num_layers, **kwargs).double()
        theirs.load_state_dict(ours.state_dict())
        shape = (batch, seq_len) if batch_first else (seq_len, batch)
        x = torch.randn(*shape, input_size, dtype=torch.float64)
        grad_output = torch.randn(*shape, out_size * D, dtype=torch.float64)
        h0 = torch.randn(num_layers * D, batch, out_size, dtype=torch.float64)
        c0 = torch.randn(num_layers * D, batch, hidden_size, dtype=torch.float64)
        grad_h = torch.randn(num_layers * D, batch, out_size, dtype=torch.float64)
        grad_c = torch.randn(num_layers * D, batch, hidden_size, dtype=torch.float64)
        if not contiguous:
            x, grad_output, h0, c0, grad_h, grad_c = map(_noncontiguous,
                                                         (x, grad_output, h0, c0, grad_h, grad_c))
        if variable_len:
            lengths = [7, 5, 5, 2, 1, 1]
            lengths = torch.tensor(lengths) if lens_as_tensor else lengths
            x = rnn_utils.pack_padded_sequence(x, lengths, batch_first=batch_first)
            grad_output = rnn_utils.pack_padded_sequence(grad_output, lengths, batch_first=batch_first).data
        hx = (h0, c0) if cls_name == "LSTM" else h0
        got = _forward_backward(ours, x, hx, grad_output, grad_h, grad_c)
        want = _forward_backward(theirs, x, hx, grad_output, grad_h, grad_c)
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            torch.testing.assert_close(a, b, **F64, msg=lambda m, i=i, kw=kwargs: f"{kw} item {i}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode,name,proj_size", [("LSTM", "weight_hh_l0", 0), ("LSTM", "weight_hr_l0", 3),
                                                 ("GRU", "weight_ih_l1", 0)])
def test_RNN_cudnn_weight_norm(impl, mode, name, proj_size):
    # TestNN.test_RNN_cudnn_weight_norm: adding and removing weight norm leaves the output unchanged (there
    # moved to CUDA in between; here checked on the CPU).
    kwargs = {"proj_size": proj_size} if proj_size else {}
    m = getattr(nn_of(impl), mode)(10, 6, 2, **kwargs)
    x = torch.randn(7, 6, 10)
    expected = m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        m = torch.nn.utils.weight_norm(m, name=name)
    close(m(x), expected, **F32)
    m = torch.nn.utils.remove_weight_norm(m, name=name)
    close(m(x), expected, **F32)


@pytest.mark.parametrize("impl", IMPLS)
def test_partial_flat_weights(impl):
    # TestNN.test_partial_flat_weights (CUDA there): a module moved (an _apply) while one weight attribute
    # is deleted must not fail, and works again once the weight is set back.
    m = nn_of(impl).LSTM(10, 6, 2)
    x = torch.randn(3, 2, 10)
    expected = m(x)[0]
    weight = m.weight_hh_l0
    del m.weight_hh_l0
    assert not hasattr(m, "weight_hh_l0")
    m.double()
    m.weight_hh_l0 = torch.nn.Parameter(weight.detach().double())
    m.float()
    torch.testing.assert_close(m(x)[0], expected, **F32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("p", [0, 0.276, 0.731, 1])
@pytest.mark.parametrize("train", [True, False])
def test_RNN_dropout(impl, p, train):
    # TestNN.test_RNN_dropout: dropout sits between the layers (all-ones weights make every unit equal).
    rnn = nn_of(impl).RNN(10, 1000, 2, bias=False, dropout=p, nonlinearity="relu", dtype=torch.float64)
    rnn.train(train)
    with torch.no_grad():
        for w in rnn.parameters():
            w.fill_(1)
    output, hy = rnn(torch.ones(1, 1, 10, dtype=torch.float64), torch.zeros(2, 1, 1000, dtype=torch.float64))
    assert output.min() == output.max()
    value = output[0, 0, 0].item()
    if p == 0 or not train:
        assert value == 10000
    elif p == 1:
        assert value == 0
    else:
        assert 8000 < value < 12000
        kept_times_ten = (value * (1 - p)) % 10
        assert min(kept_times_ten, 10 - kept_times_ten) < 1e-2
    assert hy[0].min() == hy[0].max() and hy[1].min() == hy[1].max()
    assert hy[0, 0, 0].item() == 10 and hy[1, 0, 0].item() == value


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_error_RNN_seq_len_zero(impl, mode, bidirectional):  # TestNN.test_error_RNN_seq_len_zero
    rnn = getattr(nn_of(impl), mode)(5, 6, bidirectional=bidirectional)
    with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0 in RNN"):
        rnn(torch.ones(0, 10, 5))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["RNN", "LSTM", "GRU"])
def test_RNN_input_size_zero(impl, mode):  # TestNN.test_RNN_input_size_zero (an empty batch)
    rnn = getattr(nn_of(impl), mode)(input_size=3, hidden_size=4)
    outs = rnn(torch.zeros(5, 0, 3))
    assert outs[0].shape == (5, 0, 4)
    outs[0].sum().backward()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("p", [0, 0.1234])
@pytest.mark.parametrize("train", [True, False])
def test_RNN_dropout_state(impl, p, train):
    # TestNN.test_RNN_dropout_state: dropout draws anew every call, and survives a save and load.
    rnn = nn_of(impl).RNN(100, 100, 2, bias=False, dropout=p, nonlinearity="relu")
    rnn.train(train)
    x, hx = torch.rand(1, 1, 100), torch.rand(2, 1, 100)
    out1, hy1 = rnn(x, hx)
    out2, hy2 = rnn(x, hx)
    buf = io.BytesIO()
    torch.save(rnn, buf)
    buf.seek(0)
    rnn2 = torch.load(buf, weights_only=False)
    rnn2.flatten_parameters()
    out3, hy3 = rnn2(x, hx)
    same = p == 0 or not train
    for a, b in ((out1, out2), (out1, out3), (hy1, hy2), (hy1, hy3)):
        assert torch.equal(a, b) == same


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("train", [True, False])
def test_RNN_change_dropout(impl, train):
    # TestNN.test_RNN_change_dropout: setting .dropout between calls takes effect.
    rnn = nn_of(impl).RNN(100, 100, 2, dropout=0, nonlinearity="relu", dtype=torch.float64)
    rnn.train(train)
    x = torch.rand(3, 2, 100, dtype=torch.float64)
    previous = None
    for p in (0, 0.5, 0, 0.7, 0.2, 1, 0.2, 0):
        rnn.dropout = p
        out1, hy1 = rnn(x)
        out2, hy2 = rnn(x)
        deterministic = p in (0, 1) or not train
        assert torch.equal(out1, out2) == deterministic and torch.equal(hy1, hy2) == deterministic
        if previous is not None:
            assert torch.equal(out1, previous) == (not train) and torch.equal(out2, previous) == (not train)
        previous = out1


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode,proj_size", [("LSTM", 0), ("LSTM", 10), ("GRU", 0), ("RNN", 0)])
def test_cudnn_forward_exception(impl, mode, proj_size):  # TestNN.test_cudnn_forward_exception
    kwargs = {"proj_size": proj_size} if proj_size else {}
    rnn = getattr(nn_of(impl), mode)(10, 20, batch_first=True, **kwargs)
    hidden = torch.zeros(1, 2, 19)
    hx = (hidden, hidden) if mode == "LSTM" else hidden
    with pytest.raises(RuntimeError, match="Expected hidden.*size.*got"):
        rnn(torch.randn(2, 3, 10), hx)
    with pytest.raises(RuntimeError, match=r"input\.size\(-1\) must be equal to input_size"):
        rnn(torch.randn(2, 3, 3))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode,proj_size", [("LSTM", 0), ("LSTM", 10), ("GRU", 0), ("RNN", 0)])
def test_cudnn_weight_tying(impl, mode, proj_size):
    # TestNN.test_cudnn_weight_tying (CUDA there): one tensor assigned to two weight names is used for
    # both, trains as one, and gives torch.nn's results before and after an optimizer step.
    kwargs = {"proj_size": proj_size} if proj_size else {}
    torch.manual_seed(0)
    ours = getattr(nn_of(impl), mode)(10, 20, batch_first=True, bidirectional=True, **kwargs)
    theirs = getattr(torch.nn, mode)(10, 20, batch_first=True, bidirectional=True, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    results = []
    for rnn in (ours, theirs):
        rnn.bias_ih_l0_reverse = rnn.bias_ih_l0
        assert rnn._flat_weights[rnn._flat_weights_names.index("bias_ih_l0_reverse")] is rnn.bias_ih_l0
        torch.manual_seed(1)
        x = torch.randn(5, 4, 10, requires_grad=True)
        h = torch.randn(2, 5, proj_size or 20, requires_grad=True)
        hx = (h, torch.randn(2, 5, 20, requires_grad=True)) if mode == "LSTM" else h
        opt = torch.optim.SGD(rnn.parameters(), lr=0.1)
        opt.zero_grad()
        rnn(x, hx)[0].sum().backward()
        opt.step()
        results.append((rnn(x, hx), rnn.bias_ih_l0.detach().clone()))
        assert rnn.bias_ih_l0 is rnn.bias_ih_l0_reverse
    close(results[0], results[1], **F32)


@pytest.mark.parametrize("impl", IMPLS)
def test_rnn_retain_variables(impl):  # TestNNDeviceType.test_rnn_retain_variables (float64)
    nn = nn_of(impl)
    for rnn in (nn.LSTM(10, 20, num_layers=2), nn.GRU(10, 20, num_layers=2), nn.RNN(10, 20, num_layers=2)):
        rnn.double()
        x = torch.randn(5, 6, 10, dtype=torch.float64, requires_grad=True)
        output = rnn(x)
        output[0].sum().backward(retain_graph=True)
        grads = [x.grad.clone()] + [p.grad.clone() for p in rnn.parameters()]
        for _ in range(4):
            rnn.zero_grad()
            x.grad.zero_()
            output[0].sum().backward(retain_graph=True)
            close([x.grad] + [p.grad for p in rnn.parameters()], grads, atol=0, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_rnn_backward_to_input_but_not_parameters(impl):
    # TestNNDeviceType.test_rnn_backward_to_input_but_not_parameters: frozen weights, gradient to the input.
    lstm = nn_of(impl).LSTM(2, 3)
    for p in lstm.parameters():
        p.requires_grad = False
    s = torch.randn(1, 1, 2, requires_grad=True)
    out, _ = lstm(s)
    out.sum().backward()
    assert s.grad is not None and s.grad.abs().sum().item() != 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("bias", [True, False])
def test_rnn_grad_and_gradgrad(impl, mode, bias):
    # TestNNDeviceType.test_LSTM_grad_and_gradgrad and test_GRU_grad_and_gradgrad (CUDA-only there for
    # the cuDNN error they also check; the gradcheck and gradgradcheck of the flattened outputs with
    # respect to the input hold on the CPU): float64, hidden size 4, input [1, 3, 4].
    torch.manual_seed(0)
    hsize = 4
    mod = getattr(nn_of(impl), mode)(hsize, hsize, bias=bias).double()
    inp = torch.rand(1, 3, hsize, dtype=torch.float64, requires_grad=True)

    def flat_outputs(x):
        out, hidden = mod(x)
        return (out, *hidden) if isinstance(hidden, tuple) else (out, hidden)

    assert torch.autograd.gradcheck(flat_outputs, inp, check_batched_grad=False)
    assert torch.autograd.gradgradcheck(flat_outputs, inp, check_batched_grad=False)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_LSTM_differentiable_backward_using_oneDNN(bidirectional, batch_first):
    # TestNN.test_LSTM_differentiable_backward_using_oneDNN: on the CPU torch.nn.LSTM (oneDNN) has a
    # differentiable backward. A double backward (the gradient of the input gradient's norm) through
    # vgkernels' LSTM equals torch.nn's, float32, for the input and every parameter.
    torch.manual_seed(0)
    results = []
    for impl in IMPLS:
        torch.manual_seed(0)
        lstm = nn_of(impl).LSTM(3, 5, num_layers=2, bias=True, batch_first=batch_first,
                                bidirectional=bidirectional)
        x = torch.randn(4, 6, 3, requires_grad=True)
        out, _ = lstm(x)
        (grad_x,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        grad_x.pow(2).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        results.append([x.grad, *(p.grad for p in lstm.parameters())])
    close(results[1], results[0], **F32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rnn_fused(impl, mode, bias, dtype):
    # TestNNDeviceType.test_rnn_fused (CUDA's fused cells against the CPU there; here the layer under test
    # against torch.nn on the CPU): outputs, final states and every gradient.
    torch.manual_seed(0)
    ours = getattr(nn_of(impl), mode)(10, 6, 2, bias=bias, dtype=dtype)
    theirs = getattr(torch.nn, mode)(10, 6, 2, bias=bias, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(7, 6, 10, dtype=dtype)
    grad_output = torch.randn(7, 6, 6, dtype=dtype)
    h0, grad_h = torch.randn(2, 6, 6, dtype=dtype), torch.randn(2, 6, 6, dtype=dtype)
    hx = (h0, h0 + 1) if mode == "LSTM" else h0
    grad_c = grad_h + 1 if mode == "LSTM" else None
    got = _forward_backward(ours, x, hx, grad_output, grad_h, grad_c)
    want = _forward_backward(theirs, x, hx, grad_output, grad_h, grad_c)
    close(got, want, **(F64 if dtype == torch.float64 else F32))


@pytest.mark.parametrize("impl", IMPLS)
def test_save_lstm_compatibility(impl):
    # TestNNDeviceType.test_save_lstm_compatibility: the state of an LSTM from before proj_size existed.
    model = nn_of(impl).LSTM(2, 3)
    x = torch.randn(32, 5, 2)
    expected = model(x)
    assert model.proj_size == 0
    state = model.__dict__
    del state["proj_size"]
    loaded = nn_of(impl).LSTM(2, 3)
    loaded.__setstate__(state)
    close(loaded(x), expected, atol=0, rtol=0)


def _pad_rows(t, length):
    return torch.cat([t, t.new_zeros(length - t.shape[0], *t.shape[1:])]) if t.shape[0] < length else t


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("enforce_sorted,lengths", [
    (True, [5]), (False, [5]), (True, [10, 10, 6, 2, 2, 1, 1]), (False, [10, 10, 6, 2, 2, 1, 1]),
    (False, [2, 1, 3, 2, 10, 5, 3])])
@pytest.mark.parametrize("default_hiddens", [True, False])
@pytest.mark.parametrize("proj_size", [0, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_variable_sequence(impl, enforce_sorted, lengths, default_hiddens, proj_size, dtype):
    # TestNNDeviceType.test_variable_sequence: a packed batch gives what each sequence gives alone, forward
    # and backward, for a 2-layer bidirectional LSTM.
    tol = {"atol": 1e-5, "rtol": 0} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 0}
    input_size, hidden_size, num_layers = 3, 4, 2
    T, B = max(lengths), len(lengths)
    x = torch.randn(T, B, input_size, dtype=dtype, requires_grad=True)
    lstm = nn_of(impl).LSTM(input_size, hidden_size, num_layers, bidirectional=True, proj_size=proj_size,
                            dtype=dtype)
    alone = copy.deepcopy(lstm)
    hidden0 = None
    if not default_hiddens:
        hidden0 = (torch.randn(4, B, proj_size or hidden_size, dtype=dtype), torch.randn(4, B, hidden_size,
                                                                                         dtype=dtype))
    outs, hiddens = [], []
    for i, n in enumerate(lengths):
        h_i = None if hidden0 is None else tuple(h[:, i:i + 1] for h in hidden0)
        out, hid = alone(x[:n, i:i + 1], h_i)
        outs.append(_pad_rows(out, T))
        hiddens.append(hid)
    seq_out = torch.cat(outs, 1)
    seq_hidden = tuple(torch.cat(parts, 1) for parts in zip(*hiddens, strict=True))
    packed = rnn_utils.pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    packed_out, packed_hidden = lstm(packed, hidden0)
    unpacked, unpacked_len = rnn_utils.pad_packed_sequence(packed_out)
    close(packed_hidden, seq_hidden, **tol)
    torch.testing.assert_close(unpacked, seq_out, **tol)
    assert unpacked_len.tolist() == lengths
    seq_out.sum().backward()
    grad_x = x.grad.clone()
    x.grad.zero_()
    unpacked.sum().backward()
    torch.testing.assert_close(x.grad, grad_x, **tol)
    for p1, p2 in zip(lstm.parameters(), alone.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, **tol)


# ------------------------------------------------------------------ module_db (test/test_modules.py)


def _unbatched_reference(m, x, hx, batch_first, lstm):
    """common_modules' no_batch_dim_reference_rnn_gru / _lstm: the same input as a batch of one."""
    batch_dim = 0 if batch_first else 1
    if hx is not None:
        hx = tuple(h.unsqueeze(1) for h in hx) if lstm else hx.unsqueeze(1)
    out, h = m(x.unsqueeze(batch_dim), hx)
    h = tuple(t.squeeze(1) for t in h) if lstm else h.squeeze(1)
    return out.squeeze(batch_dim), h


def module_db_samples(mode, dtype, requires_grad=False, packed=False):
    """module_inputs_torch_nn_RNN_GRU / _LSTM: (constructor kwargs, forward args) of unbatched input with
    and without a hidden state, over bias, batch_first, bidirectional (and nonlinearity or proj_size);
    with ``packed``, also PackedSequence inputs (the RNN/GRU samples' with_packed_sequence)."""
    make = partial(torch.randn, dtype=dtype, requires_grad=requires_grad)
    samples = []
    extra = {"RNN": [{"nonlinearity": "relu"}, {"nonlinearity": "tanh"}], "GRU": [{}],
             "LSTM": [{"proj_size": 0}, {"proj_size": 2}]}[mode]
    for kw, bias, batch_first, bidirectional in itertools.product(extra, (False, True), (False, True),
                                                                  (False, True)):
        base = dict(input_size=2, num_layers=2, bias=bias, batch_first=batch_first,
                    bidirectional=bidirectional, **kw)
        L = 4 if bidirectional else 2
        if mode == "LSTM":
            out_size = kw["proj_size"] or 3
            samples.append((dict(base, hidden_size=3), (make(2, 2),)))
            samples.append((dict(base, hidden_size=3), (make(3, 2), (make(L, out_size), make(L, 3)))))
            continue
        samples.append((dict(base, hidden_size=2), (make(3, 2),)))
        samples.append((dict(base, hidden_size=3), (make(3, 2), make(L, 3))))
        if packed:
            for lens, B in (([5, 3], 2), ([5, 3, 3, 2, 2], 5)):
                data = make(5, B, 2)
                samples.append((dict(base, hidden_size=2), (rnn_utils.pack_padded_sequence(data, lens),)))
    return samples


MODES = ["RNN", "GRU", "LSTM"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
def test_module_forward(impl, mode, dtype, training):
    # TestModule.test_forward: unbatched input against the batch-of-one reference, then .float()/.double()
    torch.manual_seed(0)
    for cons, args in module_db_samples(mode, dtype):
        m = getattr(nn_of(impl), mode)(**cons).to(dtype)
        m.train(training)
        with torch.random.fork_rng():
            out = m(*args)
        if not isinstance(args[0], rnn_utils.PackedSequence):
            with torch.random.fork_rng():
                hx = args[1] if len(args) > 1 else None
                ref = _unbatched_reference(m, args[0], hx, cons["batch_first"], mode == "LSTM")
            close(out, ref, **(F64 if dtype == torch.float64 else F32))
        (m.float() if dtype == torch.float32 else m.double())(*args)
        assert all(p.dtype == dtype for p in m.parameters())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_factory_kwargs(impl, mode, dtype):
    # TestModule.test_factory_kwargs: device and dtype reach every parameter.
    for cons, _ in module_db_samples(mode, dtype):
        m = getattr(nn_of(impl), mode)(**cons, device="cpu", dtype=dtype)
        assert all(p.dtype == dtype and p.device.type == "cpu" for p in m.parameters())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
def test_module_repr(impl, mode):  # TestModule.test_repr
    for cons, _ in module_db_samples(mode, torch.float32):
        m = getattr(nn_of(impl), mode)(**cons)
        assert repr(m) == str(m) == repr(getattr(torch.nn, mode)(**cons))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", [True, False])
def test_module_pickle(impl, mode, training, tmp_path):
    # TestModule.test_pickle: torch.save of the module, torch.load (weights_only, torch's default; torch.nn's
    # classes must be allowlisted for it, vgkernels allowlists its own), the same output.
    path = tmp_path / "m.pt"
    for cons, args in module_db_samples(mode, torch.float32):
        m = getattr(nn_of(impl), mode)(**cons)
        m.train(training)
        with torch.random.fork_rng():
            out = m(*args)
        torch.save(m, path)
        with torch.serialization.safe_globals([getattr(torch.nn, mode)]):
            copy_ = torch.load(path)
        with torch.random.fork_rng():
            close(copy_(*args), out, atol=0, rtol=0)


def _float_tensors(obj):
    """The floating-point tensors of a nested output (a PackedSequence also holds its int64 batch sizes)."""
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _noncontiguous_like(t):
    out = torch.repeat_interleave(t, 2, dim=-1)[..., ::2].detach()
    return out.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_non_contiguous_tensors(impl, mode, dtype):
    # TestModule.test_non_contiguous_tensors: strided inputs and upstream gradients change nothing.
    torch.manual_seed(0)
    for cons, args in module_db_samples(mode, dtype, requires_grad=True):
        m = getattr(nn_of(impl), mode)(**cons).to(dtype)
        flat_in = tree_flatten(args)[0]
        out = tree_flatten(m(*args))[0]
        grads = [torch.randn_like(o) for o in out]
        base = torch.autograd.grad(out, flat_in + list(m.parameters()), grads)
        nc_args = tree_flatten(args)[1].unflatten([_noncontiguous_like(t) for t in flat_in])
        nc_flat = tree_flatten(nc_args)[0]
        for use_nc_in, use_nc_grad in itertools.product((False, True), repeat=2):
            inputs = nc_flat if use_nc_in else flat_in
            o = tree_flatten(m(*(nc_args if use_nc_in else args)))[0]
            g = [_noncontiguous_like(t) for t in grads] if use_nc_grad else grads
            close(o, out, atol=0, rtol=0)
            close(torch.autograd.grad(o, inputs + list(m.parameters()), g), base, atol=1e-4, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", [True, False])
def test_module_grad(impl, mode, training):
    # TestModule.test_grad: float64 gradcheck of the total derivative (inputs and every parameter), then
    # of each parameter alone; packed samples included.
    torch.manual_seed(0)
    for cons, args in module_db_samples(mode, torch.float64, requires_grad=True, packed=True):
        m = getattr(nn_of(impl), mode)(**cons).double()
        m.train(training)
        params = tuple(m.parameters())
        if isinstance(args[0], rnn_utils.PackedSequence):  # only a PackedSequence's data has a gradient
            rest = tuple(args[0])[1:]
            inputs = (args[0].data,) + params

            def fn(data, *_, m=m, rest=rest):
                return _float_tensors(m(rnn_utils.PackedSequence(data, *rest)))
        else:
            flat_args, spec = tree_flatten(args)
            inputs = tuple(flat_args) + params
            n = len(flat_args)

            def fn(*flat, m=m, n=n, spec=spec):
                return _float_tensors(m(*spec.unflatten(list(flat[:n]))))

        assert torch.autograd.gradcheck(fn, inputs, check_batched_grad=True, fast_mode=True)
        for p in params:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
            assert torch.autograd.gradcheck(fn, inputs, check_batched_grad=True, fast_mode=True)
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", [True, False])
def test_module_memory_format(impl, mode, training):
    # TestModule.test_memory_format (3-D inputs: contiguous format only): the outputs and the input
    # gradients come out contiguous where torch.nn's do.
    for cons, args in module_db_samples(mode, torch.float32, requires_grad=True):
        m = getattr(nn_of(impl), mode)(**cons)
        m.train(training)
        out = tree_flatten(m(*args))[0]
        assert all(o.is_contiguous() for o in out)
        grads = torch.autograd.grad(out, tree_flatten(args)[0], [torch.rand_like(o) for o in out])
        assert all(g.is_contiguous() for g in grads)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
def test_module_if_train_and_eval_modes_differ(impl, mode):
    # TestModule.test_if_train_and_eval_modes_differ: the forward reads .training (train_and_eval_differ).
    for cons, args in module_db_samples(mode, torch.float32):
        m = getattr(nn_of(impl), mode)(**cons)
        delattr(m, "training")
        with pytest.raises(AttributeError, match="'training'"):
            m(*args)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
def test_module_device_ctx_init(impl, mode):
    # TestModule.test_device_ctx_init: built under torch.device("meta"), parameters as on the CPU but meta.
    for cons, _ in module_db_samples(mode, torch.float32):
        cls = getattr(nn_of(impl), mode)
        cpu = cls(**cons)
        with torch.device("meta"):
            meta = cls(**cons)
        for p_meta, p_cpu in zip(meta.parameters(), cpu.parameters(), strict=True):
            assert p_meta.is_meta and p_meta.shape == p_cpu.shape and p_meta.dtype == p_cpu.dtype


MODULE_ERRORS = [  # module_error_inputs_torch_nn_RNN_GRU: (constructor args, kwargs, error, regex)
    ((10, 0, 1), {}, ValueError, "hidden_size must be greater than zero"),
    ((10, 10, 0), {}, ValueError, "num_layers must be greater than zero"),
    ((3, 5), {"bias": 0}, TypeError, "bias should be of type bool, got: int"),
    ((3, 5), {"bias": 1}, TypeError, "bias should be of type bool, got: int"),
    ((3, 5), {"bias": "True"}, TypeError, "bias should be of type bool, got: str"),
    ((3, 5), {"batch_first": 0}, TypeError, "batch_first should be of type bool, got: int"),
    ((3, 5), {"batch_first": 1}, TypeError, "batch_first should be of type bool, got: int"),
    ((3, 5), {"batch_first": "False"}, TypeError, "batch_first should be of type bool, got: str"),
    ((3.0, 5), {}, TypeError, "input_size should be of type int, got: float"),
    (("10", 5), {}, TypeError, "input_size should be of type int, got: str"),
    ((0, 5), {}, ValueError, "input_size must be greater than zero"),
    ((-1, 5), {}, ValueError, "input_size must be greater than zero"),
    ((3, 5.0), {}, TypeError, "hidden_size should be of type int, got: float"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_errors(impl, mode, dtype):
    # TestModule.test_errors: torch.nn's construction errors, and the dtype mismatch error of the forward.
    cls = getattr(nn_of(impl), mode)
    for args, kwargs, error, regex in MODULE_ERRORS:
        with pytest.raises(error, match=regex):
            cls(*args, **kwargs)
    m = cls(3, 5, dtype=dtype)
    other = torch.float64 if dtype == torch.float32 else torch.float32
    with pytest.raises(ValueError, match=r"RNN input dtype .* does not match weight dtype .* Convert input: "
                                         r"input\.to\(.*\), or convert model: model\.to\(.*\)"):
        m(torch.randn(2, 4, 3, dtype=other))
