// Backward kernels of depthwise deformable convolution, channels last.
//
// grad_offset, grad_mask and grad_weight come from the sample kernel
// (M = 1, channels in multiples of 4: every float32/bfloat16/float16 case a
// model meets) or else from the tile kernel (depth multipliers, odd channel
// counts, float64), which re-walks the forward's tiles. Both reduce
// grad_offset/grad_mask over the channels of a group in a fixed order and
// write grad_weight as per-block partial sums that a second kernel adds in a
// fixed order. grad_x is a scatter: either float atomics from those kernels
// (vector atomics on sm_90), or a separate gather over samples sorted by
// their top-left corner (cuda_grad_x_gather.cu), bitwise reproducible and
// chosen whenever determinism is asked for.
#include "cuda_common.cuh"
#include "cuda_grad_x_gather.h"

#include <utility>

namespace jax_deform {
namespace {

using namespace cuda_detail;  // NOLINT: this file's own helpers

template <typename A>
__device__ __forceinline__ A SumOverLanes(A v, int lanes) {
  for (int d = lanes / 2; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

// The tile kernel's shared memory, sized by the host and carved up by the
// kernel: the tile's pixel indices, its tap geometry [pixel][tap], the
// per-(pixel, tap) sums [pixel][tap][3], then each thread's grad_weight
// accumulators [threads][per_thread].
template <typename A>
struct TileBackwardSmem {
  int pixels, taps;
  // per_thread: V * MB accumulators.
  __host__ __device__ size_t Bytes(int threads, int per_thread) const {
    return pixels * (sizeof(int64_t) + taps * (sizeof(TapGeometryOf<A>) + 3 * sizeof(A))) +
           static_cast<size_t>(threads) * per_thread * sizeof(A);
  }
  __device__ int64_t* PixelOf(unsigned char* smem) const { return reinterpret_cast<int64_t*>(smem); }
  __device__ TapGeometryOf<A>* Geometry(unsigned char* smem) const {
    return reinterpret_cast<TapGeometryOf<A>*>(PixelOf(smem) + pixels);
  }
  __device__ A* TapSums(unsigned char* smem) const {
    return reinterpret_cast<A*>(Geometry(smem) + pixels * taps);
  }
  __device__ A* WeightSums(unsigned char* smem) const { return TapSums(smem) + pixels * taps * 3; }
};

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
  const TileBackwardSmem<A> layout{tile_pixels, taps};
  int64_t* pixel_of = layout.PixelOf(smem);
  TapGeometryOf<A>* geom = layout.Geometry(smem);
  A* tap_sums = layout.TapSums(smem);        // [pixel][tap][3]
  A* weight_sums = layout.WeightSums(smem);  // [threads][V*MB]

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

// ---------------------------------------------------------------------------
// The sample kernel (M = 1, channels in vectors of 4): pixel-major, like the
// forward. A warp (or a sub-warp of L lanes when a group has fewer channels)
// takes one output pixel at a time; its lanes own R vectors of V consecutive
// channels each of one channel slice (L * R * V channels) of the offset group. For each tap of
// the block's tap chunk a lane samples its channels once and accumulates, in
// registers:
//   * the pixel's channel sums of grad_mask and grad_offset (3 per tap), which
//     one butterfly reduce-scatter over the lanes then turns into one sum per
//     lane (31 shuffles for 9 taps, where a reduction per value takes 135), so
//     lane i writes value i;
//   * grad_weight of (tap, its channels) over every pixel it visits, in the
//     thread's own slots of shared memory (registers would spill), summed
//     over the block's warps in a fixed order at the end into per-block
//     partial sums (then SumTilesKernel).
// No shared-memory atomics, no block barrier inside the pixel loop, every sum
// in a fixed order. Slices of one group (more than L * R * V channels) write
// partial grad_offset/grad_mask that SumSlicesKernel adds in slice order.
//
// Warps a block, and blocks an SM the registers must allow: with three
// vectors a lane the grad_weight slots (SampleSharedBytes) of two 8-warp
// blocks would overflow an SM's shared memory, so 5-warp blocks, 3 an SM.
constexpr int SampleWarps(int rounds) { return rounds == 3 ? 5 : 8; }
constexpr int SampleMinBlocks(int rounds) { return rounds == 3 ? 3 : 2; }
constexpr int kSampleVec = 4;   // channels per lane access (16 bytes in float32)
constexpr int kSampleSums = 32; // 3 sums per tap, padded to the butterfly's width
// Taps a block takes (kernels with more taps split them over grid.z chunks,
// each of which repeats the pixel's grad_y loads, offsets and reductions):
// 10, whose 30 sums fit the butterfly, so 7x7 takes five chunks, not six
// (9, 9, 9, 9, 9 and 4 taps); 9 with three vectors a lane, whose grad_weight
// slots for a tenth tap would not fit three blocks an SM.
constexpr int SampleTaps(int rounds) { return rounds == 3 ? 9 : 10; }
static_assert(3 * SampleTaps(1) <= kSampleSums, "a tap chunk's sums must fit one butterfly");

// Sums a[0..32) over the L lanes of each sub-warp; afterwards lane l of the
// sub-warp holds the sum of a[l * (32 / L) + j] in a[j], j < 32 / L.
template <int L, typename A>
__device__ __forceinline__ void ReduceScatter(A (&a)[kSampleSums], int lane) {
  int n = kSampleSums;
#pragma unroll
  for (int d = L / 2; d > 0; d /= 2) {
    const bool upper = lane & d;
    n /= 2;
#pragma unroll
    for (int j = 0; j < kSampleSums / 2; ++j) {
      if (j < n) {
        const A keep = upper ? a[n + j] : a[j];
        const A send = upper ? a[j] : a[n + j];
        a[j] = keep + __shfl_xor_sync(0xffffffffu, send, d);
      }
    }
  }
}

struct SamplePlan {
  int vec;         // V: channels a lane reads at once (4; 8 for 16-bit types)
  int lanes;       // L: lanes per pixel (8, 16 or 32)
  int rounds;      // R: channel vectors per lane (1, 2 or 3)
  int warps;       // warps per block (fewer with 3 vectors a lane: shared memory)
  int slices;      // channel slices of L * R * V channels per offset group
  int chunks;      // tap chunks of up to SampleTaps(rounds) taps
  int chunk_taps;  // taps of the largest chunk: min(SampleTaps(rounds), taps)
  int mask_row;    // G * taps: a pixel's row of mask (of offset: twice that)
  int band_bits;   // log2 of the output rows of a band (SampleVisits)
  int64_t visits, pixels_per_block, blocks_x;  // pixels_per_block: visits a block
};

// What the sample kernel needs of one (pixel, tap), made once per pixel by
// the lane that owns the tap and read by all lanes of the sub-warp: where
// each corner's channels start in x (byte offset of channel 0, image
// included, in 32 bits; -1 where the corner lies outside the image), the
// fractional position, the mask and the poison. Whole offsets keep the
// channel loop to the loads and multiply-adds (redoing corner * C in 64 bits
// cost as much as the sampling itself); the bilinear weights are remade per
// lane from (ly, lx), a few multiplies, which halves the table that every
// lane reads per tap (the kernel's shared-memory reads share L1's bandwidth
// with its corner loads).
template <typename A>
struct alignas(16) SampleTapOf {
  int32_t start[4];
  A ly, lx, mask, poison;
};

// What a lane keeps of its tap across pixels: where the tap sits relative
// to the output pixel's input position, and where its offsets and mask sit
// in a pixel's row of those tensors. Made once per block, so the pixel loop
// divides nothing (the tap's row and column, and the pixel's image, row and
// column, cost four integer divisions a pixel before).
struct SampleTapConst {
  int tap_y, tap_x;  // tap row * dilation - padding, likewise the column
  int offset;  // index of its (dy, dx) in a pixel's row of offsets; half that in mask's row
};

__device__ __forceinline__ SampleTapConst MakeSampleTapConst(const ConvShape& s, int64_t g, int k) {
  const int kw = static_cast<int>(s.kw), ky = k / kw, kx = k - ky * kw;
  return {static_cast<int>(ky * s.dil_h - s.pad_h), static_cast<int>(kx * s.dil_w - s.pad_w),
          static_cast<int>((g * s.taps() + k) * 2)};
}

// The order the sample kernel visits output pixels in: bands of 2^band_bits
// output rows, column by column, each column's rows in turn (band_bits 0: row
// by row). A band's rows read mostly the same input rows, so a block meets
// a corner again soon after it was first read (row by row, a 7x7 kernel's
// input row comes back only a whole output row later: SampleBandBits says
// where the bands paid). Visits whose row lies past the image's last (its
// last band padded to the full height) are skipped.
constexpr int kMaxSampleBandBits = 6;  // bands of up to 64 rows (tuning runs)
__host__ __device__ inline int64_t SampleVisits(const ConvShape& s, int band_bits) {
  const int64_t rows = int64_t{1} << band_bits;
  return s.n * ((s.ho + rows - 1) >> band_bits) * rows * s.wo;
}

// The output pixel a sub-warp is at: its image, band, column and row in the
// band, moved along by additions as the sub-warp steps through its visits.
struct PixelCursor {
  int image, band_y0, ox, row;
  __device__ __forceinline__ int oy() const { return band_y0 + row; }
  __device__ __forceinline__ void Advance(int step, int ho, int wo, int band_bits) {
    const int v = row + step;
    row = v & ((1 << band_bits) - 1);
    ox += v >> band_bits;
    while (ox >= wo) {
      ox -= wo;
      band_y0 += 1 << band_bits;
      if (band_y0 >= ho) band_y0 = 0, ++image;
    }
  }
};

__device__ __forceinline__ PixelCursor VisitAt(const ConvShape& s, int band_bits, int64_t visit) {
  const int64_t rows = int64_t{1} << band_bits, band_visits = rows * s.wo;
  const int64_t bands = (s.ho + rows - 1) >> band_bits;
  const int64_t band = visit / band_visits, within = visit - band * band_visits;
  return {static_cast<int>(band / bands), static_cast<int>((band % bands) << band_bits),
          static_cast<int>(within >> band_bits), static_cast<int>(within & (rows - 1))};
}

// The tap record of (pixel at `at`, tap `tc`) from its offsets and mask
// (SampleKernelFits: x is under 2 GiB, so 32-bit byte offsets).
template <typename T, typename A>
__device__ __forceinline__ SampleTapOf<A> MakeSampleTap(const ConvShape& s, const PixelCursor& at,
                                                        const SampleTapConst& tc,
                                                        const TapOperands<A>& in) {
  const TapSampleOf<A, int32_t> t =
      SampleAt<T, int32_t>(s, at.image, at.oy(), at.ox, tc.tap_y, tc.tap_x, in.dy, in.dx);
  SampleTapOf<A> tap;
#pragma unroll
  for (int i = 0; i < 4; ++i) tap.start[i] = t.start[i];
  tap.ly = t.ly;
  tap.lx = t.lx;
  tap.mask = in.mask;
  tap.poison = t.poison;
  return tap;
}

// 32-bit tap offsets need x under 2 GiB, 32-bit positions PositionsFit, and
// 32-bit pixel indices visits that fit; other problems take the tile kernel.
inline bool SampleKernelFits(const ConvShape& s, bool wide) {
  const int64_t x_bytes = s.n * s.h * s.w * s.c * int64_t{sizeof(float)};
  return !wide && s.multiplier == 1 && s.channels_per_group() % kSampleVec == 0 &&
         x_bytes <= INT32_MAX && PositionsFit(s) && SampleVisits(s, kMaxSampleBandBits) <= INT32_MAX;
}

// Channels a lane reads at once: 4, or for 16-bit types 8 (one 16-byte load
// rather than two of 8 bytes, so half the load and address instructions a
// channel: at 4 the bfloat16 kernel, issue-bound, ran slower than float32's)
// where the group's channels come in eights, more than 64 of them (16 lanes
// or more: the 8-lane variant spilled, and at 64 channels 16 lanes of 4
// take as many loads), and grad_x comes from the gather. Only one vector a
// lane then. Measured on an H100 (benchmarks/RESULTS.md, ffaeb14), bf16
// fwd+bwd kernel ms, 4 -> 8: 1.312 -> 1.262 at (16, 64, 64, 512), 0.891 ->
// 0.820 at (8, 128, 128, 128), 3.140 -> 2.852 and 1.309 -> 1.181 at 7x7 with
// 96 and 192 channels. With grad_x by atomics a lane's 8 channels took two
// 16-byte atomics 32 bytes apart across the warp, twice the L2 sector
// operations: the sample kernel went 0.683 -> 1.092 ms (3x3 stride 2, 96
// channels) and 0.042 -> 0.073 (batch 1, 512 channels).
inline int SampleVecFor(const ConvShape& s, size_t elem_bytes, bool gather) {
  const int64_t cg = s.channels_per_group();
  return elem_bytes == 2 && gather && cg % 8 == 0 && cg > 64 && GetTuning().sample_vec != 4 ? 8 : 4;
}

// The (lanes, vectors a lane) pairs the sample kernel is built for.
// (8 or 16 lanes with 2 vectors: never the fit below, and they spill.)
constexpr int kSampleShapes[][2] = {{8, 1}, {16, 1}, {32, 1}, {32, 2}, {8, 3}, {16, 3}, {32, 3}};

inline bool SampleShapeBuilt(int lanes, int rounds) {
  for (const auto& lr : kSampleShapes) {
    if (lr[0] == lanes && lr[1] == rounds) return true;
  }
  return false;
}

// Lanes L (at least min_lanes) and vectors a lane R for a group of `vectors`
// channel vectors: the fewest slices (each slice redoes the pixel's
// geometry, offset loads and reductions), then the fewest lane slots
// (slices * L * R: idle lanes cost as much as busy ones), then the most lanes.
// Returns the lane slots of the fit.
inline int64_t FitSampleLanes(int64_t vectors, int min_lanes, int& lanes, int& rounds) {
  int64_t best_slices = -1, best_slots = 0;
  lanes = 32, rounds = 1;
  for (const auto& lr : kSampleShapes) {
    if (lr[0] < min_lanes) continue;
    const int64_t per = lr[0] * lr[1], slices = (vectors + per - 1) / per, slots = slices * per;
    if (best_slices < 0 || slices < best_slices || (slices == best_slices && slots < best_slots) ||
        (slices == best_slices && slots == best_slots && lr[0] > lanes)) {
      best_slices = slices, best_slots = slots, lanes = lr[0], rounds = lr[1];
    }
  }
  return best_slots;
}

// The plan's slices, tap chunks and blocks for its lanes and vectors a lane.
inline SamplePlan WithSampleGrid(const ConvShape& s, SamplePlan p) {
  const int64_t vectors = s.channels_per_group() / p.vec;
  p.warps = SampleWarps(p.rounds);
  p.slices = static_cast<int>((vectors + p.lanes * p.rounds - 1) / (p.lanes * p.rounds));
  p.chunks = static_cast<int>((s.taps() + SampleTaps(p.rounds) - 1) / SampleTaps(p.rounds));
  p.chunk_taps = static_cast<int>(std::min<int64_t>(SampleTaps(p.rounds), s.taps()));
  p.mask_row = static_cast<int>(s.mask_channels());
  p.visits = SampleVisits(s, p.band_bits);
  const int64_t step = p.warps * (32 / p.lanes);  // pixels a block visits at once
  // About eight blocks per SM over the whole grid, but at least 4 steps a
  // block, so the per-block grad_weight partial sums stay small.
  const int64_t others = static_cast<int64_t>(p.slices) * s.groups * p.chunks;
  const int64_t want_blocks = std::max<int64_t>(1, 8 * SmCount() / others);
  int64_t per_block = (p.visits + want_blocks - 1) / want_blocks;
  per_block = std::max<int64_t>(4 * step, (per_block + step - 1) / step * step);
  p.pixels_per_block = per_block;
  p.blocks_x = (p.visits + per_block - 1) / per_block;
  return p;
}

// Bands of 8 output rows (SampleVisits), or of 4 or 2 where 8 would pad the
// image's rows by more than an eighth (28 rows: 4; 14 rows: 2), for kernels
// of more than 9 taps or strides over 1; row by row otherwise. Measured on an
// H200 (benchmarks/RESULTS.md, "Sample kernel in bands"; tuning key
// sample_band_rows=1 for rows), fwd+bwd kernel ms, rows -> bands: 3x3 stride
// 2 with 96 channels 0.824 -> 0.716 float32, 0.776 -> 0.711 bfloat16; 5x5
// with 144 channels 2.578 -> 2.434 float32; 7x7 with 96 channels 2.776 ->
// 2.667 float32; within 1% at 7x7 with 192 and 384 channels and at 3x3 with
// 128 and 512, but 1.5-2% slower at 3x3 with 64 channels (16 lanes and the
// grad_x atomics), hence rows there.
inline int SampleBandBits(const ConvShape& s) {
  if (s.taps() <= 9 && s.stride_h == 1 && s.stride_w == 1) return 0;
  for (int bits = 3; bits > 0; --bits) {
    const int64_t rows = int64_t{1} << bits, padded = (s.ho + rows - 1) / rows * rows;
    if (8 * (padded - s.ho) <= s.ho) return bits;
  }
  return 0;
}

// Measured on an H200 (benchmarks/RESULTS.md, "What changed at 1a3b4c3"):
// two vectors a lane pay where both rounds are full (512 channels: 2 slices
// of 32 x 2 instead of 4 of 32, 5-8% faster); a fitted plan of 16 lanes or
// more pays where the default leaves over 40% of the lanes idle (144
// channels: one slice of 16 x 3 instead of 2 x 32 lanes, 4-7%); 8 lanes x 3
// for 96 channels and 3 vectors a lane at 192 and 384 channels were slower
// (tuning key sample_fit=1 forces the fit over 8 lanes and up).
inline SamplePlan MakeSamplePlan(const ConvShape& s, size_t elem_bytes, bool gather) {
  SamplePlan p;
  const int vec = p.vec = SampleVecFor(s, elem_bytes, gather);
  const int64_t vectors = s.channels_per_group() / vec;
  const Tuning& tune = GetTuning();
  p.lanes = static_cast<int>(std::max<int64_t>(8, std::min<int64_t>(32, FloorPow2(2 * vectors - 1))));
  p.rounds = p.lanes == 32 && vectors % 64 == 0 ? 2 : 1;
  const int64_t default_slots = (vectors + p.lanes - 1) / p.lanes * p.lanes;
  // The fit is over the 4-channel shapes (8-channel vectors take one a lane:
  // a fit of 16 x 3 cut to 16 x 1 would take 3 slices where 32 lanes take 2).
  if (vec == 4 && tune.sample_fit == 1) {
    FitSampleLanes(vectors, 8, p.lanes, p.rounds);
  } else if (vec == 4 && 10 * vectors < 6 * default_slots) {
    int lanes, rounds;
    if (FitSampleLanes(vectors, 16, lanes, rounds) < default_slots) p.lanes = lanes, p.rounds = rounds;
  }
  // Tuning runs: forced lanes (e.g. 144 channels: 36 vectors on 8 lanes
  // rather than 2 x 32) and vectors a lane (fewer slices, so the per-pixel
  // geometry, offset loads and reductions are paid once per L * R vectors).
  if (tune.sample_lanes > 0) p.lanes = std::max(8, std::min(32, tune.sample_lanes));
  if (tune.sample_rounds > 0) p.rounds = std::max(1, std::min(3, tune.sample_rounds));
  // No more vectors a lane than the group needs.
  while (p.rounds > 1 && (p.rounds - 1) * p.lanes >= vectors) --p.rounds;
  // 8-channel vectors: one a lane (their corners alone fill 32 registers),
  // 16 lanes or more.
  if (vec == 8) p.lanes = std::max(16, p.lanes);
  if (vec == 8 || !SampleShapeBuilt(p.lanes, p.rounds)) p.rounds = 1;
  p.band_bits = SampleBandBits(s);
  if (tune.sample_band_rows > 0) {  // tuning runs (a power of two; 1: row by row)
    for (p.band_bits = 0; (2 << p.band_bits) <= tune.sample_band_rows;) ++p.band_bits;
  }
  p = WithSampleGrid(s, p);
  // A grid under one wave (batch 1, e.g. (1, 32, 32, 512): 64 blocks on 132
  // SMs, each at its least pixels) takes narrower channel slices where
  // SmallGridPlansPay: 16 lanes, one vector a lane (8 slices there, 128
  // blocks). Measured on an H200 (benchmarks/RESULTS.md, tuning key
  // sample_lanes=16): (1, 32, 32, 512) fwd+bwd 0.0654 -> 0.0500 ms float32,
  // 0.0806 -> 0.0668 bfloat16 (two vectors a lane fewer, at 32 lanes: 0.0531,
  // 0.0697).
  const int64_t blocks = p.blocks_x * p.slices * s.groups * p.chunks;
  const bool tuned = tune.sample_lanes > 0 || tune.sample_rounds > 0 || tune.sample_fit == 1;
  const bool eligible = vec == 4 && p.lanes == 32 && !tuned && SmallGridPlansPay(s);
  const int small_grid = CurrentPlanAssumptions().small_grid;
  if (eligible && small_grid != 0 && blocks < SmCount()) {
    p.lanes = 16, p.rounds = 1;
    p = WithSampleGrid(s, p);
  }
  return p;
}

// The sample kernel's shared memory, sized by the host and carved up by the
// kernel: each sub-warp's tap records for a whole chunk [sub-warp][KC], then
// the grad_weight slots [tap][R][V / 4][threads][4], only for the taps a
// chunk has (3x3: 9 of 10), which keeps two 32 x 2 blocks within an SM's
// 164 KB shared-memory step.
template <typename A>
struct SampleSmem {
  int sub_warps, chunk_slots;  // chunk_slots: KC, SampleTaps(R)
  __host__ __device__ size_t RecordBytes() const {
    return static_cast<size_t>(sub_warps) * chunk_slots * sizeof(SampleTapOf<A>);
  }
  __host__ __device__ size_t Bytes(int chunk_taps, int rounds, int vec, int threads) const {
    return RecordBytes() + static_cast<size_t>(chunk_taps) * rounds * vec * threads * sizeof(A);
  }
  __device__ SampleTapOf<A>* Records(unsigned char* smem, int sub_warp) const {
    return reinterpret_cast<SampleTapOf<A>*>(smem) + sub_warp * chunk_slots;
  }
  __device__ A* WeightSums(unsigned char* smem) const {
    return reinterpret_cast<A*>(reinterpret_cast<SampleTapOf<A>*>(smem) + sub_warps * chunk_slots);
  }
};

template <typename A>
inline size_t SampleSharedBytes(const SamplePlan& p) {
  return SampleSmem<A>{p.warps * (32 / p.lanes), SampleTaps(p.rounds)}.Bytes(p.chunk_taps, p.rounds, p.vec,
                                                                          p.warps * 32);
}

// Two 8-warp blocks per SM (measured on an H200: faster than three with
// spills), or three 5-warp blocks with three vectors a lane.
// R: channel vectors per lane (vector q of lane l is slice * L * R + q * L + l).
// kMayScatter: false builds the variant for the gather path, without the
// grad_x atomics (a quarter of the loop's code: 2853 instructions against
// 3841 at 32 x 2, so less for the instruction cache to hold).
// V: channels a vector (SampleVecFor).
template <typename T, int L, int R, bool kMayScatter = true, int V = kSampleVec>
__global__ void __launch_bounds__(SampleWarps(R) * 32, SampleMinBlocks(R))
    BackwardSampleKernel(ConvShape s, SamplePlan plan, bool scatter, const T* __restrict__ x,
                         const T* __restrict__ offset, const T* __restrict__ mask,
                         const T* __restrict__ weight, const T* __restrict__ grad_y,
                         Accum<T>* __restrict__ grad_x, Accum<T>* __restrict__ grad_offset,
                         Accum<T>* __restrict__ grad_mask, Accum<T>* __restrict__ slice_partial,
                         Accum<T>* __restrict__ weight_partial) {
  using A = Accum<T>;
  constexpr int KC = SampleTaps(R), kSub = 32 / L, kPer = kSampleSums / L;
  // Unpredicated corner loads for taps inside the image: measured on an H200
  // (benchmarks/RESULTS.md, "Session candidates"), sample kernel ms, they
  // paid only in the 32-lane bfloat16 variant (512 channels: 0.531 -> 0.482)
  // and cost 1-4% in the others (float32 512: 0.522 -> 0.544; 7x7 with 96
  // channels, 16 lanes: 1.049 -> 1.071 bfloat16, 1.191 -> 1.209 float32).
  constexpr bool kInteriorLoads = L == 32 && V == 8;
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / 32, sub = (threadIdx.x % 32) / L, lane = threadIdx.x % L;
  const SampleSmem<A> layout{plan.warps * kSub, KC};
  SampleTapOf<A>* geo = layout.Records(smem, warp * kSub + sub);
  // grad_weight accumulators [KC][R][V / 4][threads][4]: a lane's V sums
  // in 16-byte quads, and each quad of a warp's lanes one contiguous 512
  // bytes. (At V = 8 the lanes' 32-byte slots side by side made every
  // access two wavefronts where one serves: 44% of the bfloat16 kernel's
  // shared-memory wavefronts, by Nsight Compute.)
  constexpr int kQuads = V / 4;
  static_assert(V % 4 == 0, "grad_weight slots hold quads of channels");
  A* weight_sums = layout.WeightSums(smem);
  A* my_weight_sums = weight_sums + threadIdx.x * 4;
  // The block is SampleWarps(R) warps (MakeSamplePlan), so the strides are
  // immediates of the shared-memory accesses (with blockDim.x they took
  // registers, and the 8-channel variants spilled).
  constexpr int kThreads = SampleWarps(R) * 32;
  constexpr int quad_stride = kThreads * 4;  // between a slot's quads
  constexpr int tap_stride = kThreads * V;   // between (tap, vector) slots

  const int64_t taps = s.taps(), cg = s.channels_per_group(), cm = s.out_channels();
  const int64_t pixels = s.n * s.ho * s.wo;
  const int64_t g = blockIdx.y / plan.slices;
  const int slice = blockIdx.y % plan.slices;
  // The lane's vector q is channels c0 + q * L * V ...: one base address a
  // tensor, and each vector's at a fixed distance from it (an immediate
  // offset in the loads). Vectors past the group's channels are never read.
  bool active[R];
#pragma unroll
  for (int q = 0; q < R; ++q) active[q] = (slice * R + q) * L + lane < cg / V;
  const int64_t c0 = g * cg + static_cast<int64_t>(slice * R * L + lane) * V;
  constexpr int kVecStride = L * V;  // channels between a lane's vectors
  const char* x_lane = reinterpret_cast<const char*>(x + c0);
  const int k0 = blockIdx.z * KC;
  const T* weight_lane = weight + k0 * cm + c0;
  const int kc = static_cast<int>(min(static_cast<int64_t>(KC), taps - k0));
  const int64_t p_begin = blockIdx.x * plan.pixels_per_block;
  const int64_t p_end = min(plan.visits, p_begin + plan.pixels_per_block);
  const int ho = static_cast<int>(s.ho), wo = static_cast<int>(s.wo);
  // The pixel of a visit, or -1 for a padded row or a visit past the block's.
  // (In 32 bits: SampleKernelFits.)
  auto pixel_at = [&](const PixelCursor& c, int64_t visit) -> int {
    return visit < p_end && c.oy() < ho ? (c.image * ho + c.oy()) * wo + c.ox : -1;
  };

#pragma unroll
  for (int t = 0; t < KC * R; ++t) {
    if (t < kc * R) {  // slots exist for the chunk's taps only (SampleSharedBytes)
#pragma unroll
      for (int v = 0; v < V; ++v) my_weight_sums[t * tap_stride + (v / 4) * quad_stride + v % 4] = A(0);
    }
  }
  // Lane l of a sub-warp makes the records of taps l, l + L, ... and loads
  // their offsets and mask one pixel ahead, so their latency hides behind the
  // current pixel's samples.
  constexpr int kAhead = (KC + L - 1) / L;
  const int step = plan.warps * kSub;  // pixels the block visits at once
  SampleTapConst tap_const[kAhead];
#pragma unroll
  for (int r = 0; r < kAhead; ++r) {
    const int t = lane + r * L;
    tap_const[r] = MakeSampleTapConst(s, g, k0 + (t < kc ? t : 0));
  }
  TapOperands<A> ahead[kAhead];
  auto load_ahead = [&](int pixel) {
#pragma unroll
    for (int r = 0; r < kAhead; ++r) {
      const int t = lane + r * L;
      if (pixel >= 0 && t < kc) {
        // A pixel's rows: 2 G taps offsets, G taps masks (plan.mask_row).
        const int64_t at_mask = static_cast<int64_t>(pixel) * plan.mask_row + (tap_const[r].offset >> 1);
        ahead[r] = {ToF(offset[2 * at_mask]), ToF(offset[2 * at_mask + 1]),
                    mask ? ToF(mask[at_mask]) : A(1)};
      }
    }
  };
  PixelCursor at = VisitAt(s, plan.band_bits, p_begin + warp * kSub + sub);
  int pixel = pixel_at(at, p_begin + warp * kSub + sub);
  load_ahead(pixel);
  // Warp-uniform trip count: every lane reaches the shuffles.
  for (int64_t p0 = p_begin + warp * kSub; p0 < p_end; p0 += step) {
    const bool pixel_valid = pixel >= 0;
    __syncwarp();
#pragma unroll
    for (int r = 0; r < kAhead; ++r) {
      const int t = lane + r * L;
      if (pixel_valid && t < kc) geo[t] = MakeSampleTap<T>(s, at, tap_const[r], ahead[r]);
    }
    __syncwarp();
    at.Advance(step, ho, wo, plan.band_bits);  // the records are made: on to the next visit
    const int next_pixel = pixel_at(at, p0 + step + sub);
    load_ahead(next_pixel);
    A sums[kSampleSums];
#pragma unroll
    for (int i = 0; i < kSampleSums; ++i) sums[i] = A(0);
    if (pixel_valid && active[0]) {  // vector 0 is the lane's first: none past it is active
      A gy[R][V];
#pragma unroll
      for (int q = 0; q < R; ++q) {
        if (active[q]) LoadVec<T, V>(grad_y + pixel * cm + c0 + q * kVecStride, gy[q]);
      }
      // The lane's weights of tap k0, walked along the taps by one add a tap.
      // The empty asm hides that it is the same address every pixel: else
      // the compiler keeps all KC * R weight addresses live across the pixel
      // loop, and with two vectors a lane they spilled.
      const T* weight_tap = weight_lane;
      asm volatile("" : "+l"(weight_tap));
#pragma unroll
      for (int t = 0; t < KC; ++t, weight_tap += cm) {
        if (t < kc) {
          const SampleTapOf<A>& tap = geo[t];
          // The sample value of each channel is formed as the reference
          // forms it (sum_i w_i * corner_i, then times the mask), so grad_mask
          // and grad_weight have its IEEE infs and NaNs when mask or weight
          // holds them. d/dy and d/dx are linear in the corners: with dot_i =
          // sum over channels of gcol * corner_i they are sum_i w'_i * dot_i,
          // 8 multiply-adds a channel fewer than differentiating per channel.
          const A mask_t = tap.mask, poison = tap.poison, ly = tap.ly, lx = tap.lx;
          const A hy = A(1) - ly, hx = A(1) - lx;
          // Corners outside the image read as zeros, so the weights need no
          // validity factor: whatever multiplies a zero adds nothing.
          const A wgt[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
          const bool all_inside =
              kInteriorLoads && (tap.start[0] | tap.start[1] | tap.start[2] | tap.start[3]) >= 0;
          A dot[4] = {A(0), A(0), A(0), A(0)}, sum_val = A(0);
#pragma unroll
          for (int q = 0; q < R; ++q) {
            if (!active[q]) continue;  // a lane past the group's channels adds nothing
            const char* xc = x_lane + q * kVecStride * int{sizeof(T)};
            A wv[V], gcol[V];
            LoadVec<T, V>(weight_tap + q * kVecStride, wv);
#pragma unroll
            for (int v = 0; v < V; ++v) gcol[v] = gy[q][v] * wv[v];
            // All four corners are loaded before any is used, so their loads
            // are in flight together rather than one branch at a time. In the
            // 32-lane 8-channel variant a tap with all four in the image
            // (nearly all) loads them unpredicated; only the others zero the
            // corners outside (kInteriorLoads).
            A corner[4][V];
            if (all_inside) {
#pragma unroll
              for (int i = 0; i < 4; ++i) {
                LoadVec<T, V>(reinterpret_cast<const T*>(xc + tap.start[i]), corner[i]);
              }
            } else {
#pragma unroll
              for (int i = 0; i < 4; ++i) {
                if (tap.start[i] >= 0) {
                  LoadVec<T, V>(reinterpret_cast<const T*>(xc + tap.start[i]), corner[i]);
                } else {
#pragma unroll
                  for (int v = 0; v < V; ++v) corner[i][v] = A(0);
                }
              }
            }
            A* my_sums = my_weight_sums + (t * R + q) * tap_stride;
            A gw[kQuads][4];
#pragma unroll
            for (int h = 0; h < kQuads; ++h) LoadVec<A, 4>(my_sums + h * quad_stride, gw[h]);
#pragma unroll
            for (int v = 0; v < V; ++v) {
              A val = poison;
#pragma unroll
              for (int i = 0; i < 4; ++i) {
                val += wgt[i] * corner[i][v];
                dot[i] += gcol[v] * corner[i][v];
              }
              sum_val += gcol[v] * val;
              gw[v / 4][v % 4] += (val * mask_t) * gy[q][v];
            }
#pragma unroll
            for (int h = 0; h < kQuads; ++h) StoreVec<A, 4>(my_sums + h * quad_stride, gw[h]);
            if (kMayScatter && scatter) {
#pragma unroll
              for (int i = 0; i < 4; ++i) {
                if (tap.start[i] < 0) continue;
                A contrib[V];
#pragma unroll
                for (int v = 0; v < V; ++v) contrib[v] = mask_t * wgt[i] * gcol[v];
                AtomicAddVec<V>(grad_x + c0 + q * kVecStride + static_cast<unsigned>(tap.start[i]) / sizeof(T), contrib);
              }
            }
          }
          // sum_i w'_i dot_i for the weights' y and x derivatives
          // (CornerWeightGrads), factored.
          const A top = hx * dot[0] + lx * dot[1], bottom = hx * dot[2] + lx * dot[3];
          sums[3 * t] += sum_val;
          sums[3 * t + 1] += poison + (bottom - top);
          sums[3 * t + 2] += poison + (hy * (dot[1] - dot[0]) + ly * (dot[3] - dot[2]));
        }
      }
    }
    ReduceScatter<L>(sums, lane);
    if (pixel_valid) {
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int i = lane * kPer + j, t = i / 3, part = i % 3;
        if (t >= kc) continue;
        // grad_mask: the plain sum; grad_offset: times the mask.
        const A value = part == 0 ? sums[j] : sums[j] * geo[t].mask;
        const int64_t k = k0 + t;
        if (plan.slices > 1) {
          slice_partial[((slice * pixels + pixel) * s.groups + g) * taps * 3 + k * 3 + part] = value;
        } else if (part == 0) {
          if (grad_mask) grad_mask[MaskIndex(s, pixel, g, k)] = value;
        } else {
          grad_offset[OffsetIndex(s, pixel, g, k) + part - 1] = value;
        }
      }
    }
    pixel = next_pixel;
  }
  // grad_weight: this block's sum over its warps and sub-warps, in order.
  __syncthreads();
  for (int e = threadIdx.x; e < KC * R * L * V; e += blockDim.x) {
    const int tq = e / (L * V), t = tq / R, l = (e / V) % L, v = e % V;
    const int vec = (slice * R + tq % R) * L + l;
    if (t >= kc || vec >= cg / V) continue;
    A total = A(0);
    const A* slot = weight_sums + tq * tap_stride + (v / 4) * quad_stride + l * 4 + v % 4;
    for (int w = 0; w < plan.warps * kSub; ++w) total += slot[w * L * 4];
    weight_partial[(blockIdx.x * taps + k0 + t) * cm + g * cg + vec * V + v] = total;
  }
}

// grad_offset and grad_mask of a group split into channel slices: the slices'
// partial sums added in slice order.
template <typename A>
__global__ void SumSlicesKernel(ConvShape s, int slices, const A* __restrict__ partial,
                                A* __restrict__ grad_offset, A* __restrict__ grad_mask) {
  const int64_t pixels = s.n * s.ho * s.wo, per_slice = pixels * s.groups * s.taps();
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= per_slice) return;
  A sum[3] = {A(0), A(0), A(0)};
  for (int sl = 0; sl < slices; ++sl) {
#pragma unroll
    for (int i = 0; i < 3; ++i) sum[i] += partial[(sl * per_slice + e) * 3 + i];
  }
  const int64_t pixel = e / (s.groups * s.taps()), g = (e / s.taps()) % s.groups, k = e % s.taps();
  if (grad_mask) grad_mask[MaskIndex(s, pixel, g, k)] = sum[0];
  const int64_t oi = OffsetIndex(s, pixel, g, k);
  grad_offset[oi] = sum[1];
  grad_offset[oi + 1] = sum[2];
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
  // Measured on an H100 (benchmarks/RESULTS.md, 8c7d04d): atomics into a
  // grad_x that L2 holds beat the gather's fixed cost (sort, four kernels)
  // at batch 1 (0.067 against 0.097 ms); above that the gather wins with
  // 128+ channels a group (0.89 against 1.09 ms at 128) or 25+ taps (where
  // the sample kernel without atomics takes half the time); 3x3 at 64-96
  // channels stays with atomics (0.42 against 0.46 ms).
  const int64_t grad_x_bytes = s.n * s.h * s.w * s.c * int64_t{sizeof(float)};
  if (grad_x_bytes <= (int64_t{8} << 20)) return false;
  return s.channels_per_group() >= 128 || s.taps() >= 25;
}

size_t SampleScratchBytes(const ConvShape& s, const SamplePlan& p);
bool UseSampleKernel(const ConvShape& s, bool wide);

// Scratch of the kernel that computes grad_offset, grad_mask and grad_weight;
// the gather's scratch follows it.
size_t KernelScratchBytes(const ConvShape& s, const Plan& p, bool wide, size_t elem_bytes,
                          bool gather) {
  if (UseSampleKernel(s, wide)) {
    return SampleScratchBytes(s, MakeSamplePlan(s, elem_bytes, gather));
  }
  return WeightPartialBytes(s, p, wide ? sizeof(double) : sizeof(float));
}

// The sample kernel's per-block grad_weight partial sums: the head of its scratch.
size_t SampleWeightPartialBytes(const ConvShape& s, const SamplePlan& p) {
  return Align(static_cast<size_t>(p.blocks_x) * s.taps() * s.out_channels() * sizeof(float));
}

// Scratch of the sample kernel: per-block grad_weight partial sums, then
// per-slice grad_offset/grad_mask partial sums when a group has several slices.
size_t SampleScratchBytes(const ConvShape& s, const SamplePlan& p) {
  const size_t weight = SampleWeightPartialBytes(s, p);
  const size_t slices =
      p.slices > 1 ? Align(static_cast<size_t>(p.slices) * s.n * s.ho * s.wo * s.groups * s.taps() * 3 * sizeof(float)) : 0;
  return weight + slices;
}

// The sample kernel unless a tuning run asks for the tile kernel.
bool UseSampleKernel(const ConvShape& s, bool wide) {
  return SampleKernelFits(s, wide) && GetTuning().backward_kernel == 0;
}

template <typename T>
using SampleFn = void (*)(ConvShape, SamplePlan, bool, const T*, const T*, const T*, const T*,
                          const T*, Accum<T>*, Accum<T>*, Accum<T>*, Accum<T>*, Accum<T>*);

template <typename T, int... I>
SampleFn<T> SampleKernelAt(int lanes, int rounds, std::integer_sequence<int, I...>) {
  SampleFn<T> fn = nullptr;
  ((kSampleShapes[I][0] == lanes && kSampleShapes[I][1] == rounds
        ? (fn = BackwardSampleKernel<T, kSampleShapes[I][0], kSampleShapes[I][1]>, 0)
        : 0),
   ...);
  return fn;
}

// The kernel built for (lanes, vectors a lane); every plan's pair is one of
// kSampleShapes. With grad_x by the gather and 32 lanes (the gather's
// default for groups of 256 channels or more, but for a small grid's 16-lane
// slices) the variant without atomics, unless a tuning run asks for the other
// (sample_no_scatter=0).
template <typename T>
SampleFn<T> SampleKernelFor(int lanes, int rounds, bool gather, int vec) {
  if constexpr (sizeof(T) == 2) {
    if (vec == 8) {  // one vector a lane (MakeSamplePlan)
      if (gather && lanes == 32 && GetTuning().sample_no_scatter != 0) {
        return BackwardSampleKernel<T, 32, 1, false, 8>;
      }
      return lanes == 16 ? BackwardSampleKernel<T, 16, 1, true, 8> : BackwardSampleKernel<T, 32, 1, true, 8>;
    }
  }
  if (gather && lanes == 32 && GetTuning().sample_no_scatter != 0) {
    if (rounds == 1) return BackwardSampleKernel<T, 32, 1, false>;
    if (rounds == 2) return BackwardSampleKernel<T, 32, 2, false>;
    if (rounds == 3) return BackwardSampleKernel<T, 32, 3, false>;
  }
  constexpr int kCount = sizeof(kSampleShapes) / sizeof(kSampleShapes[0]);
  return SampleKernelAt<T>(lanes, rounds, std::make_integer_sequence<int, kCount>{});
}

template <typename T>
cudaError_t BackwardBySamples(cudaStream_t stream, const ConvShape& s, bool gather, const T* x,
                              const T* offset, const T* mask, const T* weight, const T* grad_y,
                              float* grad_x, float* grad_offset, float* grad_mask,
                              float* grad_weight, unsigned char* scratch) {
  const SamplePlan p = MakeSamplePlan(s, sizeof(T), gather);
  float* weight_partial = reinterpret_cast<float*>(scratch);
  float* slice_partial = reinterpret_cast<float*>(scratch + SampleWeightPartialBytes(s, p));
  const SampleFn<T> fn = SampleKernelFor<T>(p.lanes, p.rounds, gather, p.vec);
  const dim3 grid(static_cast<unsigned>(p.blocks_x), static_cast<unsigned>(s.groups * p.slices),
                  static_cast<unsigned>(p.chunks));
  const size_t smem = SampleSharedBytes<float>(p);
  if (smem > 48 * 1024) {  // more vectors a lane or sub-warps: more than the default allows
    const cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  fn<<<grid, p.warps * 32, smem, stream>>>(
      s, p, !gather, x, offset, mask, weight, grad_y, grad_x, grad_offset, grad_mask, slice_partial,
      weight_partial);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (p.slices > 1) {
    const int64_t count = s.n * s.ho * s.wo * s.groups * s.taps();
    SumSlicesKernel<float><<<static_cast<unsigned>((count + 255) / 256), 256, 0, stream>>>(
        s, p.slices, slice_partial, grad_offset, grad_mask);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  const int64_t wsize = s.taps() * s.out_channels();
  SumTilesKernel<float><<<static_cast<unsigned>((wsize + kSumCols - 1) / kSumCols),
                          dim3(kSumCols, kSumRows), 0, stream>>>(weight_partial, p.blocks_x, wsize,
                                                                 grad_weight);
  return cudaGetLastError();
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
  const bool gather = UseGather(s, deterministic);
  cudaError_t err;
  if (gather) {
    // The gather writes every element of grad_x; the atomics add into a cleared one.
    err = GradXByGather(stream, DtypeOf<T>(), s, offset, mask, weight, grad_y, grad_x,
                        static_cast<unsigned char*>(scratch) + KernelScratchBytes(s, p, kWide, sizeof(T), gather));
  } else {
    err = cudaMemsetAsync(grad_x, 0, s.n * s.h * s.w * s.c * sizeof(A), stream);
  }
  if (err != cudaSuccess) return err;
  if constexpr (!kWide) {
    if (UseSampleKernel(s, kWide)) {
      return BackwardBySamples(stream, s, gather, x, offset, mask, weight, grad_y, grad_x,
                               grad_offset, grad_mask, grad_weight, static_cast<unsigned char*>(scratch));
    }
  }
  // The tile kernel: depth multipliers, channel counts off the vector width,
  // float64.
  const int mb = p.vec == kVec ? 1 : (s.multiplier == 1 ? 1 : 4);
  const size_t smem =
      TileBackwardSmem<A>{p.tile_pixels, static_cast<int>(s.taps())}.Bytes(p.threads, p.vec * mb);
  const BackwardFn<T> fn = p.vec == kVec ? BackwardKernel<T, kVec, 1, 1>
                           : mb == 1     ? BackwardKernel<T, 1, 1, 1>
                                         : BackwardKernel<T, 1, 4, 1>;
  auto* partial = static_cast<A*>(scratch);
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

size_t BackwardScratchBytesForSms(const ConvShape& s, Dtype dtype, bool deterministic, int sm_count,
                                  int small_grid) {
  PlanAssumptions& current = CurrentPlanAssumptions();
  const PlanAssumptions saved = current;
  current = {sm_count, small_grid};
  const size_t bytes = BackwardScratchBytes(s, dtype, deterministic);
  current = saved;
  return bytes;
}

// The per-block grad_weight partial sums grow with the SM count (about eight
// blocks an SM). A small grid takes the 16-lane slices (other partial sums)
// where its blocks are fewer than the SMs: as many blocks as its pixels allow
// (more SMs than that is the only way under one wave), so if any GPU of up to
// kPortableSmCount SMs takes them, one of kPortableSmCount does. Hence the
// plans at kPortableSmCount with the rule and without the slices, besides
// this device's own.
size_t PortableBackwardScratchBytes(const ConvShape& s, Dtype dtype, bool deterministic) {
  size_t bytes = BackwardScratchBytes(s, dtype, deterministic);
  for (const int small_grid : {-1, 0}) {
    bytes = std::max(bytes, BackwardScratchBytesForSms(s, dtype, deterministic, kPortableSmCount,
                                                       small_grid));
  }
  return bytes;
}

size_t BackwardScratchBytes(const ConvShape& s, Dtype dtype, bool deterministic) {
  const bool wide = dtype == Dtype::kF64;
  const Plan p = MakePlan(s, VecOf(dtype), wide);
  const bool gather = UseGather(s, deterministic);
  return KernelScratchBytes(s, p, wide, 16 / VecOf(dtype), gather) +
         (gather ? GatherScratchBytes(s, wide) : 0);
}

cudaError_t LaunchBackwardCuda(cudaStream_t stream, Dtype dtype, const ConvShape& s,
                               bool deterministic, const void* x, const void* offset,
                               const void* mask, const void* weight, const void* grad_y,
                               void* grad_x, void* grad_offset, void* grad_mask,
                               void* grad_weight, void* scratch) {
  return DispatchDtype<CudaTypes>(dtype, [&](auto zero) {
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
