"""Every error the package raises names the argument, what was expected and what was given.

A broad sample of bad calls across the public API and the C++ ops, one case each: the exception has
the right type, and its message names the argument and shows the value (or type, shape, dtype or
device) that was given. Each case lists those words; a message missing one fails.
"""

import pytest
import torch

import vgkernels as vgk
import vgkernels.triton.recurrent  # noqa: F401  (registers the Triton ops)
from vgkernels import init as vinit
from vgkernels import tasks
from vgkernels.diagnostics import bptt

X = torch.randn(5, 2, 3)


def params_with_grads():
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    return [p]


def rnn_forward(**changes):
    """torch.ops.vgk.rnn_forward of an LSTM step, with some arguments replaced."""
    args = {"xproj": torch.randn(2, 1, 8), "h0": torch.zeros(1, 2), "c0": torch.zeros(1, 2),
            "w_hh": torch.zeros(8, 2), "b_hh": None, "lengths": None, "probe": None, "mode": "lstm",
            "reverse": False, "track": False}
    args.update(changes)
    return torch.ops.vgk.rnn_forward(*args.values())


def triton_gru_forward(**changes):
    """torch.ops.vgk.rnn_forward_triton of a GRU step (interpreted), with some arguments replaced."""
    args = {"xproj": torch.randn(2, 1, 6), "h0": torch.zeros(1, 2), "c0": None, "w_hh": torch.zeros(6, 2),
            "b_hh": None, "lengths": None, "probe": None, "mode": "gru", "reverse": False, "track": False}
    args.update(changes)
    return torch.ops.vgk.rnn_forward_triton(*args.values())


# (id, call, exception type, words the message must contain: the argument, then the value given)
CASES = [
    # LayerNorm
    ("ln-input-type", lambda: vgk.ops.layer_norm([[1.0]], 1), TypeError, ["input", "list"]),
    ("ln-input-dtype", lambda: vgk.ops.layer_norm(torch.ones(2, 3, dtype=torch.int32), 3), TypeError,
     ["input", "torch.int32"]),
    ("ln-shape", lambda: vgk.ops.layer_norm(torch.randn(2, 3), 4), ValueError,
     ["normalized_shape=[4]", "[2, 3]"]),
    ("ln-weight-shape", lambda: vgk.ops.layer_norm(torch.randn(2, 3), 3, torch.ones(4)), ValueError,
     ["weight", "[4]"]),
    ("ln-weight-dtype", lambda: vgk.ops.layer_norm(torch.randn(2, 3), 3, torch.ones(3).double()), TypeError,
     ["weight", "torch.float64"]),
    ("ln-mixed-dtype",
     lambda: vgk.ops.layer_norm(torch.randn(2, 3).half(), 3, torch.ones(3), torch.ones(3).half()),
     TypeError, ["bias", "torch.float16"]),
    ("ln-eps", lambda: vgk.ops.layer_norm(torch.randn(2, 3), 3, eps=-1.0), ValueError, ["eps", "-1.0"]),
    ("ln-grad-clip", lambda: vgk.ops.layer_norm(torch.randn(2, 3), 3, grad_clip=0), ValueError,
     ["grad_clip", "0"]),
    ("ln-backend", lambda: vgk.ops.layer_norm(torch.randn(2, 3), 3, backend="gpu"), ValueError,
     ["backend", "'gpu'"]),
    ("ln-module-grad-clip", lambda: vgk.nn.LayerNorm(3, grad_clip=-2), ValueError, ["grad_clip", "-2"]),
    ("ln-op-dtype",
     lambda: torch.ops.vgk.layer_norm_forward(torch.randn(2, 3).half(), None, None, 1, 1e-5, None),
     RuntimeError, ["input", "Half"]),
    ("ln-op-ndim", lambda: torch.ops.vgk.layer_norm_forward(torch.randn(2, 3), None, None, 3, 1e-5, None),
     RuntimeError, ["normalized_ndim", "3"]),
    ("ln-op-weight-grad", lambda: torch.ops.vgk.layer_norm_backward(
        torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2), torch.ones(2), None, 1, None, True, False),
     RuntimeError, ["weight_grad", "weight=None"]),
    # Recurrent modules
    # torch.nn's own arguments raise torch.nn's own errors, verbatim (test_dropin.py compares them)
    ("rnn-hidden-size", lambda: vgk.nn.LSTM(3, 0), ValueError, ["hidden_size", "zero"]),
    ("rnn-dropout", lambda: vgk.nn.GRU(3, 4, dropout=1.5), ValueError, ["dropout", "[0, 1]"]),
    ("rnn-grad-clip", lambda: vgk.nn.LSTM(3, 4, grad_clip=-1), ValueError, ["grad_clip", "-1"]),
    ("rnn-nonlinearity", lambda: vgk.nn.RNN(3, 4, nonlinearity="gelu"), ValueError,
     ["nonlinearity", "'gelu'"]),
    ("rnn-layer-norm", lambda: vgk.nn.RNN(3, 4, layer_norm=True), ValueError, ["layer_norm", "RNN_TANH"]),
    ("rnn-input-dim", lambda: vgk.nn.LSTM(3, 4)(torch.randn(1, 2, 3, 4)), ValueError, ["input", "4D"]),
    ("rnn-input-features", lambda: vgk.nn.LSTM(3, 4)(torch.randn(5, 2, 7)), RuntimeError,
     ["input_size", "Expected 3, got 7"]),
    ("rnn-input-dtype", lambda: vgk.nn.GRU(3, 4)(X.long()), ValueError, ["input dtype", "torch.int64"]),
    ("rnn-hx-type", lambda: vgk.nn.LSTM(3, 4)(X, torch.zeros(1, 2, 4)), TypeError, ["hx", "Tensor"]),
    ("rnn-hx-shape", lambda: vgk.nn.GRU(3, 4)(X, torch.zeros(1, 3, 4)), RuntimeError,
     ["hidden size", "[1, 3, 4]"]),
    ("rnn-hx-dtype", lambda: vgk.nn.GRU(3, 4)(X, torch.zeros(1, 2, 4).double()), TypeError,
     ["h0", "torch.float64"]),
    ("rnn-cpp-half", lambda: vgk.nn.LSTM(3, 4, backend="cpp")(X.half()), ValueError,
     ["input dtype", "torch.float16"]),
    ("rnn-empty-sequence", lambda: vgk.nn.LSTM(3, 4)(torch.randn(0, 2, 3)), RuntimeError,
     ["sequence length", "T = 0"]),
    ("rnn-op-dtype", lambda: rnn_forward(xproj=torch.randn(2, 1, 8).half()), TypeError, ["xproj", "Half"]),
    ("rnn-op-mode", lambda: rnn_forward(mode="lstmx"), ValueError, ["mode", "'lstmx'"]),
    ("rnn-op-c0-missing", lambda: rnn_forward(c0=None), ValueError, ["c0", "None"]),
    ("rnn-op-c0-extra",
     lambda: rnn_forward(mode="rnn_tanh", xproj=torch.randn(2, 1, 2), w_hh=torch.zeros(2, 2)),
     ValueError, ["c0", "[1, 2]"]),
    ("rnn-op-lengths", lambda: rnn_forward(lengths=torch.tensor([5])), ValueError, ["lengths", "5"]),
    ("rnn-op-w-hh", lambda: rnn_forward(w_hh=torch.zeros(7, 2)), ValueError, ["w_hh", "[7, 2]"]),
    ("triton-op-c0-extra", lambda: triton_gru_forward(c0=torch.zeros(1, 2)), ValueError, ["c0", "(1, 2)"]),
    ("triton-op-h0", lambda: triton_gru_forward(h0=torch.zeros(1, 3)), ValueError, ["h0", "(1, 3)"]),
    ("track-model", lambda: vgk.track(3).__enter__(), TypeError, ["model", "int"]),
    # Clipping
    ("clip-max-norm", lambda: vgk.clip_grad_norm_(params_with_grads(), "a"), ValueError, ["max_norm", "'a'"]),
    ("clip-norm-type", lambda: vgk.clip_grad_norm_(params_with_grads(), 1.0, norm_type="fro"), ValueError,
     ["norm_type", "'fro'"]),
    ("clip-parameters", lambda: vgk.clip_grad_norm_(3, 1.0), TypeError, ["parameters", "int"]),
    ("total-norm-tensors", lambda: vgk.get_total_norm(["a"]), TypeError, ["tensors[0]", "str"]),
    ("total-norm-dtype", lambda: vgk.get_total_norm([torch.ones(3, dtype=torch.int64)]), RuntimeError,
     ["tensors[0]", "Long"]),
    ("clip-total-norm", lambda: vgk.clip_grads_with_norm_(params_with_grads(), 1.0, torch.ones(2)),
     RuntimeError, ["total_norm", "[2]"]),
    ("clip-op-norm-type", lambda: torch.ops.vgk.multi_tensor_norm([torch.ones(2)], -1.0), RuntimeError,
     ["norm_type", "-1"]),
    ("clip-op-inf-empty", lambda: torch.ops.vgk.multi_tensor_norm([torch.ones(0)], float("inf")),
     RuntimeError, ["norm_type=inf", "[0]"]),
    # Diagnostics
    ("monitor-every", lambda: vgk.diagnostics.GradientMonitor(torch.nn.Linear(2, 2), every=0), ValueError,
     ["every", "0"]),
    ("monitor-model", lambda: vgk.diagnostics.GradientMonitor("m"), TypeError, ["model", "str"]),
    ("spectral-module", lambda: vgk.diagnostics.spectral_norms(torch.nn.Linear(2, 2), X), TypeError,
     ["module", "Linear"]),
    ("spectral-iters", lambda: vgk.diagnostics.spectral_norms(torch.nn.LSTM(3, 4), X, iters=0), ValueError,
     ["iters", "0"]),
    ("horizon-source", lambda: vgk.diagnostics.gradient_horizon("x"), TypeError, ["source", "str"]),
    ("horizon-threshold", lambda: vgk.diagnostics.gradient_horizon(torch.ones(5), threshold=0), ValueError,
     ["threshold", "0"]),
    ("horizon-anchor", lambda: vgk.diagnostics.gradient_horizon(torch.ones(5), anchor=9), ValueError,
     ["anchor", "9"]),
    ("report-trace", lambda: vgk.diagnostics.trace_report(3), TypeError, ["trace", "int"]),
    ("plot-empty", lambda: vgk.diagnostics.plot_trace({}, "unused.png"), ValueError, ["trace", "empty dict"]),
    ("table-rows", lambda: bptt.render_table(["a", "b"], [[1]]), ValueError, ["rows[0]", "got 1"]),
    ("grad-stats-inv-scale", lambda: torch.ops.vgk.grad_stats([torch.ones(2)], torch.ones(2), -10.0, 1.0, 4),
     RuntimeError, ["inv_scale", "[2]"]),
    # Initializations and tasks
    ("init-scheme", lambda: vinit.init_recurrent_(torch.nn.LSTM(2, 3), "glorot"), ValueError,
     ["scheme", "'glorot'"]),
    ("init-module", lambda: vinit.init_recurrent_(torch.nn.Linear(2, 3), "orthogonal"), TypeError,
     ["module", "Linear"]),
    ("init-forget-bias", lambda: vinit.lstm_forget_bias_(torch.nn.LSTM(2, 3, bias=False)), ValueError,
     ["module", "bias=False"]),
    ("init-tensor", lambda: vinit.xavier_uniform_(torch.ones(3)), ValueError, ["tensor", "(3,)"]),
    ("init-blocks", lambda: vinit.orthogonal_(torch.ones(4, 3), blocks=3), ValueError, ["blocks", "3"]),
    ("task-seq-len", lambda: tasks.adding_problem(4, 1), ValueError, ["seq_len", "1"]),
    ("task-seed-generator", lambda: tasks.adding_problem(4, 10, seed=1, generator=torch.Generator()),
     ValueError, ["seed", "generator", "seed=1"]),
    ("task-activation", lambda: tasks.deep_mlp(3, 4, activation="swishy"), ValueError,
     ["activation", "'swishy'"]),
]


@pytest.mark.parametrize("call,error,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_names_argument_and_value(call, error, words):
    with pytest.raises(error) as raised:
        call()
    message = str(raised.value)
    missing = [w for w in words if w not in message]
    assert not missing, f"{missing} not in: {message}"
