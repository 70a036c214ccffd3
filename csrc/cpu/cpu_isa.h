// The x86 instruction-set level the CPU kernels may use, and the switch that lowers it.
//
// Levels: baseline x86-64 (SSE2), AVX2 (with FMA), AVX-512 (F, BW, VL, DQ). The level in effect is the
// CPU's own, or lower where VGK_CPU_ISA asks for it ("avx512", "avx2" or "baseline"; unset or
// "native" keeps the CPU's). Lowering it makes one machine run the code paths of another kind of
// CPU: the recurrent kernels' pointwise passes compiled per level and the GEMM path choice
// (recurrent_blas.h) follow it. (LayerNorm and the clipping kernels take their AVX2 or baseline build by
// the CPU alone, through the loader: norm_simd.h.)
// oneDNN (the brgemm micro-kernels, torch.nn's RNNs) reads its own cap, ONEDNN_MAX_CPU_ISA, at its
// first use; the benchmark and the tests set both.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace vgk {

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kBaseline: return "baseline";
  }
  return "?";
}

// The highest level this CPU runs.
inline CpuIsa native_cpu_isa() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const CpuIsa isa = [] {
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return CpuIsa::kBaseline;
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return avx512 ? CpuIsa::kAvx512 : CpuIsa::kAvx2;
  }();
  return isa;
#else
  return CpuIsa::kBaseline;
#endif
}

// The level VGK_CPU_ISA asks for; the CPU's own when unset. Raises on an unknown value.
inline CpuIsa requested_cpu_isa() {
  const char* env = std::getenv("VGK_CPU_ISA");
  const std::string value = env == nullptr ? "" : env;
  if (value.empty() || value == "native") return native_cpu_isa();
  if (value == "avx512") return CpuIsa::kAvx512;
  if (value == "avx2") return CpuIsa::kAvx2;
  if (value == "baseline") return CpuIsa::kBaseline;
  TORCH_CHECK_VALUE(false, "vgkernels: VGK_CPU_ISA must be one of 'native', 'avx512', 'avx2', 'baseline', got '",
                    value, "'");
}

// The level in effect: the lower of the CPU's and the requested one. Read once per process.
inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    const CpuIsa native = native_cpu_isa(), requested = requested_cpu_isa();
    return static_cast<int>(requested) < static_cast<int>(native) ? requested : native;
  }();
  return isa;
}

inline bool cpu_isa_at_least(CpuIsa level) { return static_cast<int>(cpu_isa()) >= static_cast<int>(level); }

}  // namespace vgk
