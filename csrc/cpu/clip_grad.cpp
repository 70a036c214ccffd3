#include <torch/extension.h>

#include "ops.h"

namespace vgk {

void define_clip_grad_ops(torch::Library& m) {}

}  // namespace vgk
