#include "cpu_kernels.h"

#include <algorithm>
#include <vector>

#include "cpu_dtypes.h"

namespace jax_deform {
namespace {

// Channel blocks of the grad_x pass: small enough to give every thread work
// when N is small, large enough to amortize the sample geometry.
constexpr int64_t kChannelBlock = 64;

template <typename T>
std::vector<Accum<T>> ToAccumVector(const T* data, int64_t count) {
  std::vector<Accum<T>> out(count);
  for (int64_t i = 0; i < count; ++i) out[i] = ToAccum(data[i]);
  return out;
}

// One tap of one output pixel for one offset group: where it samples and with
// which corner weights (mask not applied), in arithmetic type A.
template <typename A>
struct Tap {
  BilinearOf<A> b;
  A wgt[4];
  A mask;
};

template <typename T>
Tap<Accum<T>> MakeTap(const ConvShape& s, const T* offset, const T* mask, int64_t pixel,
                      int64_t oy, int64_t ox, int64_t g, int64_t k) {
  using A = Accum<T>;
  const int64_t oi = OffsetIndex(s, pixel, g, k);
  A py, px;
  SamplePosition(s, oy, ox, k / s.kw, k % s.kw, ToAccum(offset[oi]),
                 ToAccum(offset[oi + 1]), &py, &px);
  Tap<A> t;
  t.b = MakeBilinear(py, px, s.h, s.w);
  CornerWeights(t.b, t.wgt);
  t.mask = mask ? ToAccum(mask[MaskIndex(s, pixel, g, k)]) : A(1);
  return t;
}

// val[c] = interpolated x at the tap for channels [c0, c0 + count) of image xn.
template <typename T, typename A>
void Interpolate(const ConvShape& s, const Tap<A>& t, const T* xn, int64_t c0,
                 int64_t count, A* val) {
  std::fill(val, val + count, t.b.poison);
  for (int i = 0; i < 4; ++i) {
    if (t.b.valid[i] == A(0)) continue;
    const T* xp = xn + t.b.corner[i] * s.c + c0;
    const A w = t.wgt[i];
    for (int64_t c = 0; c < count; ++c) val[c] += w * ToAccum(xp[c]);
  }
}

// The sample (val) and its derivatives along the sample position (dvy, dvx)
// for channels [c0, c0 + count) of image xn: what the backward's offset and
// mask gradients and the forward-mode tangent both need.
template <typename T, typename A>
void InterpolateWithGrads(const ConvShape& s, const Tap<A>& t, const T* xn, int64_t c0,
                          int64_t count, A* val, A* dvy, A* dvx) {
  A wy[4], wx[4];
  CornerWeightGrads(t.b, wy, wx);
  std::fill(val, val + count, t.b.poison);
  std::fill(dvy, dvy + count, t.b.poison);
  std::fill(dvx, dvx + count, t.b.poison);
  for (int i = 0; i < 4; ++i) {
    if (t.b.valid[i] == A(0)) continue;
    const T* xp = xn + t.b.corner[i] * s.c + c0;
    for (int64_t c = 0; c < count; ++c) {
      const A xv = ToAccum(xp[c]);
      val[c] += t.wgt[i] * xv;
      dvy[c] += wy[i] * xv;
      dvx[c] += wx[i] * xv;
    }
  }
}

// gcol[c] = sum_j weight[k, c*M + j] * grad_y[c*M + j] for channels [c0, c0 + count).
template <typename A>
void ColumnGrad(const ConvShape& s, const A* wk, const A* gy, int64_t c0,
                int64_t count, A* gcol) {
  const int64_t m = s.multiplier;
  if (m == 1) {
    for (int64_t c = 0; c < count; ++c) gcol[c] = wk[c0 + c] * gy[c0 + c];
    return;
  }
  for (int64_t c = 0; c < count; ++c) {
    A sum = A(0);
    for (int64_t j = 0; j < m; ++j) sum += wk[(c0 + c) * m + j] * gy[(c0 + c) * m + j];
    gcol[c] = sum;
  }
}

}  // namespace

template <typename T>
void ForwardCpu(const ConvShape& s, const T* x, const T* offset, const T* mask,
                const T* weight, const T* bias, T* y, const ParallelFor& parallel) {
  using A = Accum<T>;
  const int64_t taps = s.taps(), cg = s.channels_per_group(), m = s.multiplier;
  const int64_t cm = s.out_channels();
  const std::vector<A> wf = ToAccumVector(weight, taps * cm);
  const std::vector<A> bf =
      bias ? ToAccumVector(bias, cm) : std::vector<A>(cm, A(0));
  parallel(s.n * s.ho, [&](int64_t row) {
    const int64_t n = row / s.ho, oy = row % s.ho;
    const T* xn = x + n * s.h * s.w * s.c;
    std::vector<A> acc(cm), val(cg);
    for (int64_t ox = 0; ox < s.wo; ++ox) {
      const int64_t pixel = row * s.wo + ox;
      std::copy(bf.begin(), bf.end(), acc.begin());
      for (int64_t g = 0; g < s.groups; ++g) {
        for (int64_t k = 0; k < taps; ++k) {
          const Tap<A> t = MakeTap(s, offset, mask, pixel, oy, ox, g, k);
          Interpolate(s, t, xn, g * cg, cg, val.data());
          const A* wk = &wf[k * cm + g * cg * m];
          A* a = &acc[g * cg * m];
          for (int64_t c = 0; c < cg; ++c) {
            const A v = t.mask * val[c];
            for (int64_t j = 0; j < m; ++j) a[c * m + j] += v * wk[c * m + j];
          }
        }
      }
      T* yp = y + pixel * cm;
      for (int64_t o = 0; o < cm; ++o) yp[o] = FromAccum<T>(acc[o]);
    }
  });
}

template <typename T>
void BackwardCpu(const ConvShape& s, const T* x, const T* offset, const T* mask,
                 const T* weight, const T* grad_y, Accum<T>* grad_x,
                 Accum<T>* grad_offset, Accum<T>* grad_mask, Accum<T>* grad_weight,
                 const ParallelFor& parallel) {
  using A = Accum<T>;
  const int64_t taps = s.taps(), cg = s.channels_per_group(), m = s.multiplier;
  const int64_t cm = s.out_channels(), hw = s.h * s.w;
  const std::vector<A> wf = ToAccumVector(weight, taps * cm);

  // Pass 1, one task per output row: grad_offset and grad_mask are sums over
  // the channels of a group at one (pixel, tap), so each row owns its outputs.
  parallel(s.n * s.ho, [&](int64_t row) {
    const int64_t n = row / s.ho, oy = row % s.ho;
    const T* xn = x + n * hw * s.c;
    std::vector<A> gy(cm), gcol(cg), dvy(cg), dvx(cg), val(cg);
    for (int64_t ox = 0; ox < s.wo; ++ox) {
      const int64_t pixel = row * s.wo + ox;
      for (int64_t o = 0; o < cm; ++o) gy[o] = ToAccum(grad_y[pixel * cm + o]);
      for (int64_t g = 0; g < s.groups; ++g) {
        for (int64_t k = 0; k < taps; ++k) {
          const Tap<A> t = MakeTap(s, offset, mask, pixel, oy, ox, g, k);
          ColumnGrad(s, &wf[k * cm], gy.data(), g * cg, cg, gcol.data());
          InterpolateWithGrads(s, t, xn, g * cg, cg, val.data(), dvy.data(), dvx.data());
          A sum_val = A(0), sum_dy = A(0), sum_dx = A(0);
          for (int64_t c = 0; c < cg; ++c) {
            sum_val += gcol[c] * val[c];
            sum_dy += gcol[c] * dvy[c];
            sum_dx += gcol[c] * dvx[c];
          }
          const int64_t oi = OffsetIndex(s, pixel, g, k);
          grad_offset[oi] = t.mask * sum_dy;
          grad_offset[oi + 1] = t.mask * sum_dx;
          if (grad_mask) grad_mask[MaskIndex(s, pixel, g, k)] = sum_val;
        }
      }
    }
  });

  // Pass 2, one task per (image, channel block): grad_x is a scatter, but
  // blocks of channels of one image never overlap, so no two tasks write the
  // same element and the order of additions is fixed. grad_weight partial
  // sums are kept per image and added in image order afterwards.
  const int64_t blocks = (s.c + kChannelBlock - 1) / kChannelBlock;
  std::vector<A> weight_partial(s.n * taps * cm, A(0));
  parallel(s.n * blocks, [&](int64_t task) {
    const int64_t n = task / blocks;
    const int64_t c_begin = (task % blocks) * kChannelBlock;
    const int64_t c_end = std::min(s.c, c_begin + kChannelBlock);
    const T* xn = x + n * hw * s.c;
    A* gxn = grad_x + n * hw * s.c;
    A* wpart = &weight_partial[n * taps * cm];
    for (int64_t p = 0; p < hw; ++p) {
      std::fill(gxn + p * s.c + c_begin, gxn + p * s.c + c_end, A(0));
    }
    std::vector<A> gy(cm), gcol(kChannelBlock), val(kChannelBlock);
    for (int64_t oy = 0; oy < s.ho; ++oy) {
      for (int64_t ox = 0; ox < s.wo; ++ox) {
        const int64_t pixel = (n * s.ho + oy) * s.wo + ox;
        for (int64_t o = c_begin * m; o < c_end * m; ++o) {
          gy[o] = ToAccum(grad_y[pixel * cm + o]);
        }
        for (int64_t g = c_begin / cg; g * cg < c_end; ++g) {
          const int64_t c0 = std::max(c_begin, g * cg);
          const int64_t count = std::min(c_end, (g + 1) * cg) - c0;
          for (int64_t k = 0; k < taps; ++k) {
            const Tap<A> t = MakeTap(s, offset, mask, pixel, oy, ox, g, k);
            const A* wk = &wf[k * cm];
            ColumnGrad(s, wk, gy.data(), c0, count, gcol.data());
            for (int i = 0; i < 4; ++i) {
              if (t.b.valid[i] == A(0)) continue;
              A* gxp = gxn + t.b.corner[i] * s.c + c0;
              const A w = t.mask * t.wgt[i];
              for (int64_t c = 0; c < count; ++c) gxp[c] += w * gcol[c];
            }
            Interpolate(s, t, xn, c0, count, val.data());
            A* wp = wpart + k * cm;
            for (int64_t c = 0; c < count; ++c) {
              const A v = t.mask * val[c];
              for (int64_t j = 0; j < m; ++j) {
                wp[(c0 + c) * m + j] += v * gy[(c0 + c) * m + j];
              }
            }
          }
        }
      }
    }
  });
  const int64_t wsize = taps * cm;
  parallel((wsize + 255) / 256, [&](int64_t chunk) {
    const int64_t end = std::min(wsize, (chunk + 1) * 256);
    for (int64_t i = chunk * 256; i < end; ++i) {
      A sum = A(0);
      for (int64_t n = 0; n < s.n; ++n) sum += weight_partial[n * wsize + i];
      grad_weight[i] = sum;
    }
  });
}

template <typename T>
void TangentCpu(const ConvShape& s, const T* x, const T* offset, const T* mask, const T* weight,
                const T* x_dot, const T* offset_dot, const T* mask_dot, const T* weight_dot,
                T* y_dot, const ParallelFor& parallel) {
  using A = Accum<T>;
  const int64_t taps = s.taps(), cg = s.channels_per_group(), m = s.multiplier;
  const int64_t cm = s.out_channels();
  const std::vector<A> wf = ToAccumVector(weight, taps * cm);
  const std::vector<A> wdf = ToAccumVector(weight_dot, taps * cm);
  parallel(s.n * s.ho, [&](int64_t row) {
    const int64_t n = row / s.ho, oy = row % s.ho;
    const T* xn = x + n * s.h * s.w * s.c;
    const T* xdn = x_dot + n * s.h * s.w * s.c;
    // Per channel of the group: the sample, its tangent along x_dot, and its
    // derivatives along the sample position.
    std::vector<A> acc(cm), val(cg), val_dot(cg), dvy(cg), dvx(cg);
    for (int64_t ox = 0; ox < s.wo; ++ox) {
      const int64_t pixel = row * s.wo + ox;
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t g = 0; g < s.groups; ++g) {
        for (int64_t k = 0; k < taps; ++k) {
          const Tap<A> t = MakeTap(s, offset, mask, pixel, oy, ox, g, k);
          const int64_t oi = OffsetIndex(s, pixel, g, k);
          const A dy = ToAccum(offset_dot[oi]), dx = ToAccum(offset_dot[oi + 1]);
          const A m_dot = mask_dot ? ToAccum(mask_dot[MaskIndex(s, pixel, g, k)]) : A(0);
          InterpolateWithGrads(s, t, xn, g * cg, cg, val.data(), dvy.data(), dvx.data());
          Interpolate(s, t, xdn, g * cg, cg, val_dot.data());  // linear in x: x_dot's sample
          // y = sum_k w * mask * sample: the tangent of each factor in turn.
          const A* wk = &wf[k * cm + g * cg * m];
          const A* wdk = &wdf[k * cm + g * cg * m];
          A* a = &acc[g * cg * m];
          for (int64_t c = 0; c < cg; ++c) {
            const A sample_dot = val_dot[c] + dvy[c] * dy + dvx[c] * dx;
            const A by_weight = t.mask * val[c];
            const A by_rest = m_dot * val[c] + t.mask * sample_dot;
            for (int64_t j = 0; j < m; ++j) {
              a[c * m + j] += wdk[c * m + j] * by_weight + wk[c * m + j] * by_rest;
            }
          }
        }
      }
      T* yp = y_dot + pixel * cm;
      for (int64_t o = 0; o < cm; ++o) yp[o] = FromAccum<T>(acc[o]);
    }
  });
}

#define JAX_DEFORM_INSTANTIATE(T)                                              \
  template void ForwardCpu<T>(const ConvShape&, const T*, const T*, const T*,  \
                              const T*, const T*, T*, const ParallelFor&);     \
  template void BackwardCpu<T>(const ConvShape&, const T*, const T*, const T*, \
                               const T*, const T*, Accum<T>*, Accum<T>*,       \
                               Accum<T>*, Accum<T>*, const ParallelFor&);     \
  template void TangentCpu<T>(const ConvShape&, const T*, const T*, const T*,  \
                              const T*, const T*, const T*, const T*,          \
                              const T*, T*, const ParallelFor&);
JAX_DEFORM_INSTANTIATE(float)
JAX_DEFORM_INSTANTIATE(BFloat16)
JAX_DEFORM_INSTANTIATE(Float16)
JAX_DEFORM_INSTANTIATE(double)
#undef JAX_DEFORM_INSTANTIATE

}  // namespace jax_deform
