"""Bad input to the recurrent modules raises a clear error naming the argument, before any kernel runs."""

import pytest
import torch

import vgkernels as vgk

BACKENDS = ["cpp", "reference"]


@pytest.fixture(params=BACKENDS)
def lstm(request):
    return vgk.nn.LSTM(3, 4, num_layers=2, backend=request.param)


def test_wrong_rank(lstm):
    with pytest.raises(ValueError, match=r"input: expected a 2-D \(unbatched\) or 3-D"):
        lstm(torch.randn(2, 3, 4, 3))


def test_wrong_feature_size(lstm):
    with pytest.raises(ValueError, match="input: expected input_size=3 features, got 5"):
        lstm(torch.randn(4, 2, 5))


def test_wrong_hx_shape(lstm):
    h = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"hx: expected h0 of shape \(2, 2, 4\), got \(2, 3, 4\)"):
        lstm(torch.randn(4, 2, 3), (h, h))
    with pytest.raises(ValueError, match="hx should also be 3-D"):
        lstm(torch.randn(4, 2, 3), (h[0], h[0]))
    with pytest.raises(TypeError, match=r"hx: the LSTM expects a tuple \(h0, c0\)"):
        lstm(torch.randn(4, 2, 3), h)


def test_gru_rejects_tuple_hx():
    gru = vgk.nn.GRU(3, 4)
    h = torch.zeros(1, 2, 4)
    with pytest.raises(TypeError, match="GRU expects one tensor h0"):
        gru(torch.randn(4, 2, 3), (h, h))


def test_dtype_mismatch(lstm):
    with pytest.raises(TypeError, match="weight_ih_l0: expected dtype torch.float64 like input, got torch.float32"):  # noqa: E501
        lstm(torch.randn(4, 2, 3, dtype=torch.float64))
    h = torch.zeros(2, 2, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="h0: expected dtype torch.float32 like input, got torch.float64"):
        lstm(torch.randn(4, 2, 3), (h, h))


def test_integer_input(lstm):
    with pytest.raises(TypeError, match="input: expected a floating-point tensor"):
        lstm(torch.ones(4, 2, 3, dtype=torch.int64))


def test_device_mismatch(lstm):
    h = torch.zeros(2, 2, 4, device="meta")
    with pytest.raises(RuntimeError, match="h0: expected a tensor on cpu like input, got meta"):
        lstm(torch.randn(4, 2, 3), (h, h))


def test_empty_sequence(lstm):
    with pytest.raises(ValueError, match=r"input: the sequence is empty \(T = 0\)"):
        lstm(torch.randn(0, 2, 3))
    with pytest.raises(ValueError, match=r"input: the batch is empty \(B = 0\)"):
        lstm(torch.randn(4, 0, 3))


def test_half_input_with_float32_weights_is_refused_as_torch_refuses_it():
    m = vgk.nn.GRU(3, 4, backend="cpp")
    expected = "weight_ih_l0: expected dtype torch.bfloat16 like input, got torch.float32"
    with pytest.raises(TypeError, match=expected):
        m(torch.randn(2, 1, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="does not match weight dtype"):
        torch.nn.GRU(3, 4)(torch.randn(2, 1, 3, dtype=torch.bfloat16))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="hidden_size: expected a positive integer, got 0"):
        vgk.nn.LSTM(3, 0)
    with pytest.raises(ValueError, match=r"dropout: expected a number in \[0, 1\], got 1.5"):
        vgk.nn.LSTM(3, 4, dropout=1.5)
    with pytest.raises(ValueError, match="nonlinearity: expected 'tanh', 'relu' or 'sigmoid', got 'gelu'"):
        vgk.nn.RNN(3, 4, nonlinearity="gelu")
    with pytest.raises(ValueError, match="grad_clip: expected a positive number or None, got -1"):
        vgk.nn.GRU(3, 4, grad_clip=-1)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        vgk.nn.GRU(3, 4, backend="cuda")(torch.randn(2, 1, 3))


def test_cpp_backend_rejects_non_cpu_tensors():
    from vgkernels.backends import resolve_backend

    with pytest.raises(RuntimeError, match="backend 'cpp' runs on CPU tensors only"):
        resolve_backend("cpp", torch.device("cuda"))


def test_functional_bad_lengths():
    from vgkernels.ops.recurrent import recurrent

    m = vgk.nn.GRU(3, 4)
    weights = list(m.parameters())
    x = torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match=r"lengths: expected values in \[1, 5\], got min 0"):
        recurrent(x, None, weights, mode="gru", hidden_size=4, lengths=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"lengths: expected an int64 tensor of shape \[2\]"):
        recurrent(x, None, weights, mode="gru", hidden_size=4, lengths=torch.tensor([1.0, 3.0]))
    with pytest.raises(ValueError, match="mode: expected one of"):
        recurrent(x, None, weights, mode="elman", hidden_size=4)
    with pytest.raises(ValueError, match=r"weight_ih_l0: expected shape \(15, 3\), got \(12, 3\)"):
        recurrent(x, None, weights, mode="gru", hidden_size=5)
