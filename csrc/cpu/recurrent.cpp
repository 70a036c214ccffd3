// Whole-sequence recurrent layers (Elman RNN, LSTM, GRU) for CPU tensors: one direction of one layer.
//
// Two op pairs share the time loops below:
// - rnn_forward / rnn_backward take the input projection xproj = x W_ih^T + b precomputed and return
//   the states [T+1, B, H] with h0 in them;
// - rnn_layer_forward / rnn_layer_backward take x and W_ih and do the projection inside: x_t W_ih^T per
//   step in the forward, gx_t W_ih per step and grad_w_ih as one GEMM in the backward. They return the
//   output [T, B, H], h_n and c_n as separate tensors and take their gradients directly.
//
// Samples are independent, so each thread takes a block of batch rows and runs the whole time loop
// on it, with no barrier between steps. One-step calls (T = 1) with large weights or few rows compute
// both products first, split over the threads by columns instead (kColumnSplitMacs).
// Forward, per step: the GEMM h_prev W_hh^T (and x_t W_ih^T) for the thread's rows into a preallocated
// buffer, then ONE fused pointwise pass over those rows (gates, new state, workspace, Jacobian-norm
// terms).
// Backward, per step in reverse: ONE fused pointwise pass writing the pre-activation gradients, then
// ONE GEMM dgates W_hh accumulated into the gradient of h_prev (and dgates W_ih into grad_x). The weight
// gradients are one GEMM each over all T*B rows after the loop. Nothing is allocated inside the time
// loops; the GEMMs run on raw pointers (recurrent_blas.h), weights are transposed at most once per call.
// The layer ops take their large buffers from a cache of freed blocks (block_cache.h).
//
// Workspace layouts (private to this backend, dtype of the input):
//   lstm: activated gates i, f, g, o  [T, B, 4H]
//   gru:  r, z, n and hn = W_hn h_prev + b_hn  [T, B, 4H]
//   rnn_*: empty [0]; the activation derivative follows from h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "ops.h"
#include "block_cache.h"
#include "recurrent_args.h"
#include "recurrent_blas.h"
#include "recurrent_gram.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define VGK_RNN_AVX2 1
#endif

namespace vgk::rnn {

// The pointwise passes, compiled once per instruction set (AVX-512 with 512-bit vectors: 6% off an LSTM
// layer's forward+backward on a Zen 5 core against the AVX2 build). Without -fno-trapping-math (which
// torch itself is built with) GCC will not turn the comparisons of the clamps into blends, and the
// loops stay scalar; values, NaN included, are the same either way.
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#ifdef VGK_RNN_AVX2
namespace avx512 {
#define VGK_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,prefer-vector-width=512")))
#include "recurrent_kernels.h"
#undef VGK_FN
}  // namespace avx512

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
  return cpu_has_avx2_fma();
#else
  return false;
#endif
}

template <typename T>
ForwardRows<T> pick_forward(Cell cell, bool track) {
#ifdef VGK_RNN_AVX2
  if (cpu_isa_at_least(CpuIsa::kAvx512)) {
    return track ? avx512::forward_rows<T, true>(cell) : avx512::forward_rows<T, false>(cell);
  }
  if (use_avx2()) return track ? avx2::forward_rows<T, true>(cell) : avx2::forward_rows<T, false>(cell);
#endif
  return track ? base::forward_rows<T, true>(cell) : base::forward_rows<T, false>(cell);
}

template <typename T>
BackwardRows<T> pick_backward(Cell cell, bool track) {
#ifdef VGK_RNN_AVX2
  if (cpu_isa_at_least(CpuIsa::kAvx512)) {
    return track ? avx512::backward_rows<T, true>(cell) : avx512::backward_rows<T, false>(cell);
  }
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

// Fewest batch rows per thread: the per-step GEMM loses efficiency on fewer rows.
constexpr int64_t kRowGrain = 4;
// Fewest batch rows for which the input projection runs per step inside the time loop (GEMMs of the
// threads' rows); below, the rows per thread are too few and one GEMM over all T*B rows is faster.
constexpr int64_t kStepProjectionRows = 2 * kRowGrain;
// The largest buffer of the forward's projection of all steps at once. The op cannot tell inference
// from training, and in inference (where the workspace is the largest buffer besides) the buffer would
// add its whole size to the peak memory; beyond it, the projection runs per step, which needs none.
constexpr int64_t kWholeProjectionBytes = int64_t(16) << 20;

// A one-step call (T = 1) runs both products of the step over the threads by blocks of columns
// (column_split_gemm) before the pointwise pass where the weights are large or the batch leaves threads
// without rows: split by rows, every thread reads all of W_ih and W_hh (an LSTM at B = 32, H = 1024 on 2
// threads reads 64 MB instead of 32; 4.3 -> 3.4 ms a call on a Zen 5), and a batch of fewer than
// kRowGrain rows a thread runs on one. Measured there, weights of 2 MB (H = 256) ran faster split by
// rows at B = 8 and 32, and 6-8 MB ones (H = 512) faster by columns. Below kColumnSplitMacs
// multiply-adds (B * G*H * (I + H)) the parallel region costs more than it saves. Only below
// kTiledMinRows rows, where both ways run the library GEMM: from 128 rows brgemm's products, split by
// rows, were faster (LSTM H = 1024, B = 128: 31.9 against 37.9 ms).
constexpr int64_t kColumnSplitMacs = int64_t(1) << 20;
constexpr int64_t kColumnSplitWeightBytes = int64_t(4) << 20;

// C[M, N] = A[M, K] W^T (+ bias on every row) with W [N, K] row-major, over the threads by blocks of
// columns: each thread reads only its rows of W. The library GEMM runs single-threaded inside the
// parallel region, as in the time loops.
template <typename T>
void column_split_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* w, const T* bias, T* C,
                       int64_t ldc) {
  constexpr int64_t kColumnGrain = 64;
  at::parallel_for(0, N, kColumnGrain, [&](int64_t n0, int64_t n1) {
    if (bias != nullptr) {
      for (int64_t m = 0; m < M; ++m) std::copy(bias + n0, bias + n1, C + m * ldc + n0);
    }
    gemm<T>(false, true, M, n1 - n0, K, A, lda, w + n0 * K, K, bias != nullptr ? T(1) : T(0), C + n0, ldc);
  });
}

int64_t position(int64_t s, int64_t T, bool reverse) { return reverse ? T - 1 - s : s; }

// The rows of each time step. Padded input [T, B, *]: step t holds all B rows, from row t * B. Packed
// input (torch's PackedSequence layout): step t holds the first sizes[t] samples, sorted by decreasing
// length so that sizes never grows, from row offsets[t] = sizes[0] + ... + sizes[t-1].
struct Steps {
  int64_t T = 0, B = 0;
  const int64_t* sizes = nullptr;  // packed: batch_sizes [T]; nullptr: padded
  std::vector<int64_t> offsets;    // packed: [T + 1]
  bool packed() const { return sizes != nullptr; }
  int64_t rows(int64_t t) const { return sizes ? sizes[t] : B; }
  int64_t offset(int64_t t) const { return sizes ? offsets[t] : t * B; }
  int64_t total() const { return sizes ? offsets[T] : T * B; }
};

Steps padded_steps(int64_t T, int64_t B) { return Steps{T, B, nullptr, {}}; }

// batch_sizes: int64 [T] on the CPU, non-increasing, every size >= 1; B = batch_sizes[0]. `keep` must
// outlive the result (it owns the sizes).
Steps packed_steps(const char* op, const at::Tensor& keep) {
  TORCH_CHECK(keep.device().is_cpu(), op, ": batch_sizes must be a CPU tensor, got one on ", keep.device());
  TORCH_CHECK_TYPE(keep.scalar_type() == at::kLong, op, ": batch_sizes must have dtype int64, got ",
                   keep.scalar_type());
  TORCH_CHECK_VALUE(keep.dim() == 1 && keep.size(0) >= 1, op, ": batch_sizes must have shape [T] with T >= 1, got ",
                    keep.sizes());
  const int64_t* sizes = keep.const_data_ptr<int64_t>();
  Steps steps{keep.size(0), sizes[0], sizes, {}};
  steps.offsets.resize(steps.T + 1, 0);
  for (int64_t t = 0; t < steps.T; ++t) {
    const int64_t n = sizes[t];
    TORCH_CHECK_VALUE(n >= 1 && (t == 0 || n <= sizes[t - 1]), op,
                      ": batch_sizes must be >= 1 and never grow, got batch_sizes[", t, "] = ", n);
    steps.offsets[t + 1] = steps.offsets[t] + n;
  }
  return steps;
}

// A layer's states: at(t) is the state after position t (rows `width` apart, laid out as `steps`);
// `init` [B, width] is the state before the first position processed.
template <typename T>
struct StateSeq {
  T* base = nullptr;
  const T* init = nullptr;
  int64_t width = 0;
  const Steps* steps = nullptr;
  bool reverse = false;
  T* at(int64_t t) const { return base + steps->offset(t) * width; }
  // The position processed before t, or -1 at the first.
  int64_t prev(int64_t t) const {
    const int64_t p = reverse ? t + 1 : t - 1;
    return p < 0 || p >= steps->T ? -1 : p;
  }
};

// Where the rows [b0, b0 + n) of the state before position t come from: the first n_cont rows continue
// from the position processed before, the rest start from the initial state. Every row continues in
// padded input and in the forward direction; in the reverse direction over packed input the samples
// whose last position is t start there. Both pointers address row b0, so row i is cont + i * width
// (i < n_cont) or fresh + i * width.
template <typename T>
struct PrevRows {
  const T* cont = nullptr;
  const T* fresh = nullptr;
  int64_t n_cont = 0;
  const T* row(int64_t i, int64_t width) const { return (i < n_cont ? cont : fresh) + i * width; }
};

template <typename T>
PrevRows<T> prev_rows(const StateSeq<T>& s, int64_t t, int64_t b0, int64_t n) {
  const int64_t p = s.prev(t);
  const T* fresh = s.init + b0 * s.width;
  if (p < 0) return {fresh, fresh, 0};
  return {s.at(p) + b0 * s.width, fresh, std::clamp<int64_t>(s.steps->rows(p) - b0, 0, n)};
}

// C[0:n] (+)= A W for the rows A of a PrevRows (lda = its width).
template <typename T>
void prev_rows_gemm(const RowsGemm<T>& g, const PrevRows<T>& a, int64_t n, int64_t lda, bool accumulate, T* C,
                    int64_t ldc) {
  if (a.n_cont > 0) g.run(a.n_cont, a.cont, lda, accumulate, C, ldc);
  if (n > a.n_cont) g.run(n - a.n_cont, a.fresh + a.n_cont * lda, lda, accumulate, C + a.n_cont * ldc, ldc);
}

// A pointwise pass over the rows [0, n) of a step: the rows that continue read h_prev and c_prev at
// hp.cont and cp.cont, the fresh ones at hp.fresh and cp.fresh.
template <typename T, typename Step, typename Pass>
void prev_rows_pass(Pass pass, Step& st, const PrevRows<T>& hp, const PrevRows<T>& cp, int64_t n) {
  st.hp = hp.cont;
  st.cp = cp.cont;
  pass(st, 0, hp.n_cont);
  st.hp = hp.fresh;
  st.cp = cp.fresh;
  pass(st, hp.n_cont, n);
}

// Runs fn(b0, b1) over blocks of batch rows on the threads; each block runs the whole time loop. Padded:
// an even split. Packed: the rows are sorted by decreasing length, so the split is by work (positions
// held), not by rows.
template <typename F>
void for_row_blocks(const Steps& steps, const F& fn) {
  const int64_t B = steps.B;
  if (B == 0) return;
  if (!steps.packed()) {
    at::parallel_for(0, B, kRowGrain, fn);
    return;
  }
  const int64_t blocks = std::clamp<int64_t>(B / kRowGrain, 1, at::get_num_threads());
  std::vector<int64_t> bounds{0};
  int64_t t = steps.T, work = 0;
  for (int64_t b = 0; b < B && static_cast<int64_t>(bounds.size()) < blocks; ++b) {
    while (t > 0 && steps.sizes[t - 1] <= b) --t;  // t = the number of positions row b holds
    work += t;
    if (work * blocks >= steps.total() * static_cast<int64_t>(bounds.size())) bounds.push_back(b + 1);
  }
  bounds.push_back(B);
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      if (bounds[c + 1] > bounds[c]) fn(bounds[c], bounds[c + 1]);
    }
  });
}

// rnn_forward/rnn_backward keep states [T+1, B, H] with h0 in slot 0 (slot T when reverse): the state
// after position t is then in slot t+1 (slot t), and h0 sits right before the first one processed.
template <typename T>
StateSeq<T> slots(const at::Tensor& states, const Steps& steps, bool reverse) {
  const int64_t BH = states.size(1) * states.size(2);
  T* p = const_cast<T*>(states.const_data_ptr<T>());
  return {p + (reverse ? 0 : BH), p + (reverse ? steps.T : 0) * BH, states.size(2), &steps, reverse};
}

// The input side of a forward: the precomputed projection xproj [T, B, G*H] (rnn_forward), or the
// input x [T, B, I] projected per step inside the time loop (rnn_layer_forward).
template <typename T>
struct InputSide {
  const T* xproj = nullptr;
  const T* x = nullptr;
  int64_t I = 0;
  const RowsGemm<T>* w_ih = nullptr;  // x_t W_ih^T; nullptr: xproj
  const T* bias = nullptr;            // with x: [G*H] b_ih + b_hh (GRU: b_ih alone), zeros if none
  const T* hh_first = nullptr;        // with xproj and T = 1: h0 W_hh^T [B, G*H], already computed
};

// The LSTM's projection (proj_size P > 0): the cell computes hf = o * tanh(c) [H] and the state it
// carries and outputs is h = hf W_hr^T [P]. hf is saved for the backward in the workspace, after the
// gates (see workspace_layout).
template <typename T>
struct Projection {
  int64_t P = 0;
  const RowsGemm<T>* gemm = nullptr;  // forward: hf W_hr^T; backward: dh W_hr
  StateSeq<T> full;                   // the hf sequence (H wide); its init (zeros) only fills carried rows
  // Tracking: K = (W_hh W_hh^T) ⊙ (J_4 ⊗ W_hr^T W_hr) [4H, 4H] and the squared column norms of W_hr [H].
  const T* kgram = nullptr;
  const T* col_sq = nullptr;
};

// Squared Frobenius norm of one step's Jacobian d(h, c)/d(h_prev, c_prev) of the projected LSTM, minus
// the coupled term beta^T K beta, whose coefficients beta [4H] it writes for a GEMM over the rows:
//   ||J||_F^2 = sum_j [alpha_j^T G_j alpha_j + sf_j^2 + (kappa_j sf_j)^2 ||W_hr[:, j]||^2] + beta^T K beta,
// with alpha, kappa, G_j as for the plain LSTM (recurrent_kernels.h) and beta = (kappa alpha_i,
// kappa alpha_f, kappa alpha_g, tanh(c) so (1 - so)): row j of d hf/d h_prev is sum_a beta_a,j W_a[j, :],
// and d h/d h_prev = W_hr (d hf/d h_prev) couples all units through W_hr^T W_hr.
template <typename T>
T projected_lstm_jacobian_terms(int64_t H, const T* w, const T* cp, const T* c, const T* gm, const T* col_sq,
                                T* beta) {
  double acc = 0;
  for (int64_t j = 0; j < H; ++j) {
    const T si = w[j], sf = w[H + j], tg = w[2 * H + j], so = w[3 * H + j], tc = std::tanh(c[j]);
    const T a0 = tg * si * (1 - si), a1 = cp[j] * sf * (1 - sf), a2 = si * (1 - tg * tg);
    const T kappa = so * (1 - tc * tc);
    const T quad = a0 * a0 * gm[j] + a1 * a1 * gm[4 * H + j] + a2 * a2 * gm[7 * H + j] +
                   2 * (a0 * a1 * gm[H + j] + a0 * a2 * gm[2 * H + j] + a1 * a2 * gm[5 * H + j]);
    acc += quad + sf * sf + kappa * kappa * sf * sf * col_sq[j];
    beta[j] = kappa * a0;
    beta[H + j] = kappa * a1;
    beta[2 * H + j] = kappa * a2;
    beta[3 * H + j] = tc * so * (1 - so);
  }
  return static_cast<T>(acc);
}

template <typename T>
void forward_loop(Cell cell, int64_t G, const Steps& steps, int64_t H, const InputSide<T>& in,
                  const StateSeq<T>& hs, const StateSeq<T>& cs, const at::Tensor& w, const at::Tensor& bhh,
                  const Projection<T>* proj, const at::Tensor& len, bool track, T* wsp, float* jp) {
  if (steps.B == 0) return;
  const int64_t GH = G * H, B = steps.B, Wh = hs.width;  // Wh: P with a projection, else H
  const bool gru = cell == Cell::kGru, lstm = cell == Cell::kLstm, fused = in.w_ih != nullptr;
  const auto opts = w.options();
  at::Tensor bias = gru ? (bhh.defined() ? bhh.contiguous() : at::zeros({GH}, opts)) : at::Tensor();
  // The GRU adds a bias to its input side too: b_ih with x, zeros with xproj (which holds it).
  at::Tensor xbias = gru && !fused ? at::zeros({GH}, opts) : at::Tensor();
  at::Tensor gram = track ? gram_entries<T>(w, G, H, /*diagonals=*/gru) : at::Tensor();
  const RowsGemm<T> step_gemm(w, /*trans_w=*/true, steps.total() >= kTiledMinRows,
                              parallel_chunk(B, kRowGrain));  // h_prev W_hh^T
  // With a projection the pointwise pass leaves the Jacobian to projected_lstm_jacobian_terms.
  const ForwardRows<T> rows = pick_forward<T>(cell, track && proj == nullptr);
  const int64_t* lp = len.defined() ? len.const_data_ptr<int64_t>() : nullptr;

  // Samples are independent: each thread runs the whole time loop over its own batch rows, so the
  // steps need no barrier. Pointers below address the thread's first row.
  for_row_blocks(steps, [&](int64_t b0, int64_t b1) {
    const int64_t nb = b1 - b0;
    at::Tensor hh = at::empty({nb, GH}, opts);
    // With x, the GRU keeps x_t W_ih^T apart (r scales only the recurrent part of n); the other cells
    // sum both products in hh and read the bias as their input row.
    at::Tensor xrows = fused && gru ? at::empty({nb, GH}, opts) : at::Tensor();
    at::Tensor scratch = at::empty({track ? H : 0}, opts);
    const bool proj_track = proj != nullptr && track;
    at::Tensor beta = at::empty({proj_track ? nb : 0, GH}, opts), kbeta = at::empty_like(beta);
    T* hhp = hh.data_ptr<T>();
    FwdStep<T> st;
    st.H = H;
    st.hh = hhp;
    st.scratch = track ? scratch.data_ptr<T>() : nullptr;
    st.bhh = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
    st.bx = !gru ? nullptr : fused ? in.bias : xbias.const_data_ptr<T>();
    st.gram = gram.defined() ? gram.const_data_ptr<T>() : nullptr;
    st.len = lp ? lp + b0 : nullptr;
    for (int64_t s = 0; s < steps.T; ++s) {
      const int64_t t = position(s, steps.T, hs.reverse);
      const int64_t n = std::min(b1, steps.rows(t)) - b0;
      if (n <= 0) continue;  // packed: the block's samples have all ended
      const int64_t row = steps.offset(t) + b0;
      const PrevRows<T> hp = prev_rows(hs, t, b0, n);
      if (!fused) {
        if (in.hh_first != nullptr) {
          st.hh = in.hh_first + b0 * GH;
        } else {
          prev_rows_gemm(step_gemm, hp, n, Wh, /*accumulate=*/false, hhp, GH);
        }
        st.x = in.xproj + row * GH;
        st.xs = GH;
      } else if (gru) {
        in.w_ih->run(n, in.x + row * in.I, in.I, /*accumulate=*/false, xrows.data_ptr<T>(), GH);
        prev_rows_gemm(step_gemm, hp, n, Wh, /*accumulate=*/false, hhp, GH);
        st.x = xrows.data_ptr<T>();
        st.xs = GH;
      } else {
        in.w_ih->run(n, in.x + row * in.I, in.I, /*accumulate=*/false, hhp, GH);
        prev_rows_gemm(step_gemm, hp, n, Wh, /*accumulate=*/true, hhp, GH);
        st.x = in.bias;
        st.xs = 0;
      }
      st.t = t;
      st.h = (proj ? proj->full.at(t) : hs.at(t)) + b0 * H;
      // The pointwise pass reads h_prev (H wide) for the GRU and to carry rows past their length.
      const PrevRows<T> carried = proj ? prev_rows(proj->full, t, b0, n) : hp;
      PrevRows<T> cp;
      if (lstm) {
        cp = prev_rows(cs, t, b0, n);
        st.c = cs.at(t) + b0 * H;
      }
      if (wsp) st.ws = wsp + row * 4 * H;
      if (jp) st.jac = jp + t * B + b0;
      prev_rows_pass(rows, st, carried, cp, n);
      if (proj == nullptr) continue;
      T* out = hs.at(t) + b0 * Wh;
      proj->gemm->run(n, st.h, H, /*accumulate=*/false, out, Wh);
      for (int64_t i = 0; i < n; ++i) {
        const bool valid = base::row_valid(st.len, t, i);
        if (!valid) std::memcpy(out + i * Wh, hp.row(i, Wh), sizeof(T) * Wh);  // carried past its length
        if (!proj_track) continue;
        T* beta_i = beta.data_ptr<T>() + i * GH;
        if (!valid) {
          std::fill(beta_i, beta_i + GH, T(0));
          st.jac[i] = 0.0f;
          continue;
        }
        st.jac[i] = static_cast<float>(projected_lstm_jacobian_terms<T>(
            H, st.ws + i * 4 * H, cp.row(i, H), st.c + i * H, st.gram, proj->col_sq, beta_i));
      }
      if (!proj_track) continue;
      const T* bp = beta.const_data_ptr<T>();
      T* kp = kbeta.data_ptr<T>();
      gemm<T>(false, false, n, GH, GH, bp, GH, proj->kgram, GH, T(0), kp, GH);
      for (int64_t i = 0; i < n; ++i) {
        double quad = 0;
        for (int64_t r = 0; r < GH; ++r) quad += static_cast<double>(bp[i * GH + r]) * kp[i * GH + r];
        st.jac[i] += static_cast<float>(quad);
      }
    }
  });
}

// The incoming gradient of a state sequence at position t: rows `width` apart, laid out as `steps`. An
// absent gradient reads one zero block at every position.
template <typename T>
struct GradSeq {
  const T* base = nullptr;
  int64_t width = 0;
  const Steps* steps = nullptr;  // nullptr: absent, base is the zero block
  at::Tensor keep;               // owns the zero block
  const T* at(int64_t t) const { return steps ? base + steps->offset(t) * width : base; }
};

// `grad` laid out as `steps` from row `offset_rows` on; undefined: zeros.
template <typename T>
GradSeq<T> grad_seq(const at::Tensor& grad, const Steps& steps, int64_t offset_rows, int64_t width,
                    const at::TensorOptions& opts) {
  if (!grad.defined()) {
    at::Tensor zeros = at::zeros({steps.B, width}, opts);
    return {zeros.const_data_ptr<T>(), width, nullptr, zeros};
  }
  return {grad.const_data_ptr<T>() + offset_rows * width, width, &steps, grad};
}

// The backward time loop. dh, dc [B, Wh], [B, H] hold the gradients reaching the last processed state on
// entry and the gradients of h0, c0 on exit (without any direct gradient of h0, c0). Writes the
// pre-activation gradients gx [rows, G*H] (GRU: also those of h_prev W_hh^T + b_hh into rec), with
// grad_x the gradient of x (gx_t W_ih per step), and with a projection the gradients reaching each h_t
// [rows, P] into grad_h (for W_hr's gradient).
template <typename T>
void backward_loop(Cell cell, int64_t G, const Steps& steps, int64_t H, const GradSeq<T>& gh,
                   const GradSeq<T>& gc, const StateSeq<T>& hs, const StateSeq<T>& cs, const T* wsp,
                   const at::Tensor& w, const Projection<T>* proj, T* grad_h, const at::Tensor& len,
                   std::optional<double> grad_clip, bool track, at::Tensor& dh, at::Tensor& dc, T* gxp, T* recp,
                   double* qp, const RowsGemm<T>* w_ih, T* grad_x, int64_t I) {
  if (steps.B == 0) return;
  const int64_t GH = G * H, B = steps.B, T_ = steps.T, Wh = hs.width;
  const bool lstm = cell == Cell::kLstm, gru = cell == Cell::kGru;
  const RowsGemm<T> step_gemm(w, /*trans_w=*/false, steps.total() >= kTiledMinRows,
                              parallel_chunk(B, kRowGrain));  // dgates W_hh
  const BackwardRows<T> rows = pick_backward<T>(cell, track);
  const T clip = grad_clip.has_value() ? static_cast<T>(*grad_clip) : std::numeric_limits<T>::infinity();
  const int64_t* lp = len.defined() ? len.const_data_ptr<int64_t>() : nullptr;
  const auto opts = w.options();

  // As in the forward, each thread runs the whole reverse loop over its own batch rows.
  for_row_blocks(steps, [&](int64_t b0, int64_t b1) {
    const int64_t nb = b1 - b0;
    // With a projection the pointwise pass takes dh_t W_hr (H wide) as its dh and zeros as its incoming
    // gradient; its squared norm of that is not the trace's (which is of dh_t itself).
    at::Tensor dhf = at::empty({proj ? nb : 0, H}, opts), zeros = at::zeros({proj ? nb : 0, H}, opts);
    std::vector<double> unused_sq(proj ? nb : 0);
    T* dh_rows = dh.data_ptr<T>() + b0 * Wh;
    BwdStep<T> st;
    st.H = H;
    st.dh = proj ? dhf.data_ptr<T>() : dh_rows;
    st.dc = lstm ? dc.data_ptr<T>() + b0 * H : nullptr;
    st.len = lp ? lp + b0 : nullptr;
    st.clip = clip;
    for (int64_t s = T_ - 1; s >= 0; --s) {
      const int64_t t = position(s, T_, hs.reverse);
      const int64_t n = std::min(b1, steps.rows(t)) - b0;
      if (n <= 0) continue;
      const int64_t row = steps.offset(t) + b0;
      st.t = t;
      st.gs = gh.at(t) + b0 * Wh;
      st.h = hs.at(t) + b0 * Wh;
      const PrevRows<T> hp = prev_rows(hs, t, b0, n);
      PrevRows<T> cp;
      if (lstm) {
        st.gcs = gc.at(t) + b0 * H;
        st.c = cs.at(t) + b0 * H;
        cp = prev_rows(cs, t, b0, n);
      }
      if (wsp) st.ws = wsp + row * 4 * H;
      st.gx = gxp + row * GH;
      if (gru) st.rec = recp + row * GH;
      if (qp) {
        st.gsq_h = qp + t * B + b0;
        if (lstm) st.gsq_c = qp + (T_ + t) * B + b0;
      }
      if (proj) {
        // dh_t = incoming + recurrent gradient of h_t [P]; a row past its length carries it to h_prev.
        T* g = grad_h + row * Wh;
        for (int64_t i = 0; i < n; ++i) {
          double sq = 0;
          for (int64_t k = 0; k < Wh; ++k) {
            g[i * Wh + k] = st.gs[i * Wh + k] + dh_rows[i * Wh + k];
            sq += static_cast<double>(g[i * Wh + k]) * g[i * Wh + k];
          }
          const bool valid = base::row_valid(st.len, t, i);
          if (valid) {
            std::fill(dh_rows + i * Wh, dh_rows + (i + 1) * Wh, T(0));
          } else {
            std::memcpy(dh_rows + i * Wh, g + i * Wh, sizeof(T) * Wh);
            std::fill(g + i * Wh, g + (i + 1) * Wh, T(0));
          }
          if (qp) st.gsq_h[i] = valid ? sq : 0.0;
        }
        proj->gemm->run(n, g, Wh, /*accumulate=*/false, st.dh, H);
        st.gs = zeros.const_data_ptr<T>();
        if (qp) st.gsq_h = unused_sq.data();
      }
      prev_rows_pass(rows, st, hp, cp, n);
      step_gemm.run(n, gru ? st.rec : st.gx, GH, /*accumulate=*/true, dh_rows, Wh);
      if (grad_x) w_ih->run(n, st.gx, GH, /*accumulate=*/false, grad_x + row * I, I);
    }
  });
}

// The state before each row of `seq` [rows, W] (laid out as `steps`), in the order of the rows, as blocks
// of rows of `seq` and `init` [B, W] (what weight_grad takes); adjacent blocks are merged.
std::vector<at::Tensor> states_before(const at::Tensor& seq, const at::Tensor& init, const Steps& steps,
                                      bool reverse) {
  struct Block {
    const at::Tensor* src;
    int64_t start, len;
  };
  std::vector<Block> blocks;
  auto add = [&](const at::Tensor& src, int64_t start, int64_t len) {
    if (len == 0) return;
    if (!blocks.empty() && blocks.back().src == &src && blocks.back().start + blocks.back().len == start) {
      blocks.back().len += len;
    } else {
      blocks.push_back({&src, start, len});
    }
  };
  for (int64_t t = 0; t < steps.T; ++t) {
    const int64_t p = reverse ? t + 1 : t - 1, n = steps.rows(t);
    const int64_t n_cont = p < 0 || p >= steps.T ? 0 : std::min(n, steps.rows(p));
    add(seq, n_cont > 0 ? steps.offset(p) : 0, n_cont);
    add(init, n_cont, n - n_cont);
  }
  std::vector<at::Tensor> out;
  for (const Block& blk : blocks) out.push_back(blk.src->narrow(0, blk.start, blk.len));
  return out;
}

// The state after the last position of each sample [B, W] from `seq` [rows, W]: padded, at the last
// position processed (a row past its length carries its state there); packed, forward at each sample's
// own last position, reverse at position 0.
void final_state(const at::Tensor& seq, const Steps& steps, bool reverse, at::Tensor& out) {
  if (steps.B == 0) return;
  if (!steps.packed() || reverse) {
    out.copy_(seq.narrow(0, steps.offset(reverse ? 0 : steps.T - 1), steps.B));
    return;
  }
  for (int64_t t = 0; t < steps.T; ++t) {
    const int64_t lo = t + 1 < steps.T ? steps.rows(t + 1) : 0, hi = steps.rows(t);
    if (hi > lo) out.narrow(0, lo, hi - lo).copy_(seq.narrow(0, steps.offset(t) + lo, hi - lo));
  }
}

// ---------------------------------------------------------------- rnn_forward / rnn_backward

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
    TORCH_CHECK_VALUE(has_c0, op, ": c0 [B, H] is required for mode 'lstm', got None");
    check_tensor(op, "c0", *c0, dtype, {B, H});
  } else {
    TORCH_CHECK_VALUE(!has_c0, op, ": c0 must be None for mode '", std::string(mode), "', got a tensor of shape ",
                      c0->sizes());
  }
  if (m.cell == Cell::kGru) {
    if (has_b) check_tensor(op, "b_hh", *b_hh, dtype, {GH});
  } else {
    TORCH_CHECK_VALUE(!has_b, op, ": b_hh must be None for mode '", std::string(mode),
                      "' (add it to xproj), got a tensor of shape ", b_hh->sizes());
  }
  const at::Tensor len = checked_lengths(op, lengths, B, T_);

  const auto opts = xproj.options();
  const bool lstm = m.cell == Cell::kLstm, gated = lstm || m.cell == Cell::kGru;
  at::Tensor states = at::empty({T_ + 1, B, H}, opts);
  at::Tensor cells = lstm ? at::empty({T_ + 1, B, H}, opts) : at::empty({0}, opts);
  at::Tensor ws = gated ? at::empty({T_, B, 4 * H}, opts) : at::empty({0}, opts);
  at::Tensor jac = track ? at::empty({T_, B}, opts.dtype(at::kFloat)) : at::empty({0}, opts.dtype(at::kFloat));
  const int64_t init = reverse ? T_ : 0;
  states.select(0, init).copy_(h0);
  if (lstm) cells.select(0, init).copy_(*c0);

  const Steps steps = padded_steps(T_, B);
  AT_DISPATCH_FLOATING_TYPES(dtype, "rnn_forward", [&] {
    const at::Tensor x = xproj.contiguous();
    InputSide<scalar_t> in;
    in.xproj = x.const_data_ptr<scalar_t>();
    forward_loop<scalar_t>(m.cell, m.gates, steps, H, in, slots<scalar_t>(states, steps, reverse),
                           lstm ? slots<scalar_t>(cells, steps, reverse) : StateSeq<scalar_t>{}, w_hh.contiguous(),
                           has_b ? *b_hh : at::Tensor(), nullptr, len, track,
                           gated ? ws.data_ptr<scalar_t>() : nullptr, track ? jac.data_ptr<float>() : nullptr);
  });
  return {states, cells, ws, jac};
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
  // An empty grad_cell_states stands for zeros (no gradient reaches the cell states from outside).
  const bool has_gcells = lstm && (grad_cell_states.numel() != 0 || grad_cell_states.dim() != 1);
  if (lstm) {
    check_tensor(op, "cell_states", cell_states, dtype, {T_ + 1, B, H});
    if (has_gcells) check_tensor(op, "grad_cell_states", grad_cell_states, dtype, {T_ + 1, B, H});
  }
  if (lstm || gru) check_tensor(op, "workspace", workspace, dtype, {T_, B, 4 * H});
  if (grad_clip.has_value()) {
    TORCH_CHECK_VALUE(*grad_clip > 0, op, ": grad_clip must be None or > 0, got ", *grad_clip);
  }
  const at::Tensor len = checked_lengths(op, lengths, B, T_);

  const auto opts = states.options();
  at::Tensor gx = cached_empty({T_, B, GH}, opts);
  at::Tensor gh0 = at::empty({B, H}, opts);
  at::Tensor gc0 = lstm ? at::empty({B, H}, opts) : at::empty({0}, opts);
  at::Tensor gw = cached_empty({GH, H}, opts);  // becomes .grad, freed by zero_grad: reused
  at::Tensor gb = gru && has_b_hh ? at::empty({GH}, opts) : at::empty({0}, opts);
  at::Tensor gsq = grad_sq_buffer(track, lstm, T_, B, opts);
  const int64_t init = reverse ? T_ : 0, first_out = reverse ? 0 : 1;
  const Steps steps = padded_steps(T_, B);

  AT_DISPATCH_FLOATING_TYPES(dtype, "rnn_backward", [&] {
    using T = scalar_t;
    const at::Tensor st = states.contiguous(), gs = grad_states.contiguous();
    const at::Tensor cs = lstm ? cell_states.contiguous() : at::Tensor();
    const at::Tensor gcs = has_gcells ? grad_cell_states.contiguous() : at::Tensor();
    const at::Tensor ws = lstm || gru ? workspace.contiguous() : at::Tensor();
    // Gradient reaching the state before the current step (and the cell state): zero at the end.
    at::Tensor dh = at::zeros({B, H}, opts);
    at::Tensor dc = lstm ? at::zeros({B, H}, opts) : at::Tensor();
    // GRU: the gradient of h_prev W_hh^T + b_hh differs from grad_xproj in its n block (d hn = r * d n_pre).
    at::Tensor rec = gru ? at::empty({T_, B, GH}, opts) : at::Tensor();
    backward_loop<T>(m.cell, m.gates, steps, H, grad_seq<T>(gs, steps, first_out * B, H, opts),
                     lstm ? grad_seq<T>(gcs, steps, first_out * B, H, opts) : GradSeq<T>{},
                     slots<T>(st, steps, reverse), lstm ? slots<T>(cs, steps, reverse) : StateSeq<T>{},
                     ws.defined() ? ws.const_data_ptr<T>() : nullptr, w_hh.contiguous(), nullptr, nullptr, len,
                     grad_clip, track, dh, dc, gx.data_ptr<T>(), gru ? rec.data_ptr<T>() : nullptr,
                     track ? gsq.data_ptr<double>() : nullptr, nullptr, nullptr, 0);
    at::add_out(gh0, dh, gs.select(0, init));
    if (lstm) has_gcells ? at::add_out(gc0, dc, gcs.select(0, init)) : gc0.copy_(dc);
    // grad_w_hh = sum over positions of the recurrent pre-activation gradients^T h_prev.
    const at::Tensor D = (gru ? rec : gx).view({T_ * B, GH});
    weight_grad<T>({st.narrow(0, reverse ? 1 : 0, T_).reshape({T_ * B, H})}, D, gw, gb.numel() ? gb : at::Tensor());
  });
  return {gx, gh0, gc0, gw, gb, gsq};
}

// ---------------------------------------------------------------- rnn_layer_forward / rnn_layer_backward

// The shapes of one call of a layer op. Padded: x [T, B, I] and the output [T, B, P]. Packed (batch_sizes
// given, torch's PackedSequence layout): x [R, I] and the output [R, P] with R = sum(batch_sizes) rows.
// P = proj_size with w_hr [P, H] (LSTM only), else H.
struct LayerShape {
  int64_t T = 0, B = 0, I = 0, H = 0, P = 0, R = 0;
  bool packed = false, proj = false;
  at::Tensor sizes;  // owns the batch sizes that steps points to
  Steps steps;
  // [rows, width] (packed) or [T, B, width] (padded)
  std::vector<int64_t> seq(int64_t width) const {
    return packed ? std::vector<int64_t>{R, width} : std::vector<int64_t>{T, B, width};
  }
};

// Checks the arguments the layer ops share and returns their shapes; names the op and the argument.
LayerShape layer_shape(const char* op, const Mode& m, const at::Tensor& x, const at::Tensor& h0,
                       const std::optional<at::Tensor>& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                       const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths,
                       const std::optional<at::Tensor>& batch_sizes, at::ScalarType dtype) {
  LayerShape s;
  s.packed = batch_sizes.has_value() && batch_sizes->defined();
  s.proj = w_hr.has_value() && w_hr->defined();
  const bool has_lengths = lengths.has_value() && lengths->defined();
  TORCH_CHECK_VALUE(!(s.packed && has_lengths), op, ": lengths (padded input) and batch_sizes (packed input) ",
                    "exclude each other, got both");
  TORCH_CHECK_VALUE(!s.proj || m.cell == Cell::kLstm, op, ": w_hr (a projection) is for mode 'lstm' only");
  // The sizes come from x (or batch_sizes), w_hh and w_hr; h0 and c0 are checked against them.
  TORCH_CHECK_VALUE(w_hh.dim() == 2 && w_hh.size(1) >= 1, op, ": w_hh must have shape [G*H, P] with P >= 1, got ",
                    w_hh.sizes());
  if (s.proj) {
    TORCH_CHECK_VALUE(w_hr->dim() == 2 && w_hr->size(1) >= 1, op, ": w_hr must have shape [P, H] with H >= 1, got ",
                      w_hr->sizes());
    s.P = w_hr->size(0);
    s.H = w_hr->size(1);
    check_tensor(op, "w_hr", *w_hr, dtype, {s.P, s.H});
  } else {
    s.P = s.H = w_hh.size(1);
  }
  if (s.packed) {
    s.sizes = batch_sizes->contiguous();
    s.steps = packed_steps(op, s.sizes);
    s.B = s.steps.B;
    s.T = s.steps.T;
    s.R = s.steps.total();
    TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == s.R && x.size(1) >= 1, op,
                      ": packed x must have shape [sum(batch_sizes), I] = [", s.R, ", I] with I >= 1, got ",
                      x.sizes());
    s.I = x.size(1);
  } else {
    TORCH_CHECK_VALUE(x.dim() == 3 && x.size(0) >= 1 && x.size(2) >= 1, op,
                      ": x must have shape [T, B, I] with T >= 1 and I >= 1, got ", x.sizes());
    s.T = x.size(0);
    s.B = x.size(1);
    s.I = x.size(2);
    s.R = s.T * s.B;
    s.steps = padded_steps(s.T, s.B);
  }
  const int64_t GH = m.gates * s.H;
  check_tensor(op, "h0", h0, dtype, {s.B, s.P});
  check_tensor(op, "w_ih", w_ih, dtype, {GH, s.I});
  check_tensor(op, "w_hh", w_hh, dtype, {GH, s.P});
  const bool has_c0 = c0.has_value() && c0->defined();
  if (m.cell == Cell::kLstm) {
    TORCH_CHECK_VALUE(has_c0, op, ": c0 [B, H] is required for mode 'lstm', got None");
    check_tensor(op, "c0", *c0, dtype, {s.B, s.H});
  } else {
    TORCH_CHECK_VALUE(!has_c0, op, ": c0 must be None for modes other than 'lstm', got a tensor of shape ",
                      c0->sizes());
  }
  return s;
}

// Workspace of a layer op, rows laid out as the input (private to this backend): the gated cells' 4H
// values per row (see the top of this file), then with a projection, as a second block of rows * H
// values, hf = o * tanh(c) per row.
int64_t workspace_width(const Mode& m, const LayerShape& s) {
  if (m.cell != Cell::kLstm && m.cell != Cell::kGru) return 0;
  return 4 * s.H + (s.proj ? s.H : 0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_layer_forward_cpu(
    const at::Tensor& x, const at::Tensor& h0, const std::optional<at::Tensor>& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& batch_sizes, const std::optional<at::Tensor>& probe, c10::string_view mode,
    bool reverse, bool track, std::optional<double> grad_clip) {
  constexpr const char* op = "vgk::rnn_layer_forward";
  const Mode m = parse_mode(mode);
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got one on ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op, ": x must be float32 or float64, got ", dtype);
  const LayerShape s = layer_shape(op, m, x, h0, c0, w_ih, w_hh, w_hr, lengths, batch_sizes, dtype);
  const int64_t B = s.B, I = s.I, H = s.H, P = s.P, R = s.R, GH = m.gates * H;
  const bool lstm = m.cell == Cell::kLstm, gru = m.cell == Cell::kGru, gated = lstm || gru;
  const bool has_bih = b_ih.has_value() && b_ih->defined(), has_bhh = b_hh.has_value() && b_hh->defined();
  if (has_bih) check_tensor(op, "b_ih", *b_ih, dtype, {GH});
  if (has_bhh) check_tensor(op, "b_hh", *b_hh, dtype, {GH});
  const at::Tensor len = checked_lengths(op, lengths, B, s.T);

  const auto opts = x.options();
  at::Tensor output = cached_empty(s.seq(P), opts);
  at::Tensor h_n = at::empty({B, P}, opts);
  at::Tensor c_n = lstm ? at::empty({B, H}, opts) : at::empty({0}, opts);
  at::Tensor cells = lstm ? cached_empty(s.seq(H), opts) : at::empty({0}, opts);
  at::Tensor ws = gated ? cached_empty(s.seq(workspace_width(m, s)), opts) : at::empty({0}, opts);
  // Packed: the positions a sample does not hold stay 0.
  at::Tensor jac = !track ? at::empty({0}, opts.dtype(at::kFloat))
                   : s.packed ? at::zeros({s.T, B}, opts.dtype(at::kFloat)) : at::empty({s.T, B}, opts.dtype(at::kFloat));

  // The bias of the input side: b_ih + b_hh, except for the GRU whose b_hh stays inside r * (...).
  at::Tensor bias = has_bih ? b_ih->contiguous() : at::zeros({GH}, opts);
  if (!gru && has_bhh) bias = bias + *b_hh;

  AT_DISPATCH_FLOATING_TYPES(dtype, "rnn_layer_forward", [&] {
    using T = scalar_t;
    const at::Tensor xc = cached_contiguous(x), h0c = h0.contiguous();
    const at::Tensor c0c = lstm ? c0->contiguous() : at::Tensor();
    const at::Tensor wih = w_ih.contiguous(), whh = w_hh.contiguous();
    // The projection of all steps in one GEMM where it runs on brgemm tiles (an LSTM layer's forward +
    // backward 4% faster than per step on a Zen 5 core, at AVX-512 and at AVX2) and its buffer is at most
    // kWholeProjectionBytes, or where the batch is too small for per-step GEMMs.
    const TiledGemm<T> whole(wih, /*trans_w=*/true, R >= kTiledMinRows);
    const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
    const bool column_split = s.T == 1 && !s.proj && threads > 1 && R < kTiledMinRows &&
                              B * GH * (I + H) >= kColumnSplitMacs &&
                              (GH * (I + H) * static_cast<int64_t>(sizeof(T)) >= kColumnSplitWeightBytes ||
                               B < threads * kRowGrain);
    const bool per_step = !column_split && B >= kStepProjectionRows &&
                          (whole.path() != GemmPath::kBrgemm ||
                           R * GH * static_cast<int64_t>(sizeof(T)) > kWholeProjectionBytes);
    std::optional<RowsGemm<T>> proj_in;
    at::Tensor xproj, hh_first;
    InputSide<T> in;
    if (column_split) {
      xproj = cached_empty({R, GH}, opts);
      hh_first = cached_empty({B, GH}, opts);
      column_split_gemm<T>(R, GH, I, xc.const_data_ptr<T>(), I, wih.const_data_ptr<T>(), bias.const_data_ptr<T>(),
                           xproj.data_ptr<T>(), GH);
      column_split_gemm<T>(B, GH, H, h0c.const_data_ptr<T>(), H, whh.const_data_ptr<T>(), nullptr,
                           hh_first.data_ptr<T>(), GH);
      in.xproj = xproj.const_data_ptr<T>();
      in.hh_first = hh_first.const_data_ptr<T>();
    } else if (per_step) {
      in.x = xc.const_data_ptr<T>();
      in.I = I;
      in.w_ih = &proj_in.emplace(wih, /*trans_w=*/true, R >= kTiledMinRows, parallel_chunk(B, kRowGrain));
      in.bias = bias.const_data_ptr<T>();
    } else {
      xproj = cached_empty({R, GH}, opts);
      whole.run(R, xc.const_data_ptr<T>(), I, bias.const_data_ptr<T>(), false, xproj.data_ptr<T>(), GH);
      in.xproj = xproj.const_data_ptr<T>();
    }
    const StateSeq<T> hs{output.data_ptr<T>(), h0c.const_data_ptr<T>(), P, &s.steps, reverse};
    const StateSeq<T> cs = lstm ? StateSeq<T>{cells.data_ptr<T>(), c0c.const_data_ptr<T>(), H, &s.steps, reverse}
                                : StateSeq<T>{};
    Projection<T> pj;
    std::optional<RowsGemm<T>> proj_out;
    at::Tensor hf_init, kgram, col_sq;
    if (s.proj) {
      const at::Tensor whr = w_hr->contiguous();
      pj.P = P;
      pj.gemm = &proj_out.emplace(whr, /*trans_w=*/true, R >= kTiledMinRows, parallel_chunk(B, kRowGrain));
      hf_init = at::zeros({B, H}, opts);
      pj.full = {ws.data_ptr<T>() + R * 4 * H, hf_init.const_data_ptr<T>(), H, &s.steps, reverse};
      if (track) {
        const at::Tensor q = at::mm(whr.t(), whr);  // W_hr^T W_hr [H, H]
        kgram = at::mm(whh, whh.t()).mul_(q.repeat({4, 4}));
        col_sq = q.diagonal().contiguous();
        pj.kgram = kgram.const_data_ptr<T>();
        pj.col_sq = col_sq.const_data_ptr<T>();
      }
    }
    forward_loop<T>(m.cell, m.gates, s.steps, H, in, hs, cs, whh, gru && has_bhh ? *b_hh : at::Tensor(),
                    s.proj ? &pj : nullptr, len, track, gated ? ws.data_ptr<T>() : nullptr,
                    track ? jac.data_ptr<float>() : nullptr);
  });
  final_state(output.view({R, P}), s.steps, reverse, h_n);
  if (lstm) final_state(cells.view({R, H}), s.steps, reverse, c_n);
  return {output, h_n, c_n, cells, ws, jac};
}

// An empty tensor stands for a zero gradient; otherwise it must have the given shape.
at::Tensor optional_grad(const char* op, const char* name, const at::Tensor& g, at::ScalarType dtype,
                         at::IntArrayRef sizes) {
  if (g.numel() == 0 && g.dim() == 1) return at::Tensor();
  check_tensor(op, name, g, dtype, sizes);
  return cached_contiguous(g);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
rnn_layer_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                       const at::Tensor& x, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
                       const at::Tensor& output, const at::Tensor& cell_states, const at::Tensor& workspace,
                       const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                       const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& batch_sizes,
                       c10::string_view mode, bool reverse, std::optional<double> grad_clip, bool track,
                       bool has_bias, bool grad_input) {
  constexpr const char* op = "vgk::rnn_layer_backward";
  const Mode m = parse_mode(mode);
  TORCH_CHECK(output.device().is_cpu(), op, ": output must be a CPU tensor, got one on ", output.device());
  const auto dtype = output.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op,
                   ": output must be float32 or float64, got ", dtype);
  // x must have the rows of the output it gave.
  TORCH_CHECK_VALUE(output.dim() >= 2 && x.dim() == output.dim() && x.sizes().slice(0, x.dim() - 1) ==
                    output.sizes().slice(0, output.dim() - 1), op, ": x must have shape [",
                    output.sizes().slice(0, output.dim() - 1), ", I] like the output, got ", x.sizes());
  check_tensor(op, "x", x, dtype, x.sizes());
  const LayerShape s = layer_shape(op, m, x, h0, c0, w_ih, w_hh, w_hr, lengths, batch_sizes, dtype);
  const int64_t B = s.B, I = s.I, H = s.H, P = s.P, R = s.R, T_ = s.T, GH = m.gates * H;
  const bool lstm = m.cell == Cell::kLstm, gru = m.cell == Cell::kGru;
  check_tensor(op, "output", output, dtype, s.seq(P));
  const at::Tensor g_out = optional_grad(op, "grad_output", grad_output, dtype, s.seq(P));
  const at::Tensor g_hn = optional_grad(op, "grad_h_n", grad_h_n, dtype, {B, P});
  at::Tensor g_cn;
  if (lstm) {
    check_tensor(op, "cell_states", cell_states, dtype, s.seq(H));
    g_cn = optional_grad(op, "grad_c_n", grad_c_n, dtype, {B, H});
  }
  if (lstm || gru) check_tensor(op, "workspace", workspace, dtype, s.seq(workspace_width(m, s)));
  if (grad_clip.has_value()) {
    TORCH_CHECK_VALUE(*grad_clip > 0, op, ": grad_clip must be None or > 0, got ", *grad_clip);
  }
  const at::Tensor len = checked_lengths(op, lengths, B, T_);

  const auto opts = output.options();
  at::Tensor gx = grad_input ? cached_empty(x.sizes(), opts) : at::empty({0}, opts);
  at::Tensor gw_ih = cached_empty({GH, I}, opts);  // become .grad, freed by zero_grad: reused
  at::Tensor gw_hh = cached_empty({GH, P}, opts);
  at::Tensor gb_ih = has_bias ? at::empty({GH}, opts) : at::empty({0}, opts);
  at::Tensor gb_hh = has_bias ? at::empty({GH}, opts) : at::empty({0}, opts);
  at::Tensor gw_hr = s.proj ? at::empty({P, H}, opts) : at::empty({0}, opts);
  at::Tensor gsq = grad_sq_buffer(track, lstm, T_, B, opts);
  if (track && s.packed) gsq.zero_();  // the positions a sample does not hold
  // Gradients reaching the last processed state; on exit those of h0 and c0.
  at::Tensor dh = g_hn.defined() ? g_hn.clone() : at::zeros({B, P}, opts);
  at::Tensor dc = !lstm ? at::empty({0}, opts) : g_cn.defined() ? g_cn.clone() : at::zeros({B, H}, opts);

  AT_DISPATCH_FLOATING_TYPES(dtype, "rnn_layer_backward", [&] {
    using T = scalar_t;
    const at::Tensor xc = cached_contiguous(x), out = cached_contiguous(output), h0c = h0.contiguous();
    const at::Tensor cs = lstm ? cached_contiguous(cell_states) : at::Tensor();
    const at::Tensor c0c = lstm ? c0->contiguous() : at::Tensor();
    const at::Tensor ws = lstm || gru ? cached_contiguous(workspace) : at::Tensor();
    const at::Tensor wih = w_ih.contiguous();
    // grad_x: dgates W_ih per step, or one GEMM after the loop (as the forward's projection).
    std::optional<TiledGemm<T>> whole;
    if (grad_input) whole.emplace(wih, /*trans_w=*/false, R >= kTiledMinRows);
    const bool per_step = B >= kStepProjectionRows && (!whole || whole->path() != GemmPath::kBrgemm);
    std::optional<RowsGemm<T>> back_proj;
    if (grad_input && per_step) back_proj.emplace(wih, /*trans_w=*/false, R >= kTiledMinRows, parallel_chunk(B, kRowGrain));
    // The pre-activation gradients; the GRU's recurrent ones differ in their n block (d hn = r * d n_pre).
    at::Tensor D = cached_empty({R, GH}, opts);
    at::Tensor rec = gru ? cached_empty({R, GH}, opts) : at::Tensor();
    const StateSeq<T> hs{const_cast<T*>(out.const_data_ptr<T>()), h0c.const_data_ptr<T>(), P, &s.steps, reverse};
    const StateSeq<T> cseq = lstm ? StateSeq<T>{const_cast<T*>(cs.const_data_ptr<T>()), c0c.const_data_ptr<T>(),
                                                H, &s.steps, reverse}
                                  : StateSeq<T>{};
    Projection<T> pj;
    std::optional<RowsGemm<T>> proj_back;
    at::Tensor grad_h, hf;
    if (s.proj) {
      pj.P = P;
      pj.gemm = &proj_back.emplace(w_hr->contiguous(), /*trans_w=*/false, R >= kTiledMinRows,
                                   parallel_chunk(B, kRowGrain));  // dh_t W_hr
      grad_h = cached_empty({R, P}, opts);
      hf = ws.view({-1}).narrow(0, R * 4 * H, R * H).view({R, H});
    }
    backward_loop<T>(m.cell, m.gates, s.steps, H, grad_seq<T>(g_out, s.steps, 0, P, opts),
                     lstm ? grad_seq<T>(at::Tensor(), s.steps, 0, H, opts) : GradSeq<T>{}, hs, cseq,
                     ws.defined() ? ws.const_data_ptr<T>() : nullptr, w_hh.contiguous(), s.proj ? &pj : nullptr,
                     s.proj ? grad_h.data_ptr<T>() : nullptr, len, grad_clip, track, dh, dc, D.data_ptr<T>(),
                     gru ? rec.data_ptr<T>() : nullptr, track ? gsq.data_ptr<double>() : nullptr,
                     back_proj ? &*back_proj : nullptr, grad_input && per_step ? gx.data_ptr<T>() : nullptr, I);
    const at::Tensor Dx = D.view({R, GH}), Dh = (gru ? rec : D).view({R, GH});
    if (grad_input && !per_step) whole->run(R, Dx.const_data_ptr<T>(), GH, nullptr, false, gx.data_ptr<T>(), I);
    weight_grad<T>({xc.view({R, I})}, Dx, gw_ih, has_bias ? gb_ih : at::Tensor());
    weight_grad<T>(states_before(out.view({R, P}), h0c, s.steps, reverse), Dh, gw_hh,
                   has_bias && gru ? gb_hh : at::Tensor());
    if (s.proj) weight_grad<T>({hf}, grad_h, gw_hr);
    if (has_bias && !gru) gb_hh.copy_(gb_ih);
  });
  return {gx, dh, dc, gw_ih, gw_hh, gb_ih, gb_hh, gw_hr, gsq};
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
  // The same layer with its input projection inside: x W_ih^T + b per step in the forward, and in the
  // backward grad_x per step plus grad_w_ih, grad_w_hh and the bias sums after the loop. The forward
  // ignores probe and grad_clip: they are there for the autograd registration.
  // Packed input: batch_sizes as in torch's PackedSequence, x [sum(batch_sizes), I]. The LSTM's projection
  // (proj_size P): w_hr [P, H], and the state carried and output is h = (o * tanh(c)) W_hr^T [P].
  m.def(
      "rnn_layer_forward(Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? w_hr, Tensor? lengths, Tensor? batch_sizes, Tensor? probe, str mode, bool reverse, "
      "bool track, float? grad_clip) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "rnn_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor h0, "
      "Tensor? c0, Tensor output, Tensor cell_states, Tensor workspace, Tensor w_ih, Tensor w_hh, "
      "Tensor? w_hr, Tensor? lengths, Tensor? batch_sizes, str mode, bool reverse, float? grad_clip, "
      "bool track, bool has_bias, bool grad_input) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace vgk

TORCH_LIBRARY_IMPL(vgk, CPU, m) {
  m.impl("rnn_forward", &vgk::rnn::rnn_forward_cpu);
  m.impl("rnn_backward", &vgk::rnn::rnn_backward_cpu);
  m.impl("rnn_layer_forward", &vgk::rnn::rnn_layer_forward_cpu);
  m.impl("rnn_layer_backward", &vgk::rnn::rnn_layer_backward_cpu);
}
