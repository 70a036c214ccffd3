// Fused pointwise passes of the layer-normalized LSTM and GRU (Ba et al. 2016), one time step at a
// time, for a range of batch rows.
//
// No include guard on purpose: recurrent_ln.cpp includes this file once per instruction set, inside a
// namespace of its own, after recurrent_kernels.h (whose sigmoid_f, tanh_f, clamp_f, row_valid,
// carry_row and zero_row it uses), with VGK_FN defined as the matching target attribute. The step
// arguments are in recurrent_ln_args.h.
//
// Notation, per sample and step: y = W h_prev (N = G*H values), LN statistics mu, rstd over y,
// yh = (y - mu) * rstd; the cell's gate pre-activations are x + gamma * yh + shift, where shift is
// the LN shift (plus b_hh for the GRU). LSTM: c = sf * c_prev + si * tg; LN over the H values of c
// gives ch, rstd_c and tl = tanh(gamma_c * ch + beta_c); h = so * tl.
//
// Workspace rows (input dtype):
//   LSTM [si, sf, tg, so (4H) | yh (4H) | ch (H) | tl (H) | rstd | rstd_c]  = 10H + 2
//   GRU  [r, z, n, hn (4H) | yh (3H) | rstd]                                   = 7H + 1
//
// The LN backward for a gradient dl w.r.t. the LN output: g = dl * gamma, and
// dy = rstd * (g - mean(g) - yh * mean(g * yh)), i.e. dy = rstd * P g with the symmetric projector
// P = I - 11^T/N - yh yh^T/N. All statistics and reductions accumulate in double.

// Mean and 1/sqrt(var + eps) of n values, two passes in double.
template <typename T>
VGK_FN inline void ln_moments(const T* __restrict v, int64_t n, double eps, double& mean, double& rstd) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += static_cast<double>(v[k]);
  mean = s / static_cast<double>(n);
  double ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t k = 0; k < n; ++k) {
    const double d = static_cast<double>(v[k]) - mean;
    ss += d * d;
  }
  rstd = 1.0 / std::sqrt(ss / static_cast<double>(n) + eps);
}

// out = rstd * P (gamma * g): the LN backward of g (also the LN-projected rows of the Jacobian).
// out may be g itself.
template <typename G, typename T, typename O>
VGK_FN inline void ln_project(const G* g, const T* __restrict gamma, const T* __restrict yh, int64_t n, double rstd,
                              O* out) {
  double s = 0, sy = 0;
#pragma omp simd reduction(+ : s, sy)
  for (int64_t k = 0; k < n; ++k) {
    const double gk = static_cast<double>(g[k]) * static_cast<double>(gamma[k]);
    s += gk;
    sy += gk * static_cast<double>(yh[k]);
  }
  const double m = s / static_cast<double>(n), my = sy / static_cast<double>(n);
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const double gk = static_cast<double>(g[k]) * static_cast<double>(gamma[k]);
    out[k] = static_cast<O>(rstd * (gk - m - static_cast<double>(yh[k]) * my));
  }
}

// Normalizes y into yh; returns rstd.
template <typename T>
VGK_FN inline T ln_normalize(const T* __restrict y, int64_t n, double eps, T* __restrict yh) {
  double mean, rstd;
  ln_moments(y, n, eps, mean, rstd);
  const T mu = static_cast<T>(mean), r = static_cast<T>(rstd);
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) yh[k] = (y[k] - mu) * r;
  return r;
}

// ---------------------------------------------------------------- LSTM
template <typename T, bool TRACK>
VGK_FN void ln_lstm_forward_rows(const LnFwdStep<T>& a, int64_t b0, int64_t b1) {
  const int64_t H = a.H, N = 4 * H, WS = 10 * H + 2;
  const T* __restrict gm = a.gamma;
  const T* __restrict sh = a.shift;
  const T* __restrict gc = a.gamma_c;
  const T* __restrict bc = a.beta_c;
  for (int64_t b = b0; b < b1; ++b) {
    const T* __restrict hp = a.hp + b * H;
    const T* __restrict cp = a.cp + b * H;
    T* __restrict h = a.h + b * H;
    T* __restrict c = a.c + b * H;
    T* __restrict w = a.ws + b * WS;
    if (!row_valid(a.len, a.t, b)) {
      carry_row(hp, h, H);
      carry_row(cp, c, H);
      zero_row(w, WS);
      if (TRACK) {
        for (int64_t d = 0; d < 3; ++d) std::memset(a.z + (d * a.B + b) * N, 0, sizeof(double) * N);
      }
      continue;
    }
    const T* __restrict x = a.x + b * N;
    T* __restrict yh = w + 4 * H;
    T* __restrict ch = w + 8 * H;
    T* __restrict tl = w + 9 * H;
    const T rstd = ln_normalize(a.y + b * N, N, a.eps, yh);
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const T si = sigmoid_f(x[j] + gm[j] * yh[j] + sh[j]);
      const T sf = sigmoid_f(x[H + j] + gm[H + j] * yh[H + j] + sh[H + j]);
      const T tg = tanh_f(x[2 * H + j] + gm[2 * H + j] * yh[2 * H + j] + sh[2 * H + j]);
      const T so = sigmoid_f(x[3 * H + j] + gm[3 * H + j] * yh[3 * H + j] + sh[3 * H + j]);
      w[j] = si;
      w[H + j] = sf;
      w[2 * H + j] = tg;
      w[3 * H + j] = so;
      c[j] = sf * cp[j] + si * tg;
    }
    const T rstd_c = ln_normalize(c, H, a.eps, ch);
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const T t = tanh_f(gc[j] * ch[j] + bc[j]);
      tl[j] = t;
      h[j] = w[3 * H + j] * t;
    }
    w[10 * H] = rstd;
    w[10 * H + 1] = rstd_c;
    if constexpr (TRACK) {
      // Z rows: yh / N; z1 = rstd P (gamma * alpha) and z2 = rstd P (gamma * ch * alpha), alpha the
      // coefficients of the gate rows in dc/dh_prev (0 for o). z1 and z2 first hold alpha, ch * alpha.
      double* __restrict z0 = a.z + b * N;
      double* __restrict z1 = a.z + (a.B + b) * N;
      double* __restrict z2 = a.z + (2 * a.B + b) * N;
      const double inv_n = 1.0 / static_cast<double>(N);
      for (int64_t k = 0; k < N; ++k) z0[k] = static_cast<double>(yh[k]) * inv_n;
      for (int64_t j = 0; j < H; ++j) {
        const double si = w[j], sf = w[H + j], tg = w[2 * H + j];
        const double al[3] = {tg * si * (1 - si), static_cast<double>(cp[j]) * sf * (1 - sf), si * (1 - tg * tg)};
        for (int64_t g = 0; g < 3; ++g) {
          z1[g * H + j] = al[g];
          z2[g * H + j] = al[g] * static_cast<double>(ch[j]);
        }
        z1[3 * H + j] = 0;
        z2[3 * H + j] = 0;
      }
      ln_project(z1, gm, yh, N, static_cast<double>(rstd), z1);
      ln_project(z2, gm, yh, N, static_cast<double>(rstd), z2);
    }
  }
}

// Row j of each part of the step Jacobian is a combination sum_a wt_a D_(aH+j) of the rows
// D_k = gamma_k rstd (W_k - u - yh_k v) of d(LN(W h))/dh, plus dense vectors x_d of R^H; here
// wt_a already include gamma_k rstd. For rows R = sum_a wt_a W_(aH+j) - s u - p v + sum_d lam_d x_d,
// |row|^2 = wt^T G_j wt + 2 sum_d lam'_d <R_W, x_d> + lam'^T X lam', with lam' = (-s, -p, lam...) over
// x = (u, v, m1, m2), <W_k, x_d> = (W x_d)_k from Q and X the Gram matrix of the x_d.
VGK_FN inline double ln_quad4(const double* wt, const double* __restrict gm, int64_t H, int64_t j) {
  // Entry order: ii, if, ig, io, ff, fg, fo, gg, go, oo.
  return wt[0] * wt[0] * gm[j] + wt[1] * wt[1] * gm[4 * H + j] + wt[2] * wt[2] * gm[7 * H + j] +
         wt[3] * wt[3] * gm[9 * H + j] +
         2 * (wt[0] * wt[1] * gm[H + j] + wt[0] * wt[2] * gm[2 * H + j] + wt[0] * wt[3] * gm[3 * H + j] +
              wt[1] * wt[2] * gm[5 * H + j] + wt[1] * wt[3] * gm[6 * H + j] + wt[2] * wt[3] * gm[8 * H + j]);
}

template <typename T>
VGK_FN void ln_lstm_jacobian_rows(const LnJacStep<T>& a, int64_t b0, int64_t b1) {
  const int64_t H = a.H, N = 4 * H, WS = 10 * H + 2, B = a.B;
  const double inv_h = 1.0 / static_cast<double>(H);
  for (int64_t b = b0; b < b1; ++b) {
    if (!row_valid(a.len, a.t, b)) {
      a.jac[b] = 0.0f;
      continue;
    }
    const T* __restrict w = a.ws + b * WS;
    const T* __restrict yh = w + 4 * H;
    const T* __restrict ch = w + 8 * H;
    const T* __restrict tl = w + 9 * H;
    const double rstd = w[10 * H], rstd_c = w[10 * H + 1];
    const T* __restrict cp = a.cp + b * H;
    // Dense vectors x = (u, v, m1, m2) and their products with W.
    const double* xs[4] = {a.u, a.v + b * H, a.v + (B + b) * H, a.v + (2 * B + b) * H};
    const double* wx[4] = {a.wu, a.q + b * N, a.q + (B + b) * N, a.q + (2 * B + b) * N};
    double X[4][4];
    for (int64_t d = 0; d < 4; ++d) {
      for (int64_t e = d; e < 4; ++e) {
        double s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t k = 0; k < H; ++k) s += xs[d][k] * xs[e][k];
        X[d][e] = X[e][d] = s;
      }
    }
    // Sums over units for the c_prev columns of dh/ds_prev.
    double s1 = 0, s2 = 0, s12 = 0;
    for (int64_t j = 0; j < H; ++j) {
      const double sf = w[H + j], cj = ch[j];
      s1 += sf * sf;
      s2 += cj * cj * sf * sf;
      s12 += cj * sf * sf;
    }
    double acc = 0;
    for (int64_t j = 0; j < H; ++j) {
      const double si = w[j], sf = w[H + j], tg = w[2 * H + j], so = w[3 * H + j];
      const double cj = ch[j], t = tl[j];
      const double scale[4] = {a.gamma[j] * rstd, a.gamma[H + j] * rstd, a.gamma[2 * H + j] * rstd,
                               a.gamma[3 * H + j] * rstd};
      const double y4[4] = {static_cast<double>(yh[j]), static_cast<double>(yh[H + j]),
                            static_cast<double>(yh[2 * H + j]), static_cast<double>(yh[3 * H + j])};
      // dc_j/dh_prev: alpha on the rows i, f, g.
      const double wa[4] = {tg * si * (1 - si) * scale[0], cp[j] * sf * (1 - sf) * scale[1],
                            si * (1 - tg * tg) * scale[2], 0.0};
      // dh_j/dh_prev: kappa * (the same, projected by the cell LN) + beta_o on the row o.
      const double kappa = so * (1 - t * t) * static_cast<double>(a.gamma_c[j]) * rstd_c;
      const double wb[4] = {kappa * wa[0], kappa * wa[1], kappa * wa[2], t * so * (1 - so) * scale[3]};
      const double* wts[2] = {wa, wb};
      for (int r = 0; r < 2; ++r) {
        const double* wt = wts[r];
        double s = 0, p = 0, cross[4] = {0, 0, 0, 0};
        for (int64_t g = 0; g < 4; ++g) {
          s += wt[g];
          p += wt[g] * y4[g];
          for (int64_t d = 0; d < 4; ++d) cross[d] += wt[g] * wx[d][g * H + j];
        }
        const double lam[4] = {-s, -p, r ? -kappa * inv_h : 0.0, r ? -kappa * cj * inv_h : 0.0};
        double lin = 0, dd = 0;
        for (int64_t d = 0; d < 4; ++d) {
          lin += lam[d] * cross[d];
          for (int64_t e = 0; e < 4; ++e) dd += lam[d] * X[d][e] * lam[e];
        }
        acc += ln_quad4(wt, a.gram, H, j) + 2 * lin + dd;
      }
      // c_prev columns: dc/dc_prev = diag(sf); dh/dc_prev = diag(kappa) (I - 11^T/H - ch ch^T/H) diag(sf).
      acc += sf * sf + kappa * kappa * (sf * sf + (s1 + cj * cj * s2 + 2 * cj * s12) * inv_h * inv_h -
                                        2 * sf * sf * (1 + cj * cj) * inv_h);
    }
    a.jac[b] = static_cast<float>(acc);
  }
}

template <typename T, bool TRACK>
VGK_FN void ln_lstm_backward_rows(const LnBwdStep<T>& a, int64_t b0, int64_t b1) {
  const int64_t H = a.H, N = 4 * H, WS = 10 * H + 2;
  const T clip = a.clip;
  const T* __restrict gc = a.gamma_c;
  for (int64_t b = b0; b < b1; ++b) {
    const T* __restrict gs = a.gs + b * H;
    const T* __restrict gcs = a.gcs + b * H;
    T* __restrict dh = a.dh + b * H;
    T* __restrict dc = a.dc + b * H;
    T* __restrict gx = a.gx + b * N;
    T* __restrict dl = a.dl + b * H;
    T* __restrict dy = a.dy + b * N;
    if (!row_valid(a.len, a.t, b)) {
      for (int64_t j = 0; j < H; ++j) {
        dh[j] += gs[j];
        dc[j] += gcs[j];
      }
      zero_row(gx, N);
      zero_row(dl, H);
      zero_row(dy, N);
      if (TRACK) a.gsq_h[b] = a.gsq_c[b] = 0.0;
      continue;
    }
    const T* __restrict w = a.ws + b * WS;
    const T* __restrict yh = w + 4 * H;
    const T* __restrict ch = w + 8 * H;
    const T* __restrict tl = w + 9 * H;
    const T* __restrict cp = a.cp + b * H;
    const double rstd_c = w[10 * H + 1];
    // Through h = so * tanh(LN(c)): the gradient of the cell LN's output, then its backward.
    double sg = 0, sgc = 0;
#pragma omp simd reduction(+ : sg, sgc)
    for (int64_t j = 0; j < H; ++j) {
      const T d = (gs[j] + dh[j]) * w[3 * H + j] * (1 - tl[j] * tl[j]);
      dl[j] = d;
      const double g = static_cast<double>(d) * static_cast<double>(gc[j]);
      sg += g;
      sgc += g * static_cast<double>(ch[j]);
    }
    const T mg = static_cast<T>(sg / static_cast<double>(H)), mgc = static_cast<T>(sgc / static_cast<double>(H));
    const T rc = static_cast<T>(rstd_c);
    double acc_h = 0, acc_c = 0;
#pragma omp simd reduction(+ : acc_h, acc_c)
    for (int64_t j = 0; j < H; ++j) {
      const T si = w[j], sf = w[H + j], tg = w[2 * H + j], so = w[3 * H + j];
      const T dhj = gs[j] + dh[j];
      const T dcj = gcs[j] + dc[j] + rc * (dl[j] * gc[j] - mg - ch[j] * mgc);
      gx[j] = clamp_f(dcj * tg * si * (1 - si), clip);
      gx[H + j] = clamp_f(dcj * cp[j] * sf * (1 - sf), clip);
      gx[2 * H + j] = clamp_f(dcj * si * (1 - tg * tg), clip);
      gx[3 * H + j] = clamp_f(dhj * tl[j] * so * (1 - so), clip);
      dc[j] = dcj * sf;
      dh[j] = 0;
      if constexpr (TRACK) {
        acc_h += square_d(dhj);
        acc_c += square_d(dcj);
      }
    }
    // The gates are x + LN(y): their gradient flows into y through the LN backward.
    ln_project(gx, a.gamma, yh, N, static_cast<double>(w[10 * H]), dy);
    if (TRACK) {
      a.gsq_h[b] = acc_h;
      a.gsq_c[b] = acc_c;
    }
  }
}

// ---------------------------------------------------------------- GRU
template <typename T, bool TRACK>
VGK_FN void ln_gru_forward_rows(const LnFwdStep<T>& a, int64_t b0, int64_t b1) {
  const int64_t H = a.H, N = 3 * H, WS = 7 * H + 1;
  const T* __restrict gm = a.gamma;
  const T* __restrict sh = a.shift;
  for (int64_t b = b0; b < b1; ++b) {
    const T* __restrict hp = a.hp + b * H;
    T* __restrict h = a.h + b * H;
    T* __restrict w = a.ws + b * WS;
    if (!row_valid(a.len, a.t, b)) {
      carry_row(hp, h, H);
      zero_row(w, WS);
      if (TRACK) std::memset(a.z + b * N, 0, sizeof(double) * N);
      continue;
    }
    const T* __restrict x = a.x + b * N;
    T* __restrict yh = w + 4 * H;
    const T rstd = ln_normalize(a.y + b * N, N, a.eps, yh);
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const T r = sigmoid_f(x[j] + gm[j] * yh[j] + sh[j]);
      const T z = sigmoid_f(x[H + j] + gm[H + j] * yh[H + j] + sh[H + j]);
      const T hn = gm[2 * H + j] * yh[2 * H + j] + sh[2 * H + j];
      const T n = tanh_f(x[2 * H + j] + r * hn);
      w[j] = r;
      w[H + j] = z;
      w[2 * H + j] = n;
      w[3 * H + j] = hn;
      h[j] = (1 - z) * n + z * hp[j];
    }
    w[7 * H] = rstd;
    if constexpr (TRACK) {
      double* __restrict z0 = a.z + b * N;
      const double inv_n = 1.0 / static_cast<double>(N);
      for (int64_t k = 0; k < N; ++k) z0[k] = static_cast<double>(yh[k]) * inv_n;
    }
  }
}

template <typename T>
VGK_FN void ln_gru_jacobian_rows(const LnJacStep<T>& a, int64_t b0, int64_t b1) {
  const int64_t H = a.H, N = 3 * H, WS = 7 * H + 1;
  const double* __restrict gm = a.gram;  // rr, rz, rn, zz, zn, nn, then the diagonals W_a[j, j]
  for (int64_t b = b0; b < b1; ++b) {
    if (!row_valid(a.len, a.t, b)) {
      a.jac[b] = 0.0f;
      continue;
    }
    const T* __restrict w = a.ws + b * WS;
    const T* __restrict yh = w + 4 * H;
    const T* __restrict hp = a.hp + b * H;
    const double rstd = w[7 * H];
    const double* __restrict v = a.v + b * H;
    const double* __restrict wv = a.q + b * N;
    double vv = 0, uv = 0;
#pragma omp simd reduction(+ : vv, uv)
    for (int64_t k = 0; k < H; ++k) {
      vv += v[k] * v[k];
      uv += v[k] * a.u[k];
    }
    double acc = 0;
    for (int64_t j = 0; j < H; ++j) {
      const double r = w[j], z = w[H + j], n = w[2 * H + j], hn = w[3 * H + j];
      const double dn = (1 - z) * (1 - n * n);
      const double wt[3] = {dn * hn * r * (1 - r) * a.gamma[j] * rstd,
                            (hp[j] - n) * z * (1 - z) * a.gamma[H + j] * rstd, dn * r * a.gamma[2 * H + j] * rstd};
      double s = 0, p = 0, ru = 0, rv = 0, rd = 0;
      for (int64_t g = 0; g < 3; ++g) {
        s += wt[g];
        p += wt[g] * static_cast<double>(yh[g * H + j]);
        ru += wt[g] * a.wu[g * H + j];
        rv += wt[g] * wv[g * H + j];
        rd += wt[g] * gm[(6 + g) * H + j];
      }
      const double quad = wt[0] * wt[0] * gm[j] + wt[1] * wt[1] * gm[3 * H + j] + wt[2] * wt[2] * gm[5 * H + j] +
                          2 * (wt[0] * wt[1] * gm[H + j] + wt[0] * wt[2] * gm[2 * H + j] +
                               wt[1] * wt[2] * gm[4 * H + j]);
      // Row j: z e_j + sum_a wt_a W_(aH+j) - s u - p v.
      acc += quad + s * s * a.uu + p * p * vv + 2 * s * p * uv - 2 * s * ru - 2 * p * rv + z * z +
             2 * z * (rd - s * a.u[j] - p * v[j]);
    }
    a.jac[b] = static_cast<float>(acc);
  }
}

template <typename T, bool TRACK>
VGK_FN void ln_gru_backward_rows(const LnBwdStep<T>& a, int64_t b0, int64_t b1) {
  const int64_t H = a.H, N = 3 * H, WS = 7 * H + 1;
  const T clip = a.clip;
  for (int64_t b = b0; b < b1; ++b) {
    const T* __restrict gs = a.gs + b * H;
    T* __restrict dh = a.dh + b * H;
    T* __restrict gx = a.gx + b * N;
    T* __restrict dl = a.dl + b * N;
    T* __restrict dy = a.dy + b * N;
    if (!row_valid(a.len, a.t, b)) {
      for (int64_t j = 0; j < H; ++j) dh[j] += gs[j];
      zero_row(gx, N);
      zero_row(dl, N);
      zero_row(dy, N);
      if (TRACK) a.gsq_h[b] = 0.0;
      continue;
    }
    const T* __restrict w = a.ws + b * WS;
    const T* __restrict hp = a.hp + b * H;
    double acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < H; ++j) {
      const T r = w[j], z = w[H + j], n = w[2 * H + j], hn = w[3 * H + j];
      const T dhj = gs[j] + dh[j];
      // The clamped d n_pre is the one that flows on, into d r_pre and into d hn.
      const T dn = clamp_f(dhj * (1 - z) * (1 - n * n), clip);
      const T dz = clamp_f(dhj * (hp[j] - n) * z * (1 - z), clip);
      const T dr = clamp_f(dn * hn * r * (1 - r), clip);
      gx[j] = dr;
      gx[H + j] = dz;
      gx[2 * H + j] = dn;
      dl[j] = dr;
      dl[H + j] = dz;
      dl[2 * H + j] = dn * r;
      dh[j] = dhj * z;
      if constexpr (TRACK) acc += square_d(dhj);
    }
    ln_project(dl, a.gamma, w + 4 * H, N, static_cast<double>(w[7 * H]), dy);
    if (TRACK) a.gsq_h[b] = acc;
  }
}
