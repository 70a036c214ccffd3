#include <torch/extension.h>

#include "ops.h"

namespace vgk {

void define_grad_stats_ops(torch::Library& m) {}

}  // namespace vgk
