"""Synthetic long-range tasks and gradient probes at initialization.

- :func:`adding_problem`: Le, Jaitly & Hinton (2015) / Arjovsky, Shah & Bengio (2016).
- :func:`copy_memory`: Arjovsky, Shah & Bengio (2016).
- :func:`mlp_gradient_probe`: per-layer weight-gradient norms of a deep MLP at initialization.
- :func:`rnn_gradient_probe`: per-step BPTT gradient norms of an Elman RNN at initialization.

Both probes take every activation of :data:`ACTIVATIONS`, the initialization each is usually paired
with (:data:`USUAL_INIT`) or another, a highway (gated) skip connection, and LayerNorm or BatchNorm in
training or evaluation mode; the MLP also takes a residual connection.

Every generator is batched, takes ``seed`` or ``generator`` and ``device``. The random draws happen on
the generator's device (the CPU unless a device generator is given) and are then moved to ``device``,
so one seed gives the same data on every device.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vgkernels import init as vinit
from vgkernels.nn import LayerNorm

__all__ = [
    "ACTIVATIONS",
    "ADDING_BASELINE_MSE",
    "BATCH_NORM_MODES",
    "CALIBRATION_BATCHES",
    "COPY_BLANK",
    "COPY_DELIMITER",
    "COPY_NUM_CLASSES",
    "HIGHWAY_BIAS",
    "LEAKY_SLOPE",
    "MLP_ACTIVATIONS",
    "MLP_INITS",
    "MLPProbe",
    "ProbeRNN",
    "RECURRENT_BN_GAIN",
    "RNNProbe",
    "RNN_INITS",
    "USUAL_INIT",
    "adding_problem",
    "copy_memory",
    "copy_memory_baseline",
    "deep_mlp",
    "mlp_gradient_probe",
    "rnn_gradient_probe",
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
# Gradient probes at initialization: a deep MLP (through depth) and an Elman RNN (through time)
# ---------------------------------------------------------------------------------------------

ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "silu", "gelu")
"""Activations of both probes. ``"silu"`` is Swish with beta = 1 (Ramachandran et al. 2017; Elfwing
et al. 2018); ``"leaky_relu"`` has slope :data:`LEAKY_SLOPE` (Maas et al. 2013); ``"elu"`` alpha = 1
(Clevert et al. 2016); ``"selu"`` Klambauer et al. (2017); ``"gelu"`` the exact erf form (Hendrycks &
Gimpel 2016)."""
MLP_ACTIVATIONS = ACTIVATIONS
LEAKY_SLOPE = 0.01
"""Negative slope of ``"leaky_relu"`` (torch's default)."""
MLP_INITS = ("standard", "negative_mean", "xavier", "he", "lecun", "orthogonal")
RNN_INITS = ("default", "xavier", "he", "lecun", "orthogonal", "irnn")
USUAL_INIT: dict[str, str] = {
    "sigmoid": "xavier",
    "tanh": "xavier",
    "relu": "he",
    "leaky_relu": "he",
    "elu": "he",
    "selu": "lecun",
    "silu": "he",
    "gelu": "he",
}
"""The initialization each activation is usually paired with: Xavier for the saturating sigmoid and
tanh (Glorot & Bengio 2010), He for the rectifier family (He et al. 2015), LeCun normal for SELU
(Klambauer et al. 2017). Keys of :data:`ACTIVATIONS`; values are names in :data:`MLP_INITS` and
:data:`RNN_INITS`."""
HIGHWAY_BIAS = -3.0
"""Default transform-gate bias of the highway probes. Srivastava et al. (2015) initialize it negative
(they name -1 and -3), so that a layer starts out carrying its input; the deeper the net, the more
negative."""
RECURRENT_BN_GAIN = 0.1
"""Initial BatchNorm gain in the recurrent probe: Cooijmans et al. (2017) found that gains of 1 drive
tanh units into saturation and let the gradient vanish through time, and used 0.1. In this probe (the
batch's statistics, a loss on the last state only) gains of 1 kept more of the gradient than 0.1 for
tanh: compare with ``rnn_gradient_probe(..., norm_gain=1.0)``."""
BATCH_NORM_MODES = ("train", "eval")
CALIBRATION_BATCHES = 8
"""Batches whose statistics become BatchNorm's running statistics before an ``"eval"`` probe."""

_ACTIVATION_FNS = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "leaky_relu": functools.partial(F.leaky_relu, negative_slope=LEAKY_SLOPE),
    "elu": F.elu,
    "selu": F.selu,
    "silu": F.silu,
    "gelu": F.gelu,
}


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_variant(residual: bool, highway: bool, layer_norm: bool, batch_norm: object) -> None:
    if residual and highway:
        raise ValueError("residual and highway are alternative skip connections: pass at most one")
    if layer_norm and batch_norm:
        raise ValueError("layer_norm and batch_norm are alternative normalizations: pass at most one")


def _setup_name(activation: str, init: str, *, residual: bool = False, highway: bool = False,
                highway_bias: float = HIGHWAY_BIAS, layer_norm: bool = False,
                batch_norm: str | None = None) -> str:
    parts = [activation, {"standard": "standard init", "negative_mean": "negative mean"}.get(init, init)]
    if residual:
        parts.append("residual")
    if highway:
        parts.append(f"highway (gate bias {highway_bias:g})")
    if layer_norm:
        parts.append("LayerNorm")
    if batch_norm:
        parts.append(f"BatchNorm ({batch_norm})")
    return " + ".join(parts)


def _calibrate(model: torch.nn.Module, draw, batches: int) -> None:
    """Fill the BatchNorm running statistics from ``batches`` forward passes in training mode, then
    switch the model to evaluation mode (its BatchNorm layers use a cumulative average)."""
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(draw())
    model.eval()


class _Block(torch.nn.Module):
    """One MLP block: u = LN(h) or h; a = act(BN(Linear(u))); out = a, h + a, or T a + (1 - T) h."""

    def __init__(self, width: int, activation: str, residual: bool, highway: bool, layer_norm: bool,
                 batch_norm: bool) -> None:
        super().__init__()
        self.norm = LayerNorm(width) if layer_norm else None
        self.linear = torch.nn.Linear(width, width)
        # Ioffe & Szegedy (2015) normalize the pre-activation, right before the nonlinearity.
        self.batch_norm = torch.nn.BatchNorm1d(width, momentum=None) if batch_norm else None
        self.gate = torch.nn.Linear(width, width) if highway else None
        self.activation = _ACTIVATION_FNS[activation]
        self.residual = residual

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u = self.norm(h) if self.norm is not None else h
        z = self.linear(u)
        a = self.activation(self.batch_norm(z) if self.batch_norm is not None else z)
        if self.gate is not None:  # highway layer (Srivastava et al. 2015): transform gate T, carry 1 - T
            carry = torch.sigmoid(self.gate(u))
            return carry * a + (1 - carry) * h
        return h + a if self.residual else a


def _init_linear(linear: torch.nn.Linear, init: str, activation: str, generator) -> None:
    if init == "standard":  # torch.nn.Linear's own default, drawn from our generator
        vinit.kaiming_uniform_(linear.weight, a=math.sqrt(5), nonlinearity="leaky_relu", generator=generator)
        vinit.default_(linear.bias, linear.in_features, generator=generator)
        return
    if init == "negative_mean":
        vinit.negative_mean_(linear.weight, generator=generator)
    elif init == "xavier":
        vinit.xavier_uniform_(linear.weight, generator=generator)
    elif init == "he":
        if activation == "leaky_relu":
            vinit.kaiming_normal_(
                linear.weight, a=LEAKY_SLOPE, nonlinearity="leaky_relu", generator=generator
            )
        else:
            vinit.kaiming_normal_(linear.weight, generator=generator)
    elif init == "lecun":
        vinit.lecun_normal_(linear.weight, generator=generator)
    else:
        vinit.orthogonal_(linear.weight, generator=generator)
    torch.nn.init.zeros_(linear.bias)


def deep_mlp(
    depth: int,
    width: int,
    activation: str = "sigmoid",
    init: str = "standard",
    *,
    residual: bool = False,
    highway: bool = False,
    highway_bias: float = HIGHWAY_BIAS,
    layer_norm: bool = False,
    batch_norm: bool = False,
    generator: torch.Generator | None = None,
) -> torch.nn.Sequential:
    """A stack of ``depth`` blocks, all [width] -> [width]:

        u = LayerNorm(h) (pre-LN) or h;   a = act(BatchNorm(Linear(u))) or act(Linear(u))
        out = a;  or h + a (residual);  or T * a + (1 - T) * h with T = sigmoid(Linear_T(u)) (highway)

    LayerNorm is ``vgkernels.nn.LayerNorm`` before the Linear; BatchNorm (``torch.nn.BatchNorm1d``,
    gain 1, shift 0, cumulative running statistics) normalizes the pre-activation as in Ioffe &
    Szegedy (2015). The highway layer is that of Srivastava et al. (2015), with transform gate T.

    Args:
        depth, width: number of blocks and their width.
        activation: one of :data:`ACTIVATIONS`.
        init: of every Linear (the highway gate's too), one of :data:`MLP_INITS`:
            ``"standard"`` keeps torch.nn.Linear's U[-1/sqrt(n), 1/sqrt(n)] weights and biases;
            the others set the weights and zero the biases: ``"negative_mean"``
            (:func:`vgkernels.init.negative_mean_`), ``"xavier"`` (uniform, gain 1), ``"he"``
            (normal; the leaky-ReLU gain for ``"leaky_relu"``, the ReLU gain for every other
            activation), ``"lecun"`` (:func:`vgkernels.init.lecun_normal_`), ``"orthogonal"``.
        residual, highway: the skip connection (at most one).
        highway_bias: the transform gates' initial bias (negative: the layers start out carrying).
        layer_norm, batch_norm: the normalization (at most one).
        generator: random source for the initialization (CPU).
    Returns:
        a float32 ``torch.nn.Sequential`` of the blocks on the CPU, in training mode.
    """
    _check_size("depth", depth, 1)
    _check_size("width", width, 1)
    _check_choice("activation", activation, ACTIVATIONS)
    _check_choice("init", init, MLP_INITS)
    _check_variant(residual, highway, layer_norm, batch_norm)
    blocks = [_Block(width, activation, residual, highway, layer_norm, batch_norm) for _ in range(depth)]
    for block in blocks:
        _init_linear(block.linear, init, activation, generator)
        if block.gate is not None:
            _init_linear(block.gate, init, activation, generator)
            torch.nn.init.constant_(block.gate.bias, highway_bias)
    return torch.nn.Sequential(*blocks)


class _Probe:
    """first, last and their ratio of a probe's gradient norms; subclasses give them as ``norms``,
    from the input side to the loss side."""

    @property
    def first(self) -> float:
        """The gradient norm farthest from the loss: the first block, or t = 0."""
        return self.norms[0]

    @property
    def last(self) -> float:
        """The gradient norm next to the loss: the last block, or t = T-1."""
        return self.norms[-1]

    @property
    def ratio(self) -> float:
        """first / last; nan when the last is 0."""
        return self.first / self.last if self.last != 0 else math.nan


@dataclass
class MLPProbe(_Probe):
    """Result of :func:`mlp_gradient_probe`.

    Attributes:
        setup: a short name of the configuration.
        weight_grad_norms: [depth] ‖∂loss/∂W_l‖_F of each block's Linear, first block first.
        activation, init, residual, layer_norm, depth, width, batch_size, highway, batch_norm: the
            configuration (``batch_norm`` is None, ``"train"`` or ``"eval"``).
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
    highway: bool = False
    batch_norm: str | None = None

    @property
    def norms(self) -> list[float]:
        """``weight_grad_norms``."""
        return self.weight_grad_norms


def mlp_gradient_probe(
    depth: int = 20,
    width: int = 256,
    activation: str = "sigmoid",
    init: str = "standard",
    *,
    residual: bool = False,
    highway: bool = False,
    highway_bias: float = HIGHWAY_BIAS,
    layer_norm: bool = False,
    batch_norm: str | None = None,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> MLPProbe:
    """Per-block weight-gradient norms of a deep MLP at initialization.

    Builds :func:`deep_mlp` from ``seed``, feeds x ~ N(0, 1) [batch_size, width] and back-propagates
    loss = sum of the outputs. Computed in float32 (so values below about 1e-38 read as 0).

    ``batch_norm="train"`` normalizes with the statistics of the probe's own batch, as in training.
    ``batch_norm="eval"`` first runs :data:`CALIBRATION_BATCHES` batches of fresh N(0, 1) inputs
    through the model in training mode, whose average statistics become the running statistics, and
    then probes in evaluation mode, where BatchNorm is a fixed affine map per feature.

    Args: as :func:`deep_mlp`, plus ``batch_norm`` (None, ``"train"`` or ``"eval"``), batch_size,
        the seed of the weights and inputs, and the device.
    Returns:
        an :class:`MLPProbe` with the depth norms.
    """
    _check_size("batch_size", batch_size, 1)
    if batch_norm is not None:
        _check_choice("batch_norm", batch_norm, BATCH_NORM_MODES)
    gen = _generator(seed, None)
    model = deep_mlp(depth, width, activation, init, residual=residual, highway=highway,
                     highway_bias=highway_bias, layer_norm=layer_norm, batch_norm=batch_norm is not None,
                     generator=gen)
    model = model.to(device)
    x = torch.randn(batch_size, width, generator=gen).to(device)
    if batch_norm == "eval":
        draw = lambda: torch.randn(batch_size, width, generator=gen).to(device)
        _calibrate(model, draw, CALIBRATION_BATCHES)
    model(x).sum().backward()
    norms = torch.stack([block.linear.weight.grad.norm() for block in model]).tolist()
    return MLPProbe(
        setup=_setup_name(activation, init, residual=residual, highway=highway, highway_bias=highway_bias,
                          layer_norm=layer_norm, batch_norm=batch_norm),
        activation=activation,
        init=init,
        residual=residual,
        layer_norm=layer_norm,
        depth=depth,
        width=width,
        batch_size=batch_size,
        weight_grad_norms=norms,
        highway=highway,
        batch_norm=batch_norm,
    )


class ProbeRNN(torch.nn.Module):
    """An Elman RNN run step by step in eager PyTorch, with any activation, a highway gate and batch
    or layer normalization: the recurrent probe's model.

    With G = 2 gate blocks for the highway variant (else 1), each step computes

        plain:          a = x_t W_ih^T + h_{t-1} W_hh^T + b_ih + b_hh              [B, G*H]
        LayerNorm:      a = LN(x_t W_ih^T + h_{t-1} W_hh^T) + b_ih + b_hh
        BatchNorm:      a = BN_t(x_t W_ih^T) + BN_t(h_{t-1} W_hh^T) + b_ih + b_hh
        then            h_t = act(a), or with the highway gate
                        h_t = T * act(a_1) + (1 - T) * h_{t-1},  T = sigmoid(a_2)

    LayerNorm normalizes the summed inputs over the G*H units, as Ba et al. (2016) do for the plain
    RNN (gains 1, shifts 0). BatchNorm normalizes each unit over the batch with separate statistics
    for every time step, the recurrent BatchNorm of Cooijmans et al. (2017) (gains ``norm_gain``,
    default :data:`RECURRENT_BN_GAIN`, shifts 0; running statistics per step, a cumulative average).
    The highway step is the recurrent highway layer of depth 1 (Zilly et al. 2017) with the carry
    gate 1 - T of Srivastava et al. (2015).

    The parameters are named as torch.nn's (``weight_ih`` [G*H, I], ``weight_hh`` [G*H, H],
    ``bias_ih``, ``bias_hh`` [G*H]; T's block is the second), so :func:`vgkernels.init.init_recurrent_`
    initializes them per gate block. Normalization gains and shifts are ``norm_weight`` and
    ``norm_bias`` (LayerNorm) or ``norm_{ih,hh}_{weight,bias}`` (BatchNorm).
    Built with torch.nn's recurrent default init; call :meth:`set_highway_bias` after another init.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        activation: str = "tanh",
        *,
        highway: bool = False,
        layer_norm: bool = False,
        batch_norm: bool = False,
        max_steps: int | None = None,
        norm_gain: float | None = None,
    ) -> None:
        super().__init__()
        _check_size("input_size", input_size, 1)
        _check_size("hidden_size", hidden_size, 1)
        _check_choice("activation", activation, ACTIVATIONS)
        _check_variant(False, highway, layer_norm, batch_norm)
        if batch_norm:
            _check_size("max_steps", max_steps, 1)
        self.input_size, self.hidden_size, self.activation = input_size, hidden_size, activation
        self.highway, self.layer_norm, self.batch_norm = highway, layer_norm, batch_norm
        self.max_steps = max_steps
        gates = (2 if highway else 1) * hidden_size
        self.weight_ih = torch.nn.Parameter(torch.empty(gates, input_size))
        self.weight_hh = torch.nn.Parameter(torch.empty(gates, hidden_size))
        self.bias_ih = torch.nn.Parameter(torch.empty(gates))
        self.bias_hh = torch.nn.Parameter(torch.empty(gates))
        vinit.init_recurrent_(self, "default")
        if norm_gain is None:
            norm_gain = RECURRENT_BN_GAIN if batch_norm else 1.0
        for side in (("ih", "hh") if batch_norm else ("",) if layer_norm else ()):
            name = f"norm_{side}_" if side else "norm_"
            gain = torch.full((gates,), float(norm_gain))
            self.register_parameter(name + "weight", torch.nn.Parameter(gain))
            self.register_parameter(name + "bias", torch.nn.Parameter(torch.zeros(gates)))
        if batch_norm:
            for side in ("ih", "hh"):
                self.register_buffer(f"running_mean_{side}", torch.zeros(max_steps, gates))
                self.register_buffer(f"running_var_{side}", torch.ones(max_steps, gates))
            self.batches_tracked = 0

    def set_highway_bias(self, value: float) -> None:
        """Set the transform gate's effective bias b_ih + b_hh to ``value`` (split evenly)."""
        if not self.highway:
            raise ValueError("set_highway_bias: this ProbeRNN has no highway gate (highway=False)")
        with torch.no_grad():
            for bias in (self.bias_ih, self.bias_hh):
                bias[self.hidden_size :].fill_(value / 2)

    def _batch_norm(self, side: str, a: torch.Tensor, t: int) -> torch.Tensor:
        weight, bias = getattr(self, f"norm_{side}_weight"), getattr(self, f"norm_{side}_bias")
        # Running statistics of step t; in training mode F.batch_norm also updates them in place.
        mean, var = getattr(self, f"running_mean_{side}")[t], getattr(self, f"running_var_{side}")[t]
        momentum = 1.0 / (self.batches_tracked + 1)
        return F.batch_norm(a, mean, var, weight, bias, self.training, momentum)

    def forward(
        self, x: torch.Tensor, *, retain_grad: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the sequence from h_0 = 0.

        Args:
            x: [T, B, input_size] (time first).
            retain_grad: keep ``.grad`` of every h_t after backward (the per-step gradients).
        Returns:
            the outputs [T, B, H] and the list of the T states h_t (the tensors whose ``.grad`` holds
            ∂loss/∂h_t with ``retain_grad``).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.input_size:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor [T, B, {self.input_size}], got {got}")
        steps = x.shape[0]
        if self.batch_norm and steps > self.max_steps:
            raise ValueError(
                f"x: BatchNorm keeps statistics for max_steps = {self.max_steps} steps, got T = {steps}"
            )
        act = _ACTIVATION_FNS[self.activation]
        xproj = x @ self.weight_ih.t()
        h = x.new_zeros(x.shape[1], self.hidden_size)
        states = []
        for t in range(steps):
            a_x, a_h = xproj[t], h @ self.weight_hh.t()
            if self.batch_norm:
                a = self._batch_norm("ih", a_x, t) + self._batch_norm("hh", a_h, t)
            elif self.layer_norm:
                a = F.layer_norm(a_x + a_h, a_x.shape[-1:], self.norm_weight, self.norm_bias)
            else:
                a = a_x + a_h
            a = a + self.bias_ih + self.bias_hh
            if self.highway:
                z, gate = a.chunk(2, dim=-1)
                carry = torch.sigmoid(gate)
                h = carry * act(z) + (1 - carry) * h
            else:
                h = act(a)
            if retain_grad and h.requires_grad:
                h.retain_grad()
            states.append(h)
        if self.batch_norm and self.training:
            self.batches_tracked += 1
        return torch.stack(states), states


@dataclass
class RNNProbe(_Probe):
    """Result of :func:`rnn_gradient_probe`.

    Attributes:
        setup: a short name of the configuration.
        grad_norms: [T] ‖∂loss/∂h_t‖₂ over batch and hidden units, t = 0 first (the loss sits at
            t = T-1), float64 norms of the float32 gradients.
        activation, init, highway, layer_norm, batch_norm, seq_len, hidden, batch_size: the configuration.
    """

    setup: str
    activation: str
    init: str
    highway: bool
    layer_norm: bool
    batch_norm: str | None
    seq_len: int
    hidden: int
    batch_size: int
    grad_norms: list[float] = field(default_factory=list)

    @property
    def norms(self) -> list[float]:
        """``grad_norms``."""
        return self.grad_norms


def rnn_gradient_probe(
    seq_len: int = 100,
    hidden: int = 64,
    activation: str = "tanh",
    init: str = "default",
    *,
    highway: bool = False,
    highway_bias: float = HIGHWAY_BIAS,
    layer_norm: bool = False,
    batch_norm: str | None = None,
    norm_gain: float | None = None,
    batch_size: int = 32,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> RNNProbe:
    """Per-step BPTT gradient norms of an Elman RNN (:class:`ProbeRNN`) at initialization.

    One input channel x_t ~ U[0, 1], h_0 = 0, loss = sum of h_{T-1}; ‖∂loss/∂h_t‖ at every step comes
    from ``retain_grad``. ``batch_norm`` works as in :func:`mlp_gradient_probe`: ``"train"`` uses the
    batch's own statistics at every step, ``"eval"`` the running statistics of
    :data:`CALIBRATION_BATCHES` fresh batches.

    For the tanh, relu and sigmoid RNN without extras this is the model of ``vgkernels.nn.RNN``, whose
    trace gives the same norms; this probe covers every activation of :data:`ACTIVATIONS`.

    Args:
        seq_len, hidden, batch_size: T, H and B.
        activation: one of :data:`ACTIVATIONS`.
        init: one of :data:`RNN_INITS`, a scheme of :func:`vgkernels.init.init_recurrent_` applied per
            gate block (``"default"`` is torch.nn's U[-1/sqrt(H), 1/sqrt(H)]; ``"irnn"`` sets W_hh = I).
        highway, highway_bias: the carry-gated step and its gate's initial bias.
        layer_norm, batch_norm: the normalization (at most one; ``batch_norm`` None, "train" or "eval").
        norm_gain: the normalization's initial gain; None: 1 for LayerNorm, :data:`RECURRENT_BN_GAIN`
            for BatchNorm.
        seed: of the weights and inputs. device: where the probe runs.
    Returns:
        an :class:`RNNProbe`.
    """
    _check_size("seq_len", seq_len, 1)
    _check_size("batch_size", batch_size, 1)
    _check_choice("init", init, RNN_INITS)
    if batch_norm is not None:
        _check_choice("batch_norm", batch_norm, BATCH_NORM_MODES)
    gen = _generator(seed, None)
    rnn = ProbeRNN(1, hidden, activation, highway=highway, layer_norm=layer_norm,
                   batch_norm=batch_norm is not None, max_steps=seq_len, norm_gain=norm_gain)
    vinit.init_recurrent_(rnn, init, generator=gen)
    if highway:
        rnn.set_highway_bias(highway_bias)
    rnn = rnn.to(device)
    draw = lambda: torch.rand(seq_len, batch_size, 1, generator=gen).to(device)
    x = draw()
    if batch_norm == "eval":
        _calibrate(rnn, draw, CALIBRATION_BATCHES)
    _, states = rnn(x, retain_grad=True)
    states[-1].sum().backward()
    norms = [0.0 if s.grad is None else float(s.grad.double().norm()) for s in states]
    return RNNProbe(
        setup=_setup_name(activation, init, highway=highway, highway_bias=highway_bias,
                          layer_norm=layer_norm, batch_norm=batch_norm),
        activation=activation,
        init=init,
        highway=highway,
        layer_norm=layer_norm,
        batch_norm=batch_norm,
        seq_len=seq_len,
        hidden=hidden,
        batch_size=batch_size,
        grad_norms=norms,
    )
