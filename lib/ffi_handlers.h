// The FFI handler symbols this library exports, one per (kernel, platform).
#ifndef JAX_DEFORM_FFI_HANDLERS_H_
#define JAX_DEFORM_FFI_HANDLERS_H_

#include "xla/ffi/api/api.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxDeformForwardCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxDeformBackwardCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxDeformTangentCpu);
#ifdef JAX_DEFORM_WITH_CUDA
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxDeformForwardCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxDeformBackwardCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxDeformTangentCuda);
#endif

#endif  // JAX_DEFORM_FFI_HANDLERS_H_
