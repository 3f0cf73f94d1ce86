// Drives the CUDA kernels directly, without XLA, on odd shapes and hostile
// offsets, for compute-sanitizer's memcheck, racecheck and initcheck:
//
//   nvcc -std=c++17 -O2 -arch=sm_90 --expt-relaxed-constexpr -I lib \
//       lib/cuda_forward.cu lib/cuda_backward.cu lib/cuda_grad_x_gather.cu benchmarks/sanitize_kernels.cu -o sanitize_kernels
//   compute-sanitizer --tool initcheck --error-exitcode 1 ./sanitize_kernels
//
// Every buffer is its own cudaMalloc, inputs are written only by cudaMemcpy and
// outputs not at all before the launch, so initcheck reports any read of memory
// nobody wrote (an output read before the kernels clear it, scratch read before
// it is filled). Inside a program run by XLA this is not checkable: buffers come
// from XLA's pool and writes by XLA's own kernels would have to be tracked too.
// Exits nonzero on any CUDA error or on NaN where all inputs are finite.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include "cuda_kernels.h"

namespace {

using jax_deform::ConvShape;
using jax_deform::Dtype;

struct Case {
  const char* why;
  int64_t n, h, w, c, groups, multiplier, kh, kw, stride, pad;
};

// The same odd shapes as benchmarks/sanitize.py, which runs them through XLA.
const Case kCases[] = {
    {"C not a multiple of 4 or 8", 2, 7, 9, 3, 1, 1, 3, 3, 1, 1},
    {"W = 1", 1, 5, 1, 6, 2, 1, 3, 3, 1, 1},
    {"H = 1, M = 2", 1, 1, 6, 12, 3, 2, 3, 3, 1, 1},
    {"1x1, G = C", 2, 8, 8, 8, 8, 1, 1, 1, 1, 0},
    {"7x7, stride 3", 1, 11, 10, 16, 1, 1, 7, 7, 3, 3},
    {"C = 520: vector path, a partial lane round", 2, 9, 9, 520, 1, 1, 3, 3, 2, 1},
    {"5x5, G = 2, 32 channels a group: 8-lane pixels, tap chunks", 1, 7, 6, 64, 2, 1, 5, 5, 1, 2},
    {"C = 64: 16-lane pixels, an odd pixel count", 1, 5, 7, 64, 1, 1, 3, 3, 1, 1},
    {"C = 96, 7x7: 8 lanes x 3 vectors a lane (sample_fit=1)", 1, 6, 7, 96, 1, 1, 7, 7, 1, 3},
    {"C = 144, 5x5: 16 lanes x 3 vectors, a partial round (sample_fit=1)", 1, 5, 6, 144, 1, 1, 5, 5, 1, 2},
    {"a grid under one wave: 16-pixel forward tiles, 16-lane sample slices", 1, 24, 32, 512, 1, 1, 3, 3, 1, 1},
};

void Check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(err));
    std::exit(1);
  }
}

ConvShape ShapeOf(const Case& k, bool has_mask) {
  ConvShape s;
  s.n = k.n, s.h = k.h, s.w = k.w, s.c = k.c;
  s.kh = k.kh, s.kw = k.kw;
  s.stride_h = s.stride_w = k.stride;
  s.pad_h = s.pad_w = k.pad;
  s.dil_h = s.dil_w = 1;
  s.ho = (k.h + 2 * k.pad - k.kh) / k.stride + 1;
  s.wo = (k.w + 2 * k.pad - k.kw) / k.stride + 1;
  s.groups = k.groups;
  s.multiplier = k.multiplier;
  s.has_mask = has_mask;
  return s;
}

// A device copy of `values` in the kernel's dtype, written by cudaMemcpy.
void* Upload(const std::vector<float>& values, Dtype dtype) {
  std::vector<__nv_bfloat16> rounded;
  const void* host = values.data();
  size_t bytes = values.size() * sizeof(float);
  if (dtype == Dtype::kBF16) {
    for (float v : values) rounded.push_back(__float2bfloat16(v));
    host = rounded.data();
    bytes = rounded.size() * sizeof(__nv_bfloat16);
  }
  void* device = nullptr;
  Check(cudaMalloc(&device, bytes), "cudaMalloc");
  Check(cudaMemcpy(device, host, bytes, cudaMemcpyHostToDevice), "upload");
  return device;
}

// Reads a float32 device buffer back and counts NaNs.
int64_t NansIn(const float* device, int64_t count) {
  std::vector<float> host(count);
  Check(cudaMemcpy(host.data(), device, count * sizeof(float), cudaMemcpyDeviceToHost), "read");
  int64_t nans = 0;
  for (float v : host) nans += std::isnan(v);
  return nans;
}

// Forward, backward and the forward-mode tangent, once. With finite inputs every output must be finite
// (a NaN would be an unwritten or wrongly read element); with hostile offsets
// only the sanitizer's verdict counts.
int RunOnce(const Case& k, Dtype dtype, bool deterministic, bool hostile, std::mt19937& gen) {
  const ConvShape s = ShapeOf(k, /*has_mask=*/true);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> unit;
  auto random = [&](int64_t count, bool positive = false) {
    std::vector<float> v(count);
    for (float& e : v) e = positive ? unit(gen) : normal(gen);
    return v;
  };
  std::vector<float> offset = random(s.n * s.ho * s.wo * s.offset_channels());
  for (size_t i = 0; i < offset.size(); ++i) {
    offset[i] *= 3.f;
    if (!hostile) continue;
    if (i % 7 == 0) offset[i] = 1e30f;
    if (i % 11 == 1) offset[i] = -std::numeric_limits<float>::infinity();
    if (i % 13 == 2) offset[i] = std::numeric_limits<float>::quiet_NaN();
    if (i % 5 == 3) offset[i] = (i % 2) ? 60.f : -60.f;
  }
  const int64_t x_count = s.n * s.h * s.w * s.c;
  const int64_t y_count = s.n * s.ho * s.wo * s.out_channels();
  const int64_t offset_count = static_cast<int64_t>(offset.size());
  const int64_t mask_count = s.n * s.ho * s.wo * s.mask_channels();
  const int64_t weight_count = s.taps() * s.out_channels();
  void* x = Upload(random(x_count), dtype);
  void* off = Upload(offset, dtype);
  void* mask = Upload(random(mask_count, true), dtype);
  void* weight = Upload(random(weight_count), dtype);
  void* bias = Upload(random(s.out_channels()), dtype);
  void* grad_y = Upload(random(y_count), dtype);
  // Tangents: hostile offset tangents too (they only scale derivatives).
  void* x_dot = Upload(random(x_count), dtype);
  void* off_dot = Upload(offset, dtype);
  void* mask_dot = Upload(random(mask_count), dtype);
  void* weight_dot = Upload(random(weight_count), dtype);
  const size_t elem = dtype == Dtype::kF32 ? sizeof(float) : sizeof(__nv_bfloat16);
  void* y = nullptr;
  void* y_dot = nullptr;
  float *grad_x = nullptr, *grad_offset = nullptr, *grad_mask = nullptr, *grad_weight = nullptr;
  void* scratch = nullptr;
  Check(cudaMalloc(&y, y_count * elem), "cudaMalloc");
  Check(cudaMalloc(&y_dot, y_count * elem), "cudaMalloc");
  Check(cudaMalloc(&grad_x, x_count * sizeof(float)), "cudaMalloc");
  Check(cudaMalloc(&grad_offset, offset_count * sizeof(float)), "cudaMalloc");
  Check(cudaMalloc(&grad_mask, mask_count * sizeof(float)), "cudaMalloc");
  Check(cudaMalloc(&grad_weight, weight_count * sizeof(float)), "cudaMalloc");
  const size_t scratch_bytes = jax_deform::BackwardScratchBytes(s, dtype, deterministic);
  Check(cudaMalloc(&scratch, scratch_bytes > 0 ? scratch_bytes : 1), "cudaMalloc");

  Check(jax_deform::LaunchForwardCuda(nullptr, dtype, s, x, off, mask, weight, bias, y),
        "forward launch");
  Check(jax_deform::LaunchBackwardCuda(nullptr, dtype, s, deterministic, x, off, mask, weight,
                                       grad_y, grad_x, grad_offset, grad_mask, grad_weight,
                                       scratch),
        "backward launch");
  Check(jax_deform::LaunchTangentCuda(nullptr, dtype, s, x, off, mask, weight, x_dot, off_dot,
                                      mask_dot, weight_dot, y_dot),
        "tangent launch");
  Check(cudaDeviceSynchronize(), "kernels");

  int failures = 0;
  if (!hostile) {
    const int64_t nans = NansIn(grad_x, x_count) + NansIn(grad_offset, offset_count) +
                         NansIn(grad_mask, mask_count) + NansIn(grad_weight, weight_count);
    if (nans > 0) {
      std::fprintf(stderr, "  %lld NaN gradient elements from finite inputs\n",
                   static_cast<long long>(nans));
      failures = 1;
    }
  }
  std::vector<char> y_host(y_count * elem);  // every y element must have been written
  Check(cudaMemcpy(y_host.data(), y, y_host.size(), cudaMemcpyDeviceToHost), "read y");
  for (void* p : {x, off, mask, weight, bias, grad_y, x_dot, off_dot, mask_dot, weight_dot, y, y_dot,
                  static_cast<void*>(grad_x),
                  static_cast<void*>(grad_offset), static_cast<void*>(grad_mask),
                  static_cast<void*>(grad_weight), scratch}) {
    Check(cudaFree(p), "cudaFree");
  }
  return failures;
}

}  // namespace

int main() {
  std::mt19937 gen(0);
  int failures = 0;
  for (const Case& k : kCases) {
    const int before = failures;
    for (Dtype dtype : {Dtype::kF32, Dtype::kBF16}) {
      for (bool deterministic : {false, true}) {
        for (bool hostile : {false, true}) {
          failures += RunOnce(k, dtype, deterministic, hostile, gen);
        }
      }
    }
    std::printf("%s: %s (N,H,W,C=%lld,%lld,%lld,%lld G=%lld M=%lld k=%lldx%lld s=%lld)\n",
                failures == before ? "ok" : "FAILED", k.why,
                static_cast<long long>(k.n), static_cast<long long>(k.h),
                static_cast<long long>(k.w), static_cast<long long>(k.c),
                static_cast<long long>(k.groups), static_cast<long long>(k.multiplier),
                static_cast<long long>(k.kh), static_cast<long long>(k.kw),
                static_cast<long long>(k.stride));
  }
  return failures == 0 ? 0 : 1;
}
