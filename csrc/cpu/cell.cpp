// One step of an LSTM, GRU or Elman RNN cell for CPU tensors: the fused LSTMCell, GRUCell and RNNCell.
//
// Forward: the GEMM pair x W_ih^T and h W_hh^T (accumulated into one buffer, except for the GRU whose
// r multiplies only the recurrent part of n), then ONE pointwise pass over the rows that writes the
// new state, the values the backward needs and, with tracking, the squared Frobenius norm of the step
// Jacobian per sample. Backward: ONE pointwise pass writing the gate pre-activation gradients (and
// the direct parts of the state gradients), then GEMMs for dx, dh, dW_ih, dW_hh and the bias sums.
// The pointwise passes are the recurrent layers' own (recurrent_kernels.h), run for a single step.
//
// The autograd of cell_forward is C++ (a Python autograd wrapper costs tens of microseconds per call,
// more than the whole step at batch 1). A backward with create_graph=True goes through
// vgk::cell_backward_differentiable instead, and forward-mode AD (inputs with tangents) through
// vgk::cell_forward_differentiable: vgkernels/ops/cell.py implements both with differentiable torch
// operations, so that second derivatives and tangents are right rather than silently zero.
//
// Workspace (private to this backend, input dtype): LSTM the activated gates i, f, g, o [B, 4H];
// GRU r, z, n and hn = W_hn h + b_hn [B, 4H]; Elman: [0], the derivative follows from h.
// grad_sq (tracking): float64 [2, K, B], K = 2 for the LSTM (h then c) else 1; [0] holds the squared
// norms of the gradients reaching the input states, [1] those reaching the output states.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "block_cache.h"
#include "ops.h"
#include "recurrent_args.h"
#include "recurrent_blas.h"
#include "recurrent_gram.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define VGK_CELL_AVX2 1
#endif

namespace vgk::rnn {

// The pointwise passes, compiled once per instruction set (see recurrent.cpp for the flags).
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#ifdef VGK_CELL_AVX2
namespace cell_avx2 {
#define VGK_FN __attribute__((target("avx2,fma")))
#include "recurrent_kernels.h"
#undef VGK_FN
}  // namespace cell_avx2
#endif

namespace cell_base {
#define VGK_FN
#include "recurrent_kernels.h"
#undef VGK_FN
}  // namespace cell_base
#pragma GCC pop_options

namespace {

#ifdef VGK_CELL_AVX2
#define VGK_CELL_PICK(fn, T, TRACK, cell) \
  (cpu_has_avx2_fma() ? cell_avx2::fn<T, TRACK>(cell) : cell_base::fn<T, TRACK>(cell))
#else
#define VGK_CELL_PICK(fn, T, TRACK, cell) (cell_base::fn<T, TRACK>(cell))
#endif

template <typename T>
ForwardRows<T> forward_pass(Cell cell, bool track) {
  return track ? VGK_CELL_PICK(forward_rows, T, true, cell) : VGK_CELL_PICK(forward_rows, T, false, cell);
}

template <typename T>
BackwardRows<T> backward_pass(Cell cell, bool track) {
  return track ? VGK_CELL_PICK(backward_rows, T, true, cell) : VGK_CELL_PICK(backward_rows, T, false, cell);
}
#undef VGK_CELL_PICK

constexpr const char* kFwd = "vgk::cell_forward";
constexpr const char* kBwd = "vgk::cell_backward";

struct CellMode {
  Cell cell;
  int64_t gates;
};

CellMode parse_cell_mode(const char* op, c10::string_view mode) {
  if (mode == "lstm") return {Cell::kLstm, 4};
  if (mode == "gru") return {Cell::kGru, 3};
  if (mode == "rnn_tanh") return {Cell::kTanh, 1};
  if (mode == "rnn_relu") return {Cell::kRelu, 1};
  if (mode == "rnn_sigmoid") return {Cell::kSigmoid, 1};
  TORCH_CHECK_VALUE(false, op, ": mode must be one of 'lstm', 'gru', 'rnn_tanh', 'rnn_relu', 'rnn_sigmoid', got '",
                    std::string(mode), "'");
}

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// An empty 1-D tensor stands for an absent gradient.
bool absent_grad(const at::Tensor& g) { return !g.defined() || (g.dim() == 1 && g.numel() == 0); }

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), " like input, got ",
              t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ",
                   like.scalar_type(), " like input, got ", t.scalar_type());
}

void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef sizes) {
  TORCH_CHECK_VALUE(t.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", t.sizes());
}

// torch.nn's checks of a cell's state (aten/src/ATen/native/RNN.cpp), with its messages.
void check_hidden(const at::Tensor& input, const at::Tensor& hx, int64_t hidden_size, int label) {
  TORCH_CHECK(hx.dim() == 2, kFwd, ": hx[", label, "] must be 2-D [batch, hidden_size] like the 2-D input, got ",
              hx.dim(), "-D");
  TORCH_CHECK(input.size(0) == hx.size(0), "Input batch size ", input.size(0), " doesn't match hidden", label,
              " batch size ", hx.size(0));
  TORCH_CHECK(hx.size(1) == hidden_size, "hidden", label, " has inconsistent hidden_size: got ", hx.size(1),
              ", expected ", hidden_size);
  check_like(kFwd, label == 0 ? "hx" : "cx", hx, input);
}

// Every row of a [B, n] buffer set to the vector v [n].
template <typename T>
void fill_rows(T* dst, const T* v, int64_t B, int64_t n) {
  for (int64_t b = 0; b < B; ++b) std::memcpy(dst + b * n, v, sizeof(T) * n);
}

// Rows per parallel chunk of a pointwise pass: at least ~16K values, below which a parallel region
// costs more than it saves.
int64_t row_grain(int64_t row_values) { return 1 + 16384 / std::max<int64_t>(row_values, 1); }

using Four = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Four cell_forward_cpu(const at::Tensor& input, const std::optional<at::Tensor>& hx,
                      const std::optional<at::Tensor>& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                      const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                      const std::optional<at::Tensor>& probe, c10::string_view mode, bool track) {
  const CellMode m = parse_cell_mode(kFwd, mode);
  const bool lstm = m.cell == Cell::kLstm, gru = m.cell == Cell::kGru, gated = lstm || gru;
  TORCH_CHECK(input.device().is_cpu(), kFwd, ": input must be a CPU tensor, got one on ", input.device());
  const auto dtype = input.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, kFwd, ": input must be float32 or float64, got ",
                   dtype);
  TORCH_CHECK_VALUE(input.dim() == 2, kFwd, ": input must be 2-D [batch, input_size], got shape ", input.sizes());
  TORCH_CHECK_VALUE(w_hh.dim() == 2 && w_ih.dim() == 2, kFwd, ": w_ih and w_hh must be 2-D, got shapes ",
                    w_ih.sizes(), " and ", w_hh.sizes());
  const int64_t B = input.size(0), I = input.size(1), H = w_hh.size(1), GH = m.gates * H;
  TORCH_CHECK(I == w_ih.size(1), "input has inconsistent input_size: got ", I, " expected ", w_ih.size(1));
  check_shape(kFwd, "w_ih", w_ih, {GH, I});
  check_shape(kFwd, "w_hh", w_hh, {GH, H});
  check_like(kFwd, "w_ih", w_ih, input);
  check_like(kFwd, "w_hh", w_hh, input);
  const bool has_h = present(hx), has_c = present(cx);
  if (has_h) check_hidden(input, *hx, H, 0);
  if (lstm) {
    TORCH_CHECK_VALUE(has_c == has_h, kFwd, ": the LSTM takes both hx and cx or neither");
    if (has_c) check_hidden(input, *cx, H, 1);
  } else {
    TORCH_CHECK_VALUE(!has_c, kFwd, ": cx must be None for mode '", std::string(mode), "'");
  }
  const bool has_bias = present(b_ih);
  TORCH_CHECK_VALUE(has_bias == present(b_hh), kFwd, ": b_ih and b_hh must both be given or both be None");
  if (has_bias) {
    check_shape(kFwd, "b_ih", *b_ih, {GH});
    check_shape(kFwd, "b_hh", *b_hh, {GH});
    check_like(kFwd, "b_ih", *b_ih, input);
    check_like(kFwd, "b_hh", *b_hh, input);
  }

  const auto opts = input.options();
  at::Tensor h = at::empty({B, H}, opts);
  at::Tensor c = lstm ? at::empty({B, H}, opts) : at::empty({0}, opts);
  at::Tensor ws = gated ? cached_empty({B, 4 * H}, opts) : at::empty({0}, opts);
  at::Tensor jac = at::empty({track ? B : 0}, opts.dtype(at::kFloat));
  if (B == 0 || H == 0) {
    jac.zero_();
    return {h, c, ws, jac};
  }

  AT_DISPATCH_FLOATING_TYPES(dtype, "cell_forward", [&] {
    using T = scalar_t;
    const at::Tensor x = input.contiguous(), wih = w_ih.contiguous(), whh = w_hh.contiguous();
    const at::Tensor hp = has_h ? hx->contiguous() : at::Tensor();
    // An absent state is zero: its GEMM is skipped, and the passes that read it read zeros.
    const at::Tensor zeros = (!has_h && (gru || lstm)) || !has_bias ? at::zeros({std::max(B * H, GH)}, opts)
                                                                      : at::Tensor();
    const T* zp = zeros.defined() ? zeros.const_data_ptr<T>() : nullptr;
    const at::Tensor bi = has_bias ? b_ih->contiguous() : at::Tensor(), bh = has_bias ? b_hh->contiguous() : at::Tensor();
    const T* bip = has_bias ? bi.const_data_ptr<T>() : zp;
    const T* bhp = has_bias ? bh.const_data_ptr<T>() : zp;
    at::Tensor acc = cached_empty({B, GH}, opts);  // gate pre-activations (GRU: the recurrent part)
    at::Tensor xrows = gru ? cached_empty({B, GH}, opts) : at::Tensor();
    T* ap = acc.data_ptr<T>();
    FwdStep<T> st;
    st.H = H;
    if (gru) {
      // r scales only W_hn h + b_hn, so the input and recurrent products stay apart.
      gemm<T>(false, true, B, GH, I, x.const_data_ptr<T>(), I, wih.const_data_ptr<T>(), I, T(0),
              xrows.data_ptr<T>(), GH);
      if (has_h) {
        gemm<T>(false, true, B, GH, H, hp.const_data_ptr<T>(), H, whh.const_data_ptr<T>(), H, T(0), ap, GH);
      } else {
        acc.zero_();
      }
      st.x = xrows.const_data_ptr<T>();
      st.xs = GH;
      st.bx = bip;
      st.bhh = bhp;
    } else {
      // b_ih + x W_ih^T + h W_hh^T in one buffer; the pass adds b_hh as its input row.
      T beta = T(0);
      if (has_bias) {
        fill_rows(ap, bip, B, GH);
        beta = T(1);
      }
      gemm<T>(false, true, B, GH, I, x.const_data_ptr<T>(), I, wih.const_data_ptr<T>(), I, beta, ap, GH);
      if (has_h) {
        gemm<T>(false, true, B, GH, H, hp.const_data_ptr<T>(), H, whh.const_data_ptr<T>(), H, T(1), ap, GH);
      }
      st.x = bhp;
      st.xs = 0;
    }
    st.hh = ap;
    st.hp = has_h ? hp.const_data_ptr<T>() : zp;
    st.h = h.data_ptr<T>();
    const at::Tensor cp = lstm && has_c ? cx->contiguous() : at::Tensor();
    if (lstm) {
      st.cp = has_c ? cp.const_data_ptr<T>() : zp;
      st.c = c.data_ptr<T>();
    }
    if (gated) st.ws = ws.data_ptr<T>();
    const at::Tensor gram = track ? gram_entries<T>(whh, m.gates, H, /*diagonals=*/gru) : at::Tensor();
    if (track) {
      st.gram = gram.const_data_ptr<T>();
      st.jac = jac.data_ptr<float>();
    }
    const ForwardRows<T> rows = forward_pass<T>(m.cell, track);
    at::parallel_for(0, B, row_grain(m.gates * H), [&](int64_t b0, int64_t b1) {
      FwdStep<T> mine = st;
      at::Tensor scratch = lstm && track ? at::empty({H}, opts) : at::Tensor();  // tanh(c) of the row
      if (scratch.defined()) mine.scratch = scratch.data_ptr<T>();
      rows(mine, b0, b1);
    });
  });
  return {h, c, ws, jac};
}

using Eight = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor>;

// The per-row squared norms of a [B, H] gradient into out[b], in double.
template <typename T>
void row_squares(const T* g, int64_t B, int64_t H, double* out) {
  for (int64_t b = 0; b < B; ++b) {
    double acc = 0;
    const T* row = g + b * H;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < H; ++j) acc += static_cast<double>(row[j]) * static_cast<double>(row[j]);
    out[b] = acc;
  }
}

Eight cell_backward_cpu(const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& input,
                        const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
                        const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& h, const at::Tensor& c,
                        const at::Tensor& workspace, c10::string_view mode, bool track, bool has_bias,
                        bool input_grad, bool hidden_grad, bool weight_grad) {
  const CellMode m = parse_cell_mode(kBwd, mode);
  const bool lstm = m.cell == Cell::kLstm, gru = m.cell == Cell::kGru;
  TORCH_CHECK(h.device().is_cpu(), kBwd, ": h must be a CPU tensor, got one on ", h.device());
  const auto dtype = input.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, kBwd, ": input must be float32 or float64, got ",
                   dtype);
  TORCH_CHECK_VALUE(input.dim() == 2 && w_hh.dim() == 2, kBwd, ": input and w_hh must be 2-D, got shapes ",
                    input.sizes(), " and ", w_hh.sizes());
  const int64_t B = input.size(0), I = input.size(1), H = w_hh.size(1), GH = m.gates * H;
  check_shape(kBwd, "w_ih", w_ih, {GH, I});
  check_shape(kBwd, "w_hh", w_hh, {GH, H});
  check_shape(kBwd, "h", h, {B, H});
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"w_ih", &w_ih}, {"w_hh", &w_hh}, {"h", &h}}) {
    check_like(kBwd, name, *t, input);
  }
  const bool has_h = present(hx), has_c = present(cx);
  if (has_h) check_shape(kBwd, "hx", *hx, {B, H});
  if (lstm) {
    TORCH_CHECK_VALUE(has_c == has_h, kBwd, ": the LSTM takes both hx and cx or neither");
    if (has_c) check_shape(kBwd, "cx", *cx, {B, H});
    check_shape(kBwd, "c", c, {B, H});
  }
  if (lstm || gru) check_shape(kBwd, "workspace", workspace, {B, 4 * H});
  const bool has_gh = !absent_grad(grad_h), has_gc = lstm && !absent_grad(grad_c);
  if (has_gh) check_shape(kBwd, "grad_h", grad_h, {B, H});
  if (has_gc) check_shape(kBwd, "grad_c", grad_c, {B, H});

  const auto opts = input.options();
  // A gradient not asked for comes back as a distinct empty tensor (the outputs never alias).
  const auto none = [&] { return at::empty({0}, opts); };
  const bool need_dh = hidden_grad || track;
  at::Tensor gx = input_grad ? at::empty({B, I}, opts) : none();
  at::Tensor ghx = need_dh ? at::zeros({B, H}, opts) : none();  // the passes add into it
  at::Tensor gcx = lstm && need_dh ? at::zeros({B, H}, opts) : none();
  at::Tensor gw_ih = weight_grad ? cached_empty({GH, I}, opts) : none();
  at::Tensor gw_hh = weight_grad ? cached_empty({GH, H}, opts) : none();
  at::Tensor gb_ih = weight_grad && has_bias ? at::empty({GH}, opts) : none();
  at::Tensor gb_hh = weight_grad && has_bias ? at::empty({GH}, opts) : none();
  const int64_t K = lstm ? 2 : 1;
  at::Tensor gsq = track ? at::zeros({2, K, B}, opts.dtype(at::kDouble)) : at::empty({0}, opts.dtype(at::kDouble));
  if (B == 0 || H == 0) {
    for (at::Tensor* t : {&gx, &gw_ih, &gw_hh, &gb_ih, &gb_hh}) t->zero_();
    return {gx, ghx, gcx, gw_ih, gw_hh, gb_ih, gb_hh, gsq};
  }

  AT_DISPATCH_FLOATING_TYPES(dtype, "cell_backward", [&] {
    using T = scalar_t;
    const at::Tensor x = input.contiguous(), wih = w_ih.contiguous(), whh = w_hh.contiguous();
    const at::Tensor hp = has_h ? hx->contiguous() : at::Tensor();
    const at::Tensor cp = lstm && has_c ? cx->contiguous() : at::Tensor();
    const at::Tensor gh = has_gh ? grad_h.contiguous() : at::Tensor(), gc = has_gc ? grad_c.contiguous() : at::Tensor();
    const at::Tensor hc = h.contiguous(), cc = lstm ? c.contiguous() : at::Tensor();
    const at::Tensor ws = lstm || gru ? workspace.contiguous() : at::Tensor();
    // Absent gradients and states read zeros; the passes write their running gradient into dh (and
    // dc), so without a state gradient to return they get a scratch of their own.
    const at::Tensor zeros = at::zeros({B * H}, opts);
    const T* zp = zeros.const_data_ptr<T>();
    at::Tensor dh = need_dh ? ghx : at::zeros({B, H}, opts);
    at::Tensor dc = !lstm ? at::Tensor() : need_dh ? gcx : at::zeros({B, H}, opts);
    at::Tensor D = cached_empty({B, GH}, opts);  // gate pre-activation gradients
    at::Tensor rec = gru ? cached_empty({B, GH}, opts) : at::Tensor();  // GRU: of h W_hh^T + b_hh
    BwdStep<T> st;
    st.H = H;
    st.gs = has_gh ? gh.const_data_ptr<T>() : zp;
    st.dh = dh.data_ptr<T>();
    st.h = hc.const_data_ptr<T>();
    st.hp = has_h ? hp.const_data_ptr<T>() : zp;
    if (lstm) {
      st.gcs = has_gc ? gc.const_data_ptr<T>() : zp;
      st.dc = dc.data_ptr<T>();
      st.c = cc.const_data_ptr<T>();
      st.cp = has_c ? cp.const_data_ptr<T>() : zp;
    }
    if (ws.defined()) st.ws = ws.const_data_ptr<T>();
    st.gx = D.data_ptr<T>();
    if (gru) st.rec = rec.data_ptr<T>();
    st.clip = std::numeric_limits<T>::infinity();
    double* out_sq = track ? gsq.data_ptr<double>() + K * B : nullptr;  // grad_sq[1]: the output states
    if (track) {
      st.gsq_h = out_sq;
      if (lstm) st.gsq_c = out_sq + B;
    }
    const BackwardRows<T> rows = backward_pass<T>(m.cell, track);
    at::parallel_for(0, B, row_grain(m.gates * H), [&](int64_t b0, int64_t b1) { rows(st, b0, b1); });

    const T* Dx = D.const_data_ptr<T>();
    const T* Dh = gru ? rec.const_data_ptr<T>() : Dx;
    // grad_hx = (direct part, left in dh by the pass) + D W_hh; grad_cx is the pass's dc.
    if (need_dh) gemm<T>(false, false, B, H, GH, Dh, GH, whh.const_data_ptr<T>(), H, T(1), dh.data_ptr<T>(), H);
    if (input_grad) gemm<T>(false, false, B, I, GH, Dx, GH, wih.const_data_ptr<T>(), I, T(0), gx.data_ptr<T>(), I);
    if (weight_grad) {
      gemm<T>(true, false, GH, I, B, Dx, GH, x.const_data_ptr<T>(), I, T(0), gw_ih.data_ptr<T>(), I);
      if (has_h) {
        gemm<T>(true, false, GH, H, B, Dh, GH, hp.const_data_ptr<T>(), H, T(0), gw_hh.data_ptr<T>(), H);
      } else {
        gw_hh.zero_();
      }
      if (has_bias) {
        at::sum_out(gb_ih, D, at::IntArrayRef{0});
        gru ? at::sum_out(gb_hh, rec, at::IntArrayRef{0}) : gb_hh.copy_(gb_ih);
      }
    }
    if (track) {
      double* in_sq = gsq.data_ptr<double>();  // grad_sq[0]: the input states
      row_squares<T>(dh.const_data_ptr<T>(), B, H, in_sq);
      if (lstm) row_squares<T>(dc.const_data_ptr<T>(), B, H, in_sq + B);
    }
  });
  return {gx, ghx, gcx, gw_ih, gw_hh, gb_ih, gb_hh, gsq};
}

// ---------------------------------------------------------------------------------------------------
// Autograd, in C++.

Four forward_op(const at::Tensor& input, const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
                const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& probe,
                c10::string_view mode, bool track) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vgk::cell_forward", "")
                             .typed<Four(const at::Tensor&, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, c10::string_view, bool)>();
  return op.call(input, hx, cx, w_ih, w_hh, b_ih, b_hh, probe, mode, track);
}

Eight backward_op(const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& input,
                  const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx, const at::Tensor& w_ih,
                  const at::Tensor& w_hh, const at::Tensor& h, const at::Tensor& c, const at::Tensor& ws,
                  c10::string_view mode, bool track, bool has_bias, bool input_grad, bool hidden_grad,
                  bool weight_grad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vgk::cell_backward", "")
                             .typed<Eight(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, c10::string_view, bool, bool, bool, bool, bool)>();
  return op.call(grad_h, grad_c, input, hx, cx, w_ih, w_hh, h, c, ws, mode, track, has_bias, input_grad,
                 hidden_grad, weight_grad);
}

// The gradients of (input, hx, cx, w_ih, w_hh, b_ih, b_hh) through differentiable torch operations
// (vgkernels/ops/cell.py); an input that needs none comes back empty.
std::vector<at::Tensor> differentiable_backward_op(const at::Tensor& grad_h, const at::Tensor& grad_c,
                                                   const at::Tensor& input, const std::optional<at::Tensor>& hx,
                                                   const std::optional<at::Tensor>& cx, const at::Tensor& w_ih,
                                                   const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                                   const std::optional<at::Tensor>& b_hh, c10::string_view mode) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vgk::cell_backward_differentiable", "")
                             .typed<std::vector<at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&,
                                 const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                 c10::string_view)>();
  return op.call(grad_h, grad_c, input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode);
}

// (h', c') of (input, hx, cx, w_ih, w_hh, b_ih, b_hh) through differentiable torch operations
// (vgkernels/ops/cell.py); c' is empty but for the LSTM.
std::vector<at::Tensor> differentiable_forward_op(const at::Tensor& input, const std::optional<at::Tensor>& hx,
                                                  const std::optional<at::Tensor>& cx, const at::Tensor& w_ih,
                                                  const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                                  const std::optional<at::Tensor>& b_hh, c10::string_view mode) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vgk::cell_forward_differentiable", "")
                             .typed<std::vector<at::Tensor>(
                                 const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                 const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                 const std::optional<at::Tensor>&, c10::string_view)>();
  return op.call(input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode);
}

// Whether a tensor carries a forward-mode gradient (a tangent) at any level.
bool has_tangent(const at::Tensor& t) {
  if (!t.defined()) return false;
  const torch::autograd::AutogradMeta* meta = torch::autograd::impl::get_autograd_meta(t);
  return meta != nullptr && meta->fw_grad_ != nullptr && !meta->fw_grad_->empty();
}

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class CellFunction : public torch::autograd::Function<CellFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                                                const std::optional<at::Tensor>& hx,
                                                const std::optional<at::Tensor>& cx, const at::Tensor& w_ih,
                                                const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                                const std::optional<at::Tensor>& b_hh,
                                                const std::optional<at::Tensor>& probe, c10::string_view mode,
                                                bool track) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [h, c, ws, jac] = forward_op(input, hx, cx, w_ih, w_hh, b_ih, b_hh, probe, mode, track);
    const auto value = [](const std::optional<at::Tensor>& t) { return present(t) ? *t : at::Tensor(); };
    ctx->save_for_backward({input, value(hx), value(cx), w_ih, w_hh, value(b_ih), value(b_hh), h, c, ws});
    ctx->saved_data["mode"] = std::string(mode);
    ctx->saved_data["track"] = track && present(probe);
    // Edge indices: the tensors given, in argument order (an absent optional has no edge).
    ctx->saved_data["edges"] = c10::List<bool>({true, present(hx), present(cx), true, true, present(b_ih),
                                                present(b_hh), present(probe)});
    ctx->mark_non_differentiable({ws, jac});
    ctx->set_materialize_grads(false);  // an unused output gets no zero-filled gradient
    return {h, c, ws, jac};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &hx = saved[1], &cx = saved[2], &w_ih = saved[3], &w_hh = saved[4];
    const at::Tensor &b_ih = saved[5], &b_hh = saved[6], &h = saved[7], &c = saved[8], &ws = saved[9];
    const std::string mode = ctx->saved_data["mode"].toStringRef();
    const bool track = ctx->saved_data["track"].toBool();
    const c10::List<bool> edges = ctx->saved_data["edges"].toBoolList();
    // needs[k]: argument k (of the 8 tensor arguments) is present and wants a gradient.
    bool needs[8];
    for (size_t k = 0, edge = 0; k < 8; ++k) needs[k] = edges.get(k) && ctx->needs_input_grad(edge++);
    torch::autograd::variable_list out(10);
    const at::Tensor none = at::empty({0}, input.options());
    const at::Tensor gh = grads[0].defined() ? grads[0] : none, gc = grads[1].defined() ? grads[1] : none;
    if (!grads[0].defined() && !grads[1].defined()) return out;  // no output was used
    const bool has_bias = b_ih.defined();
    const bool weight_grad = needs[3] || needs[4] || needs[5] || needs[6];
    if (at::GradMode::is_enabled()) {
      // create_graph=True: gradients that are themselves differentiable.
      const auto g = differentiable_backward_op(gh, gc, input, opt(hx), opt(cx), w_ih, w_hh, opt(b_ih), opt(b_hh),
                                                mode);
      for (size_t k = 0; k < 7; ++k) {
        if (needs[k] && g[k].numel() > 0) out[k] = g[k];
      }
      if (track && needs[7]) {
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        out[7] = std::get<7>(backward_op(gh, gc, input, opt(hx), opt(cx), w_ih, w_hh, h, c, ws, mode, true, has_bias,
                                         false, false, false));
      }
      return out;
    }
    // Without create_graph the backward op runs below autograd, with no node of its own.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [g_in, g_hx, g_cx, g_wih, g_whh, g_bih, g_bhh, gsq] =
        backward_op(gh, gc, input, opt(hx), opt(cx), w_ih, w_hh, h, c, ws, mode, track && needs[7], has_bias,
                    needs[0], needs[1] || needs[2], weight_grad);
    const at::Tensor results[8] = {g_in, g_hx, g_cx, g_wih, g_whh, g_bih, g_bhh, gsq};
    for (size_t k = 0; k < 8; ++k) {
      if (needs[k]) out[k] = results[k];
    }
    return out;
  }
};

Four cell_forward_autograd(const at::Tensor& input, const std::optional<at::Tensor>& hx,
                           const std::optional<at::Tensor>& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                           const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                           const std::optional<at::Tensor>& probe, c10::string_view mode, bool track) {
  const auto tangent = [](const std::optional<at::Tensor>& t) { return present(t) && has_tangent(*t); };
  if (has_tangent(input) || has_tangent(w_ih) || has_tangent(w_hh) || tangent(hx) || tangent(cx) || tangent(b_ih) ||
      tangent(b_hh)) {
    // Forward-mode AD: h' and c' through torch's own operations, which carry the tangents (and record a
    // graph for a backward, without the trace's gradient norms); the workspace and the Jacobian norms
    // from the fused step.
    const auto hc = differentiable_forward_op(input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto fused = forward_op(input, hx, cx, w_ih, w_hh, b_ih, b_hh, probe, mode, track);
    return {hc[0], hc[1], std::get<2>(fused), std::get<3>(fused)};
  }
  const auto wants = [](const std::optional<at::Tensor>& t) { return present(t) && t->requires_grad(); };
  const bool any = input.requires_grad() || w_ih.requires_grad() || w_hh.requires_grad() || wants(hx) ||
                   wants(cx) || wants(b_ih) || wants(b_hh) || wants(probe);
  if (!at::GradMode::is_enabled() || !any) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // no graph to record: skip the node
    return forward_op(input, hx, cx, w_ih, w_hh, b_ih, b_hh, probe, mode, track);
  }
  auto out = CellFunction::apply(input, hx, cx, w_ih, w_hh, b_ih, b_hh, probe, mode, track);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace
}  // namespace vgk::rnn

namespace vgk {

void define_cell_ops(torch::Library& m) {
  // One step of a cell; see vgkernels/ops/cell.py for every argument and output. probe is only read by
  // the autograd (its gradient is grad_sq).
  m.def(
      "cell_forward(Tensor input, Tensor? hx, Tensor? cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? probe, str mode, bool track) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cell_backward(Tensor grad_h, Tensor grad_c, Tensor input, Tensor? hx, Tensor? cx, Tensor w_ih, Tensor w_hh, "
      "Tensor h, Tensor c, Tensor workspace, str mode, bool track, bool has_bias, bool input_grad, "
      "bool hidden_grad, bool weight_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Implemented in Python (CompositeImplicitAutograd): the forward under forward-mode AD and the backward
  // under create_graph=True.
  m.def(
      "cell_forward_differentiable(Tensor input, Tensor? hx, Tensor? cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, str mode) -> Tensor[]");
  m.def(
      "cell_backward_differentiable(Tensor grad_h, Tensor grad_c, Tensor input, Tensor? hx, Tensor? cx, "
      "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, str mode) -> Tensor[]");
}

}  // namespace vgk

TORCH_LIBRARY_IMPL(vgk, CPU, m) {
  m.impl("cell_forward", &vgk::rnn::cell_forward_cpu);
  m.impl("cell_backward", &vgk::rnn::cell_backward_cpu);
}

TORCH_LIBRARY_IMPL(vgk, Autograd, m) {
  m.impl("cell_forward", &vgk::rnn::cell_forward_autograd);
}
