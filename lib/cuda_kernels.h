// CUDA kernels of depthwise deformable convolution (NHWC), free of XLA so the
// launch logic can be read and tested on its own.
#ifndef JAX_DEFORM_CUDA_KERNELS_H_
#define JAX_DEFORM_CUDA_KERNELS_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "deform_math.h"
#include "dtypes.h"

namespace jax_deform {

// y = deformable depthwise conv; mask and bias may be null.
cudaError_t LaunchForwardCuda(cudaStream_t stream, Dtype dtype, const ConvShape& s,
                              const void* x, const void* offset, const void* mask,
                              const void* weight, const void* bias, void* y);

// y_dot = the forward-mode tangent of y along (x_dot, offset_dot, mask_dot,
// weight_dot), all of x's dtype; mask and mask_dot may be null (no mask).
cudaError_t LaunchTangentCuda(cudaStream_t stream, Dtype dtype, const ConvShape& s, const void* x,
                              const void* offset, const void* mask, const void* weight,
                              const void* x_dot, const void* offset_dot, const void* mask_dot,
                              const void* weight_dot, void* y_dot);

// Bytes of device scratch LaunchBackwardCuda needs for this shape on this device.
size_t BackwardScratchBytes(const ConvShape& s, Dtype dtype, bool deterministic);

// The scratch a program sized now needs on any GPU of up to kPortableSmCount
// SMs (an exported program may run on another GPU than the one it was
// lowered on): at least BackwardScratchBytes on each of them.
constexpr int kPortableSmCount = 256;
size_t PortableBackwardScratchBytes(const ConvShape& s, Dtype dtype, bool deterministic);

// BackwardScratchBytes on a GPU of sm_count SMs; small_grid: the sample
// kernel's small-grid slices by its rule (-1) or never (0).
size_t BackwardScratchBytesForSms(const ConvShape& s, Dtype dtype, bool deterministic, int sm_count,
                                  int small_grid = -1);

// Whether the deterministic backward's 32-bit sample and cell indices cover s.
bool DeterministicBackwardFits(const ConvShape& s);

// Gradients for x, offset, mask (if s.has_mask) and weight (kh*kw, C*M): float32,
// or float64 (computed in float64) for kF64. `scratch` holds BackwardScratchBytes(s, dtype, deterministic) bytes.
// grad_offset, grad_mask and grad_weight are always computed in a fixed order;
// `deterministic` also makes grad_x free of float atomics (a sorted gather).
cudaError_t LaunchBackwardCuda(cudaStream_t stream, Dtype dtype, const ConvShape& s,
                               bool deterministic, const void* x, const void* offset,
                               const void* mask, const void* weight, const void* grad_y,
                               void* grad_x, void* grad_offset, void* grad_mask,
                               void* grad_weight, void* scratch);

}  // namespace jax_deform

#endif  // JAX_DEFORM_CUDA_KERNELS_H_
