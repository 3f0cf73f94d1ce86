// The one Python binding module: hands XLA the FFI handlers as capsules.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>

#include "ffi_handlers.h"
#ifdef JAX_DEFORM_WITH_CUDA
#include "cuda_kernels.h"
#endif

// Set by CMakeLists.txt for CUDA builds.
#ifndef JAX_DEFORM_CUDA_ARCHITECTURES
#define JAX_DEFORM_CUDA_ARCHITECTURES ""
#endif
#ifndef JAX_DEFORM_CUDA_COMPILER_VERSION
#define JAX_DEFORM_CUDA_COMPILER_VERSION ""
#endif

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule Capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_jax_deform, m) {
  // Target names carry the version of their calling convention (operands,
  // results, attributes, semantics); README "Saving and exporting" states what
  // is promised. A changed convention gets a new name, and the handlers of the
  // old names stay registered. The unversioned names are what 0.1.0 lowered
  // to; they are aliases of _v1, kept so that its programs still run.
  m.def("registrations", []() {
    nb::dict cpu;
    cpu["jax_deform_forward_v1"] = Capsule(JaxDeformForwardCpu);
    cpu["jax_deform_backward_v1"] = Capsule(JaxDeformBackwardCpu);
    cpu["jax_deform_tangent_v1"] = Capsule(JaxDeformTangentCpu);
    cpu["jax_deform_forward"] = Capsule(JaxDeformForwardCpu);
    cpu["jax_deform_backward"] = Capsule(JaxDeformBackwardCpu);
    nb::dict out;
    out["cpu"] = cpu;
#ifdef JAX_DEFORM_WITH_CUDA
    nb::dict cuda;
    cuda["jax_deform_forward_v1"] = Capsule(JaxDeformForwardCuda);
    cuda["jax_deform_backward_v1"] = Capsule(JaxDeformBackwardCuda);
    cuda["jax_deform_tangent_v1"] = Capsule(JaxDeformTangentCuda);
    cuda["jax_deform_forward"] = Capsule(JaxDeformForwardCuda);
    cuda["jax_deform_backward"] = Capsule(JaxDeformBackwardCuda);
    out["CUDA"] = cuda;
#endif
    return out;
  }, "Maps platform name -> {FFI target name: handler capsule}.");
  m.def("build_info", []() {
    // Set by CMakeLists.txt from the architecture list the CUDA code was
    // compiled for: "sm_XY" is SASS, "compute_XY" PTX, comma-separated.
    nb::dict info;
    info["cuda_architectures"] = std::string(JAX_DEFORM_CUDA_ARCHITECTURES);
    info["cuda_compiler_version"] = std::string(JAX_DEFORM_CUDA_COMPILER_VERSION);
    return info;
  }, "What this build carries: CUDA architectures and the nvcc version (empty without CUDA).");
#ifdef JAX_DEFORM_WITH_CUDA
  m.def(
      "cuda_backward_workspace_bytes",
      [](int64_t n, int64_t h, int64_t w, int64_t c, int64_t ho, int64_t wo, int64_t kh,
         int64_t kw, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
         int64_t dil_h, int64_t dil_w, int64_t groups, int64_t multiplier,
         const std::string& dtype, bool deterministic, int64_t sm_count) {
        // The whole geometry: the kernels' plan (hence the workspace) depends on it.
        jax_deform::ConvShape s{};
        s.n = n, s.h = h, s.w = w, s.c = c, s.ho = ho, s.wo = wo, s.kh = kh, s.kw = kw;
        s.stride_h = stride_h, s.stride_w = stride_w, s.pad_h = pad_h, s.pad_w = pad_w;
        s.dil_h = dil_h, s.dil_w = dil_w;
        s.groups = groups;
        s.multiplier = multiplier;
        const auto t = dtype == "float32"    ? jax_deform::Dtype::kF32
                       : dtype == "bfloat16" ? jax_deform::Dtype::kBF16
                       : dtype == "float64"  ? jax_deform::Dtype::kF64
                                             : jax_deform::Dtype::kF16;
        // sm_count 0: enough for any GPU of up to kPortableSmCount SMs.
        return sm_count > 0 ? jax_deform::BackwardScratchBytesForSms(s, t, deterministic,
                                                                     static_cast<int>(sm_count))
                            : jax_deform::PortableBackwardScratchBytes(s, t, deterministic);
      },
      "Bytes of device workspace the CUDA backward kernel needs (on a GPU of sm_count SMs; 0: any).");
#endif
}
