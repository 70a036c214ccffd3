// Whole-sequence recurrent layers (Elman RNN, LSTM, GRU) for CPU tensors.
#include <torch/extension.h>

#include "ops.h"

namespace vgk {

void define_recurrent_ops(torch::Library& m) {
  // One direction of one layer over the whole sequence. See vgkernels/ops/recurrent.py for the
  // meaning of every argument and output; the Python side owns the autograd registration.
  m.def(
      "rnn_forward(Tensor xproj, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? b_hh, Tensor? lengths, "
      "Tensor? probe, str mode, bool reverse, bool track) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "rnn_backward(Tensor grad_states, Tensor grad_cell_states, Tensor states, Tensor cell_states, "
      "Tensor workspace, Tensor w_hh, Tensor? lengths, str mode, bool reverse, float? grad_clip, "
      "bool track, bool has_b_hh) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace vgk
