// grad_x by gather over destination-sorted contributions (see the header).
#include "cuda_grad_x_gather.h"

#include <cub/cub.cuh>
#include <limits>

#include "cuda_common.cuh"

namespace jax_deform {
namespace cuda_detail {
namespace {

constexpr int kThreads = 256;

__host__ __device__ int64_t Destinations(const ConvShape& s) { return s.n * s.h * s.w * s.groups; }
__host__ __device__ int64_t Contributions(const ConvShape& s) { return s.n * s.ho * s.wo * s.groups * s.taps() * 4; }
// Sort keys: destination * taps + tap, so a destination's contributions come
// tap by tap and the gather multiplies by a tap's weights once per run of
// that tap rather than once per contribution (each contribution then costs
// one grad_y load and one multiply-add a channel). The key of samples outside
// the image, Destinations * taps, sorts last and is never read.
__host__ __device__ int64_t OutsideKey(const ConvShape& s) { return Destinations(s) * s.taps(); }

// An entry names its sample as (output pixel << TapBits) | tap: the gather
// splits it with a shift and a mask, where pixel * taps + tap took a 32-bit
// division per entry (a quarter of the gather's instructions).
__host__ __device__ int TapBits(int64_t taps) {
  int bits = 0;
  while ((int64_t{1} << bits) < taps) ++bits;
  return bits;
}

// Bits the sort must look at: keys run from 0 to OutsideKey.
int KeyBits(const ConvShape& s) {
  int bits = 1;
  while ((int64_t{1} << bits) <= OutsideKey(s)) ++bits;
  return bits;
}

// Scratch carve-up, used by both the size query and the launch. wide
// (float64): each contribution's scale is a double of its own, `scales`,
// indexed by contribution id, which the entry then carries in its upper half.
struct Layout {
  size_t starts, keys_in, keys_out, entries_in, entries_out, sort_temp, scales, total;
  size_t sort_bytes;
};

Layout MakeLayout(const ConvShape& s, bool wide = false) {
  Layout d{};
  const int64_t destinations = Destinations(s);
  const int contributions = static_cast<int>(Contributions(s));
  cub::DeviceRadixSort::SortPairs(nullptr, d.sort_bytes, static_cast<const unsigned*>(nullptr),
                                  static_cast<unsigned*>(nullptr),
                                  static_cast<const unsigned long long*>(nullptr),
                                  static_cast<unsigned long long*>(nullptr), contributions, 0,
                                  KeyBits(s));
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t here = at;
    at += Align(bytes);
    return here;
  };
  d.starts = take((destinations + 1) * sizeof(unsigned));
  d.keys_in = take(contributions * sizeof(unsigned));
  d.keys_out = take(contributions * sizeof(unsigned));
  d.entries_in = take(contributions * sizeof(unsigned long long));
  d.entries_out = take(contributions * sizeof(unsigned long long));
  d.sort_temp = take(d.sort_bytes);
  d.scales = wide ? take(contributions * sizeof(double)) : 0;
  d.total = at;
  return d;
}

// One thread per (output pixel, group, tap): the key of each corner is its
// destination and the tap; the entry packs (pixel << TapBits) | tap with the corner's weight
// times the mask, all the gather needs. For double the scale does not fit
// beside the position: it goes to scales[id] and the entry packs the id.
// Nothing is counted here: where each destination's entries start is found
// in the sorted keys afterwards (SegmentStartsKernel), where an integer
// atomic per corner (4 per sample, neighbouring taps of a warp often on one
// address) made this kernel as slow as the sort.
template <typename T>
__global__ void ContributionKernel(ConvShape s, const T* __restrict__ offset,
                                   const T* __restrict__ mask, unsigned* __restrict__ keys,
                                   unsigned long long* __restrict__ entries,
                                   Accum<T>* __restrict__ scales) {
  using A = Accum<T>;
  // 32-bit indices: GatherFits keeps the contribution count under 2^31, and
  // 64-bit division is a long subroutine.
  const unsigned taps = static_cast<unsigned>(s.taps()), groups = static_cast<unsigned>(s.groups);
  const unsigned total = static_cast<unsigned>(s.n * s.ho * s.wo * s.groups * s.taps());
  const int tap_bits = TapBits(taps);
  const int64_t hw = s.h * s.w;
  const unsigned outside = static_cast<unsigned>(OutsideKey(s));
  for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += gridDim.x * blockDim.x) {
    const unsigned k = e % taps, pixel_group = e / taps, g = pixel_group % groups,
                   pixel = pixel_group / groups;
    const TapGeometryOf<A> t = MakeGeometry(s, offset, mask, pixel, g, k);
    A wgt[4];
    CornerWeights(ToBilinear(t), wgt);
    const int64_t image = DecodePixel(s, pixel).image;
    const unsigned long long where = (pixel << tap_bits) | k;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t id = int64_t{e} * 4 + i;
      if ((t.valid >> i) & 1u) {
        const unsigned dest = static_cast<unsigned>((image * hw + t.corner[i]) * s.groups + g);
        keys[id] = dest * taps + k;
        const A scale = t.mask * wgt[i];
        if constexpr (std::is_same_v<A, double>) {
          scales[id] = scale;
          entries[id] = where | (static_cast<unsigned long long>(id) << 32);
        } else {
          entries[id] = where | (static_cast<unsigned long long>(__float_as_uint(scale)) << 32);
        }
      } else {
        keys[id] = outside;
        entries[id] = 0;
      }
    }
  }
}

// starts[d] = the first sorted entry whose key is d * taps or more, for d in
// [0, destinations]: destination d's entries are [starts[d], starts[d + 1]),
// and starts[destinations] is where the samples outside the image begin
// (their key, OutsideKey, is destinations * taps). One thread per
// destination, a binary search over the sorted keys.
__global__ void SegmentStartsKernel(const unsigned* __restrict__ keys, unsigned count,
                                    unsigned destinations, unsigned taps,
                                    unsigned* __restrict__ starts) {
  const unsigned d = blockIdx.x * blockDim.x + threadIdx.x;
  if (d > destinations) return;
  const unsigned want = d * taps;  // GatherFits: OutsideKey fits 32 bits
  unsigned lo = 0, hi = count;
  while (lo < hi) {
    const unsigned mid = lo + (hi - lo) / 2;
    if (keys[mid] < want) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  starts[d] = lo;
}

// One warp per destination, or for groups of 16 vectors or fewer one
// sub-warp of L lanes (32 / L destinations a warp); each lane keeps R vectors
// of V channels. Three blocks per SM leave the registers to keep an entry's
// 2R loads in flight (with more blocks the compiler serialized them).
template <typename T, int V, int R, int L>
__global__ void __launch_bounds__(kThreads, 3)
    GatherKernel(ConvShape s, const T* __restrict__ weight, const T* __restrict__ grad_y,
                 const unsigned* __restrict__ starts, const unsigned long long* __restrict__ entries,
                 const Accum<T>* __restrict__ scales, Accum<T>* __restrict__ grad_x) {
  using A = Accum<T>;
  const int sub = (threadIdx.x % 32) / L;
  const int64_t dest =
      (static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32) * (32 / L) + sub;
  if (dest >= Destinations(s)) return;  // the whole sub-warp: it shares dest
  const int lane = threadIdx.x % L;
  const unsigned lanes_mask = L == 32 ? 0xffffffffu : ((1u << L) - 1u) << (sub * L);
  const unsigned begin = starts[dest], end = starts[dest + 1];
  const int64_t g = dest % s.groups, in_pixel = dest / s.groups;
  const int64_t cg = s.channels_per_group(), m = s.multiplier, cm = s.out_channels();
  const unsigned taps = static_cast<unsigned>(s.taps());
  const int tap_bits = TapBits(taps);
  const unsigned tap_mask = (1u << tap_bits) - 1u;
  const int vectors = static_cast<int>(cg / V);
  for (int base = 0; base < vectors; base += L * R) {
    // Where this lane's R vectors sit in a row of grad_y and weight. Lanes past
    // the group's channels read the last vector and never store it, so every
    // load is unconditional and all 2R of an entry are in flight together.
    int64_t col[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      col[r] = (g * cg + static_cast<int64_t>(min(base + lane + L * r, vectors - 1)) * V) * m;
    }
    // acc: the destination's sum; run: the current tap's sum of scale * grad_y,
    // multiplied by the tap's weights when the tap changes (entries come
    // sorted by tap within a destination).
    A acc[R][V], run[R][V];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int v = 0; v < V; ++v) acc[r][v] = run[r][v] = A(0);
    }
    unsigned run_tap = taps;  // none yet
    auto close_run = [&]() {
      const T* wk = weight + static_cast<int64_t>(run_tap) * cm;
      A wv[R][V];
#pragma unroll
      for (int r = 0; r < R; ++r) LoadVec<T, V>(wk + col[r], wv[r]);
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          acc[r][v] += wv[r][v] * run[r][v];
          run[r][v] = A(0);
        }
      }
    };
    // The sub-warp reads L entries with one coalesced load and hands them out
    // by shuffles, so the grad_y loads of consecutive entries do not wait on
    // each entry's own load; entries are still added in sorted order.
    for (unsigned a0 = begin; a0 < end; a0 += L) {
      const unsigned long long mine = a0 + lane < end ? entries[a0 + lane] : 0ull;
      const int count = static_cast<int>(min(static_cast<unsigned>(L), end - a0));
#pragma unroll 1
      for (int j = 0; j < count; ++j) {
        const unsigned long long entry = __shfl_sync(lanes_mask, mine, j, L);
        const unsigned where = static_cast<unsigned>(entry);
        A scale;
        if constexpr (std::is_same_v<A, double>) {
          scale = scales[entry >> 32];
        } else {
          scale = __uint_as_float(static_cast<unsigned>(entry >> 32));
        }
        const unsigned pixel = where >> tap_bits, k = where & tap_mask;
        const T* gy = grad_y + static_cast<int64_t>(pixel) * cm;
        if (V > 1 || m == 1) {
          if (k != run_tap) {  // the same for the whole sub-warp
            if (run_tap != taps) close_run();
            run_tap = k;
          }
          A gv[R][V];
#pragma unroll
          for (int r = 0; r < R; ++r) LoadVec<T, V>(gy + col[r], gv[r]);
#pragma unroll
          for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int v = 0; v < V; ++v) run[r][v] += scale * gv[r][v];
          }
        } else {  // depth multiplier: output channels c*M .. c*M + M-1 read channel c
          const T* wk = weight + static_cast<int64_t>(k) * cm;
#pragma unroll
          for (int r = 0; r < R; ++r) {
            A sum = A(0);
            for (int64_t jj = 0; jj < m; ++jj) sum += ToF(wk[col[r] + jj]) * ToF(gy[col[r] + jj]);
            acc[r][0] += scale * sum;
          }
        }
      }
    }
    if (run_tap != taps) close_run();
    A* out = grad_x + in_pixel * s.c + g * cg;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int vec = base + lane + L * r;
      if (vec < vectors) {
        A* o = out + static_cast<int64_t>(vec) * V;
#pragma unroll
        for (int v = 0; v < V; ++v) o[v] = acc[r][v];
      }
    }
  }
}

template <typename T, int V, int R, int L>
void LaunchGatherWith(cudaStream_t stream, const ConvShape& s, const T* weight, const T* grad_y,
                      const unsigned* starts, const unsigned long long* entries,
                      const Accum<T>* scales, Accum<T>* grad_x) {
  constexpr int kPerBlock = kThreads / L;  // destinations a block
  const int64_t blocks = (Destinations(s) + kPerBlock - 1) / kPerBlock;
  GatherKernel<T, V, R, L><<<blocks, kThreads, 0, stream>>>(s, weight, grad_y, starts, entries,
                                                            scales, grad_x);
}

template <typename T, int V>
void LaunchGather(cudaStream_t stream, const ConvShape& s, const T* weight, const T* grad_y,
                  const unsigned* starts, const unsigned long long* entries,
                  const Accum<T>* scales, Accum<T>* grad_x) {
  const int64_t vectors = s.channels_per_group() / V;
  auto launch = [&](auto r, auto l) {
    LaunchGatherWith<T, V, decltype(r)::value, decltype(l)::value>(stream, s, weight, grad_y,
                                                                   starts, entries, scales, grad_x);
  };
  using std::integral_constant;
  if (vectors <= 4) {
    launch(integral_constant<int, 1>{}, integral_constant<int, 4>{});
  } else if (vectors <= 8) {
    launch(integral_constant<int, 1>{}, integral_constant<int, 8>{});
  } else if (vectors <= 16) {
    launch(integral_constant<int, 1>{}, integral_constant<int, 16>{});
  } else if (vectors <= 32) {
    launch(integral_constant<int, 1>{}, integral_constant<int, 32>{});
  } else if (vectors <= 64) {
    launch(integral_constant<int, 2>{}, integral_constant<int, 32>{});
  } else {
    launch(integral_constant<int, 4>{}, integral_constant<int, 32>{});
  }
}

template <typename T>
cudaError_t Gather(cudaStream_t stream, const ConvShape& s, const T* offset, const T* mask,
                   const T* weight, const T* grad_y, Accum<T>* grad_x, unsigned char* scratch) {
  using A = Accum<T>;
  const Layout d = MakeLayout(s, std::is_same_v<A, double>);
  auto* scales = std::is_same_v<A, double> ? reinterpret_cast<A*>(scratch + d.scales) : nullptr;
  auto* starts = reinterpret_cast<unsigned*>(scratch + d.starts);
  auto* keys_in = reinterpret_cast<unsigned*>(scratch + d.keys_in);
  auto* keys_out = reinterpret_cast<unsigned*>(scratch + d.keys_out);
  auto* entries_in = reinterpret_cast<unsigned long long*>(scratch + d.entries_in);
  auto* entries_out = reinterpret_cast<unsigned long long*>(scratch + d.entries_out);
  const int64_t destinations = Destinations(s);
  const int contributions = static_cast<int>(Contributions(s));
  const int64_t grid = std::min<int64_t>((contributions / 4 + kThreads - 1) / kThreads, 1 << 20);
  ContributionKernel<T><<<grid, kThreads, 0, stream>>>(s, offset, mask, keys_in, entries_in, scales);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  size_t sort_bytes = d.sort_bytes;
  err = cub::DeviceRadixSort::SortPairs(scratch + d.sort_temp, sort_bytes, keys_in, keys_out,
                                        entries_in, entries_out, contributions, 0, KeyBits(s),
                                        stream);
  if (err != cudaSuccess) return err;
  SegmentStartsKernel<<<static_cast<unsigned>((destinations + 1 + kThreads - 1) / kThreads), kThreads,
                        0, stream>>>(keys_out, static_cast<unsigned>(contributions),
                                     static_cast<unsigned>(destinations),
                                     static_cast<unsigned>(s.taps()), starts);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  constexpr int kVec = 16 / sizeof(T);
  if (s.multiplier == 1 && s.channels_per_group() % kVec == 0) {
    LaunchGather<T, kVec>(stream, s, weight, grad_y, starts, entries_out, scales, grad_x);
  } else {
    LaunchGather<T, 1>(stream, s, weight, grad_y, starts, entries_out, scales, grad_x);
  }
  return cudaGetLastError();
}

}  // namespace

bool GatherFits(const ConvShape& s) {
  return OutsideKey(s) < std::numeric_limits<unsigned>::max() &&
         Contributions(s) < std::numeric_limits<int>::max() &&
         (s.n * s.ho * s.wo << TapBits(s.taps())) < std::numeric_limits<unsigned>::max();
}

size_t GatherScratchBytes(const ConvShape& s, bool wide) { return MakeLayout(s, wide).total; }

cudaError_t GradXByGather(cudaStream_t stream, Dtype dtype, const ConvShape& s, const void* offset,
                          const void* mask, const void* weight, const void* grad_y, void* grad_x,
                          void* scratch) {
  return DispatchDtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    return Gather(stream, s, static_cast<const T*>(offset), static_cast<const T*>(mask),
                  static_cast<const T*>(weight), static_cast<const T*>(grad_y),
                  static_cast<Accum<T>*>(grad_x), static_cast<unsigned char*>(scratch));
  });
}

}  // namespace cuda_detail
}  // namespace jax_deform
