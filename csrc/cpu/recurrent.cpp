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
// on it, with no barrier between steps.
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
#include <immintrin.h>
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
  return cpu_has_avx2_fma();
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

// Fewest batch rows per thread: the per-step GEMM loses efficiency on fewer rows.
constexpr int64_t kRowGrain = 4;
// Fewest batch rows for which the input projection runs per step inside the time loop (GEMMs of the
// threads' rows); below, the rows per thread are too few and one GEMM over all T*B rows is faster.
constexpr int64_t kStepProjectionRows = 2 * kRowGrain;

int64_t position(int64_t s, int64_t T, bool reverse) { return reverse ? T - 1 - s : s; }

// A layer's states: at(t) is the state after position t ([B, H] rows; positions BH apart), before(t)
// the state before position t in processing order, `init` before the first processed position.
template <typename T>
struct StateSeq {
  T* base = nullptr;
  const T* init = nullptr;
  int64_t steps = 0, BH = 0;
  bool reverse = false;
  T* at(int64_t t) const { return base + t * BH; }
  const T* before(int64_t t) const {
    const int64_t p = reverse ? t + 1 : t - 1;
    return p < 0 || p >= steps ? init : base + p * BH;
  }
};

// rnn_forward/rnn_backward keep states [T+1, B, H] with h0 in slot 0 (slot T when reverse): the state
// after position t is then in slot t+1 (slot t), and h0 sits right before the first one processed.
template <typename T>
StateSeq<T> slots(const at::Tensor& states, bool reverse) {
  const int64_t steps = states.size(0) - 1, BH = states.size(1) * states.size(2);
  T* p = const_cast<T*>(states.const_data_ptr<T>());
  return {p + (reverse ? 0 : BH), p + (reverse ? steps : 0) * BH, steps, BH, reverse};
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
};

template <typename T>
void forward_loop(Cell cell, int64_t G, int64_t T_, int64_t B, int64_t H, const InputSide<T>& in,
                  const StateSeq<T>& hs, const StateSeq<T>& cs, const at::Tensor& w, const at::Tensor& bhh,
                  const at::Tensor& len, bool track, T* wsp, float* jp) {
  if (B == 0) return;
  const int64_t GH = G * H;
  const bool gru = cell == Cell::kGru, lstm = cell == Cell::kLstm, fused = in.w_ih != nullptr;
  const auto opts = w.options();
  at::Tensor bias = gru ? (bhh.defined() ? bhh.contiguous() : at::zeros({GH}, opts)) : at::Tensor();
  // The GRU adds a bias to its input side too: b_ih with x, zeros with xproj (which holds it).
  at::Tensor xbias = gru && !fused ? at::zeros({GH}, opts) : at::Tensor();
  at::Tensor gram = track ? gram_entries<T>(w, G, H, /*diagonals=*/gru) : at::Tensor();
  const RowsGemm<T> step_gemm(w, /*trans_w=*/true);  // h_prev W_hh^T
  const ForwardRows<T> rows = pick_forward<T>(cell, track);
  const int64_t* lp = len.defined() ? len.const_data_ptr<int64_t>() : nullptr;

  // Samples are independent: each thread runs the whole time loop over its own batch rows, so the
  // steps need no barrier. Pointers below address the thread's first row.
  at::parallel_for(0, B, kRowGrain, [&](int64_t b0, int64_t b1) {
    const int64_t nb = b1 - b0;
    at::Tensor hh = at::empty({nb, GH}, opts);
    // With x, the GRU keeps x_t W_ih^T apart (r scales only the recurrent part of n); the other cells
    // sum both products in hh and read the bias as their input row.
    at::Tensor xrows = fused && gru ? at::empty({nb, GH}, opts) : at::Tensor();
    at::Tensor scratch = at::empty({track ? H : 0}, opts);
    T* hhp = hh.data_ptr<T>();
    FwdStep<T> st;
    st.H = H;
    st.hh = hhp;
    st.scratch = track ? scratch.data_ptr<T>() : nullptr;
    st.bhh = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
    st.bx = !gru ? nullptr : fused ? in.bias : xbias.const_data_ptr<T>();
    st.gram = gram.defined() ? gram.const_data_ptr<T>() : nullptr;
    st.len = lp ? lp + b0 : nullptr;
    for (int64_t s = 0; s < T_; ++s) {
      const int64_t t = position(s, T_, hs.reverse), row = t * B + b0;
      st.hp = hs.before(t) + b0 * H;
      if (!fused) {
        step_gemm.run(nb, st.hp, H, /*accumulate=*/false, hhp, GH);
        st.x = in.xproj + row * GH;
        st.xs = GH;
      } else if (gru) {
        in.w_ih->run(nb, in.x + row * in.I, in.I, /*accumulate=*/false, xrows.data_ptr<T>(), GH);
        step_gemm.run(nb, st.hp, H, /*accumulate=*/false, hhp, GH);
        st.x = xrows.data_ptr<T>();
        st.xs = GH;
      } else {
        in.w_ih->run(nb, in.x + row * in.I, in.I, /*accumulate=*/false, hhp, GH);
        step_gemm.run(nb, st.hp, H, /*accumulate=*/true, hhp, GH);
        st.x = in.bias;
        st.xs = 0;
      }
      st.t = t;
      st.h = hs.at(t) + b0 * H;
      if (lstm) {
        st.cp = cs.before(t) + b0 * H;
        st.c = cs.at(t) + b0 * H;
      }
      if (wsp) st.ws = wsp + row * 4 * H;
      if (jp) st.jac = jp + t * B + b0;
      rows(st, 0, nb);
    }
  });
}

// The incoming gradient of a state sequence at position t: base + t * step ([B, H] rows). An absent
// gradient reads one zero block at every position (step 0).
template <typename T>
struct GradSeq {
  const T* base = nullptr;
  int64_t step = 0;
  at::Tensor keep;  // owns the zero block
  const T* at(int64_t t) const { return base + t * step; }
};

template <typename T>
GradSeq<T> grad_seq(const at::Tensor& grad, int64_t offset_rows, int64_t B, int64_t H,
                    const at::TensorOptions& opts) {
  if (!grad.defined()) {
    at::Tensor zeros = at::zeros({B, H}, opts);
    return {zeros.const_data_ptr<T>(), 0, zeros};
  }
  return {grad.const_data_ptr<T>() + offset_rows * B * H, B * H, grad};
}

// The backward time loop. dh, dc [B, H] hold the gradients reaching the last processed state on entry
// and the gradients of h0, c0 on exit (without any direct gradient of h0, c0). Writes the pre-activation
// gradients gx [T, B, G*H] (GRU: also those of h_prev W_hh^T + b_hh into rec), and, with grad_x, the
// gradient of x: gx_t W_ih per step.
template <typename T>
void backward_loop(Cell cell, int64_t G, int64_t T_, int64_t B, int64_t H, const GradSeq<T>& gh,
                   const GradSeq<T>& gc, const StateSeq<T>& hs, const StateSeq<T>& cs, const T* wsp,
                   const at::Tensor& w, const at::Tensor& len, std::optional<double> grad_clip, bool track,
                   at::Tensor& dh, at::Tensor& dc, T* gxp, T* recp, double* qp, const RowsGemm<T>* w_ih,
                   T* grad_x, int64_t I) {
  if (B == 0) return;
  const int64_t GH = G * H;
  const bool lstm = cell == Cell::kLstm, gru = cell == Cell::kGru;
  const RowsGemm<T> step_gemm(w, /*trans_w=*/false);  // dgates W_hh
  const BackwardRows<T> rows = pick_backward<T>(cell, track);
  const T clip = grad_clip.has_value() ? static_cast<T>(*grad_clip) : std::numeric_limits<T>::infinity();
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
      const int64_t t = position(s, T_, hs.reverse), row = t * B + b0;
      st.t = t;
      st.gs = gh.at(t) + b0 * H;
      st.h = hs.at(t) + b0 * H;
      st.hp = hs.before(t) + b0 * H;
      if (lstm) {
        st.gcs = gc.at(t) + b0 * H;
        st.c = cs.at(t) + b0 * H;
        st.cp = cs.before(t) + b0 * H;
      }
      if (wsp) st.ws = wsp + row * 4 * H;
      st.gx = gxp + row * GH;
      if (gru) st.rec = recp + row * GH;
      if (qp) {
        st.gsq_h = qp + t * B + b0;
        if (lstm) st.gsq_c = qp + (T_ + t) * B + b0;
      }
      rows(st, 0, nb);
      step_gemm.run(nb, gru ? st.rec : st.gx, GH, /*accumulate=*/true, st.dh, H);
      if (grad_x) w_ih->run(nb, st.gx, GH, /*accumulate=*/false, grad_x + row * I, I);
    }
  });
}

#ifdef VGK_RNN_AVX2
// dst[c, r] = src[r, c] for one 8 x 8 float block.
__attribute__((target("avx2"))) void transpose_8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
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
#endif

// dst[c, r] = src[r, c] for a [rows, cols] block, in tiles over the threads (8 x 8 vector blocks for
// float on AVX2, element by element elsewhere and at the edges).
template <typename T>
void transpose_into(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  constexpr int64_t kTile = 64;
  const int64_t tiles_r = (rows + kTile - 1) / kTile, tiles_c = (cols + kTile - 1) / kTile;
  bool blocks = false;
#ifdef VGK_RNN_AVX2
  blocks = std::is_same_v<T, float> && use_avx2();
#endif
  at::parallel_for(0, tiles_r * tiles_c, 4, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r0 = (i / tiles_c) * kTile, c0 = (i % tiles_c) * kTile;
      const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
      int64_t r8 = r0, c8 = c0;  // end of the part done in 8 x 8 blocks
#ifdef VGK_RNN_AVX2
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

// A weight gradient summed over all T*B rows: out [N, K] = D^T A with D [R, N] contiguous and A [R, K]
// given as consecutive blocks of contiguous rows. One GEMM after the time loop. brgemm wants both
// operands row-major, so it computes out^T = A^T D from a transposed copy of A.
template <typename T>
void weight_grad(const std::vector<at::Tensor>& blocks, const at::Tensor& D, at::Tensor& out) {
  const int64_t R = D.size(0), N = D.size(1), K = out.size(1);
  if (R == 0) {
    out.zero_();
    return;
  }
  if (brgemm_enabled<T>()) {
    at::Tensor a_t = cached_empty({K, R}, D.options());
    int64_t r0 = 0;
    for (const at::Tensor& blk : blocks) {
      transpose_into<T>(blk.const_data_ptr<T>(), blk.size(0), K, K, a_t.data_ptr<T>() + r0, R);
      r0 += blk.size(0);
    }
    at::Tensor out_t = cached_empty({K, N}, D.options());
    if constexpr (std::is_same_v<T, float>) {
      tiled_brgemm(K, N, R, a_t.const_data_ptr<float>(), R, D.const_data_ptr<float>(), N, out_t.data_ptr<float>(),
                   N);
    }
    transpose_into<T>(out_t.const_data_ptr<T>(), K, N, N, out.data_ptr<T>(), K);
    return;
  }
  const at::Tensor A = blocks.size() == 1 ? blocks[0] : at::cat(blocks);
  gemm<T>(true, false, N, K, R, D.const_data_ptr<T>(), N, A.const_data_ptr<T>(), K, T(0), out.data_ptr<T>(), K);
}

// The state before each position, in the order of positions, as blocks of rows of `seq` [T, B, H]
// and `init` [B, H] (what weight_grad takes).
std::vector<at::Tensor> states_before(const at::Tensor& seq, const at::Tensor& init, bool reverse) {
  const int64_t T_ = seq.size(0), B = seq.size(1), H = seq.size(2);
  at::Tensor rest = seq.narrow(0, reverse ? 1 : 0, T_ - 1).view({(T_ - 1) * B, H});
  if (reverse) return {rest, init};
  return {init, rest};
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

  AT_DISPATCH_FLOATING_TYPES(dtype, "rnn_forward", [&] {
    const at::Tensor x = xproj.contiguous();
    InputSide<scalar_t> in;
    in.xproj = x.const_data_ptr<scalar_t>();
    forward_loop<scalar_t>(m.cell, m.gates, T_, B, H, in, slots<scalar_t>(states, reverse),
                           lstm ? slots<scalar_t>(cells, reverse) : StateSeq<scalar_t>{}, w_hh.contiguous(),
                           has_b ? *b_hh : at::Tensor(), len, track,
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
  at::Tensor gx = at::empty({T_, B, GH}, opts);
  at::Tensor gh0 = at::empty({B, H}, opts);
  at::Tensor gc0 = lstm ? at::empty({B, H}, opts) : at::empty({0}, opts);
  at::Tensor gw = at::empty({GH, H}, opts);
  at::Tensor gb = gru && has_b_hh ? at::empty({GH}, opts) : at::empty({0}, opts);
  at::Tensor gsq = grad_sq_buffer(track, lstm, T_, B, opts);
  const int64_t init = reverse ? T_ : 0, first_out = reverse ? 0 : 1;

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
    backward_loop<T>(m.cell, m.gates, T_, B, H, grad_seq<T>(gs, first_out, B, H, opts),
                     lstm ? grad_seq<T>(gcs, first_out, B, H, opts) : GradSeq<T>{}, slots<T>(st, reverse),
                     lstm ? slots<T>(cs, reverse) : StateSeq<T>{}, ws.defined() ? ws.const_data_ptr<T>() : nullptr,
                     w_hh.contiguous(), len, grad_clip, track, dh, dc, gx.data_ptr<T>(),
                     gru ? rec.data_ptr<T>() : nullptr, track ? gsq.data_ptr<double>() : nullptr, nullptr, nullptr, 0);
    at::add_out(gh0, dh, gs.select(0, init));
    if (lstm) has_gcells ? at::add_out(gc0, dc, gcs.select(0, init)) : gc0.copy_(dc);
    // grad_w_hh = sum over positions of the recurrent pre-activation gradients^T h_prev.
    const at::Tensor D = (gru ? rec : gx).view({T_ * B, GH});
    weight_grad<T>({st.narrow(0, reverse ? 1 : 0, T_).reshape({T_ * B, H})}, D, gw);
    if (gb.numel()) at::sum_out(gb, D, at::IntArrayRef{0});
  });
  return {gx, gh0, gc0, gw, gb, gsq};
}

// ---------------------------------------------------------------- rnn_layer_forward / rnn_layer_backward

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_layer_forward_cpu(
    const at::Tensor& x, const at::Tensor& h0, const std::optional<at::Tensor>& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& probe, c10::string_view mode,
    bool reverse, bool track, std::optional<double> grad_clip) {
  constexpr const char* op = "vgk::rnn_layer_forward";
  const Mode m = parse_mode(mode);
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got one on ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op, ": x must be float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(0) >= 1 && x.size(2) >= 1, op,
                    ": x must have shape [T, B, I] with T >= 1 and I >= 1, got ", x.sizes());
  TORCH_CHECK_VALUE(h0.dim() == 2 && h0.size(1) >= 1, op, ": h0 must have shape [B, H] with H >= 1, got ",
                    h0.sizes());
  const int64_t T_ = x.size(0), B = x.size(1), I = x.size(2), H = h0.size(1), GH = m.gates * H;
  const bool lstm = m.cell == Cell::kLstm, gru = m.cell == Cell::kGru, gated = lstm || gru;
  check_tensor(op, "h0", h0, dtype, {B, H});
  check_tensor(op, "w_ih", w_ih, dtype, {GH, I});
  check_tensor(op, "w_hh", w_hh, dtype, {GH, H});
  const bool has_c0 = c0.has_value() && c0->defined();
  if (lstm) {
    TORCH_CHECK_VALUE(has_c0, op, ": c0 [B, H] is required for mode 'lstm', got None");
    check_tensor(op, "c0", *c0, dtype, {B, H});
  } else {
    TORCH_CHECK_VALUE(!has_c0, op, ": c0 must be None for mode '", std::string(mode), "', got a tensor of shape ",
                      c0->sizes());
  }
  const bool has_bih = b_ih.has_value() && b_ih->defined(), has_bhh = b_hh.has_value() && b_hh->defined();
  if (has_bih) check_tensor(op, "b_ih", *b_ih, dtype, {GH});
  if (has_bhh) check_tensor(op, "b_hh", *b_hh, dtype, {GH});
  const at::Tensor len = checked_lengths(op, lengths, B, T_);

  const auto opts = x.options();
  at::Tensor output = cached_empty({T_, B, H}, opts);
  at::Tensor h_n = at::empty({B, H}, opts);
  at::Tensor c_n = lstm ? at::empty({B, H}, opts) : at::empty({0}, opts);
  at::Tensor cells = lstm ? cached_empty({T_, B, H}, opts) : at::empty({0}, opts);
  at::Tensor ws = gated ? cached_empty({T_, B, 4 * H}, opts) : at::empty({0}, opts);
  at::Tensor jac = track ? at::empty({T_, B}, opts.dtype(at::kFloat)) : at::empty({0}, opts.dtype(at::kFloat));

  // The bias of the input side: b_ih + b_hh, except for the GRU whose b_hh stays inside r * (...).
  at::Tensor bias = has_bih ? b_ih->contiguous() : at::zeros({GH}, opts);
  if (!gru && has_bhh) bias = bias + *b_hh;

  AT_DISPATCH_FLOATING_TYPES(dtype, "rnn_layer_forward", [&] {
    using T = scalar_t;
    const at::Tensor xc = cached_contiguous(x), h0c = h0.contiguous();
    const at::Tensor c0c = lstm ? c0->contiguous() : at::Tensor();
    const at::Tensor wih = w_ih.contiguous();
    const bool per_step = B >= kStepProjectionRows;
    std::optional<RowsGemm<T>> proj;
    at::Tensor xproj;
    InputSide<T> in;
    if (per_step) {
      in.x = xc.const_data_ptr<T>();
      in.I = I;
      in.w_ih = &proj.emplace(wih, /*trans_w=*/true);
      in.bias = bias.const_data_ptr<T>();
    } else {
      xproj = cached_empty({T_ * B, GH}, opts);  // a fresh tensor: expand().contiguous() may alias the bias
      xproj.copy_(bias.expand({T_ * B, GH}));
      gemm<T>(false, true, T_ * B, GH, I, xc.const_data_ptr<T>(), I, wih.const_data_ptr<T>(), I, T(1),
              xproj.data_ptr<T>(), GH);
      in.xproj = xproj.const_data_ptr<T>();
    }
    const StateSeq<T> hs{output.data_ptr<T>(), h0c.const_data_ptr<T>(), T_, B * H, reverse};
    const StateSeq<T> cs = lstm ? StateSeq<T>{cells.data_ptr<T>(), c0c.const_data_ptr<T>(), T_, B * H, reverse}
                                : StateSeq<T>{};
    forward_loop<T>(m.cell, m.gates, T_, B, H, in, hs, cs, w_hh.contiguous(),
                    gru && has_bhh ? *b_hh : at::Tensor(), len, track, gated ? ws.data_ptr<T>() : nullptr,
                    track ? jac.data_ptr<float>() : nullptr);
  });
  // The state after the last position processed (carried past each sample's length).
  const int64_t last = reverse ? 0 : T_ - 1;
  h_n.copy_(output.select(0, last));
  if (lstm) c_n.copy_(cells.select(0, last));
  return {output, h_n, c_n, cells, ws, jac};
}

// An empty tensor stands for a zero gradient; otherwise it must have the given shape.
at::Tensor optional_grad(const char* op, const char* name, const at::Tensor& g, at::ScalarType dtype,
                         at::IntArrayRef sizes) {
  if (g.numel() == 0 && g.dim() == 1) return at::Tensor();
  check_tensor(op, name, g, dtype, sizes);
  return cached_contiguous(g);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rnn_layer_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                       const at::Tensor& x, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
                       const at::Tensor& output, const at::Tensor& cell_states, const at::Tensor& workspace,
                       const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& lengths,
                       c10::string_view mode, bool reverse, std::optional<double> grad_clip, bool track,
                       bool has_bias, bool grad_input) {
  constexpr const char* op = "vgk::rnn_layer_backward";
  const Mode m = parse_mode(mode);
  TORCH_CHECK(output.device().is_cpu(), op, ": output must be a CPU tensor, got one on ", output.device());
  const auto dtype = output.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op,
                   ": output must be float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(output.dim() == 3 && output.size(0) >= 1 && output.size(2) >= 1, op,
                    ": output must have shape [T, B, H] with T >= 1 and H >= 1, got ", output.sizes());
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(2) >= 1, op, ": x must have shape [T, B, I] with I >= 1, got ",
                    x.sizes());
  const int64_t T_ = output.size(0), B = output.size(1), H = output.size(2), I = x.size(2), GH = m.gates * H;
  const bool lstm = m.cell == Cell::kLstm, gru = m.cell == Cell::kGru;
  check_tensor(op, "x", x, dtype, {T_, B, I});
  check_tensor(op, "h0", h0, dtype, {B, H});
  check_tensor(op, "w_ih", w_ih, dtype, {GH, I});
  check_tensor(op, "w_hh", w_hh, dtype, {GH, H});
  const at::Tensor g_out = optional_grad(op, "grad_output", grad_output, dtype, {T_, B, H});
  const at::Tensor g_hn = optional_grad(op, "grad_h_n", grad_h_n, dtype, {B, H});
  at::Tensor g_cn;
  const bool has_c0 = c0.has_value() && c0->defined();
  if (lstm) {
    TORCH_CHECK_VALUE(has_c0, op, ": c0 [B, H] is required for mode 'lstm', got None");
    check_tensor(op, "c0", *c0, dtype, {B, H});
    check_tensor(op, "cell_states", cell_states, dtype, {T_, B, H});
    g_cn = optional_grad(op, "grad_c_n", grad_c_n, dtype, {B, H});
  }
  if (lstm || gru) check_tensor(op, "workspace", workspace, dtype, {T_, B, 4 * H});
  if (grad_clip.has_value()) {
    TORCH_CHECK_VALUE(*grad_clip > 0, op, ": grad_clip must be None or > 0, got ", *grad_clip);
  }
  const at::Tensor len = checked_lengths(op, lengths, B, T_);

  const auto opts = output.options();
  at::Tensor gx = grad_input ? cached_empty({T_, B, I}, opts) : at::empty({0}, opts);
  at::Tensor gw_ih = at::empty({GH, I}, opts);
  at::Tensor gw_hh = at::empty({GH, H}, opts);
  at::Tensor gb_ih = has_bias ? at::empty({GH}, opts) : at::empty({0}, opts);
  at::Tensor gb_hh = has_bias ? at::empty({GH}, opts) : at::empty({0}, opts);
  at::Tensor gsq = grad_sq_buffer(track, lstm, T_, B, opts);
  // Gradients reaching the last processed state; on exit those of h0 and c0.
  at::Tensor dh = g_hn.defined() ? g_hn.clone() : at::zeros({B, H}, opts);
  at::Tensor dc = !lstm ? at::empty({0}, opts) : g_cn.defined() ? g_cn.clone() : at::zeros({B, H}, opts);

  AT_DISPATCH_FLOATING_TYPES(dtype, "rnn_layer_backward", [&] {
    using T = scalar_t;
    const at::Tensor xc = cached_contiguous(x), out = cached_contiguous(output), h0c = h0.contiguous();
    const at::Tensor cs = lstm ? cached_contiguous(cell_states) : at::Tensor();
    const at::Tensor c0c = lstm ? c0->contiguous() : at::Tensor();
    const at::Tensor ws = lstm || gru ? cached_contiguous(workspace) : at::Tensor();
    const at::Tensor wih = w_ih.contiguous();
    // grad_x: dgates W_ih per step, or one GEMM after the loop for few rows (as in the forward).
    const bool per_step = B >= kStepProjectionRows;
    const RowsGemm<T> back_proj(wih, /*trans_w=*/false);
    // The pre-activation gradients; the GRU's recurrent ones differ in their n block (d hn = r * d n_pre).
    at::Tensor D = cached_empty({T_, B, GH}, opts);
    at::Tensor rec = gru ? cached_empty({T_, B, GH}, opts) : at::Tensor();
    const StateSeq<T> hs{const_cast<T*>(out.const_data_ptr<T>()), h0c.const_data_ptr<T>(), T_, B * H, reverse};
    const StateSeq<T> cseq = lstm ? StateSeq<T>{const_cast<T*>(cs.const_data_ptr<T>()), c0c.const_data_ptr<T>(),
                                                T_, B * H, reverse}
                                  : StateSeq<T>{};
    backward_loop<T>(m.cell, m.gates, T_, B, H, grad_seq<T>(g_out, 0, B, H, opts),
                     lstm ? grad_seq<T>(at::Tensor(), 0, B, H, opts) : GradSeq<T>{},
                     hs, cseq, ws.defined() ? ws.const_data_ptr<T>() : nullptr, w_hh.contiguous(), len, grad_clip,
                     track, dh, dc, D.data_ptr<T>(), gru ? rec.data_ptr<T>() : nullptr,
                     track ? gsq.data_ptr<double>() : nullptr, &back_proj,
                     grad_input && per_step ? gx.data_ptr<T>() : nullptr, I);
    const at::Tensor Dx = D.view({T_ * B, GH}), Dh = (gru ? rec : D).view({T_ * B, GH});
    if (grad_input && !per_step) {
      gemm<T>(false, false, T_ * B, I, GH, Dx.const_data_ptr<T>(), GH, wih.const_data_ptr<T>(), I, T(0),
              gx.data_ptr<T>(), I);
    }
    weight_grad<T>({xc.view({T_ * B, I})}, Dx, gw_ih);
    weight_grad<T>(states_before(out, h0c, reverse), Dh, gw_hh);
    if (has_bias) {
      at::sum_out(gb_ih, Dx, at::IntArrayRef{0});
      gru ? at::sum_out(gb_hh, Dh, at::IntArrayRef{0}) : gb_hh.copy_(gb_ih);
    }
  });
  return {gx, dh, dc, gw_ih, gw_hh, gb_ih, gb_hh, gsq};
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
  m.def(
      "rnn_layer_forward(Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? lengths, Tensor? probe, str mode, bool reverse, bool track, float? grad_clip) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "rnn_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor h0, "
      "Tensor? c0, Tensor output, Tensor cell_states, Tensor workspace, Tensor w_ih, Tensor w_hh, "
      "Tensor? lengths, str mode, bool reverse, float? grad_clip, bool track, bool has_bias, "
      "bool grad_input) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace vgk

TORCH_LIBRARY_IMPL(vgk, CPU, m) {
  m.impl("rnn_forward", &vgk::rnn::rnn_forward_cpu);
  m.impl("rnn_backward", &vgk::rnn::rnn_backward_cpu);
  m.impl("rnn_layer_forward", &vgk::rnn::rnn_layer_forward_cpu);
  m.impl("rnn_layer_backward", &vgk::rnn::rnn_layer_backward_cpu);
}
