// The element types the kernels take, and the one dispatch from a runtime
// dtype to a C++ type that the CPU and CUDA code share. Free of XLA and CUDA:
// each side names its own 16-bit storage types.
#ifndef JAX_DEFORM_DTYPES_H_
#define JAX_DEFORM_DTYPES_H_

namespace jax_deform {

enum class Dtype { kF32, kBF16, kF16, kF64 };

// Calls fn(T{}) with T the C++ type of `dtype` (float, Types::BFloat16,
// Types::Float16, double) and returns what it returns.
template <typename Types, typename Fn>
decltype(auto) DispatchDtype(Dtype dtype, Fn&& fn) {
  switch (dtype) {
    case Dtype::kF32: return fn(float{});
    case Dtype::kBF16: return fn(typename Types::BFloat16{});
    case Dtype::kF16: return fn(typename Types::Float16{});
    case Dtype::kF64: break;
  }
  return fn(double{});
}

}  // namespace jax_deform

#endif  // JAX_DEFORM_DTYPES_H_
