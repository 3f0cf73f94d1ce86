// What the CUDA kernels share: dtype conversion (float32, bfloat16 and float16
// computed in float32; float64 in float64), 16-byte vector access, the
// per-(pixel, tap) sample geometry and how output tiles map onto blocks.
// Device helpers and small host helpers only; kernels live in one file per
// family (cuda_forward.cu, cuda_backward.cu, cuda_grad_x_gather.cu).
#ifndef JAX_DEFORM_CUDA_COMMON_CUH_
#define JAX_DEFORM_CUDA_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cuda_kernels.h"
#include "deform_math.h"

namespace jax_deform {
namespace cuda_detail {

constexpr int kMaxThreads = 256;
constexpr int kMaxTilePixels = 64;
constexpr size_t kGeometryBudget = 38 * 1024;  // shared memory for the tile geometry

__device__ __forceinline__ float ToF(float v) { return v; }
__device__ __forceinline__ float ToF(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToF(__half v) { return __half2float(v); }
__device__ __forceinline__ double ToF(double v) { return v; }

template <typename T>
__device__ __forceinline__ T FromF(float v);
template <>
__device__ __forceinline__ float FromF<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 FromF<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <>
__device__ __forceinline__ __half FromF<__half>(float v) { return __float2half(v); }

// An Accum<T> value as T.
template <typename T>
__device__ __forceinline__ T FromAcc(Accum<T> v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return FromF<T>(v);
  }
}

// V elements loaded or stored as one aligned access (16 bytes when V * sizeof(T) == 16).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V, typename A>
__device__ __forceinline__ void LoadVec(const T* __restrict__ p, A (&out)[V]) {
  const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(p);
  if constexpr (std::is_same_v<T, __nv_bfloat16> && V % 2 == 0) {
    // A bfloat16 is the top half of its float32: each 32-bit word of the
    // pack gives its first element by a shift and its second by a mask, one
    // instruction each, where the conversions the compiler makes take a
    // byte permute and a shift for the second (the bfloat16 kernels are
    // issue-bound, and this is a third of their conversions).
    unsigned words[V / 2];
    memcpy(words, &pack, sizeof(words));
#pragma unroll
    for (int i = 0; i < V / 2; ++i) {
      out[2 * i] = __uint_as_float(words[i] << 16);
      out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = ToF(pack.v[i]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void StoreVec(T* p, const Accum<T> (&in)[V]) {
  Pack<T, V> pack;
#pragma unroll
  for (int i = 0; i < V; ++i) pack.v[i] = FromAcc<T>(in[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pack;
}

// Adds V values to consecutive, V-aligned addresses (float4 atomics for
// float on sm_90, else one atomic per value).
template <int V, typename A>
__device__ __forceinline__ void AtomicAddVec(A* p, const A (&v)[V]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVector = std::is_same_v<A, float> && V % 4 == 0;
#else
  constexpr bool kVector = false;
#endif
  if constexpr (kVector) {
#pragma unroll
    for (int i = 0; i < V; i += 4) {
      atomicAdd(reinterpret_cast<float4*>(p + i),
                make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]));
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) atomicAdd(p + i, v[i]);
  }
}

// Geometry of one (pixel, tap) of a tile, computed once per block, in the
// arithmetic type A (float; double for double).
template <typename A>
struct TapGeometryOf {
  int corner[4];  // y * W + x inside the image, always safe to read
  A ly, lx;       // fractional position
  A mask;
  A poison;       // NaN for a NaN sample position, else 0
  unsigned valid; // bit i: corner i lies inside the image
};
using TapGeometry = TapGeometryOf<float>;

// What one (pixel, tap) reads from offset and mask: loaded apart from the
// geometry math so a kernel can issue the loads early (one pixel ahead).
template <typename A>
struct TapOperands {
  A dy, dx, mask;
};

template <typename T>
__device__ __forceinline__ TapOperands<Accum<T>> LoadTapOperands(
    const ConvShape& s, const T* __restrict__ offset, const T* __restrict__ mask, int64_t pixel,
    int64_t g, int64_t k) {
  const int64_t oi = OffsetIndex(s, pixel, g, k);
  return {ToF(offset[oi]), ToF(offset[oi + 1]),
          mask ? ToF(mask[MaskIndex(s, pixel, g, k)]) : Accum<T>(1)};
}

// An output pixel's image and position. 32-bit division wherever the pixel
// count allows (every realistic problem): 64-bit division is a long
// subroutine, and the geometry of each (pixel, tap) did several.
struct PixelAt {
  int64_t image, oy, ox;
};

__device__ __forceinline__ PixelAt DecodePixel(const ConvShape& s, int64_t pixel) {
  if (s.n * s.ho * s.wo <= INT32_MAX) {
    const unsigned p = static_cast<unsigned>(pixel), wo = static_cast<unsigned>(s.wo),
                   ho = static_cast<unsigned>(s.ho);
    const unsigned row = p / wo;
    return {row / ho, row % ho, p - row * wo};
  }
  return {pixel / (s.ho * s.wo), (pixel / s.wo) % s.ho, pixel % s.wo};
}

// Whether every sample position's whole part (output row * stride - padding
// + tap row * dilation, likewise the columns), and every output row, column
// and image, fits 32-bit arithmetic with room to spare: else the kernels
// that compute positions in 32 bits (SampleAt with int32_t) must not run.
// Only absurd strides, paddings or dilations fail it.
inline bool PositionsFit(const ConvShape& s) {
  constexpr int64_t kLimit = int64_t{1} << 30;
  for (const int64_t v : {s.n, s.h, s.w, s.ho, s.wo, s.kh, s.kw, s.stride_h, s.stride_w, s.pad_h,
                          s.pad_w, s.dil_h, s.dil_w}) {
    if (v < 0 || v >= kLimit) return false;
  }
  return (s.ho - 1) * s.stride_h + (s.kh - 1) * s.dil_h < kLimit &&
         (s.wo - 1) * s.stride_w + (s.kw - 1) * s.dil_w < kLimit;
}

// Where tap (tap_y, tap_x) of output pixel (image, oy, ox) samples x, given
// its offsets (dy, dx); tap_y is the tap's row * dilation - padding, tap_x
// likewise. Each corner's byte offset in x (image included; -1 where it lies
// outside the image), the fractional position and the poison (NaN for a NaN
// position, else 0). The rule of MakeBilinear (deform_math.h): the sample
// counts only where -1 < y < H and -1 < x < W, comparisons that fail for NaN
// and +-inf before any conversion. Integer arithmetic in Off, positions
// included: int32_t where x is under 2 GiB and PositionsFit, with no division
// (the kernels find the pixel and the tap's (tap_y, tap_x) by additions or
// tables, where DecodePixel and the tap's row and column cost four divisions
// a sample).
template <typename A, typename Off>
struct TapSampleOf {
  Off start[4];
  A ly, lx, poison;
};

template <typename T, typename Off, typename A>
__device__ __forceinline__ TapSampleOf<A, Off> SampleAt(const ConvShape& s, Off image, Off oy, Off ox,
                                                        Off tap_y, Off tap_x, A dy, A dx) {
  const Off h = static_cast<Off>(s.h), w = static_cast<Off>(s.w);
  const A py = static_cast<A>(oy * static_cast<Off>(s.stride_h) + tap_y) + dy;
  const A px = static_cast<A>(ox * static_cast<Off>(s.stride_w) + tap_x) + dx;
  TapSampleOf<A, Off> t;
  t.poison = (py != py || px != px) ? std::numeric_limits<A>::quiet_NaN() : A(0);
  t.ly = t.lx = A(0);
#pragma unroll
  for (int i = 0; i < 4; ++i) t.start[i] = Off(-1);
  if (py > A(-1) && py < static_cast<A>(h) && px > A(-1) && px < static_cast<A>(w)) {
    const A fy = FloorOf(py), fx = FloorOf(px);
    const Off y0 = static_cast<Off>(fy), x0 = static_cast<Off>(fx);
    t.ly = py - fy;
    t.lx = px - fx;
    const bool y0_in = y0 >= 0, y1_in = y0 + 1 < h, x0_in = x0 >= 0, x1_in = x0 + 1 < w;
    const Off pixel_bytes = static_cast<Off>(s.c * int64_t{sizeof(T)});
    // Negative (a row or column before the image) only where a corner is out.
    const Off base = ((static_cast<Off>(image) * h + y0) * w + x0) * pixel_bytes;
    if (y0_in && x0_in) t.start[0] = base;
    if (y0_in && x1_in) t.start[1] = base + pixel_bytes;
    if (y1_in && x0_in) t.start[2] = base + w * pixel_bytes;
    if (y1_in && x1_in) t.start[3] = base + (w + 1) * pixel_bytes;
  }
  return t;
}

template <typename A>
__device__ __forceinline__ TapGeometryOf<A> GeometryOf(const ConvShape& s, int64_t pixel, int64_t k,
                                                       const TapOperands<A>& in) {
  const PixelAt at = DecodePixel(s, pixel);
  const int tap = static_cast<int>(k), kw = static_cast<int>(s.kw);  // taps fit in int
  A py, px;
  SamplePosition(s, at.oy, at.ox, tap / kw, tap % kw, in.dy, in.dx, &py, &px);
  const BilinearOf<A> b = MakeBilinear(py, px, s.h, s.w);
  TapGeometryOf<A> t;
#pragma unroll
  for (int i = 0; i < 4; ++i) t.corner[i] = static_cast<int>(b.corner[i]);
  t.ly = b.ly;
  t.lx = b.lx;
  t.poison = b.poison;
  t.mask = in.mask;
  t.valid = (b.valid[0] != A(0)) | ((b.valid[1] != A(0)) << 1) | ((b.valid[2] != A(0)) << 2) |
            ((b.valid[3] != A(0)) << 3);
  return t;
}

template <typename T>
__device__ __forceinline__ TapGeometryOf<Accum<T>> MakeGeometry(
    const ConvShape& s, const T* __restrict__ offset, const T* __restrict__ mask, int64_t pixel,
    int64_t g, int64_t k) {
  return GeometryOf(s, pixel, k, LoadTapOperands(s, offset, mask, pixel, g, k));
}

template <typename A>
__device__ __forceinline__ BilinearOf<A> ToBilinear(const TapGeometryOf<A>& t) {
  BilinearOf<A> b;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    b.corner[i] = t.corner[i];
    b.valid[i] = (t.valid >> i) & 1u ? A(1) : A(0);
  }
  b.ly = t.ly;
  b.lx = t.lx;
  b.poison = t.poison;
  return b;
}

// Output tiles: tile_w x (pixels / tile_w) pixels of one image; tiles are
// numbered x fastest, then y, then image. Square-ish tiles keep the input
// footprint of a block (and so its L1 working set) small.
struct TileGrid {
  int pixels, width;
  int64_t tiles_x, tiles_y;
};

// Global output pixel index of tile-local pixel lp, or -1 past the edge.
// Tiles are numbered by blockIdx.x, so 32-bit division suffices.
__device__ __forceinline__ int64_t TilePixel(const ConvShape& s, const TileGrid& t, unsigned tile,
                                             int lp) {
  const unsigned tiles_x = static_cast<unsigned>(t.tiles_x), tiles_y = static_cast<unsigned>(t.tiles_y);
  const unsigned row = tile / tiles_x;
  const int64_t tx = tile - row * tiles_x, ty = row % tiles_y, image = row / tiles_y;
  const int64_t oy = ty * (t.pixels / t.width) + lp / t.width;
  const int64_t ox = tx * t.width + lp % t.width;
  return (oy < s.ho && ox < s.wo) ? (image * s.ho + oy) * s.wo + ox : -1;
}

// How a block splits its work; identical for forward and backward.
struct Plan {
  int vec;          // channels per thread access (V)
  int lanes;        // threads side by side along the channels of one pixel
  int tile_pixels;  // output pixels per block
  int threads;
  int64_t tiles;
  TileGrid grid;
};

inline int FloorPow2(int64_t v) {
  int p = 1;
  while (p * 2 <= v) p *= 2;
  return p;
}

// p with tiles of `pixels` output pixels (a power of two), about square.
inline Plan WithTilePixels(const ConvShape& s, Plan p, int pixels) {
  p.tile_pixels = pixels;
  p.threads = std::max(32, std::min(kMaxThreads, p.tile_pixels * p.lanes));
  p.grid.pixels = p.tile_pixels;
  p.grid.width = 1;
  while (p.grid.width * p.grid.width * 4 <= p.tile_pixels) p.grid.width *= 2;
  const int height = p.tile_pixels / p.grid.width;
  p.grid.tiles_x = (s.wo + p.grid.width - 1) / p.grid.width;
  p.grid.tiles_y = (s.ho + height - 1) / height;
  p.tiles = s.n * p.grid.tiles_x * p.grid.tiles_y;
  return p;
}

// wide: the kernels compute in double (float64), whose tap geometry and
// per-tap sums take more shared memory.
inline Plan MakePlan(const ConvShape& s, int max_vec, bool wide = false) {
  Plan p;
  const int64_t cg = s.channels_per_group();
  p.vec = (s.multiplier == 1 && cg % max_vec == 0) ? max_vec : 1;
  const int64_t vectors = cg / p.vec;
  p.lanes = FloorPow2(std::min<int64_t>(vectors, 32));
  const size_t per_tap = wide ? sizeof(TapGeometryOf<double>) + 3 * sizeof(double)
                              : sizeof(TapGeometry) + 3 * sizeof(float);
  const int64_t by_smem =
      static_cast<int64_t>(kGeometryBudget / (sizeof(int64_t) + s.taps() * per_tap));
  p.tile_pixels = FloorPow2(std::max<int64_t>(1, std::min<int64_t>(kMaxTilePixels, by_smem)));
  return WithTilePixels(s, p, p.tile_pixels);
}

// Fills the tile's pixel indices [tile_pixels] and geometry [tile_pixels][taps]
// in shared memory.
template <typename T>
__device__ void TileGeometry(const ConvShape& s, const TileGrid& tg, const T* __restrict__ offset,
                             const T* __restrict__ mask, int64_t g, int64_t* pixel_of,
                             TapGeometryOf<Accum<T>>* geom) {
  const int taps = static_cast<int>(s.taps());
  for (int lp = threadIdx.x; lp < tg.pixels; lp += blockDim.x) {
    pixel_of[lp] = TilePixel(s, tg, blockIdx.x, lp);
  }
  for (int e = threadIdx.x; e < tg.pixels * taps; e += blockDim.x) {
    const int64_t pixel = TilePixel(s, tg, blockIdx.x, e / taps);
    if (pixel >= 0) geom[e] = MakeGeometry(s, offset, mask, pixel, g, e % taps);
  }
}

// Kernel variants, for tuning runs: JAX_DEFORM_CUDA_TUNING="forward_min_blocks=1,
// forward_weights_in_registers=1,forward_tile=128,forward_splits=4,forward_lanes=8,sample_lanes=16,sample_rounds=2,sample_fit=1,sample_vec=4,
// backward_kernel=1,grad_x=gather,gather_vectors=1,gather_kernel=runs,gather_segment=8,gather_band_step=1,gather_band_vectors=1" (unset: the defaults below,
// chosen from measurements recorded in benchmarks/RESULTS.md). Read once.
struct Tuning {
  int forward_min_blocks = 0;            // blocks per SM the forward's registers allow; 0: default
  int forward_tile = 0;                  // forward output pixels a block (power of two); 0: default
  int forward_splits = 0;                // forward channel slices a group; 0: default
  int forward_lanes = 0;                 // forward lanes a pixel (power of two); 0: default
  int sample_lanes = 0;                  // sample kernel lanes a pixel (8, 16, 32); 0: default
  int sample_rounds = 0;                 // sample kernel vectors a lane (1-3); 0: default
  int sample_fit = 0;                    // 1: sample kernel lanes and vectors fitted to the group
  int sample_vec = 0;                    // 4: 16-bit types' sample kernel reads 4 channels a load, not 8
  int sample_band_rows = 0;              // sample kernel output rows a band (power of two; 1: row by row); 0: default
  int sample_no_scatter = -1;            // 0: the gather path runs the variant with atomics compiled in
  int forward_weights_in_registers = -1;  // 3x3 weights held in registers; -1: default
  int grad_x = 0;                        // 0: default, 1: atomic scatter, 2: sorted gather
  int gather_vectors = 0;                // 1: one vector a lane in the run gather; 0: default (up to 2)
  int gather_kernel = 0;                 // 0: default, 1 (gather_kernel=runs): run gather, 2 (=band): band gather
  int gather_segment = 0;                // columns a sub-warp of the band gather; 0: default (4)
  int gather_band_step = 0;              // 1: the band gather's samples one at a time; 0: default (2; 1 at two vectors a lane)
  int gather_band_vectors = 0;           // 1: one vector a lane in the band gather past 32 vectors; 0: two
  int backward_kernel = 0;               // 0: default (sample kernel), 1: tile kernel
};

inline Tuning ParseTuning(const char* text) {
  Tuning t;
  if (text == nullptr) return t;
  auto value = [&](const char* key) -> const char* {
    const char* at = std::strstr(text, key);
    return at ? at + std::strlen(key) : nullptr;
  };
  if (const char* v = value("forward_min_blocks=")) t.forward_min_blocks = std::atoi(v);
  if (const char* v = value("forward_weights_in_registers=")) {
    t.forward_weights_in_registers = std::atoi(v);
  }
  if (const char* v = value("forward_tile=")) t.forward_tile = FloorPow2(std::max(1, std::atoi(v)));
  if (const char* v = value("forward_splits=")) t.forward_splits = std::atoi(v);
  if (const char* v = value("forward_lanes=")) t.forward_lanes = FloorPow2(std::max(1, std::atoi(v)));
  if (const char* v = value("sample_lanes=")) t.sample_lanes = FloorPow2(std::max(1, std::atoi(v)));
  if (const char* v = value("sample_rounds=")) t.sample_rounds = std::atoi(v);
  if (const char* v = value("sample_fit=")) t.sample_fit = std::atoi(v);
  if (const char* v = value("sample_vec=")) t.sample_vec = std::atoi(v);
  if (const char* v = value("sample_band_rows=")) {
    t.sample_band_rows = std::min(64, FloorPow2(std::max(1, std::atoi(v))));
  }
  if (const char* v = value("sample_no_scatter=")) t.sample_no_scatter = std::atoi(v);
  if (const char* v = value("backward_kernel=")) t.backward_kernel = std::atoi(v);
  if (const char* v = value("gather_vectors=")) t.gather_vectors = std::atoi(v);
  if (const char* v = value("gather_kernel=")) {
    t.gather_kernel = std::strncmp(v, "runs", 4) == 0 ? 1 : std::strncmp(v, "band", 4) == 0 ? 2 : 0;
  }
  if (const char* v = value("gather_segment=")) t.gather_segment = std::max(1, std::atoi(v));
  if (const char* v = value("gather_band_step=")) t.gather_band_step = std::atoi(v);
  if (const char* v = value("gather_band_vectors=")) t.gather_band_vectors = std::atoi(v);
  if (const char* v = value("grad_x=")) {
    t.grad_x = std::strncmp(v, "atomic", 6) == 0 ? 1 : std::strncmp(v, "gather", 6) == 0 ? 2 : 0;
  }
  return t;
}

inline const Tuning& GetTuning() {
  static const Tuning t = ParseTuning(std::getenv("JAX_DEFORM_CUDA_TUNING"));
  return t;
}

inline size_t Align(size_t v) { return (v + 255) / 256 * 256; }

// Whether a grid under one wave takes the small-grid plans (the forward's
// smaller tiles, the sample kernel's 16-lane slices): at least 2^18 output
// elements a group. Below that the launch is the time, and the tests' small
// shapes keep the plans they were written to cover.
inline bool SmallGridPlansPay(const ConvShape& s) {
  return s.n * s.ho * s.wo * s.channels_per_group() >= (int64_t{1} << 18);
}

// What a kernel plan assumes of the GPU. Launches plan for the current
// device; a workspace query for any GPU (PortableBackwardScratchBytes) sets
// these for its own plans only, and puts them back.
struct PlanAssumptions {
  int sm_count = 0;     // 0: the current device's
  int small_grid = -1;  // the sample kernel's small-grid slices: -1 by its rule, 0 never
};

inline PlanAssumptions& CurrentPlanAssumptions() {
  thread_local PlanAssumptions assumptions;
  return assumptions;
}

// Streaming multiprocessors of the current device (read once), or the count a
// workspace query assumes.
inline int SmCount() {
  if (const int assumed = CurrentPlanAssumptions().sm_count; assumed > 0) return assumed;
  static const int count = [] {
    int device = 0, n = 132;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    return n;
  }();
  return count;
}

template <typename T>
constexpr Dtype DtypeOf() {
  return std::is_same_v<T, float>           ? Dtype::kF32
         : std::is_same_v<T, __nv_bfloat16> ? Dtype::kBF16
         : std::is_same_v<T, double>        ? Dtype::kF64
                                            : Dtype::kF16;
}

// CUDA's 16-bit types, for DispatchDtype (dtypes.h).
struct CudaTypes {
  using BFloat16 = __nv_bfloat16;
  using Float16 = __half;
};

}  // namespace cuda_detail
}  // namespace jax_deform

#endif  // JAX_DEFORM_CUDA_COMMON_CUH_
