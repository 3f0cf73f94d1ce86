// Forward kernel of depthwise deformable convolution, channels last.
//
// A block owns a 2-D tile of output pixels (8x8 for 3x3 kernels) for one
// offset group (and, for small problems, a slice of its channels: grid.z). It
// first computes the sample geometry of every (pixel, tap) of the tile once,
// into shared memory (each corner's byte offset in x, the bilinear weights
// times the mask); then `lanes` consecutive threads walk consecutive 16-byte
// vectors of channels of one pixel, so every corner read is a coalesced row
// segment and neighbouring pixels of the tile hit the same lines in L1. No
// im2col buffer exists.
#include "cuda_common.cuh"

namespace jax_deform {
namespace {

using namespace cuda_detail;  // NOLINT: this file's own helpers

// What the forward needs of one (pixel, tap): where each corner's channels
// start in x (byte offset of channel 0, image included; -1 where the corner
// lies outside the image and is not read) and the weights with the mask folded
// in. Whole byte offsets, so the channel loop adds one value per corner
// instead of redoing corner * C in 64 bits (that arithmetic was half of the
// loop's instructions). Offsets are 32-bit whenever x is under 2 GiB: the
// table is then 32 bytes a tap, one shared-memory read fewer per tap for
// every warp (the forward is bound by L1 wavefronts, shared ones included).
template <typename A, typename Off>
struct alignas(16) ForwardTapOf {
  Off start[4];
  A weight[4];
};

// The forward kernel's shared memory, sized by the host and carved up by the
// kernel: the tile's pixel indices (an even count of int64, so the table
// after them stays 16-byte aligned), then its tap table [pixel][tap].
template <typename Tap>
struct ForwardSmem {
  int pixels;
  __host__ __device__ int PixelSlots() const { return (pixels + 1) & ~1; }
  __host__ __device__ size_t Bytes(int64_t taps) const {
    return PixelSlots() * sizeof(int64_t) + pixels * taps * sizeof(Tap);
  }
  __device__ int64_t* PixelOf(unsigned char* smem) const { return reinterpret_cast<int64_t*>(smem); }
  __device__ Tap* TapTable(unsigned char* smem) const {
    return reinterpret_cast<Tap*>(PixelOf(smem) + PixelSlots());
  }
};

template <typename T, typename Off>
__device__ void ForwardTileTaps(const ConvShape& s, const TileGrid& tg, const T* __restrict__ offset,
                                const T* __restrict__ mask, int64_t g, int64_t* pixel_of,
                                ForwardTapOf<Accum<T>, Off>* taps_out) {
  using A = Accum<T>;
  const int taps = static_cast<int>(s.taps()), kh = static_cast<int>(s.kh), kw = static_cast<int>(s.kw);
  for (int lp = threadIdx.x; lp < tg.pixels; lp += blockDim.x) {
    pixel_of[lp] = TilePixel(s, tg, blockIdx.x, lp);
  }
  // The tile's image and first output row and column, the same for the
  // whole block (TilePixel's numbering), and the tile width's bits (a power
  // of two, WithTilePixels).
  // Positions in Off: 32 bits only where PositionsFit (Forward's `narrow`).
  const unsigned tiles_x = static_cast<unsigned>(tg.tiles_x), tiles_y = static_cast<unsigned>(tg.tiles_y);
  const unsigned tile_row = blockIdx.x / tiles_x;
  const Off image = static_cast<Off>(tile_row / tiles_y);
  const Off oy0 = static_cast<Off>(tile_row % tiles_y) * (tg.pixels / tg.width);
  const Off ox0 = static_cast<Off>(blockIdx.x - tile_row * tiles_x) * tg.width;
  const int width_bits = __ffs(tg.width) - 1;
  // Entry e = (lp * kh + ky) * kw + kx. A thread takes e = threadIdx.x,
  // + blockDim.x, ...: each step adds (lp, ky, kx) of blockDim.x, with
  // carries, where dividing e by taps and the tap by kw per entry (and the
  // pixel's decoding) took most of this loop's instructions.
  int kx = threadIdx.x % kw, ky = (threadIdx.x / kw) % kh, lp = threadIdx.x / taps;
  const int step_kx = blockDim.x % kw, step_ky = (blockDim.x / kw) % kh, step_lp = blockDim.x / taps;
  const int64_t mask_row = s.mask_channels(), first_tap = g * taps;  // offsets: 2 a mask entry
  for (int e = threadIdx.x; e < tg.pixels * taps; e += blockDim.x) {
    const Off oy = oy0 + (lp >> width_bits), ox = ox0 + (lp & (tg.width - 1));
    if (oy < s.ho && ox < s.wo) {
      const int64_t pixel = (static_cast<int64_t>(image) * s.ho + oy) * s.wo + ox;
      const int64_t at = pixel * mask_row + first_tap + ky * kw + kx;  // MaskIndex; OffsetIndex is 2 at
      const A m = mask ? ToF(mask[at]) : A(1);
      const TapSampleOf<A, Off> t = SampleAt<T, Off>(
          s, image, oy, ox, ky * static_cast<Off>(s.dil_h) - static_cast<Off>(s.pad_h),
          kx * static_cast<Off>(s.dil_w) - static_cast<Off>(s.pad_w), ToF(offset[2 * at]),
          ToF(offset[2 * at + 1]));
      const A hy = A(1) - t.ly, hx = A(1) - t.lx;
      ForwardTapOf<A, Off> f;
      f.weight[0] = m * (hy * hx);
      f.weight[1] = m * (hy * t.lx);
      f.weight[2] = m * (t.ly * hx);
      f.weight[3] = m * (t.ly * t.lx);
#pragma unroll
      for (int i = 0; i < 4; ++i) f.start[i] = t.start[i];
      if (t.poison != A(0) || t.poison != t.poison) {  // NaN position: read one pixel, times NaN
        f.start[0] = static_cast<Off>(image) * static_cast<Off>(s.h * s.w * s.c * int64_t{sizeof(T)});
        f.weight[0] = t.poison;
      }
      taps_out[e] = f;
    }
    kx += step_kx, ky += step_ky, lp += step_lp;
    if (kx >= kw) kx -= kw, ++ky;
    if (ky >= kh) ky -= kh, ++lp;
  }
}

// The sample value of one tap for V channels at xc: its corners inside the
// image, each times its bilinear weight (corners outside add nothing).
template <typename T, int V, typename A, typename Tap>
__device__ __forceinline__ void TapValue(const char* xc, const Tap t, A (&val)[V]) {
#pragma unroll
  for (int v = 0; v < V; ++v) val[v] = A(0);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (t.start[i] < 0) continue;
    A corner[V];
    LoadVec<T, V>(reinterpret_cast<const T*>(xc + t.start[i]), corner);
#pragma unroll
    for (int v = 0; v < V; ++v) val[v] += t.weight[i] * corner[v];
  }
}

// MB: output channels per input channel handled per pass (M > 1 runs in
// passes). KT: the tap count when known at compile time (3x3), so the
// depthwise weights of a thread's channels stay in registers.
// MINB: blocks per SM the register budget must allow (1: no cap). Off: the
// type of the tap table's byte offsets (int32_t when x is under 2 GiB).
template <typename T, int V, int MB, int KT, int MINB, typename Off>
__global__ void __launch_bounds__(kMaxThreads, MINB)
    ForwardKernel(ConvShape s, TileGrid tg, int lanes, int vectors_per_split, const T* __restrict__ x,
                  const T* __restrict__ offset, const T* __restrict__ mask,
                  const T* __restrict__ weight, const T* __restrict__ bias, T* __restrict__ y) {
  using A = Accum<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  using Tap = ForwardTapOf<A, Off>;
  const ForwardSmem<Tap> layout{tg.pixels};
  int64_t* pixel_of = layout.PixelOf(smem);
  Tap* tap_table = layout.TapTable(smem);
  const int64_t g = blockIdx.y;
  ForwardTileTaps(s, tg, offset, mask, g, pixel_of, tap_table);
  __syncthreads();

  const int taps = KT > 0 ? KT : static_cast<int>(s.taps());
  const int64_t cg = s.channels_per_group(), m = s.multiplier, cm = s.out_channels();
  // Small problems also split the channels of a group over grid.z, to fill the GPU.
  const int vec_begin = blockIdx.z * vectors_per_split;
  const int vec_end = min(static_cast<int>(cg / V), vec_begin + vectors_per_split);
  const int lane = threadIdx.x % lanes, groups_of_pixels = blockDim.x / lanes;
  for (int64_t j0 = 0; j0 < m; j0 += MB) {
    for (int vec = vec_begin + lane; vec < vec_end; vec += lanes) {
      const int64_t c = g * cg + static_cast<int64_t>(vec) * V;
      A w_reg[KT > 0 ? KT : 1][V];
      if constexpr (KT > 0 && MB == 1) {
#pragma unroll
        for (int k = 0; k < KT; ++k) LoadVec<T, V>(weight + k * cm + c, w_reg[k]);
      }
      if constexpr (MB == 1 && KT == 0 && !std::is_same_v<T, __half>) {
        // Weights read per tap: two pixels a pass share each tap's weight
        // load (and in bfloat16 its conversion), a fifth of the loads of a
        // pixel's tap (four corners and the weights) and, in bfloat16, a
        // fifth of its conversions. (float16, whose conversions take more
        // registers, then reloaded spills inside the tap loop.)
        const char* xc = reinterpret_cast<const char*>(x + c);
        for (int lp = threadIdx.x / lanes; lp < tg.pixels; lp += 2 * groups_of_pixels) {
          const int lp1 = lp + groups_of_pixels;
          const int64_t pixel[2] = {pixel_of[lp], lp1 < tg.pixels ? pixel_of[lp1] : -1};
          // A pixel past the image edge has no tap table (never written): skipped.
          const Tap* tt[2] = {tap_table + lp * taps, tap_table + (pixel[1] >= 0 ? lp1 : lp) * taps};
          A acc[2][V];
#pragma unroll
          for (int q = 0; q < 2; ++q) {
#pragma unroll
            for (int v = 0; v < V; ++v) acc[q][v] = A(0);
          }
#pragma unroll 2
          for (int k = 0; k < taps; ++k) {
            A wv[V];
            LoadVec<T, V>(weight + k * cm + c, wv);
#pragma unroll
            for (int q = 0; q < 2; ++q) {
              if (pixel[q] < 0) continue;
              A val[V];
              TapValue<T, V>(xc, tt[q][k], val);
#pragma unroll
              for (int v = 0; v < V; ++v) acc[q][v] += val[v] * wv[v];
            }
          }
          A bv[V];
          if (bias) LoadVec<T, V>(bias + c, bv);
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            if (pixel[q] < 0) continue;
            if (bias) {
#pragma unroll
              for (int v = 0; v < V; ++v) acc[q][v] += bv[v];
            }
            StoreVec<T, V>(y + pixel[q] * cm + c, acc[q]);
          }
        }
      } else {
        for (int lp = threadIdx.x / lanes; lp < tg.pixels; lp += groups_of_pixels) {
          const int64_t pixel = pixel_of[lp];
          if (pixel < 0) continue;
          const char* xc = reinterpret_cast<const char*>(x + c);
          A acc[V * MB];
#pragma unroll
          for (int i = 0; i < V * MB; ++i) acc[i] = A(0);
          const Tap* tt = tap_table + lp * taps;
#pragma unroll(KT > 0 ? KT : 3)
          for (int k = 0; k < taps; ++k) {
            A val[V];
            TapValue<T, V>(xc, tt[k], val);
            if constexpr (MB == 1) {
              A wv[V];
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
              A bv[V];
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
                if (j0 + jj < m) yp[o] = FromAcc<T>(acc[v * MB + jj] + (bias ? ToF(bias[o]) : A(0)));
              }
            }
          }
        }
      }
    }
  }
}

template <typename T>
using ForwardFn = void (*)(ConvShape, TileGrid, int, int, const T*, const T*, const T*, const T*,
                           const T*, T*);

// The variant for this shape: vector width, 3x3 weights in registers or read
// per tap, the register cap and the width of the tap table's offsets.
template <typename T>
ForwardFn<T> PickForward(const ConvShape& s, const Plan& p, bool narrow) {
  constexpr int kVec = 16 / sizeof(T);
  if (!narrow) {  // x of 2 GiB or more: 64-bit offsets, generic variants only
    return s.multiplier != 1 || p.vec != kVec ? ForwardKernel<T, 1, 4, 0, 1, int64_t>
                                              : ForwardKernel<T, kVec, 1, 0, 1, int64_t>;
  }
  const Tuning& tune = GetTuning();
  if (s.multiplier != 1) return ForwardKernel<T, 1, 4, 0, 1, int32_t>;
  if (p.vec != kVec) {
    return s.taps() == 9 ? ForwardKernel<T, 1, 1, 9, 1, int32_t> : ForwardKernel<T, 1, 1, 0, 1, int32_t>;
  }
  if constexpr (std::is_same_v<T, double>) {
    // float64 (not tuned): two doubles a vector, weights read per tap, no register cap.
    return ForwardKernel<T, kVec, 1, 0, 1, int32_t>;
  } else {
    // Measured on an H200 (benchmarks/RESULTS.md): float32 3x3 with 128
    // channels a group or more runs fastest with its weights in registers and
    // a cap of 128 registers (2 blocks per SM; uncapped it takes 135 and fits
    // one); everything else (bfloat16 above all, and 64 channels) with the
    // weights read per tap and a cap of 64 registers (4 blocks per SM).
    const bool wide_f32 = sizeof(T) == 4 && s.taps() == 9 && s.channels_per_group() >= 128;
    const bool registers = s.taps() == 9 && (tune.forward_weights_in_registers >= 0
                                                 ? tune.forward_weights_in_registers > 0
                                                 : wide_f32);
    const int min_blocks = tune.forward_min_blocks > 0 ? tune.forward_min_blocks
                           : registers                 ? 2
                                                       : 4;
    if (min_blocks >= 4) {
      return registers ? ForwardKernel<T, kVec, 1, 9, 4, int32_t>
                       : ForwardKernel<T, kVec, 1, 0, 4, int32_t>;
    }
    if (min_blocks == 2) {
      return registers ? ForwardKernel<T, kVec, 1, 9, 2, int32_t>
                       : ForwardKernel<T, kVec, 1, 0, 2, int32_t>;
    }
    return registers ? ForwardKernel<T, kVec, 1, 9, 1, int32_t>
                     : ForwardKernel<T, kVec, 1, 0, 1, int32_t>;
  }
}

// Lanes a pixel for `vectors` channel vectors, from the plan's `lanes`: for
// groups of 8 vectors or more, of 32, 16 and 8 lanes the count that leaves
// the fewest lane slots idle, and of those the most lanes (the fewest rounds
// of vectors). Measured on an H200 (benchmarks/RESULTS.md, "Forward lanes"),
// forward kernel ms at the model layers, this rule picks the fastest of 4,
// 8, 16 and 32 lanes at each of the ten: e.g. 7x7 with 96 channels 0.602 ->
// 0.579 float32 (24 vectors: 8 lanes, not 16), 0.465 -> 0.422 bfloat16 (12
// vectors: 16, not 8); 7x7 with 384 channels in bfloat16 0.127 -> 0.108 (48
// vectors: 16, not 32); 144 channels keep 8 lanes (21-24% faster than 32 or
// 16, "What changed at 1a3b4c3").
inline int ForwardLanes(int64_t vectors, int lanes) {
  if (lanes < 8) return lanes;  // fewer than 8 vectors: one round of them
  auto slots = [&](int64_t l) { return (vectors + l - 1) / l * l; };
  int best = 32;
  for (int l = 16; l >= 8; l /= 2) {
    if (slots(l) < slots(best)) best = l;
  }
  return best;
}

// A grid under one wave (batch 1, e.g. (1, 32, 32, 512), makes 16 tiles of
// 64 pixels, 64 blocks with its channel splits on 132 SMs) takes smaller
// tiles, down to 16 pixels, until the tiles and channel splits fill the SMs
// (where SmallGridPlansPay). Measured on an H200 (benchmarks/RESULTS.md,
// tuning key forward_tile=16): (1, 32, 32, 512) forward 0.0139 -> 0.0077 ms
// float32, 0.0236 -> 0.0088 bfloat16.
inline Plan WithSmallGridTiles(const ConvShape& s, Plan p) {
  if (!SmallGridPlansPay(s)) return p;
  const int64_t lane_rounds = (s.channels_per_group() / p.vec + p.lanes - 1) / p.lanes;
  while (p.tile_pixels > 16 && p.tiles * s.groups * lane_rounds < SmCount()) {
    p = WithTilePixels(s, p, p.tile_pixels / 2);
  }
  return p;
}

template <typename T>
cudaError_t Forward(cudaStream_t stream, const ConvShape& s, const T* x, const T* offset,
                    const T* mask, const T* weight, const T* bias, T* y) {
  using A = Accum<T>;
  constexpr int kVec = 16 / sizeof(T);
  const Tuning& tune = GetTuning();
  Plan p = MakePlan(s, kVec, std::is_same_v<T, double>);
  if (tune.forward_lanes > 0) {  // tuning runs: e.g. 36 vectors on 4 lanes, not 2 rounds of 32
    p.lanes = std::min(32, tune.forward_lanes);
    p = WithTilePixels(s, p, p.tile_pixels);
  } else if (const int lanes = ForwardLanes(s.channels_per_group() / p.vec, p.lanes); lanes != p.lanes) {
    p.lanes = lanes;
    p = WithTilePixels(s, p, p.tile_pixels);
  }
  if (tune.forward_tile > 0) {
    p = WithTilePixels(s, p, tune.forward_tile);
  } else {
    p = WithSmallGridTiles(s, p);
  }
  const bool narrow = s.n * s.h * s.w * s.c * int64_t{sizeof(T)} <= INT32_MAX && PositionsFit(s);
  const size_t smem = narrow ? ForwardSmem<ForwardTapOf<A, int32_t>>{p.tile_pixels}.Bytes(s.taps())
                            : ForwardSmem<ForwardTapOf<A, int64_t>>{p.tile_pixels}.Bytes(s.taps());
  // Enough blocks for about two waves: split the channels when tiles are few.
  const int64_t vectors = s.channels_per_group() / p.vec;
  const int64_t lane_rounds = (vectors + p.lanes - 1) / p.lanes;
  const int64_t want = tune.forward_splits > 0
                           ? tune.forward_splits
                           : (2 * SmCount() + p.tiles * s.groups - 1) / (p.tiles * s.groups);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({want, lane_rounds, 65535}));
  const int vectors_per_split = static_cast<int>((lane_rounds + splits - 1) / splits) * p.lanes;
  const dim3 grid(static_cast<unsigned>(p.tiles), static_cast<unsigned>(s.groups),
                  static_cast<unsigned>((vectors + vectors_per_split - 1) / vectors_per_split));
  const ForwardFn<T> fn = PickForward<T>(s, p, narrow);
  if (smem > 48 * 1024) {  // only tuning runs ask for tiles this large
    const cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  fn<<<grid, p.threads, smem, stream>>>(s, p.grid, p.lanes, vectors_per_split, x, offset, mask,
                                        weight, bias, y);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchForwardCuda(cudaStream_t stream, Dtype dtype, const ConvShape& s, const void* x,
                              const void* offset, const void* mask, const void* weight,
                              const void* bias, void* y) {
  return DispatchDtype<CudaTypes>(dtype, [&](auto zero) {
    using T = decltype(zero);
    return Forward(stream, s, static_cast<const T*>(x), static_cast<const T*>(offset),
                   static_cast<const T*>(mask), static_cast<const T*>(weight),
                   static_cast<const T*>(bias), static_cast<T*>(y));
  });
}

}  // namespace jax_deform
