// The one Python binding module: hands XLA the FFI handlers as capsules.
#include <nanobind/nanobind.h>

#include "ffi_handlers.h"

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule Capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_jax_deform, m) {
  m.def("registrations", []() {
    nb::dict cpu;
    cpu["jax_deform_forward"] = Capsule(JaxDeformForwardCpu);
    cpu["jax_deform_backward"] = Capsule(JaxDeformBackwardCpu);
    nb::dict out;
    out["cpu"] = cpu;
#ifdef JAX_DEFORM_WITH_CUDA
    nb::dict cuda;
    cuda["jax_deform_forward"] = Capsule(JaxDeformForwardCuda);
    cuda["jax_deform_backward"] = Capsule(JaxDeformBackwardCuda);
    out["CUDA"] = cuda;
#endif
    return out;
  }, "Maps platform name -> {FFI target name: handler capsule}.");
}
