"""Bad input to the recurrent modules raises a clear error naming the argument, before any kernel runs.

Where torch.nn raises for the same input, the modules raise the same exception type (mostly through
torch.nn's own checks, which they inherit)."""

import pytest
import torch

import vgkernels as vgk

BACKENDS = ["cpp", "reference"]


@pytest.fixture(params=BACKENDS)
def lstm(request):
    return vgk.nn.LSTM(3, 4, num_layers=2, backend=request.param)


def test_wrong_rank(lstm):
    with pytest.raises(ValueError, match=r"LSTM: Expected input to be 2D or 3D, got 4D"):
        lstm(torch.randn(2, 3, 4, 3))


def test_wrong_feature_size(lstm):
    with pytest.raises(RuntimeError, match=r"input.size\(-1\) must be equal to input_size. Expected 3, got"):
        lstm(torch.randn(4, 2, 5))


def test_wrong_hx_shape(lstm):
    h = torch.zeros(2, 3, 4)
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(2, 2, 4\), got \[2, 3, 4\]"):
        lstm(torch.randn(4, 2, 3), (h, h))
    with pytest.raises(RuntimeError, match="hx and cx should also be 3-D"):
        lstm(torch.randn(4, 2, 3), (h[0], h[0]))
    with pytest.raises(TypeError, match=r"hx: LSTM expects a tuple \(h_0, c_0\), got Tensor"):
        lstm(torch.randn(4, 2, 3), h)


def test_gru_rejects_tuple_hx():
    gru = vgk.nn.GRU(3, 4)
    h = torch.zeros(1, 2, 4)
    with pytest.raises(TypeError, match="hx: GRU expects one tensor h_0, got tuple"):
        gru(torch.randn(4, 2, 3), (h, h))


def test_dtype_mismatch(lstm):
    with pytest.raises(ValueError, match=r"RNN input dtype \(torch.float64\) does not match weight dtype"):
        lstm(torch.randn(4, 2, 3, dtype=torch.float64))
    h = torch.zeros(2, 2, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="h0: expected dtype torch.float32 like input, got torch.float64"):
        lstm(torch.randn(4, 2, 3), (h, h))


def test_integer_input(lstm):
    with pytest.raises(ValueError, match=r"RNN input dtype \(torch.int64\) does not match weight dtype"):
        lstm(torch.ones(4, 2, 3, dtype=torch.int64))
    from vgkernels.ops.recurrent import recurrent

    with pytest.raises(TypeError, match="input: expected a floating-point tensor"):
        recurrent(torch.ones(4, 2, 3, dtype=torch.int64), None, list(lstm.parameters()), mode="lstm",
                  hidden_size=4, num_layers=2)


def test_device_mismatch(lstm):
    h = torch.zeros(2, 2, 4, device="meta")
    with pytest.raises(RuntimeError, match="h0: expected a tensor on cpu like input, got meta"):
        lstm(torch.randn(4, 2, 3), (h, h))


def test_empty_sequence(lstm):
    # torch.nn raises a RuntimeError for T = 0 (and returns empty outputs for B = 0: test_torch_nn_port)
    with pytest.raises(RuntimeError, match="input: Expected sequence length to be larger than 0 in RNN"):
        lstm(torch.randn(0, 2, 3))


def test_half_input_with_float32_weights_is_refused_as_torch_refuses_it():
    # torch.nn's own check and message, outside autocast
    x = torch.randn(2, 1, 3, dtype=torch.bfloat16)
    for module in (vgk.nn.GRU(3, 4, backend="cpp"), torch.nn.GRU(3, 4)):
        with pytest.raises(ValueError, match=r"input dtype \(torch.bfloat16\) does not match weight dtype "
                                             r"\(torch.float32\)"):
            module(x)


def test_bad_constructor_arguments():
    # torch.nn's own checks (and messages) for its arguments; ours for the extra ones
    with pytest.raises(ValueError, match="hidden_size must be greater than zero"):
        vgk.nn.LSTM(3, 0)
    with pytest.raises(ValueError, match=r"dropout should be a number in range \[0, 1\]"):
        vgk.nn.LSTM(3, 4, dropout=1.5)
    with pytest.raises(ValueError, match="nonlinearity: Unknown nonlinearity 'gelu'; expected 'tanh'"):
        vgk.nn.RNN(3, 4, nonlinearity="gelu")
    with pytest.raises(ValueError, match="grad_clip: expected a positive number or None, got -1"):
        vgk.nn.GRU(3, 4, grad_clip=-1)
    with pytest.raises(TypeError, match="track: expected a bool, got int"):
        vgk.nn.GRU(3, 4, track=1)
    with pytest.raises(TypeError, match="layer_norm: expected a bool, got str"):
        vgk.nn.LSTM(3, 4, layer_norm="yes")
    with pytest.raises(ValueError, match="layer_norm: layer-normalized cells exist for LSTM and GRU, not"):
        vgk.nn.RNN(3, 4, layer_norm=True)
    with pytest.raises(ValueError, match="layer_norm: the layer-normalized LSTM has no projection, got"):
        vgk.nn.LSTM(3, 4, proj_size=2, layer_norm=True)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend: expected one of \('cpp', 'triton', 'reference'\) or "
                                         "None, got 'cuda'"):
        vgk.nn.GRU(3, 4, backend="cuda")


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
