// Multi-tensor kernels behind vgkernels.clip_grad_norm_ on CPU tensors: one parallel pass over every
// tensor of a (device, dtype) group for the norm, and one in-place pass for the scaling. Work is cut
// into fixed-size chunks across all tensors, so small and large tensors alike keep every thread busy,
// and each chunk's partial result goes to its own slot, summed afterwards in a fixed order
// (deterministic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/norm_simd.h"
#include "ops.h"

namespace vgk {
namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per task: 128 KiB of float32

enum class NormKind { kOne, kTwo, kInf, kPow };

NormKind norm_kind(double p) {
  if (p == 1.0) return NormKind::kOne;
  if (p == 2.0) return NormKind::kTwo;
  if (std::isinf(p)) return NormKind::kInf;
  return NormKind::kPow;
}

// Partial of one chunk: the sum of |x|^p, or for p = inf the maximum of |x| (NaN when the chunk holds
// a NaN). Runs of kRun elements are summed in A (float for float32 and the 16-bit types, double for
// float64), and the runs are added up in double, which keeps float32 sums accurate.
constexpr int64_t kRun = 1024;

template <typename V>
VGK_INLINE V magnitude(V v) {
  return v < 0 ? -v : v;  // NaN stays NaN
}

// float32 and float64: explicit vectors (norm_simd.h).
template <typename T>
VGK_INLINE T run_sum(const T* x, int64_t n, NormKind kind, T p) {
  switch (kind) {
    case NormKind::kOne:
      return simd::sums<T, 1>(n, [&](auto ops, int64_t i) VGK_STEP {
        using O = decltype(ops);
        return std::array<typename O::V, 1>{magnitude(O::load(x + i))};
      })[0];
    case NormKind::kTwo:
      return simd::sums<T, 1>(n, [&](auto ops, int64_t i) VGK_STEP {
        using O = decltype(ops);
        const auto v = O::load(x + i);
        return std::array<typename O::V, 1>{v * v};
      })[0];
    default: {
      T acc = 0;
      for (int64_t i = 0; i < n; ++i) acc += std::pow(std::abs(x[i]), p);
      return acc;
    }
  }
}

// The 16-bit types: element by element through float.
template <typename T>
VGK_INLINE float run_sum_16(const T* x, int64_t n, NormKind kind, float p) {
  float acc = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::abs(static_cast<float>(x[i]));
    acc += kind == NormKind::kOne ? v : kind == NormKind::kTwo ? v * v : std::pow(v, p);
  }
  return acc;
}

// max |x| over the chunk; a NaN, once met, sticks (a plain max would drop it).
template <typename T>
VGK_INLINE T chunk_max(const T* x, int64_t n) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    simd::Vec<T> vm = {};
    T sm = 0;
    simd::for_each<T>(n, [&](auto ops, int64_t i) VGK_STEP {
      using O = decltype(ops);
      const auto v = magnitude(O::load(x + i));
      if constexpr (std::is_same_v<O, simd::VecOps<T>>) {
        vm = ((v > vm) | (v != v)) ? v : vm;
      } else {
        sm = (v > sm || v != v) ? v : sm;
      }
    });
    for (int j = 0; j < simd::kLanes<T>; ++j) sm = (vm[j] > sm || vm[j] != vm[j]) ? vm[j] : sm;
    return sm;
  } else {
    float m = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float v = std::abs(static_cast<float>(x[i]));
      m = (v > m || v != v) ? v : m;
    }
    return static_cast<T>(m);
  }
}

template <typename T, typename A>
VGK_INLINE double chunk_partial(const T* x, int64_t n, NormKind kind, A p) {
  if (kind == NormKind::kInf) return static_cast<double>(static_cast<A>(chunk_max<T>(x, n)));
  double total = 0;
  for (int64_t b = 0; b < n; b += kRun) {
    const int64_t len = std::min(kRun, n - b);
    if constexpr (std::is_same_v<T, A>) {
      total += run_sum<T>(x + b, len, kind, p);
    } else {
      total += run_sum_16<T>(x + b, len, kind, p);
    }
  }
  return total;
}

#define VGK_CHUNK_PARTIAL(T, A, NAME)                                             \
  VGK_SIMD_CLONES double NAME(const T* x, int64_t n, NormKind kind, A p) { \
    return chunk_partial<T, A>(x, n, kind, p);                                \
  }
VGK_CHUNK_PARTIAL(float, float, chunk_partial_float)
VGK_CHUNK_PARTIAL(double, double, chunk_partial_double)
VGK_CHUNK_PARTIAL(at::Half, float, chunk_partial_half)
VGK_CHUNK_PARTIAL(at::BFloat16, float, chunk_partial_bfloat16)
#undef VGK_CHUNK_PARTIAL

double dispatch_partial(const float* x, int64_t n, NormKind k, float p) { return chunk_partial_float(x, n, k, p); }
double dispatch_partial(const double* x, int64_t n, NormKind k, double p) {
  return chunk_partial_double(x, n, k, p);
}
double dispatch_partial(const at::Half* x, int64_t n, NormKind k, float p) {
  return chunk_partial_half(x, n, k, p);
}
double dispatch_partial(const at::BFloat16* x, int64_t n, NormKind k, float p) {
  return chunk_partial_bfloat16(x, n, k, p);
}

template <typename T, typename A>
VGK_INLINE void scale_chunk(T* x, int64_t n, A s) {
  if constexpr (std::is_same_v<T, A>) {
    simd::for_each<T>(n, [&](auto ops, int64_t i) VGK_STEP {
      using O = decltype(ops);
      O::store(x + i, O::load(x + i) * s);
    });
  } else {
    for (int64_t i = 0; i < n; ++i) x[i] = static_cast<T>(static_cast<A>(x[i]) * s);
  }
}

#define VGK_SCALE_CHUNK(T, A, NAME) \
  VGK_SIMD_CLONES void NAME(T* x, int64_t n, A s) { scale_chunk<T, A>(x, n, s); }
VGK_SCALE_CHUNK(float, float, scale_chunk_float)
VGK_SCALE_CHUNK(double, double, scale_chunk_double)
VGK_SCALE_CHUNK(at::Half, float, scale_chunk_half)
VGK_SCALE_CHUNK(at::BFloat16, float, scale_chunk_bfloat16)
#undef VGK_SCALE_CHUNK

void dispatch_scale(float* x, int64_t n, float s) { scale_chunk_float(x, n, s); }
void dispatch_scale(double* x, int64_t n, double s) { scale_chunk_double(x, n, s); }
void dispatch_scale(at::Half* x, int64_t n, float s) { scale_chunk_half(x, n, s); }
void dispatch_scale(at::BFloat16* x, int64_t n, float s) { scale_chunk_bfloat16(x, n, s); }

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t b = 0; b < numels[t]; b += kChunk) {
      chunks.push_back({static_cast<int64_t>(t), b, std::min(numels[t], b + kChunk)});
    }
  }
  return chunks;
}

void check_group(at::TensorList tensors, const char* op) {
  TORCH_CHECK(!tensors.empty(), "vgk::", op, ": tensors must hold at least one tensor, got an empty list");
  const auto dtype = tensors[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "vgk::", op, ": tensors must be float32, float64, float16 or bfloat16, got ", dtype);
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].scalar_type() == dtype && tensors[i].device().is_cpu(), "vgk::", op,
                ": every tensor must be a CPU tensor of dtype ", dtype, " (one group); tensors[", i,
                "] is ", tensors[i].scalar_type(), " on ", tensors[i].device());
  }
}

// The p-norm of all elements of all tensors (one dtype, CPU), as a 0-dim tensor of that dtype.
at::Tensor multi_tensor_norm_cpu(at::TensorList tensors, double norm_type) {
  check_group(tensors, "multi_tensor_norm");
  TORCH_CHECK(norm_type > 0, "vgk::multi_tensor_norm: norm_type must be > 0 (or inf), got ", norm_type);
  const NormKind kind = norm_kind(norm_type);
  std::vector<at::Tensor> data;
  std::vector<int64_t> numels;
  data.reserve(tensors.size());
  numels.reserve(tensors.size());
  for (const auto& t : tensors) {
    TORCH_CHECK(kind != NormKind::kInf || t.numel() > 0, "vgk::multi_tensor_norm: norm_type=inf: the infinity "
                "norm of an empty tensor is undefined (the maximum has no identity), got a tensor of shape ",
                t.sizes());
    data.push_back(t.contiguous());
    numels.push_back(t.numel());
  }
  const std::vector<Chunk> chunks = make_chunks(numels);
  const auto dtype = tensors[0].scalar_type();
  at::Tensor out = at::empty({}, tensors[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "vgk_multi_tensor_norm", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    std::vector<const scalar_t*> ptrs;
    for (const auto& t : data) ptrs.push_back(t.const_data_ptr<scalar_t>());
    std::vector<double> partial(chunks.size(), 0.0);
    const acc_t p = static_cast<acc_t>(norm_type);
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const Chunk& ch = chunks[c];
        partial[c] = dispatch_partial(ptrs[ch.tensor] + ch.begin, ch.end - ch.begin, kind, p);
      }
    });
    double total = 0.0;
    if (kind == NormKind::kInf) {
      for (double v : partial) total = (std::isnan(v) || v > total) ? v : total;  // NaN sticks
    } else {
      for (double v : partial) total += v;
      if (kind == NormKind::kTwo) total = std::sqrt(total);
      else if (kind == NormKind::kPow) total = std::pow(total, 1.0 / norm_type);
    }
    out.fill_(total);
  });
  return out;
}

// In place: every tensor *= scale (a 0-dim tensor, read as the tensors' compute type).
void multi_tensor_scale_cpu(at::TensorList tensors, const at::Tensor& scale) {
  if (tensors.empty()) return;
  check_group(tensors, "multi_tensor_scale_");
  TORCH_CHECK(scale.numel() == 1 && scale.device().is_cpu(), "vgk::multi_tensor_scale_: scale must be a "
              "one-element CPU tensor, got shape ", scale.sizes(), " on ", scale.device());
  std::vector<int64_t> numels;
  for (const auto& t : tensors) {
    // Strided tensors are rare for gradients; they take ATen's path.
    numels.push_back(t.is_contiguous() ? t.numel() : 0);
    if (!t.is_contiguous()) t.mul_(scale);
  }
  const std::vector<Chunk> chunks = make_chunks(numels);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "vgk_multi_tensor_scale_",
                                  [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t s = scale.item<acc_t>();
    std::vector<scalar_t*> ptrs;
    for (const auto& t : tensors) ptrs.push_back(t.is_contiguous() ? t.mutable_data_ptr<scalar_t>() : nullptr);
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const Chunk& ch = chunks[c];
        dispatch_scale(ptrs[ch.tensor] + ch.begin, ch.end - ch.begin, s);
      }
    });
  });
}

}  // namespace

void define_clip_grad_ops(torch::Library& m) {
  // See vgkernels/ops/clip_grad.py. Both take one (device, dtype) group of tensors.
  m.def("multi_tensor_norm(Tensor[] tensors, float norm_type) -> Tensor");
  m.def("multi_tensor_scale_(Tensor(a!)[] tensors, Tensor scale) -> ()");
}

TORCH_LIBRARY_IMPL(vgk, CPU, m) {
  m.impl("multi_tensor_norm", &multi_tensor_norm_cpu);
  m.impl("multi_tensor_scale_", &multi_tensor_scale_cpu);
}

}  // namespace vgk
