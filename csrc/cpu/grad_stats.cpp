// Fused gradient statistics over a list of tensors: per tensor, the sum of squares and a histogram of
// log10|g| (columns: zero, underflow, `bins` equal bins over [log10_min, log10_max], overflow, NaN), in
// one pass over the data. The column layout is documented in vgkernels/reference/grad_stats.py.
//
// The work is split into fixed chunks of one tensor each; every chunk writes its own partial results
// and the partials are summed per tensor in chunk order, so the result does not depend on the number
// of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "ops.h"

namespace vgk {
namespace {

constexpr int64_t kChunk = int64_t(1) << 15;
constexpr double kLog10Of2 = 0.30102999566398119521;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

struct Bins {
  double lo, hi, per_unit;  // per_unit = bins / (hi - lo)
  int64_t bins;
};

// Adds chunk [begin, end) of `data` to `sumsq` and to the histogram row `counts`.
template <typename scalar_t, typename compute_t>
void chunk_stats(const scalar_t* data, int64_t begin, int64_t end, compute_t scale, const Bins& b,
                 double& sumsq, int64_t* counts) {
  const compute_t lo = static_cast<compute_t>(b.lo);
  const compute_t hi = static_cast<compute_t>(b.hi);
  const compute_t per_unit = static_cast<compute_t>(b.per_unit);
  const int64_t overflow = b.bins + 2, nan = b.bins + 3;
  double acc = 0.0;
  for (int64_t k = begin; k < end; ++k) {
    const compute_t x = static_cast<compute_t>(data[k]) * scale;
    acc += static_cast<double>(x) * static_cast<double>(x);
    const compute_t a = std::abs(x);
    if (a == compute_t(0)) {
      ++counts[0];
    } else if (std::isnan(a)) {
      ++counts[nan];
    } else {
      // log2 then a product: glibc's log2 is several times faster than its log10
      const compute_t l = std::log2(a) * static_cast<compute_t>(kLog10Of2);
      if (l < lo) {
        ++counts[1];
      } else if (l > hi) {
        ++counts[overflow];
      } else {
        int64_t bin = static_cast<int64_t>((l - lo) * per_unit);
        bin = bin < b.bins ? bin : b.bins - 1;  // l == hi belongs to the last bin, as in torch.histc
        ++counts[2 + bin];
      }
    }
  }
  sumsq += acc;
}

std::tuple<at::Tensor, at::Tensor> grad_stats_cpu(at::TensorList tensors,
                                                   const std::optional<at::Tensor>& inv_scale,
                                                   double log10_min, double log10_max, int64_t bins) {
  TORCH_CHECK(bins >= 1, "grad_stats: bins must be >= 1, got ", bins);
  TORCH_CHECK(log10_min < log10_max, "grad_stats: expected log10_min < log10_max, got ", log10_min,
              " and ", log10_max);
  const int64_t n = static_cast<int64_t>(tensors.size());
  const int64_t ncol = bins + 4;
  double scale = 1.0;
  if (inv_scale.has_value()) {
    const at::Tensor& s = *inv_scale;
    TORCH_CHECK(s.device().is_cpu() && s.numel() == 1 && at::isFloatingType(s.scalar_type()),
                "grad_stats: inv_scale must be a one-element floating tensor on the CPU, got shape ",
                s.sizes(), ", dtype ", s.scalar_type(), ", device ", s.device());
    scale = s.to(at::kDouble).item<double>();  // a CPU tensor: no device synchronisation
  }

  std::vector<at::Tensor> data;
  std::vector<Chunk> chunks;
  std::vector<int64_t> first_chunk(n + 1, 0);
  data.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu(), "grad_stats: tensors[", i, "] must be on the CPU, got ", t.device());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), "grad_stats: tensors[", i,
                "] must be floating point, got dtype ", t.scalar_type());
    data.push_back(t.contiguous());
    first_chunk[i] = static_cast<int64_t>(chunks.size());
    for (int64_t begin = 0; begin < t.numel(); begin += kChunk) {
      chunks.push_back({i, begin, std::min(begin + kChunk, t.numel())});
    }
  }
  first_chunk[n] = static_cast<int64_t>(chunks.size());

  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  std::vector<double> part_sumsq(nchunks, 0.0);
  std::vector<int64_t> part_counts(nchunks * ncol, 0);
  const Bins b{log10_min, log10_max, static_cast<double>(bins) / (log10_max - log10_min), bins};

  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& ch = chunks[c];
      const at::Tensor& t = data[ch.tensor];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "grad_stats_cpu", [&] {
        using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        chunk_stats<scalar_t, compute_t>(t.const_data_ptr<scalar_t>(), ch.begin, ch.end,
                                         static_cast<compute_t>(scale), b, part_sumsq[c],
                                         part_counts.data() + c * ncol);
      });
    }
  });

  at::Tensor sumsq = at::zeros({n}, at::TensorOptions().dtype(at::kDouble));
  at::Tensor hist = at::zeros({n, ncol}, at::TensorOptions().dtype(at::kLong));
  double* sumsq_out = sumsq.data_ptr<double>();
  int64_t* hist_out = hist.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = first_chunk[i]; c < first_chunk[i + 1]; ++c) {
      sumsq_out[i] += part_sumsq[c];
      for (int64_t j = 0; j < ncol; ++j) hist_out[i * ncol + j] += part_counts[c * ncol + j];
    }
  }
  return {sumsq, hist};
}

}  // namespace

void define_grad_stats_ops(torch::Library& m) {
  m.def("grad_stats(Tensor[] tensors, Tensor? inv_scale, float log10_min, float log10_max, int bins) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vgk, CPU, m) {
  m.impl("grad_stats", &grad_stats_cpu);
}

}  // namespace vgk
