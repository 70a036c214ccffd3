// Layer-normalized LSTM and GRU cells (Ba et al. 2016) over the whole sequence, for CPU tensors:
// gates = xproj + LN(W_hh h) (+ b_hh inside r * (...) for the GRU), and h = o * tanh(LN(c)) for the LSTM.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops.h"

namespace vgk {

void define_recurrent_ln_ops(torch::Library& m) {
  // See vgkernels/ops/recurrent.py for the meaning of every argument and output.
  m.def(
      "rnn_ln_forward(Tensor xproj, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? b_hh, Tensor ln_hh_weight, "
      "Tensor ln_hh_bias, Tensor? ln_cell_weight, Tensor? ln_cell_bias, float eps, Tensor? lengths, str mode, "
      "bool reverse, bool track) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "rnn_ln_backward(Tensor grad_states, Tensor grad_cell_states, Tensor states, Tensor cell_states, "
      "Tensor workspace, Tensor w_hh, Tensor ln_hh_weight, Tensor? ln_cell_weight, Tensor? lengths, str mode, "
      "bool reverse, float? grad_clip, bool track, bool has_b_hh) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace vgk
