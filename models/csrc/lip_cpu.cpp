// Fused CPU kernels for LIP pooling: out = sum_win(x * exp(s)) / sum_win(exp(s)).
//
// One pass per direction. The unit of work is a "block": one (n, c) plane of an NCHW tensor, or
// one image n of an NHWC (channels_last) tensor, whose rows then hold W pixels of C channels. Input
// rows are processed in order with a small ring of computed rows: exp(s) is computed once per
// input element in each pass (vectorised, branch free), K rows are summed vertically, then the
// K horizontal taps are summed with contiguous loads (NCHW: from rows split by column phase;
// NHWC: channel vectors). Backward spreads the output-sized g/D and g*out/D rows back over the
// at most ceil(K/S)^2 windows of each input, then makes dx and ds in one pass over the input.
//
// An optional per-(n, c) affine map comes first: the logit is then t * scale + shift (an instance
// norm's apply), so the normalised logit is never a tensor; backward returns dt = scale * dz and the
// per-plane sums of dz * t and dz, from which the caller forms the norm's gradients.
//
// Logits are used without shift (the result then rounds like the plain formula). A plane whose
// logits leave a safe range (where exp(s) could overflow the sums, or a whole window underflow)
// is redone with a per-window maximum subtracted before exp; backward redoes those planes the
// same way, recomputing the window maxima.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

namespace {

// expf to about 1 ulp: Cody-Waite reduction by n*ln2, degree-6 polynomial on [-ln2/2, ln2/2],
// 2^n built in the exponent bits. Clamped inputs keep 2^n normal; NaN passes through (the
// comparisons are false), so a NaN loss still shows up. GCC vectorises loops calling it.
inline float exp_fast(float x) {
  x = x < -87.33f ? -87.33f : x;
  x = x > 88.37f ? 88.37f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const float t = std::fma(x, 1.44269504088896341f, magic);
  const float n = t - magic;
  float r = std::fma(n, -0.693359375f, x);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  const float y = std::fma(p, r * r, r) + 1.0f;
  const uint32_t bits = (std::bit_cast<uint32_t>(t) - 0x4B400000u + 127u) << 23;
  return y * std::bit_cast<float>(bits);
}

// float64: the library exp, capped below overflow like the float version (exp(700) ~ 1e304).
inline double exp_fast(double x) { return std::exp(x > 700.0 ? 700.0 : x); }

// Logit range in which the unshifted sums can neither overflow nor lose a whole window.
template <typename T>
struct SafeRange;
template <>
struct SafeRange<float> {
  static constexpr float lo = -60.0f, hi = 40.0f;
};
template <>
struct SafeRange<double> {
  static constexpr double lo = -500.0, hi = 300.0;
};

struct Geometry {
  int64_t H, W, Ho, Wo, K, S, P;
  int64_t L;     // entries per column phase: Wo + (K - 1) / S
  int64_t Wpad;  // padded row length S * L, column c of the input sits at c + P
  int64_t cw;    // input columns that can lie in a window: min(W, Wpad - P)

  Geometry(int64_t H_, int64_t W_, int64_t K_, int64_t S_, int64_t P_)
      : H(H_), W(W_), K(K_), S(S_), P(P_) {
    Ho = (H + 2 * P - K) / S + 1;
    Wo = (W + 2 * P - K) / S + 1;
    L = Wo + (K - 1) / S;
    Wpad = S * L;
    cw = std::min(W, Wpad - P);
  }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

// The soft gate s = coeff * sigmoid(z) and its slope ds/dz = coeff * sig * (1 - sig), written
// with e = exp(-z) as s * (sig * e): 1 - sig = sig * e stays accurate where sig is close to 1, and
// no intermediate underflows where sig is tiny. (exp_fast never returns inf, so sig * e is finite.)
template <typename T>
inline T gate(T z, T coeff, T* slope) {
  const T e = exp_fast(-z);
  const T sig = T(1) / (T(1) + e);
  const T s = coeff * sig;
  *slope = s * (sig * e);
  return s;
}

// The logit of one element: s itself, or the gated coeff * sigmoid(z).
template <bool GATED, typename T>
inline T logit_of(T v, T coeff) {
  if constexpr (GATED) {
    T slope;
    return gate(v, coeff, &slope);
  } else {
    return v;
  }
}

template <typename T>
struct ForwardScratch {
  std::vector<T> wring, xring, vd, vn, phd, phn, zero;
  std::vector<const T*> wr, xr;
  std::vector<int> bad;
  ForwardScratch(const Geometry& g, int64_t cc)
      : wring(g.K * g.Wpad * cc, T(0)), xring(g.K * g.Wpad * cc, T(0)), vd(g.Wpad * cc), vn(g.Wpad * cc),
        phd(g.S * g.L), phn(g.S * g.L), zero(g.Wpad * cc, T(0)), wr(g.K), xr(g.K), bad(cc) {}
};

// w = exp(s) and x * w for the first `cols` pixels of one input row; bad[channel] notes logits
// outside SafeRange. For NCHW (cc == 1) the flag is a scalar reduction; for NHWC the inner loop
// runs over the channel vector of a pixel.
template <typename T, bool GATED, bool NHWC>
void forward_row(const T* __restrict xs, const T* __restrict ts, const T* __restrict sa, const T* __restrict sb,
                 T coeff, T* __restrict wd, T* __restrict xd, int* __restrict bad, int64_t cols, int64_t cc) {
  const T lo = SafeRange<T>::lo, hi = SafeRange<T>::hi;
  if constexpr (NHWC) {
    for (int64_t c = 0; c < cols; ++c) {
      for (int64_t ch = 0; ch < cc; ++ch) {
        const int64_t i = c * cc + ch;
        const T s = logit_of<GATED>(ts[i] * sa[ch] + sb[ch], coeff);
        bad[ch] |= static_cast<int>(s < lo) | static_cast<int>(s > hi);
        const T w = exp_fast(s);
        wd[i] = w;
        xd[i] = xs[i] * w;
      }
    }
  } else {
    int b = 0;
    const T a0 = sa[0], b0 = sb[0];
    for (int64_t i = 0; i < cols; ++i) {
      const T s = logit_of<GATED>(ts[i] * a0 + b0, coeff);
      b |= static_cast<int>(s < lo) | static_cast<int>(s > hi);
      const T w = exp_fast(s);
      wd[i] = w;
      xd[i] = xs[i] * w;
    }
    *bad |= b;
  }
}

// dst = rows[0] + ... + rows[k - 1] over n entries. Separate restrict arguments let GCC vectorise
// without alias checks.
template <typename T>
void sum_rows(T* __restrict dst, const T* const* rows, int64_t k, int64_t n) {
  const T* __restrict r0 = rows[0];
  for (int64_t c = 0; c < n; ++c) {
    dst[c] = r0[c];
  }
  for (int64_t i = 1; i < k; ++i) {
    const T* __restrict ri = rows[i];
    for (int64_t c = 0; c < n; ++c) {
      dst[c] += ri[c];
    }
  }
}

// NCHW horizontal pass: vertical sums v are split by column phase, ph[q * L + m] = v[m * S + q],
// so that the K taps of consecutive outputs are contiguous.
template <typename T, int KT, int ST>
void horizontal_phases(const T* __restrict vd, const T* __restrict vn, T* __restrict phd, T* __restrict phn,
                       T* __restrict o, T* __restrict dd, const Geometry& g) {
  const int64_t K = KT ? KT : g.K, S = ST ? ST : g.S, L = g.L;
  for (int64_t m = 0; m < L; ++m) {
    for (int64_t q = 0; q < S; ++q) {
      phd[q * L + m] = vd[m * S + q];
      phn[q * L + m] = vn[m * S + q];
    }
  }
  for (int64_t ow = 0; ow < g.Wo; ++ow) {
    T d = phd[ow];
    T n = phn[ow];
    for (int64_t j = 1; j < K; ++j) {
      d += phd[(j % S) * L + ow + j / S];
      n += phn[(j % S) * L + ow + j / S];
    }
    o[ow] = n / d;
    dd[ow] = d;
  }
}

// NHWC horizontal pass: the K taps are whole pixels, i.e. contiguous channel vectors.
template <typename T, int KT, int ST>
void horizontal_channels(const T* __restrict vd, const T* __restrict vn, T* __restrict o, T* __restrict dd,
                         const Geometry& g, int64_t cc) {
  const int64_t K = KT ? KT : g.K, S = ST ? ST : g.S;
  for (int64_t ow = 0; ow < g.Wo; ++ow) {
    const T* __restrict d0 = vd + ow * S * cc;
    const T* __restrict n0 = vn + ow * S * cc;
    T* __restrict oo = o + ow * cc;
    T* __restrict od = dd + ow * cc;
    for (int64_t ch = 0; ch < cc; ++ch) {
      T d = d0[ch];
      T n = n0[ch];
      for (int64_t j = 1; j < K; ++j) {
        d += d0[j * cc + ch];
        n += n0[j * cc + ch];
      }
      oo[ch] = n / d;
      od[ch] = d;
    }
  }
}

// Unshifted forward of one block; bad[] (one flag per channel of the block) is set for planes
// with a logit outside SafeRange, whose results the caller replaces.
template <typename T, int KT, int ST, bool GATED, bool NHWC>
void forward_block(const T* x, const T* t, const T* sa, const T* sb, T coeff, T* out, T* den, const Geometry& g,
                   int64_t cc, ForwardScratch<T>& sc) {
  const int64_t K = KT ? KT : g.K, S = ST ? ST : g.S;
  const int64_t rowlen = g.Wpad * cc, in_row = g.W * cc, out_row = g.Wo * cc, pc = g.P * cc;
  std::fill(sc.bad.begin(), sc.bad.end(), 0);
  int64_t next_row = 0;
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    const int64_t r0 = oh * S - g.P;
    for (int64_t i = 0; i < K; ++i) {
      const int64_t r = r0 + i;
      if (r < 0 || r >= g.H) {
        sc.wr[i] = sc.zero.data();
        sc.xr[i] = sc.zero.data();
        continue;
      }
      T* wrow = sc.wring.data() + (r % K) * rowlen;
      T* xrow = sc.xring.data() + (r % K) * rowlen;
      if (r >= next_row) {
        forward_row<T, GATED, NHWC>(x + r * in_row, t + r * in_row, sa, sb, coeff, wrow + pc, xrow + pc, sc.bad.data(),
                                    g.cw, cc);
        next_row = r + 1;
      }
      sc.wr[i] = wrow;
      sc.xr[i] = xrow;
    }
    sum_rows(sc.vd.data(), sc.wr.data(), K, rowlen);
    sum_rows(sc.vn.data(), sc.xr.data(), K, rowlen);
    if constexpr (NHWC) {
      horizontal_channels<T, KT, ST>(sc.vd.data(), sc.vn.data(), out + oh * out_row, den + oh * out_row, g, cc);
    } else {
      horizontal_phases<T, KT, ST>(sc.vd.data(), sc.vn.data(), sc.phd.data(), sc.phn.data(), out + oh * out_row,
                                   den + oh * out_row, g);
    }
  }
}

// Where one (n, c) plane lives: element strides of rows and columns, input and output.
struct PlaneStrides {
  int64_t in_row, in_col, out_row, out_col;
};

struct Window {
  int64_t r0, r1, c0, c1;
};

inline Window window_at(const Geometry& g, int64_t oh, int64_t ow) {
  return {std::max<int64_t>(oh * g.S - g.P, 0), std::min<int64_t>(oh * g.S - g.P + g.K, g.H),
          std::max<int64_t>(ow * g.S - g.P, 0), std::min<int64_t>(ow * g.S - g.P + g.K, g.W)};
}

template <bool GATED, typename T>
inline T window_max(const T* t, T a, T b, T coeff, const PlaneStrides& st, const Window& win) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t r = win.r0; r < win.r1; ++r) {
    for (int64_t c = win.c0; c < win.c1; ++c) {
      m = std::max(m, logit_of<GATED>(t[r * st.in_row + c * st.in_col] * a + b, coeff));
    }
  }
  return m;
}

// Per-window maximum subtracted before exp: finite for any finite logits. D is relative to it.
template <typename T, bool GATED>
void forward_plane_robust(const T* x, const T* t, T a, T b, T coeff, T* out, T* den, const Geometry& g,
                          const PlaneStrides& st) {
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      const Window win = window_at(g, oh, ow);
      const T m = window_max<GATED>(t, a, b, coeff, st, win);
      T d = 0, n = 0;
      for (int64_t r = win.r0; r < win.r1; ++r) {
        for (int64_t c = win.c0; c < win.c1; ++c) {
          const int64_t i = r * st.in_row + c * st.in_col;
          const T w = std::exp(logit_of<GATED>(t[i] * a + b, coeff) - m);
          d += w;
          n += x[i] * w;
        }
      }
      out[oh * st.out_row + ow * st.out_col] = n / d;
      den[oh * st.out_row + ow * st.out_col] = d;
    }
  }
}

template <typename T>
struct BackwardScratch {
  std::vector<T> aring, bring, apad, bpad, zero;
  std::vector<const T*> ar, br;
  BackwardScratch(const Geometry& g, int64_t cc) {
    const int64_t J = (g.K + g.S - 1) / g.S, Z = (g.K - 1) / g.S;
    aring.assign(J * g.Wpad * cc, T(0));
    bring.assign(J * g.Wpad * cc, T(0));
    apad.assign(cc == 1 ? Z + g.L : g.Wo * cc, T(0));
    bpad.assign(cc == 1 ? Z + g.L : g.Wo * cc, T(0));
    zero.assign(g.Wpad * cc, T(0));
    ar.resize(J);
    br.resize(J);
  }
};

// NCHW spread of one output row: A[m * S + q] = sum of a[m - j] over the taps q + j * S < K, i.e.
// every padded input column gets the a (= g/D) of the windows it lies in; likewise B from b.
template <typename T, int KT, int ST>
void spread_phases(const T* __restrict go, const T* __restrict out, const T* __restrict den, T* __restrict apad,
                   T* __restrict bpad, T* __restrict arow, T* __restrict brow, const Geometry& g) {
  const int64_t K = KT ? KT : g.K, S = ST ? ST : g.S, Z = (K - 1) / S;
  T* __restrict a = apad + Z;  // zero padded: a[-Z .. -1] and a[Wo .. L - 1] stay 0
  T* __restrict b = bpad + Z;
  for (int64_t ow = 0; ow < g.Wo; ++ow) {
    const T v = go[ow] / den[ow];
    a[ow] = v;
    b[ow] = v * out[ow];
  }
  for (int64_t m = 0; m < g.L; ++m) {
    for (int64_t q = 0; q < S; ++q) {
      T av = 0, bv = 0;
      for (int64_t j = 0; q + j * S < K; ++j) {
        av += a[m - j];
        bv += b[m - j];
      }
      arow[m * S + q] = av;
      brow[m * S + q] = bv;
    }
  }
}

// NHWC spread of one output row: each window's channel vector of a and b is added to its K pixels.
template <typename T, int KT, int ST>
void spread_channels(const T* __restrict go, const T* __restrict out, const T* __restrict den, T* __restrict a,
                     T* __restrict b, T* __restrict arow, T* __restrict brow, const Geometry& g, int64_t cc) {
  const int64_t K = KT ? KT : g.K, S = ST ? ST : g.S;
  for (int64_t i = 0; i < g.Wo * cc; ++i) {
    const T v = go[i] / den[i];
    a[i] = v;
    b[i] = v * out[i];
  }
  std::fill(arow, arow + g.Wpad * cc, T(0));
  std::fill(brow, brow + g.Wpad * cc, T(0));
  for (int64_t ow = 0; ow < g.Wo; ++ow) {
    for (int64_t j = 0; j < K; ++j) {
      T* __restrict ad = arow + (ow * S + j) * cc;
      T* __restrict bd = brow + (ow * S + j) * cc;
      const T* __restrict as = a + ow * cc;
      const T* __restrict bs = b + ow * cc;
      for (int64_t ch = 0; ch < cc; ++ch) {
        ad[ch] += as[ch];
        bd[ch] += bs[ch];
      }
    }
  }
}

// dx = w * A and dz = w * (x * A - B) * ds/dz for one input row, A and B summed over its J window
// rows; dt = dz * a, and dz * t and dz are added to the channel's sums s1 and s2.
template <typename T, int J, bool GATED, bool NHWC>
void backward_row(const T* __restrict xs, const T* __restrict ts, const T* __restrict sa, const T* __restrict sb,
                  T coeff, const T* const* ar, const T* const* br, int64_t j_rt, T* __restrict dxr,
                  T* __restrict dtr, T* __restrict s1, T* __restrict s2, int64_t pixels, int64_t cc) {
  const int64_t nj = J ? J : j_rt;
  auto one = [&](int64_t c, T a, T b, T& acc1, T& acc2) {
    T A = ar[0][c], B = br[0][c];
    for (int64_t j = 1; j < nj; ++j) {
      A += ar[j][c];
      B += br[j][c];
    }
    const T v = ts[c] * a + b;
    T slope = 1, s = v;
    if constexpr (GATED) {
      s = gate(v, coeff, &slope);
    }
    const T w = exp_fast(s);
    const T dz = w * (xs[c] * A - B) * slope;
    dxr[c] = w * A;
    dtr[c] = dz * a;
    acc1 += dz * ts[c];
    acc2 += dz;
  };
  if constexpr (NHWC) {
    for (int64_t px = 0; px < pixels; ++px) {
      for (int64_t ch = 0; ch < cc; ++ch) {
        one(px * cc + ch, sa[ch], sb[ch], s1[ch], s2[ch]);
      }
    }
  } else {
    T acc1 = 0, acc2 = 0;
    const T a0 = sa[0], b0 = sb[0];
    for (int64_t c = 0; c < pixels; ++c) {
      one(c, a0, b0, acc1, acc2);
    }
    s1[0] += acc1;
    s2[0] += acc2;
  }
}

template <typename T, int KT, int ST, bool GATED, bool NHWC>
void backward_block(const T* x, const T* t, const T* sa, const T* sb, T coeff, const T* go, const T* out,
                    const T* den, T* dx, T* dt, T* s1, T* s2, const Geometry& g, int64_t cc,
                    BackwardScratch<T>& sc) {
  const int64_t K = KT ? KT : g.K, S = ST ? ST : g.S;
  constexpr int JT = KT ? (KT + ST - 1) / ST : 0;
  const int64_t J = (K + S - 1) / S;
  const int64_t rowlen = g.Wpad * cc, in_row = g.W * cc, out_row = g.Wo * cc, pc = g.P * cc;
  const int64_t active = g.cw * cc;  // entries of a row that can lie in a window
  int64_t next_oh = 0;
  for (int64_t r = 0; r < g.H; ++r) {
    const int64_t oh_lo = std::max<int64_t>(ceil_div(r + g.P - K + 1, S), 0);
    const int64_t oh_hi = std::min<int64_t>((r + g.P) / S, g.Ho - 1);
    T* dxr = dx + r * in_row;
    T* dtr = dt + r * in_row;
    if (oh_lo > oh_hi) {
      std::fill(dxr, dxr + in_row, T(0));
      std::fill(dtr, dtr + in_row, T(0));
      continue;
    }
    for (int64_t oh = std::max(next_oh, oh_lo); oh <= oh_hi; ++oh) {
      T* arow = sc.aring.data() + (oh % J) * rowlen;
      T* brow = sc.bring.data() + (oh % J) * rowlen;
      const int64_t o = oh * out_row;
      if constexpr (NHWC) {
        spread_channels<T, KT, ST>(go + o, out + o, den + o, sc.apad.data(), sc.bpad.data(), arow, brow, g, cc);
      } else {
        spread_phases<T, KT, ST>(go + o, out + o, den + o, sc.apad.data(), sc.bpad.data(), arow, brow, g);
      }
      next_oh = oh + 1;
    }
    for (int64_t j = 0; j < J; ++j) {
      const int64_t oh = oh_lo + j;
      sc.ar[j] = oh <= oh_hi ? sc.aring.data() + (oh % J) * rowlen + pc : sc.zero.data();
      sc.br[j] = oh <= oh_hi ? sc.bring.data() + (oh % J) * rowlen + pc : sc.zero.data();
    }
    backward_row<T, JT, GATED, NHWC>(x + r * in_row, t + r * in_row, sa, sb, coeff, sc.ar.data(), sc.br.data(), J,
                                     dxr, dtr, s1, s2, g.cw, cc);
    std::fill(dxr + active, dxr + in_row, T(0));
    std::fill(dtr + active, dtr + in_row, T(0));
  }
}

template <typename T, bool GATED>
void backward_plane_robust(const T* x, const T* t, T sa, T sb, T coeff, const T* go, const T* out, const T* den,
                           T* dx, T* dt, T* s1, T* s2, const Geometry& g, const PlaneStrides& st) {
  for (int64_t r = 0; r < g.H; ++r) {
    for (int64_t c = 0; c < g.W; ++c) {
      dx[r * st.in_row + c * st.in_col] = 0;
      dt[r * st.in_row + c * st.in_col] = 0;
    }
  }
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      const Window win = window_at(g, oh, ow);
      const T m = window_max<GATED>(t, sa, sb, coeff, st, win);
      const int64_t o = oh * st.out_row + ow * st.out_col;
      const T a = go[o] / den[o];
      const T b = a * out[o];
      for (int64_t r = win.r0; r < win.r1; ++r) {
        for (int64_t c = win.c0; c < win.c1; ++c) {
          const int64_t i = r * st.in_row + c * st.in_col;
          T s = t[i] * sa + sb, slope = 1;
          if constexpr (GATED) {
            s = gate(s, coeff, &slope);
          }
          const T w = std::exp(s - m);
          dx[i] += w * a;
          dt[i] += w * (x[i] * a - b) * slope;  // dz here; scaled below
        }
      }
    }
  }
  T acc1 = 0, acc2 = 0;
  for (int64_t r = 0; r < g.H; ++r) {
    for (int64_t c = 0; c < g.W; ++c) {
      const int64_t i = r * st.in_row + c * st.in_col;
      acc1 += dt[i] * t[i];
      acc2 += dt[i];
      dt[i] *= sa;
    }
  }
  *s1 = acc1;
  *s2 = acc2;
}

// Calls f with compile-time (K, S) for the common shapes, (0, 0) meaning "read from Geometry",
// and the gate and layout flags as types.
template <typename F>
void dispatch(int64_t K, int64_t S, bool gated, bool nhwc, const F& f) {
  auto with_flags = [&](auto k, auto s) {
    auto with_layout = [&](auto gate_flag) {
      if (nhwc) {
        f(k, s, gate_flag, std::true_type{});
      } else {
        f(k, s, gate_flag, std::false_type{});
      }
    };
    if (gated) {
      with_layout(std::true_type{});
    } else {
      with_layout(std::false_type{});
    }
  };
  using I = std::integral_constant<int, 0>;
  if (K == 3 && S == 2) {
    with_flags(std::integral_constant<int, 3>{}, std::integral_constant<int, 2>{});
  } else if (K == 2 && S == 2) {
    with_flags(std::integral_constant<int, 2>{}, std::integral_constant<int, 2>{});
  } else if (K == 3 && S == 1) {
    with_flags(std::integral_constant<int, 3>{}, std::integral_constant<int, 1>{});
  } else {
    with_flags(I{}, I{});
  }
}

// The blocks of a tensor: NCHW has N*C planes of one channel, NHWC has N images of C channels.
struct Blocks {
  int64_t count, cc, in_size, out_size;
  PlaneStrides strides;  // of one plane inside its block

  Blocks(const at::Tensor& x, const Geometry& g, bool nhwc) {
    const int64_t N = x.size(0), C = x.size(1);
    count = nhwc ? N : N * C;
    cc = nhwc ? C : 1;
    in_size = g.H * g.W * cc;
    out_size = g.Ho * g.Wo * cc;
    strides = {g.W * cc, cc, g.Wo * cc, cc};
  }
};

at::MemoryFormat layout_format(bool nhwc) {
  return nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

void check_tensor(const at::Tensor& v, const at::Tensor& x, bool nhwc, const char* name) {
  TORCH_CHECK(v.device().is_cpu(), "lip_cpu: ", name, " must be on the CPU");
  TORCH_CHECK(v.scalar_type() == x.scalar_type(), "lip_cpu: ", name, " must have x's dtype");
  TORCH_CHECK(v.dim() == 4 && v.size(0) == x.size(0) && v.size(1) == x.size(1), "lip_cpu: ", name,
              " must be 4-D with x's batch and channels");
  TORCH_CHECK(v.is_contiguous(layout_format(nhwc)), "lip_cpu: ", name, " must be contiguous in ",
              nhwc ? "channels_last" : "NCHW", " layout");
}

Geometry checked_geometry(const at::Tensor& x, const at::Tensor& t, bool nhwc, int64_t K, int64_t S,
                          int64_t P) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "lip_cpu: dtype must be float32 or float64");
  check_tensor(x, x, nhwc, "x");
  check_tensor(t, x, nhwc, "logit");
  TORCH_CHECK(x.sizes() == t.sizes(), "lip_cpu: x and logit must have one shape");
  TORCH_CHECK(K >= 1 && S >= 1 && P >= 0 && 2 * P <= K && x.size(2) + 2 * P >= K && x.size(3) + 2 * P >= K,
              "lip_cpu: invalid kernel_size/stride/padding for this input");
  return Geometry(x.size(2), x.size(3), K, S, P);
}

int64_t block_grain(const Blocks& b) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, b.in_size)); }

// The per-(n, c) scale and shift as contiguous (N, C) tensors of x's dtype, or ones and zeros.
std::pair<at::Tensor, at::Tensor> plane_affine(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                                               const std::optional<at::Tensor>& shift) {
  TORCH_CHECK(scale.has_value() == shift.has_value(), "lip_cpu: scale and shift go together");
  if (!scale.has_value()) {
    return {at::ones({x.size(0), x.size(1)}, x.options()), at::zeros({x.size(0), x.size(1)}, x.options())};
  }
  for (const auto* v : {&*scale, &*shift}) {
    TORCH_CHECK(v->scalar_type() == x.scalar_type() && v->numel() == x.size(0) * x.size(1) && v->is_contiguous(),
                "lip_cpu: scale and shift must be contiguous (N, C) tensors of x's dtype");
  }
  return {*scale, *shift};
}

std::vector<at::Tensor> lip_forward(const at::Tensor& x, const at::Tensor& t, double coeff, bool gated,
                                    int64_t K, int64_t S, int64_t P, bool nhwc,
                                    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift) {
  const Geometry g = checked_geometry(x, t, nhwc, K, S, P);
  const Blocks blocks(x, g, nhwc);
  const auto [sa, sb] = plane_affine(x, scale, shift);
  auto out = at::empty({x.size(0), x.size(1), g.Ho, g.Wo}, x.options().memory_format(layout_format(nhwc)));
  auto den = at::empty_like(out);
  auto robust = at::zeros({x.size(0), x.size(1)}, x.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lip_forward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const scalar_t* ap = sa.const_data_ptr<scalar_t>();
    const scalar_t* bp = sb.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* dp = den.data_ptr<scalar_t>();
    bool* rp = robust.data_ptr<bool>();
    const auto c = static_cast<scalar_t>(coeff);
    dispatch(K, S, gated, nhwc, [&](auto k, auto s, auto gate_flag, auto layout_flag) {
      constexpr int KT = decltype(k)::value, ST = decltype(s)::value;
      constexpr bool GATED = decltype(gate_flag)::value, NHWC = decltype(layout_flag)::value;
      at::parallel_for(0, blocks.count, block_grain(blocks), [&](int64_t begin, int64_t end) {
        ForwardScratch<scalar_t> sc(g, blocks.cc);
        for (int64_t b = begin; b < end; ++b) {
          const int64_t in = b * blocks.in_size, o = b * blocks.out_size, pl = b * blocks.cc;
          forward_block<scalar_t, KT, ST, GATED, NHWC>(xp + in, tp + in, ap + pl, bp + pl, c, op + o, dp + o, g,
                                                       blocks.cc, sc);
          for (int64_t ch = 0; ch < blocks.cc; ++ch) {
            if (sc.bad[ch]) {
              forward_plane_robust<scalar_t, GATED>(xp + in + ch, tp + in + ch, ap[pl + ch], bp[pl + ch], c,
                                                    op + o + ch, dp + o + ch, g, blocks.strides);
              rp[pl + ch] = true;
            }
          }
        }
      });
    });
  });
  return {out, den, robust};
}

// {dx, dt} and, with scale and shift, the per-plane sums {sum(dz * t), sum(dz)} of the pre-gate logit's
// gradient dz (dt is then dz * scale).
std::vector<at::Tensor> lip_backward(const at::Tensor& x, const at::Tensor& t, const at::Tensor& grad,
                                     const at::Tensor& out, const at::Tensor& den, const at::Tensor& robust,
                                     double coeff, bool gated, int64_t K, int64_t S, int64_t P, bool nhwc,
                                     const std::optional<at::Tensor>& scale,
                                     const std::optional<at::Tensor>& shift) {
  const Geometry g = checked_geometry(x, t, nhwc, K, S, P);
  for (const auto& [v, name] : {std::pair{&grad, "grad"}, std::pair{&out, "out"}, std::pair{&den, "den"}}) {
    check_tensor(*v, x, nhwc, name);
    TORCH_CHECK(v->size(2) == g.Ho && v->size(3) == g.Wo, "lip_cpu: ", name, " must have the output size");
  }
  TORCH_CHECK(robust.scalar_type() == at::kBool && robust.numel() == x.size(0) * x.size(1) &&
                  robust.is_contiguous(),
              "lip_cpu: robust must be a contiguous bool (N, C) tensor");
  const Blocks blocks(x, g, nhwc);
  const auto [sa, sb] = plane_affine(x, scale, shift);
  auto dx = at::empty(x.sizes(), x.options().memory_format(layout_format(nhwc)));
  auto dt = at::empty(x.sizes(), x.options().memory_format(layout_format(nhwc)));
  auto sum1 = at::zeros({x.size(0), x.size(1)}, x.options());
  auto sum2 = at::zeros({x.size(0), x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lip_backward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* op = out.const_data_ptr<scalar_t>();
    const scalar_t* dp = den.const_data_ptr<scalar_t>();
    const scalar_t* ap = sa.const_data_ptr<scalar_t>();
    const scalar_t* bp = sb.const_data_ptr<scalar_t>();
    const bool* rp = robust.const_data_ptr<bool>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    scalar_t* dtp = dt.data_ptr<scalar_t>();
    scalar_t* s1p = sum1.data_ptr<scalar_t>();
    scalar_t* s2p = sum2.data_ptr<scalar_t>();
    const auto c = static_cast<scalar_t>(coeff);
    dispatch(K, S, gated, nhwc, [&](auto k, auto s, auto gate_flag, auto layout_flag) {
      constexpr int KT = decltype(k)::value, ST = decltype(s)::value;
      constexpr bool GATED = decltype(gate_flag)::value, NHWC = decltype(layout_flag)::value;
      at::parallel_for(0, blocks.count, block_grain(blocks), [&](int64_t begin, int64_t end) {
        BackwardScratch<scalar_t> sc(g, blocks.cc);
        for (int64_t b = begin; b < end; ++b) {
          const int64_t in = b * blocks.in_size, o = b * blocks.out_size, pl = b * blocks.cc;
          const bool* rb = rp + pl;
          if (NHWC || !rb[0]) {
            backward_block<scalar_t, KT, ST, GATED, NHWC>(xp + in, tp + in, ap + pl, bp + pl, c, gp + o, op + o,
                                                          dp + o, dxp + in, dtp + in, s1p + pl, s2p + pl, g,
                                                          blocks.cc, sc);
          }
          for (int64_t ch = 0; ch < blocks.cc; ++ch) {
            if (rb[ch]) {
              backward_plane_robust<scalar_t, GATED>(xp + in + ch, tp + in + ch, ap[pl + ch], bp[pl + ch], c,
                                                     gp + o + ch, op + o + ch, dp + o + ch, dxp + in + ch,
                                                     dtp + in + ch, s1p + pl + ch, s2p + pl + ch, g,
                                                     blocks.strides);
            }
          }
        }
      });
    });
  });
  if (scale.has_value()) {
    return {dx, dt, sum1, sum2};
  }
  return {dx, dt};
}

}  // namespace

// Registered as torch.ops.<extension name>.forward / .backward (models/lip.py loads the library).
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def(
      "forward(Tensor x, Tensor logit, float coeff, bool gated, int kernel_size, int stride, int padding, "
      "bool channels_last, Tensor? scale=None, Tensor? shift=None) -> Tensor[]");
  m.def(
      "backward(Tensor x, Tensor logit, Tensor grad, Tensor out, Tensor den, Tensor robust, float coeff, "
      "bool gated, int kernel_size, int stride, int padding, bool channels_last, Tensor? scale=None, "
      "Tensor? shift=None) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("forward", &lip_forward);
  m.impl("backward", &lip_backward);
}
