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
#include <ATen/native/CPUBlas.h>

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

// C[M, N] (+)= A[M, K] op(W) for a fixed W, on one thread's own rows inside a parallel region (the
// BLAS runs single-threaded there). For float, oneDNN's brgemm micro-kernel through ATen where this
// torch has it: on the skinny per-step shapes it runs 20-40% faster than the BLAS, and ATen falls
// back to the BLAS on CPUs without AVX2.
template <typename T>
class RowsGemm {
 public:
  // op(W) = W^T (W stored [N, K]) when trans_w, else W (stored [K, N]); w contiguous, kept alive.
  RowsGemm(const at::Tensor& w, bool trans_w)
      : trans_w_(trans_w), N_(trans_w ? w.size(0) : w.size(1)), K_(trans_w ? w.size(1) : w.size(0)), rhs_(w) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
    if constexpr (std::is_same_v<T, float>) {
      if (use_brgemm()) {
        // brgemm takes B row-major [K, N]: transpose W once per call of the op.
        if (trans_w) rhs_ = w.t().contiguous();
        brgemm_ = true;
      }
    }
#endif
  }

  void run(int64_t M, const T* A, int64_t lda, bool accumulate, T* C, int64_t ldc) const {
    const T* b = rhs_.const_data_ptr<T>();
#ifdef CPUBLAS_BRGEMM_F32F32F32
    if constexpr (std::is_same_v<T, float>) {
      if (brgemm_) {
        at::native::cpublas::brgemm(M, N_, K_, lda, N_, ldc, accumulate, A, b, C, false);
        return;
      }
    }
#endif
    gemm<T>(false, trans_w_, M, N_, K_, A, lda, b, trans_w_ ? K_ : N_, accumulate ? T(1) : T(0), C, ldc);
  }

 private:
  bool trans_w_;
  int64_t N_, K_;
  at::Tensor rhs_;
  bool brgemm_ = false;
};

}  // namespace vgk::rnn
