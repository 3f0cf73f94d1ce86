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
std::vector<float> ToFloatVector(const T* data, int64_t count) {
  std::vector<float> out(count);
  for (int64_t i = 0; i < count; ++i) out[i] = ToFloat(data[i]);
  return out;
}

// One tap of one output pixel for one offset group: where it samples and with
// which corner weights (mask not applied).
struct Tap {
  Bilinear b;
  float wgt[4];
  float mask;
};

template <typename T>
Tap MakeTap(const ConvShape& s, const T* offset, const T* mask, int64_t pixel,
            int64_t oy, int64_t ox, int64_t g, int64_t k) {
  const int64_t oi = OffsetIndex(s, pixel, g, k);
  float py, px;
  SamplePosition(s, oy, ox, k / s.kw, k % s.kw, ToFloat(offset[oi]),
                 ToFloat(offset[oi + 1]), &py, &px);
  Tap t;
  t.b = MakeBilinear(py, px, s.h, s.w);
  CornerWeights(t.b, t.wgt);
  t.mask = mask ? ToFloat(mask[MaskIndex(s, pixel, g, k)]) : 1.f;
  return t;
}

// val[c] = interpolated x at the tap for channels [c0, c0 + count) of image xn.
template <typename T>
void Interpolate(const ConvShape& s, const Tap& t, const T* xn, int64_t c0,
                 int64_t count, float* val) {
  std::fill(val, val + count, t.b.poison);
  for (int i = 0; i < 4; ++i) {
    if (t.b.valid[i] == 0.f) continue;
    const T* xp = xn + t.b.corner[i] * s.c + c0;
    const float w = t.wgt[i];
    for (int64_t c = 0; c < count; ++c) val[c] += w * ToFloat(xp[c]);
  }
}

// gcol[c] = sum_j weight[k, c*M + j] * grad_y[c*M + j] for channels [c0, c0 + count).
void ColumnGrad(const ConvShape& s, const float* wk, const float* gy, int64_t c0,
                int64_t count, float* gcol) {
  const int64_t m = s.multiplier;
  if (m == 1) {
    for (int64_t c = 0; c < count; ++c) gcol[c] = wk[c0 + c] * gy[c0 + c];
    return;
  }
  for (int64_t c = 0; c < count; ++c) {
    float sum = 0.f;
    for (int64_t j = 0; j < m; ++j) sum += wk[(c0 + c) * m + j] * gy[(c0 + c) * m + j];
    gcol[c] = sum;
  }
}

}  // namespace

template <typename T>
void ForwardCpu(const ConvShape& s, const T* x, const T* offset, const T* mask,
                const T* weight, const T* bias, T* y, const ParallelFor& parallel) {
  const int64_t taps = s.taps(), cg = s.channels_per_group(), m = s.multiplier;
  const int64_t cm = s.out_channels();
  const std::vector<float> wf = ToFloatVector(weight, taps * cm);
  const std::vector<float> bf =
      bias ? ToFloatVector(bias, cm) : std::vector<float>(cm, 0.f);
  parallel(s.n * s.ho, [&](int64_t row) {
    const int64_t n = row / s.ho, oy = row % s.ho;
    const T* xn = x + n * s.h * s.w * s.c;
    std::vector<float> acc(cm), val(cg);
    for (int64_t ox = 0; ox < s.wo; ++ox) {
      const int64_t pixel = row * s.wo + ox;
      std::copy(bf.begin(), bf.end(), acc.begin());
      for (int64_t g = 0; g < s.groups; ++g) {
        for (int64_t k = 0; k < taps; ++k) {
          const Tap t = MakeTap(s, offset, mask, pixel, oy, ox, g, k);
          Interpolate(s, t, xn, g * cg, cg, val.data());
          const float* wk = &wf[k * cm + g * cg * m];
          float* a = &acc[g * cg * m];
          for (int64_t c = 0; c < cg; ++c) {
            const float v = t.mask * val[c];
            for (int64_t j = 0; j < m; ++j) a[c * m + j] += v * wk[c * m + j];
          }
        }
      }
      T* yp = y + pixel * cm;
      for (int64_t o = 0; o < cm; ++o) yp[o] = FromFloat<T>(acc[o]);
    }
  });
}

template <typename T>
void BackwardCpu(const ConvShape& s, const T* x, const T* offset, const T* mask,
                 const T* weight, const T* grad_y, float* grad_x,
                 float* grad_offset, float* grad_mask, float* grad_weight,
                 const ParallelFor& parallel) {
  const int64_t taps = s.taps(), cg = s.channels_per_group(), m = s.multiplier;
  const int64_t cm = s.out_channels(), hw = s.h * s.w;
  const std::vector<float> wf = ToFloatVector(weight, taps * cm);

  // Pass 1, one task per output row: grad_offset and grad_mask are sums over
  // the channels of a group at one (pixel, tap), so each row owns its outputs.
  parallel(s.n * s.ho, [&](int64_t row) {
    const int64_t n = row / s.ho, oy = row % s.ho;
    const T* xn = x + n * hw * s.c;
    std::vector<float> gy(cm), gcol(cg), dvy(cg), dvx(cg), val(cg);
    for (int64_t ox = 0; ox < s.wo; ++ox) {
      const int64_t pixel = row * s.wo + ox;
      for (int64_t o = 0; o < cm; ++o) gy[o] = ToFloat(grad_y[pixel * cm + o]);
      for (int64_t g = 0; g < s.groups; ++g) {
        for (int64_t k = 0; k < taps; ++k) {
          const Tap t = MakeTap(s, offset, mask, pixel, oy, ox, g, k);
          float wy[4], wx[4];
          CornerWeightGrads(t.b, wy, wx);
          ColumnGrad(s, &wf[k * cm], gy.data(), g * cg, cg, gcol.data());
          std::fill(val.begin(), val.end(), t.b.poison);
          std::fill(dvy.begin(), dvy.end(), t.b.poison);
          std::fill(dvx.begin(), dvx.end(), t.b.poison);
          for (int i = 0; i < 4; ++i) {
            if (t.b.valid[i] == 0.f) continue;
            const T* xp = xn + t.b.corner[i] * s.c + g * cg;
            for (int64_t c = 0; c < cg; ++c) {
              const float xv = ToFloat(xp[c]);
              val[c] += t.wgt[i] * xv;
              dvy[c] += wy[i] * xv;
              dvx[c] += wx[i] * xv;
            }
          }
          float sum_val = 0.f, sum_dy = 0.f, sum_dx = 0.f;
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
  std::vector<float> weight_partial(s.n * taps * cm, 0.f);
  parallel(s.n * blocks, [&](int64_t task) {
    const int64_t n = task / blocks;
    const int64_t c_begin = (task % blocks) * kChannelBlock;
    const int64_t c_end = std::min(s.c, c_begin + kChannelBlock);
    const T* xn = x + n * hw * s.c;
    float* gxn = grad_x + n * hw * s.c;
    float* wpart = &weight_partial[n * taps * cm];
    for (int64_t p = 0; p < hw; ++p) {
      std::fill(gxn + p * s.c + c_begin, gxn + p * s.c + c_end, 0.f);
    }
    std::vector<float> gy(cm), gcol(kChannelBlock), val(kChannelBlock);
    for (int64_t oy = 0; oy < s.ho; ++oy) {
      for (int64_t ox = 0; ox < s.wo; ++ox) {
        const int64_t pixel = (n * s.ho + oy) * s.wo + ox;
        for (int64_t o = c_begin * m; o < c_end * m; ++o) {
          gy[o] = ToFloat(grad_y[pixel * cm + o]);
        }
        for (int64_t g = c_begin / cg; g * cg < c_end; ++g) {
          const int64_t c0 = std::max(c_begin, g * cg);
          const int64_t count = std::min(c_end, (g + 1) * cg) - c0;
          for (int64_t k = 0; k < taps; ++k) {
            const Tap t = MakeTap(s, offset, mask, pixel, oy, ox, g, k);
            const float* wk = &wf[k * cm];
            ColumnGrad(s, wk, gy.data(), c0, count, gcol.data());
            for (int i = 0; i < 4; ++i) {
              if (t.b.valid[i] == 0.f) continue;
              float* gxp = gxn + t.b.corner[i] * s.c + c0;
              const float w = t.mask * t.wgt[i];
              for (int64_t c = 0; c < count; ++c) gxp[c] += w * gcol[c];
            }
            Interpolate(s, t, xn, c0, count, val.data());
            float* wp = wpart + k * cm;
            for (int64_t c = 0; c < count; ++c) {
              const float v = t.mask * val[c];
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
      float sum = 0.f;
      for (int64_t n = 0; n < s.n; ++n) sum += weight_partial[n * wsize + i];
      grad_weight[i] = sum;
    }
  });
}

#define JAX_DEFORM_INSTANTIATE(T)                                              \
  template void ForwardCpu<T>(const ConvShape&, const T*, const T*, const T*,  \
                              const T*, const T*, T*, const ParallelFor&);     \
  template void BackwardCpu<T>(const ConvShape&, const T*, const T*, const T*, \
                               const T*, const T*, float*, float*, float*,     \
                               float*, const ParallelFor&);
JAX_DEFORM_INSTANTIATE(float)
JAX_DEFORM_INSTANTIATE(BFloat16)
JAX_DEFORM_INSTANTIATE(Float16)
#undef JAX_DEFORM_INSTANTIATE

}  // namespace jax_deform
