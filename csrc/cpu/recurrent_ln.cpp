// Layer-normalized LSTM and GRU cells (Ba et al. 2016) over the whole sequence, for CPU tensors:
// gates = xproj + LN(W_hh h) (+ b_hh inside r * (...) for the GRU), and h = o * tanh(LN(c)) for the LSTM.
//
// Same structure as the plain cells (recurrent.cpp). Forward, per step: ONE GEMM h_prev W_hh^T into a
// preallocated [B, G*H] buffer, then ONE fused pass per batch row: the LN statistics of that row, the
// gates, the new state (and the cell LN). Backward, per step in reverse: ONE fused pass per row (cell
// LN backward, clamped gate gradients, LN backward into d(W_hh h)), then ONE GEMM into the gradient of
// h_prev. grad_w_hh is one GEMM over all T*B rows after the loop; the LN gains' and shifts' gradients
// are deterministic column sums after the loop. Nothing is allocated inside the time loops.
//
// Jacobian norms (track=True only). LN couples all units: d LN(y)/dy = rstd diag(gamma) P with
// P = I - 11^T/N - yh yh^T/N, so row k of d(gates)/dh_prev is D_k = gamma_k rstd (W_k - u - yh_k v),
// u = W^T 1 / N (fixed), v = W^T yh / N (per sample and step). Every row of the step Jacobian is then
// a per-unit combination of W rows plus a few dense vectors of R^H (u, v; for the LSTM also
// m1 = W^T rstd P (gamma alpha) and m2 = W^T rstd P (gamma ch alpha), which the cell LN's projector
// brings in), and its squared norm is a quadratic form in the per-unit Gram matrix of W's rows, the
// products W x of the dense vectors and their small Gram matrix (recurrent_ln_kernels.h).
// Cost per step, on top of the untracked step: two GEMMs of K*B rows (K = 1 GRU, 3 LSTM) with W_hh
// (V = Z W, then Q = V W^T), i.e. 2K times the step's own GEMM, plus O(G^2 H) per sample. These run in
// float64 for every input dtype: the expansion of a squared row norm cancels strongly when the cell
// LN's projector nearly annihilates a row (small H), and float64 keeps the result exact there too.
// Once per forward: the per-unit Gram entries, O(G^2 H^2).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "ops.h"
#include "recurrent_args.h"
#include "recurrent_blas.h"
#include "recurrent_gram.h"
#include "recurrent_ln_args.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define VGK_RNN_LN_AVX2 1
#endif

namespace vgk::rnn {

// The pointwise passes, compiled once per instruction set (see recurrent.cpp for the flags).
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#ifdef VGK_RNN_LN_AVX2
namespace ln_avx2 {
#define VGK_FN __attribute__((target("avx2,fma")))
#include "recurrent_kernels.h"
#include "recurrent_ln_kernels.h"
#undef VGK_FN
}  // namespace ln_avx2
#endif

namespace ln_base {
#define VGK_FN
#include "recurrent_kernels.h"
#include "recurrent_ln_kernels.h"
#undef VGK_FN
}  // namespace ln_base
#pragma GCC pop_options

namespace {

constexpr const char* kFwd = "vgk::rnn_ln_forward";
constexpr const char* kBwd = "vgk::rnn_ln_backward";

bool ln_use_avx2() {
#ifdef VGK_RNN_LN_AVX2
  return cpu_has_avx2_fma();
#else
  return false;
#endif
}

#ifdef VGK_RNN_LN_AVX2
#define VGK_LN_PICK(...) (ln_use_avx2() ? &ln_avx2::__VA_ARGS__ : &ln_base::__VA_ARGS__)
#else
#define VGK_LN_PICK(...) (&ln_base::__VA_ARGS__)
#endif

template <typename T>
LnForwardRows<T> pick_forward(bool lstm, bool track) {
  if (lstm) return track ? VGK_LN_PICK(ln_lstm_forward_rows<T, true>) : VGK_LN_PICK(ln_lstm_forward_rows<T, false>);
  return track ? VGK_LN_PICK(ln_gru_forward_rows<T, true>) : VGK_LN_PICK(ln_gru_forward_rows<T, false>);
}

template <typename T>
LnJacobianRows<T> pick_jacobian(bool lstm) {
  return lstm ? VGK_LN_PICK(ln_lstm_jacobian_rows<T>) : VGK_LN_PICK(ln_gru_jacobian_rows<T>);
}

template <typename T>
LnBackwardRows<T> pick_backward(bool lstm, bool track) {
  if (lstm) {
    return track ? VGK_LN_PICK(ln_lstm_backward_rows<T, true>) : VGK_LN_PICK(ln_lstm_backward_rows<T, false>);
  }
  return track ? VGK_LN_PICK(ln_gru_backward_rows<T, true>) : VGK_LN_PICK(ln_gru_backward_rows<T, false>);
}
#undef VGK_LN_PICK

// Returns true for "lstm", false for "gru"; the plain modes have no layer-normalized cell.
bool parse_ln_mode(const char* op, c10::string_view mode) {
  if (mode == "lstm") return true;
  if (mode == "gru") return false;
  TORCH_CHECK_VALUE(false, op, ": mode must be 'lstm' or 'gru' (the layer-normalized cells), got '",
                    std::string(mode), "'");
}

int64_t workspace_width(bool lstm, int64_t H) { return lstm ? 10 * H + 2 : 7 * H + 1; }

void check_tensor(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                  at::IntArrayRef sizes) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", t.sizes());
}

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Checks an optional tensor that must be given (required) or absent (!required) for this mode.
void check_optional(const char* op, const char* name, const std::optional<at::Tensor>& t, bool required,
                    const char* mode, at::ScalarType dtype, at::IntArrayRef sizes) {
  if (required) {
    TORCH_CHECK_VALUE(present(t), op, ": ", name, " of shape ", sizes, " is required for mode '", mode,
                      "', got None");
    check_tensor(op, name, *t, dtype, sizes);
  } else {
    TORCH_CHECK_VALUE(!present(t), op, ": ", name, " must be None for mode '", mode, "', got a tensor of shape ",
                      t->sizes());
  }
}

// lengths: None, or int64 [B] on the CPU with values in [1, T]. Returns the contiguous tensor.
at::Tensor checked_lengths(const char* op, const std::optional<at::Tensor>& lengths, int64_t B, int64_t T) {
  if (!present(lengths)) return at::Tensor();
  check_tensor(op, "lengths", *lengths, at::kLong, {B});
  at::Tensor len = lengths->contiguous();
  const int64_t* p = len.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(p[b] >= 1 && p[b] <= T, op, ": lengths must lie in [1, T] = [1, ", T, "], got lengths[", b,
                      "] = ", p[b]);
  }
  return len;
}

struct Steps {
  int64_t T;
  bool reverse;
  int64_t position(int64_t s) const { return reverse ? T - 1 - s : s; }
  // Slots of states [T+1, B, H] holding the output of position t and the state before it.
  int64_t out_slot(int64_t t) const { return reverse ? t : t + 1; }
  int64_t prev_slot(int64_t t) const { return reverse ? t + 1 : t; }
  int64_t init_slot() const { return reverse ? T : 0; }
};

// Rows per parallel chunk: enough work per thread to pay for the fork.
int64_t row_grain(int64_t N) { return std::max<int64_t>(1, 8192 / N); }

// out[c] = sum over rows r of a[r, c] (* b[r, c] when b is given), in float64. Each column is summed
// in row order by one thread, so the result does not depend on the thread count.
template <typename T>
void column_sums(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t rows, int64_t cols, T* out) {
  at::parallel_for(0, cols, 64, [&](int64_t c0, int64_t c1) {
    std::vector<double> acc(c1 - c0, 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      const T* ar = a + r * lda;
      if (b != nullptr) {
        const T* br = b + r * ldb;
        for (int64_t c = c0; c < c1; ++c) acc[c - c0] += static_cast<double>(ar[c]) * static_cast<double>(br[c]);
      } else {
        for (int64_t c = c0; c < c1; ++c) acc[c - c0] += static_cast<double>(ar[c]);
      }
    }
    for (int64_t c = c0; c < c1; ++c) out[c] = static_cast<T>(acc[c - c0]);
  });
}

struct LnParams {
  at::Tensor gamma, shift, gamma_c, beta_c;
  double eps;
};

template <typename T>
void forward_impl(bool lstm, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w,
                  const LnParams& ln, const at::Tensor& len, bool reverse, bool track, at::Tensor& states,
                  at::Tensor& cells, at::Tensor& ws, at::Tensor& jac) {
  const int64_t T_ = x.size(0), B = x.size(1), H = h0.size(1), G = lstm ? 4 : 3, N = G * H, BH = B * H;
  const int64_t WS = workspace_width(lstm, H);
  const Steps steps{T_, reverse};
  states.select(0, steps.init_slot()).copy_(h0);
  if (lstm) cells.select(0, steps.init_slot()).copy_(c0);
  if (B == 0) return;

  at::Tensor y = at::empty({B, N}, x.options());
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  T* sp = states.data_ptr<T>();
  T* cp = lstm ? cells.data_ptr<T>() : nullptr;
  T* wsp = ws.data_ptr<T>();
  T* yp = y.data_ptr<T>();

  LnFwdStep<T> st;
  st.H = H;
  st.B = B;
  st.y = yp;
  st.gamma = ln.gamma.const_data_ptr<T>();
  st.shift = ln.shift.const_data_ptr<T>();
  if (lstm) {
    st.gamma_c = ln.gamma_c.const_data_ptr<T>();
    st.beta_c = ln.beta_c.const_data_ptr<T>();
  }
  st.eps = ln.eps;
  st.len = len.defined() ? len.const_data_ptr<int64_t>() : nullptr;
  const LnForwardRows<T> rows = pick_forward<T>(lstm, track);
  const int64_t grain = row_grain(N);

  // Tracking: float64 copies of W_hh, its per-unit Gram entries, u = W^T 1 / N and W u, and the
  // per-step GEMM operands Z [K, B, N], V [K, B, H], Q [K, B, N].
  const int64_t K = lstm ? 3 : 1;
  at::Tensor wd, gram, u, wu, zbuf, vbuf, qbuf;
  LnJacStep<T> jt;
  LnJacobianRows<T> jrows = nullptr;
  if (track) {
    wd = w.to(at::kDouble).contiguous();
    gram = gram_entries<double>(wd, G, H, /*diagonals=*/!lstm);
    u = wd.sum(0).div_(static_cast<double>(N)).contiguous();
    wu = at::mv(wd, u).contiguous();
    zbuf = at::empty({K * B, N}, wd.options());
    vbuf = at::empty({K * B, H}, wd.options());
    qbuf = at::empty({K * B, N}, wd.options());
    st.z = zbuf.data_ptr<double>();
    jt.H = H;
    jt.B = B;
    jt.gamma = st.gamma;
    jt.gamma_c = st.gamma_c;
    jt.v = vbuf.const_data_ptr<double>();
    jt.q = qbuf.const_data_ptr<double>();
    jt.u = u.const_data_ptr<double>();
    jt.wu = wu.const_data_ptr<double>();
    jt.uu = at::dot(u, u).item<double>();
    jt.gram = gram.const_data_ptr<double>();
    jt.len = st.len;
    jrows = pick_jacobian<T>(lstm);
  }

  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = steps.position(s), out = steps.out_slot(t), prev = steps.prev_slot(t);
    gemm<T>(false, true, B, N, H, sp + prev * BH, H, wp, H, T(0), yp, N);
    st.t = t;
    st.x = xp + t * B * N;
    st.hp = sp + prev * BH;
    st.h = sp + out * BH;
    if (lstm) {
      st.cp = cp + prev * BH;
      st.c = cp + out * BH;
    }
    st.ws = wsp + t * B * WS;
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) { rows(st, b0, b1); });
    if (track) {
      const double* wdp = wd.const_data_ptr<double>();
      gemm<double>(false, false, K * B, H, N, st.z, N, wdp, H, 0.0, vbuf.data_ptr<double>(), H);
      gemm<double>(false, true, K * B, N, H, vbuf.const_data_ptr<double>(), H, wdp, H, 0.0,
                   qbuf.data_ptr<double>(), N);
      jt.t = t;
      jt.ws = st.ws;
      jt.hp = st.hp;
      jt.cp = st.cp;
      jt.jac = jac.data_ptr<float>() + t * B;
      at::parallel_for(0, B, std::max<int64_t>(1, grain / (2 * K)), [&](int64_t b0, int64_t b1) { jrows(jt, b0, b1); });
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_ln_forward_cpu(
    const at::Tensor& xproj, const at::Tensor& h0, const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_hh, const at::Tensor& ln_hh_weight, const at::Tensor& ln_hh_bias,
    const std::optional<at::Tensor>& ln_cell_weight, const std::optional<at::Tensor>& ln_cell_bias, double eps,
    const std::optional<at::Tensor>& lengths, c10::string_view mode, bool reverse, bool track) {
  const char* op = kFwd;
  const bool lstm = parse_ln_mode(op, mode);
  const char* mode_name = lstm ? "lstm" : "gru";
  TORCH_CHECK(xproj.device().is_cpu(), op, ": xproj must be a CPU tensor, got one on ", xproj.device());
  const auto dtype = xproj.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op, ": xproj must be float32 or float64, got ",
                   dtype);
  TORCH_CHECK_VALUE(xproj.dim() == 3 && xproj.size(0) >= 1, op,
                    ": xproj must have shape [T, B, G*H] with T >= 1, got ", xproj.sizes());
  TORCH_CHECK_VALUE(h0.dim() == 2 && h0.size(1) >= 1, op, ": h0 must have shape [B, H] with H >= 1, got ",
                    h0.sizes());
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
  const int64_t T_ = xproj.size(0), B = xproj.size(1), H = h0.size(1), N = (lstm ? 4 : 3) * H;
  check_tensor(op, "xproj", xproj, dtype, {T_, B, N});
  check_tensor(op, "h0", h0, dtype, {B, H});
  check_tensor(op, "w_hh", w_hh, dtype, {N, H});
  check_tensor(op, "ln_hh_weight", ln_hh_weight, dtype, {N});
  check_tensor(op, "ln_hh_bias", ln_hh_bias, dtype, {N});
  check_optional(op, "c0", c0, lstm, mode_name, dtype, {B, H});
  check_optional(op, "ln_cell_weight", ln_cell_weight, lstm, mode_name, dtype, {H});
  check_optional(op, "ln_cell_bias", ln_cell_bias, lstm, mode_name, dtype, {H});
  if (lstm) {
    TORCH_CHECK_VALUE(!present(b_hh), op, ": b_hh must be None for mode 'lstm' (add it to xproj), got a tensor of "
                      "shape ", b_hh->sizes());
  } else if (present(b_hh)) {
    check_tensor(op, "b_hh", *b_hh, dtype, {N});
  }
  const at::Tensor len = checked_lengths(op, lengths, B, T_);

  LnParams ln;
  ln.gamma = ln_hh_weight.contiguous();
  // The GRU adds b_hh to LN(W_hh h): one shift vector serves both.
  ln.shift = (!lstm && present(b_hh)) ? (ln_hh_bias + *b_hh).contiguous() : ln_hh_bias.contiguous();
  if (lstm) {
    ln.gamma_c = ln_cell_weight->contiguous();
    ln.beta_c = ln_cell_bias->contiguous();
  }
  ln.eps = eps;

  const auto opts = xproj.options();
  at::Tensor states = at::empty({T_ + 1, B, H}, opts);
  at::Tensor cells = lstm ? at::empty({T_ + 1, B, H}, opts) : at::empty({0}, opts);
  at::Tensor ws = at::empty({T_, B, workspace_width(lstm, H)}, opts);
  at::Tensor jac = track ? at::empty({T_, B}, opts.dtype(at::kFloat)) : at::empty({0}, opts.dtype(at::kFloat));

  AT_DISPATCH_FLOATING_TYPES(dtype, "rnn_ln_forward", [&] {
    forward_impl<scalar_t>(lstm, xproj.contiguous(), h0, lstm ? c0->contiguous() : at::Tensor(),
                           w_hh.contiguous(), ln, len, reverse, track, states, cells, ws, jac);
  });
  return {states, cells, ws, jac};
}

template <typename T>
void backward_impl(bool lstm, const at::Tensor& gstates, const at::Tensor& gcells, const at::Tensor& states,
                   const at::Tensor& cells, const at::Tensor& ws, const at::Tensor& w, const at::Tensor& gamma,
                   const at::Tensor& gamma_c, const at::Tensor& len, bool reverse, std::optional<double> grad_clip,
                   bool track, at::Tensor& gx, at::Tensor& gh0, at::Tensor& gc0, at::Tensor& gw, at::Tensor& gb,
                   at::Tensor& g_gamma, at::Tensor& g_beta, at::Tensor& g_gamma_c, at::Tensor& g_beta_c,
                   at::Tensor& gsq) {
  const int64_t T_ = states.size(0) - 1, B = states.size(1), H = states.size(2), G = lstm ? 4 : 3;
  const int64_t N = G * H, BH = B * H, WS = workspace_width(lstm, H);
  const Steps steps{T_, reverse};
  if (B == 0) {
    gh0.copy_(gstates.select(0, steps.init_slot()));
    if (lstm) gc0.copy_(gcells.select(0, steps.init_slot()));
    for (at::Tensor* t : {&gw, &gb, &g_gamma, &g_beta, &g_gamma_c, &g_beta_c}) t->zero_();
    return;
  }

  // Gradients reaching the state before the current step: zero at the end.
  at::Tensor dh = at::zeros({B, H}, states.options());
  at::Tensor dc = lstm ? at::zeros({B, H}, states.options()) : at::Tensor();
  // d(W_hh h_prev) per step for grad_w_hh; the LN output's gradient for the gains and shifts
  // (GRU: of LN(W_hh h), [T, B, N]; LSTM: of LN(c), [T, B, H]; the LSTM's LN(W_hh h) gradient is gx).
  at::Tensor dy = at::empty({T_, B, N}, states.options());
  at::Tensor dl = at::empty({T_, B, lstm ? H : N}, states.options());

  const T* sp = states.const_data_ptr<T>();
  const T* gsp = gstates.const_data_ptr<T>();
  const T* cp = lstm ? cells.const_data_ptr<T>() : nullptr;
  const T* gcp = lstm ? gcells.const_data_ptr<T>() : nullptr;
  const T* wsp = ws.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  T* gxp = gx.data_ptr<T>();
  T* dyp = dy.data_ptr<T>();
  T* dlp = dl.data_ptr<T>();
  T* dhp = dh.data_ptr<T>();

  LnBwdStep<T> st;
  st.H = H;
  st.dh = dhp;
  st.dc = lstm ? dc.data_ptr<T>() : nullptr;
  st.gamma = gamma.const_data_ptr<T>();
  st.gamma_c = lstm ? gamma_c.const_data_ptr<T>() : nullptr;
  st.len = len.defined() ? len.const_data_ptr<int64_t>() : nullptr;
  st.clip = grad_clip.has_value() ? static_cast<T>(*grad_clip) : std::numeric_limits<T>::infinity();
  const LnBackwardRows<T> rows = pick_backward<T>(lstm, track);
  const int64_t grain = row_grain(N);
  const int64_t DL = lstm ? H : N;

  for (int64_t s = T_ - 1; s >= 0; --s) {
    const int64_t t = steps.position(s), out = steps.out_slot(t), prev = steps.prev_slot(t);
    st.t = t;
    st.gs = gsp + out * BH;
    st.hp = sp + prev * BH;
    if (lstm) {
      st.gcs = gcp + out * BH;
      st.cp = cp + prev * BH;
    }
    st.ws = wsp + t * B * WS;
    st.gx = gxp + t * B * N;
    st.dl = dlp + t * B * DL;
    st.dy = dyp + t * B * N;
    if (track) {
      st.gsq_h = gsq.data_ptr<double>() + t * B;
      if (lstm) st.gsq_c = gsq.data_ptr<double>() + (T_ + t) * B;
    }
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) { rows(st, b0, b1); });
    gemm<T>(false, false, B, H, N, st.dy, N, wp, H, T(1), dhp, H);
  }

  at::add_out(gh0, dh, gstates.select(0, steps.init_slot()));
  if (lstm) at::add_out(gc0, dc, gcells.select(0, steps.init_slot()));
  // grad_w_hh = sum over steps of d(W_hh h_prev)^T h_prev: one GEMM over T*B rows.
  const T* hprev = sp + (reverse ? BH : 0);
  gemm<T>(true, false, N, H, T_ * B, dyp, N, hprev, H, T(0), gw.data_ptr<T>(), H);
  // Gains and shifts: sums over all rows of the LN outputs' gradients (times the normalized values).
  const int64_t R = T_ * B;
  const T* lnp = lstm ? gxp : dlp;
  column_sums<T>(lnp, N, wsp + 4 * H, WS, R, N, g_gamma.data_ptr<T>());
  column_sums<T>(lnp, N, nullptr, 0, R, N, g_beta.data_ptr<T>());
  if (lstm) {
    column_sums<T>(dlp, H, wsp + 8 * H, WS, R, H, g_gamma_c.data_ptr<T>());
    column_sums<T>(dlp, H, nullptr, 0, R, H, g_beta_c.data_ptr<T>());
  } else if (gb.numel()) {
    gb.copy_(g_beta);  // b_hh and the LN shift enter the GRU's gates as one sum
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
rnn_ln_backward_cpu(const at::Tensor& grad_states, const at::Tensor& grad_cell_states, const at::Tensor& states,
                    const at::Tensor& cell_states, const at::Tensor& workspace, const at::Tensor& w_hh,
                    const at::Tensor& ln_hh_weight, const std::optional<at::Tensor>& ln_cell_weight,
                    const std::optional<at::Tensor>& lengths, c10::string_view mode, bool reverse,
                    std::optional<double> grad_clip, bool track, bool has_b_hh) {
  const char* op = kBwd;
  const bool lstm = parse_ln_mode(op, mode);
  const char* mode_name = lstm ? "lstm" : "gru";
  TORCH_CHECK(states.device().is_cpu(), op, ": states must be a CPU tensor, got one on ", states.device());
  const auto dtype = states.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op, ": states must be float32 or float64, got ",
                   dtype);
  TORCH_CHECK_VALUE(states.dim() == 3 && states.size(0) >= 2 && states.size(2) >= 1, op,
                    ": states must have shape [T+1, B, H] with T >= 1 and H >= 1, got ", states.sizes());
  const int64_t T_ = states.size(0) - 1, B = states.size(1), H = states.size(2), N = (lstm ? 4 : 3) * H;
  check_tensor(op, "grad_states", grad_states, dtype, {T_ + 1, B, H});
  check_tensor(op, "w_hh", w_hh, dtype, {N, H});
  check_tensor(op, "workspace", workspace, dtype, {T_, B, workspace_width(lstm, H)});
  check_tensor(op, "ln_hh_weight", ln_hh_weight, dtype, {N});
  check_optional(op, "ln_cell_weight", ln_cell_weight, lstm, mode_name, dtype, {H});
  if (lstm) {
    check_tensor(op, "cell_states", cell_states, dtype, {T_ + 1, B, H});
    check_tensor(op, "grad_cell_states", grad_cell_states, dtype, {T_ + 1, B, H});
  }
  if (grad_clip.has_value()) {
    TORCH_CHECK_VALUE(*grad_clip > 0, op, ": grad_clip must be None or > 0, got ", *grad_clip);
  }
  TORCH_CHECK_VALUE(!(has_b_hh && lstm), op, ": has_b_hh must be false for mode 'lstm' (its b_hh is in xproj), "
                    "got true");
  const at::Tensor len = checked_lengths(op, lengths, B, T_);

  const auto opts = states.options();
  at::Tensor gx = at::empty({T_, B, N}, opts);
  at::Tensor gh0 = at::empty({B, H}, opts);
  at::Tensor gc0 = lstm ? at::empty({B, H}, opts) : at::empty({0}, opts);
  at::Tensor gw = at::empty({N, H}, opts);
  at::Tensor gb = has_b_hh ? at::empty({N}, opts) : at::empty({0}, opts);
  at::Tensor g_gamma = at::empty({N}, opts), g_beta = at::empty({N}, opts);
  at::Tensor g_gamma_c = lstm ? at::empty({H}, opts) : at::empty({0}, opts);
  at::Tensor g_beta_c = lstm ? at::empty({H}, opts) : at::empty({0}, opts);
  at::Tensor gsq = grad_sq_buffer(track, lstm, T_, B, opts);

  AT_DISPATCH_FLOATING_TYPES(dtype, "rnn_ln_backward", [&] {
    backward_impl<scalar_t>(lstm, grad_states.contiguous(), lstm ? grad_cell_states.contiguous() : at::Tensor(),
                            states.contiguous(), lstm ? cell_states.contiguous() : at::Tensor(),
                            workspace.contiguous(), w_hh.contiguous(), ln_hh_weight.contiguous(),
                            lstm ? ln_cell_weight->contiguous() : at::Tensor(), len, reverse, grad_clip, track, gx,
                            gh0, gc0, gw, gb, g_gamma, g_beta, g_gamma_c, g_beta_c, gsq);
  });
  return {gx, gh0, gc0, gw, gb, g_gamma, g_beta, g_gamma_c, g_beta_c, gsq};
}

}  // namespace
}  // namespace vgk::rnn

namespace vgk {

void define_recurrent_ln_ops(torch::Library& m) {
  // See vgkernels/ops/recurrent.py for the meaning of every argument and output.
  m.def(
      "rnn_ln_forward(Tensor xproj, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? b_hh, Tensor ln_hh_weight, "
      "Tensor ln_hh_bias, Tensor? ln_cell_weight, Tensor? ln_cell_bias, float eps, Tensor? lengths, str mode, "
      "bool reverse, bool track) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "rnn_ln_backward(Tensor grad_states, Tensor grad_cell_states, Tensor states, Tensor cell_states, "
      "Tensor workspace, Tensor w_hh, Tensor ln_hh_weight, Tensor? ln_cell_weight, Tensor? lengths, str mode, "
      "bool reverse, float? grad_clip, bool track, bool has_b_hh) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace vgk

TORCH_LIBRARY_IMPL(vgk, CPU, m) {
  m.impl("rnn_ln_forward", &vgk::rnn::rnn_ln_forward_cpu);
  m.impl("rnn_ln_backward", &vgk::rnn::rnn_ln_backward_cpu);
}
