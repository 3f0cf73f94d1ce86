// XLA FFI handlers for the CUDA kernels: decode buffers, check the limits of
// the kernels' index types, launch on the stream XLA gives.
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "cuda_kernels.h"
#include "ffi_handlers.h"
#include "ffi_shapes.h"

namespace jax_deform {
namespace {

// The kernels keep in-image pixel indices in 32 bits and put offset groups on
// the grid's y axis; everything else is indexed with 64 bits.
ffi::Error CheckLimits(const ConvShape& s) {
  if (s.h * s.w > std::numeric_limits<int32_t>::max() || s.groups > 65535) {
    return ffi::Error::InvalidArgument(
        "deform_conv2d (CUDA): H*W must be < 2^31 and offset groups <= 65535");
  }
  return ffi::Error::Success();
}

ffi::Error CudaError(cudaError_t err) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("deform_conv2d (CUDA): ") + cudaGetErrorString(err));
}

const void* DataOrNull(const ffi::AnyBuffer& b) {
  return b.element_count() > 0 ? b.untyped_data() : nullptr;
}

ffi::Error ForwardImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer offset,
                       ffi::AnyBuffer mask, ffi::AnyBuffer weight, ffi::AnyBuffer bias,
                       ffi::Result<ffi::AnyBuffer> y, int64_t stride_h, int64_t stride_w,
                       int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w) {
  ConvShape s;
  ffi::Error err = MakeConvShape(x, offset, mask, weight,
                                 {stride_h, stride_w, pad_h, pad_w, dil_h, dil_w}, &s);
  if (err.failure()) return err;
  if (s.n * s.ho * s.wo == 0) return ffi::Error::Success();
  if (err = CheckLimits(s); err.failure()) return err;
  Dtype dtype;
  if (err = ToDtype(x.element_type(), &dtype); err.failure()) return err;
  return CudaError(LaunchForwardCuda(stream, dtype, s, x.untyped_data(), offset.untyped_data(),
                                     DataOrNull(mask), weight.untyped_data(), DataOrNull(bias),
                                     y->untyped_data()));
}

ffi::Error BackwardImpl(cudaStream_t stream, ffi::AnyBuffer x,
                        ffi::AnyBuffer offset, ffi::AnyBuffer mask, ffi::AnyBuffer weight,
                        ffi::AnyBuffer grad_y, ffi::Result<ffi::AnyBuffer> grad_x,
                        ffi::Result<ffi::AnyBuffer> grad_offset,
                        ffi::Result<ffi::AnyBuffer> grad_mask,
                        ffi::Result<ffi::AnyBuffer> grad_weight,
                        ffi::Result<ffi::Buffer<ffi::U8>> workspace, int64_t stride_h,
                        int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                        int64_t dil_w, bool deterministic) {
  ConvShape s;
  ffi::Error err = MakeConvShape(x, offset, mask, weight,
                                 {stride_h, stride_w, pad_h, pad_w, dil_h, dil_w}, &s);
  if (err.failure()) return err;
  err = CheckGradTypes(x.element_type(), {grad_x->element_type(), grad_offset->element_type(),
                                          grad_mask->element_type(),
                                          grad_weight->element_type()});
  if (err.failure()) return err;
  if (s.n * s.ho * s.wo == 0) {  // all-zero bits: 0.0 in float32 and float64
    cudaMemsetAsync(grad_x->untyped_data(), 0, grad_x->size_bytes(), stream);
    return CudaError(
        cudaMemsetAsync(grad_weight->untyped_data(), 0, grad_weight->size_bytes(), stream));
  }
  if (err = CheckLimits(s); err.failure()) return err;
  if (deterministic && !DeterministicBackwardFits(s)) {
    return ffi::Error::InvalidArgument(
        "deform_conv2d (CUDA): the deterministic backward indexes samples with 32 bits; "
        "this problem is too large for it (use deterministic=False or split the batch)");
  }
  Dtype dtype;
  if (err = ToDtype(x.element_type(), &dtype); err.failure()) return err;
  if (workspace->size_bytes() < BackwardScratchBytes(s, dtype, deterministic)) {
    return ffi::Error::InvalidArgument("deform_conv2d (CUDA): workspace too small");
  }
  return CudaError(LaunchBackwardCuda(
      stream, dtype, s, deterministic, x.untyped_data(), offset.untyped_data(), DataOrNull(mask),
      weight.untyped_data(), grad_y.untyped_data(), grad_x->untyped_data(),
      grad_offset->untyped_data(), s.has_mask ? grad_mask->untyped_data() : nullptr,
      grad_weight->untyped_data(), workspace->typed_data()));
}

ffi::Error TangentImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer offset,
                       ffi::AnyBuffer mask, ffi::AnyBuffer weight, ffi::AnyBuffer x_dot,
                       ffi::AnyBuffer offset_dot, ffi::AnyBuffer mask_dot,
                       ffi::AnyBuffer weight_dot, ffi::Result<ffi::AnyBuffer> y_dot,
                       int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                       int64_t dil_h, int64_t dil_w) {
  ConvShape s;
  ffi::Error err = MakeTangentShape(x, offset, mask, weight, x_dot, offset_dot, mask_dot,
                                    weight_dot, y_dot->element_type(),
                                    {stride_h, stride_w, pad_h, pad_w, dil_h, dil_w}, &s);
  if (err.failure()) return err;
  if (s.n * s.ho * s.wo == 0) return ffi::Error::Success();
  if (err = CheckLimits(s); err.failure()) return err;
  Dtype dtype;
  if (err = ToDtype(x.element_type(), &dtype); err.failure()) return err;
  return CudaError(LaunchTangentCuda(stream, dtype, s, x.untyped_data(), offset.untyped_data(),
                                     DataOrNull(mask), weight.untyped_data(),
                                     x_dot.untyped_data(), offset_dot.untyped_data(),
                                     DataOrNull(mask_dot), weight_dot.untyped_data(),
                                     y_dot->untyped_data()));
}

}  // namespace
}  // namespace jax_deform

// The handlers only enqueue kernels and memsets on XLA's stream (no host
// synchronization, no allocation): safe to capture in command buffers.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxDeformForwardCuda, jax_deform::ForwardImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .JAX_DEFORM_FORWARD_SIGNATURE,
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxDeformBackwardCuda, jax_deform::BackwardImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .JAX_DEFORM_BACKWARD_OPERANDS
                                  .Ret<xla::ffi::Buffer<xla::ffi::U8>>()  // workspace
                                  .JAX_DEFORM_CONV_ATTRS.Attr<bool>("deterministic"),
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxDeformTangentCuda, jax_deform::TangentImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .JAX_DEFORM_TANGENT_SIGNATURE,
                              {xla::ffi::Traits::kCmdBufferCompatible});
