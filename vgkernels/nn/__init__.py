"""Drop-in modules for ``torch.nn``."""

from vgkernels.nn.cell import GRUCell, LSTMCell, RNNCell
from vgkernels.nn.layer_norm import LayerNorm
from vgkernels.nn.rnn import GRU, LSTM, RNN
from vgkernels.nn.tracking import track

__all__ = ["GRU", "GRUCell", "LSTM", "LSTMCell", "LayerNorm", "RNN", "RNNCell", "track"]
