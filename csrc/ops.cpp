// The registry of vgkernels' torch.library ops and the Python module `vgkernels._C`.
// Importing the module registers every schema and its CPU kernel with the dispatcher.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

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
  module.def("tensor_table", [](const pybind11::list& tensors, int64_t tile) -> pybind11::object {
    // The host table of a multi-tensor launch (vgkernels/triton/clip_grad.py): addresses [N], lengths [N],
    // and per tile of `tile` elements its tensor and first element. One pass in C++: in Python the same
    // walk cost ~0.1 ms per 1000 gradients, at every call of clip_grad_norm_.
    TORCH_CHECK(tile > 0, "tensor_table: tile must be positive, got ", tile);
    const auto n = static_cast<int64_t>(tensors.size());
    std::vector<int64_t> numels(n);
    std::vector<int64_t> addresses(n);
    int64_t n_tiles = 0;
    bool aligned = tile % 16 == 0;
    for (int64_t i = 0; i < n; ++i) {
      PyObject* item = tensors[i].ptr();
      TORCH_CHECK_TYPE(THPVariable_Check(item), "tensor_table: item ", i, " is not a tensor");
      const at::Tensor& t = THPVariable_Unpack(item);
      if (!t.is_contiguous()) {
        return pybind11::none();  // the caller makes or handles contiguous copies
      }
      addresses[i] = reinterpret_cast<int64_t>(t.data_ptr());
      numels[i] = t.numel();
      aligned = aligned && addresses[i] % 16 == 0;
      n_tiles += (numels[i] + tile - 1) / tile;
    }
    at::Tensor table = at::empty({2 * n + 2 * n_tiles}, at::kLong);
    int64_t* out = table.data_ptr<int64_t>();
    std::copy(addresses.begin(), addresses.end(), out);
    std::copy(numels.begin(), numels.end(), out + n);
    int64_t* tile_tensor = out + 2 * n;
    int64_t* tile_start = tile_tensor + n_tiles;
    for (int64_t i = 0, j = 0; i < n; ++i) {
      for (int64_t start = 0; start < numels[i]; start += tile, ++j) {
        tile_tensor[j] = i;
        tile_start[j] = start;
      }
    }
    return pybind11::make_tuple(table, n_tiles, aligned);
  }, "tensor_table(tensors: list[Tensor], tile: int) -> (int64 table, tiles, 16-byte aligned) or None when a "
     "tensor is not contiguous: the table of vgkernels.triton.clip_grad's launches.");
  module.def("group_by_device_dtype", [](const pybind11::list& tensors) -> pybind11::list {
    // torch.nn.utils' grouping of gradients by (device, dtype), in order of first appearance, without a
    // Python device object per tensor (~0.15 ms per 1000 gradients at every call of clip_grad_norm_).
    std::vector<std::tuple<c10::Device, at::ScalarType, pybind11::list>> groups;
    for (size_t i = 0; i < tensors.size(); ++i) {
      PyObject* item = tensors[i].ptr();
      TORCH_CHECK_TYPE(THPVariable_Check(item), "group_by_device_dtype: item ", i, " is not a tensor");
      const at::Tensor& t = THPVariable_Unpack(item);
      auto same = [&](const auto& g) { return std::get<0>(g) == t.device() && std::get<1>(g) == t.scalar_type(); };
      auto it = std::find_if(groups.begin(), groups.end(), same);
      if (it == groups.end()) {
        groups.emplace_back(t.device(), t.scalar_type(), pybind11::list());
        it = groups.end() - 1;
      }
      std::get<2>(*it).append(tensors[i]);
    }
    pybind11::list out;
    for (auto& g : groups) {
      out.append(std::get<2>(g));
    }
    return out;
  }, "group_by_device_dtype(tensors: list[Tensor]) -> list[list[Tensor]]: the tensors grouped by device "
     "and dtype, groups in order of first appearance, tensors in order.");
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
