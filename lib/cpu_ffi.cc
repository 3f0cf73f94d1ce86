// XLA FFI handlers for the CPU kernels: decode buffers, dispatch on dtype,
// run on XLA's intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>

#include "cpu_dtypes.h"
#include "cpu_kernels.h"
#include "ffi_handlers.h"
#include "ffi_shapes.h"

namespace jax_deform {
namespace {

// Work-sharing loop over XLA's thread pool. Scheduled helpers may start after
// the loop is already done (the pool can be busy); they then find no work and
// touch only the shared state they keep alive.
ParallelFor PoolParallelFor(ffi::ThreadPool& pool) {
  return [&pool](int64_t count, const std::function<void(int64_t)>& body) {
    const int64_t helpers = std::min<int64_t>(pool.num_threads(), count - 1);
    if (helpers <= 0) {
      for (int64_t i = 0; i < count; ++i) body(i);
      return;
    }
    struct State {
      std::atomic<int64_t> next{0}, done{0};
      std::mutex mu;
      std::condition_variable cv;
    };
    auto state = std::make_shared<State>();
    const auto* fn = &body;
    auto run = [state, fn, count]() {
      int64_t finished = 0;
      for (int64_t i; (i = state->next.fetch_add(1)) < count; ++finished) (*fn)(i);
      if (finished > 0 && state->done.fetch_add(finished) + finished == count) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    };
    for (int64_t i = 0; i < helpers; ++i) pool.Schedule([run] { run(); });
    run();
    std::unique_lock<std::mutex> lock(state->mu);
    state->cv.wait(lock, [&] { return state->done.load() == count; });
  };
}

template <typename T>
const T* DataOrNull(const ffi::AnyBuffer& b) {
  return b.element_count() > 0 ? static_cast<const T*>(b.untyped_data()) : nullptr;
}

template <typename T>
void RunForward(const ConvShape& s, ffi::AnyBuffer x, ffi::AnyBuffer offset,
                ffi::AnyBuffer mask, ffi::AnyBuffer weight, ffi::AnyBuffer bias,
                ffi::Result<ffi::AnyBuffer>& y, const ParallelFor& parallel) {
  ForwardCpu<T>(s, DataOrNull<T>(x), DataOrNull<T>(offset), DataOrNull<T>(mask),
                DataOrNull<T>(weight), DataOrNull<T>(bias),
                static_cast<T*>(y->untyped_data()), parallel);
}

template <typename T>
void RunBackward(const ConvShape& s, ffi::AnyBuffer x, ffi::AnyBuffer offset,
                 ffi::AnyBuffer mask, ffi::AnyBuffer weight, ffi::AnyBuffer grad_y,
                 void* gx, void* goffset, void* gmask, void* gweight,
                 const ParallelFor& parallel) {
  using G = Accum<T>;
  BackwardCpu<T>(s, DataOrNull<T>(x), DataOrNull<T>(offset), DataOrNull<T>(mask),
                 DataOrNull<T>(weight), DataOrNull<T>(grad_y), static_cast<G*>(gx),
                 static_cast<G*>(goffset), static_cast<G*>(gmask), static_cast<G*>(gweight),
                 parallel);
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer offset,
                       ffi::AnyBuffer mask, ffi::AnyBuffer weight, ffi::AnyBuffer bias,
                       ffi::Result<ffi::AnyBuffer> y, int64_t stride_h, int64_t stride_w,
                       int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w) {
  ConvShape s;
  ffi::Error err = MakeConvShape(x, offset, mask, weight,
                                 {stride_h, stride_w, pad_h, pad_w, dil_h, dil_w}, &s);
  if (err.failure()) return err;
  if (s.n * s.ho * s.wo == 0) return ffi::Error::Success();
  Dtype dtype;
  if (err = ToDtype(x.element_type(), &dtype); err.failure()) return err;
  const ParallelFor parallel = PoolParallelFor(pool);
  DispatchDtype<CpuTypes>(dtype, [&](auto zero) {
    RunForward<decltype(zero)>(s, x, offset, mask, weight, bias, y, parallel);
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer offset,
                        ffi::AnyBuffer mask, ffi::AnyBuffer weight, ffi::AnyBuffer grad_y,
                        ffi::Result<ffi::AnyBuffer> grad_x,
                        ffi::Result<ffi::AnyBuffer> grad_offset,
                        ffi::Result<ffi::AnyBuffer> grad_mask,
                        ffi::Result<ffi::AnyBuffer> grad_weight, int64_t stride_h,
                        int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                        int64_t dil_w, bool /*deterministic: the CPU path always is*/) {
  ConvShape s;
  ffi::Error err = MakeConvShape(x, offset, mask, weight,
                                 {stride_h, stride_w, pad_h, pad_w, dil_h, dil_w}, &s);
  if (err.failure()) return err;
  err = CheckGradTypes(x.element_type(), {grad_x->element_type(), grad_offset->element_type(),
                                          grad_mask->element_type(),
                                          grad_weight->element_type()});
  if (err.failure()) return err;
  void* gx = grad_x->untyped_data();
  void* goffset = grad_offset->untyped_data();
  void* gmask = s.has_mask ? grad_mask->untyped_data() : nullptr;
  void* gweight = grad_weight->untyped_data();
  if (s.n * s.ho * s.wo == 0) {
    std::memset(gx, 0, grad_x->size_bytes());  // all-zero bits: 0.0 in float32 and float64
    std::memset(gweight, 0, grad_weight->size_bytes());
    return ffi::Error::Success();
  }
  Dtype dtype;
  if (err = ToDtype(x.element_type(), &dtype); err.failure()) return err;
  const ParallelFor parallel = PoolParallelFor(pool);
  DispatchDtype<CpuTypes>(dtype, [&](auto zero) {
    RunBackward<decltype(zero)>(s, x, offset, mask, weight, grad_y, gx, goffset, gmask, gweight,
                                parallel);
  });
  return ffi::Error::Success();
}

template <typename T>
void RunTangent(const ConvShape& s, const ffi::AnyBuffer* in[8], void* y_dot,
                const ParallelFor& parallel) {
  TangentCpu<T>(s, DataOrNull<T>(*in[0]), DataOrNull<T>(*in[1]), DataOrNull<T>(*in[2]),
                DataOrNull<T>(*in[3]), DataOrNull<T>(*in[4]), DataOrNull<T>(*in[5]),
                DataOrNull<T>(*in[6]), DataOrNull<T>(*in[7]), static_cast<T*>(y_dot), parallel);
}

ffi::Error TangentImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer offset,
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
  const ffi::AnyBuffer* in[8] = {&x, &offset, &mask, &weight,
                                 &x_dot, &offset_dot, &mask_dot, &weight_dot};
  const ParallelFor parallel = PoolParallelFor(pool);
  void* out = y_dot->untyped_data();
  Dtype dtype;
  if (err = ToDtype(x.element_type(), &dtype); err.failure()) return err;
  DispatchDtype<CpuTypes>(dtype, [&](auto zero) { RunTangent<decltype(zero)>(s, in, out, parallel); });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_deform

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxDeformTangentCpu, jax_deform::TangentImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .JAX_DEFORM_TANGENT_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxDeformForwardCpu, jax_deform::ForwardImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .JAX_DEFORM_FORWARD_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxDeformBackwardCpu, jax_deform::BackwardImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .JAX_DEFORM_BACKWARD_OPERANDS
                                  .JAX_DEFORM_CONV_ATTRS.Attr<bool>("deterministic"));
