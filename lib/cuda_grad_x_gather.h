// grad_x of the CUDA backward as a gather: every (output pixel, group, tap)
// sample whose position lies in the image adds to its four corners. Samples
// are sorted by their top-left corner (and tap, for the run gather) with a
// stable radix sort (so within those they stay in sample order, whatever the
// scheduling); each destination (image, input pixel, group) adds, across the
// channels of the group, the samples of the four cells whose corner 0, 1, 2
// and 3 it is, in a fixed order: a sub-warp per destination (the run gather)
// or per band of destinations whose sums it keeps in registers while it walks
// their cells (the band gather). No float atomics, bitwise reproducible, and
// grad_x is written exactly once.
#ifndef JAX_DEFORM_CUDA_GRAD_X_GATHER_H_
#define JAX_DEFORM_CUDA_GRAD_X_GATHER_H_

#include <cuda_runtime.h>

#include <cstddef>

#include "cuda_kernels.h"
#include "deform_math.h"

namespace jax_deform {
namespace cuda_detail {

// Destinations, cells and samples are indexed with 32 bits (the sort's item
// count with a signed int): false when this problem is too large for that.
bool GatherFits(const ConvShape& s);

// Bytes of device scratch GradXByGather needs (wide: for kF64).
size_t GatherScratchBytes(const ConvShape& s, bool wide = false);

// Writes every element of grad_x (N*H*W*C; float32, or float64 for kF64).
cudaError_t GradXByGather(cudaStream_t stream, Dtype dtype, const ConvShape& s, const void* offset,
                          const void* mask, const void* weight, const void* grad_y, void* grad_x,
                          void* scratch);

}  // namespace cuda_detail
}  // namespace jax_deform

#endif  // JAX_DEFORM_CUDA_GRAD_X_GATHER_H_
