// CPU kernels of depthwise deformable convolution (NHWC), free of XLA and
// Python so they can be tested and reused on their own.
#ifndef JAX_DEFORM_CPU_KERNELS_H_
#define JAX_DEFORM_CPU_KERNELS_H_

#include <cstdint>
#include <functional>

#include "cpu_dtypes.h"
#include "deform_math.h"

namespace jax_deform {

// Runs body(i) for every i in [0, count), possibly on several threads. The
// kernels only ever split work so that each task writes its own outputs, so
// the result never depends on how tasks are scheduled.
using ParallelFor =
    std::function<void(int64_t count, const std::function<void(int64_t)>& body)>;

// y[n, oy, ox, c*M + j] = bias + sum_k mask * sample(x[n, :, :, c]) * weight[k, c*M + j],
// computed in Accum<T>: float32 for float32 and the 16-bit types, float64 for float64.
// mask and bias may be null. weight is (kh, kw, 1, C*M).
template <typename T>
void ForwardCpu(const ConvShape& s, const T* x, const T* offset, const T* mask,
                const T* weight, const T* bias, T* y, const ParallelFor& parallel);

// Gradients for x (N,H,W,C), offset, mask (if s.has_mask) and weight
// (kh*kw, C*M), all in Accum<T> (float32; float64 for float64 operands);
// grad_bias is a plain reduction left to XLA.
template <typename T>
void BackwardCpu(const ConvShape& s, const T* x, const T* offset, const T* mask,
                 const T* weight, const T* grad_y, Accum<T>* grad_x,
                 Accum<T>* grad_offset, Accum<T>* grad_mask, Accum<T>* grad_weight,
                 const ParallelFor& parallel);

// Forward mode: the tangent of y (without bias) along (x_dot, offset_dot,
// mask_dot, weight_dot), shaped like y; mask and mask_dot are null together.
// One pass: the sample, its tangent along x_dot and its derivatives along the
// sample position share each tap's geometry.
template <typename T>
void TangentCpu(const ConvShape& s, const T* x, const T* offset, const T* mask, const T* weight,
                const T* x_dot, const T* offset_dot, const T* mask_dot, const T* weight_dot,
                T* y_dot, const ParallelFor& parallel);

}  // namespace jax_deform

#endif  // JAX_DEFORM_CPU_KERNELS_H_
