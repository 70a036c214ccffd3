"""vgkernels' LSTM, GRU and RNN as torch.nn's own: subclasses, torch.nn's attributes and machinery,
parametrizations, serialization, quantization, empty batches, argument errors and dropout masks.

Each check compares with torch.nn.LSTM/GRU/RNN doing the same. Tolerances: float32 atol 1e-5, rtol 1e-4
(values and gradients against torch.nn); dropout masks and initializations are compared exactly.
"""

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.utils.prune  # noqa: F401  (not imported by torch.nn)
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import vgkernels as vgk
from vgkernels.nn.rnn import RecurrentBase

TOL = {"atol": 1e-5, "rtol": 1e-4}
PAIRS = {
    "LSTM": (vgk.nn.LSTM, nn.LSTM, {}),
    "GRU": (vgk.nn.GRU, nn.GRU, {}),
    "RNN_TANH": (vgk.nn.RNN, nn.RNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": (vgk.nn.RNN, nn.RNN, {"nonlinearity": "relu"}),
}


def pair(mode, *args, **kwargs):
    ours_cls, theirs_cls, extra = PAIRS[mode]
    torch.manual_seed(0)
    ours = ours_cls(*args, **extra, **kwargs)
    torch.manual_seed(0)
    theirs = theirs_cls(*args, **extra, **kwargs)
    return ours, theirs


def outputs_and_grads(model, x, params=None):
    out, state = model(x)
    states = list(state) if isinstance(state, tuple) else [state]
    data = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
    w = torch.linspace(-1, 1, data.numel()).reshape(data.shape)
    loss = (data * w).sum() + sum((s * s).sum() for s in states)
    params = list(model.parameters()) if params is None else params
    return [data, *states], torch.autograd.grad(loss, params)


def assert_all_close(a, b, **tol):
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        torch.testing.assert_close(u, v, **(tol or TOL), msg=lambda m, i=i: f"item {i}: {m}")


@pytest.mark.parametrize("mode", list(PAIRS))
def test_subclasses_and_torch_attributes(mode):
    ours, theirs = pair(mode, 3, 5, num_layers=2, bidirectional=True)
    torch_cls = PAIRS[mode][1]
    assert isinstance(ours, torch_cls) and isinstance(ours, nn.RNNBase) and isinstance(ours, RecurrentBase)
    assert ours.mode == theirs.mode == mode
    # built by torch.nn's __init__: the same parameters, drawn from the same random numbers
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert ours._all_weights == theirs._all_weights
    assert all(a is b for a, b in zip(ours._flat_weights, ours.parameters(), strict=True))
    shapes = [[[p.shape for p in ws] for ws in m.all_weights] for m in (ours, theirs)]
    assert shapes[0] == shapes[1]
    assert ours.proj_size == 0 and ours.dropout == 0.0 and ours.bias is True
    ours.flatten_parameters()  # a no-op on the CPU, as in torch.nn
    x = torch.randn(4, 2, 3)
    assert ours.get_expected_hidden_size(x, None) == theirs.get_expected_hidden_size(x, None) == (4, 2, 5)
    hx = torch.zeros(4, 2, 5)
    ours.check_forward_args(x, (hx, hx) if mode == "LSTM" else hx, None)
    with pytest.raises(RuntimeError, match="Expected hidden"):
        ours.check_forward_args(x, (hx[:, :1], hx) if mode == "LSTM" else hx[:, :1], None)
    perm = torch.tensor([1, 0])
    permuted = ours.permute_hidden((hx, hx + 1) if mode == "LSTM" else hx, perm)
    assert (permuted[0] if mode == "LSTM" else permuted).shape == hx.shape
    assert repr(ours) == repr(theirs)
    assert_all_close(outputs_and_grads(ours, x)[0], outputs_and_grads(theirs, x)[0])


def test_sigmoid_rnn_mode_is_not_one_torch_runs():
    m = vgk.nn.RNN(3, 4, nonlinearity="sigmoid")
    assert m.mode == "RNN_SIGMOID" and m.nonlinearity == "sigmoid"
    assert isinstance(m, nn.RNN)
    assert "nonlinearity='sigmoid'" in repr(m)
    # torch.nn's own forward refuses the mode instead of running another cell
    with pytest.raises(AssertionError, match="mode must be RNN_TANH or RNN_RELU, got RNN_SIGMOID"):
        nn.RNN.forward(m, torch.randn(2, 1, 3))
    out, _ = m(torch.randn(2, 1, 3))
    assert (out > 0).all() and (out < 1).all()


def test_extra_repr_adds_only_the_extra_arguments_set():
    m = vgk.nn.LSTM(3, 4, num_layers=2, proj_size=2, track=True, grad_clip=0.5, backend="cpp")
    assert repr(m) == "LSTM(3, 4, proj_size=2, num_layers=2, track=True, grad_clip=0.5, backend='cpp')"
    assert repr(vgk.nn.GRU(3, 4, layer_norm=True)) == "GRU(3, 4, layer_norm=True)"


@pytest.mark.parametrize("mode", list(PAIRS))
def test_to_and_double_keep_flat_weights_in_sync(mode):
    ours, theirs = pair(mode, 3, 4)
    ours.double()
    theirs.double()
    assert all(w.dtype == torch.float64 for w in ours._flat_weights)
    assert all(a is b for a, b in zip(ours._flat_weights, ours.parameters(), strict=True))
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    assert_all_close(outputs_and_grads(ours, x)[0], outputs_and_grads(theirs, x)[0], atol=1e-12, rtol=1e-10)
    ours.to(torch.float32)
    assert ours.weight_hh_l0.dtype == torch.float32 and ours._flat_weights[1] is ours.weight_hh_l0


def test_assigning_a_weight_updates_the_flat_weights():
    m = vgk.nn.GRU(3, 4)
    new = nn.Parameter(torch.zeros_like(m.weight_hh_l0))
    m.weight_hh_l0 = new
    assert m._flat_weights[1] is new
    theirs = nn.GRU(3, 4)
    theirs.load_state_dict(m.state_dict())
    x = torch.randn(3, 1, 3)
    torch.testing.assert_close(m(x)[0], theirs(x)[0], **TOL)


def test_a_weight_replaced_behind_setattr_is_seen_at_the_next_forward():
    # The check at every forward (_weights_have_changed) reads _parameters first.
    m = vgk.nn.GRU(3, 4)
    new = nn.Parameter(torch.zeros_like(m.weight_hh_l0))
    m._parameters["weight_hh_l0"] = new
    theirs = nn.GRU(3, 4)
    theirs.load_state_dict(m.state_dict())
    x = torch.randn(3, 1, 3)
    torch.testing.assert_close(m(x)[0], theirs(x)[0], **TOL)
    assert m._flat_weights[1] is new


def test_functional_call_uses_the_given_weights():
    ours, theirs = pair("LSTM", 3, 4)
    new = {n: torch.randn_like(p) for n, p in ours.named_parameters()}
    x = torch.randn(3, 2, 3)
    got = torch.func.functional_call(ours, new, (x,))[0]
    want = torch.func.functional_call(theirs, new, (x,))[0]
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(got, ours(x)[0])


PARAMETRIZE = {
    "weight_norm": lambda m: nn.utils.parametrizations.weight_norm(m, "weight_hh_l0"),
    "spectral_norm": lambda m: nn.utils.parametrizations.spectral_norm(m, "weight_hh_l0"),
    "prune": lambda m: nn.utils.prune.l1_unstructured(m, "weight_ih_l0", amount=0.4),
    "old_weight_norm": lambda m: nn.utils.weight_norm(m, "weight_hh_l0"),
}


@pytest.mark.parametrize("how", list(PARAMETRIZE))
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_parametrizations_apply_in_every_forward(how, mode):
    ours, theirs = pair(mode, 3, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old weight_norm is deprecated
        for m in (ours, theirs):
            torch.manual_seed(1)  # spectral_norm draws its power-iteration vectors
            PARAMETRIZE[how](m)
    assert isinstance(ours, nn.LSTM if mode == "LSTM" else nn.GRU)
    x = torch.randn(4, 2, 3)
    for _ in range(2):  # the second forward sees the parametrization's state after the first
        got, got_grads = outputs_and_grads(ours, x)
        want, want_grads = outputs_and_grads(theirs, x)
        assert_all_close(got, want)
        assert_all_close(got_grads, want_grads)
    with torch.no_grad():
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            assert name.split(".")[-1] in ("original", "original0", "original1", "weight_ih_l0_orig",
                                           "weight_hh_l0_g", "weight_hh_l0_v") or "." not in name
            p.add_(0.1)
            q.add_(0.1)
    assert_all_close(outputs_and_grads(ours, x)[0], outputs_and_grads(theirs, x)[0])


def test_user_init_loops_reach_the_layers():
    model = nn.Sequential(vgk.nn.LSTM(3, 8), vgk.nn.GRU(8, 8))
    seen = 0
    for m in model.modules():
        if isinstance(m, (nn.LSTM, nn.GRU)):
            for name, p in m.named_parameters():
                if name.startswith("weight_hh"):
                    nn.init.orthogonal_(p)
                    seen += 1
    assert seen == 2
    w = model[1].weight_hh_l0  # [24, 8]: orthonormal columns
    torch.testing.assert_close(w.t() @ w, torch.eye(8), atol=1e-5, rtol=0)


class Tagger(nn.Module):
    """A user's model class (torch.load's safe unpickler needs it allowlisted, as for torch.nn models)."""

    def __init__(self):
        super().__init__()
        self.lstm = vgk.nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, track=True)
        self.gru = vgk.nn.GRU(4, 4, layer_norm=True, grad_clip=1.0)
        self.rnn = vgk.nn.RNN(4, 3, nonlinearity="sigmoid")

    def forward(self, x):
        h, _ = self.lstm(x)
        h, _ = self.gru(h)
        return self.rnn(h)[0]


def test_whole_model_checkpoint_loads_with_weights_only(tmp_path):
    model = Tagger()
    x = torch.randn(5, 2, 3)
    model(x).sum().backward()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    with torch.serialization.safe_globals([Tagger]):
        loaded = torch.load(path)  # torch's default weights_only=True
    assert type(loaded.lstm) is vgk.nn.LSTM and loaded.gru.layer_norm and loaded.rnn.mode == "RNN_SIGMOID"
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    torch.testing.assert_close(loaded.lstm.trace.grad_norm, model.lstm.trace.grad_norm, atol=0, rtol=0)
    # our classes are what vgkernels allowlists; the user's container class stays the user's decision
    with pytest.raises(Exception, match="Tagger"):
        torch.load(path)


@pytest.mark.parametrize("copier", ["pickle", "deepcopy"])
def test_pickle_and_deepcopy_after_a_tracked_forward(copier):
    model = Tagger()
    x = torch.randn(5, 2, 3)
    model(x).sum().backward()
    clone = pickle.loads(pickle.dumps(model)) if copier == "pickle" else copy.deepcopy(model)
    trace = clone.lstm.trace
    assert trace is not None and trace.grad_norm is not None
    torch.testing.assert_close(trace.grad_norm, model.lstm.trace.grad_norm, atol=0, rtol=0)
    torch.testing.assert_close(trace.jacobian_norm, model.lstm.trace.jacobian_norm, atol=0, rtol=0)
    torch.testing.assert_close(clone(x), model(x), atol=0, rtol=0)
    clone(x).sum().backward()  # and it keeps tracking
    assert clone.lstm.trace is not trace and clone.lstm.trace.grad_norm is not None


def test_unpickled_module_from_before_the_extra_arguments_gets_their_defaults():
    m = vgk.nn.GRU(3, 4)
    state = m.__getstate__()
    for name in ("track", "grad_clip", "layer_norm", "backend", "trace", "_layer_norm_names"):
        del state[name]
    fresh = vgk.nn.GRU.__new__(vgk.nn.GRU)
    fresh.__setstate__(state)
    assert fresh.track is False and fresh.grad_clip is None and fresh.trace is None
    torch.testing.assert_close(fresh(torch.randn(2, 1, 3))[0].shape, torch.Size([2, 1, 4]))


def test_torch_nn_state_pickled_into_our_class_runs():
    # a torch.nn.LSTM pickled, then loaded as ours (e.g. a renamed class in an old checkpoint)
    theirs = nn.LSTM(3, 4)
    ours = vgk.nn.LSTM.__new__(vgk.nn.LSTM)
    ours.__setstate__(copy.deepcopy(theirs.__getstate__()))
    x = torch.randn(2, 1, 3)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0], **TOL)


@pytest.mark.parametrize("spec", [None, {nn.LSTM, nn.Linear}, {vgk.nn.LSTM}])
def test_quantize_dynamic_refuses_loudly(spec):
    model = nn.Sequential(vgk.nn.LSTM(4, 8), )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(NotImplementedError, match=r"module '0' is a vgkernels.nn.rnn.LSTM .* floating"):
            torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)


@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell", "RNNCell"])
def test_quantize_dynamic_refuses_cells_loudly(cell):
    model = nn.Sequential(getattr(vgk.nn, cell)(4, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        expected = rf"module '0' is a vgkernels.nn.cell.{cell} .* floating"
        with pytest.raises(NotImplementedError, match=expected):
            torch.ao.quantization.quantize_dynamic(model, None, dtype=torch.qint8)


def test_quantize_dynamic_of_other_layers_leaves_ours_working():
    model = nn.ModuleDict({"lstm": vgk.nn.LSTM(4, 8, track=True), "fc": nn.Linear(8, 2)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert type(q["lstm"]) is vgk.nn.LSTM and q["lstm"].track
    assert type(q["fc"]).__module__.startswith("torch.ao.nn.quantized.dynamic")
    q["lstm"](torch.randn(2, 1, 4))
    assert q["lstm"].trace is not None


@pytest.mark.parametrize("mode", list(PAIRS))
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("track", [False, True])
def test_empty_batch_gives_empty_outputs_and_zero_gradients(mode, bidirectional, batch_first, track):
    ours, theirs = pair(mode, 3, 4, num_layers=2, bidirectional=bidirectional, batch_first=batch_first)
    ours.track = track
    x = torch.randn((0, 5, 3) if batch_first else (5, 0, 3), requires_grad=True)
    got, got_grads = outputs_and_grads(ours, x, [x, *ours.parameters()])
    want, want_grads = outputs_and_grads(theirs, x, [x, *theirs.parameters()])
    for a, b in zip(got + list(got_grads), want + list(want_grads), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)
    if track:  # the trace fills in on .backward() (autograd.grad leaves the probes' .grad alone)
        out, _ = ours(x)
        out.sum().backward()
        L = 4 if bidirectional else 2
        assert ours.trace.jacobian_norm_per_sample.shape == (L, 5, 0)
        assert torch.equal(ours.trace.grad_norm, torch.zeros(L, 5))


def test_empty_batch_with_projection_and_given_states():
    ours, theirs = pair("LSTM", 3, 4, proj_size=2)
    hx = (torch.zeros(1, 0, 2), torch.zeros(1, 0, 4))
    got, want = ours(torch.randn(2, 0, 3), hx), theirs(torch.randn(2, 0, 3), hx)
    assert got[0].shape == want[0].shape == (2, 0, 2)
    assert got[1][0].shape == want[1][0].shape and got[1][1].shape == want[1][1].shape


CONSTRUCTOR_CASES = [
    {"bias": 1}, {"bias": "x"}, {"batch_first": 1}, {"batch_first": None}, {"input_size": 2.0},
    {"hidden_size": 4.0}, {"hidden_size": 0}, {"input_size": -1}, {"num_layers": 0}, {"num_layers": 1.5},
    {"dropout": "a"}, {"dropout": True}, {"dropout": 2}, {"dropout": -0.5},
]


@pytest.mark.parametrize("mode", list(PAIRS))
@pytest.mark.parametrize("kwargs", CONSTRUCTOR_CASES, ids=str)
def test_constructor_argument_errors_are_torchs(mode, kwargs):
    ours_cls, theirs_cls, extra = PAIRS[mode]
    args = {"input_size": 3, "hidden_size": 4, **extra, **kwargs}
    with pytest.raises(Exception) as theirs_error:
        theirs_cls(**args)
    with pytest.raises(type(theirs_error.value)) as ours_error:
        ours_cls(**args)
    assert str(ours_error.value) == str(theirs_error.value)


@pytest.mark.parametrize("kwargs", [{"bidirectional": 1}, {"bidirectional": "yes"}, {"num_layers": True}])
def test_constructor_accepts_what_torch_accepts(kwargs):
    # torch.nn builds these (its forward then refuses them; ours runs them as the truthy values they are)
    for mode in PAIRS:
        ours, theirs = pair(mode, 3, 4, **kwargs)
        assert ours.bidirectional == theirs.bidirectional and ours.num_layers == theirs.num_layers
        assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]


def test_proj_size_errors_are_torchs():
    for kwargs in ({"proj_size": -1}, {"proj_size": 4}, {"proj_size": 1.5}):
        with pytest.raises(Exception) as theirs_error:
            nn.LSTM(3, 4, **kwargs)
        with pytest.raises(type(theirs_error.value)):
            vgk.nn.LSTM(3, 4, **kwargs)
    for cls in (vgk.nn.GRU, vgk.nn.RNN):
        with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM, not RNN or GRU"):
            cls(3, 4, proj_size=0)


@pytest.mark.parametrize("mode", list(PAIRS))
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_dropout_masks_are_torchs_under_the_same_seed(mode, bidirectional, packed, backend):
    ours, theirs = pair(mode, 3, 5, num_layers=3, dropout=0.4, bidirectional=bidirectional)
    ours.backend = backend
    if packed:  # torch.nn draws the masks over the packed rows
        x = pack_sequence([torch.randn(n, 3) for n in (2, 6, 4, 1)], enforce_sorted=False)
    else:
        x = torch.randn(6, 4, 3)
    params = [*ours.parameters()]
    torch.manual_seed(7)
    got, got_grads = outputs_and_grads(ours, x, params)
    torch.manual_seed(7)
    want, want_grads = outputs_and_grads(theirs, x, [*theirs.parameters()])
    assert_all_close(got, want)
    assert_all_close(got_grads, want_grads)
    torch.manual_seed(8)
    assert not torch.allclose(outputs_and_grads(ours, x, params)[0][0], got[0])


def test_track_still_finds_the_layers():
    model = nn.Sequential(vgk.nn.LSTM(3, 4), nn.Identity())
    with vgk.track(model) as traces:
        out, _ = model[0](torch.randn(4, 2, 3))
        out.sum().backward()
    assert set(traces) == {"0"} and traces["0"].grad_norm.shape == (1, 4)


def test_compile_does_not_change_torch_nn_lstm_handling():
    # Dynamo traces ours (see test_recurrent_compile.py) but keeps refusing torch.nn's own RNN classes
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(nn.Sequential(nn.LSTM(3, 4)))(torch.randn(2, 1, 3))
    assert explanation.graph_count == 0  # torch.nn.LSTM: Dynamo gives up on the frame, as without vgkernels
    assert torch._dynamo.config.allow_rnn is False
    explanation = torch._dynamo.explain(nn.Sequential(vgk.nn.LSTM(3, 4, backend="cpp")))(torch.randn(2, 1, 3))
    assert explanation.graph_break_count == 0


def test_layer_norm_parameters_live_beside_torchs_machinery():
    m = vgk.nn.LSTM(3, 4, num_layers=2, bidirectional=True, layer_norm=True)
    ln_names = [n for n, _ in m.named_parameters() if n.startswith("layer_norm_")]
    assert len(ln_names) == 2 * 2 * 6 and len(m._flat_weights) == 2 * 2 * 4
    assert m._flat_weights_names == nn.LSTM(3, 4, num_layers=2, bidirectional=True)._flat_weights_names
    m.flatten_parameters()
    for name in ln_names:  # gains 1, shifts 0
        value = getattr(m, name)
        assert torch.equal(value, torch.ones_like(value) if "_weight_" in name else torch.zeros_like(value))
    with torch.no_grad():
        m.layer_norm_hh_weight_l1.mul_(2)
    m.reset_parameters()
    assert torch.equal(m.layer_norm_hh_weight_l1, torch.ones(16))
    m.double()
    assert m.layer_norm_cell_bias_l0_reverse.dtype == m._flat_weights[0].dtype == torch.float64
    out, _ = m(torch.randn(5, 2, 3, dtype=torch.float64))
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    clone = pickle.loads(pickle.dumps(m))
    torch.testing.assert_close(clone.layer_norm_ih_weight_l0, m.layer_norm_ih_weight_l0, atol=0, rtol=0)
    torch.testing.assert_close(clone(torch.zeros(2, 1, 3, dtype=torch.float64))[0],
                               m(torch.zeros(2, 1, 3, dtype=torch.float64))[0], atol=0, rtol=0)
    # torch.nn's own state_dict keys, then the layer-norm parameters
    keys = list(m.state_dict())
    assert keys[:len(m._flat_weights_names)] == m._flat_weights_names


def test_the_sigmoid_rnn_is_never_handed_to_cudnn(monkeypatch):
    """torch.nn's flatten_parameters (run by .cuda() and .to()) asks cuDNN for the layer's mode and raises
    on RNN_SIGMOID; the sigmoid RNN skips it, every other mode still runs torch.nn's."""
    modules = [vgk.nn.RNN(3, 4, nonlinearity="sigmoid"), vgk.nn.RNN(3, 4), vgk.nn.GRU(3, 4, layer_norm=True)]
    calls = []
    monkeypatch.setattr(nn.RNNBase, "flatten_parameters", lambda self: calls.append(self.mode))
    modules[0].flatten_parameters()
    assert calls == []
    for m in modules:
        m.float()  # .to() and its kin flatten again, as under torch.nn
    assert calls == ["RNN_TANH", "GRU"]
