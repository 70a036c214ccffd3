// Explicit SIMD for the row and chunk loops of layer_norm.cpp and clip_grad.cpp.
//
// The extension is compiled for baseline x86-64, and the compiler's own vectorisation of reductions
// keeps one accumulator (latency-bound) and spills when a loop also stores. So the loops are written
// once as generic lambdas over an "ops" type: VecOps<T> works on 32-byte GCC/Clang vector-extension
// values (one AVX2 register, two SSE registers), ScalarOps<T> on single elements for the tail. Each
// kernel is compiled twice (VGK_SIMD_CLONES): for x86-64-v3 (AVX2, FMA) and for baseline x86-64, and
// the loader picks the clone the CPU supports.
#pragma once

#include <emmintrin.h>
#include <xmmintrin.h>

#include <array>
#include <cstdint>

#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors only pass between inlined functions

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define VGK_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VGK_SIMD_CLONES
#endif
#define VGK_INLINE __attribute__((always_inline)) inline
// For the step lambdas passed to sums/for_each: a lambda the compiler outlines is compiled for the
// baseline target, not the clone's, and takes its vectors through memory (several times slower).
#define VGK_STEP __attribute__((always_inline))

namespace vgk::simd {

template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(32)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int kLanes = 32 / sizeof(T);
constexpr int kUnroll = 4;  // independent accumulators per sum

template <typename T>
struct VecOps {
  using V = Vec<T>;
  static VGK_INLINE V load(const T* p) {
    V v;
    __builtin_memcpy(&v, p, sizeof(V));
    return v;
  }
  static VGK_INLINE void store(T* p, V v) { __builtin_memcpy(p, &v, sizeof(V)); }
  // Non-temporal store of a whole vector to a 16-byte aligned address: an output row that is not read
  // again soon skips the read-for-ownership of its cache lines, a third of a pass's memory traffic.
  static VGK_INLINE void stream(T* p, V v) {
    if constexpr (sizeof(T) == 4) {
      __m128 half[2];
      __builtin_memcpy(half, &v, sizeof(V));
      _mm_stream_ps(reinterpret_cast<float*>(p), half[0]);
      _mm_stream_ps(reinterpret_cast<float*>(p) + 4, half[1]);
    } else {
      __m128d half[2];
      __builtin_memcpy(half, &v, sizeof(V));
      _mm_stream_pd(reinterpret_cast<double*>(p), half[0]);
      _mm_stream_pd(reinterpret_cast<double*>(p) + 2, half[1]);
    }
  }
};

template <typename T>
struct ScalarOps {
  using V = T;
  static VGK_INLINE T load(const T* p) { return *p; }
  static VGK_INLINE void store(T* p, T v) { *p = v; }
  static VGK_INLINE void stream(T* p, T v) { *p = v; }
};

// True when the rows of n elements from p can be written with stream(): p is 16-byte aligned and n a
// whole number of vectors, so every row starts aligned and has no scalar tail.
template <typename T>
VGK_INLINE bool streamable(const T* p, int64_t n) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0 && n % kLanes<T> == 0;
}

template <typename T>
VGK_INLINE T hsum(Vec<T> v) {
  T s = 0;
  for (int j = 0; j < kLanes<T>; ++j) s += v[j];
  return s;
}

// step(ops, i) for the elements [i, i + width) of [0, n): a vector at a time, then scalars.
template <typename T, typename Step>
VGK_INLINE void for_each(int64_t n, Step step) {
  int64_t i = 0;
  for (; i + kLanes<T> <= n; i += kLanes<T>) step(VecOps<T>{}, i);
  for (; i < n; ++i) step(ScalarOps<T>{}, i);
}

// Sums over [0, n) of the K terms that step(ops, i) returns as std::array<ops::V, K> (it may also
// store per element).
template <typename T, int K, typename Step>
VGK_INLINE std::array<T, K> sums(int64_t n, Step step) {
  constexpr int W = kLanes<T> * kUnroll;
  Vec<T> acc[kUnroll][K] = {};
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    for (int u = 0; u < kUnroll; ++u) {
      const auto t = step(VecOps<T>{}, i + u * kLanes<T>);
      for (int k = 0; k < K; ++k) acc[u][k] += t[k];
    }
  }
  std::array<T, K> out{};
  for (; i < n; ++i) {
    const auto t = step(ScalarOps<T>{}, i);
    for (int k = 0; k < K; ++k) out[k] += t[k];
  }
  for (int u = 0; u < kUnroll; ++u) {
    for (int k = 0; k < K; ++k) out[k] += hsum<T>(acc[u][k]);
  }
  return out;
}

}  // namespace vgk::simd
