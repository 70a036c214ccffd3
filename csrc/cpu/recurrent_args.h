// Arguments of one time step of the fused recurrent pointwise passes (csrc/cpu/recurrent.cpp).
// All pointers address row 0 of a [B, ...] slice; a pass handles the batch rows [b0, b1).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "cpu_isa.h"

namespace vgk::rnn {

enum class Cell : int { kLstm, kGru, kTanh, kRelu, kSigmoid };

// Forward step: gates from the input projection x (+ bx for the GRU) + h_prev W_hh^T (+ b_hh for the
// GRU), new state, workspace and (when jac != nullptr) the squared Frobenius norm of the step Jacobian
// per row.
template <typename T>
struct FwdStep {
  int64_t H = 0;
  const T* x = nullptr;     // input projection of row 0 [G*H], rows xs apart
  int64_t xs = 0;           // G*H, or 0 when every row reads the same values (a bias row)
  const T* bx = nullptr;    // GRU: bias added to x      [3H]
  const T* hh = nullptr;    // h_prev W_hh^T             [B, G*H]
  const T* bhh = nullptr;   // GRU b_hh or nullptr       [3H]
  const T* hp = nullptr;    // h_prev                    [B, H]
  T* h = nullptr;           // h_t                       [B, H]
  const T* cp = nullptr;    // LSTM c_prev               [B, H]
  T* c = nullptr;           // LSTM c_t                  [B, H]
  T* ws = nullptr;          // LSTM i,f,g,o / GRU r,z,n,hn (activated)  [B, 4H]
  const T* gram = nullptr;  // per-unit Gram entries, structure of arrays [E, H]
  float* jac = nullptr;     // jac_sq[t]                 [B]
  T* scratch = nullptr;     // LSTM with tracking: tanh(c_t) of the current row  [H]
  const int64_t* len = nullptr;  // lengths [B] or nullptr (every row valid)
  int64_t t = 0;
};

// Backward step. dh holds the recurrent gradient reaching h_t; the pass replaces it with the part of
// the gradient w.r.t. h_prev that the following GEMM (beta = 1) does not produce: the carried
// gradient of rows past their length, the GRU's direct z * dh term, and 0 otherwise. dc likewise.
template <typename T>
struct BwdStep {
  int64_t H = 0;
  const T* gs = nullptr;    // grad_states[out]          [B, H]
  T* dh = nullptr;          //                           [B, H]
  const T* gcs = nullptr;   // LSTM grad_cell_states[out]
  T* dc = nullptr;          // LSTM: dc_t in, dc_prev out [B, H]
  const T* ws = nullptr;    // workspace[t]              [B, 4H]
  const T* h = nullptr;     // h_t (Elman: the activation derivative follows from it)
  const T* hp = nullptr;    // h_prev (GRU)
  const T* c = nullptr;     // LSTM c_t
  const T* cp = nullptr;    // LSTM c_prev
  T* gx = nullptr;          // grad_xproj[t]             [B, G*H]
  T* rec = nullptr;         // GRU: gradient of h_prev W_hh^T + b_hh   [B, 3H]
  double* gsq_h = nullptr;  // grad_sq[0, t]             [B]; float64: a float32 square underflows
  double* gsq_c = nullptr;  // grad_sq[1, t] (LSTM)      [B]
  const int64_t* len = nullptr;
  int64_t t = 0;
  T clip = 0;               // pre-activation gradients are clamped to [-clip, clip]; +inf: off
};

// A pass over the batch rows [b0, b1) of one step.
template <typename T>
using ForwardRows = void (*)(const FwdStep<T>&, int64_t b0, int64_t b1);
template <typename T>
using BackwardRows = void (*)(const BwdStep<T>&, int64_t b0, int64_t b1);

// True when the kernels compiled twice (AVX2 and baseline x86-64) may take their AVX2 version: the CPU
// runs AVX2 and FMA, and VGK_CPU_ISA does not ask for the baseline (cpu_isa.h).
inline bool cpu_has_avx2_fma() { return cpu_isa_at_least(CpuIsa::kAvx2); }

// The grad_sq output of a backward op, which the gsq_h/gsq_c pointers fill: float64 [K, T, B]
// (K = 2 for the LSTM: h then c; else 1) with track, else [0].
inline at::Tensor grad_sq_buffer(bool track, bool lstm, int64_t T, int64_t B, const at::TensorOptions& opts) {
  const auto f64 = opts.dtype(at::kDouble);
  return track ? at::empty({lstm ? 2 : 1, T, B}, f64) : at::empty({0}, f64);
}

}  // namespace vgk::rnn
