// Per-sample math of depthwise deformable convolution, shared by the CPU and
// CUDA kernels. Everything here is a small inline function on plain values so
// both compilers can inline it into their loops.
#ifndef JAX_DEFORM_DEFORM_MATH_H_
#define JAX_DEFORM_DEFORM_MATH_H_

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define DEFORM_HD __host__ __device__ __forceinline__
#else
#define DEFORM_HD inline
#endif

namespace jax_deform {

// The type the CPU and CUDA kernels compute and accumulate in for storage
// type T, and the type of the gradients they return: double for double, float
// for the rest (float32, bfloat16, float16).
template <typename T>
struct AccumFor {
  using type = float;
};
template <>
struct AccumFor<double> {
  using type = double;
};
template <typename T>
using Accum = typename AccumFor<T>::type;

// Geometry of a convolution; all sizes are per image (NHWC, channels last).
struct ConvShape {
  int64_t n, h, w, c;    // input
  int64_t ho, wo;        // output spatial size
  int64_t kh, kw;        // kernel
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t groups;        // offset groups G; C % G == 0
  int64_t multiplier;    // depth multiplier M: output channel c*M + j reads c
  bool has_mask;

  DEFORM_HD int64_t taps() const { return kh * kw; }
  DEFORM_HD int64_t channels_per_group() const { return c / groups; }
  DEFORM_HD int64_t out_channels() const { return c * multiplier; }
  // Last-dimension sizes of the offset and mask tensors.
  DEFORM_HD int64_t offset_channels() const { return 2 * groups * taps(); }
  DEFORM_HD int64_t mask_channels() const { return groups * taps(); }
};

// Where one tap of one output pixel samples the image, and with what weights.
// Corner order: (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1).
// F is the arithmetic type: float for float32 and the 16-bit types, double
// for float64.
template <typename F>
struct BilinearOf {
  int64_t corner[4];  // y * W + x, clamped into the image: always safe to read
  F valid[4];         // 1 where the corner lies inside the image, else 0
  F ly, lx;           // fractional position inside the cell
  F poison;           // NaN when the sample position is NaN, else 0
};
using Bilinear = BilinearOf<float>;

DEFORM_HD float FloorOf(float v) { return floorf(v); }
DEFORM_HD double FloorOf(double v) { return floor(v); }

// The sample counts only when -1 < y < H and -1 < x < W (torchvision's rule);
// +-inf, huge values and NaN fail these comparisons before any float-to-int
// conversion, so no conversion is ever undefined. A NaN position poisons the
// value it produces (the divergence must be visible) but reads nothing.
template <typename F>
DEFORM_HD BilinearOf<F> MakeBilinear(F py, F px, int64_t h, int64_t w) {
  BilinearOf<F> b;
  b.poison = (py != py || px != px) ? std::numeric_limits<F>::quiet_NaN() : F(0);
  b.ly = F(0);
  b.lx = F(0);
  for (int i = 0; i < 4; ++i) {
    b.corner[i] = 0;
    b.valid[i] = F(0);
  }
  if (!(py > F(-1) && py < static_cast<F>(h) && px > F(-1) &&
        px < static_cast<F>(w))) {
    return b;
  }
  const F fy = FloorOf(py);
  const F fx = FloorOf(px);
  const int64_t y0 = static_cast<int64_t>(fy);
  const int64_t x0 = static_cast<int64_t>(fx);
  b.ly = py - fy;
  b.lx = px - fx;
  const bool y0_in = y0 >= 0, y1_in = y0 + 1 < h;
  const bool x0_in = x0 >= 0, x1_in = x0 + 1 < w;
  const int64_t y0c = y0_in ? y0 : 0, y1c = y1_in ? y0 + 1 : h - 1;
  const int64_t x0c = x0_in ? x0 : 0, x1c = x1_in ? x0 + 1 : w - 1;
  b.corner[0] = y0c * w + x0c;
  b.corner[1] = y0c * w + x1c;
  b.corner[2] = y1c * w + x0c;
  b.corner[3] = y1c * w + x1c;
  b.valid[0] = (y0_in && x0_in) ? F(1) : F(0);
  b.valid[1] = (y0_in && x1_in) ? F(1) : F(0);
  b.valid[2] = (y1_in && x0_in) ? F(1) : F(0);
  b.valid[3] = (y1_in && x1_in) ? F(1) : F(0);
  return b;
}

// Interpolation weights of the four corners (zero outside the image).
template <typename F>
DEFORM_HD void CornerWeights(const BilinearOf<F>& b, F wgt[4]) {
  const F hy = F(1) - b.ly, hx = F(1) - b.lx;
  wgt[0] = hy * hx * b.valid[0];
  wgt[1] = hy * b.lx * b.valid[1];
  wgt[2] = b.ly * hx * b.valid[2];
  wgt[3] = b.ly * b.lx * b.valid[3];
}

// d(weight)/dy and d(weight)/dx of the four corners.
template <typename F>
DEFORM_HD void CornerWeightGrads(const BilinearOf<F>& b, F dy[4], F dx[4]) {
  const F hy = F(1) - b.ly, hx = F(1) - b.lx;
  dy[0] = -hx * b.valid[0];
  dy[1] = -b.lx * b.valid[1];
  dy[2] = hx * b.valid[2];
  dy[3] = b.lx * b.valid[3];
  dx[0] = -hy * b.valid[0];
  dx[1] = hy * b.valid[1];
  dx[2] = -b.ly * b.valid[2];
  dx[3] = b.ly * b.valid[3];
}

// Sample position of tap (i, j) at output pixel (oy, ox), offset (dy, dx).
template <typename F>
DEFORM_HD void SamplePosition(const ConvShape& s, int64_t oy, int64_t ox,
                              int64_t i, int64_t j, F dy, F dx, F* py, F* px) {
  *py = static_cast<F>(oy * s.stride_h - s.pad_h + i * s.dil_h) + dy;
  *px = static_cast<F>(ox * s.stride_w - s.pad_w + j * s.dil_w) + dx;
}

// Offsets are laid out [g][k][(dy, dx)] along the last axis, masks [g][k].
DEFORM_HD int64_t OffsetIndex(const ConvShape& s, int64_t pixel, int64_t g,
                              int64_t k) {
  return pixel * s.offset_channels() + (g * s.taps() + k) * 2;
}
DEFORM_HD int64_t MaskIndex(const ConvShape& s, int64_t pixel, int64_t g,
                            int64_t k) {
  return pixel * s.mask_channels() + g * s.taps() + k;
}

}  // namespace jax_deform

#endif  // JAX_DEFORM_DEFORM_MATH_H_
