"""PyTorch's own tests of LSTMCell, GRUCell and RNNCell, written again and run against torch.nn and vgkernels.

Where an original only asserts that some Exception is raised, the port asserts the RuntimeError that
torch.nn raises there.

Sources (each check names its original): pytorch test/test_nn.py (TestNN, TestNNDeviceType) and
test/test_modules.py over the cell entries of torch/testing/_internal/common_modules.py's module_db
(sample inputs: module_inputs_torch_nn_RNN_GRU_Cell and _LSTMCell; error inputs:
module_error_inputs_torch_nn_RNN_GRU_Cell and _LSTMCell). Every test is parametrized over ``impl``:
torch.nn itself, so a check that fails there is wrong here, and vgkernels.nn, which must pass it too.

Tolerances: those of the originals, torch.testing's defaults for the dtype (test_modules compares
with TestCase.assertEqual, whose float64 defaults are rtol 1e-7, atol 1e-7), atol 1e-4 for the input
gradients of the non-contiguous check as there, and gradcheck/gradgradcheck's defaults.
"""

import copy
import itertools
import tempfile

import pytest
import torch
from torch.autograd.gradcheck import gradcheck, gradgradcheck

import vgkernels as vgk

IMPLS = {"torch.nn": torch.nn, "vgkernels": vgk.nn}
CELLS = ["RNNCell", "GRUCell", "LSTMCell"]
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(params=list(IMPLS))
def nn(request):
    return IMPLS[request.param]


# ---------------------------------------------------------------------------------------------------
# test/test_nn.py


def test_RNN_cell_no_broadcasting(nn):
    # TestNN.test_RNN_cell_no_broadcasting: a batch or size that would broadcast raises.
    hidden_size, input_size = 20, 10

    def raises(cell_cls, input, hx):
        with pytest.raises(RuntimeError):
            cell_cls(input_size, hidden_size)(input, hx)

    def all_cells(bad_hx, good_hx, input):
        raises(nn.RNNCell, input, bad_hx)
        raises(nn.GRUCell, input, bad_hx)
        raises(nn.LSTMCell, input, (bad_hx, good_hx))
        raises(nn.LSTMCell, input, (good_hx, bad_hx))

    input, good_hx = torch.randn(3, input_size), torch.randn(3, hidden_size)
    all_cells(torch.randn(1, hidden_size), good_hx, input)  # batch size
    all_cells(torch.randn(3, 1), good_hx, input)  # hidden size
    all_cells(good_hx, good_hx, torch.randn(3, 1))  # input size


@pytest.mark.parametrize("bias", [True, False])
def test_LSTM_cell(nn, bias):
    # TestNN.test_LSTM_cell: six steps, then backward.
    input, hx, cx = torch.randn(3, 10), torch.randn(3, 20), torch.randn(3, 20)
    lstm = nn.LSTMCell(10, 20, bias=bias)
    for _ in range(6):
        hx, cx = lstm(input, (hx, cx))
    (hx + cx).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lstm.parameters())


def test_LSTM_cell_forward_input_size(nn):
    # TestNN.test_LSTM_cell_forward_input_size
    with pytest.raises(RuntimeError):
        nn.LSTMCell(10, 20)(torch.randn(3, 11), (torch.randn(3, 20), torch.randn(3, 20)))


def test_LSTM_cell_forward_hidden_size(nn):
    # TestNN.test_LSTM_cell_forward_hidden_size: h or c of the wrong size.
    input, hx, cx = torch.randn(3, 10), torch.randn(3, 21), torch.randn(3, 20)
    lstm = nn.LSTMCell(10, 20)
    with pytest.raises(RuntimeError):
        lstm(input, (hx, cx))
    with pytest.raises(RuntimeError):
        lstm(input, (cx, hx))


@pytest.mark.parametrize("cell", ["RNNCell", "GRUCell"])
@pytest.mark.parametrize("bias", [True, False])
def test_RNN_cell(nn, cell, bias):
    # TestNN.test_RNN_cell: six steps, then backward.
    input, hx = torch.randn(3, 10), torch.randn(3, 20)
    module = getattr(nn, cell)(10, 20, bias=bias)
    for _ in range(6):
        hx = module(input, hx)
    hx.sum().backward()
    assert all(p.grad is not None for p in module.parameters())


def test_RNN_cell_forward_input_size(nn):
    # TestNN.test_RNN_cell_forward_input_size
    input, hx = torch.randn(3, 11), torch.randn(3, 20)
    for cell in (nn.RNNCell, nn.GRUCell):
        with pytest.raises(RuntimeError):
            cell(10, 20)(input, hx)


def test_RNN_cell_forward_hidden_size(nn):
    # TestNN.test_RNN_cell_forward_hidden_size
    input, hx = torch.randn(3, 10), torch.randn(3, 21)
    cells = (nn.RNNCell(10, 20, nonlinearity="relu"), nn.RNNCell(10, 20, nonlinearity="tanh"),
             nn.GRUCell(10, 20))
    for cell in cells:
        with pytest.raises(RuntimeError):
            cell(input, hx)


def test_RNN_cell_forward_zero_hidden_size(nn):
    # TestNN.test_RNN_cell_forward_zero_hidden_size: hidden_size 0 gives [batch, 0].
    input, hx = torch.randn(3, 10), torch.randn(3, 0)
    cells = (nn.RNNCell(10, 0, nonlinearity="relu"), nn.RNNCell(10, 0, nonlinearity="tanh"),
             nn.GRUCell(10, 0))
    for cell in cells:
        assert cell(input, hx).shape == torch.Size([3, 0])


def test_lstmcell_backward_only_one_output_grad(nn):
    # TestNNDeviceType.test_lstmcell_backward_only_one_output_grad (a CUDA test there; here on the CPU):
    # an undefined gradient for the other output does not hamper the backward.
    cell = nn.LSTMCell(2, 3).to(dtype=torch.double)
    s = torch.randn(1, 2, dtype=torch.double, requires_grad=True)
    for i in range(2):
        out = cell(s)[i]
        out.sum().backward()
        assert not (s.grad is None or s.grad.abs().sum().item() == 0)


# ---------------------------------------------------------------------------------------------------
# test/test_modules.py over module_db's cell entries


def samples(cell, make):
    """module_db's sample inputs: (constructor args, kwargs, forward args); all unbatched."""
    state = (make(10), make(10)) if cell == "LSTMCell" else make(10)
    out = [((5, 10), {}, (make(5), state)), ((5, 10), {"bias": True}, (make(5), state))]
    if cell == "RNNCell":
        out.append(((5, 10), {"bias": True, "nonlinearity": "relu"}, (make(5), state)))
    return out


def maker(dtype, requires_grad=False):
    def make(*shape):
        return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)

    return make


def unbatched_reference(module, input, hx):
    """no_batch_dim_reference_fn / no_batch_dim_reference_lstmcell: the batched call on one sample."""
    state = tuple(t.unsqueeze(0) for t in hx) if isinstance(hx, tuple) else hx.unsqueeze(0)
    out = module(input.unsqueeze(0), state)
    return tuple(t.squeeze(0) for t in out) if isinstance(out, tuple) else out.squeeze(0)


def flat(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward(nn, cell, dtype):
    # TestModule.test_forward: the unbatched call equals the batched call on one sample.
    for args, kwargs, (input, hx) in samples(cell, maker(dtype)):
        m = getattr(nn, cell)(*args, **kwargs).to(dtype)
        for a, b in zip(flat(m(input, hx)), flat(unbatched_reference(m, input, hx)), strict=True):
            torch.testing.assert_close(a, b)
        assert all(p.dtype == dtype for p in m.parameters())


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_factory_kwargs(nn, cell, dtype):
    # TestModule.test_factory_kwargs: device and dtype reach every created parameter.
    for args, kwargs, _ in samples(cell, maker(dtype)):
        m = getattr(nn, cell)(*args, **kwargs, device="cpu", dtype=dtype)
        for name, p in m.named_parameters():
            assert str(p.device) == "cpu" and p.dtype == dtype, name


@pytest.mark.parametrize("cell", CELLS)
def test_repr(nn, cell):
    # TestModule.test_repr: repr and str work.
    for args, kwargs, _ in samples(cell, maker(torch.float32)):
        m = getattr(nn, cell)(*args, **kwargs)
        assert repr(m) == str(m) and repr(m).startswith(cell)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pickle(nn, cell, dtype):
    # TestModule.test_pickle: a saved and loaded module gives the same output.
    for args, kwargs, (input, hx) in samples(cell, maker(dtype)):
        m = getattr(nn, cell)(*args, **kwargs).to(dtype)
        output = m(input, hx)
        with tempfile.TemporaryFile() as f:
            torch.save(m, f)
            f.seek(0)
            copy_ = torch.load(f, weights_only=False)
        for a, b in zip(flat(output), flat(copy_(input, hx)), strict=True):
            torch.testing.assert_close(a, b)


def _non_contiguous(t):
    """test_modules' _make_non_contiguous: every other element of a doubled tensor."""
    if not isinstance(t, torch.Tensor):
        return tuple(_non_contiguous(x) for x in t)
    out = torch.repeat_interleave(t, 2, dim=-1)[..., ::2].detach()
    return out.requires_grad_(t.requires_grad)


def _leaves(x):
    return list(x) if isinstance(x, tuple) else [x]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_tensors(nn, cell, dtype):
    # TestModule.test_non_contiguous_tensors: non-contiguous inputs and output gradients give the same
    # outputs and gradients as contiguous ones (each output backpropagated separately, retaining the graph).
    for args, kwargs, (input, hx) in samples(cell, maker(dtype, requires_grad=True)):
        m = getattr(nn, cell)(*args, **kwargs).to(dtype)

        def run(inp, state, grad_outputs, m=m):
            for t in [inp, *_leaves(state), *m.parameters()]:
                t.grad = None
            out = m(inp, state)
            for o, g in zip(flat(out), grad_outputs, strict=True):
                o.backward(g, retain_graph=True)
            input_grads = [t.grad.clone() for t in [inp, *_leaves(state)]]
            return out, input_grads, [p.grad.clone() for p in m.parameters()]

        default_out = m(input, hx)
        grad_out = [o.detach().clone().normal_() for o in flat(default_out)]
        ref = run(input, hx, grad_out)
        inputs = [(input, hx), (_non_contiguous(input), _non_contiguous(hx))]
        for (inp, state), g in itertools.product(inputs, [grad_out, [_non_contiguous(t) for t in grad_out]]):
            out, input_grads, param_grads = run(inp, state, copy.deepcopy(g))
            for a, b in zip(flat(out), flat(ref[0]), strict=True):
                torch.testing.assert_close(a, b)
            for a, b in zip(input_grads, ref[1], strict=True):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
            for a, b in zip(param_grads, ref[2], strict=True):
                torch.testing.assert_close(a, b)


def _gradients_helper(nn, cell, check):
    """TestModule._test_gradients_helper: check over the inputs and every parameter, in float64 (the
    check perturbs the parameters in place, and the module reads them)."""
    for args, kwargs, (input, hx) in samples(cell, maker(torch.float64, requires_grad=True)):
        m = getattr(nn, cell)(*args, **kwargs).to(torch.float64)
        lstm = isinstance(hx, tuple)
        leaves = (input, *_leaves(hx))

        def fn(*inputs_and_params, m=m, leaves=leaves, lstm=lstm):
            inp, *rest = inputs_and_params[: len(leaves)]
            return m(inp, tuple(rest) if lstm else rest[0])

        assert check(fn, leaves + tuple(m.parameters()))


@pytest.mark.parametrize("cell", CELLS)
def test_grad(nn, cell):
    # TestModule.test_grad: gradcheck (float64).
    _gradients_helper(nn, cell, gradcheck)


@pytest.mark.parametrize("cell", CELLS)
def test_gradgrad(nn, cell):
    # TestModule.test_gradgrad: gradgradcheck (float64); the cells support second derivatives.
    _gradients_helper(nn, cell, gradgradcheck)


@pytest.mark.parametrize("cell", CELLS)
def test_if_train_and_eval_modes_differ(nn, cell):
    # TestModule.test_if_train_and_eval_modes_differ: the cells behave alike in both modes.
    for args, kwargs, (input, hx) in samples(cell, maker(torch.float32)):
        m = getattr(nn, cell)(*args, **kwargs)
        train = m.train()(input, hx)
        for a, b in zip(flat(train), flat(m.eval()(input, hx)), strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cell", CELLS)
def test_device_ctx_init(nn, cell):
    # TestModule.test_device_ctx_init: built under a device context, the parameters are there.
    for args, kwargs, _ in samples(cell, maker(torch.float32)):
        with torch.device("meta"):
            m = getattr(nn, cell)(*args, **kwargs)
        on_cpu = getattr(nn, cell)(*args, **kwargs)
        assert all(p.device.type == "meta" for p in m.parameters())
        moved = on_cpu.to_empty(device="meta")
        assert [p.shape for p in m.parameters()] == [p.shape for p in moved.parameters()]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("swap", [False, True])
def test_to(nn, cell, swap):
    # TestModule.test_to: .to(dtype) converts the parameters and their gradients, in place or by swapping.
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        for args, kwargs, (input, hx) in samples(cell, maker(torch.float32)):
            m = getattr(nn, cell)(*args, **kwargs)
            sum(o.sum() for o in flat(m(input, hx))).backward()
            ids = [id(p) for p in m.parameters()]
            m.to(torch.float64)
            assert all(p.dtype == torch.float64 and p.grad.dtype == torch.float64 for p in m.parameters())
            assert [id(p) for p in m.parameters()] == ids
            state = tuple(t.double() for t in hx) if isinstance(hx, tuple) else hx.double()
            assert all(o.dtype == torch.float64 for o in flat(m(input.double(), state)))
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


@pytest.mark.parametrize("cell", CELLS)
def test_to_empty(nn, cell):
    # TestModule.test_to_empty: to_empty(device="meta") moves every parameter.
    for args, kwargs, _ in samples(cell, maker(torch.float32)):
        m = getattr(nn, cell)(*args, **kwargs).to_empty(device="meta")
        assert all(p.device.type == "meta" for p in m.parameters())


def error_samples(cell):
    """module_db's error inputs: (constructor args, forward args, error type, message regex)."""
    make = maker(torch.float32)
    if cell == "LSTMCell":
        def state(*shape):
            return (make(*shape), make(*shape))

        dims = r"Expected hx\[0\] to be 1D or 2D, got 4D instead"
    else:
        state = make
        dims = "Expected hidden to be 1D or 2D, got 4D instead"
    out = [
        ((10, 20), (make(3, 11), state(3, 20)), RuntimeError,
         "input has inconsistent input_size: got 11 expected 10"),
        ((10, 20), (make(3, 10), state(3, 21)), RuntimeError,
         "hidden0 has inconsistent hidden_size: got 21, expected 20"),
        ((10, 20), (make(3, 10), state(5, 20)), RuntimeError,
         "Input batch size 3 doesn't match hidden0 batch size 5"),
        ((10, 20), (make(3, 10), state(3, 1, 1, 20)), ValueError, dims),
    ]
    if cell != "LSTMCell":
        # (10, 20, "relu") passes "relu" as bias, as module_db does.
        out += [((10, 20, "relu"), (make(3, 10), make(3, 21)), RuntimeError,
                 "hidden0 has inconsistent hidden_size: got 21, expected 20"),
                ((10, 20, "tanh"), (make(3, 10), make(3, 21)), RuntimeError,
                 "hidden0 has inconsistent hidden_size: got 21, expected 20")]
    return out


@pytest.mark.parametrize("cell", CELLS)
def test_errors(nn, cell):
    # TestModule.test_errors: the error type and message of each error input.
    for args, forward_args, error, regex in error_samples(cell):
        m = getattr(nn, cell)(*args)
        with pytest.raises(error, match=regex):
            m(*forward_args)


# ---------------------------------------------------------------------------------------------------
# CUDA-only originals


@pytest.mark.gpu
@pytest.mark.parametrize("cell", ["GRUCell", "LSTMCell"])
def test_rnn_fused(cell):
    # TestNNDeviceType.test_rnn_fused: the CUDA cell (Triton here) equals the CPU one, values and gradients.
    input_size, hidden_size, batch = 10, 20, 5
    cpu = getattr(torch.nn, cell)(input_size, hidden_size).double()
    gpu = getattr(vgk.nn, cell)(input_size, hidden_size).double().cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(batch, input_size, dtype=torch.double, requires_grad=True)
    hx = torch.randn(batch, hidden_size, dtype=torch.double, requires_grad=True)
    state = (hx, hx * 0.5) if cell == "LSTMCell" else hx
    out_cpu = flat(cpu(x, state))
    x_gpu = x.detach().cuda().requires_grad_()
    state_gpu = tuple(t.detach().cuda() for t in state) if cell == "LSTMCell" else hx.detach().cuda()
    out_gpu = flat(gpu(x_gpu, state_gpu))
    for a, b in zip(out_cpu, out_gpu, strict=True):
        torch.testing.assert_close(a, b.cpu())
    sum(o.sum() for o in out_cpu).backward()
    sum(o.sum() for o in out_gpu).backward()
    torch.testing.assert_close(x.grad, x_gpu.grad.cpu())
    for p, q in zip(cpu.parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad.cpu())
