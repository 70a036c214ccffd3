"""PyTorch's module tests of RNN, GRU and LSTM (test/test_modules.py: test_grad and test_gradgrad over
the module_db samples of torch/testing/_internal/common_modules.py), run on torch.nn and on vgkernels.

The samples, as module_db builds them: every combination of bias, batch_first and bidirectional (and
nonlinearity relu/tanh for RNN), two layers, input_size 2, unbatched input; RNN/GRU: 3 steps with
hidden 2 and no hx, and 3 steps with hidden 3 and hx; LSTM: hidden 3, 2 steps without hx and 3 steps
with hx. LSTM's proj_size=2 samples are left out: vgkernels has no proj_size yet. test_modules.py runs
each in training and in eval mode, which without dropout are the same computation: training only here.

The checks, as test_modules.py makes them: gradcheck and gradgradcheck in float64 of the flattened
outputs with respect to the input and every parameter together; gradcheck then to the input and each
parameter alone (test_modules.py does that for gradgradcheck too: 16 more double backwards per sample,
minutes on two cores, for what test_autodiff.py's partial-input gradgradchecks cover). gradcheck also
checks forward-mode AD (check_forward_ad=True), which test_modules.py leaves to its functorch tests; so
the tangents reach the parameters, they go in through torch.func.functional_call. Fast mode (random
projections) keeps it affordable.

Tolerances: torch's gradcheck defaults (eps 1e-6, atol 1e-5, rtol 1e-3).
"""

import itertools

import pytest
import torch

import vgkernels as vgk

IMPLEMENTATIONS = {
    "torch.nn": {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN": torch.nn.RNN},
    "vgkernels": {"LSTM": vgk.nn.LSTM, "GRU": vgk.nn.GRU, "RNN": vgk.nn.RNN},
}


def samples(kind):
    """(constructor kwargs, input shape, hx shapes or None) of module_db's samples for one module kind."""
    out = []
    nonlinearities = ("relu", "tanh") if kind == "RNN" else (None,)
    for nl, bias, batch_first, bidir in itertools.product(nonlinearities, (False, True), (False, True),
                                                          (False, True)):
        base = dict(input_size=2, num_layers=2, bias=bias, batch_first=batch_first, bidirectional=bidir)
        if nl is not None:
            base["nonlinearity"] = nl
        states = 4 if bidir else 2
        if kind == "LSTM":
            out.append((dict(base, hidden_size=3), (2, 2), None))
            out.append((dict(base, hidden_size=3), (3, 2), ((states, 3), (states, 3))))
        else:
            out.append((dict(base, hidden_size=2), (3, 2), None))
            out.append((dict(base, hidden_size=3), (3, 2), (states, 3)))
    return out


CASES = [(kind, i) for kind in ("RNN", "GRU", "LSTM") for i in range(len(samples(kind)))]


def check_gradients(module, x, hx, check, partial):
    """test_modules.py's _test_gradients_helper: total derivative, then (partial) one parameter at a time."""
    names = [name for name, _ in module.named_parameters()]
    params = tuple(module.parameters())
    states = () if hx is None else (tuple(hx) if isinstance(hx, tuple) else (hx,))

    def fn(*flat):  # (x, *states, *params); the parameters through functional_call, so tangents reach them
        given = flat[1: 1 + len(states)]
        args = (flat[0],) if hx is None else (flat[0], tuple(given) if isinstance(hx, tuple) else given[0])
        weights = dict(zip(names, flat[1 + len(states):], strict=True))
        output, state = torch.func.functional_call(module, weights, args)
        return (output,) + (tuple(state) if isinstance(state, tuple) else (state,))

    def inputs():
        return (x,) + states + params

    assert check(fn, inputs())
    if not partial:
        return
    for p in params:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
        assert check(fn, inputs())
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("kind,index", CASES)
def test_module_db_grad_and_gradgrad(kind, index, implementation):
    kwargs, input_shape, hx_shape = samples(kind)[index]
    backend = {"backend": "cpp"} if implementation == "vgkernels" else {}
    module = IMPLEMENTATIONS[implementation][kind](**kwargs, **backend).double().train()
    x = torch.randn(input_shape, dtype=torch.float64, requires_grad=True)
    hx = None
    if hx_shape is not None:
        make = lambda shape: torch.randn(shape, dtype=torch.float64, requires_grad=True)
        hx = tuple(make(s) for s in hx_shape) if kind == "LSTM" else make(hx_shape)

    def grad_and_forward_ad(fn, inputs):
        return torch.autograd.gradcheck(fn, inputs, check_forward_ad=True, fast_mode=True)

    def gradgrad(fn, inputs):
        return torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)

    check_gradients(module, x, hx, grad_and_forward_ad, partial=True)
    check_gradients(module, x, hx, gradgrad, partial=False)
