// Backward kernels of depthwise deformable convolution, channels last.
//
// The tile kernel re-walks the forward's tiles: grad_offset and grad_mask are
// reduced over the channels of a group with warp shuffles and then in shared
// memory, always in the same order; grad_weight is reduced per block in a
// fixed order into per-tile partial sums, then summed over tiles in order by a
// second kernel. grad_x is a scatter: either float atomics from the tile
// kernel (vector atomics on sm_90), or a separate gather over
// destination-sorted contributions (cuda_grad_x_gather.cu), bitwise
// reproducible and chosen whenever determinism is asked for.
#include "cuda_common.cuh"
#include "cuda_grad_x_gather.h"

namespace jax_deform {
namespace {

using namespace cuda_detail;  // NOLINT: this file's own helpers

template <typename A>
__device__ __forceinline__ A SumOverLanes(A v, int lanes) {
  for (int d = lanes / 2; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

// Everything but grad_x's scatter is written in a fixed order here; grad_x is
// scattered with atomics when `scatter` is set (the fast path).
// MINB: blocks per SM the register budget must allow (1: no cap).
template <typename T, int V, int MB, int MINB>
__global__ void __launch_bounds__(kMaxThreads, MINB)
    BackwardKernel(ConvShape s, TileGrid tg, int lanes, bool scatter, const T* __restrict__ x,
                   const T* __restrict__ offset, const T* __restrict__ mask,
                   const T* __restrict__ weight, const T* __restrict__ grad_y,
                   Accum<T>* __restrict__ grad_x, Accum<T>* __restrict__ grad_offset,
                   Accum<T>* __restrict__ grad_mask, Accum<T>* __restrict__ weight_partial) {
  using A = Accum<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int taps = static_cast<int>(s.taps());
  const int tile_pixels = tg.pixels;
  int64_t* pixel_of = reinterpret_cast<int64_t*>(smem);
  TapGeometryOf<A>* geom = reinterpret_cast<TapGeometryOf<A>*>(pixel_of + tile_pixels);
  A* tap_sums = reinterpret_cast<A*>(geom + tile_pixels * taps);  // [pixel][tap][3]
  A* weight_sums = tap_sums + tile_pixels * taps * 3;             // [threads][V*MB]

  const int64_t g = blockIdx.y;
  TileGeometry(s, tg, offset, mask, g, pixel_of, geom);
  for (int e = threadIdx.x; e < tile_pixels * taps * 3; e += blockDim.x) tap_sums[e] = A(0);
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
        A weight_acc[V * MB];
#pragma unroll
        for (int i = 0; i < V * MB; ++i) weight_acc[i] = A(0);
        const T* wk = weight + k * cm;
        for (int round = 0; round < pixel_rounds; ++round) {
          const int lp = round * groups_of_pixels + pixel_group;
          const int64_t pixel = lp < tile_pixels ? pixel_of[lp] : -1;
          const bool active = channel_active && pixel >= 0;
          A sum_val = A(0), sum_dy = A(0), sum_dx = A(0);
          if (active) {
            const int64_t image = pixel / img_pixels;
            const TapGeometryOf<A> t = geom[lp * taps + k];
            const BilinearOf<A> b = ToBilinear(t);
            A wgt[4], wy[4], wx[4];
            CornerWeights(b, wgt);
            CornerWeightGrads(b, wy, wx);
            const T* gy = grad_y + pixel * cm;
            A gcol[V], gyv[V * MB];
            if (MB == 1 && m == 1) {
              A gv[V], wv[V];
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
                A sum = A(0);
                for (int64_t j = 0; j < m; ++j) sum += ToF(wk[(c + v) * m + j]) * ToF(gy[(c + v) * m + j]);
                gcol[v] = sum;
#pragma unroll
                for (int jj = 0; jj < MB; ++jj) {
                  gyv[v * MB + jj] = j0 + jj < m ? ToF(gy[(c + v) * m + j0 + jj]) : A(0);
                }
              }
            }
            A val[V], dvy[V], dvx[V];
#pragma unroll
            for (int v = 0; v < V; ++v) val[v] = dvy[v] = dvx[v] = t.poison;
            const T* xc = x + image * hw * s.c + c;
            A* gxc = grad_x + image * hw * s.c + c;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              if (!((t.valid >> i) & 1u)) continue;
              A corner[V];
              LoadVec<T, V>(xc + static_cast<int64_t>(t.corner[i]) * s.c, corner);
#pragma unroll
              for (int v = 0; v < V; ++v) {
                val[v] += wgt[i] * corner[v];
                dvy[v] += wy[i] * corner[v];
                dvx[v] += wx[i] * corner[v];
              }
              if (scatter && j0 == 0) {
                A contrib[V];
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
              A* ts = tap_sums + (lp * taps + k) * 3;
              ts[0] += sum_val;
              ts[1] += sum_dy;
              ts[2] += sum_dx;
            }
          }
        }
        // grad_weight of this tap: sum the pixel groups in order.
        A* mine = weight_sums + threadIdx.x * (V * MB);
#pragma unroll
        for (int i = 0; i < V * MB; ++i) mine[i] = weight_acc[i];
        __syncthreads();
        if (pixel_group == 0 && channel_active) {
          A total[V * MB];
#pragma unroll
          for (int i = 0; i < V * MB; ++i) total[i] = A(0);
          for (int pg = 0; pg < groups_of_pixels; ++pg) {
            const A* theirs = weight_sums + (pg * lanes + lane) * (V * MB);
#pragma unroll
            for (int i = 0; i < V * MB; ++i) total[i] += theirs[i];
          }
          A* out = weight_partial + (static_cast<int64_t>(blockIdx.x) * taps + k) * cm;
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

// The tile kernel for M = 1 and 16-byte channel vectors. Each thread keeps R
// channel vectors of its pixel (lane, lane + lanes, ...), so the channel sums
// of grad_offset/grad_mask are first summed in registers over R*V channels and
// reduced across lanes once per (pixel, tap), and R*4 corner loads are in
// flight per tap. Loop order per block: channel slab -> tap -> pixels, so
// grad_weight of (tap, channels) accumulates in registers over the pixels.
template <typename T, int V, int R, int MINB>
__global__ void __launch_bounds__(kMaxThreads, MINB)
    BackwardVectorKernel(ConvShape s, TileGrid tg, int lanes, bool scatter,
                         const T* __restrict__ x, const T* __restrict__ offset,
                         const T* __restrict__ mask, const T* __restrict__ weight,
                         const T* __restrict__ grad_y, Accum<T>* __restrict__ grad_x,
                         Accum<T>* __restrict__ grad_offset, Accum<T>* __restrict__ grad_mask,
                         Accum<T>* __restrict__ weight_partial) {
  using A = Accum<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int taps = static_cast<int>(s.taps());
  const int tile_pixels = tg.pixels;
  int64_t* pixel_of = reinterpret_cast<int64_t*>(smem);
  TapGeometryOf<A>* geom = reinterpret_cast<TapGeometryOf<A>*>(pixel_of + tile_pixels);
  A* tap_sums = reinterpret_cast<A*>(geom + tile_pixels * taps);  // [pixel][tap][3]
  A* weight_sums = tap_sums + tile_pixels * taps * 3;             // [threads][R*V]

  const int64_t g = blockIdx.y;
  TileGeometry(s, tg, offset, mask, g, pixel_of, geom);
  for (int e = threadIdx.x; e < tile_pixels * taps * 3; e += blockDim.x) tap_sums[e] = A(0);
  __syncthreads();

  const int64_t cg = s.channels_per_group(), cm = s.out_channels();
  const int64_t hw = s.h * s.w, img_pixels = s.ho * s.wo;
  const int vectors = static_cast<int>(cg / V);
  const int lane = threadIdx.x % lanes, pixel_group = threadIdx.x / lanes;
  const int groups_of_pixels = blockDim.x / lanes;
  // Every thread runs the same number of iterations so the shuffles line up.
  const int pixel_rounds = (tile_pixels + groups_of_pixels - 1) / groups_of_pixels;
  for (int slab = 0; slab < vectors; slab += lanes * R) {
    for (int k = 0; k < taps; ++k) {
      A weight_acc[R][V];
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int v = 0; v < V; ++v) weight_acc[r][v] = A(0);
      }
      const T* wk = weight + k * cm;
      for (int round = 0; round < pixel_rounds; ++round) {
        const int lp = round * groups_of_pixels + pixel_group;
        const int64_t pixel = lp < tile_pixels ? pixel_of[lp] : -1;
        A sum_val = A(0), sum_dy = A(0), sum_dx = A(0);
        if (pixel >= 0) {
          const int64_t image = pixel / img_pixels;
          const TapGeometryOf<A> t = geom[lp * taps + k];
          const BilinearOf<A> b = ToBilinear(t);
          A wgt[4], wy[4], wx[4];
          CornerWeights(b, wgt);
          CornerWeightGrads(b, wy, wx);
          const T* xc = x + image * hw * s.c;
          A* gxc = grad_x + image * hw * s.c;
          const T* gy = grad_y + pixel * cm;
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const int vec = slab + lane + r * lanes;
            if (vec >= vectors) continue;
            const int64_t c = g * cg + static_cast<int64_t>(vec) * V;
            A gyv[V], wv[V], gcol[V];
            LoadVec<T, V>(gy + c, gyv);
            LoadVec<T, V>(wk + c, wv);
#pragma unroll
            for (int v = 0; v < V; ++v) gcol[v] = gyv[v] * wv[v];
            A val[V], dvy[V], dvx[V];
#pragma unroll
            for (int v = 0; v < V; ++v) val[v] = dvy[v] = dvx[v] = t.poison;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              if (!((t.valid >> i) & 1u)) continue;
              A corner[V];
              LoadVec<T, V>(xc + static_cast<int64_t>(t.corner[i]) * s.c + c, corner);
#pragma unroll
              for (int v = 0; v < V; ++v) {
                val[v] += wgt[i] * corner[v];
                dvy[v] += wy[i] * corner[v];
                dvx[v] += wx[i] * corner[v];
              }
              if (scatter) {
                A contrib[V];
#pragma unroll
                for (int v = 0; v < V; ++v) contrib[v] = t.mask * wgt[i] * gcol[v];
                AtomicAddVec<V>(gxc + static_cast<int64_t>(t.corner[i]) * s.c + c, contrib);
              }
            }
#pragma unroll
            for (int v = 0; v < V; ++v) {
              sum_val += gcol[v] * val[v];
              sum_dy += gcol[v] * dvy[v];
              sum_dx += gcol[v] * dvx[v];
              weight_acc[r][v] += t.mask * val[v] * gyv[v];
            }
          }
          sum_dy *= t.mask;
          sum_dx *= t.mask;
        }
        sum_val = SumOverLanes(sum_val, lanes);
        sum_dy = SumOverLanes(sum_dy, lanes);
        sum_dx = SumOverLanes(sum_dx, lanes);
        if (lane == 0 && pixel >= 0) {
          A* ts = tap_sums + (lp * taps + k) * 3;
          ts[0] += sum_val;
          ts[1] += sum_dy;
          ts[2] += sum_dx;
        }
      }
      // grad_weight of this tap: sum the pixel groups in order.
      A* mine = weight_sums + threadIdx.x * (R * V);
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int v = 0; v < V; ++v) mine[r * V + v] = weight_acc[r][v];
      }
      __syncthreads();
      if (pixel_group == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int vec = slab + lane + r * lanes;
          if (vec >= vectors) continue;
          A total[V];
#pragma unroll
          for (int v = 0; v < V; ++v) total[v] = A(0);
          for (int pg = 0; pg < groups_of_pixels; ++pg) {
            const A* theirs = weight_sums + (pg * lanes + lane) * (R * V) + r * V;
#pragma unroll
            for (int v = 0; v < V; ++v) total[v] += theirs[v];
          }
          A* out = weight_partial + (static_cast<int64_t>(blockIdx.x) * taps + k) * cm +
                       g * cg + static_cast<int64_t>(vec) * V;
#pragma unroll
          for (int v = 0; v < V; ++v) out[v] = total[v];
        }
      }
      __syncthreads();
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

// grad_weight[i] = sum over tiles of the per-tile partial sums, in a fixed
// order: row r of a block sums tiles r, r + kSumRows, ... (32 columns i side by
// side, coalesced), then row 0 adds the rows in order. Many blocks in flight,
// where one thread per i summing every tile left the GPU nearly idle.
constexpr int kSumCols = 32, kSumRows = 16;

template <typename A>
__global__ void __launch_bounds__(kSumCols * kSumRows)
    SumTilesKernel(const A* __restrict__ partial, int64_t tiles, int64_t size,
                   A* __restrict__ out) {
  __shared__ A rows[kSumRows][kSumCols + 1];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kSumCols + threadIdx.x;
  A sum = A(0);
  if (i < size) {
#pragma unroll 4
    for (int64_t t = threadIdx.y; t < tiles; t += kSumRows) sum += partial[t * size + i];
  }
  rows[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && i < size) {
    A total = A(0);
#pragma unroll
    for (int r = 0; r < kSumRows; ++r) total += rows[r][threadIdx.x];
    out[i] = total;
  }
}

template <typename T>
using BackwardFn = void (*)(ConvShape, TileGrid, int, bool, const T*, const T*, const T*, const T*,
                            const T*, Accum<T>*, Accum<T>*, Accum<T>*, Accum<T>*);

// acc_bytes: sizeof the type the kernels accumulate in (float; double for float64).
size_t WeightPartialBytes(const ConvShape& s, const Plan& p, size_t acc_bytes = sizeof(float)) {
  return Align(static_cast<size_t>(p.tiles) * s.taps() * s.out_channels() * acc_bytes);
}

int VecOf(Dtype dtype) { return dtype == Dtype::kF32 ? 4 : dtype == Dtype::kF64 ? 2 : 8; }

// grad_x by the sorted gather rather than by atomics from the tile kernel.
bool UseGather(const ConvShape& s, bool deterministic) {
  if (deterministic) return true;
  if (!GatherFits(s)) return false;
  const int choice = GetTuning().grad_x;
  if (choice != 0) return choice == 2;
  // Measured on an H200 (benchmarks/RESULTS.md): with 512 channels per group
  // the gather beats atomics (whose read-modify-writes of a grad_x larger than
  // L2 reach DRAM); at 64-128 channels its fixed cost (sort, one warp per
  // input pixel) does not pay.
  return s.channels_per_group() >= 256;
}

template <typename T>
cudaError_t Backward(cudaStream_t stream, const ConvShape& s, bool deterministic, const T* x,
                     const T* offset, const T* mask, const T* weight, const T* grad_y,
                     Accum<T>* grad_x, Accum<T>* grad_offset, Accum<T>* grad_mask, Accum<T>* grad_weight,
                     void* scratch) {
  using A = Accum<T>;
  constexpr bool kWide = std::is_same_v<T, double>;
  constexpr int kVec = 16 / sizeof(T);
  const Plan p = MakePlan(s, kVec, kWide);
  const int mb = p.vec == kVec ? 1 : (s.multiplier == 1 ? 1 : 4);
  // Vectors per thread of the vector kernel: enough to cover the group's
  // channels in one slab where that is at most 4.
  const int64_t vectors = s.channels_per_group() / p.vec;
  const Tuning& tune = GetTuning();
  // Measured: float32 takes 4 vectors a thread without the atomics, 2 with
  // them (the atomics' registers); half precision 1 (V = 8 already).
  // float64 (V = 2, not tuned): at most 2.
  const int max_r = tune.backward_vectors > 0 ? tune.backward_vectors
                    : kWide                      ? 2
                    : sizeof(T) == 4             ? (UseGather(s, deterministic) ? 4 : 2)
                                                 : 1;
  int r = std::min(max_r, vectors <= p.lanes ? 1 : vectors <= 2 * p.lanes ? 2 : 4);
  const bool vector_kernel = p.vec == kVec && tune.backward_kernel != 1;
  const size_t geometry_bytes =
      p.tile_pixels * (sizeof(int64_t) + s.taps() * (sizeof(TapGeometryOf<A>) + 3 * sizeof(A)));
  // Fewer vectors a thread where their grad_weight sums would take the block
  // past the default 48 KB of shared memory (large kernels: the tap geometry
  // fills most of it).
  while (vector_kernel && r > 1 && geometry_bytes + p.threads * r * p.vec * sizeof(A) > 48 * 1024) {
    r /= 2;
  }
  const int per_thread = vector_kernel ? r * p.vec : p.vec * mb;
  const size_t smem = geometry_bytes + p.threads * per_thread * sizeof(A);
  const bool gather = UseGather(s, deterministic);
  auto* partial = static_cast<A*>(scratch);
  cudaError_t err;
  if (gather) {
    // The gather writes every element of grad_x; the atomics add into a cleared one.
    err = GradXByGather(stream, DtypeOf<T>(), s, offset, mask, weight, grad_y, grad_x,
                        static_cast<unsigned char*>(scratch) + WeightPartialBytes(s, p, sizeof(A)));
  } else {
    err = cudaMemsetAsync(grad_x, 0, s.n * s.h * s.w * s.c * sizeof(A), stream);
  }
  if (err != cudaSuccess) return err;
  const bool capped = tune.backward_min_blocks == 3;
  BackwardFn<T> fn;
  if constexpr (kWide) {  // float64: fewer variants (no register cap, R <= 2)
    if (vector_kernel) {
      fn = r == 1 ? BackwardVectorKernel<T, kVec, 1, 1> : BackwardVectorKernel<T, kVec, 2, 1>;
    } else if (p.vec == kVec) {
      fn = BackwardKernel<T, kVec, 1, 1>;
    } else {
      fn = mb == 1 ? BackwardKernel<T, 1, 1, 1> : BackwardKernel<T, 1, 4, 1>;
    }
  } else if (vector_kernel) {
    fn = r == 1 ? (capped ? BackwardVectorKernel<T, kVec, 1, 3> : BackwardVectorKernel<T, kVec, 1, 1>)
       : r == 2 ? (capped ? BackwardVectorKernel<T, kVec, 2, 3> : BackwardVectorKernel<T, kVec, 2, 1>)
                : (capped ? BackwardVectorKernel<T, kVec, 4, 3> : BackwardVectorKernel<T, kVec, 4, 1>);
  } else if (p.vec == kVec) {
    fn = BackwardKernel<T, kVec, 1, 1>;
  } else {
    fn = mb == 1 ? BackwardKernel<T, 1, 1, 1> : BackwardKernel<T, 1, 4, 1>;
  }
  const dim3 grid(static_cast<unsigned>(p.tiles), static_cast<unsigned>(s.groups));
  fn<<<grid, p.threads, smem, stream>>>(s, p.grid, p.lanes, !gather, x, offset, mask, weight,
                                        grad_y, grad_x, grad_offset, grad_mask, partial);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  const int64_t wsize = s.taps() * s.out_channels();
  SumTilesKernel<A><<<static_cast<unsigned>((wsize + kSumCols - 1) / kSumCols),
                      dim3(kSumCols, kSumRows), 0, stream>>>(partial, p.tiles, wsize, grad_weight);
  return cudaGetLastError();
}

}  // namespace

bool DeterministicBackwardFits(const ConvShape& s) { return GatherFits(s); }

size_t BackwardScratchBytes(const ConvShape& s, Dtype dtype, bool deterministic) {
  const bool wide = dtype == Dtype::kF64;
  const Plan p = MakePlan(s, VecOf(dtype), wide);
  return WeightPartialBytes(s, p, wide ? sizeof(double) : sizeof(float)) +
         (UseGather(s, deterministic) ? GatherScratchBytes(s, wide) : 0);
}

cudaError_t LaunchBackwardCuda(cudaStream_t stream, Dtype dtype, const ConvShape& s,
                               bool deterministic, const void* x, const void* offset,
                               const void* mask, const void* weight, const void* grad_y,
                               void* grad_x, void* grad_offset, void* grad_mask,
                               void* grad_weight, void* scratch) {
  return DispatchDtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    using A = Accum<T>;
    return Backward(stream, s, deterministic, static_cast<const T*>(x),
                    static_cast<const T*>(offset), static_cast<const T*>(mask),
                    static_cast<const T*>(weight), static_cast<const T*>(grad_y),
                    static_cast<A*>(grad_x), static_cast<A*>(grad_offset),
                    static_cast<A*>(grad_mask), static_cast<A*>(grad_weight), scratch);
  });
}

}  // namespace jax_deform
