// Forward-mode (tangent) kernel of depthwise deformable convolution, channels
// last: y_dot for tangents of x, offset, mask and weight in one pass, the CUDA
// counterpart of TangentCpu (cpu_kernels.cc), with the same arithmetic:
//   y_dot = sum_k weight_dot_k * mask * val
//         + weight_k * (mask_dot * val + mask * (val(x_dot) + dval/dy * dy_dot + dval/dx * dx_dot)).
// One thread per (output pixel, V consecutive output channels): V = 16 bytes
// of channels when the depth multiplier is 1 and the group's channels divide
// into vectors, else 1. Each thread makes its taps' geometry itself (the
// threads of one pixel read the same offsets, through L1): simpler than the
// forward's shared tap table, and forward mode is not the hot path of training.
#include "cuda_common.cuh"

namespace jax_deform {
namespace {

using namespace cuda_detail;  // NOLINT: this file's own helpers

constexpr int kTangentThreads = 256;

template <typename T, int V>
__global__ void __launch_bounds__(kTangentThreads)
    TangentKernel(ConvShape s, const T* __restrict__ x, const T* __restrict__ offset,
                  const T* __restrict__ mask, const T* __restrict__ weight,
                  const T* __restrict__ x_dot, const T* __restrict__ offset_dot,
                  const T* __restrict__ mask_dot, const T* __restrict__ weight_dot,
                  T* __restrict__ y_dot) {
  using A = Accum<T>;
  const int64_t cm = s.out_channels(), units = cm / V, cg = s.channels_per_group();
  const int64_t total = s.n * s.ho * s.wo * units, hw = s.h * s.w;
  const int64_t taps = s.taps();
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t pixel = e / units, o = (e % units) * V;  // first output channel
    const int64_t c = o / s.multiplier, g = c / cg;         // its input channel and group
    const int64_t image_start = DecodePixel(s, pixel).image * hw * s.c;
    const T* xc = x + image_start + c;
    const T* xdc = x_dot + image_start + c;
    A acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = A(0);
    for (int64_t k = 0; k < taps; ++k) {
      const TapGeometryOf<A> t = MakeGeometry(s, offset, mask, pixel, g, k);
      const BilinearOf<A> b = ToBilinear(t);
      A wgt[4], wy[4], wx[4];
      CornerWeights(b, wgt);
      CornerWeightGrads(b, wy, wx);
      const int64_t oi = OffsetIndex(s, pixel, g, k);
      const A dy_dot = ToF(offset_dot[oi]), dx_dot = ToF(offset_dot[oi + 1]);
      const A m_dot = mask_dot ? ToF(mask_dot[MaskIndex(s, pixel, g, k)]) : A(0);
      // With V == 1 the M output channels of input channel c share its sample.
      A val[V], dvy[V], dvx[V], val_dot[V];
#pragma unroll
      for (int v = 0; v < V; ++v) val[v] = dvy[v] = dvx[v] = val_dot[v] = t.poison;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (!((t.valid >> i) & 1u)) continue;
        const int64_t at = static_cast<int64_t>(t.corner[i]) * s.c;
        A xv[V], xdv[V];
        LoadVec<T, V>(xc + at, xv);
        LoadVec<T, V>(xdc + at, xdv);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          val[v] += wgt[i] * xv[v];
          dvy[v] += wy[i] * xv[v];
          dvx[v] += wx[i] * xv[v];
          val_dot[v] += wgt[i] * xdv[v];
        }
      }
      A w[V], wd[V];
      LoadVec<T, V>(weight + k * cm + o, w);
      LoadVec<T, V>(weight_dot + k * cm + o, wd);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const A sample_dot = val_dot[v] + dvy[v] * dy_dot + dvx[v] * dx_dot;
        const A by_weight = t.mask * val[v];
        const A by_rest = m_dot * val[v] + t.mask * sample_dot;
        acc[v] += wd[v] * by_weight + w[v] * by_rest;
      }
    }
    StoreVec<T, V>(y_dot + pixel * cm + o, acc);
  }
}

template <typename T>
cudaError_t Tangent(cudaStream_t stream, const ConvShape& s, const T* x, const T* offset,
                    const T* mask, const T* weight, const T* x_dot, const T* offset_dot,
                    const T* mask_dot, const T* weight_dot, T* y_dot) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectors = s.multiplier == 1 && s.channels_per_group() % kVec == 0;
  const int64_t units = s.out_channels() / (vectors ? kVec : 1);
  const int64_t threads = s.n * s.ho * s.wo * units;
  const int64_t blocks =
      std::min<int64_t>((threads + kTangentThreads - 1) / kTangentThreads, 64 * SmCount());
  if (vectors) {
    TangentKernel<T, kVec><<<blocks, kTangentThreads, 0, stream>>>(
        s, x, offset, mask, weight, x_dot, offset_dot, mask_dot, weight_dot, y_dot);
  } else {
    TangentKernel<T, 1><<<blocks, kTangentThreads, 0, stream>>>(
        s, x, offset, mask, weight, x_dot, offset_dot, mask_dot, weight_dot, y_dot);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchTangentCuda(cudaStream_t stream, Dtype dtype, const ConvShape& s, const void* x,
                              const void* offset, const void* mask, const void* weight,
                              const void* x_dot, const void* offset_dot, const void* mask_dot,
                              const void* weight_dot, void* y_dot) {
  return DispatchDtype<CudaTypes>(dtype, [&](auto zero) {
    using T = decltype(zero);
    auto in = [](const void* p) { return static_cast<const T*>(p); };
    return Tangent(stream, s, in(x), in(offset), in(mask), in(weight), in(x_dot), in(offset_dot),
                   in(mask_dot), in(weight_dot), static_cast<T*>(y_dot));
  });
}

}  // namespace jax_deform
