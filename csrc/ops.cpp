// The registry of vgkernels' torch.library ops and the Python module `vgkernels._C`.
// Importing the module registers every schema and its CPU kernel with the dispatcher.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <limits>

#include "cpu/block_cache.h"
#include "cpu/cpu_isa.h"
#include "cpu/recurrent_blas.h"
#include "ops.h"

TORCH_LIBRARY(vgk, m) {
  vgk::define_recurrent_ops(m);
  vgk::define_recurrent_autograd_ops(m);
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
    out["in_use_bytes"] = stats.in_use_bytes;
    out["budget_bytes"] = stats.budget_bytes;
    out["limit_bytes"] = stats.limit_bytes == std::numeric_limits<size_t>::max() ? pybind11::object(pybind11::none())
                                                                                  : pybind11::int_(stats.limit_bytes);
    out["hits"] = stats.hits;
    out["misses"] = stats.misses;
    return out;
  }, "The cache of freed CPU blocks (block_cache.h): idle bytes and blocks, bytes in use, the budget (the "
     "most in use at once recently), the VGK_CPU_CACHE_MB limit (None: none), hits and misses.");
  module.def("cpu_block_cache_empty", []() { return vgk::BlockCache::get().empty(); },
             "Gives every idle block of the CPU block cache back to the system; returns the bytes given back.");
  module.def("cpu_isa", []() {
    pybind11::dict out;
    out["native"] = vgk::cpu_isa_name(vgk::native_cpu_isa());
    out["in_effect"] = vgk::cpu_isa_name(vgk::cpu_isa());
    return out;
  }, "The instruction-set level of the CPU and the one the kernels use (lowered by VGK_CPU_ISA).");
  module.def("cpu_gemm_choices", []() {
    pybind11::list out;
    for (const auto& [key, choice] : vgk::rnn::GemmChoices::get().list()) {
      pybind11::dict row;
      row["kind"] = std::get<0>(key);
      row["rows"] = std::get<1>(key);
      row["n"] = std::get<2>(key);
      row["k"] = std::get<3>(key);
      row["transposed"] = std::get<4>(key);
      row["path"] = vgk::rnn::gemm_path_name(choice.path);
      row["brgemm_us"] = choice.brgemm_seconds * 1e6;
      row["library_us"] = choice.library_seconds * 1e6;
      out.append(row);
    }
    return out;
  }, "The GEMM paths chosen so far in this process, per shape, with the single-core timings behind them.");
  module.def("cpu_gemm_forced", []() -> std::optional<std::string> {
    const auto forced = vgk::rnn::forced_gemm_path();
    if (!forced.has_value()) return std::nullopt;
    return std::string(vgk::rnn::gemm_path_name(*forced));
  }, "The GEMM path VGK_CPU_BLAS forces, or None when the kernels choose.");
}
