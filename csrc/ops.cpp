// The registry of vgkernels' torch.library ops and the Python module `vgkernels._C`.
// Importing the module registers every schema and its CPU kernel with the dispatcher.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "cpu/block_cache.h"
#include "ops.h"

TORCH_LIBRARY(vgk, m) {
  vgk::define_recurrent_ops(m);
  vgk::define_recurrent_ln_ops(m);
  vgk::define_layer_norm_ops(m);
  vgk::define_clip_grad_ops(m);
  vgk::define_grad_stats_ops(m);
  vgk::define_cell_ops(m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "vgkernels C++ CPU kernels; the ops are registered under torch.ops.vgk";
  module.def("build_info", []() {
    pybind11::dict info;
    info["build_type"] = VGK_BUILD_TYPE;
    info["compiler"] = VGK_CXX_COMPILER;
    info["cxx_flags"] = VGK_CXX_FLAGS;
#ifdef TORCH_VERSION
    info["torch_version"] = TORCH_VERSION;
#endif
#ifdef _OPENMP
    info["openmp"] = _OPENMP;
#else
    info["openmp"] = 0;
#endif
    info["parallel_info"] = at::get_parallel_info();
    return info;
  });
  module.def("cpu_block_cache_stats", []() {
    const auto stats = vgk::BlockCache::get().stats();
    pybind11::dict out;
    out["idle_bytes"] = stats.idle_bytes;
    out["idle_blocks"] = stats.idle_blocks;
    out["limit_bytes"] = stats.limit_bytes;
    out["hits"] = stats.hits;
    out["misses"] = stats.misses;
    return out;
  }, "The cache of freed CPU blocks (block_cache.h): idle bytes and blocks, its limit, hits and misses.");
}
