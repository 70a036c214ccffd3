"""Initializations against vanishing and exploding gradients.

Every function works in place under ``torch.no_grad()`` and returns its tensor (or module). A
``generator`` makes the draw reproducible; it must live on the tensor's device.

Recurrent weight matrices stack their gates along dim 0 (torch's order: LSTM i, f, g, o; GRU r, z, n),
so ``weight_hh`` is [G*H, H]. The functions that take ``blocks`` treat each of the G row blocks as a
matrix of its own: an orthogonal ``weight_hh`` is orthogonal per gate, and Xavier/He fans are those of
one gate, not of the stacked matrix.

Variances (n_in = fan-in, n_out = fan-out of one block):

- ``xavier_uniform_``: U[-a, a], a = gain * sqrt(6 / (n_in + n_out)); Var = gain² * 2 / (n_in + n_out).
- ``xavier_normal_``: N(0, gain² * 2 / (n_in + n_out)).
- ``kaiming_uniform_``/``kaiming_normal_`` (He et al. 2015): Var = gain² / n, gain² = 2 for ReLU.
- ``lecun_normal_`` (LeCun et al. 1998; the pairing of SELU, Klambauer et al. 2017): N(0, 1 / n_in).
- ``default_``: torch.nn's recurrent default, U[-1/sqrt(H), 1/sqrt(H)]; Var = 1 / (3 H).
- ``negative_mean_``: N(mu, sigma²) with mu = max(-1, -8/n_in), sigma = 0.1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator

import torch

__all__ = [
    "RECURRENT_SCHEMES",
    "default_",
    "identity_",
    "init_recurrent_",
    "kaiming_normal_",
    "kaiming_uniform_",
    "lecun_normal_",
    "lstm_forget_bias_",
    "negative_mean_",
    "orthogonal_",
    "xavier_normal_",
    "xavier_uniform_",
]


def _check_matrix(tensor: torch.Tensor, blocks: int, name: str = "tensor") -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be a 2-D weight matrix [rows, cols], got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {tensor.dtype}")
    if not isinstance(blocks, int) or blocks < 1 or tensor.shape[0] % blocks:
        raise ValueError(
            f"blocks must be a positive int dividing {name}.shape[0] = {tensor.shape[0]}, got {blocks!r}"
        )


def _blocks(tensor: torch.Tensor, blocks: int) -> Iterator[torch.Tensor]:
    # Row blocks of a 2-D tensor are contiguous views, so in-place fills reach the original.
    yield from tensor.detach().chunk(blocks, dim=0)


def _fill_normal(tensor: torch.Tensor, mean: float, std: float, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        tensor.normal_(mean, std, generator=generator)


def _fill_uniform(tensor: torch.Tensor, bound: float, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        tensor.uniform_(-bound, bound, generator=generator)


def xavier_uniform_(
    tensor: torch.Tensor, gain: float = 1.0, *, blocks: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Glorot & Bengio (2010) "normalized" init, U[-a, a] with a = gain * sqrt(6 / (n_in + n_out)).

    Args:
        tensor: floating [rows, cols]; n_in = cols, n_out = rows / blocks.
        gain: scale (``torch.nn.init.calculate_gain`` of the activation).
        blocks: number of stacked gate blocks along dim 0, each initialized with its own fans.
    Returns:
        ``tensor``, filled in place.
    """
    _check_matrix(tensor, blocks)
    for block in _blocks(tensor, blocks):
        n_out, n_in = block.shape
        _fill_uniform(block, gain * math.sqrt(6.0 / (n_in + n_out)), generator)
    return tensor


def xavier_normal_(
    tensor: torch.Tensor, gain: float = 1.0, *, blocks: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Glorot & Bengio (2010), N(0, gain² * 2 / (n_in + n_out)).

    Args:
        tensor: floating [rows, cols]; n_in = cols, n_out = rows / blocks.
        gain: scale.
        blocks: number of stacked gate blocks along dim 0.
    Returns:
        ``tensor``, filled in place.
    """
    _check_matrix(tensor, blocks)
    for block in _blocks(tensor, blocks):
        n_out, n_in = block.shape
        _fill_normal(block, 0.0, gain * math.sqrt(2.0 / (n_in + n_out)), generator)
    return tensor


def _he_std(block: torch.Tensor, mode: str, nonlinearity: str, a: float) -> float:
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan = block.shape[1] if mode == "fan_in" else block.shape[0]
    gain = torch.nn.init.calculate_gain(nonlinearity, a if nonlinearity == "leaky_relu" else None)
    return gain / math.sqrt(fan)


def kaiming_uniform_(
    tensor: torch.Tensor,
    a: float = 0.0,
    mode: str = "fan_in",
    nonlinearity: str = "relu",
    *,
    blocks: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """He et al. (2015) init, U[-b, b] with b = gain * sqrt(3 / fan); Var = gain² / fan (2 / n_in for ReLU).

    Args:
        tensor: floating [rows, cols]; fan_in = cols, fan_out = rows / blocks.
        a: negative slope, used when ``nonlinearity="leaky_relu"``.
        mode: ``"fan_in"`` (preserves forward variance) or ``"fan_out"`` (backward).
        nonlinearity: a name accepted by ``torch.nn.init.calculate_gain``.
        blocks: number of stacked gate blocks along dim 0.
    Returns:
        ``tensor``, filled in place.
    """
    _check_matrix(tensor, blocks)
    for block in _blocks(tensor, blocks):
        _fill_uniform(block, math.sqrt(3.0) * _he_std(block, mode, nonlinearity, a), generator)
    return tensor


def kaiming_normal_(
    tensor: torch.Tensor,
    a: float = 0.0,
    mode: str = "fan_in",
    nonlinearity: str = "relu",
    *,
    blocks: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """He et al. (2015) init, N(0, gain² / fan); Var = 2 / n_in for ReLU with ``mode="fan_in"``.

    Args: as :func:`kaiming_uniform_`.
    Returns:
        ``tensor``, filled in place.
    """
    _check_matrix(tensor, blocks)
    for block in _blocks(tensor, blocks):
        _fill_normal(block, 0.0, _he_std(block, mode, nonlinearity, a), generator)
    return tensor


def lecun_normal_(
    tensor: torch.Tensor, *, blocks: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """LeCun normal init, N(0, 1 / n_in): the initialization of self-normalizing (SELU) networks.

    Klambauer et al. (2017), "Self-Normalizing Neural Networks": with zero-mean weights of variance
    1/n_in and standardized inputs, SELU activations keep mean 0 and variance 1 from layer to layer.
    It is ``kaiming_normal_`` with gain 1 (``nonlinearity="linear"``).

    Args:
        tensor: floating [rows, cols]; n_in = cols.
        blocks: number of stacked gate blocks along dim 0 (the fan-in is the same for every block).
    Returns:
        ``tensor``, filled in place.
    """
    return kaiming_normal_(tensor, nonlinearity="linear", blocks=blocks, generator=generator)


def orthogonal_(
    tensor: torch.Tensor,
    gain: float = 1.0,
    *,
    blocks: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(Semi-)orthogonal init per gate block (Saxe et al. 2014): every singular value equals ``gain``.

    Each block is Q from the QR decomposition of a Gaussian matrix, with the signs fixed so that Q is
    uniformly (Haar) distributed. A square block satisfies QᵀQ = QQᵀ = I; a non-square one has
    orthonormal rows or columns, whichever are fewer.

    Args:
        tensor: floating [rows, cols].
        gain: the singular value.
        blocks: number of stacked gate blocks along dim 0. ``None`` means rows // cols when cols
            divides rows (``weight_hh`` [G*H, H] gives G square blocks), else 1.
    Returns:
        ``tensor``, filled in place.
    """
    if blocks is None and isinstance(tensor, torch.Tensor) and tensor.dim() == 2:
        rows, cols = tensor.shape
        blocks = rows // cols if cols and rows % cols == 0 else 1
    _check_matrix(tensor, blocks if blocks is not None else 1)
    for block in _blocks(tensor, blocks):
        rows, cols = block.shape
        flat = torch.empty(max(rows, cols), min(rows, cols), dtype=torch.float64, device=block.device)
        flat.normal_(0.0, 1.0, generator=generator)
        q, r = torch.linalg.qr(flat)
        sign = torch.diagonal(r).sign()
        q = q * torch.where(sign == 0, 1.0, sign)  # makes Q Haar-distributed (Mezzadri 2007)
        if rows < cols:
            q = q.t()
        with torch.no_grad():
            block.copy_(gain * q)
    return tensor


def identity_(tensor: torch.Tensor, gain: float = 1.0, *, blocks: int = 1) -> torch.Tensor:
    """Scaled identity per gate block: the IRNN init of Le, Jaitly & Hinton (2015) with ``gain=1``.

    Args:
        tensor: floating [rows, cols]; each of the ``blocks`` row blocks becomes ``gain * eye``
            (rectangular blocks get ones on the main diagonal).
        gain: value on the diagonal.
        blocks: number of stacked gate blocks along dim 0.
    Returns:
        ``tensor``, filled in place.
    """
    _check_matrix(tensor, blocks)
    for block in _blocks(tensor, blocks):
        with torch.no_grad():
            block.zero_()
            block.diagonal().fill_(gain)
    return tensor


def default_(
    tensor: torch.Tensor, hidden_size: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """torch.nn's default for recurrent weights and biases: U[-k, k], k = 1/sqrt(hidden_size).

    Args:
        tensor: any floating tensor.
        hidden_size: H of the recurrent module.
    Returns:
        ``tensor``, filled in place.
    """
    if not isinstance(hidden_size, int) or hidden_size < 1:
        raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
    _fill_uniform(tensor, 1.0 / math.sqrt(hidden_size), generator)
    return tensor


def negative_mean_(
    tensor: torch.Tensor,
    *,
    mean: float | None = None,
    std: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Negative-mean init for logistic (sigmoid) MLPs, after Yilmaz & Poli (2022).

    Reference: A. Yilmaz and R. Poli, "Successfully and efficiently training deep multi-layer
    perceptrons with logistic activation function simply requires initializing the weights with an
    appropriate negative mean", *Neural Networks* 153:87-103, 2022. Their abstract states that the
    mean should be negative and inversely proportional to the number of neurons in a layer.

    The exact formula used here, N(mu, sigma²) with mu = max(-1, -8 / N), sigma = 0.1 and N the
    fan-in (``tensor.shape[1]``), is a reconstruction taken from two independent public
    implementations. It has not been verified against the paper's own equation.

    Args:
        tensor: floating [out_features, in_features].
        mean: override for mu; ``None`` uses max(-1, -8 / in_features).
        std: sigma.
    Returns:
        ``tensor``, filled in place.
    """
    _check_matrix(tensor, 1)
    if mean is None:
        mean = max(-1.0, -8.0 / tensor.shape[1])
    if not std >= 0:
        raise ValueError(f"std must be >= 0, got {std!r}")
    _fill_normal(tensor, mean, std, generator)
    return tensor


# ---------------------------------------------------------------------------------------------
# Recurrent modules
# ---------------------------------------------------------------------------------------------

_PARAM = re.compile(r"^(weight|bias)_(ih|hh|hr)(_l\d+(_reverse)?)?$")


def _recurrent_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    found = [
        m
        for m in module.modules()
        if isinstance(getattr(m, "hidden_size", None), int)
        and any(_PARAM.match(n) and "_hh" in n for n, _ in m.named_parameters(recurse=False))
    ]
    if not found:
        raise TypeError(
            f"module must be or contain a recurrent module (RNN, GRU, LSTM or a cell, from torch.nn or "
            f"vgkernels.nn) with weight_hh parameters, got {type(module).__name__}"
        )
    return found


def _gates(module: torch.nn.Module) -> int:
    w = next(p for n, p in module.named_parameters(recurse=False) if n.startswith("weight_hh"))
    return w.shape[0] // module.hidden_size


def lstm_forget_bias_(module: torch.nn.Module, value: float = 1.0) -> torch.nn.Module:
    """Set the forget-gate bias of every LSTM layer and direction (Gers et al. 2000; Jozefowicz et al. 2015).

    torch's LSTM adds two biases, ``bias_ih`` and ``bias_hh``, before the gates (order i, f, g, o;
    the forget slice is rows [H, 2H)). The value is split evenly: each forget slice is set to
    ``value / 2``, so the effective bias is exactly ``value``. Both biases receive the same gradient,
    so the split is kept by plain SGD, and weight decay sees the smallest total penalty. A module with
    only one of the two biases gets the whole value on it.

    Args:
        module: an LSTM or LSTMCell from torch.nn or vgkernels.nn, or a module containing some.
        value: the effective forget-gate bias.
    Returns:
        ``module``.
    Raises:
        TypeError: no LSTM inside ``module``. ValueError: an LSTM without biases.
    """
    lstms = [m for m in _recurrent_modules(module) if _gates(m) == 4]
    if not lstms:
        raise TypeError(f"module must be or contain an LSTM, got {type(module).__name__}")
    for m in lstms:
        biases: dict[str, list[torch.Tensor]] = {}
        for name, p in m.named_parameters(recurse=False):
            if name.startswith("bias_ih") or name.startswith("bias_hh"):
                biases.setdefault(name.replace("bias_ih", "").replace("bias_hh", ""), []).append(p)
        if not biases:
            raise ValueError(
                f"module: setting the forget-gate bias needs an LSTM with biases, got {type(m).__name__} "
                "with bias=False"
            )
        H = m.hidden_size
        for pair in biases.values():
            with torch.no_grad():
                for p in pair:
                    p[H : 2 * H].fill_(value / len(pair))
    return module


def _scheme_default(m: torch.nn.Module, name: str, p: torch.Tensor, g: torch.Generator | None) -> None:
    default_(p, m.hidden_size, generator=g)


def _zero_biases_else(
    fill: Callable[..., torch.Tensor],
    m: torch.nn.Module,
    name: str,
    p: torch.Tensor,
    g: torch.Generator | None,
) -> None:
    """Zero biases; weights by ``fill``, per gate block for the gate matrices."""
    if name.startswith("bias"):
        torch.nn.init.zeros_(p)
    else:
        fill(p, blocks=_gates(m) if name.startswith(("weight_ih", "weight_hh")) else 1, generator=g)


def _scheme_xavier(m: torch.nn.Module, name: str, p: torch.Tensor, g: torch.Generator | None) -> None:
    _zero_biases_else(xavier_uniform_, m, name, p, g)


def _scheme_kaiming(m: torch.nn.Module, name: str, p: torch.Tensor, g: torch.Generator | None) -> None:
    _zero_biases_else(kaiming_normal_, m, name, p, g)


def _scheme_lecun(m: torch.nn.Module, name: str, p: torch.Tensor, g: torch.Generator | None) -> None:
    _zero_biases_else(lecun_normal_, m, name, p, g)


def _scheme_orthogonal(m: torch.nn.Module, name: str, p: torch.Tensor, g: torch.Generator | None) -> None:
    if name.startswith("weight_hh"):
        orthogonal_(p, blocks=_gates(m), generator=g)
    else:
        _scheme_xavier(m, name, p, g)


def _scheme_identity(m: torch.nn.Module, name: str, p: torch.Tensor, g: torch.Generator | None) -> None:
    # Le et al. (2015): W_hh = I, zero biases, small Gaussian input weights (std 0.001, as in the
    # commonly used Keras reproduction).
    if name.startswith("weight_hh"):
        identity_(p, blocks=_gates(m))
    elif name.startswith("bias"):
        torch.nn.init.zeros_(p)
    else:
        _fill_normal(p, 0.0, 1e-3, g)


_WEIGHT_SCHEMES: dict[str, Callable[..., None]] = {
    "default": _scheme_default,
    "xavier": _scheme_xavier,
    "kaiming": _scheme_kaiming,
    "he": _scheme_kaiming,
    "lecun": _scheme_lecun,
    "orthogonal": _scheme_orthogonal,
    "identity": _scheme_identity,
    "irnn": _scheme_identity,
}
_FORGET = re.compile(r"^forget_bias_(-?\d+(?:\.\d+)?)$")

RECURRENT_SCHEMES: tuple[str, ...] = (*_WEIGHT_SCHEMES, "forget_bias_<value>")
"""Names accepted by :func:`init_recurrent_`; join several with ``+``."""


def init_recurrent_(
    module: torch.nn.Module, scheme: str = "default", *, generator: torch.Generator | None = None
) -> torch.nn.Module:
    """Apply a named initialization to every recurrent layer and direction of ``module``.

    ``module`` is a recurrent module or cell from torch.nn or vgkernels.nn, or any module containing
    some (each is initialized). Parts of ``scheme`` joined by ``+`` apply left to right, e.g.
    ``"orthogonal+forget_bias_1"``.

    Weight schemes re-initialize all of ``weight_ih``, ``weight_hh``, ``weight_hr`` and the biases,
    in every layer and direction (other parameters, such as layer-norm gains, are left alone):

    - ``"default"``: torch.nn's U[-1/sqrt(H), 1/sqrt(H)] everywhere.
    - ``"xavier"``: Xavier-uniform weights per gate block, zero biases.
    - ``"kaiming"``/``"he"``: He-normal weights per gate block, zero biases.
    - ``"lecun"``: LeCun-normal weights N(0, 1/n_in), zero biases (the pairing of SELU).
    - ``"orthogonal"``: orthogonal ``weight_hh`` per gate block, Xavier-uniform input weights, zero biases.
    - ``"identity"``/``"irnn"``: ``weight_hh`` = I per gate block, input weights N(0, 0.001²), zero
      biases (Le et al. 2015; meant for ReLU RNNs).

    Bias schemes change only the LSTM forget-gate biases of the current weights:

    - ``"forget_bias_<v>"``, e.g. ``"forget_bias_1"``, ``"forget_bias_3"``: :func:`lstm_forget_bias_`
      with value v (LSTM only).

    Args:
        module: the module to initialize in place.
        scheme: the scheme name(s).
        generator: random source for the draws, on the parameters' device.
    Returns:
        ``module``.
    Raises:
        ValueError: an unknown scheme. TypeError: no recurrent module inside ``module``.
    """
    if not isinstance(scheme, str) or not scheme:
        raise ValueError(f"scheme must be a non-empty str such as 'orthogonal', got {scheme!r}")
    parts = [s.strip().lower() for s in scheme.split("+")]
    for part in parts:
        if part not in _WEIGHT_SCHEMES and not _FORGET.match(part):
            raise ValueError(
                f"scheme: expected parts joined by '+' from {RECURRENT_SCHEMES}, got {scheme!r} with the "
                f"unknown part {part!r}"
            )
    modules = _recurrent_modules(module)
    for part in parts:
        forget = _FORGET.match(part)
        if forget:
            lstm_forget_bias_(module, float(forget.group(1)))
            continue
        fill = _WEIGHT_SCHEMES[part]
        for m in modules:
            for name, p in m.named_parameters(recurse=False):
                if _PARAM.match(name):
                    fill(m, name, p, generator)
    return module
