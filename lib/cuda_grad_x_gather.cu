// grad_x by gather over samples sorted by their top-left corner (see the header).
#include "cuda_grad_x_gather.h"

#include <algorithm>
#include <cub/cub.cuh>
#include <limits>

#include "cuda_common.cuh"

namespace jax_deform {
namespace cuda_detail {
namespace {

constexpr int kThreads = 256;

// A sample is one (output pixel, group, tap); a destination one (image,
// input pixel, group) of grad_x. A sample's four corners are destinations
// (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1), so samples are
// sorted once by their top-left corner, a cell of the grid padded by one row
// and column in front ((H + 1) x (W + 1) cells: y0 and x0 may be -1), and a
// destination (y, x) reads the samples of four cells: those whose corner 0,
// 1, 2 and 3 it is, cells (y + 1, x + 1), (y + 1, x), (y, x + 1) and (y, x)
// of the padded grid. A corner outside the image is nobody's destination, so
// it is never read. One sort item a sample, where one a corner took four
// times the items and 1.5 times the bytes an item. Two gathers read them:
// the run gather, a sub-warp per destination, walks its samples tap by tap
// (each tap's four cells' runs in corner order), so that a tap's weights
// multiply the sum of all its samples once; the band gather, a sub-warp per
// band of destinations, walks cells column by column and adds each sample to
// the corners it holds in registers (UseBandGather says which).
__host__ __device__ int64_t Destinations(const ConvShape& s) { return s.n * s.h * s.w * s.groups; }
__host__ __device__ int64_t Samples(const ConvShape& s) { return s.n * s.ho * s.wo * s.groups * s.taps(); }
__host__ __device__ int64_t Cells(const ConvShape& s) { return s.n * (s.h + 1) * (s.w + 1) * s.groups; }

// Sort keys: the band gather walks a cell's samples whatever their taps, so
// its key is the cell; the run gather's is cell * taps + tap, so that the
// samples of one (cell, tap) are one run of the sorted order, found from its
// key alone. That multiplier, key_taps (UseBandGather: 1, else taps), is
// passed to the kernels. The key of samples outside the image, Cells *
// key_taps, sorts last and is never read. Scratch and GatherFits are sized for the run
// gather's keys, the larger, so that they do not hang on which gather runs.
__host__ __device__ int64_t OutsideKey(const ConvShape& s, int64_t key_taps) { return Cells(s) * key_taps; }

// A sample's sorted value names it as (output pixel << TapBits) | tap: the
// gather splits it with a shift and a mask, where pixel * taps + tap took a
// 32-bit division per sample (a quarter of the gather's instructions).
__host__ __device__ int TapBits(int64_t taps) {
  int bits = 0;
  while ((int64_t{1} << bits) < taps) ++bits;
  return bits;
}

// Bits the sort must look at: keys run from 0 to OutsideKey.
int KeyBits(const ConvShape& s, int64_t key_taps) {
  int bits = 1;
  while ((int64_t{1} << bits) <= OutsideKey(s, key_taps)) ++bits;
  return bits;
}

// What the gather needs of a sample besides its pixel and tap, indexed by
// the sample's number ((pixel * G + g) * taps + tap), in its arithmetic
// type: the fractional position and the mask, from which each corner's
// weight is mask * (bilinear weight), formed as the other kernels form it.
template <typename A>
struct alignas(4 * sizeof(A)) SampleFracOf {
  A ly, lx, mask, unused;
};

// Scratch carve-up, used by both the size query and the launch.
struct Layout {
  size_t starts, keys_in, keys_out, where_in, where_out, fracs, sort_temp, total;
  size_t sort_bytes;
};

Layout MakeLayout(const ConvShape& s, bool wide = false) {
  Layout d{};
  const int samples = static_cast<int>(Samples(s));
  if (cub::DeviceRadixSort::SortPairs(nullptr, d.sort_bytes, static_cast<const unsigned*>(nullptr),
                                      static_cast<unsigned*>(nullptr),
                                      static_cast<const unsigned*>(nullptr),
                                      static_cast<unsigned*>(nullptr), samples, 0, KeyBits(s, s.taps())) !=
      cudaSuccess) {
    // No device to ask (a program exported for CUDA on a machine without a
    // GPU): the sort's own key and value buffers, 8 bytes an item, and its
    // per-tile and per-pass counters, well under a byte an item and 16 MiB.
    cudaGetLastError();
    d.sort_bytes = static_cast<size_t>(samples) * 9 + (size_t{16} << 20);
  }
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t here = at;
    at += Align(bytes);
    return here;
  };
  d.starts = take((OutsideKey(s, s.taps()) + 1) * sizeof(unsigned));
  d.keys_in = take(samples * sizeof(unsigned));
  d.keys_out = take(samples * sizeof(unsigned));
  d.where_in = take(samples * sizeof(unsigned));
  d.where_out = take(samples * sizeof(unsigned));
  d.fracs = take(samples * (wide ? sizeof(SampleFracOf<double>) : sizeof(SampleFracOf<float>)));
  d.sort_temp = take(d.sort_bytes);
  d.total = at;
  return d;
}

// One thread per sample: its key (top-left cell and tap), its value (pixel
// and tap) and its fractional position and mask. A sample outside -1 < y < H,
// -1 < x < W (MakeBilinear's rule; NaN and +-inf fail it) reads nothing and
// gets the key that sorts last. Nothing is counted here: where each cell's
// samples start is found in the sorted keys afterwards (SegmentStartsKernel),
// where an integer atomic per item made this kernel as slow as the sort.
template <typename T>
__global__ void SampleKeysKernel(ConvShape s, unsigned key_taps, const T* __restrict__ offset,
                                 const T* __restrict__ mask, unsigned* __restrict__ keys,
                                 unsigned* __restrict__ where, SampleFracOf<Accum<T>>* __restrict__ fracs) {
  using A = Accum<T>;
  // 32-bit indices: GatherFits keeps the sample count under 2^31, and 64-bit
  // division is a long subroutine.
  const unsigned taps = static_cast<unsigned>(s.taps()), groups = static_cast<unsigned>(s.groups);
  const unsigned total = static_cast<unsigned>(Samples(s)), kw = static_cast<unsigned>(s.kw);
  const int tap_bits = TapBits(taps);
  const unsigned outside = static_cast<unsigned>(OutsideKey(s, key_taps));
  for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += gridDim.x * blockDim.x) {
    const unsigned k = e % taps, pixel_group = e / taps, g = pixel_group % groups,
                   pixel = pixel_group / groups;
    const TapOperands<A> in = LoadTapOperands(s, offset, mask, pixel, g, k);
    const PixelAt at = DecodePixel(s, pixel);
    A py, px;
    SamplePosition(s, at.oy, at.ox, k / kw, k % kw, in.dy, in.dx, &py, &px);
    SampleFracOf<A> f{A(0), A(0), in.mask, A(0)};
    unsigned key = outside;
    if (py > A(-1) && py < static_cast<A>(s.h) && px > A(-1) && px < static_cast<A>(s.w)) {
      const A fy = FloorOf(py), fx = FloorOf(px);
      // Padded cell of the top-left corner: y0 + 1 in [0, H], x0 + 1 in [0, W].
      const int64_t cell = ((at.image * (s.h + 1) + static_cast<int64_t>(fy) + 1) * (s.w + 1) +
                            static_cast<int64_t>(fx) + 1) * s.groups + g;
      key = static_cast<unsigned>(cell) * key_taps + (key_taps > 1 ? k : 0);
      f.ly = py - fy;
      f.lx = px - fx;
    }
    keys[e] = key;
    where[e] = (pixel << tap_bits) | k;
    fracs[e] = f;
  }
}

// starts[k] = the first sorted item whose key is k or more, for k in
// [0, OutsideKey]: the samples of key k (a cell, or a cell's tap) are
// [starts[k], starts[k + 1]), and starts[OutsideKey] is where the samples
// outside the image begin. One thread per key, a binary search over the
// sorted keys (whatever the offsets, no thread walks more than log2 items).
__global__ void SegmentStartsKernel(const unsigned* __restrict__ keys, unsigned count,
                                    unsigned last_key, unsigned* __restrict__ starts) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (thread > last_key) return;
  const unsigned want = static_cast<unsigned>(thread);  // GatherFits: OutsideKey fits 32 bits
  unsigned lo = 0, hi = count;
  while (lo < hi) {
    const unsigned mid = lo + (hi - lo) / 2;
    if (keys[mid] < want) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  starts[want] = lo;
}

// One warp per destination, or for groups of 16 vectors or fewer one
// sub-warp of L lanes (32 / L destinations a warp); each lane keeps R vectors
// of V channels. The destination's samples are read tap by tap, a tap's four
// cells in corner order, each cell's in sorted order: a fixed order of additions. Three
// blocks per SM leave the registers to keep a sample's 2R loads in flight
// (with more blocks the compiler serialized them).
template <typename T, int V, int R, int L>
__global__ void __launch_bounds__(kThreads, 3)
    RunGatherKernel(ConvShape s, const T* __restrict__ weight, const T* __restrict__ grad_y,
                    const unsigned* __restrict__ starts, const unsigned* __restrict__ where,
                    const SampleFracOf<Accum<T>>* __restrict__ fracs, Accum<T>* __restrict__ grad_x) {
  using A = Accum<T>;
  const int sub = (threadIdx.x % 32) / L;
  const int64_t dest =
      (static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32) * (32 / L) + sub;
  if (dest >= Destinations(s)) return;  // the whole sub-warp: it shares dest
  const int lane = threadIdx.x % L;
  const unsigned lanes_mask = L == 32 ? 0xffffffffu : ((1u << L) - 1u) << (sub * L);
  const int64_t g = dest % s.groups, in_pixel = dest / s.groups;
  // The destination's padded cell (y, x), that of its corner-3 samples; the
  // cells of its corner-2, 1 and 0 samples follow it by one cell, one padded
  // row and both (GatherFits: cells are numbered in 32 bits).
  const unsigned w = static_cast<unsigned>(s.w), h = static_cast<unsigned>(s.h);
  const unsigned groups = static_cast<unsigned>(s.groups);
  const unsigned px = static_cast<unsigned>(in_pixel) % w, row = static_cast<unsigned>(in_pixel) / w;
  const unsigned cell3 = ((row / h * (h + 1) + row % h) * (w + 1) + px) * groups + static_cast<unsigned>(g);
  const unsigned cell0 = cell3 + (w + 2) * groups, cell1 = cell3 + (w + 1) * groups, cell2 = cell3 + groups;
  const unsigned taps = static_cast<unsigned>(s.taps());
  // The lanes walk taps in chunks, each lane one (tap, corner) run of a chunk:
  // lane i the run of tap chunk + i / 4 in the cell of corner i % 4. Chunks
  // as even as the lanes allow (3x3 with 32 lanes: 5 + 4 taps, not 8 + 1).
  const unsigned my_cell = (lane % 4) == 0 ? cell0 : (lane % 4) == 1 ? cell1 : (lane % 4) == 2 ? cell2 : cell3;
  const unsigned my_key = my_cell * taps + static_cast<unsigned>(lane / 4);
  const unsigned chunks = (4 * taps + L - 1) / L, chunk_taps = (taps + chunks - 1) / chunks;
  const int64_t cg = s.channels_per_group(), m = s.multiplier, cm = s.out_channels();
  const int tap_bits = TapBits(taps);
  const unsigned tap_mask = (1u << tap_bits) - 1u;
  const int vectors = static_cast<int>(cg / V);
  // Samples whose loads are in flight together. At R = 2: 4 vectors' worth,
  // at most 16 converted values (more spilled the 16-bit types' registers).
  // At R = 1 one: 2 or 4 there held 74-80 registers against 45, and the lost
  // occupancy cost more than the loads in flight gained (H100, fp32 at 128
  // channels 0.307 -> 0.335 ms, 7x7/96 0.938 -> 0.991 ms).
  constexpr int U = R == 1 ? 1 : std::max(1, std::min(4 / R, 16 / (R * V)));
  for (int base = 0; base < vectors; base += L * R) {
    // Where this lane's R vectors sit in a row of grad_y and weight. Lanes past
    // the group's channels read the last vector and never store it, so every
    // load is unconditional and all 2R of a sample are in flight together.
    int64_t col[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      col[r] = (g * cg + static_cast<int64_t>(min(base + lane + L * r, vectors - 1)) * V) * m;
    }
    // acc: the destination's sum; run: the current tap's sum of scale * grad_y,
    // multiplied by the tap's weights when the tap changes (samples come
    // tap by tap).
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
    // A chunk's runs are one sequence, tap-major (tap t's corner 0, 1, 2, 3
    // runs, then t + 1's), each run in sorted order: a fixed order of
    // additions, and a tap's samples of all four cells one sum. An exclusive
    // scan of the run lengths places the runs; the sub-warp then reads L
    // samples at once, each lane finding its run by a binary search over the
    // lanes' run starts and making its sample's weight at its corner (mask *
    // bilinear weight); shuffles hand both out, so the grad_y loads of
    // consecutive samples do not wait on each sample's own loads.
    for (unsigned t0 = 0; t0 < taps; t0 += chunk_taps) {
      const bool in_chunk = static_cast<unsigned>(lane / 4) < min(chunk_taps, taps - t0);
      const unsigned run_first = in_chunk ? starts[my_key + t0] : 0;
      const unsigned run_length = in_chunk ? starts[my_key + t0 + 1] - run_first : 0;
      unsigned run_end = run_length;  // inclusive scan over the sub-warp
#pragma unroll
      for (int d = 1; d < L; d *= 2) {
        const unsigned y = __shfl_up_sync(lanes_mask, run_end, d, L);
        if (lane >= d) run_end += y;
      }
      const unsigned run_begin = run_end - run_length;
      const unsigned total = __shfl_sync(lanes_mask, run_end, L - 1, L);
      for (unsigned a0 = 0; a0 < total; a0 += L) {
        const unsigned item = a0 + lane;
        // The last lane whose run begins at or before the item holds it (an
        // empty run begins where the next one does, so it is never the last).
        int holder = 0;
#pragma unroll
        for (int step = L / 2; step > 0; step /= 2) {
          if (__shfl_sync(lanes_mask, run_begin, holder + step, L) <= item) holder += step;
        }
        const unsigned at = __shfl_sync(lanes_mask, run_first, holder, L) + item -
                            __shfl_sync(lanes_mask, run_begin, holder, L);
        unsigned mine = 0;
        A mine_scale = A(0);
        if (item < total) {
          const int corner = holder % 4;
          mine = where[at];
          const unsigned pixel = mine >> tap_bits, k = mine & tap_mask;
          const SampleFracOf<A> f = fracs[(static_cast<int64_t>(pixel) * s.groups + g) * taps + k];
          const A hy = A(1) - f.ly, hx = A(1) - f.lx;
          const A wgt = corner == 0 ? hy * hx : corner == 1 ? hy * f.lx : corner == 2 ? f.ly * hx : f.ly * f.lx;
          mine_scale = f.mask * wgt;
        }
        const int count = static_cast<int>(min(static_cast<unsigned>(L), total - a0));
        if (V > 1 || m == 1) {
          // A sample enters its tap's run (closing the previous tap's when
          // the tap changes), then its grad_y is added to the run.
          auto enter_tap = [&](unsigned sample) {
            const unsigned k = sample & tap_mask;
            if (k != run_tap) {  // the same for the whole sub-warp
              if (run_tap != taps) close_run();
              run_tap = k;
            }
          };
          auto accumulate = [&](A scale, const A (&gv)[R][V]) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
#pragma unroll
              for (int v = 0; v < V; ++v) run[r][v] += scale * gv[r][v];
            }
          };
          // Sample `at` of the batch (shuffled from the lane that holds it),
          // and its grad_y vectors.
          auto fetch = [&](int at, unsigned& sample, A& scale) {
            sample = __shfl_sync(lanes_mask, mine, at, L);
            scale = __shfl_sync(lanes_mask, mine_scale, at, L);
          };
          auto load = [&](unsigned sample, A (&gv)[R][V]) {
            const T* gy = grad_y + static_cast<int64_t>(sample >> tap_bits) * cm;
#pragma unroll
            for (int r = 0; r < R; ++r) LoadVec<T, V>(gy + col[r], gv[r]);
          };
          // One sample, the run's change before its loads. (Loads issued
          // before the tap test got the test if-converted, so every sample
          // issued the closing's instructions, predicated off: in float32 at
          // one vector a lane 2-4% slower, H100, 0.306 -> 0.312 ms at 128
          // channels, 0.937 -> 0.973 at 7x7/96. In 16 bits that form ran
          // faster, 0.278 -> 0.262 and 0.942 -> 0.882: they take the steps
          // below even at U = 1.)
          auto one_sample = [&](int at) {
            unsigned sample;
            A scale, gv[R][V];
            fetch(at, sample, scale);
            if constexpr (U == 1) enter_tap(sample);
            load(sample, gv);
            if constexpr (U > 1) enter_tap(sample);  // a step's tail, as measured
            accumulate(scale, gv);
          };
          int j = 0;
          constexpr bool kSteps = U > 1 || sizeof(T) == 2, kSingles = U > 1 || sizeof(T) != 2;
          if constexpr (kSteps) {
            // U samples a step, their grad_y loads issued together before
            // any is added (whole steps only: a conditional addition let the
            // compiler sink its load into the branch), then the batch's last
            // count % U samples one by one, in the sequence's order throughout.
#pragma unroll 1
            for (; j + U <= count; j += U) {
              unsigned sample[U];
              A scale[U], gv[U][R][V];
#pragma unroll
              for (int u = 0; u < U; ++u) {
                fetch(j + u, sample[u], scale[u]);
                load(sample[u], gv[u]);
              }
#pragma unroll
              for (int u = 0; u < U; ++u) {
                enter_tap(sample[u]);
                accumulate(scale[u], gv[u]);
              }
            }
          }
          if constexpr (kSingles) {
#pragma unroll 1
            for (; j < count; ++j) one_sample(j);
          }
        } else {  // depth multiplier: output channels c*M .. c*M + M-1 read channel c
#pragma unroll 1
          for (int j = 0; j < count; ++j) {
            const unsigned sample = __shfl_sync(lanes_mask, mine, j, L);
            const A scale = __shfl_sync(lanes_mask, mine_scale, j, L);
            const T* gy = grad_y + static_cast<int64_t>(sample >> tap_bits) * cm;
            const T* wk = weight + static_cast<int64_t>(sample & tap_mask) * cm;
#pragma unroll
            for (int r = 0; r < R; ++r) {
              A sum = A(0);
              for (int64_t jj = 0; jj < m; ++jj) sum += ToF(wk[col[r] + jj]) * ToF(gy[col[r] + jj]);
              acc[r][0] += scale * sum;
            }
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
void LaunchRunGatherWith(cudaStream_t stream, const ConvShape& s, const T* weight, const T* grad_y,
                         const unsigned* starts, const unsigned* where,
                         const SampleFracOf<Accum<T>>* fracs, Accum<T>* grad_x) {
  constexpr int kPerBlock = kThreads / L;  // destinations a block
  const int64_t blocks = (Destinations(s) + kPerBlock - 1) / kPerBlock;
  RunGatherKernel<T, V, R, L><<<blocks, kThreads, 0, stream>>>(s, weight, grad_y, starts, where,
                                                               fracs, grad_x);
}

// The lanes a sub-warp of either gather takes for `vectors` channel vectors
// a group: the fewest of 4, 8, 16 and 32 that hold them all, or 32 (in
// slices) past that.
constexpr int GatherLanes(int64_t vectors) {
  return vectors <= 4 ? 4 : vectors <= 8 ? 8 : vectors <= 16 ? 16 : 32;
}

// Calls launch(std::integral_constant<int, GatherLanes(vectors)>).
template <typename F>
void WithGatherLanes(int64_t vectors, F&& launch) {
  using std::integral_constant;
  switch (GatherLanes(vectors)) {
    case 4: launch(integral_constant<int, 4>{}); break;
    case 8: launch(integral_constant<int, 8>{}); break;
    case 16: launch(integral_constant<int, 16>{}); break;
    default: launch(integral_constant<int, 32>{}); break;
  }
}

template <typename T, int V>
void LaunchRunGather(cudaStream_t stream, const ConvShape& s, const T* weight, const T* grad_y,
                     const unsigned* starts, const unsigned* where,
                     const SampleFracOf<Accum<T>>* fracs, Accum<T>* grad_x) {
  const int64_t vectors = s.channels_per_group() / V;
  // At most 2 vectors a lane (a group of more than 64 is walked in slices),
  // so that the loads of two samples are in flight together: with 4, 80
  // registers (three blocks an SM) left room for one sample's, and ptxas
  // issued its first load apart from the other three. gather_vectors=1: one.
  if (vectors > 32 && GetTuning().gather_vectors != 1) {
    LaunchRunGatherWith<T, V, 2, 32>(stream, s, weight, grad_y, starts, where, fracs, grad_x);
    return;
  }
  WithGatherLanes(vectors, [&](auto l) {
    LaunchRunGatherWith<T, V, 1, decltype(l)::value>(stream, s, weight, grad_y, starts, where, fracs,
                                                     grad_x);
  });
}

// The band gather. A sub-warp of L lanes (each lane R vectors of V channels
// of the group; more vectors take more slices, grid.y) owns the destinations
// of B input rows by `segment` columns of one image and group, and walks the
// cells that feed them column by column: cell column x0 - 1 to x_end - 1,
// each column's B + 1 cell rows y0 - 1 to y0 + B - 1, each cell's samples in
// sorted order. A sample of cell (cy, cx) adds (mask * bilinear weight of
// the corner) * grad_y * weight of its tap to its corners (cy, cx), (cy,
// cx + 1), (cy + 1, cx), (cy + 1, cx + 1) that lie in the band: column cx in
// `cur`, column cx + 1 in `next`, registers of B rows. After cell column cx,
// destination column cx has all four of its cells' samples: it is stored,
// and next becomes cur. So each sample's grad_y row is read about
// (1 + 1/B)(1 + 1/segment) times, where a gather per destination reads it
// four times (once per corner), and the cells' starts are one per cell, not
// one per (cell, tap). Every destination's additions come in a fixed order
// (its cells (y - 1, x - 1), (y, x - 1), (y - 1, x), (y, x), each in sorted
// order); it is written once, by the one sub-warp that owns it.
// B: destination rows a band, for V * R channels a lane: the two columns of
// accumulators (2 * B * R * V) are 32 values, or 64 at 16 channels a lane
// (two 8-channel vectors).
constexpr int BandRows(int vr) { return vr >= 8 ? 2 : 4; }

// R: vectors of V channels a lane (vector q of lane l is slice * L * R + q * L
// + l, so each load of a sub-warp is one contiguous row segment); more than a
// slice's L * R vectors take more slices, grid.y. U: samples a step whose
// loads are in flight together (1 or 2); with 2 samples or 2 vectors the
// registers allow two blocks an SM (about 100 a thread), else three.
template <typename T, int V, int L, int U, int R>
__global__ void __launch_bounds__(kThreads, U == 2 || R == 2 ? 2 : 3)
    BandGatherKernel(ConvShape s, int segment, const T* __restrict__ weight,
                     const T* __restrict__ grad_y, const unsigned* __restrict__ starts,
                     const unsigned* __restrict__ where,
                     const SampleFracOf<Accum<T>>* __restrict__ fracs, Accum<T>* __restrict__ grad_x) {
  using A = Accum<T>;
  constexpr int B = BandRows(V * R);
  const int sub = (threadIdx.x % 32) / L, lane = threadIdx.x % L;
  const unsigned lanes_mask = L == 32 ? 0xffffffffu : ((1u << L) - 1u) << (sub * L);
  // GatherFits: cells (and so bands and images) are numbered in 32 bits.
  const unsigned h = static_cast<unsigned>(s.h), w = static_cast<unsigned>(s.w);
  const unsigned groups = static_cast<unsigned>(s.groups), seg = static_cast<unsigned>(segment);
  const unsigned bands = (h + B - 1) / B, segments = (w + seg - 1) / seg;
  const int64_t unit =
      (static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32) * (32 / L) + sub;
  if (unit >= s.n * groups * bands * segments) return;  // the whole sub-warp: it shares unit
  unsigned rest = static_cast<unsigned>(unit);
  const unsigned g = rest % groups;
  rest /= groups;
  const unsigned x0 = rest % segments * seg;
  rest /= segments;
  const unsigned y0 = rest % bands * B, image = rest / bands;
  const unsigned x_end = min(x0 + seg, w);
  const int64_t cg = s.channels_per_group(), c = s.c;  // M = 1: c output channels
  const int vectors = static_cast<int>(cg / V);
  // Lanes past the group's channels read the last vector and never store it,
  // so every load is unconditional.
  int vec[R];
  int64_t col[R];
#pragma unroll
  for (int q = 0; q < R; ++q) {
    vec[q] = (blockIdx.y * R + q) * L + lane;
    col[q] = g * cg + static_cast<int64_t>(min(vec[q], vectors - 1)) * V;
  }
  const unsigned taps = static_cast<unsigned>(s.taps());
  const int tap_bits = TapBits(taps);
  const unsigned tap_mask = (1u << tap_bits) - 1u;
  const unsigned row_cells = (w + 1) * groups;  // cells a padded row

  A cur[B][R][V], next[B][R][V];
#pragma unroll
  for (int r = 0; r < B; ++r) {
#pragma unroll
    for (int q = 0; q < R; ++q) {
#pragma unroll
      for (int v = 0; v < V; ++v) cur[r][q][v] = next[r][q][v] = A(0);
    }
  }
  // Cell (y0 - 1, x0 - 1): padded row y0, padded column x0.
  const unsigned first_cell = ((image * (h + 1) + y0) * (w + 1) + x0) * groups + g;
  for (unsigned cx = x0; cx <= x_end; ++cx) {  // padded cell column: cx - 1 in the image
    unsigned cell = first_cell + (cx - x0) * groups;
#pragma unroll
    for (int r = 0; r <= B; ++r, cell += row_cells) {
      // Cell row y0 - 1 + r; its top corners feed band row r - 1, its bottom ones row r.
      if (y0 + r > h) break;  // past the last cell row (H - 1)
      const unsigned begin = starts[cell], end = starts[cell + 1];
      for (unsigned a0 = begin; a0 < end; a0 += L) {
        // Each lane makes one sample's corner scales; shuffles hand them out.
        const unsigned item = a0 + lane;
        unsigned mine = 0;
        A scale[4] = {A(0), A(0), A(0), A(0)};
        if (item < end) {
          mine = where[item];
          const SampleFracOf<A> f =
              fracs[(static_cast<int64_t>(mine >> tap_bits) * groups + g) * taps + (mine & tap_mask)];
          const A hy = A(1) - f.ly, hx = A(1) - f.lx;
          scale[0] = f.mask * (hy * hx);
          scale[1] = f.mask * (hy * f.lx);
          scale[2] = f.mask * (f.ly * hx);
          scale[3] = f.mask * (f.ly * f.lx);
        }
        const int count = static_cast<int>(min(static_cast<unsigned>(L), end - a0));
        auto fetch = [&](int j, unsigned& sample, A (&sc)[4]) {
          sample = __shfl_sync(lanes_mask, mine, j, L);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const bool used = i < 2 ? r >= 1 : r < B;  // corners in the band
            sc[i] = used ? __shfl_sync(lanes_mask, scale[i], j, L) : A(0);
          }
        };
        auto load = [&](unsigned sample, A (&gv)[R][V], A (&wv)[R][V]) {
          const T* gy = grad_y + static_cast<int64_t>(sample >> tap_bits) * c;
          const T* wk = weight + static_cast<int64_t>(sample & tap_mask) * c;
#pragma unroll
          for (int q = 0; q < R; ++q) {
            LoadVec<T, V>(gy + col[q], gv[q]);
            LoadVec<T, V>(wk + col[q], wv[q]);
          }
        };
        auto add = [&](const A (&sc)[4], const A (&gv)[R][V], const A (&wv)[R][V]) {
#pragma unroll
          for (int q = 0; q < R; ++q) {
#pragma unroll
            for (int v = 0; v < V; ++v) {
              const A gw = gv[q][v] * wv[q][v];
              if (r >= 1) {
                cur[r - 1][q][v] += sc[0] * gw;
                next[r - 1][q][v] += sc[1] * gw;
              }
              if (r < B) {
                cur[r][q][v] += sc[2] * gw;
                next[r][q][v] += sc[3] * gw;
              }
            }
          }
        };
        // U samples a step, all their loads issued before any is added, in
        // the cell's order throughout; then the last count % U one by one.
        int j = 0;
        if constexpr (U > 1) {
#pragma unroll 1
          for (; j + U <= count; j += U) {
            unsigned sample[U];
            A sc[U][4], gv[U][R][V], wv[U][R][V];
#pragma unroll
            for (int u = 0; u < U; ++u) {
              fetch(j + u, sample[u], sc[u]);
              load(sample[u], gv[u], wv[u]);
            }
#pragma unroll
            for (int u = 0; u < U; ++u) add(sc[u], gv[u], wv[u]);
          }
        }
#pragma unroll 1
        for (; j < count; ++j) {
          unsigned sample;
          A sc[4], gv[R][V], wv[R][V];
          fetch(j, sample, sc);
          load(sample, gv, wv);
          add(sc, gv, wv);
        }
      }
    }
    // Destination column cx - 1 is complete (the first, x0 - 1, is another
    // segment's: only its right-hand corners were wanted).
    if (cx > x0) {
#pragma unroll
      for (int r = 0; r < B; ++r) {
        if (y0 + r < h) {
          A* o = grad_x + ((static_cast<int64_t>(image) * h + y0 + r) * w + cx - 1) * c;
#pragma unroll
          for (int q = 0; q < R; ++q) {
            if (vec[q] < vectors) {
#pragma unroll
              for (int v = 0; v < V; ++v) o[col[q] + v] = cur[r][q][v];
            }
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < B; ++r) {
#pragma unroll
      for (int q = 0; q < R; ++q) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          cur[r][q][v] = next[r][q][v];
          next[r][q][v] = A(0);
        }
      }
    }
  }
}

// The band gather's shape for `vec` channels a vector: two vectors a lane
// past 32 vectors (V > 1), one sample a step then; its grid (units of B rows
// by `segment` columns, kThreads / L of them a block; channel slices).
// Measured on an H200, gather kernel ms, 512 channels: two vectors a lane
// 0.411 against 0.474 float32, 0.299 against 0.374 bfloat16 (tuning key
// gather_band_vectors=1: one).
int BandRounds(int vec, int64_t vectors) {
  return vec > 1 && vectors > 32 && GetTuning().gather_band_vectors != 1 ? 2 : 1;
}

int BandSegment() {
  const int tuned = GetTuning().gather_segment;
  return tuned > 0 ? tuned : 4;
}

dim3 BandGrid(const ConvShape& s, int vec, int lanes, int rounds) {
  const int rows = BandRows(vec * rounds), segment = BandSegment();
  const int64_t units = s.n * s.groups * ((s.h + rows - 1) / rows) * ((s.w + segment - 1) / segment);
  const int64_t per_block = kThreads / lanes, vectors = s.channels_per_group() / vec;
  return dim3(static_cast<unsigned>((units + per_block - 1) / per_block),
              static_cast<unsigned>((vectors + lanes * rounds - 1) / (lanes * rounds)));
}

// Which gather makes grad_x for `vec` channels a vector: the band gather
// (BandGatherKernel) or the run gather (RunGatherKernel, which also takes
// depth multipliers and groups of fewer than 64 channels). Measured on an
// H200 (benchmarks/RESULTS.md, "The band gather" and "Since 5164d92"), the
// band gather's kernel against the run gather's: faster at 96-128 channels
// (0.247 against 0.305 ms at 128 float32), at 512 (bfloat16 0.300 against
// 0.320, float32 level) and 5x5 with 144 (0.647 against 0.724 float32, 0.567
// against 0.654 bfloat16); slower at 64 bfloat16 (0.151 against 0.138) and
// 7x7 with 192 (0.375 against 0.331 float32, 0.321 against 0.303 bfloat16),
// where its keys (cells, not (cell, tap): fewer bits to sort, fewer segment
// starts) win most of it back: whole fwd+bwd, only the gather switched,
// 64 float32 0.434 against 0.459, 64 bfloat16 level, 192 bfloat16 1.125
// against 1.141, 192 float32 1.01x its run gather's. Where the band grid is
// under one block an SM it loses outright (batch 1 at 512 channels, 16-32
// blocks: 1.3-1.4x the whole fwd+bwd; (32, 14, 14, 384) bfloat16, 112
// blocks: 1.04x; 224 blocks at 384 float32 were level), so it needs one.
// Tuning key gather_kernel=runs or =band forces one.
bool UseBandGather(const ConvShape& s, int vec) {
  if (s.multiplier != 1) return false;
  const int choice = GetTuning().gather_kernel;
  if (choice != 0) return choice == 2;
  if (s.channels_per_group() < 64) return false;
  const int64_t vectors = s.channels_per_group() / vec;
  const dim3 grid = BandGrid(s, vec, GatherLanes(vectors), BandRounds(vec, vectors));
  return int64_t{grid.x} * grid.y >= SmCount();
}

template <typename T, int V, int L, int U, int R>
void LaunchBandGatherWith(cudaStream_t stream, const ConvShape& s, const T* weight, const T* grad_y,
                          const unsigned* starts, const unsigned* where,
                          const SampleFracOf<Accum<T>>* fracs, Accum<T>* grad_x) {
  BandGatherKernel<T, V, L, U, R><<<BandGrid(s, V, L, R), kThreads, 0, stream>>>(
      s, BandSegment(), weight, grad_y, starts, where, fracs, grad_x);
}

template <typename T, int V>
void LaunchBandGather(cudaStream_t stream, const ConvShape& s, const T* weight, const T* grad_y,
                      const unsigned* starts, const unsigned* where,
                      const SampleFracOf<Accum<T>>* fracs, Accum<T>* grad_x) {
  const int64_t vectors = s.channels_per_group() / V;
  const bool one = GetTuning().gather_band_step == 1;
  auto launch = [&](auto l) {
    if (one) {
      LaunchBandGatherWith<T, V, decltype(l)::value, 1, 1>(stream, s, weight, grad_y, starts, where, fracs, grad_x);
    } else {
      LaunchBandGatherWith<T, V, decltype(l)::value, 2, 1>(stream, s, weight, grad_y, starts, where, fracs, grad_x);
    }
  };
  if constexpr (V > 1) {
    if (BandRounds(V, vectors) == 2) {  // a group of more than 32 vectors in half the slices
      LaunchBandGatherWith<T, V, 32, 1, 2>(stream, s, weight, grad_y, starts, where, fracs, grad_x);
      return;
    }
  }
  WithGatherLanes(vectors, launch);
}

template <typename T>
cudaError_t Gather(cudaStream_t stream, const ConvShape& s, const T* offset, const T* mask,
                   const T* weight, const T* grad_y, Accum<T>* grad_x, unsigned char* scratch) {
  using A = Accum<T>;
  const Layout d = MakeLayout(s, std::is_same_v<A, double>);
  auto* starts = reinterpret_cast<unsigned*>(scratch + d.starts);
  auto* keys_in = reinterpret_cast<unsigned*>(scratch + d.keys_in);
  auto* keys_out = reinterpret_cast<unsigned*>(scratch + d.keys_out);
  auto* where_in = reinterpret_cast<unsigned*>(scratch + d.where_in);
  auto* where_out = reinterpret_cast<unsigned*>(scratch + d.where_out);
  auto* fracs = reinterpret_cast<SampleFracOf<A>*>(scratch + d.fracs);
  const int samples = static_cast<int>(Samples(s));
  const int64_t grid = std::min<int64_t>((Samples(s) + kThreads - 1) / kThreads, 1 << 20);
  constexpr int kVec = 16 / sizeof(T);
  const bool vectors = s.multiplier == 1 && s.channels_per_group() % kVec == 0;
  const bool band = UseBandGather(s, vectors ? kVec : 1);
  const int64_t key_taps = band ? 1 : s.taps();
  SampleKeysKernel<T><<<grid, kThreads, 0, stream>>>(s, static_cast<unsigned>(key_taps), offset, mask,
                                                     keys_in, where_in, fracs);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // The scratch holds the sort's storage for the run gather's keys
  // (MakeLayout); fewer bits have never needed more, but the sort would not
  // say if they did, so ask rather than run past the workspace.
  const int bits = KeyBits(s, key_taps);
  size_t sort_bytes = 0;
  err = cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, keys_in, keys_out, where_in, where_out,
                                        samples, 0, bits, stream);
  if (err != cudaSuccess) return err;
  if (sort_bytes > d.sort_bytes) return cudaErrorInvalidValue;
  sort_bytes = d.sort_bytes;
  err = cub::DeviceRadixSort::SortPairs(scratch + d.sort_temp, sort_bytes, keys_in, keys_out, where_in,
                                        where_out, samples, 0, bits, stream);
  if (err != cudaSuccess) return err;
  const int64_t outside = OutsideKey(s, key_taps);
  SegmentStartsKernel<<<static_cast<unsigned>((outside + kThreads) / kThreads), kThreads, 0, stream>>>(
      keys_out, static_cast<unsigned>(samples), static_cast<unsigned>(outside), starts);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (band) {
    if (vectors) {
      LaunchBandGather<T, kVec>(stream, s, weight, grad_y, starts, where_out, fracs, grad_x);
    } else {
      LaunchBandGather<T, 1>(stream, s, weight, grad_y, starts, where_out, fracs, grad_x);
    }
  } else if (vectors) {
    LaunchRunGather<T, kVec>(stream, s, weight, grad_y, starts, where_out, fracs, grad_x);
  } else {
    LaunchRunGather<T, 1>(stream, s, weight, grad_y, starts, where_out, fracs, grad_x);
  }
  return cudaGetLastError();
}

}  // namespace

bool GatherFits(const ConvShape& s) {
  return OutsideKey(s, s.taps()) < std::numeric_limits<unsigned>::max() &&
         Samples(s) < std::numeric_limits<int>::max() &&
         (s.n * s.ho * s.wo << TapBits(s.taps())) < std::numeric_limits<unsigned>::max();
}

size_t GatherScratchBytes(const ConvShape& s, bool wide) { return MakeLayout(s, wide).total; }

cudaError_t GradXByGather(cudaStream_t stream, Dtype dtype, const ConvShape& s, const void* offset,
                          const void* mask, const void* weight, const void* grad_y, void* grad_x,
                          void* scratch) {
  return DispatchDtype<CudaTypes>(dtype, [&](auto zero) {
    using T = decltype(zero);
    return Gather(stream, s, static_cast<const T*>(offset), static_cast<const T*>(mask),
                  static_cast<const T*>(weight), static_cast<const T*>(grad_y),
                  static_cast<Accum<T>*>(grad_x), static_cast<unsigned char*>(scratch));
  });
}

}  // namespace cuda_detail
}  // namespace jax_deform
