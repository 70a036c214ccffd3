// Whole-sequence recurrent layers (Elman RNN, LSTM, GRU) for CPU tensors: one direction of one layer.
//
// Samples are independent, so each thread takes a block of batch rows and runs the whole time loop
// on it, with no barrier between steps.
// Forward, per step: ONE GEMM h_prev W_hh^T for the thread's rows into a preallocated buffer, then ONE
// fused pointwise pass over those rows (gates, new state, workspace, Jacobian-norm terms).
// Backward, per step in reverse: ONE fused pointwise pass writing the pre-activation gradients into
// grad_xproj[t], then ONE GEMM dgates W_hh accumulated into the gradient of h_prev. grad_w_hh is one
// GEMM over all T*B rows after the loop. Nothing is allocated inside the time loops; the GEMMs run on
// raw pointers (recurrent_blas.h), W_hh is transposed at most once per call.
//
// Workspace layouts (private to this backend, dtype of the input):
//   lstm: activated gates i, f, g, o  [T, B, 4H]
//   gru:  r, z, n and hn = W_hn h_prev + b_hn  [T, B, 4H]
//   rnn_*: empty [0]; the activation derivative follows from h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>

#include "ops.h"
#include "recurrent_args.h"
#include "recurrent_blas.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define VGK_RNN_AVX2 1
#endif

namespace vgk::rnn {

// The pointwise passes, compiled once per instruction set. Without -fno-trapping-math (which torch
// itself is built with) GCC will not turn the comparisons of the clamps into blends, and the loops
// stay scalar; values, NaN included, are the same either way.
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#ifdef VGK_RNN_AVX2
namespace avx2 {
#define VGK_FN __attribute__((target("avx2,fma")))
#include "recurrent_kernels.h"
#undef VGK_FN
}  // namespace avx2
#endif

namespace base {
#define VGK_FN
#include "recurrent_kernels.h"
#undef VGK_FN
}  // namespace base
#pragma GCC pop_options

namespace {

bool use_avx2() {
#ifdef VGK_RNN_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

template <typename T>
ForwardRows<T> pick_forward(Cell cell, bool track) {
#ifdef VGK_RNN_AVX2
  if (use_avx2()) return track ? avx2::forward_rows<T, true>(cell) : avx2::forward_rows<T, false>(cell);
#endif
  return track ? base::forward_rows<T, true>(cell) : base::forward_rows<T, false>(cell);
}

template <typename T>
BackwardRows<T> pick_backward(Cell cell, bool track) {
#ifdef VGK_RNN_AVX2
  if (use_avx2()) return track ? avx2::backward_rows<T, true>(cell) : avx2::backward_rows<T, false>(cell);
#endif
  return track ? base::backward_rows<T, true>(cell) : base::backward_rows<T, false>(cell);
}

struct Mode {
  Cell cell;
  int64_t gates;
};

Mode parse_mode(c10::string_view mode) {
  if (mode == "lstm") return {Cell::kLstm, 4};
  if (mode == "gru") return {Cell::kGru, 3};
  if (mode == "rnn_tanh") return {Cell::kTanh, 1};
  if (mode == "rnn_relu") return {Cell::kRelu, 1};
  if (mode == "rnn_sigmoid") return {Cell::kSigmoid, 1};
  TORCH_CHECK_VALUE(false, "vgk::rnn: mode must be one of 'lstm', 'gru', 'rnn_tanh', 'rnn_relu', ",
                    "'rnn_sigmoid', got '", std::string(mode), "'");
}

void check_tensor(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                  at::IntArrayRef sizes) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", t.sizes());
}

// lengths: None, or int64 [B] on the CPU with values in [1, T]. Returns the contiguous tensor.
at::Tensor checked_lengths(const char* op, const std::optional<at::Tensor>& lengths, int64_t B, int64_t T) {
  if (!lengths.has_value() || !lengths->defined()) return at::Tensor();
  check_tensor(op, "lengths", *lengths, at::kLong, {B});
  at::Tensor len = lengths->contiguous();
  const int64_t* p = len.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(p[b] >= 1 && p[b] <= T, op, ": lengths must lie in [1, T] = [1, ", T,
                      "], got lengths[", b, "] = ", p[b]);
  }
  return len;
}

// Per-unit Gram entries of W_hh's gate blocks as a structure of arrays [E, H] (see the kernels for
// the order); accumulated in double, once per forward: O(G^2 H^2).
template <typename T>
at::Tensor gram_entries(const at::Tensor& w_hh, Cell cell, int64_t H) {
  const int64_t G = cell == Cell::kLstm ? 4 : cell == Cell::kGru ? 3 : 1;
  const int64_t E = G * (G + 1) / 2 + (cell == Cell::kGru ? 3 : 0);
  at::Tensor gram = at::empty({E, H}, w_hh.options());
  const T* w = w_hh.const_data_ptr<T>();
  T* out = gram.data_ptr<T>();
  at::parallel_for(0, H, 1 + 4096 / (E * H), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      int64_t e = 0;
      for (int64_t a = 0; a < G; ++a) {
        for (int64_t b = a; b < G; ++b, ++e) {
          const T* wa = w + (a * H + j) * H;
          const T* wb = w + (b * H + j) * H;
          double acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t k = 0; k < H; ++k) acc += static_cast<double>(wa[k]) * static_cast<double>(wb[k]);
          out[e * H + j] = static_cast<T>(acc);
        }
      }
      if (cell == Cell::kGru) {
        for (int64_t a = 0; a < 3; ++a) out[(e + a) * H + j] = w[(a * H + j) * H + j];
      }
    }
  });
  return gram;
}

// Fewest batch rows per thread: the per-step GEMM loses efficiency on fewer rows.
constexpr int64_t kRowGrain = 4;

struct Steps {
  int64_t T;
  bool reverse;
  int64_t position(int64_t s) const { return reverse ? T - 1 - s : s; }
  // Slots of states [T+1, B, H] holding the output of position t and the state before it.
  int64_t out_slot(int64_t t) const { return reverse ? t : t + 1; }
  int64_t prev_slot(int64_t t) const { return reverse ? t + 1 : t; }
  int64_t init_slot() const { return reverse ? T : 0; }
};

template <typename T>
void forward_impl(Cell cell, int64_t G, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                  const at::Tensor& w, const at::Tensor& bhh, const at::Tensor& len, bool reverse, bool track,
                  at::Tensor& states, at::Tensor& cells, at::Tensor& ws, at::Tensor& jac) {
  const int64_t T_ = x.size(0), B = x.size(1), H = h0.size(1), GH = G * H, BH = B * H;
  const Steps steps{T_, reverse};
  states.select(0, steps.init_slot()).copy_(h0);
  if (cell == Cell::kLstm) cells.select(0, steps.init_slot()).copy_(c0);
  if (B == 0) return;

  at::Tensor bias = cell == Cell::kGru ? (bhh.defined() ? bhh.contiguous() : at::zeros({GH}, x.options()))
                                       : at::Tensor();
  at::Tensor gram = track ? gram_entries<T>(w, cell, H) : at::Tensor();
  const RowsGemm<T> step_gemm(w, /*trans_w=*/true);  // h_prev W_hh^T
  const ForwardRows<T> rows = pick_forward<T>(cell, track);

  const T* xp = x.const_data_ptr<T>();
  T* sp = states.data_ptr<T>();
  T* cp = cell == Cell::kLstm ? cells.data_ptr<T>() : nullptr;
  T* wsp = ws.numel() ? ws.data_ptr<T>() : nullptr;
  float* jp = track ? jac.data_ptr<float>() : nullptr;
  const int64_t* lp = len.defined() ? len.const_data_ptr<int64_t>() : nullptr;

  // Samples are independent: each thread runs the whole time loop over its own batch rows, so the
  // steps need no barrier. Pointers below address the thread's first row.
  at::parallel_for(0, B, kRowGrain, [&](int64_t b0, int64_t b1) {
    const int64_t nb = b1 - b0;
    at::Tensor hh = at::empty({nb, GH}, x.options());
    at::Tensor scratch = at::empty({track ? H : 0}, x.options());
    FwdStep<T> st;
    st.H = H;
    st.hh = hh.data_ptr<T>();
    st.scratch = track ? scratch.data_ptr<T>() : nullptr;
    st.bhh = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
    st.gram = gram.defined() ? gram.const_data_ptr<T>() : nullptr;
    st.len = lp ? lp + b0 : nullptr;
    for (int64_t s = 0; s < T_; ++s) {
      const int64_t t = steps.position(s);
      const int64_t out = steps.out_slot(t) * BH + b0 * H, prev = steps.prev_slot(t) * BH + b0 * H;
      step_gemm.run(nb, sp + prev, H, /*accumulate=*/false, hh.data_ptr<T>(), GH);
      st.t = t;
      st.x = xp + (t * B + b0) * GH;
      st.hp = sp + prev;
      st.h = sp + out;
      if (cp) {
        st.cp = cp + prev;
        st.c = cp + out;
      }
      if (wsp) st.ws = wsp + (t * B + b0) * 4 * H;
      if (jp) st.jac = jp + t * B + b0;
      rows(st, 0, nb);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_forward_cpu(
    const at::Tensor& xproj, const at::Tensor& h0, const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& probe, c10::string_view mode, bool reverse, bool track) {
  constexpr const char* op = "vgk::rnn_forward";
  const Mode m = parse_mode(mode);
  TORCH_CHECK(xproj.device().is_cpu(), op, ": xproj must be a CPU tensor, got one on ", xproj.device());
  const auto dtype = xproj.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op,
                   ": xproj must be float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(xproj.dim() == 3 && xproj.size(0) >= 1, op,
                    ": xproj must have shape [T, B, G*H] with T >= 1, got ", xproj.sizes());
  TORCH_CHECK_VALUE(h0.dim() == 2 && h0.size(1) >= 1, op, ": h0 must have shape [B, H] with H >= 1, got ",
                    h0.sizes());
  const int64_t T_ = xproj.size(0), B = xproj.size(1), H = h0.size(1), GH = m.gates * H;
  check_tensor(op, "xproj", xproj, dtype, {T_, B, GH});
  check_tensor(op, "h0", h0, dtype, {B, H});
  check_tensor(op, "w_hh", w_hh, dtype, {GH, H});
  const bool has_c0 = c0.has_value() && c0->defined();
  const bool has_b = b_hh.has_value() && b_hh->defined();
  if (m.cell == Cell::kLstm) {
    TORCH_CHECK_VALUE(has_c0, op, ": c0 [B, H] is required for mode 'lstm'");
    check_tensor(op, "c0", *c0, dtype, {B, H});
  } else {
    TORCH_CHECK_VALUE(!has_c0, op, ": c0 must be None for mode '", std::string(mode), "'");
  }
  if (m.cell == Cell::kGru) {
    if (has_b) check_tensor(op, "b_hh", *b_hh, dtype, {GH});
  } else {
    TORCH_CHECK_VALUE(!has_b, op, ": b_hh must be None for mode '", std::string(mode),
                      "' (add it to xproj)");
  }
  const at::Tensor len = checked_lengths(op, lengths, B, T_);

  const auto opts = xproj.options();
  at::Tensor states = at::empty({T_ + 1, B, H}, opts);
  at::Tensor cells = m.cell == Cell::kLstm ? at::empty({T_ + 1, B, H}, opts) : at::empty({0}, opts);
  const bool gated = m.cell == Cell::kLstm || m.cell == Cell::kGru;
  at::Tensor ws = gated ? at::empty({T_, B, 4 * H}, opts) : at::empty({0}, opts);
  at::Tensor jac = track ? at::empty({T_, B}, opts.dtype(at::kFloat)) : at::empty({0}, opts.dtype(at::kFloat));

  AT_DISPATCH_FLOATING_TYPES(dtype, "rnn_forward", [&] {
    forward_impl<scalar_t>(m.cell, m.gates, xproj.contiguous(), h0, has_c0 ? c0->contiguous() : at::Tensor(),
                           w_hh.contiguous(), has_b ? *b_hh : at::Tensor(), len, reverse, track, states,
                           cells, ws, jac);
  });
  return {states, cells, ws, jac};
}

template <typename T>
void backward_impl(Cell cell, int64_t G, const at::Tensor& gstates, const at::Tensor& gcells,
                   const at::Tensor& states, const at::Tensor& cells, const at::Tensor& ws, const at::Tensor& w,
                   const at::Tensor& len, bool reverse, std::optional<double> grad_clip, bool track,
                   at::Tensor& gx, at::Tensor& gh0, at::Tensor& gc0, at::Tensor& gw, at::Tensor& gb,
                   at::Tensor& gsq) {
  const int64_t T_ = states.size(0) - 1, B = states.size(1), H = states.size(2), GH = G * H, BH = B * H;
  const Steps steps{T_, reverse};
  const bool lstm = cell == Cell::kLstm, gru = cell == Cell::kGru;
  if (B == 0) {
    gh0.copy_(gstates.select(0, steps.init_slot()));
    if (lstm) gcells.defined() ? gc0.copy_(gcells.select(0, steps.init_slot())) : gc0.zero_();
    gw.zero_();
    gb.zero_();
    return;
  }

  // Gradient reaching the state before the current step (and the cell state): zero at the end.
  at::Tensor dh = at::zeros({B, H}, states.options());
  at::Tensor dc = lstm ? at::zeros({B, H}, states.options()) : at::Tensor();
  // GRU: the gradient of h_prev W_hh^T + b_hh differs from grad_xproj in its n block (d hn = r * d n_pre).
  at::Tensor rec = gru ? at::empty({T_, B, GH}, states.options()) : at::Tensor();
  const RowsGemm<T> step_gemm(w, /*trans_w=*/false);  // dgates W_hh
  const BackwardRows<T> rows = pick_backward<T>(cell, track);
  const T clip = grad_clip.has_value() ? static_cast<T>(*grad_clip) : std::numeric_limits<T>::infinity();

  const T* sp = states.const_data_ptr<T>();
  const T* gsp = gstates.const_data_ptr<T>();
  const T* cp = lstm ? cells.const_data_ptr<T>() : nullptr;
  // An LSTM called without a cell-state gradient reads one zero row block at every step instead.
  const at::Tensor zero_rows = lstm && !gcells.defined() ? at::zeros({B, H}, states.options()) : at::Tensor();
  const T* gcp = !lstm ? nullptr : gcells.defined() ? gcells.const_data_ptr<T>() : zero_rows.const_data_ptr<T>();
  const int64_t gc_step = gcells.defined() ? BH : 0;
  const T* wsp = ws.numel() ? ws.const_data_ptr<T>() : nullptr;
  T* gxp = gx.data_ptr<T>();
  float* qp = track ? gsq.data_ptr<float>() : nullptr;
  const int64_t* lp = len.defined() ? len.const_data_ptr<int64_t>() : nullptr;

  // As in the forward, each thread runs the whole reverse loop over its own batch rows.
  at::parallel_for(0, B, kRowGrain, [&](int64_t b0, int64_t b1) {
    const int64_t nb = b1 - b0;
    BwdStep<T> st;
    st.H = H;
    st.dh = dh.data_ptr<T>() + b0 * H;
    st.dc = lstm ? dc.data_ptr<T>() + b0 * H : nullptr;
    st.len = lp ? lp + b0 : nullptr;
    st.clip = clip;
    for (int64_t s = T_ - 1; s >= 0; --s) {
      const int64_t t = steps.position(s);
      const int64_t out = steps.out_slot(t) * BH + b0 * H, prev = steps.prev_slot(t) * BH + b0 * H;
      st.t = t;
      st.gs = gsp + out;
      st.h = sp + out;
      st.hp = sp + prev;
      if (lstm) {
        st.gcs = gcp + (gc_step ? out : b0 * H);
        st.c = cp + out;
        st.cp = cp + prev;
      }
      if (wsp) st.ws = wsp + (t * B + b0) * 4 * H;
      st.gx = gxp + (t * B + b0) * GH;
      if (gru) st.rec = rec.data_ptr<T>() + (t * B + b0) * GH;
      if (qp) {
        st.gsq_h = qp + t * B + b0;
        if (lstm) st.gsq_c = qp + (T_ + t) * B + b0;
      }
      rows(st, 0, nb);
      step_gemm.run(nb, gru ? st.rec : st.gx, GH, /*accumulate=*/true, st.dh, H);
    }
  });

  at::add_out(gh0, dh, gstates.select(0, steps.init_slot()));
  if (lstm) gcells.defined() ? at::add_out(gc0, dc, gcells.select(0, steps.init_slot())) : gc0.copy_(dc);
  // grad_w_hh = sum over positions of the recurrent pre-activation gradients^T h_prev: one GEMM over the
  // T*B rows. brgemm wants both operands row-major, so it computes grad_w_hh^T = H_prev^T D.
  const at::Tensor D = (gru ? rec : gx).view({T_ * B, GH});
  const at::Tensor hprev = states.narrow(0, reverse ? 1 : 0, T_).reshape({T_ * B, H});
  if (brgemm_enabled<T>()) {
    const at::Tensor hprev_t = hprev.t().contiguous();
    at::Tensor gw_t = at::empty({H, GH}, gw.options());
    if constexpr (std::is_same_v<T, float>) {
      tiled_brgemm(H, GH, T_ * B, hprev_t.const_data_ptr<float>(), T_ * B, D.const_data_ptr<float>(), GH,
                   gw_t.data_ptr<float>(), GH);
    }
    gw.copy_(gw_t.t());
  } else {
    gemm<T>(true, false, GH, H, T_ * B, D.const_data_ptr<T>(), GH, hprev.const_data_ptr<T>(), H, T(0),
            gw.data_ptr<T>(), H);
  }
  if (gb.numel()) at::sum_out(gb, D, at::IntArrayRef{0});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_backward_cpu(
    const at::Tensor& grad_states, const at::Tensor& grad_cell_states, const at::Tensor& states,
    const at::Tensor& cell_states, const at::Tensor& workspace, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& lengths, c10::string_view mode, bool reverse, std::optional<double> grad_clip,
    bool track, bool has_b_hh) {
  constexpr const char* op = "vgk::rnn_backward";
  const Mode m = parse_mode(mode);
  TORCH_CHECK(states.device().is_cpu(), op, ": states must be a CPU tensor, got one on ", states.device());
  const auto dtype = states.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op,
                   ": states must be float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(states.dim() == 3 && states.size(0) >= 2 && states.size(2) >= 1, op,
                    ": states must have shape [T+1, B, H] with T >= 1 and H >= 1, got ", states.sizes());
  const int64_t T_ = states.size(0) - 1, B = states.size(1), H = states.size(2), GH = m.gates * H;
  const bool lstm = m.cell == Cell::kLstm, gru = m.cell == Cell::kGru;
  check_tensor(op, "grad_states", grad_states, dtype, {T_ + 1, B, H});
  check_tensor(op, "w_hh", w_hh, dtype, {GH, H});
  if (lstm) {
    check_tensor(op, "cell_states", cell_states, dtype, {T_ + 1, B, H});
    // An empty grad_cell_states stands for zeros (no gradient reaches the cell states from outside).
    if (grad_cell_states.numel() != 0 || grad_cell_states.dim() != 1) {
      check_tensor(op, "grad_cell_states", grad_cell_states, dtype, {T_ + 1, B, H});
    }
  }
  if (lstm || gru) check_tensor(op, "workspace", workspace, dtype, {T_, B, 4 * H});
  if (grad_clip.has_value()) {
    TORCH_CHECK_VALUE(*grad_clip > 0, op, ": grad_clip must be None or > 0, got ", *grad_clip);
  }
  const at::Tensor len = checked_lengths(op, lengths, B, T_);

  const auto opts = states.options();
  at::Tensor gx = at::empty({T_, B, GH}, opts);
  at::Tensor gh0 = at::empty({B, H}, opts);
  at::Tensor gc0 = lstm ? at::empty({B, H}, opts) : at::empty({0}, opts);
  at::Tensor gw = at::empty({GH, H}, opts);
  at::Tensor gb = gru && has_b_hh ? at::empty({GH}, opts) : at::empty({0}, opts);
  at::Tensor gsq = track ? at::empty({lstm ? 2 : 1, T_, B}, opts.dtype(at::kFloat))
                         : at::empty({0}, opts.dtype(at::kFloat));

  AT_DISPATCH_FLOATING_TYPES(dtype, "rnn_backward", [&] {
    backward_impl<scalar_t>(m.cell, m.gates, grad_states.contiguous(),
                            lstm && grad_cell_states.numel() ? grad_cell_states.contiguous() : at::Tensor(),
                            states.contiguous(),
                            lstm ? cell_states.contiguous() : at::Tensor(),
                            lstm || gru ? workspace.contiguous() : at::Tensor(), w_hh.contiguous(), len,
                            reverse, grad_clip, track, gx, gh0, gc0, gw, gb, gsq);
  });
  return {gx, gh0, gc0, gw, gb, gsq};
}

}  // namespace
}  // namespace vgk::rnn

namespace vgk {

void define_recurrent_ops(torch::Library& m) {
  // One direction of one layer over the whole sequence. See vgkernels/ops/recurrent.py for the
  // meaning of every argument and output; the Python side owns the autograd registration.
  m.def(
      "rnn_forward(Tensor xproj, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? b_hh, Tensor? lengths, "
      "Tensor? probe, str mode, bool reverse, bool track) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "rnn_backward(Tensor grad_states, Tensor grad_cell_states, Tensor states, Tensor cell_states, "
      "Tensor workspace, Tensor w_hh, Tensor? lengths, str mode, bool reverse, float? grad_clip, "
      "bool track, bool has_b_hh) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace vgk

TORCH_LIBRARY_IMPL(vgk, CPU, m) {
  m.impl("rnn_forward", &vgk::rnn::rnn_forward_cpu);
  m.impl("rnn_backward", &vgk::rnn::rnn_backward_cpu);
}
