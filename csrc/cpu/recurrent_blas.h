// Row-major GEMMs on raw pointers for the recurrent time loops: no Tensor objects per step.
//
// gemm: C[M, N] = op(A) op(B) + beta C, where op(A) is A ([M, K]) or A^T (A stored [K, M]).
// StepGemm: the per-step product with a fixed weight matrix, C[M, N] = A[M, K] op(W) + beta C.
// RowsGemm: the same product for one thread's rows, called inside a parallel region.
// TiledGemm: the same product for all rows at once (the input projection of every step), over the
// threads.
// weight_grad: the weight gradients after the time loops, on brgemm tiles or the library GEMM.
//
// Paths (VGK_CPU_BLAS forces one; unset or "auto" chooses):
// - "brgemm": oneDNN's brgemm micro-kernel through ATen (float, CPUs with AVX2);
// - "blas": the Fortran BLAS that torch itself calls for CPU matmuls (MKL in the x86 wheels), when
//   libtorch exports it;
// - "aten": at::addmm_out on views (also where the BLAS is not exported).
// Neither brgemm nor the BLAS is faster on every CPU: the BLAS of the x86 wheels ran the per-step
// shapes at 35-45% of brgemm's speed on a Zen 5 core, and brgemm on AVX2 at half the BLAS's speed
// where its B operand had rows 4 KiB apart (see unaliased_ld). So where both can run, the first call
// with a new shape times both on one core and keeps the faster for the rest of the process. The two
// differ only in rounding.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <time.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "block_cache.h"
#include "cpu_isa.h"

// The Fortran BLAS GEMMs, if the loaded libtorch exports them (weak: absent means nullptr), and MKL's
// per-thread thread count, to time its GEMMs on one core as they run inside a parallel region.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));  // the C interface (the lowercase name is Fortran's)
}

namespace vgk::rnn {

enum class GemmPath : int { kBrgemm, kBlas, kAten };

inline const char* gemm_path_name(GemmPath path) {
  switch (path) {
    case GemmPath::kBrgemm: return "brgemm";
    case GemmPath::kBlas: return "blas";
    case GemmPath::kAten: return "aten";
  }
  return "?";
}

// The path VGK_CPU_BLAS forces, or nullopt (choose). Raises on an unknown value.
inline std::optional<GemmPath> forced_gemm_path() {
  static const std::optional<GemmPath> forced = []() -> std::optional<GemmPath> {
    const char* env = std::getenv("VGK_CPU_BLAS");
    const std::string value = env == nullptr ? "" : env;
    if (value.empty() || value == "auto") return std::nullopt;
    for (GemmPath path : {GemmPath::kBrgemm, GemmPath::kBlas, GemmPath::kAten}) {
      if (value == gemm_path_name(path)) return path;
    }
    TORCH_CHECK_VALUE(false, "vgkernels: VGK_CPU_BLAS must be one of 'auto', 'brgemm', 'blas', 'aten', got '",
                      value, "'");
  }();
  return forced;
}

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

inline bool use_fortran_blas() { return forced_gemm_path() != GemmPath::kAten; }

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

// Whether the GEMMs of dtype T may go to oneDNN's brgemm micro-kernel: float, where this torch has it,
// on AVX2 or better (oneDNN's float brgemm needs AVX2), unless VGK_CPU_BLAS forces another path.
template <typename T>
inline bool brgemm_enabled() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  const auto forced = forced_gemm_path();
  return std::is_same_v<T, float> && cpu_isa_at_least(CpuIsa::kAvx2) &&
         (!forced.has_value() || forced == GemmPath::kBrgemm);
#else
  return false;
#endif
}

// The path of the GEMMs when brgemm is not taken (gemm() below).
inline GemmPath library_gemm_path() {
  return use_fortran_blas() && sgemm_ != nullptr ? GemmPath::kBlas : GemmPath::kAten;
}

inline void brgemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                       bool accumulate, float* C, int64_t ldc) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, false);
#else
  TORCH_CHECK(false, "vgk: brgemm is not available in this build of torch");
#endif
}

// A leading dimension (in elements) for a copy of rows of n elements. Rows a multiple of 512 bytes
// apart fall into at most 8 of the L1 cache's 64 sets, and a micro-kernel running down a column panel
// of such a matrix evicts its own lines: on a Zen 5 core, brgemm's AVX2 kernel ran [16, 256] x
// [256, 1024] at 56 GFLOP/s with rows 4 KiB apart, 108-117 GFLOP/s with one cache line more.
template <typename T>
constexpr int64_t unaliased_ld(int64_t n) {
  return (n * static_cast<int64_t>(sizeof(T))) % 512 == 0 ? n + 64 / static_cast<int64_t>(sizeof(T)) : n;
}

// Seconds of CPU time the calling thread has run: a measurement preempted by other processes still
// counts only its own work.
inline double thread_cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// The best of `rounds` timings of each candidate on the calling thread, alternating between them after
// one untimed call each (which also JIT-compiles brgemm's kernel). The BLAS runs on one thread, as it
// does inside the time loops.
template <typename A, typename B>
std::pair<double, double> time_pair(const A& a, const B& b, int rounds) {
  struct OneMklThread {
    int previous = 0;
    OneMklThread() {
      if (MKL_Set_Num_Threads_Local != nullptr) previous = MKL_Set_Num_Threads_Local(1);
    }
    ~OneMklThread() {
      if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous);
    }
  } one_thread;
  a();
  b();
  double best_a = 1e30, best_b = 1e30;
  for (int r = 0; r < rounds; ++r) {
    double t0 = thread_cpu_seconds();
    a();
    best_a = std::min(best_a, thread_cpu_seconds() - t0);
    t0 = thread_cpu_seconds();
    b();
    best_b = std::min(best_b, thread_cpu_seconds() - t0);
  }
  return {best_a, best_b};
}

// The GEMM paths chosen so far in this process, one per shape, with the timings that chose them.
class GemmChoices {
 public:
  // {kind, rows, N, K, trans}: kind "rows" (RowsGemm, `rows` rows a thread), "tiles" (TiledGemm) or
  // "weight_grad" (rows 0 for the latter two); trans: the weight is stored transposed.
  using Key = std::tuple<std::string, int64_t, int64_t, int64_t, bool>;
  struct Choice {
    GemmPath path;
    double brgemm_seconds, library_seconds;
  };

  static GemmChoices& get() {
    static GemmChoices* choices = new GemmChoices();  // never destroyed, like the kernels' caches
    return *choices;
  }

  // The path for `key`: the one stored, or measure() (-> {brgemm seconds, library seconds}) run once.
  template <typename Measure>
  GemmPath choose(const Key& key, const Measure& measure) {
    std::lock_guard<std::mutex> lock(mutex_);  // one measurement at a time, and each shape only once
    auto it = choices_.find(key);
    if (it == choices_.end()) {
      const auto [brgemm, library] = measure();
      const GemmPath path = brgemm <= library ? GemmPath::kBrgemm : library_gemm_path();
      it = choices_.emplace(key, Choice{path, brgemm, library}).first;
    }
    return it->second.path;
  }

  std::vector<std::pair<Key, Choice>> list() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {choices_.begin(), choices_.end()};
  }

 private:
  std::mutex mutex_;
  std::map<Key, Choice> choices_;
};

// Fewest rows (positions x samples) of one call for which the products of all rows at once (TiledGemm,
// weight_grad) go to brgemm: it needs copies of the weights or the operands, and with fewer rows (a
// decoder's T = 1 calls) those cost more than brgemm saves.
constexpr int64_t kTiledMinRows = 128;

// brgemm's B operand for op(W): row-major [K, N] (W transposed where it is stored [N, K]), rows apart by
// an unaliased leading dimension. Copied once per call of an op.
inline at::Tensor brgemm_rhs(const at::Tensor& w, bool trans_w) {
  const int64_t N = trans_w ? w.size(0) : w.size(1), K = trans_w ? w.size(1) : w.size(0);
  at::Tensor rhs = cached_empty({K, w.scalar_type() == at::kFloat ? unaliased_ld<float>(N) : N}, w.options());
  rhs.narrow(1, 0, N).copy_(trans_w ? w.t() : w);
  return rhs;
}

// The most elements at::parallel_for(0, n, grain, f) passes to one call of f from here: the rows one
// thread takes in the time loops.
inline int64_t parallel_chunk(int64_t n, int64_t grain) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (n <= grain || threads <= 1) return n;
  const int64_t chunks = std::min(threads, (n + grain - 1) / grain);
  return (n + chunks - 1) / chunks;
}

// C[M, N] (+)= A[M, K] op(W) for a fixed W, on one thread's own rows inside a parallel region (the
// BLAS runs single-threaded there). The path is brgemm or the library GEMM, forced by VGK_CPU_BLAS or
// chosen for `rows` rows (the most any thread passes to run()) by GemmChoices; rows = 0 takes brgemm
// wherever it is enabled, without a measurement. allow_brgemm = false keeps the library GEMM on W as it
// is: for callers with too few rows to repay brgemm's copy of W.
template <typename T>
class RowsGemm {
 public:
  // op(W) = W^T (W stored [N, K]) when trans_w, else W (stored [K, N]); w contiguous, kept alive.
  RowsGemm(const at::Tensor& w, bool trans_w, bool allow_brgemm = true, int64_t rows = 0)
      : trans_w_(trans_w), N_(trans_w ? w.size(0) : w.size(1)), K_(trans_w ? w.size(1) : w.size(0)), w_(w) {
    path_ = library_gemm_path();
    if (!allow_brgemm || !brgemm_enabled<T>() || N_ == 0 || K_ == 0) return;
    rhs_ = brgemm_rhs(w, trans_w);
    ldb_ = rhs_.size(1);
    path_ = GemmPath::kBrgemm;
    if (rows > 0 && !forced_gemm_path().has_value()) {
      const GemmChoices::Key key{"rows", rows, N_, K_, trans_w};
      path_ = GemmChoices::get().choose(key, [&] { return measure(rows); });
    }
    if (path_ != GemmPath::kBrgemm) rhs_ = at::Tensor();
  }

  GemmPath path() const { return path_; }

  void run(int64_t M, const T* A, int64_t lda, bool accumulate, T* C, int64_t ldc) const {
    run_on(path_, M, A, lda, accumulate, C, ldc);
  }

 private:
  void run_on(GemmPath path, int64_t M, const T* A, int64_t lda, bool accumulate, T* C, int64_t ldc) const {
    if constexpr (std::is_same_v<T, float>) {
      if (path == GemmPath::kBrgemm) {
        brgemm_f32(M, N_, K_, A, lda, rhs_.const_data_ptr<float>(), ldb_, accumulate, C, ldc);
        return;
      }
    }
    gemm<T>(false, trans_w_, M, N_, K_, A, lda, w_.const_data_ptr<T>(), trans_w_ ? K_ : N_,
            accumulate ? T(1) : T(0), C, ldc);
  }

  // {brgemm seconds, library seconds} for one product of `rows` rows, on scratch operands.
  std::pair<double, double> measure(int64_t rows) const {
    const at::Tensor a = at::full({rows, K_}, 0.5, w_.options());
    at::Tensor c = at::empty({rows, N_}, w_.options());
    auto on = [&](GemmPath path) {
      return [&, path] { run_on(path, rows, a.const_data_ptr<T>(), K_, false, c.data_ptr<T>(), N_); };
    };
    return time_pair(on(GemmPath::kBrgemm), on(library_gemm_path()), 3);
  }

  bool trans_w_;
  int64_t N_, K_;
  at::Tensor w_;
  at::Tensor rhs_;  // brgemm's B: op(W) row-major [K, ldb_]
  int64_t ldb_ = 0;
  GemmPath path_;
};

// C[M, N] = A[M, K] op(W) (+ bias on every row, or + C), for all rows at once, outside parallel regions:
// the input projection of every step in one GEMM. On brgemm the product is cut into tiles of kTileM rows
// and kTileN columns over the threads, and the last, partial row tile goes through a copy padded with
// zero rows to a multiple of kTailStep, so that brgemm compiles kernels for a few shapes per W and not
// one per M (M = T * B takes a new value at nearly every call of a training loop with changing
// lengths). The path is forced by VGK_CPU_BLAS or chosen once per shape of W by GemmChoices;
// allow_brgemm = false keeps the library GEMM (pass M >= kTiledMinRows).
template <typename T>
class TiledGemm {
 public:
  static constexpr int64_t kTileM = 64, kTileN = 128, kTailStep = 8;

  // op(W) = W^T (W stored [N, K]) when trans_w, else W (stored [K, N]); w contiguous, kept alive.
  TiledGemm(const at::Tensor& w, bool trans_w, bool allow_brgemm = true)
      : trans_w_(trans_w), N_(trans_w ? w.size(0) : w.size(1)), K_(trans_w ? w.size(1) : w.size(0)), w_(w) {
    path_ = library_gemm_path();
    if (!allow_brgemm || !brgemm_enabled<T>() || N_ == 0 || K_ == 0) return;
    rhs_ = brgemm_rhs(w, trans_w);
    path_ = GemmPath::kBrgemm;
    if (!forced_gemm_path().has_value()) {
      const GemmChoices::Key key{"tiles", 0, N_, K_, trans_w};
      path_ = GemmChoices::get().choose(key, [&] { return measure(); });
    }
    if (path_ != GemmPath::kBrgemm) rhs_ = at::Tensor();
  }

  GemmPath path() const { return path_; }

  // bias: nullptr or [N]; accumulate: add to C (without bias).
  void run(int64_t M, const T* A, int64_t lda, const T* bias, bool accumulate, T* C, int64_t ldc) const {
    if (M == 0) return;
    if constexpr (std::is_same_v<T, float>) {
      if (path_ == GemmPath::kBrgemm) {
        at::parallel_for(0, tiles(M), 1, [&](int64_t t0, int64_t t1) {
          run_tiles(M, A, lda, bias, accumulate, C, ldc, t0, t1);
        });
        return;
      }
    }
    if (bias != nullptr) {
      for (int64_t m = 0; m < M; ++m) std::copy_n(bias, N_, C + m * ldc);
    }
    gemm<T>(false, trans_w_, M, N_, K_, A, lda, w_.const_data_ptr<T>(), trans_w_ ? K_ : N_,
            bias != nullptr || accumulate ? T(1) : T(0), C, ldc);
  }

 private:
  int64_t tiles_n() const { return (N_ + kTileN - 1) / kTileN; }
  int64_t tiles(int64_t M) const { return (M + kTileM - 1) / kTileM * tiles_n(); }

  // Tiles [t0, t1) in column-block-major order (consecutive tiles share their block of op(W)).
  void run_tiles(int64_t M, const float* A, int64_t lda, const float* bias, bool accumulate, float* C,
                 int64_t ldc, int64_t t0, int64_t t1) const {
    const int64_t tiles_m = (M + kTileM - 1) / kTileM, ldb = rhs_.size(1);
    const float* b = rhs_.const_data_ptr<float>();
    std::vector<float> a_tail, c_tail;  // the partial row tile, padded with zero rows
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = (t % tiles_m) * kTileM, n0 = (t / tiles_m) * kTileN;
      const int64_t mt = std::min(kTileM, M - m0), nt = std::min(kTileN, N_ - n0);
      const float* a = A + m0 * lda;
      float* c = C + m0 * ldc + n0;
      int64_t lc = ldc;
      const int64_t rows = (mt + kTailStep - 1) / kTailStep * kTailStep;  // kTileM for full tiles
      if (mt < kTileM) {
        a_tail.assign(rows * lda, 0.f);
        for (int64_t m = 0; m < mt; ++m) std::copy_n(a + m * lda, K_, a_tail.data() + m * lda);
        c_tail.assign(rows * kTileN, 0.f);
        for (int64_t m = 0; m < mt && accumulate; ++m) std::copy_n(c + m * ldc, nt, c_tail.data() + m * kTileN);
        a = a_tail.data();
        c = c_tail.data();
        lc = kTileN;
      }
      if (bias != nullptr) {
        for (int64_t m = 0; m < rows; ++m) std::copy_n(bias + n0, nt, c + m * lc);
      }
      brgemm_f32(rows, nt, K_, a, lda, b + n0, ldb, accumulate || bias != nullptr, c, lc);
      if (mt < kTileM) {
        for (int64_t m = 0; m < mt; ++m) std::copy_n(c_tail.data() + m * kTileN, nt, C + (m0 + m) * ldc + n0);
      }
    }
  }

  // {brgemm seconds, library seconds} for a product of two row tiles, on scratch operands.
  std::pair<double, double> measure() const {
    constexpr int64_t M = 2 * kTileM;
    const at::Tensor a = at::full({M, K_}, 0.5, w_.options());
    at::Tensor c = at::empty({M, N_}, w_.options());
    return time_pair(
        [&] {
          if constexpr (std::is_same_v<T, float>) {
            run_tiles(M, a.const_data_ptr<float>(), K_, nullptr, false, c.data_ptr<float>(), N_, 0, tiles(M));
          }
        },
        [&] {
          gemm<T>(false, trans_w_, M, N_, K_, a.const_data_ptr<T>(), K_, w_.const_data_ptr<T>(),
                  trans_w_ ? K_ : N_, T(0), c.data_ptr<T>(), N_);
        },
        2);
  }

  bool trans_w_;
  int64_t N_, K_;
  at::Tensor w_;
  at::Tensor rhs_;  // brgemm's B: op(W) row-major [K, ldb]
  GemmPath path_;
};

#if defined(__GNUC__) && defined(__x86_64__)
// dst[c, r] = src[r, c] for one 8 x 8 float block.
__attribute__((target("avx2"))) inline void transpose_8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#define VGK_TRANSPOSE_8X8 1
#endif

// dst[c, r] = src[r, c] for a [rows, cols] block, in tiles over the threads (8 x 8 vector blocks for
// float on AVX2, element by element elsewhere and at the edges).
template <typename T>
void transpose_into(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  constexpr int64_t kTile = 64;
  const int64_t tiles_r = (rows + kTile - 1) / kTile, tiles_c = (cols + kTile - 1) / kTile;
  const bool blocks = std::is_same_v<T, float> && cpu_isa_at_least(CpuIsa::kAvx2);
  at::parallel_for(0, tiles_r * tiles_c, 4, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r0 = (i / tiles_c) * kTile, c0 = (i % tiles_c) * kTile;
      const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
      int64_t r8 = r0, c8 = c0;  // end of the part done in 8 x 8 blocks
#ifdef VGK_TRANSPOSE_8X8
      if constexpr (std::is_same_v<T, float>) {
        if (blocks) {
          r8 = r0 + (r1 - r0) / 8 * 8;
          c8 = c0 + (c1 - c0) / 8 * 8;
          for (int64_t r = r0; r < r8; r += 8) {
            for (int64_t c = c0; c < c8; c += 8) transpose_8x8(src + r * lds + c, lds, dst + c * ldd + r, ldd);
          }
        }
      }
#endif
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r = (c < c8 ? r8 : r0); r < r1; ++r) dst[c * ldd + r] = src[r * lds + c];
      }
    }
  });
}

// A weight gradient on brgemm: out^T [K, N] = X^T D, summed over the R rows of D [R, N] (contiguous)
// and X [R, K], in chunks of kChunk rows. X^T comes packed per chunk ([chunks, K, kLdX], zeros past
// row R), and each thread copies the chunk of D it multiplies into a buffer of kTileN columns (zeros
// past row R). So the products take a few shapes whatever R is (the last chunk's rows a multiple of
// kTailStep): brgemm compiles a kernel per shape
// and leading dimension and keeps it for the life of the process, and with R = T * B taking a new
// value at every sequence length, unpacked operands made it compile (and keep) a new kernel at
// nearly every call of a training loop, hundreds of MB after 1000 calls.
class WeightGradTiles {
 public:
  static constexpr int64_t kTileM = 256, kTileN = 128, kChunk = 256, kTailStep = 32;
  static constexpr int64_t kLdX = unaliased_ld<float>(kChunk), kLdD = unaliased_ld<float>(kTileN);

  // x_packed: [chunks(R), K, kLdX]; out_t: [K, N] row-major. With column_sums ([N], zeros), the sums
  // of D's columns (a bias gradient) are added into it from the copies of D's chunks: the tiles of the
  // first row block do that, so each column has one owner and a fixed order.
  WeightGradTiles(int64_t R, int64_t N, int64_t K, const float* x_packed, const float* D, float* out_t,
                  double* column_sums = nullptr)
      : R_(R), N_(N), K_(K), x_(x_packed), d_(D), out_(out_t), sums_(column_sums) {}

  static int64_t chunks(int64_t R) { return (R + kChunk - 1) / kChunk; }

  // Packs X [rows, K], rows r0 ... r0 + rows - 1 of the whole, into x_packed (transposed per chunk).
  static void pack_x(const float* X, int64_t rows, int64_t K, int64_t r0, float* x_packed) {
    for (int64_t r = r0; r < r0 + rows;) {
      const int64_t c = r / kChunk, n = std::min(rows - (r - r0), (c + 1) * kChunk - r);
      transpose_into<float>(X + (r - r0) * K, n, K, K, x_packed + c * K * kLdX + r % kChunk, kLdX);
      r += n;
    }
  }

  // Zeros the columns of the last chunk of x_packed past row R.
  static void zero_x_tail(int64_t R, int64_t K, float* x_packed) {
    const int64_t used = R - (chunks(R) - 1) * kChunk;
    float* last = x_packed + (chunks(R) - 1) * K * kLdX;
    for (int64_t k = 0; k < K && used < kChunk; ++k) {
      std::fill(last + k * kLdX + used, last + k * kLdX + kChunk, 0.f);
    }
  }

  int64_t tiles() const { return tiles_m() * tiles_n(); }

  // Tiles [t0, t1), in order of their column block (consecutive tiles share the copy of D's chunk).
  void run_tiles(int64_t t0, int64_t t1) const {
    std::vector<float> d_chunk(kChunk * kLdD);
    for (int64_t c = 0; c < chunks(R_); ++c) {
      // The last chunk is zero-padded to a multiple of kTailStep rows, not to kChunk: little work wasted.
      const int64_t rows = std::min(kChunk, R_ - c * kChunk);
      const int64_t padded = (rows + kTailStep - 1) / kTailStep * kTailStep;
      int64_t copied_n0 = -1;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m0 = (t % tiles_m()) * kTileM, n0 = (t / tiles_m()) * kTileN;
        const int64_t mt = std::min(kTileM, K_ - m0), nt = std::min(kTileN, N_ - n0);
        if (copied_n0 != n0) {
          const float* src = d_ + c * kChunk * N_ + n0;
          for (int64_t r = 0; r < rows; ++r) std::copy_n(src + r * N_, nt, d_chunk.data() + r * kLdD);
          for (int64_t r = rows; r < padded; ++r) std::fill_n(d_chunk.data() + r * kLdD, nt, 0.f);
          copied_n0 = n0;
        }
        brgemm_f32(mt, nt, padded, x_ + c * K_ * kLdX + m0 * kLdX, kLdX, d_chunk.data(), kLdD, c > 0,
                   out_ + m0 * N_ + n0, N_);
        if (sums_ != nullptr && m0 == 0) add_column_sums(d_chunk.data(), rows, nt, sums_ + n0);
      }
    }
  }

  void run() const {
    at::parallel_for(0, tiles(), 1, [&](int64_t t0, int64_t t1) { run_tiles(t0, t1); });
  }

 private:
  int64_t tiles_m() const { return (K_ + kTileM - 1) / kTileM; }
  int64_t tiles_n() const { return (N_ + kTileN - 1) / kTileN; }

  // sums[j] += the sum of column j of a chunk copy (rows x n, rows kLdD apart): in float within the
  // chunk (vectorised across j), in double across chunks.
  static void add_column_sums(const float* __restrict chunk, int64_t rows, int64_t n, double* __restrict sums) {
    float partial[kTileN] = {};
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < n; ++j) partial[j] += chunk[r * kLdD + j];
    }
    for (int64_t j = 0; j < n; ++j) sums[j] += partial[j];
  }

  int64_t R_, N_, K_;
  const float* x_;
  const float* d_;
  float* out_;
  double* sums_;
};

// Whether a weight gradient out[N, K] = D^T X goes to brgemm (WeightGradTiles) rather than to the
// library GEMM. Where both can run and VGK_CPU_BLAS does not choose, both are timed once per (N, K)
// on one core, over one chunk of rows.
template <typename T>
bool weight_grad_on_brgemm(int64_t N, int64_t K) {
  if (!brgemm_enabled<T>()) return false;
  if (forced_gemm_path().has_value()) return true;
  const GemmChoices::Key key{"weight_grad", 0, N, K, false};
  return GemmChoices::get().choose(key, [&] {
           constexpr int64_t R = WeightGradTiles::kChunk;
           const auto opts = at::TensorOptions().dtype(at::kFloat);
           const at::Tensor d = at::full({R, N}, 0.5, opts), x = at::full({R, K}, 0.5, opts);
           const at::Tensor x_packed = at::full({1, K, WeightGradTiles::kLdX}, 0.5, opts);
           at::Tensor out = at::empty({N, K}, opts), out_t = at::empty({K, N}, opts);
           const WeightGradTiles tiles(R, N, K, x_packed.const_data_ptr<float>(), d.const_data_ptr<float>(),
                                       out_t.data_ptr<float>());
           return time_pair([&] { tiles.run_tiles(0, tiles.tiles()); },
                            [&] {
                              gemm<float>(true, false, N, K, R, d.const_data_ptr<float>(), N,
                                          x.const_data_ptr<float>(), K, 0.0f, out.data_ptr<float>(), K);
                            },
                            2);
         }) == GemmPath::kBrgemm;
}

// A weight gradient summed over all R rows: out [N, K] = D^T X with D [R, N] contiguous and X [R, K]
// given as consecutive blocks of contiguous rows. One GEMM after a time loop. With `bias` ([N]), also
// the sums of D's columns (the bias gradient), on brgemm from the copies the GEMM reads anyway.
template <typename T>
void weight_grad(const std::vector<at::Tensor>& blocks, const at::Tensor& D, at::Tensor& out,
                 const at::Tensor& bias = at::Tensor()) {
  const int64_t R = D.size(0), N = D.size(1), K = out.size(1);
  if (R == 0) {
    out.zero_();
    if (bias.defined()) bias.zero_();
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (R >= kTiledMinRows && weight_grad_on_brgemm<T>(N, K)) {
      at::Tensor x_packed = cached_empty({WeightGradTiles::chunks(R), K, WeightGradTiles::kLdX}, D.options());
      int64_t r0 = 0;
      for (const at::Tensor& blk : blocks) {
        WeightGradTiles::pack_x(blk.const_data_ptr<float>(), blk.size(0), K, r0, x_packed.data_ptr<float>());
        r0 += blk.size(0);
      }
      WeightGradTiles::zero_x_tail(R, K, x_packed.data_ptr<float>());
      at::Tensor out_t = cached_empty({K, N}, D.options());
      at::Tensor sums = bias.defined() ? at::zeros({N}, D.options().dtype(at::kDouble)) : at::Tensor();
      WeightGradTiles(R, N, K, x_packed.const_data_ptr<float>(), D.const_data_ptr<float>(), out_t.data_ptr<float>(),
                      bias.defined() ? sums.data_ptr<double>() : nullptr)
          .run();
      transpose_into<float>(out_t.const_data_ptr<float>(), K, N, N, out.data_ptr<float>(), K);
      if (bias.defined()) bias.copy_(sums);
      return;
    }
  }
  const at::Tensor X = blocks.size() == 1 ? blocks[0] : at::cat(blocks);
  gemm<T>(true, false, N, K, R, D.const_data_ptr<T>(), N, X.const_data_ptr<T>(), K, T(0), out.data_ptr<T>(), K);
  if (bias.defined()) {
    at::Tensor sums = bias;  // a handle to the same storage
    at::sum_out(sums, D, at::IntArrayRef{0});
  }
}

}  // namespace vgk::rnn
