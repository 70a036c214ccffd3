// Fused pointwise passes of the recurrent layers, one time step at a time, for a range of batch rows.
//
// No include guard on purpose: recurrent.cpp includes this file once per instruction set, inside a
// namespace of its own and with VGK_FN defined as the matching target attribute, and picks one at
// run time. The inner loops run over the hidden units j and are written to vectorise: branch-free
// math (the float exp below), structure-of-arrays Gram entries, `omp simd` reductions.
//
// Jacobian norms: the formulas of "Exact per-step Jacobian Frobenius norms in O(H) per sample"
// (REFERENCES.md). Row j of the step Jacobian is a per-sample combination of row j of each gate
// block of W_hh plus a diagonal term, so its squared norm is a quadratic form in the per-unit Gram
// matrix G_j[a, b] = <W_a[j, :], W_b[j, :]>.

// exp(x) = 2^k (1 + q), x = k ln2 + r with |r| <= ln2 / 2 and q = expm1(r) by its Taylor series to
// r^7 (truncation error below 1e-8 relative). Rounding k uses the 1.5 * 2^23 trick, which vectorises
// without SSE4.1. The callers clamp x first; the comparisons there keep NaN.
VGK_FN inline void exp_reduce(float x, float& k, float& q) {
  k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - k * 0.693145751953125f) - k * 1.42860682030941723e-6f;
  q = r * (1.0f + r * (0.5f + r * (1.66666667e-1f + r * (4.16666667e-2f + r * (8.33333333e-3f +
      r * (1.38888889e-3f + r * 1.98412698e-4f))))));
}

// 2^k for an integral k in [-126, 127].
VGK_FN inline float pow2_f(int32_t k) {
  const int32_t bits = (k + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return scale;
}

// exp(x) = scale * (1 + q) for x >= 0 (or NaN), clamped to 88 so that 2^k stays a normal float: for
// tanh, which saturates long before.
VGK_FN inline void exp_parts(float x, float& scale, float& q) {
  x = x > 88.0f ? 88.0f : x;
  float k;
  exp_reduce(x, k, q);
  scale = pow2_f(static_cast<int32_t>(k));
}

// exp over float's whole range, as torch's float exp: +inf above ~88.72, subnormal below ~-87.3 and
// 0 below ~-103.9. 2^k is applied as two normal factors 2^(k>>1) * 2^(k - (k>>1)), so only the last
// product overflows or rounds to a subnormal. The sigmoid needs this to reach exactly 0 (a clamped
// exp left it at 6e-39, and its derivative never 0).
VGK_FN inline float exp_full(float x) {
  x = x < -104.0f ? -104.0f : x;
  x = x > 89.0f ? 89.0f : x;
  float k, q;
  exp_reduce(x, k, q);
  const int32_t ki = static_cast<int32_t>(k);
  const int32_t half = ki >> 1;
  return ((1.0f + q) * pow2_f(half)) * pow2_f(ki - half);
}

VGK_FN inline float sigmoid_f(float x) { return 1.0f / (1.0f + exp_full(-x)); }

// tanh(|x|) = e / (e + 2) with e = expm1(2|x|) below |x| = 1 (accurate near 0, where
// 1 - 2 / (exp(2x) + 1) cancels), and 1 - 2 / (e + 2) from there (e / (e + 2) rounds to 1 already
// where torch's correctly rounded tanh is 0.99999994, |x| near 9); the sign is put back after, so
// that both ends saturate alike. One division either way.
VGK_FN inline float tanh_f(float x) {
  const float a = __builtin_fabsf(x);  // builtins: std:: versions do not inline into target clones
  float s, q;
  exp_parts(2.0f * a, s, q);
  const float e = s * q + (s - 1.0f);
  const bool small = a < 1.0f;
  const float ratio = (small ? e : 2.0f) / (e + 2.0f);
  return __builtin_copysignf(small ? ratio : 1.0f - ratio, x);
}

VGK_FN inline double sigmoid_f(double x) { return 1.0 / (1.0 + std::exp(-x)); }
VGK_FN inline double tanh_f(double x) { return std::tanh(x); }

// Clamp that keeps NaN; clip = +inf turns it off.
template <typename T>
VGK_FN inline T clamp_f(T v, T c) {
  v = v < -c ? -c : v;
  return v > c ? c : v;
}

VGK_FN inline bool row_valid(const int64_t* len, int64_t t, int64_t b) {
  return len == nullptr || t < len[b];
}

// A row past its length carries the state over and writes zeros elsewhere.
template <typename T>
VGK_FN inline void carry_row(const T* src, T* dst, int64_t n) {
  std::memcpy(dst, src, sizeof(T) * n);
}

template <typename T>
VGK_FN inline void zero_row(T* dst, int64_t n) {
  std::memset(dst, 0, sizeof(T) * n);
}

// A gradient's square for the grad_sq sums, in double: in float32 the squared norm of a gradient
// below ~1e-19 underflows to 0, though the gradient itself is representable down to ~1e-38.
template <typename T>
VGK_FN inline double square_d(T v) {
  const double d = static_cast<double>(v);
  return d * d;
}

// Each row's loop over the hidden units is a function of its own (noinline, pointers as restrict
// parameters): inlined into the loop over rows, GCC duplicates it (unswitching on the lengths test)
// and leaves the copy with the `omp simd` reduction scalar.
// The Jacobian terms are a second loop over the row's values, still in L1, rather than part of the
// state update: shared products would change which multiply-adds GCC fuses, and tracking must not
// change the rounding of the states.
#define VGK_ROW VGK_FN __attribute__((noinline))

// ---------------------------------------------------------------- LSTM (gates i, f, g, o)
// Gram entries, in order: ii, if, ig, io, ff, fg, fo, gg, go, oo.
// KEEP_TC: also store tanh(c_t) into tc for the Jacobian pass.
template <typename T, bool KEEP_TC>
VGK_ROW void lstm_forward_row(int64_t H, const T* __restrict x, const T* __restrict hh, const T* __restrict cp,
                              T* __restrict c, T* __restrict h, T* __restrict w, T* __restrict tc_out) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T si = sigmoid_f(x[j] + hh[j]);
    const T sf = sigmoid_f(x[H + j] + hh[H + j]);
    const T tg = tanh_f(x[2 * H + j] + hh[2 * H + j]);
    const T so = sigmoid_f(x[3 * H + j] + hh[3 * H + j]);
    const T cj = sf * cp[j] + si * tg;
    const T tc = tanh_f(cj);
    w[j] = si;
    w[H + j] = sf;
    w[2 * H + j] = tg;
    w[3 * H + j] = so;
    c[j] = cj;
    h[j] = so * tc;
    if constexpr (KEEP_TC) tc_out[j] = tc;
  }
}

template <typename T>
VGK_ROW T lstm_jacobian_row(int64_t H, const T* __restrict w, const T* __restrict cp, const T* __restrict tc,
                            const T* __restrict gm) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < H; ++j) {
    const T si = w[j], sf = w[H + j], tg = w[2 * H + j], so = w[3 * H + j], t = tc[j];
    // alpha: coefficients of (W_i, W_f, W_g) in dc/dh_prev; kappa = dh/dc; b3 = dh/do_pre.
    const T a0 = tg * si * (1 - si), a1 = cp[j] * sf * (1 - sf), a2 = si * (1 - tg * tg);
    const T kappa = so * (1 - t * t), b3 = t * so * (1 - so);
    const T quad = a0 * a0 * gm[j] + a1 * a1 * gm[4 * H + j] + a2 * a2 * gm[7 * H + j] +
                   2 * (a0 * a1 * gm[H + j] + a0 * a2 * gm[2 * H + j] + a1 * a2 * gm[5 * H + j]);
    const T cross = a0 * gm[3 * H + j] + a1 * gm[6 * H + j] + a2 * gm[8 * H + j];
    acc += (quad + sf * sf) * (1 + kappa * kappa) + b3 * b3 * gm[9 * H + j] + 2 * b3 * kappa * cross;
  }
  return acc;
}

template <typename T, bool TRACK>
VGK_FN void lstm_forward_rows(const FwdStep<T>& a, int64_t b0, int64_t b1) {
  const int64_t H = a.H;
  for (int64_t b = b0; b < b1; ++b) {
    if (!row_valid(a.len, a.t, b)) {
      carry_row(a.hp + b * H, a.h + b * H, H);
      carry_row(a.cp + b * H, a.c + b * H, H);
      zero_row(a.ws + b * 4 * H, 4 * H);
      if (TRACK) a.jac[b] = 0.0f;
      continue;
    }
    lstm_forward_row<T, TRACK>(H, a.x + b * a.xs, a.hh + b * 4 * H, a.cp + b * H, a.c + b * H, a.h + b * H,
                               a.ws + b * 4 * H, a.scratch);
    if (TRACK) {
      a.jac[b] = static_cast<float>(lstm_jacobian_row<T>(H, a.ws + b * 4 * H, a.cp + b * H, a.scratch, a.gram));
    }
  }
}

// Writes the squared norms of the total gradients reaching h_t and c_t into out[0] and out[1].
template <typename T, bool TRACK>
VGK_ROW void lstm_backward_row(int64_t H, T clip, const T* __restrict gs, const T* __restrict gcs,
                               T* __restrict dh, T* __restrict dc, const T* __restrict w, const T* __restrict c,
                               const T* __restrict cp, T* __restrict gx, double* __restrict out) {
  double acc_h = 0, acc_c = 0;
#pragma omp simd reduction(+ : acc_h, acc_c)
  for (int64_t j = 0; j < H; ++j) {
    const T si = w[j], sf = w[H + j], tg = w[2 * H + j], so = w[3 * H + j];
    const T tc = tanh_f(c[j]);
    const T dhj = gs[j] + dh[j];
    const T dcj = gcs[j] + dc[j] + dhj * so * (1 - tc * tc);
    gx[j] = clamp_f(dcj * tg * si * (1 - si), clip);
    gx[H + j] = clamp_f(dcj * cp[j] * sf * (1 - sf), clip);
    gx[2 * H + j] = clamp_f(dcj * si * (1 - tg * tg), clip);
    gx[3 * H + j] = clamp_f(dhj * tc * so * (1 - so), clip);
    dc[j] = dcj * sf;
    dh[j] = 0;
    if constexpr (TRACK) {
      acc_h += square_d(dhj);
      acc_c += square_d(dcj);
    }
  }
  out[0] = acc_h;
  out[1] = acc_c;
}

template <typename T, bool TRACK>
VGK_FN void lstm_backward_rows(const BwdStep<T>& a, int64_t b0, int64_t b1) {
  const int64_t H = a.H;
  for (int64_t b = b0; b < b1; ++b) {
    if (!row_valid(a.len, a.t, b)) {
      for (int64_t j = 0; j < H; ++j) {
        a.dh[b * H + j] += a.gs[b * H + j];
        a.dc[b * H + j] += a.gcs[b * H + j];
      }
      zero_row(a.gx + b * 4 * H, 4 * H);
      if (TRACK) a.gsq_h[b] = a.gsq_c[b] = 0.0;
      continue;
    }
    double sq[2];
    lstm_backward_row<T, TRACK>(H, a.clip, a.gs + b * H, a.gcs + b * H, a.dh + b * H, a.dc + b * H,
                                a.ws + b * 4 * H, a.c + b * H, a.cp + b * H, a.gx + b * 4 * H, sq);
    if (TRACK) {
      a.gsq_h[b] = sq[0];
      a.gsq_c[b] = sq[1];
    }
  }
}

// ---------------------------------------------------------------- GRU (gates r, z, n)
// Gram entries, in order: rr, rz, rn, zz, zn, nn, then the diagonals W_r[j,j], W_z[j,j], W_n[j,j].
template <typename T>
VGK_ROW void gru_forward_row(int64_t H, const T* __restrict x, const T* __restrict bx, const T* __restrict hh,
                             const T* __restrict bias, const T* __restrict hp, T* __restrict h, T* __restrict w) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T r = sigmoid_f(x[j] + bx[j] + hh[j] + bias[j]);
    const T z = sigmoid_f(x[H + j] + bx[H + j] + hh[H + j] + bias[H + j]);
    const T hn = hh[2 * H + j] + bias[2 * H + j];
    const T n = tanh_f(x[2 * H + j] + bx[2 * H + j] + r * hn);
    w[j] = r;
    w[H + j] = z;
    w[2 * H + j] = n;
    w[3 * H + j] = hn;
    h[j] = (1 - z) * n + z * hp[j];
  }
}

template <typename T>
VGK_ROW T gru_jacobian_row(int64_t H, const T* __restrict w, const T* __restrict hp, const T* __restrict gm) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < H; ++j) {
    const T r = w[j], z = w[H + j], n = w[2 * H + j], hn = w[3 * H + j];
    const T dn = (1 - z) * (1 - n * n);
    const T gr = dn * hn * r * (1 - r), gz = (hp[j] - n) * z * (1 - z), gn = dn * r;
    const T quad = gr * gr * gm[j] + gz * gz * gm[3 * H + j] + gn * gn * gm[5 * H + j] +
                   2 * (gr * gz * gm[H + j] + gr * gn * gm[2 * H + j] + gz * gn * gm[4 * H + j]);
    const T diag = gr * gm[6 * H + j] + gz * gm[7 * H + j] + gn * gm[8 * H + j];
    acc += z * z + 2 * z * diag + quad;
  }
  return acc;
}

template <typename T, bool TRACK>
VGK_FN void gru_forward_rows(const FwdStep<T>& a, int64_t b0, int64_t b1) {
  const int64_t H = a.H;
  for (int64_t b = b0; b < b1; ++b) {
    if (!row_valid(a.len, a.t, b)) {
      carry_row(a.hp + b * H, a.h + b * H, H);
      zero_row(a.ws + b * 4 * H, 4 * H);
      if (TRACK) a.jac[b] = 0.0f;
      continue;
    }
    gru_forward_row<T>(H, a.x + b * a.xs, a.bx, a.hh + b * 3 * H, a.bhh, a.hp + b * H, a.h + b * H,
                       a.ws + b * 4 * H);
    if (TRACK) a.jac[b] = static_cast<float>(gru_jacobian_row<T>(H, a.ws + b * 4 * H, a.hp + b * H, a.gram));
  }
}

template <typename T, bool TRACK>
VGK_ROW double gru_backward_row(int64_t H, T clip, const T* __restrict gs, T* __restrict dh, const T* __restrict w,
                                const T* __restrict hp, T* __restrict gx, T* __restrict rec) {
  double acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < H; ++j) {
    const T r = w[j], z = w[H + j], n = w[2 * H + j], hn = w[3 * H + j];
    const T dhj = gs[j] + dh[j];
    // The clamped d n_pre is the one that flows on, into d r_pre and into d hn.
    const T dn = clamp_f(dhj * (1 - z) * (1 - n * n), clip);
    const T dz = clamp_f(dhj * (hp[j] - n) * z * (1 - z), clip);
    const T dr = clamp_f(dn * hn * r * (1 - r), clip);
    const T dn_h = dn * r;
    gx[j] = dr;
    gx[H + j] = dz;
    gx[2 * H + j] = dn;
    rec[j] = dr;
    rec[H + j] = dz;
    rec[2 * H + j] = dn_h;
    dh[j] = dhj * z;
    if constexpr (TRACK) acc += square_d(dhj);
  }
  return acc;
}

template <typename T, bool TRACK>
VGK_FN void gru_backward_rows(const BwdStep<T>& a, int64_t b0, int64_t b1) {
  const int64_t H = a.H;
  for (int64_t b = b0; b < b1; ++b) {
    if (!row_valid(a.len, a.t, b)) {
      for (int64_t j = 0; j < H; ++j) a.dh[b * H + j] += a.gs[b * H + j];
      zero_row(a.gx + b * 3 * H, 3 * H);
      zero_row(a.rec + b * 3 * H, 3 * H);
      if (TRACK) a.gsq_h[b] = 0.0;
      continue;
    }
    const double acc = gru_backward_row<T, TRACK>(H, a.clip, a.gs + b * H, a.dh + b * H, a.ws + b * 4 * H,
                                                  a.hp + b * H, a.gx + b * 3 * H, a.rec + b * 3 * H);
    if (TRACK) a.gsq_h[b] = acc;
  }
}

// ---------------------------------------------------------------- Elman RNN
// One Gram entry: the squared norm of row j of W_hh.
template <Cell ACT, typename T>
VGK_FN inline T act_f(T z) {
  if constexpr (ACT == Cell::kTanh) return tanh_f(z);
  if constexpr (ACT == Cell::kSigmoid) return sigmoid_f(z);
  return z < 0 ? T(0) : z;  // relu, keeping NaN as torch does
}

// The activation's derivative from its output.
template <Cell ACT, typename T>
VGK_FN inline T act_grad_f(T h) {
  if constexpr (ACT == Cell::kTanh) return 1 - h * h;
  if constexpr (ACT == Cell::kSigmoid) return h * (1 - h);
  return h > 0 ? T(1) : T(0);
}

template <Cell ACT, typename T>
VGK_ROW void elman_forward_row(int64_t H, const T* __restrict x, const T* __restrict hh, T* __restrict h) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) h[j] = act_f<ACT>(x[j] + hh[j]);
}

template <Cell ACT, typename T>
VGK_ROW T elman_jacobian_row(int64_t H, const T* __restrict h, const T* __restrict gm) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < H; ++j) {
    const T d = act_grad_f<ACT>(h[j]);
    acc += d * d * gm[j];
  }
  return acc;
}

template <Cell ACT, typename T, bool TRACK>
VGK_FN void elman_forward_rows(const FwdStep<T>& a, int64_t b0, int64_t b1) {
  const int64_t H = a.H;
  for (int64_t b = b0; b < b1; ++b) {
    if (!row_valid(a.len, a.t, b)) {
      carry_row(a.hp + b * H, a.h + b * H, H);
      if (TRACK) a.jac[b] = 0.0f;
      continue;
    }
    elman_forward_row<ACT, T>(H, a.x + b * a.xs, a.hh + b * H, a.h + b * H);
    if (TRACK) a.jac[b] = static_cast<float>(elman_jacobian_row<ACT, T>(H, a.h + b * H, a.gram));
  }
}

template <Cell ACT, typename T, bool TRACK>
VGK_ROW double elman_backward_row(int64_t H, T clip, const T* __restrict gs, T* __restrict dh,
                                  const T* __restrict h, T* __restrict gx) {
  double acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < H; ++j) {
    const T dhj = gs[j] + dh[j];
    // relu selects, as torch's threshold_backward: 0 where h <= 0 even for an inf or NaN gradient.
    const T d = ACT == Cell::kRelu ? (h[j] <= 0 ? T(0) : dhj) : dhj * act_grad_f<ACT>(h[j]);
    gx[j] = clamp_f(d, clip);
    dh[j] = 0;
    if constexpr (TRACK) acc += square_d(dhj);
  }
  return acc;
}

template <Cell ACT, typename T, bool TRACK>
VGK_FN void elman_backward_rows(const BwdStep<T>& a, int64_t b0, int64_t b1) {
  const int64_t H = a.H;
  for (int64_t b = b0; b < b1; ++b) {
    if (!row_valid(a.len, a.t, b)) {
      for (int64_t j = 0; j < H; ++j) a.dh[b * H + j] += a.gs[b * H + j];
      zero_row(a.gx + b * H, H);
      if (TRACK) a.gsq_h[b] = 0.0;
      continue;
    }
    const double acc = elman_backward_row<ACT, T, TRACK>(H, a.clip, a.gs + b * H, a.dh + b * H, a.h + b * H,
                                                         a.gx + b * H);
    if (TRACK) a.gsq_h[b] = acc;
  }
}

#undef VGK_ROW

// ---------------------------------------------------------------- selection
template <typename T, bool TRACK>
ForwardRows<T> forward_rows(Cell cell) {
  switch (cell) {
    case Cell::kLstm: return lstm_forward_rows<T, TRACK>;
    case Cell::kGru: return gru_forward_rows<T, TRACK>;
    case Cell::kTanh: return elman_forward_rows<Cell::kTanh, T, TRACK>;
    case Cell::kRelu: return elman_forward_rows<Cell::kRelu, T, TRACK>;
    case Cell::kSigmoid: return elman_forward_rows<Cell::kSigmoid, T, TRACK>;
  }
  return nullptr;
}

template <typename T, bool TRACK>
BackwardRows<T> backward_rows(Cell cell) {
  switch (cell) {
    case Cell::kLstm: return lstm_backward_rows<T, TRACK>;
    case Cell::kGru: return gru_backward_rows<T, TRACK>;
    case Cell::kTanh: return elman_backward_rows<Cell::kTanh, T, TRACK>;
    case Cell::kRelu: return elman_backward_rows<Cell::kRelu, T, TRACK>;
    case Cell::kSigmoid: return elman_backward_rows<Cell::kSigmoid, T, TRACK>;
  }
  return nullptr;
}
