// Per-unit Gram entries of W_hh's gate blocks, shared by the plain and layer-normalized cells' exact
// Jacobian norms.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

namespace vgk::rnn {

// Structure of arrays [E, H] in w_hh's dtype, accumulated in double, once per forward (O(G^2 H K) for
// w_hh [G*H, K]; K = H, or the LSTM's proj_size): the upper triangle (a <= b) of <W_a[j, :], W_b[j, :]>
// in row order, then with `diagonals` the diagonal entries W_a[j, j] (the GRU's z and r terms; K = H).
template <typename T>
at::Tensor gram_entries(const at::Tensor& w_hh, int64_t G, int64_t H, bool diagonals) {
  const int64_t E = G * (G + 1) / 2 + (diagonals ? G : 0), K = w_hh.size(1);
  at::Tensor gram = at::empty({E, H}, w_hh.options());
  const T* w = w_hh.const_data_ptr<T>();
  T* out = gram.mutable_data_ptr<T>();
  at::parallel_for(0, H, 1 + 4096 / (E * H), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      int64_t e = 0;
      for (int64_t a = 0; a < G; ++a) {
        for (int64_t b = a; b < G; ++b, ++e) {
          const T* wa = w + (a * H + j) * K;
          const T* wb = w + (b * H + j) * K;
          double acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t k = 0; k < K; ++k) acc += static_cast<double>(wa[k]) * static_cast<double>(wb[k]);
          out[e * H + j] = static_cast<T>(acc);
        }
      }
      if (diagonals) {
        for (int64_t a = 0; a < G; ++a) out[(e + a) * H + j] = w[(a * H + j) * K + j];
      }
    }
  });
  return gram;
}

}  // namespace vgk::rnn
