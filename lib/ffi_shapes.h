// Reads the convolution geometry off the FFI buffers and attributes, shared
// by the CPU and CUDA handlers. Python validates everything first; these
// checks only guard the kernels against a malformed custom call.
#ifndef JAX_DEFORM_FFI_SHAPES_H_
#define JAX_DEFORM_FFI_SHAPES_H_

#include <cstdint>
#include <initializer_list>
#include <string>

#include "deform_math.h"
#include "dtypes.h"
#include "xla/ffi/api/ffi.h"

namespace jax_deform {

namespace ffi = xla::ffi;

// The kernels' dtype of an FFI element type (the handlers then DispatchDtype).
inline ffi::Error ToDtype(ffi::DataType t, Dtype* out) {
  switch (t) {
    case ffi::DataType::F32: *out = Dtype::kF32; return ffi::Error::Success();
    case ffi::DataType::BF16: *out = Dtype::kBF16; return ffi::Error::Success();
    case ffi::DataType::F16: *out = Dtype::kF16; return ffi::Error::Success();
    case ffi::DataType::F64: *out = Dtype::kF64; return ffi::Error::Success();
    default: return ffi::Error::InvalidArgument("deform_conv2d: unsupported dtype");
  }
}

struct ConvAttrs {
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
};

inline ffi::Error MakeConvShape(const ffi::AnyBuffer& x, const ffi::AnyBuffer& offset,
                                const ffi::AnyBuffer& mask, const ffi::AnyBuffer& weight,
                                const ConvAttrs& a, ConvShape* s) {
  const auto xd = x.dimensions(), od = offset.dimensions(), wd = weight.dimensions();
  if (xd.size() != 4 || od.size() != 4 || wd.size() != 4) {
    return ffi::Error::InvalidArgument("deform_conv2d: x, offset and weight must be rank 4");
  }
  s->n = xd[0];
  s->h = xd[1];
  s->w = xd[2];
  s->c = xd[3];
  s->ho = od[1];
  s->wo = od[2];
  s->kh = wd[0];
  s->kw = wd[1];
  s->stride_h = a.stride_h;
  s->stride_w = a.stride_w;
  s->pad_h = a.pad_h;
  s->pad_w = a.pad_w;
  s->dil_h = a.dil_h;
  s->dil_w = a.dil_w;
  const int64_t taps = s->kh * s->kw;
  if (s->c <= 0 || taps <= 0 || od[3] % (2 * taps) != 0 || wd[3] % s->c != 0) {
    return ffi::Error::InvalidArgument("deform_conv2d: inconsistent channel counts");
  }
  s->groups = od[3] / (2 * taps);
  s->multiplier = wd[3] / s->c;
  s->has_mask = mask.element_count() > 0;
  if (s->groups <= 0 || s->c % s->groups != 0 || od[0] != s->n ||
      (s->has_mask && static_cast<int64_t>(mask.element_count()) !=
                          s->n * s->ho * s->wo * s->mask_channels())) {
    return ffi::Error::InvalidArgument("deform_conv2d: offset/mask shapes do not match x");
  }
  if (offset.element_type() != x.element_type() || weight.element_type() != x.element_type() ||
      (s->has_mask && mask.element_type() != x.element_type())) {
    return ffi::Error::InvalidArgument("deform_conv2d: all operands must share one dtype");
  }
  return ffi::Error::Success();
}

// The gradients' element type: float64 for float64 operands, else float32.
inline ffi::DataType GradType(ffi::DataType operand) {
  return operand == ffi::DataType::F64 ? ffi::DataType::F64 : ffi::DataType::F32;
}

// Checks that the backward's gradient results have GradType(x).
inline ffi::Error CheckGradTypes(ffi::DataType x, std::initializer_list<ffi::DataType> grads) {
  for (ffi::DataType g : grads) {
    if (g != GradType(x)) {
      return ffi::Error::InvalidArgument(
          "deform_conv2d: gradients must be float64 for float64 operands, else float32");
    }
  }
  return ffi::Error::Success();
}

// Checks that each tangent has its primal's shape and dtype (an absent mask
// has an absent tangent).
inline ffi::Error CheckTangents(std::initializer_list<const ffi::AnyBuffer*> primals,
                                std::initializer_list<const ffi::AnyBuffer*> tangents) {
  auto p = primals.begin();
  for (const ffi::AnyBuffer* t : tangents) {
    const ffi::AnyBuffer* primal = *p++;
    const auto pd = primal->dimensions(), td = t->dimensions();
    bool same = primal->element_type() == t->element_type() && pd.size() == td.size() &&
                primal->element_count() == t->element_count();
    for (size_t i = 0; same && i < pd.size(); ++i) same = pd[i] == td[i];
    if (!same) {
      return ffi::Error::InvalidArgument(
          "deform_conv2d tangent: each tangent must have its operand's shape and dtype");
    }
  }
  return ffi::Error::Success();
}

// What both tangent handlers check before launching: the convolution's shape,
// each tangent like its operand, and y_dot of x's dtype.
inline ffi::Error MakeTangentShape(const ffi::AnyBuffer& x, const ffi::AnyBuffer& offset,
                                   const ffi::AnyBuffer& mask, const ffi::AnyBuffer& weight,
                                   const ffi::AnyBuffer& x_dot, const ffi::AnyBuffer& offset_dot,
                                   const ffi::AnyBuffer& mask_dot,
                                   const ffi::AnyBuffer& weight_dot, ffi::DataType y_dot,
                                   const ConvAttrs& a, ConvShape* s) {
  ffi::Error err = MakeConvShape(x, offset, mask, weight, a, s);
  if (err.failure()) return err;
  err = CheckTangents({&x, &offset, &mask, &weight}, {&x_dot, &offset_dot, &mask_dot, &weight_dot});
  if (err.failure()) return err;
  if (y_dot != x.element_type()) {
    return ffi::Error::InvalidArgument("deform_conv2d tangent: y_dot must have x's dtype");
  }
  return ffi::Error::Success();
}

}  // namespace jax_deform

// The attributes every handler takes, in one place.
#define JAX_DEFORM_CONV_ATTRS                                                  \
  Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_h")   \
      .Attr<int64_t>("pad_w").Attr<int64_t>("dil_h").Attr<int64_t>("dil_w")

// Operands and results shared by the CPU and CUDA bindings (after their
// platform context): forward (x, offset, mask, weight, bias) -> y; backward
// (x, offset, mask, weight, grad_y) -> grads of x, offset, mask, weight (float32;
// float64 for float64 operands); forward mode (x, offset, mask, weight, x_dot,
// offset_dot, mask_dot, weight_dot) -> y_dot, shaped and typed like y.
// An absent mask or bias is an empty buffer.
#define JAX_DEFORM_CONV_OPERANDS                                               \
  Arg<xla::ffi::AnyBuffer>()                                                   \
      .Arg<xla::ffi::AnyBuffer>()                                              \
      .Arg<xla::ffi::AnyBuffer>()                                              \
      .Arg<xla::ffi::AnyBuffer>()
#define JAX_DEFORM_FORWARD_SIGNATURE                                           \
  JAX_DEFORM_CONV_OPERANDS.Arg<xla::ffi::AnyBuffer>()                          \
      .Ret<xla::ffi::AnyBuffer>()                                              \
      .JAX_DEFORM_CONV_ATTRS
#define JAX_DEFORM_BACKWARD_OPERANDS                                           \
  JAX_DEFORM_CONV_OPERANDS.Arg<xla::ffi::AnyBuffer>()                          \
      .Ret<xla::ffi::AnyBuffer>()                                              \
      .Ret<xla::ffi::AnyBuffer>()                                              \
      .Ret<xla::ffi::AnyBuffer>()                                              \
      .Ret<xla::ffi::AnyBuffer>()
#define JAX_DEFORM_TANGENT_SIGNATURE                                           \
  JAX_DEFORM_CONV_OPERANDS.JAX_DEFORM_CONV_OPERANDS                            \
      .Ret<xla::ffi::AnyBuffer>()                                              \
      .JAX_DEFORM_CONV_ATTRS

#endif  // JAX_DEFORM_FFI_SHAPES_H_
