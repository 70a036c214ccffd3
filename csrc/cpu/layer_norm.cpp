// Fused LayerNorm over the trailing dimensions of a CPU tensor, with an optional per-row L2 clip of the
// input gradient. Rows are independent and run in parallel; each row is read from memory once per pass
// (its further sweeps hit the L1/L2 cache). The weight and bias gradients are summed into per-block
// partial buffers whose block layout depends on the row count only, then reduced in a fixed order, so
// they are deterministic. The output and the input gradient come from the cache of freed blocks
// (block_cache.h), so a training loop does not fault their pages in again on every call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/block_cache.h"
#include "cpu/norm_simd.h"
#include "ops.h"

namespace vgk {
namespace {

// Leading (row) count and row length for `normalized_ndim` trailing dimensions.
std::pair<int64_t, int64_t> rows_and_cols(const at::Tensor& input, int64_t normalized_ndim) {
  TORCH_CHECK(normalized_ndim >= 1 && normalized_ndim <= input.dim(),
              "vgk::layer_norm: normalized_ndim must be in [1, input.dim()=", input.dim(), "], got ",
              normalized_ndim);
  int64_t n = 1;
  for (int64_t d = input.dim() - normalized_ndim; d < input.dim(); ++d) n *= input.size(d);
  TORCH_CHECK(n > 0, "vgk::layer_norm: the normalized dimensions must not be empty, got input shape ",
              input.sizes());
  return {input.numel() / n, n};
}

void check_input(const at::Tensor& input, const char* name) {
  TORCH_CHECK(input.device().is_cpu(), "vgk::layer_norm (cpp): ", name, " must be a CPU tensor, got ",
              input.device());
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "vgk::layer_norm (cpp): ", name, " must be float32 or float64, got ", input.scalar_type());
}

void check_param(const std::optional<at::Tensor>& p, const char* name, const at::Tensor& input, int64_t n) {
  if (!p.has_value()) return;
  TORCH_CHECK(p->scalar_type() == input.scalar_type() && p->device() == input.device(),
              "vgk::layer_norm (cpp): ", name, " must be ", input.scalar_type(), " on ", input.device(),
              " like the input, got ", p->scalar_type(), " on ", p->device());
  TORCH_CHECK(p->numel() == n, "vgk::layer_norm (cpp): ", name, " must have ", n, " elements, got shape ",
              p->sizes());
}

std::vector<int64_t> leading_shape(const at::Tensor& input, int64_t normalized_ndim) {
  auto sizes = input.sizes();
  return std::vector<int64_t>(sizes.begin(), sizes.end() - normalized_ndim);
}

// ---------------------------------------------------------------------------------------------------
// Rows whose float32 squares overflow. A float beyond ~1.8e19 has no float square, so the variance of a
// row with such values (or of long rows a little below) is inf, and the output would be the bias. The
// fast float passes detect it (a sum of squares that is not finite) and hand the row to these scalar
// double versions, in which every finite float's square is finite. Such rows are rare; NaN and inf
// rows take this path too, with the same NaN result.

// Mean and variance of a float row, two passes in double.
void moments_double(const float* x, int64_t n, double& mean, double& var) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += x[i];
  mean = s / static_cast<double>(n);
  double sq = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = x[i] - mean;
    sq += d * d;
  }
  var = sq / static_cast<double>(n);
}

void forward_row_double(const float* x, float* y, const float* w, const float* b, int64_t n, float eps,
                        float* mean_out, float* rstd_out) {
  double mean, var;
  moments_double(x, n, mean, var);
  const double rstd = 1.0 / std::sqrt(var + eps);
  for (int64_t i = 0; i < n; ++i) {
    double v = (x[i] - mean) * rstd;
    if (w) v *= w[i];
    if (b) v += b[i];
    y[i] = static_cast<float>(v);
  }
  *mean_out = static_cast<float>(mean);
  *rstd_out = static_cast<float>(rstd);
}

// ---------------------------------------------------------------------------------------------------
// Forward

template <typename T, bool W, bool B>
VGK_INLINE void forward_row(const T* x, T* y, const T* w, const T* b, int64_t n, T eps, T* mean_out,
                            T* rstd_out) {
  const T sum = simd::sums<T, 1>(n, [&](auto ops, int64_t i) VGK_STEP {
    using O = decltype(ops);
    return std::array<typename O::V, 1>{O::load(x + i)};
  })[0];
  const T mean = sum / static_cast<T>(n);
  // Centred second pass: the row is in cache, and it avoids the cancellation of E[x^2] - E[x]^2.
  const T sq = simd::sums<T, 1>(n, [&](auto ops, int64_t i) VGK_STEP {
    using O = decltype(ops);
    const auto d = O::load(x + i) - mean;
    return std::array<typename O::V, 1>{d * d};
  })[0];
  if constexpr (std::is_same_v<T, float>) {
    if (!(sq <= std::numeric_limits<float>::max())) {
      return forward_row_double(x, y, W ? w : nullptr, B ? b : nullptr, n, eps, mean_out, rstd_out);
    }
  }
  const T rstd = T(1) / std::sqrt(sq / static_cast<T>(n) + eps);
  const bool stream = simd::streamable(y, n);
  simd::for_each<T>(n, [&](auto ops, int64_t i) VGK_STEP {
    using O = decltype(ops);
    auto v = (O::load(x + i) - mean) * rstd;
    if constexpr (W) v = v * O::load(w + i);
    if constexpr (B) v = v + O::load(b + i);
    if (stream) {
      O::stream(y + i, v);
    } else {
      O::store(y + i, v);
    }
  });
  *mean_out = mean;
  *rstd_out = rstd;
}

template <typename T, bool W, bool B>
VGK_INLINE void forward_rows(const T* x, T* y, const T* w, const T* b, int64_t rows, int64_t n, T eps,
                             T* mean, T* rstd) {
  for (int64_t r = 0; r < rows; ++r) {
    forward_row<T, W, B>(x + r * n, y + r * n, w, b, n, eps, mean + r, rstd + r);
  }
}

#define VGK_FORWARD_ROWS(T)                                                                            \
  VGK_SIMD_CLONES void forward_rows_##T(const T* x, T* y, const T* w, const T* b, int64_t rows,        \
                                        int64_t n, T eps, T* mean, T* rstd) {                          \
    if (w && b) return forward_rows<T, true, true>(x, y, w, b, rows, n, eps, mean, rstd);              \
    if (w) return forward_rows<T, true, false>(x, y, w, b, rows, n, eps, mean, rstd);                  \
    if (b) return forward_rows<T, false, true>(x, y, w, b, rows, n, eps, mean, rstd);                  \
    return forward_rows<T, false, false>(x, y, w, b, rows, n, eps, mean, rstd);                        \
  }
VGK_FORWARD_ROWS(float)
VGK_FORWARD_ROWS(double)
#undef VGK_FORWARD_ROWS

void forward_rows_dispatch(const float* x, float* y, const float* w, const float* b, int64_t rows,
                           int64_t n, float eps, float* mean, float* rstd) {
  forward_rows_float(x, y, w, b, rows, n, eps, mean, rstd);
}
void forward_rows_dispatch(const double* x, double* y, const double* w, const double* b, int64_t rows,
                           int64_t n, double eps, double* mean, double* rstd) {
  forward_rows_double(x, y, w, b, rows, n, eps, mean, rstd);
}

// Rows per parallel task: enough elements per task to amortise the scheduling.
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / n); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_cpu(
    const at::Tensor& input_, const std::optional<at::Tensor>& weight_, const std::optional<at::Tensor>& bias_,
    int64_t normalized_ndim, double eps, std::optional<double> grad_clip) {
  check_input(input_, "input");
  auto [m, n] = rows_and_cols(input_, normalized_ndim);
  check_param(weight_, "weight", input_, n);
  check_param(bias_, "bias", input_, n);
  TORCH_CHECK(eps >= 0, "vgk::layer_norm: eps must be >= 0, got ", eps);
  const at::Tensor input = input_.contiguous();
  const at::Tensor weight = weight_.has_value() ? weight_->contiguous() : at::Tensor();
  const at::Tensor bias = bias_.has_value() ? bias_->contiguous() : at::Tensor();
  at::Tensor output = cached_empty(input.sizes(), input.options());
  const auto stat_shape = leading_shape(input, normalized_ndim);
  at::Tensor mean = at::empty(stat_shape, input.options());
  at::Tensor rstd = at::empty(stat_shape, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "vgk_layer_norm_forward", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* y = output.mutable_data_ptr<scalar_t>();
    const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* mu = mean.mutable_data_ptr<scalar_t>();
    scalar_t* rs = rstd.mutable_data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    at::parallel_for(0, m, row_grain(n), [&](int64_t r0, int64_t r1) {
      // Blocks of ~256 KB in descending order: the input was most likely produced by an ascending
      // sweep, so its last rows are the ones still in the last-level cache, and an ascending sweep
      // would evict them before reaching them. Rows within a block stay ascending for the prefetcher.
      const int64_t step = std::max<int64_t>(1, (256 << 10) / (n * int64_t(sizeof(scalar_t))));
      for (int64_t hi = r1; hi > r0; hi -= step) {
        const int64_t lo = std::max(r0, hi - step);
        forward_rows_dispatch(x + lo * n, y + lo * n, w, b, hi - lo, n, e, mu + lo, rs + lo);
      }
      _mm_sfence();  // the rows' non-temporal stores are visible before the output is used
    });
  });
  return {output, mean, rstd};
}

// ---------------------------------------------------------------------------------------------------
// Backward

// With xh = (x - mean) * rstd and g = dy * w:  dx = rstd * (g - mean(g) - xh * mean(g * xh)).
// Then the row of dx is rescaled to L2 norm `clip` when it is longer (clip < 0: off).
// next_dy/next_x: the next row, fetched into the cache while this row's dx is computed from the cache
// (nullptr: none). The hardware prefetchers stop at 4 KB page boundaries, so the memory would otherwise
// idle during that pass; in randomized A/B runs at (4096, 1024) the backward got 5-24% faster.
// The backward of a row that took forward_row_double (or whose float std is beyond 2^60 anyway): in
// double, from the row's double mean; rstd is the stored one unless it is subnormal (std beyond ~8e37),
// where the double one is recomputed (eps, not known here, is negligible against such a variance).
template <bool W, bool DW, bool DB>
void backward_row_double(const float* dy, const float* x, const float* w, float rstd_f, int64_t n, float clip,
                         float* dx, float* dw_acc, float* db_acc) {
  double mean, var;
  moments_double(x, n, mean, var);
  const double rstd = rstd_f >= std::numeric_limits<float>::min() ? rstd_f : 1.0 / std::sqrt(var);
  double sum_g = 0, sum_gx = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double xh = (x[i] - mean) * rstd;
    const double g = W ? double(dy[i]) * w[i] : double(dy[i]);
    sum_g += g;
    sum_gx += g * xh;
    if constexpr (DW) dw_acc[i] += static_cast<float>(dy[i] * xh);
    if constexpr (DB) db_acc[i] += dy[i];
  }
  const double a = sum_g / static_cast<double>(n), c = sum_gx / static_cast<double>(n);
  const auto dx_at = [&](int64_t i) {
    const double g = W ? double(dy[i]) * w[i] : double(dy[i]);
    return (g - a - (x[i] - mean) * rstd * c) * rstd;
  };
  double scale = 1;
  if (clip >= 0) {
    double sq = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double d = dx_at(i);
      sq += d * d;
    }
    if (sq > double(clip) * clip) scale = clip / std::sqrt(sq);
  }
  for (int64_t i = 0; i < n; ++i) dx[i] = static_cast<float>(dx_at(i) * scale);
}

template <typename T, bool W, bool DW, bool DB>
VGK_INLINE void backward_row(const T* dy, const T* x, const T* w, T mean, T rstd, int64_t n, T clip, T* dx,
                             T* dw_acc, T* db_acc, const T* next_dy, const T* next_x) {
  if constexpr (std::is_same_v<T, float>) {
    if (rstd < 0x1p-60f) return backward_row_double<W, DW, DB>(dy, x, w, rstd, n, clip, dx, dw_acc, db_acc);
  }
  // One pass for the two row sums and this row's share of dW and db.
  const auto row_sums = simd::sums<T, 2>(n, [&](auto ops, int64_t i) VGK_STEP {
    using O = decltype(ops);
    const auto d = O::load(dy + i);
    const auto xh = (O::load(x + i) - mean) * rstd;
    auto g = d;
    if constexpr (W) g = g * O::load(w + i);
    if constexpr (DW) O::store(dw_acc + i, O::load(dw_acc + i) + d * xh);
    if constexpr (DB) O::store(db_acc + i, O::load(db_acc + i) + d);
    return std::array<typename O::V, 2>{g, g * xh};
  });
  const T a = row_sums[0] / static_cast<T>(n);
  const T c = row_sums[1] / static_cast<T>(n);
  const auto dx_at = [&](auto ops, int64_t i) VGK_STEP {
    using O = decltype(ops);
    const auto xh = (O::load(x + i) - mean) * rstd;
    auto g = O::load(dy + i);
    if constexpr (W) g = g * O::load(w + i);
    return (g - a - xh * c) * rstd;
  };
  // With a bound, the row's norm comes first (a compute-only pass over a row in cache), so that dx is
  // written once, already rescaled.
  T scale = T(1);
  if (clip >= 0) {
    const T sq = simd::sums<T, 1>(n, [&](auto ops, int64_t i) VGK_STEP {
      const auto d = dx_at(ops, i);
      return std::array<decltype(d), 1>{d * d};
    })[0];
    if (sq > clip * clip) scale = clip / std::sqrt(sq);
  }
  const bool stream = simd::streamable(dx, n);
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  simd::for_each<T>(n, [&](auto ops, int64_t i) VGK_STEP {
    using O = decltype(ops);
    if (next_x != nullptr && i % kLine == 0) {
      _mm_prefetch(reinterpret_cast<const char*>(next_x + i), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(next_dy + i), _MM_HINT_T0);
    }
    auto d = dx_at(ops, i);
    if (scale != T(1)) d = d * scale;
    if (stream) {
      O::stream(dx + i, d);
    } else {
      O::store(dx + i, d);
    }
  });
}

template <typename T, bool W, bool DW, bool DB>
VGK_INLINE void backward_rows(const T* dy, const T* x, const T* w, const T* mean, const T* rstd, int64_t rows,
                              int64_t n, T clip, T* dx, T* dw_acc, T* db_acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const bool last = r + 1 == rows;
    backward_row<T, W, DW, DB>(dy + r * n, x + r * n, w, mean[r], rstd[r], n, clip, dx + r * n, dw_acc,
                               db_acc, last ? nullptr : dy + (r + 1) * n, last ? nullptr : x + (r + 1) * n);
  }
}

#define VGK_BACKWARD_ROWS(T)                                                                           \
  VGK_SIMD_CLONES void backward_rows_##T(const T* dy, const T* x, const T* w, const T* mean,            \
                                         const T* rstd, int64_t rows, int64_t n, T clip, T* dx,         \
                                         T* dw_acc, T* db_acc) {                                        \
    const bool dw = dw_acc != nullptr, db = db_acc != nullptr;                                         \
    if (w) {                                                                                           \
      if (dw && db) return backward_rows<T, true, true, true>(dy, x, w, mean, rstd, rows, n, clip, dx, \
                                                              dw_acc, db_acc);                         \
      if (dw) return backward_rows<T, true, true, false>(dy, x, w, mean, rstd, rows, n, clip, dx,      \
                                                         dw_acc, db_acc);                              \
      if (db) return backward_rows<T, true, false, true>(dy, x, w, mean, rstd, rows, n, clip, dx,      \
                                                         dw_acc, db_acc);                              \
      return backward_rows<T, true, false, false>(dy, x, w, mean, rstd, rows, n, clip, dx, dw_acc,     \
                                                  db_acc);                                             \
    }                                                                                                  \
    if (db) return backward_rows<T, false, false, true>(dy, x, w, mean, rstd, rows, n, clip, dx,       \
                                                        dw_acc, db_acc);                               \
    return backward_rows<T, false, false, false>(dy, x, w, mean, rstd, rows, n, clip, dx, dw_acc,      \
                                                 db_acc);                                              \
  }
VGK_BACKWARD_ROWS(float)
VGK_BACKWARD_ROWS(double)
#undef VGK_BACKWARD_ROWS

void backward_rows_dispatch(const float* dy, const float* x, const float* w, const float* mean,
                            const float* rstd, int64_t rows, int64_t n, float clip, float* dx, float* dw_acc,
                            float* db_acc) {
  backward_rows_float(dy, x, w, mean, rstd, rows, n, clip, dx, dw_acc, db_acc);
}
void backward_rows_dispatch(const double* dy, const double* x, const double* w, const double* mean,
                            const double* rstd, int64_t rows, int64_t n, double clip, double* dx,
                            double* dw_acc, double* db_acc) {
  backward_rows_double(dy, x, w, mean, rstd, rows, n, clip, dx, dw_acc, db_acc);
}

// Number of row blocks with their own partial dW/db buffer: at least ~16K elements per block (on
// smaller blocks the partial buffers cost more than the parallelism gains), at most 64. It depends on
// the shape only (up to 64 threads), so the summation order, and hence the result, does not change
// with the thread count.
int64_t partial_blocks(int64_t rows, int64_t n) {
  constexpr int64_t kMinBlockElements = 16384;
  const int64_t threads = at::get_num_threads();
  const int64_t cap = std::min(rows, 64 * ((threads + 63) / 64));
  const int64_t by_size = (rows * n + kMinBlockElements - 1) / kMinBlockElements;
  return std::max<int64_t>(1, std::min(by_size, cap));
}

// out[c] = sum over blocks of part[blk][c], in block order, parallel over columns.
template <typename T>
void sum_blocks(const T* part, int64_t blocks, int64_t n, T* out) {
  at::parallel_for(0, n, 2048, [&](int64_t c0, int64_t c1) {
    std::fill(out + c0, out + c1, T(0));
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const T* row = part + blk * n;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) out[c] += row[c];
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& mean_, const at::Tensor& rstd_,
    const std::optional<at::Tensor>& weight_, int64_t normalized_ndim, std::optional<double> grad_clip,
    bool weight_grad, bool bias_grad) {
  check_input(input_, "input");
  auto [m, n] = rows_and_cols(input_, normalized_ndim);
  TORCH_CHECK(grad_output_.sizes() == input_.sizes(), "vgk::layer_norm backward: grad_output must have the "
              "input's shape ", input_.sizes(), ", got ", grad_output_.sizes());
  TORCH_CHECK(grad_output_.scalar_type() == input_.scalar_type(), "vgk::layer_norm backward: grad_output "
              "must be ", input_.scalar_type(), ", got ", grad_output_.scalar_type());
  TORCH_CHECK(mean_.numel() == m && rstd_.numel() == m && mean_.scalar_type() == input_.scalar_type() &&
                  rstd_.scalar_type() == input_.scalar_type(),
              "vgk::layer_norm backward: mean and rstd must hold ", m, " ", input_.scalar_type(),
              " values, got ", mean_.numel(), " ", mean_.scalar_type(), " and ", rstd_.numel(), " ",
              rstd_.scalar_type());
  check_param(weight_, "weight", input_, n);
  TORCH_CHECK(!weight_grad || weight_.has_value(), "vgk::layer_norm backward: weight_grad=true needs a weight, "
              "got weight=None");
  TORCH_CHECK(!grad_clip.has_value() || *grad_clip >= 0, "vgk::layer_norm: grad_clip must be >= 0, got ",
              grad_clip.value_or(0.0));
  const at::Tensor dy = grad_output_.contiguous();
  const at::Tensor input = input_.contiguous();
  const at::Tensor mean = mean_.contiguous();
  const at::Tensor rstd = rstd_.contiguous();
  const at::Tensor weight = weight_.has_value() ? weight_->contiguous() : at::Tensor();
  at::Tensor grad_input = cached_empty(input.sizes(), input.options());
  const int64_t blocks = partial_blocks(m, n);
  const int64_t rows_per_block = m > 0 ? (m + blocks - 1) / blocks : 0;
  // [blocks, n] partial sums; each block zeroes and fills its own row.
  at::Tensor dw_part = weight_grad ? at::empty({blocks, n}, input.options()) : at::Tensor();
  at::Tensor db_part = bias_grad ? at::empty({blocks, n}, input.options()) : at::Tensor();
  at::Tensor grad_weight = at::empty({weight_grad ? n : 0}, input.options());
  at::Tensor grad_bias = at::empty({bias_grad ? n : 0}, input.options());

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "vgk_layer_norm_backward", [&] {
    const scalar_t* g = dy.const_data_ptr<scalar_t>();
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* mu = mean.const_data_ptr<scalar_t>();
    const scalar_t* rs = rstd.const_data_ptr<scalar_t>();
    scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
    scalar_t* dwp = weight_grad ? dw_part.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* dbp = bias_grad ? db_part.mutable_data_ptr<scalar_t>() : nullptr;
    const scalar_t clip = grad_clip.has_value() ? static_cast<scalar_t>(*grad_clip) : scalar_t(-1);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      // Ascending: the forward swept its rows in descending blocks, so the first rows are the ones
      // most likely still in the last-level cache.
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = std::min(m, blk * rows_per_block);
        const int64_t r1 = std::min(m, r0 + rows_per_block);
        scalar_t* dw_acc = dwp ? dwp + blk * n : nullptr;
        scalar_t* db_acc = dbp ? dbp + blk * n : nullptr;
        if (dw_acc) std::fill(dw_acc, dw_acc + n, scalar_t(0));
        if (db_acc) std::fill(db_acc, db_acc + n, scalar_t(0));
        backward_rows_dispatch(g + r0 * n, x + r0 * n, w, mu + r0, rs + r0, r1 - r0, n, clip, dx + r0 * n,
                               dw_acc, db_acc);
      }
      _mm_sfence();  // the rows' non-temporal stores are visible before the gradient is used
    });
    if (weight_grad) sum_blocks(dwp, blocks, n, grad_weight.mutable_data_ptr<scalar_t>());
    if (bias_grad) sum_blocks(dbp, blocks, n, grad_bias.mutable_data_ptr<scalar_t>());
  });
  return {grad_input, grad_weight, grad_bias};
}

// ---------------------------------------------------------------------------------------------------
// Autograd, in C++: through a Python autograd wrapper a forward + backward cost ~90 us more, which made
// small LayerNorms (64 x 512) 2.3x slower than torch's.

using ThreeTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // what both ops return

// The ops through the dispatcher, so that fake, functional and profiling keys see them.
ThreeTensors forward_op(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, int64_t normalized_ndim, double eps,
                         std::optional<double> grad_clip) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vgk::layer_norm_forward", "")
                             .typed<ThreeTensors(const at::Tensor&, const std::optional<at::Tensor>&,
                                                  const std::optional<at::Tensor>&, int64_t, double,
                                                  std::optional<double>)>();
  return op.call(input, weight, bias, normalized_ndim, eps, grad_clip);
}

ThreeTensors backward_op(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
                          const at::Tensor& rstd, const std::optional<at::Tensor>& weight, int64_t normalized_ndim,
                          std::optional<double> grad_clip, bool weight_grad, bool bias_grad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vgk::layer_norm_backward", "")
                             .typed<ThreeTensors(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                                                  std::optional<double>, bool, bool)>();
  return op.call(grad_output, input, mean, rstd, weight, normalized_ndim, grad_clip, weight_grad, bias_grad);
}

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

class LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias, int64_t normalized_ndim,
                                                double eps, std::optional<double> grad_clip) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, mean, rstd] = forward_op(input, weight, bias, normalized_ndim, eps, grad_clip);
    ctx->save_for_backward({input, present(weight) ? *weight : at::Tensor(), mean, rstd});
    ctx->saved_data["normalized_ndim"] = normalized_ndim;
    ctx->saved_data["grad_clip"] = grad_clip.has_value() ? c10::IValue(*grad_clip) : c10::IValue();
    ctx->saved_data["has_bias"] = present(bias);
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);  // mean and rstd get no gradient; no zeros for them
    return {output, mean, rstd};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1], &mean = saved[2], &rstd = saved[3];
    const bool has_weight = weight.defined(), has_bias = ctx->saved_data["has_bias"].toBool();
    // Edges exist for the tensors given: input, then weight and bias when present.
    const bool need_input = ctx->needs_input_grad(0);
    const bool need_weight = has_weight && ctx->needs_input_grad(1);
    const bool need_bias = has_bias && ctx->needs_input_grad(has_weight ? 2 : 1);
    torch::autograd::variable_list out(6);
    if (!grads[0].defined()) return out;  // the output was not used
    const c10::IValue& saved_clip = ctx->saved_data["grad_clip"];
    const auto clip = saved_clip.isNone() ? std::nullopt : std::optional<double>(saved_clip.toDouble());
    const int64_t normalized_ndim = ctx->saved_data["normalized_ndim"].toInt();
    // Without create_graph the backward op runs below autograd: its autograd kernel (an error on
    // double backward, registered from Python) would cost a trip into Python on every call.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
    auto [grad_input, grad_weight, grad_bias] =
        backward_op(grads[0], input, mean, rstd, has_weight ? std::optional<at::Tensor>(weight) : std::nullopt,
                    normalized_ndim, clip, need_weight, need_bias);
    const auto param_shape = input.sizes().slice(input.dim() - normalized_ndim);
    if (need_input) out[0] = grad_input;
    if (need_weight) out[1] = grad_weight.view(param_shape);
    if (need_bias) out[2] = grad_bias.view(param_shape);
    return out;
  }
};

ThreeTensors layer_norm_forward_autograd(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                          const std::optional<at::Tensor>& bias, int64_t normalized_ndim,
                                          double eps, std::optional<double> grad_clip) {
  const auto requires_grad = [](const std::optional<at::Tensor>& t) { return present(t) && t->requires_grad(); };
  if (!at::GradMode::is_enabled() || !(input.requires_grad() || requires_grad(weight) || requires_grad(bias))) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // no graph to record: skip the node
    return forward_op(input, weight, bias, normalized_ndim, eps, grad_clip);
  }
  auto out = LayerNormFunction::apply(input, weight, bias, normalized_ndim, eps, grad_clip);
  return {out[0], out[1], out[2]};
}

}  // namespace

void define_layer_norm_ops(torch::Library& m) {
  // See vgkernels/ops/layer_norm.py. `input` is normalized over its last `normalized_ndim` dimensions;
  // mean and rstd have the leading shape and the input's dtype. grad_clip is only read by the backward
  // (it is an input here so that the autograd context sees it). weight_grad/bias_grad select which
  // parameter gradients the backward computes; a gradient not asked for comes back with 0 elements.
  m.def(
      "layer_norm_forward(Tensor input, Tensor? weight, Tensor? bias, int normalized_ndim, float eps, "
      "float? grad_clip) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, "
      "int normalized_ndim, float? grad_clip, bool weight_grad, bool bias_grad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vgk, CPU, m) {
  m.impl("layer_norm_forward", &layer_norm_forward_cpu);
  m.impl("layer_norm_backward", &layer_norm_backward_cpu);
}

// The backward op's autograd (an error on double backward) is registered from Python.
TORCH_LIBRARY_IMPL(vgk, Autograd, m) {
  m.impl("layer_norm_forward", &layer_norm_forward_autograd);
}

}  // namespace vgk
