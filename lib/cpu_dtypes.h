// 16-bit float storage types for the CPU kernels, converted to and from
// float32 (the kernels accumulate in float32; float64 in float64).
// Bit-exact round-to-nearest-even.
#ifndef JAX_DEFORM_CPU_DTYPES_H_
#define JAX_DEFORM_CPU_DTYPES_H_

#include <cstdint>
#include <cstring>

#include "deform_math.h"

namespace jax_deform {

struct BFloat16 {
  uint16_t bits;
};
struct Float16 {
  uint16_t bits;
};

inline float FloatBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t BitsOf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float ToFloat(float v) { return v; }
inline float ToFloat(BFloat16 v) { return FloatBits(uint32_t{v.bits} << 16); }
inline float ToFloat(Float16 v) {
  const uint32_t sign = uint32_t{v.bits & 0x8000u} << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1fu;
  const uint32_t man = v.bits & 0x3ffu;
  if (exp == 0x1f) return FloatBits(sign | 0x7f800000u | (man << 13));  // inf/NaN
  if (exp != 0) return FloatBits(sign | ((exp + 112) << 23) | (man << 13));
  // Subnormal half: man * 2^-24, exact in float.
  const float mag = static_cast<float>(man) * (1.0f / 16777216.0f);
  return sign ? -mag : mag;
}

template <typename T>
T FromFloat(float f);

template <>
inline float FromFloat<float>(float f) {
  return f;
}
template <>
inline BFloat16 FromFloat<BFloat16>(float f) {
  uint32_t u = BitsOf(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return BFloat16{uint16_t(u >> 16)};
}
template <>
inline Float16 FromFloat<Float16>(float f) {
  const uint32_t u = BitsOf(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return Float16{uint16_t(sign | 0x7e00u)};   // NaN
  if (abs >= 0x477ff000u) return Float16{uint16_t(sign | 0x7c00u)};  // overflow to inf
  if (abs < 0x38800000u) {
    // Subnormal or zero in half: round abs / 2^-24 to nearest even integer.
    const float scaled = FloatBits(abs) * 16777216.0f;
    uint32_t m = static_cast<uint32_t>(scaled);
    const float rem = scaled - static_cast<float>(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return Float16{uint16_t(sign | m)};
  }
  uint32_t r = abs - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return Float16{uint16_t(sign | (r >> 13))};
}

template <typename T>
inline Accum<T> ToAccum(T v) {
  return ToFloat(v);
}
template <>
inline double ToAccum<double>(double v) {
  return v;
}

template <typename T>
inline T FromAccum(Accum<T> v) {
  return FromFloat<T>(v);
}
template <>
inline double FromAccum<double>(double v) {
  return v;
}

// The CPU kernels' 16-bit types, for DispatchDtype (dtypes.h).
struct CpuTypes {
  using BFloat16 = jax_deform::BFloat16;
  using Float16 = jax_deform::Float16;
};

}  // namespace jax_deform

#endif  // JAX_DEFORM_CPU_DTYPES_H_
