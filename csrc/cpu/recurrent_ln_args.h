// Arguments of one time step of the fused layer-normalized recurrent passes (csrc/cpu/recurrent_ln.cpp,
// csrc/cpu/recurrent_ln_kernels.h). All pointers address row 0 of a [B, ...] slice; a pass handles the
// batch rows [b0, b1). N = G*H; WS is the workspace width (see recurrent_ln_kernels.h).
#pragma once

#include <cstdint>

namespace vgk::rnn {

template <typename T>
struct LnFwdStep {
  int64_t H = 0;
  const T* x = nullptr;      // xproj[t]                        [B, N]
  const T* y = nullptr;      // h_prev W_hh^T                   [B, N]
  const T* gamma = nullptr;  // LN(W_hh h) gain                 [N]
  const T* shift = nullptr;  // LN(W_hh h) shift (+ b_hh, GRU)  [N]
  const T* gamma_c = nullptr;  // LSTM LN(c) gain               [H]
  const T* beta_c = nullptr;   // LSTM LN(c) shift              [H]
  double eps = 0;
  const T* hp = nullptr;     // h_prev                          [B, H]
  T* h = nullptr;            // h_t                             [B, H]
  const T* cp = nullptr;     // LSTM c_prev                     [B, H]
  T* c = nullptr;            // LSTM c_t                        [B, H]
  T* ws = nullptr;           // workspace[t]                    [B, WS]
  double* z = nullptr;       // track: left operands of the Jacobian GEMMs  [K, B, N]
  const int64_t* len = nullptr;
  int64_t t = 0;
  int64_t B = 0;
};

// The exact squared Frobenius norm of the step Jacobian, from the GEMM results V = Z W ([K, B, H]:
// v = W^T yh / N, and for the LSTM m1, m2) and Q = V W^T ([K, B, N]), see recurrent_ln.cpp.
template <typename T>
struct LnJacStep {
  int64_t H = 0;
  int64_t B = 0;
  const T* ws = nullptr;       // workspace[t]
  const T* hp = nullptr;       // GRU h_prev
  const T* cp = nullptr;       // LSTM c_prev
  const T* gamma = nullptr;    // [N]
  const T* gamma_c = nullptr;  // [H]
  const double* v = nullptr;   // V  [K, B, H]
  const double* q = nullptr;   // Q  [K, B, N]
  const double* u = nullptr;   // column means of W_hh  [H]
  const double* wu = nullptr;  // W_hh u                [N]
  double uu = 0;               // |u|^2
  const double* gram = nullptr;  // per-unit Gram entries, structure of arrays [E, H]
  float* jac = nullptr;        // jac_sq[t]  [B]
  const int64_t* len = nullptr;
  int64_t t = 0;
};

template <typename T>
struct LnBwdStep {
  int64_t H = 0;
  const T* gs = nullptr;     // grad_states[out]      [B, H]
  T* dh = nullptr;           // recurrent gradient reaching h_t in; the part the GEMM does not add out
  const T* gcs = nullptr;    // LSTM grad_cell_states[out]
  T* dc = nullptr;           // LSTM: dc_t (recurrent part) in, dc_prev out
  const T* ws = nullptr;     // workspace[t]
  const T* hp = nullptr;     // GRU h_prev
  const T* cp = nullptr;     // LSTM c_prev
  const T* gamma = nullptr;  // [N]
  const T* gamma_c = nullptr;  // [H]
  T* gx = nullptr;           // grad_xproj[t]         [B, N]: clamped gate pre-activation gradients
  T* dl = nullptr;           // gradient w.r.t. the LN(W_hh h) output: GRU [B, N]; LSTM dl of LN(c) [B, H]
  T* dy = nullptr;           // gradient w.r.t. y = W h_prev          [B, N]
  double* gsq_h = nullptr;   // grad_sq[0, t]  [B] (float64, as in BwdStep)
  double* gsq_c = nullptr;   // grad_sq[1, t]  [B] (LSTM)
  const int64_t* len = nullptr;
  int64_t t = 0;
  T clip = 0;                // +inf: off
};

template <typename T>
using LnForwardRows = void (*)(const LnFwdStep<T>&, int64_t b0, int64_t b1);
template <typename T>
using LnJacobianRows = void (*)(const LnJacStep<T>&, int64_t b0, int64_t b1);
template <typename T>
using LnBackwardRows = void (*)(const LnBwdStep<T>&, int64_t b0, int64_t b1);

}  // namespace vgk::rnn
