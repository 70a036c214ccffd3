"""Drop-in modules for ``torch.nn``."""

from torch import nn as _torch_nn

from vgkernels.nn import _torch_tools
from vgkernels.nn.cell import CellBase as _CellBase
from vgkernels.nn.cell import GRUCell, LSTMCell, RNNCell
from vgkernels.nn.layer_norm import LayerNorm
from vgkernels.nn.rnn import GRU, LSTM, RNN
from vgkernels.nn.rnn import RecurrentBase as _RecurrentBase
from vgkernels.nn.tracking import track

# torch.ao.quantization maps modules by exact type: it refuses ours loudly instead of leaving them in
# floating point without a word (see _torch_tools.py).
_torch_tools.refuse_quantization(
    lambda module: isinstance(module, (_RecurrentBase, _CellBase)),
    (_torch_nn.LSTM, _torch_nn.GRU, _torch_nn.RNN, _torch_nn.LSTMCell, _torch_nn.GRUCell, _torch_nn.RNNCell),
)

__all__ = ["GRU", "GRUCell", "LSTM", "LSTMCell", "LayerNorm", "RNN", "RNNCell", "track"]
