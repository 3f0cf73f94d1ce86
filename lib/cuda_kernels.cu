// CUDA kernels of depthwise deformable convolution, channels last.
//
// Work split: a block owns a 2-D tile of output pixels (8x8 for 3x3 kernels)
// for one offset group. It first computes, once, the sample geometry of every (pixel, tap)
// of the tile into shared memory (corner indices, bilinear weights, mask);
// then its threads walk the channels of the group, `lanes` consecutive
// threads on consecutive vectors of V channels (16-byte loads), so every
// corner read is a coalesced row segment and neighbouring pixels of the tile
// hit the same lines in L1. No im2col buffer exists anywhere.
//
// Backward: grad_offset and grad_mask are reduced over the channels of a
// group with warp shuffles and then in shared memory, always in the same
// order; grad_weight is reduced per block in a fixed order into per-tile
// partial sums and then summed over tiles in order by a second kernel.
// grad_x is a scatter: float atomics (vector atomics on sm_90) on the fast
// path, or a deterministic gather over destination-sorted contributions.
#include "cuda_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cub/cub.cuh>

namespace jax_deform {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kMaxTilePixels = 64;
constexpr size_t kGeometryBudget = 38 * 1024;  // shared memory for the tile geometry

__device__ __forceinline__ float ToF(float v) { return v; }
__device__ __forceinline__ float ToF(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToF(__half v) { return __half2float(v); }

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

// V elements loaded or stored as one aligned access (16 bytes when V * sizeof(T) == 16).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void LoadVec(const T* __restrict__ p, float (&out)[V]) {
  const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = ToF(pack.v[i]);
}

template <typename T, int V>
__device__ __forceinline__ void StoreVec(T* p, const float (&in)[V]) {
  Pack<T, V> pack;
#pragma unroll
  for (int i = 0; i < V; ++i) pack.v[i] = FromF<T>(in[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pack;
}

// Adds V floats to consecutive, V-aligned float addresses.
template <int V>
__device__ __forceinline__ void AtomicAddVec(float* p, const float (&v)[V]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVector = V % 4 == 0;
#else
  constexpr bool kVector = false;
#endif
  if constexpr (kVector) {
#pragma unroll
    for (int i = 0; i < V; i += 4) {
      atomicAdd(reinterpret_cast<float4*>(p + i), make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]));
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) atomicAdd(p + i, v[i]);
  }
}

// Geometry of one (pixel, tap) of a tile, computed once per block.
struct TapGeometry {
  int corner[4];  // y * W + x inside the image, always safe to read
  float ly, lx;   // fractional position
  float mask;
  float poison;   // NaN for a NaN sample position, else 0
  unsigned valid; // bit i: corner i lies inside the image
};

template <typename T>
__device__ __forceinline__ TapGeometry MakeGeometry(const ConvShape& s, const T* __restrict__ offset,
                                                    const T* __restrict__ mask, int64_t pixel,
                                                    int64_t g, int64_t k) {
  const int64_t ox = pixel % s.wo;
  const int64_t oy = (pixel / s.wo) % s.ho;
  const int64_t oi = OffsetIndex(s, pixel, g, k);
  float py, px;
  SamplePosition(s, oy, ox, k / s.kw, k % s.kw, ToF(offset[oi]), ToF(offset[oi + 1]), &py, &px);
  const Bilinear b = MakeBilinear(py, px, s.h, s.w);
  TapGeometry t;
#pragma unroll
  for (int i = 0; i < 4; ++i) t.corner[i] = static_cast<int>(b.corner[i]);
  t.ly = b.ly;
  t.lx = b.lx;
  t.poison = b.poison;
  t.mask = mask ? ToF(mask[MaskIndex(s, pixel, g, k)]) : 1.f;
  t.valid = (b.valid[0] != 0.f) | ((b.valid[1] != 0.f) << 1) | ((b.valid[2] != 0.f) << 2) |
            ((b.valid[3] != 0.f) << 3);
  return t;
}

__device__ __forceinline__ Bilinear ToBilinear(const TapGeometry& t) {
  Bilinear b;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    b.corner[i] = t.corner[i];
    b.valid[i] = (t.valid >> i) & 1u ? 1.f : 0.f;
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
__device__ __forceinline__ int64_t TilePixel(const ConvShape& s, const TileGrid& t, int64_t tile,
                                             int lp) {
  const int64_t tx = tile % t.tiles_x, ty = (tile / t.tiles_x) % t.tiles_y;
  const int64_t image = tile / (t.tiles_x * t.tiles_y);
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

int FloorPow2(int64_t v) {
  int p = 1;
  while (p * 2 <= v) p *= 2;
  return p;
}

Plan MakePlan(const ConvShape& s, int max_vec) {
  Plan p;
  const int64_t cg = s.channels_per_group();
  p.vec = (s.multiplier == 1 && cg % max_vec == 0) ? max_vec : 1;
  const int64_t vectors = cg / p.vec;
  p.lanes = FloorPow2(std::min<int64_t>(vectors, 32));
  const int64_t by_smem =
      static_cast<int64_t>(kGeometryBudget / (sizeof(int64_t) + s.taps() * (sizeof(TapGeometry) + 3 * sizeof(float))));
  p.tile_pixels = FloorPow2(std::max<int64_t>(1, std::min<int64_t>(kMaxTilePixels, by_smem)));
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

// Fills the tile's pixel indices [tile_pixels] and geometry [tile_pixels][taps]
// in shared memory.
template <typename T>
__device__ void TileGeometry(const ConvShape& s, const TileGrid& tg, const T* __restrict__ offset,
                             const T* __restrict__ mask, int64_t g, int64_t* pixel_of,
                             TapGeometry* geom) {
  const int taps = static_cast<int>(s.taps());
  for (int lp = threadIdx.x; lp < tg.pixels; lp += blockDim.x) {
    pixel_of[lp] = TilePixel(s, tg, blockIdx.x, lp);
  }
  for (int e = threadIdx.x; e < tg.pixels * taps; e += blockDim.x) {
    const int64_t pixel = TilePixel(s, tg, blockIdx.x, e / taps);
    if (pixel >= 0) geom[e] = MakeGeometry(s, offset, mask, pixel, g, e % taps);
  }
}

// ------------------------------------------------------------------ forward

// What the forward needs of one (pixel, tap): corner pixel indices (-1 where
// the corner lies outside the image and is not read) and weights with the
// mask folded in. Two 16-byte shared-memory loads per tap.
struct alignas(16) ForwardTap {
  int corner[4];
  float weight[4];
};

template <typename T>
__device__ void ForwardTileTaps(const ConvShape& s, const TileGrid& tg, const T* __restrict__ offset,
                                const T* __restrict__ mask, int64_t g, int64_t* pixel_of,
                                ForwardTap* taps_out) {
  const int taps = static_cast<int>(s.taps());
  for (int lp = threadIdx.x; lp < tg.pixels; lp += blockDim.x) {
    pixel_of[lp] = TilePixel(s, tg, blockIdx.x, lp);
  }
  for (int e = threadIdx.x; e < tg.pixels * taps; e += blockDim.x) {
    const int64_t pixel = TilePixel(s, tg, blockIdx.x, e / taps);
    if (pixel < 0) continue;
    const TapGeometry t = MakeGeometry(s, offset, mask, pixel, g, e % taps);
    float wgt[4];
    CornerWeights(ToBilinear(t), wgt);
    ForwardTap f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f.corner[i] = (t.valid >> i) & 1u ? t.corner[i] : -1;
      f.weight[i] = t.mask * wgt[i];
    }
    if (t.poison != 0.f || t.poison != t.poison) {  // NaN position: read one pixel, times NaN
      f.corner[0] = 0;
      f.weight[0] = t.poison;
    }
    taps_out[e] = f;
  }
}

// MB: output channels per input channel handled per pass (M > 1 runs in
// passes). KT: the tap count when known at compile time (3x3), so the
// depthwise weights of a thread's channels stay in registers.
template <typename T, int V, int MB, int KT>
__global__ void __launch_bounds__(kMaxThreads)
    ForwardKernel(ConvShape s, TileGrid tg, int lanes, int vectors_per_split, const T* __restrict__ x,
                  const T* __restrict__ offset, const T* __restrict__ mask,
                  const T* __restrict__ weight, const T* __restrict__ bias, T* __restrict__ y) {
  extern __shared__ __align__(16) unsigned char smem[];
  int64_t* pixel_of = reinterpret_cast<int64_t*>(smem);
  ForwardTap* tap_table = reinterpret_cast<ForwardTap*>(pixel_of + ((tg.pixels + 1) & ~1));
  const int64_t g = blockIdx.y;
  ForwardTileTaps(s, tg, offset, mask, g, pixel_of, tap_table);
  __syncthreads();

  const int taps = KT > 0 ? KT : static_cast<int>(s.taps());
  const int64_t cg = s.channels_per_group(), m = s.multiplier, cm = s.out_channels();
  const int64_t hw = s.h * s.w, img_pixels = s.ho * s.wo;
  // Small problems also split the channels of a group over grid.z, to fill the GPU.
  const int vec_begin = blockIdx.z * vectors_per_split;
  const int vec_end = min(static_cast<int>(cg / V), vec_begin + vectors_per_split);
  const int lane = threadIdx.x % lanes, groups_of_pixels = blockDim.x / lanes;
  for (int64_t j0 = 0; j0 < m; j0 += MB) {
    for (int vec = vec_begin + lane; vec < vec_end; vec += lanes) {
      const int64_t c = g * cg + static_cast<int64_t>(vec) * V;
      float w_reg[KT > 0 ? KT : 1][V];
      if constexpr (KT > 0 && MB == 1) {
#pragma unroll
        for (int k = 0; k < KT; ++k) LoadVec<T, V>(weight + k * cm + c, w_reg[k]);
      }
      for (int lp = threadIdx.x / lanes; lp < tg.pixels; lp += groups_of_pixels) {
        const int64_t pixel = pixel_of[lp];
        if (pixel < 0) continue;
        const T* xc = x + (pixel / img_pixels) * hw * s.c + c;
        float acc[V * MB];
#pragma unroll
        for (int i = 0; i < V * MB; ++i) acc[i] = 0.f;
        const ForwardTap* tt = tap_table + lp * taps;
#pragma unroll(KT > 0 ? KT : 3)
        for (int k = 0; k < taps; ++k) {
          const ForwardTap t = tt[k];
          float val[V];
#pragma unroll
          for (int v = 0; v < V; ++v) val[v] = 0.f;
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            if (t.corner[i] < 0) continue;
            float corner[V];
            LoadVec<T, V>(xc + static_cast<int64_t>(t.corner[i]) * s.c, corner);
#pragma unroll
            for (int v = 0; v < V; ++v) val[v] += t.weight[i] * corner[v];
          }
          if constexpr (MB == 1) {
            float wv[V];
            if constexpr (KT > 0) {
#pragma unroll
              for (int v = 0; v < V; ++v) wv[v] = w_reg[k][v];
            } else {
              LoadVec<T, V>(weight + k * cm + c, wv);
            }
#pragma unroll
            for (int v = 0; v < V; ++v) acc[v] += val[v] * wv[v];
          } else {
            const T* wk = weight + k * cm;
#pragma unroll
            for (int v = 0; v < V; ++v) {
#pragma unroll
              for (int jj = 0; jj < MB; ++jj) {
                if (j0 + jj < m) acc[v * MB + jj] += val[v] * ToF(wk[(c + v) * m + j0 + jj]);
              }
            }
          }
        }
        T* yp = y + pixel * cm;
        if constexpr (MB == 1) {  // M == 1: V consecutive outputs
          if (bias) {
            float bv[V];
            LoadVec<T, V>(bias + c, bv);
#pragma unroll
            for (int v = 0; v < V; ++v) acc[v] += bv[v];
          }
          StoreVec<T, V>(yp + c, acc);
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) {
#pragma unroll
            for (int jj = 0; jj < MB; ++jj) {
              const int64_t o = (c + v) * m + j0 + jj;
              if (j0 + jj < m) yp[o] = FromF<T>(acc[v * MB + jj] + (bias ? ToF(bias[o]) : 0.f));
            }
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------ backward

__device__ __forceinline__ float SumOverLanes(float v, int lanes) {
  for (int d = lanes / 2; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

// Everything but grad_x's scatter is written in a fixed order here; grad_x is
// scattered with atomics when `scatter` is set (the fast path).
template <typename T, int V, int MB>
__global__ void __launch_bounds__(kMaxThreads)
    BackwardKernel(ConvShape s, TileGrid tg, int lanes, bool scatter, const T* __restrict__ x,
                   const T* __restrict__ offset, const T* __restrict__ mask,
                   const T* __restrict__ weight, const T* __restrict__ grad_y,
                   float* __restrict__ grad_x, float* __restrict__ grad_offset,
                   float* __restrict__ grad_mask, float* __restrict__ weight_partial) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int taps = static_cast<int>(s.taps());
  const int tile_pixels = tg.pixels;
  int64_t* pixel_of = reinterpret_cast<int64_t*>(smem);
  TapGeometry* geom = reinterpret_cast<TapGeometry*>(pixel_of + tile_pixels);
  float* tap_sums = reinterpret_cast<float*>(geom + tile_pixels * taps);  // [pixel][tap][3]
  float* weight_sums = tap_sums + tile_pixels * taps * 3;                 // [threads][V*MB]

  const int64_t g = blockIdx.y;
  TileGeometry(s, tg, offset, mask, g, pixel_of, geom);
  for (int e = threadIdx.x; e < tile_pixels * taps * 3; e += blockDim.x) tap_sums[e] = 0.f;
  __syncthreads();

  const int64_t cg = s.channels_per_group(), m = s.multiplier, cm = s.out_channels();
  const int64_t hw = s.h * s.w, img_pixels = s.ho * s.wo;
  const int vectors = static_cast<int>(cg / V);
  const int lane = threadIdx.x % lanes, pixel_group = threadIdx.x / lanes;
  const int groups_of_pixels = blockDim.x / lanes;
  // Every thread runs the same number of iterations so the shuffles line up.
  const int pixel_rounds = (tile_pixels + groups_of_pixels - 1) / groups_of_pixels;
  for (int64_t j0 = 0; j0 < m; j0 += MB) {
    for (int vec0 = 0; vec0 < vectors; vec0 += lanes) {
      const int vec = vec0 + lane;
      const bool channel_active = vec < vectors;
      const int64_t c = g * cg + static_cast<int64_t>(channel_active ? vec : 0) * V;
      for (int k = 0; k < taps; ++k) {
        float weight_acc[V * MB];
#pragma unroll
        for (int i = 0; i < V * MB; ++i) weight_acc[i] = 0.f;
        const T* wk = weight + k * cm;
        for (int round = 0; round < pixel_rounds; ++round) {
          const int lp = round * groups_of_pixels + pixel_group;
          const int64_t pixel = lp < tile_pixels ? pixel_of[lp] : -1;
          const bool active = channel_active && pixel >= 0;
          float sum_val = 0.f, sum_dy = 0.f, sum_dx = 0.f;
          if (active) {
            const int64_t image = pixel / img_pixels;
            const TapGeometry t = geom[lp * taps + k];
            const Bilinear b = ToBilinear(t);
            float wgt[4], wy[4], wx[4];
            CornerWeights(b, wgt);
            CornerWeightGrads(b, wy, wx);
            const T* gy = grad_y + pixel * cm;
            float gcol[V], gyv[V * MB];
            if (MB == 1 && m == 1) {
              float gv[V], wv[V];
              LoadVec<T, V>(gy + c, gv);
              LoadVec<T, V>(wk + c, wv);
#pragma unroll
              for (int v = 0; v < V; ++v) {
                gyv[v] = gv[v];
                gcol[v] = gv[v] * wv[v];
              }
            } else {
#pragma unroll
              for (int v = 0; v < V; ++v) {
                float sum = 0.f;
                for (int64_t j = 0; j < m; ++j) sum += ToF(wk[(c + v) * m + j]) * ToF(gy[(c + v) * m + j]);
                gcol[v] = sum;
#pragma unroll
                for (int jj = 0; jj < MB; ++jj) {
                  gyv[v * MB + jj] = j0 + jj < m ? ToF(gy[(c + v) * m + j0 + jj]) : 0.f;
                }
              }
            }
            float val[V], dvy[V], dvx[V];
#pragma unroll
            for (int v = 0; v < V; ++v) val[v] = dvy[v] = dvx[v] = t.poison;
            const T* xc = x + image * hw * s.c + c;
            float* gxc = grad_x + image * hw * s.c + c;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              if (!((t.valid >> i) & 1u)) continue;
              float corner[V];
              LoadVec<T, V>(xc + static_cast<int64_t>(t.corner[i]) * s.c, corner);
#pragma unroll
              for (int v = 0; v < V; ++v) {
                val[v] += wgt[i] * corner[v];
                dvy[v] += wy[i] * corner[v];
                dvx[v] += wx[i] * corner[v];
              }
              if (scatter && j0 == 0) {
                float contrib[V];
#pragma unroll
                for (int v = 0; v < V; ++v) contrib[v] = t.mask * wgt[i] * gcol[v];
                AtomicAddVec<V>(gxc + static_cast<int64_t>(t.corner[i]) * s.c, contrib);
              }
            }
#pragma unroll
            for (int v = 0; v < V; ++v) {
              sum_val += gcol[v] * val[v];
              sum_dy += gcol[v] * dvy[v];
              sum_dx += gcol[v] * dvx[v];
#pragma unroll
              for (int jj = 0; jj < MB; ++jj) weight_acc[v * MB + jj] += t.mask * val[v] * gyv[v * MB + jj];
            }
            sum_dy *= t.mask;
            sum_dx *= t.mask;
          }
          if (j0 == 0) {
            sum_val = SumOverLanes(sum_val, lanes);
            sum_dy = SumOverLanes(sum_dy, lanes);
            sum_dx = SumOverLanes(sum_dx, lanes);
            if (lane == 0 && pixel >= 0) {
              float* ts = tap_sums + (lp * taps + k) * 3;
              ts[0] += sum_val;
              ts[1] += sum_dy;
              ts[2] += sum_dx;
            }
          }
        }
        // grad_weight of this tap: sum the pixel groups in order.
        float* mine = weight_sums + threadIdx.x * (V * MB);
#pragma unroll
        for (int i = 0; i < V * MB; ++i) mine[i] = weight_acc[i];
        __syncthreads();
        if (pixel_group == 0 && channel_active) {
          float total[V * MB];
#pragma unroll
          for (int i = 0; i < V * MB; ++i) total[i] = 0.f;
          for (int pg = 0; pg < groups_of_pixels; ++pg) {
            const float* theirs = weight_sums + (pg * lanes + lane) * (V * MB);
#pragma unroll
            for (int i = 0; i < V * MB; ++i) total[i] += theirs[i];
          }
          float* out = weight_partial + (static_cast<int64_t>(blockIdx.x) * taps + k) * cm;
#pragma unroll
          for (int v = 0; v < V; ++v) {
#pragma unroll
            for (int jj = 0; jj < MB; ++jj) {
              if (j0 + jj < m) out[(c + v) * m + j0 + jj] = total[v * MB + jj];
            }
          }
        }
        __syncthreads();
      }
    }
  }
  for (int e = threadIdx.x; e < tile_pixels * taps; e += blockDim.x) {
    const int64_t pixel = pixel_of[e / taps];
    if (pixel < 0) continue;
    const int k = e % taps;
    const int64_t oi = OffsetIndex(s, pixel, g, k);
    grad_offset[oi] = tap_sums[e * 3 + 1];
    grad_offset[oi + 1] = tap_sums[e * 3 + 2];
    if (grad_mask) grad_mask[MaskIndex(s, pixel, g, k)] = tap_sums[e * 3];
  }
}

// grad_weight[i] = sum over tiles, in tile order, of the per-tile partial sums.
__global__ void SumTilesKernel(const float* __restrict__ partial, int64_t tiles, int64_t size,
                               float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= size) return;
  float sum = 0.f;
  for (int64_t t = 0; t < tiles; ++t) sum += partial[t * size + i];
  out[i] = sum;
}

// ---------------------------------------------- deterministic grad_x (gather)
//
// Every (pixel, group, tap, corner) sample that lands inside the image is a
// contribution to one destination (image, input pixel, group). The
// contributions are bucketed by destination (counting sort: histogram, scan,
// fill), each bucket is sorted by contribution id (so the order never depends
// on scheduling), and then one warp per destination adds its bucket in that
// order, across the channels of the group.

template <typename T>
__global__ void CountContributions(ConvShape s, const T* __restrict__ offset,
                                   const T* __restrict__ mask, unsigned* __restrict__ counts,
                                   unsigned* __restrict__ destination, float* __restrict__ scale) {
  const int64_t taps = s.taps();
  const int64_t total = s.n * s.ho * s.wo * s.groups * taps;
  const int64_t hw = s.h * s.w;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = e % taps, g = (e / taps) % s.groups, pixel = e / (taps * s.groups);
    const TapGeometry t = MakeGeometry(s, offset, mask, pixel, g, k);
    float wgt[4];
    CornerWeights(ToBilinear(t), wgt);
    const int64_t image = pixel / (s.ho * s.wo);
    for (int i = 0; i < 4; ++i) {
      const int64_t id = e * 4 + i;
      if ((t.valid >> i) & 1u) {
        const unsigned dest = static_cast<unsigned>((image * hw + t.corner[i]) * s.groups + g);
        destination[id] = dest;
        scale[id] = t.mask * wgt[i];
        atomicAdd(counts + dest, 1u);
      } else {
        destination[id] = 0xffffffffu;
      }
    }
  }
}

__global__ void FillBuckets(int64_t contributions, const unsigned* __restrict__ destination,
                            const unsigned* __restrict__ starts, unsigned* __restrict__ cursor,
                            unsigned* __restrict__ bucketed) {
  for (int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; id < contributions;
       id += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const unsigned dest = destination[id];
    if (dest == 0xffffffffu) continue;
    bucketed[starts[dest] + atomicAdd(cursor + dest, 1u)] = static_cast<unsigned>(id);
  }
}

// One warp per destination: sorts its bucket in place (insertion sort; buckets
// hold about 4 * taps entries unless offsets pile up), then sums it per channel.
template <typename T, int V>
__global__ void GatherGradX(ConvShape s, const T* __restrict__ weight, const T* __restrict__ grad_y,
                            const unsigned* __restrict__ starts, unsigned* __restrict__ bucketed,
                            const float* __restrict__ scale, float* __restrict__ grad_x) {
  const int warps_per_block = blockDim.x / 32;
  const int64_t dest = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / 32;
  const int64_t destinations = s.n * s.h * s.w * s.groups;
  if (dest >= destinations) return;
  const int lane = threadIdx.x % 32;
  const unsigned begin = starts[dest], end = starts[dest + 1];
  if (lane == 0) {
    for (unsigned a = begin + 1; a < end; ++a) {
      const unsigned v = bucketed[a];
      unsigned b = a;
      for (; b > begin && bucketed[b - 1] > v; --b) bucketed[b] = bucketed[b - 1];
      bucketed[b] = v;
    }
  }
  __syncwarp();
  const int64_t g = dest % s.groups, in_pixel = dest / s.groups;
  const int64_t cg = s.channels_per_group(), m = s.multiplier, cm = s.out_channels();
  const int64_t taps = s.taps();
  for (int64_t vec = lane; vec < cg / V; vec += 32) {
    const int64_t c = g * cg + vec * V;
    float acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = 0.f;
    for (unsigned a = begin; a < end; ++a) {
      const int64_t id = bucketed[a];
      const int64_t k = (id / 4) % taps;
      const int64_t pixel = id / (4 * taps * s.groups);
      const float w = scale[id];
      const T* gy = grad_y + pixel * cm;
      const T* wk = weight + k * cm;
      if (m == 1) {
        float gv[V], wv[V];
        LoadVec<T, V>(gy + c, gv);
        LoadVec<T, V>(wk + c, wv);
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] += w * (gv[v] * wv[v]);
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          float sum = 0.f;
          for (int64_t j = 0; j < m; ++j) sum += ToF(wk[(c + v) * m + j]) * ToF(gy[(c + v) * m + j]);
          acc[v] += w * sum;
        }
      }
    }
    float* out = grad_x + in_pixel * s.c + c;
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = acc[v];
  }
}

struct DeterministicScratch {
  size_t counts, starts, cursor, destination, scale, bucketed, scan_temp, total;
};

size_t Align(size_t v) { return (v + 255) / 256 * 256; }

DeterministicScratch DeterministicLayout(const ConvShape& s) {
  DeterministicScratch d;
  const int64_t destinations = s.n * s.h * s.w * s.groups;
  const int64_t contributions = s.n * s.ho * s.wo * s.groups * s.taps() * 4;
  size_t scan_bytes = 0;
  cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, static_cast<unsigned*>(nullptr),
                                static_cast<unsigned*>(nullptr), destinations + 1);
  size_t offset = 0;
  auto take = [&](size_t bytes) {
    const size_t at = offset;
    offset += Align(bytes);
    return at;
  };
  d.counts = take((destinations + 1) * sizeof(unsigned));
  d.starts = take((destinations + 1) * sizeof(unsigned));
  d.cursor = take(destinations * sizeof(unsigned));
  d.destination = take(contributions * sizeof(unsigned));
  d.scale = take(contributions * sizeof(float));
  d.bucketed = take(contributions * sizeof(unsigned));
  d.scan_temp = take(scan_bytes);
  d.total = offset;
  return d;
}

template <typename T>
cudaError_t DeterministicGradX(cudaStream_t stream, const ConvShape& s, int vec, const T* offset,
                               const T* mask, const T* weight, const T* grad_y, float* grad_x,
                               unsigned char* scratch) {
  const DeterministicScratch d = DeterministicLayout(s);
  auto* counts = reinterpret_cast<unsigned*>(scratch + d.counts);
  auto* starts = reinterpret_cast<unsigned*>(scratch + d.starts);
  auto* cursor = reinterpret_cast<unsigned*>(scratch + d.cursor);
  auto* destination = reinterpret_cast<unsigned*>(scratch + d.destination);
  auto* scale = reinterpret_cast<float*>(scratch + d.scale);
  auto* bucketed = reinterpret_cast<unsigned*>(scratch + d.bucketed);
  const int64_t destinations = s.n * s.h * s.w * s.groups;
  const int64_t contributions = s.n * s.ho * s.wo * s.groups * s.taps() * 4;
  cudaMemsetAsync(counts, 0, (destinations + 1) * sizeof(unsigned), stream);
  cudaMemsetAsync(cursor, 0, destinations * sizeof(unsigned), stream);
  const int threads = 256;
  const int64_t grid = std::min<int64_t>((contributions / 4 + threads - 1) / threads, 1 << 20);
  CountContributions<T><<<grid, threads, 0, stream>>>(s, offset, mask, counts, destination, scale);
  size_t scan_bytes = d.total - d.scan_temp;
  cudaError_t err = cub::DeviceScan::ExclusiveSum(scratch + d.scan_temp, scan_bytes, counts, starts,
                                                  destinations + 1, stream);
  if (err != cudaSuccess) return err;
  FillBuckets<<<std::min<int64_t>((contributions + threads - 1) / threads, 1 << 20), threads, 0,
                stream>>>(contributions, destination, starts, cursor, bucketed);
  const int warps = threads / 32;
  const int64_t blocks = (destinations + warps - 1) / warps;
  if (vec == 1) {
    GatherGradX<T, 1><<<blocks, threads, 0, stream>>>(s, weight, grad_y, starts, bucketed, scale,
                                                      grad_x);
  } else {
    GatherGradX<T, 16 / sizeof(T)><<<blocks, threads, 0, stream>>>(s, weight, grad_y, starts,
                                                                   bucketed, scale, grad_x);
  }
  return cudaGetLastError();
}

// ------------------------------------------------------------------ launchers

template <typename T>
using ForwardFn = void (*)(ConvShape, TileGrid, int, int, const T*, const T*, const T*, const T*, const T*, T*);

template <typename T>
cudaError_t Forward(cudaStream_t stream, const ConvShape& s, const T* x, const T* offset,
                    const T* mask, const T* weight, const T* bias, T* y) {
  constexpr int kVec = 16 / sizeof(T);
  const Plan p = MakePlan(s, kVec);
  const size_t smem = ((p.tile_pixels + 1) & ~1) * sizeof(int64_t) +
                      p.tile_pixels * s.taps() * sizeof(ForwardTap);
  // Enough blocks for about two waves: split the channels when tiles are few.
  static int sm_count = [] {
    int device = 0, count = 132;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    return count;
  }();
  const int64_t vectors = s.channels_per_group() / p.vec;
  const int64_t lane_rounds = (vectors + p.lanes - 1) / p.lanes;
  const int64_t want = (2 * sm_count + p.tiles * s.groups - 1) / (p.tiles * s.groups);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({want, lane_rounds, 65535}));
  const int vectors_per_split = static_cast<int>((lane_rounds + splits - 1) / splits) * p.lanes;
  const dim3 grid(static_cast<unsigned>(p.tiles), static_cast<unsigned>(s.groups),
                  static_cast<unsigned>((vectors + vectors_per_split - 1) / vectors_per_split));
  ForwardFn<T> fn;
  if (s.multiplier != 1) {
    fn = ForwardKernel<T, 1, 4, 0>;
  } else if (p.vec == kVec) {
    fn = s.taps() == 9 ? ForwardKernel<T, kVec, 1, 9> : ForwardKernel<T, kVec, 1, 0>;
  } else {
    fn = s.taps() == 9 ? ForwardKernel<T, 1, 1, 9> : ForwardKernel<T, 1, 1, 0>;
  }
  fn<<<grid, p.threads, smem, stream>>>(s, p.grid, p.lanes, vectors_per_split, x, offset, mask,
                                        weight, bias, y);
  return cudaGetLastError();
}

template <typename T>
using BackwardFn = void (*)(ConvShape, TileGrid, int, bool, const T*, const T*, const T*, const T*,
                            const T*, float*, float*, float*, float*);

size_t WeightPartialBytes(const ConvShape& s, const Plan& p) {
  return Align(static_cast<size_t>(p.tiles) * s.taps() * s.out_channels() * sizeof(float));
}

template <typename T>
cudaError_t Backward(cudaStream_t stream, const ConvShape& s, bool deterministic, const T* x,
                     const T* offset, const T* mask, const T* weight, const T* grad_y, float* grad_x,
                     float* grad_offset, float* grad_mask, float* grad_weight, void* scratch) {
  constexpr int kVec = 16 / sizeof(T);
  const Plan p = MakePlan(s, kVec);
  const int mb = p.vec == kVec ? 1 : (s.multiplier == 1 ? 1 : 4);
  const size_t smem = p.tile_pixels * (sizeof(int64_t) + s.taps() * (sizeof(TapGeometry) + 3 * sizeof(float))) +
                      p.threads * p.vec * mb * sizeof(float);
  auto* partial = static_cast<float*>(scratch);
  if (!deterministic) {
    cudaError_t err =
        cudaMemsetAsync(grad_x, 0, s.n * s.h * s.w * s.c * sizeof(float), stream);
    if (err != cudaSuccess) return err;
  }
  BackwardFn<T> fn = p.vec == kVec ? BackwardKernel<T, kVec, 1>
                                   : (mb == 1 ? BackwardKernel<T, 1, 1> : BackwardKernel<T, 1, 4>);
  const dim3 grid(static_cast<unsigned>(p.tiles), static_cast<unsigned>(s.groups));
  fn<<<grid, p.threads, smem, stream>>>(s, p.grid, p.lanes, !deterministic, x, offset, mask,
                                        weight, grad_y, grad_x, grad_offset, grad_mask, partial);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t wsize = s.taps() * s.out_channels();
  SumTilesKernel<<<(wsize + 255) / 256, 256, 0, stream>>>(partial, p.tiles, wsize, grad_weight);
  err = cudaGetLastError();
  if (err != cudaSuccess || !deterministic) return err;
  return DeterministicGradX<T>(stream, s, p.vec, offset, mask, weight, grad_y, grad_x,
                               static_cast<unsigned char*>(scratch) + WeightPartialBytes(s, p));
}

int VecOf(Dtype dtype) { return dtype == Dtype::kF32 ? 4 : 8; }

}  // namespace

cudaError_t LaunchForwardCuda(cudaStream_t stream, Dtype dtype, const ConvShape& s, const void* x,
                              const void* offset, const void* mask, const void* weight,
                              const void* bias, void* y) {
  switch (dtype) {
    case Dtype::kF32:
      return Forward(stream, s, static_cast<const float*>(x), static_cast<const float*>(offset),
                     static_cast<const float*>(mask), static_cast<const float*>(weight),
                     static_cast<const float*>(bias), static_cast<float*>(y));
    case Dtype::kBF16:
      return Forward(stream, s, static_cast<const __nv_bfloat16*>(x),
                     static_cast<const __nv_bfloat16*>(offset), static_cast<const __nv_bfloat16*>(mask),
                     static_cast<const __nv_bfloat16*>(weight), static_cast<const __nv_bfloat16*>(bias),
                     static_cast<__nv_bfloat16*>(y));
    case Dtype::kF16:
      return Forward(stream, s, static_cast<const __half*>(x), static_cast<const __half*>(offset),
                     static_cast<const __half*>(mask), static_cast<const __half*>(weight),
                     static_cast<const __half*>(bias), static_cast<__half*>(y));
  }
  return cudaErrorInvalidValue;
}

size_t BackwardScratchBytes(const ConvShape& s, Dtype dtype, bool deterministic) {
  const Plan p = MakePlan(s, VecOf(dtype));
  return WeightPartialBytes(s, p) + (deterministic ? DeterministicLayout(s).total : 0);
}

cudaError_t LaunchBackwardCuda(cudaStream_t stream, Dtype dtype, const ConvShape& s,
                               bool deterministic, const void* x, const void* offset,
                               const void* mask, const void* weight, const void* grad_y,
                               float* grad_x, float* grad_offset, float* grad_mask,
                               float* grad_weight, void* scratch) {
  switch (dtype) {
    case Dtype::kF32:
      return Backward(stream, s, deterministic, static_cast<const float*>(x),
                      static_cast<const float*>(offset), static_cast<const float*>(mask),
                      static_cast<const float*>(weight), static_cast<const float*>(grad_y), grad_x,
                      grad_offset, grad_mask, grad_weight, scratch);
    case Dtype::kBF16:
      return Backward(stream, s, deterministic, static_cast<const __nv_bfloat16*>(x),
                      static_cast<const __nv_bfloat16*>(offset),
                      static_cast<const __nv_bfloat16*>(mask),
                      static_cast<const __nv_bfloat16*>(weight),
                      static_cast<const __nv_bfloat16*>(grad_y), grad_x, grad_offset, grad_mask,
                      grad_weight, scratch);
    case Dtype::kF16:
      return Backward(stream, s, deterministic, static_cast<const __half*>(x),
                      static_cast<const __half*>(offset), static_cast<const __half*>(mask),
                      static_cast<const __half*>(weight), static_cast<const __half*>(grad_y),
                      grad_x, grad_offset, grad_mask, grad_weight, scratch);
  }
  return cudaErrorInvalidValue;
}

}  // namespace jax_deform
