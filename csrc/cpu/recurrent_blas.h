// Row-major GEMMs on raw pointers for the recurrent time loops: no Tensor objects per step.
//
// gemm: C[M, N] = op(A) op(B) + beta C, where op(A) is A ([M, K]) or A^T (A stored [K, M]).
// StepGemm: the per-step product with a fixed weight matrix, C[M, N] = A[M, K] op(W) + beta C.
// RowsGemm: the same product for one thread's rows, called inside a parallel region.
// The BLAS that torch itself calls for CPU matmuls (MKL in the x86 wheels) is used directly when
// libtorch exports it; otherwise, or with VGK_CPU_BLAS=aten, the product goes through
// at::addmm_out on views. RowsGemm prefers oneDNN's brgemm micro-kernel for float (VGK_CPU_BLAS=blas
// turns that off).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

// The Fortran BLAS GEMMs, if the loaded libtorch exports them (weak: absent means nullptr).
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace vgk::rnn {

template <typename T>
using FortranGemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*,
                             const int*, const T*, const int*, const T*, T*, const int*);

template <typename T>
inline FortranGemm<T> fortran_gemm();
template <>
inline FortranGemm<float> fortran_gemm<float>() {
  return sgemm_;
}
template <>
inline FortranGemm<double> fortran_gemm<double>() {
  return dgemm_;
}

inline bool use_fortran_blas() {
  static const bool ok = [] {
    const char* env = std::getenv("VGK_CPU_BLAS");
    return env == nullptr || std::string(env) != "aten";
  }();
  return ok;
}

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const FortranGemm<T> fortran = fortran_gemm<T>();
  if (fortran != nullptr && use_fortran_blas() && K > 0) {
    // Column-major BLAS: compute C^T = op(B)^T op(A)^T on the same memory.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const T one = 1;
    fortran(&ta, &tb, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld) {
    return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, opts);
  };
  const at::Tensor a = trans_a ? view(A, K, M, lda).t() : view(A, M, K, lda);
  const at::Tensor b = trans_b ? view(B, N, K, ldb).t() : view(B, K, N, ldb);
  at::Tensor c = view(C, M, N, ldc);
  at::addmm_out(c, c, a, b, beta, 1);
}

// C[M, N] = A[M, K] op(W) + beta C with op(W) = W^T (W stored [N, K]) when trans_w, else W ([K, N]).
template <typename T>
struct StepGemm {
  const T* w;
  bool trans_w;
  int64_t M, N, K;
  StepGemm(const T* w_, bool trans_w_, int64_t M_, int64_t N_, int64_t K_)
      : w(w_), trans_w(trans_w_), M(M_), N(N_), K(K_) {}
  void run(const T* A, int64_t lda, T beta, T* C, int64_t ldc) const {
    gemm<T>(false, trans_w, M, N, K, A, lda, w, trans_w ? K : N, beta, C, ldc);
  }
};

inline bool use_brgemm() {
  static const bool ok = [] {
    const char* env = std::getenv("VGK_CPU_BLAS");
    return env == nullptr || (std::string(env) != "aten" && std::string(env) != "blas");
  }();
  return ok;
}

// Whether the GEMMs of dtype T go to oneDNN's brgemm micro-kernel (float, where this torch has it).
template <typename T>
inline bool brgemm_enabled() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  return std::is_same_v<T, float> && use_brgemm();
#else
  return false;
#endif
}

inline void brgemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                       bool accumulate, float* C, int64_t ldc) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, false);
#else
  TORCH_CHECK(false, "vgk: brgemm is not available in this build of torch");
#endif
}

// Row-major C[M, N] = A[M, K] B[K, N] with brgemm (float only: check brgemm_enabled<float>()), for
// the large GEMMs after the time loops: C is cut into tiles over the threads, and each thread runs
// through K in chunks that keep its A and B panels in cache. 15% faster than the BLAS here.
inline void tiled_brgemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                         int64_t ldb, float* C, int64_t ldc) {
  constexpr int64_t kTileM = 256, kTileN = 128, kChunkK = 256;
  const int64_t tiles_m = (M + kTileM - 1) / kTileM, tiles_n = (N + kTileN - 1) / kTileN;
  at::parallel_for(0, tiles_m * tiles_n, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t k0 = 0; k0 < K; k0 += kChunkK) {
      const int64_t kc = std::min(kChunkK, K - k0);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m0 = (t / tiles_n) * kTileM, n0 = (t % tiles_n) * kTileN;
        brgemm_f32(std::min(kTileM, M - m0), std::min(kTileN, N - n0), kc, A + m0 * lda + k0, lda,
                   B + k0 * ldb + n0, ldb, k0 > 0, C + m0 * ldc + n0, ldc);
      }
    }
  });
}

// C[M, N] (+)= A[M, K] op(W) for a fixed W, on one thread's own rows inside a parallel region (the
// BLAS runs single-threaded there). For float, oneDNN's brgemm micro-kernel through ATen where this
// torch has it: on the skinny per-step shapes it runs 20-40% faster than the BLAS, and ATen falls
// back to the BLAS on CPUs without AVX2.
template <typename T>
class RowsGemm {
 public:
  // op(W) = W^T (W stored [N, K]) when trans_w, else W (stored [K, N]); w contiguous, kept alive.
  // allow_brgemm = false keeps the BLAS on W as it is: for callers with too few rows to repay the copy.
  RowsGemm(const at::Tensor& w, bool trans_w, bool allow_brgemm = true)
      : trans_w_(trans_w), N_(trans_w ? w.size(0) : w.size(1)), K_(trans_w ? w.size(1) : w.size(0)), rhs_(w) {
    if (allow_brgemm && brgemm_enabled<T>()) {
      // brgemm takes B row-major [K, N]: transpose W once per call of the op.
      if (trans_w) rhs_ = w.t().contiguous();
      brgemm_ = true;
    }
  }

  void run(int64_t M, const T* A, int64_t lda, bool accumulate, T* C, int64_t ldc) const {
    const T* b = rhs_.const_data_ptr<T>();
    if constexpr (std::is_same_v<T, float>) {
      if (brgemm_) {
        brgemm_f32(M, N_, K_, A, lda, b, N_, accumulate, C, ldc);
        return;
      }
    }
    gemm<T>(false, trans_w_, M, N_, K_, A, lda, b, trans_w_ ? K_ : N_, accumulate ? T(1) : T(0), C, ldc);
  }

 private:
  bool trans_w_;
  int64_t N_, K_;
  at::Tensor rhs_;
  bool brgemm_ = false;
};

}  // namespace vgk::rnn
