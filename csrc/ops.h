// Each op family lives in one file under csrc/cpu/ and exposes one function that declares its
// schemas; ops.cpp calls them all inside the single TORCH_LIBRARY block of the `vgk` namespace.
#pragma once

#include <torch/library.h>

namespace vgk {

void define_recurrent_ops(torch::Library& m);
void define_recurrent_autograd_ops(torch::Library& m);
void define_recurrent_ln_ops(torch::Library& m);
void define_layer_norm_ops(torch::Library& m);
void define_clip_grad_ops(torch::Library& m);
void define_grad_stats_ops(torch::Library& m);
void define_cell_ops(torch::Library& m);

}  // namespace vgk
