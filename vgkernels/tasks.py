"""Synthetic long-range tasks and a deep-MLP gradient probe.

- :func:`adding_problem`: Le, Jaitly & Hinton (2015) / Arjovsky, Shah & Bengio (2016).
- :func:`copy_memory`: Arjovsky, Shah & Bengio (2016).
- :func:`mlp_gradient_probe`: per-layer weight-gradient norms of a deep MLP at initialization.

Every generator is batched, takes ``seed`` or ``generator`` and ``device``. The random draws happen on
the generator's device (the CPU unless a device generator is given) and are then moved to ``device``,
so one seed gives the same data on every device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vgkernels import init as vinit
from vgkernels.nn import LayerNorm

__all__ = [
    "ADDING_BASELINE_MSE",
    "COPY_BLANK",
    "COPY_DELIMITER",
    "COPY_NUM_CLASSES",
    "MLP_ACTIVATIONS",
    "MLP_INITS",
    "MLPProbe",
    "adding_problem",
    "copy_memory",
    "copy_memory_baseline",
    "deep_mlp",
    "mlp_gradient_probe",
]

ADDING_BASELINE_MSE: float = 1.0 / 6.0
"""MSE of always predicting 1 = E[y] on the adding problem: Var(U1 + U2) = 2/12 = 1/6."""

COPY_BLANK = 0
"""Copy memory: index of the blank symbol (inputs and targets)."""
COPY_DELIMITER = 9
"""Copy memory: index of the delimiter that asks for the recall."""
COPY_NUM_CLASSES = 10
"""Copy memory: alphabet size: blank, 8 data symbols (1..8), delimiter."""
_COPY_SYMBOLS = 8
_COPY_LENGTH = 10


def _check_size(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    if seed is not None and generator is not None:
        raise ValueError(f"seed, generator: expected at most one of them, got seed={seed!r} and a generator")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        return torch.Generator().manual_seed(seed)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return generator


def _draw_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def adding_problem(
    batch_size: int,
    seq_len: int,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of the adding problem (Le et al. 2015; Arjovsky et al. 2016).

    Channel 0 holds values drawn from U[0, 1]; channel 1 holds exactly two markers (1.0), one at a
    position drawn uniformly from the first half [0, T//2) and one from the second half [T//2, T).
    The target is the sum of the two marked values. Predicting the constant 1 scores
    :data:`ADDING_BASELINE_MSE` = 1/6.

    Args:
        batch_size: B >= 1.
        seq_len: T >= 2.
        seed: seeds a fresh CPU generator. generator: use this one instead. Neither: torch's global RNG.
        device: where the tensors are returned (default CPU).
        dtype: floating dtype of x and y.
    Returns:
        x: [B, T, 2] (batch first), y: [B, 1], both ``dtype`` on ``device``.
    """
    _check_size("batch_size", batch_size, 1)
    _check_size("seq_len", seq_len, 2)
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    gen = _generator(seed, generator)
    where = _draw_device(gen)
    values = torch.rand(batch_size, seq_len, generator=gen, device=where, dtype=dtype)
    half = seq_len // 2
    first = torch.randint(0, half, (batch_size,), generator=gen, device=where)
    second = torch.randint(half, seq_len, (batch_size,), generator=gen, device=where)
    markers = torch.zeros_like(values)
    rows = torch.arange(batch_size, device=where)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    y = (values[rows, first] + values[rows, second]).unsqueeze(1)
    x = torch.stack([values, markers], dim=-1)
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def copy_memory(
    batch_size: int,
    delay: int,
    *,
    one_hot: bool = False,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of the copy-memory task (Arjovsky, Shah & Bengio 2016).

    Input: 10 symbols drawn uniformly from the 8 data categories 1..8, then ``delay - 1`` blanks (0),
    the delimiter (9), then 10 blanks; length ``delay + 20``. Target: blanks for the first
    ``delay + 10`` positions, then the 10 symbols. A model without memory scores at best
    :func:`copy_memory_baseline` (``delay``).

    Args:
        batch_size: B >= 1.
        delay: T >= 1, the number of steps between the end of the symbols and the delimiter, plus 1.
        one_hot: return x one-hot encoded as float32 [B, T+20, 10] instead of int64 indices.
        seed, generator, device: as :func:`adding_problem`.
    Returns:
        x: int64 [B, T+20] (or float32 [B, T+20, 10] with ``one_hot``), y: int64 [B, T+20], batch first.
    """
    _check_size("batch_size", batch_size, 1)
    _check_size("delay", delay, 1)
    gen = _generator(seed, generator)
    where = _draw_device(gen)
    length = delay + 2 * _COPY_LENGTH
    symbols = torch.randint(1, _COPY_SYMBOLS + 1, (batch_size, _COPY_LENGTH), generator=gen, device=where)
    x = torch.full((batch_size, length), COPY_BLANK, dtype=torch.int64, device=where)
    y = torch.full_like(x, COPY_BLANK)
    x[:, :_COPY_LENGTH] = symbols
    x[:, delay + _COPY_LENGTH - 1] = COPY_DELIMITER
    y[:, -_COPY_LENGTH:] = symbols
    x, y = x.to(device), y.to(device)
    if one_hot:
        x = torch.nn.functional.one_hot(x, COPY_NUM_CLASSES).to(torch.float32)
    return x, y


def copy_memory_baseline(delay: int) -> float:
    """Per-step cross-entropy of the best memoryless predictor on copy memory: 10 ln 8 / (T + 20).

    It predicts blank with certainty for the first T+10 steps and a uniform guess over the 8
    categories for the last 10 (Arjovsky et al. 2016).
    """
    _check_size("delay", delay, 1)
    return _COPY_LENGTH * math.log(_COPY_SYMBOLS) / (delay + 2 * _COPY_LENGTH)


# ---------------------------------------------------------------------------------------------
# Deep-MLP gradient probe
# ---------------------------------------------------------------------------------------------

MLP_ACTIVATIONS = ("sigmoid", "tanh", "relu")
MLP_INITS = ("standard", "negative_mean", "xavier", "he")


class _Block(torch.nn.Module):
    def __init__(self, width: int, activation: str, residual: bool, layer_norm: bool) -> None:
        super().__init__()
        self.norm = LayerNorm(width) if layer_norm else None
        self.linear = torch.nn.Linear(width, width)
        self.activation = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}[activation]
        self.residual = residual

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.activation(self.linear(self.norm(h) if self.norm is not None else h))
        return h + z if self.residual else z


def deep_mlp(
    depth: int,
    width: int,
    activation: str = "sigmoid",
    init: str = "standard",
    *,
    residual: bool = False,
    layer_norm: bool = False,
    generator: torch.Generator | None = None,
) -> torch.nn.Sequential:
    """A stack of ``depth`` blocks h -> act(Linear(LN(h))) [+ h], all [width] -> [width].

    LayerNorm (``vgkernels.nn.LayerNorm``) comes before each Linear (the "pre-LN" block), and the
    residual connection adds the block's input.

    Args:
        depth, width: number of blocks and their width.
        activation: one of :data:`MLP_ACTIVATIONS`.
        init: ``"standard"`` keeps torch.nn.Linear's U[-1/sqrt(n), 1/sqrt(n)] weights and biases;
            ``"negative_mean"`` (:func:`vgkernels.init.negative_mean_`), ``"xavier"`` (uniform) and
            ``"he"`` (normal, ReLU gain) set the weights and zero the biases.
        residual, layer_norm: the block variants.
        generator: random source for the initialization (CPU).
    Returns:
        a float32 ``torch.nn.Sequential`` of the blocks on the CPU.
    """
    _check_size("depth", depth, 1)
    _check_size("width", width, 1)
    if activation not in MLP_ACTIVATIONS:
        raise ValueError(f"activation must be one of {MLP_ACTIVATIONS}, got {activation!r}")
    if init not in MLP_INITS:
        raise ValueError(f"init must be one of {MLP_INITS}, got {init!r}")
    blocks = [_Block(width, activation, residual, layer_norm) for _ in range(depth)]
    for block in blocks:
        linear = block.linear
        if init == "standard":
            vinit.kaiming_uniform_(
                linear.weight, a=math.sqrt(5), nonlinearity="leaky_relu", generator=generator
            )
            vinit.default_(linear.bias, width, generator=generator)
            continue
        if init == "negative_mean":
            vinit.negative_mean_(linear.weight, generator=generator)
        elif init == "xavier":
            vinit.xavier_uniform_(linear.weight, generator=generator)
        else:
            vinit.kaiming_normal_(linear.weight, generator=generator)
        torch.nn.init.zeros_(linear.bias)
    return torch.nn.Sequential(*blocks)


@dataclass
class MLPProbe:
    """Result of :func:`mlp_gradient_probe`.

    Attributes:
        setup: a short name of the configuration.
        weight_grad_norms: [depth] ‖∂loss/∂W_l‖_F per block, first block first.
        activation, init, residual, layer_norm, depth, width, batch_size: the configuration.
    """

    setup: str
    activation: str
    init: str
    residual: bool
    layer_norm: bool
    depth: int
    width: int
    batch_size: int
    weight_grad_norms: list[float] = field(default_factory=list)

    @property
    def first(self) -> float:
        """Weight-gradient norm of the first block."""
        return self.weight_grad_norms[0]

    @property
    def last(self) -> float:
        """Weight-gradient norm of the last block."""
        return self.weight_grad_norms[-1]

    @property
    def ratio(self) -> float:
        """first / last; nan when the last is 0."""
        return self.first / self.last if self.last != 0 else math.nan


def mlp_gradient_probe(
    depth: int = 20,
    width: int = 256,
    activation: str = "sigmoid",
    init: str = "standard",
    *,
    residual: bool = False,
    layer_norm: bool = False,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> MLPProbe:
    """Per-block weight-gradient norms of a deep MLP at initialization.

    Builds :func:`deep_mlp` from ``seed``, feeds x ~ N(0, 1) [batch_size, width] and back-propagates
    loss = sum of the outputs. Computed in float32 (so values below about 1e-38 read as 0).

    Args: as :func:`deep_mlp`, plus batch_size, the seed of the weights and input, and the device.
    Returns:
        an :class:`MLPProbe` with the depth norms.
    """
    _check_size("batch_size", batch_size, 1)
    gen = _generator(seed, None)
    model = deep_mlp(depth, width, activation, init, residual=residual, layer_norm=layer_norm, generator=gen)
    model = model.to(device)
    x = torch.randn(batch_size, width, generator=gen).to(device)
    model(x).sum().backward()
    norms = torch.stack([block.linear.weight.grad.norm() for block in model]).tolist()
    parts = [activation, {"standard": "standard init", "negative_mean": "negative mean"}.get(init, init)]
    if residual:
        parts.append("residual")
    if layer_norm:
        parts.append("LayerNorm")
    return MLPProbe(
        setup=" + ".join(parts),
        activation=activation,
        init=init,
        residual=residual,
        layer_norm=layer_norm,
        depth=depth,
        width=width,
        batch_size=batch_size,
        weight_grad_norms=norms,
    )
