"""Mutation check of the test suite: does it catch the bugs it claims to catch?

Each mutant is one small, plausible bug, applied by exact string replacement
to a temporary copy of the working tree (tracked files and untracked ones git
does not ignore: a new file counts before it is committed). The
copy's extension is built CPU-only (JAX_DEFORM_CUDA=OFF) with CMake into one
build directory that every mutant reuses, and the tests that should catch the
bug are run against the copy. A mutant is KILLED when they fail, SURVIVED when
they pass. A mutant whose search string is not in its file (exactly once) is
an ERROR: the list must not rot silently when the code changes.

Mutants of the CUDA kernels run only where a GPU is visible (with
JAX_DEFORM_CUDA=ON); elsewhere their search strings are still checked.

    python tests/mutants.py                 # all mutants; exit 1 unless all are killed
    python tests/mutants.py bf16 grad_mask  # only mutants whose name contains a word
    python tests/mutants.py --list

Needs cmake, a C++17 compiler and nanobind (`pip install nanobind`) in the
environment that runs the tests. Takes about 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments that should kill it
    cuda: bool = False  # runs only with a GPU

    @property
    def compiled(self) -> bool:
        return self.path.startswith("lib/")


FORWARD = "tests/test_api.py::test_forward_matches_float64_oracle"
GRADIENTS = "tests/test_gradients.py"
HALF = "tests/test_api.py::test_half_precision_is_the_float32_result_rounded"
HOSTILE_BACKWARD = "tests/test_hostile.py::test_extreme_offsets_backward"

# Test selections the CUDA mutants share.
GPU_GRADIENTS = ("tests/test_api.py", "-m", "gpu", "-k", "gradients_match")
GPU_FORWARD = ("tests/test_api.py", "-m", "gpu", "-k", "forward_matches")
GPU_HALF_PRECISION = ("tests/test_api.py", "-m", "gpu", "-k", "half_precision")
GPU_DETERMINISM = ("tests/test_determinism.py", "-m", "gpu")
GPU_API_AND_DETERMINISM = ("tests/test_api.py", "tests/test_determinism.py", "-m", "gpu")
# Every lane and vector variant of the gather, in bitwise-fixed order.
GPU_GATHER_ORDER = ("tests/test_determinism.py", "tests/test_api.py", "-m", "gpu", "-k",
                    "bitwise or deterministic_gradients")

MUTANTS = [
    # ---- the six of issue 18
    Mutant("corner weights: x/y fractions swapped in two corners", "lib/deform_math.h",
           "  wgt[1] = hy * b.lx * b.valid[1];\n  wgt[2] = b.ly * hx * b.valid[2];",
           "  wgt[1] = hx * b.ly * b.valid[1];\n  wgt[2] = b.lx * hy * b.valid[2];",
           (FORWARD, "-k", "cpu")),
    Mutant("grad_weight: mask multiply dropped", "lib/cpu_kernels.cc",
           "A* wp = wpart + k * cm;\n"
           "            for (int64_t c = 0; c < count; ++c) {\n"
           "              const A v = t.mask * val[c];",
           "A* wp = wpart + k * cm;\n"
           "            for (int64_t c = 0; c < count; ++c) {\n"
           "              const A v = val[c];",
           (GRADIENTS, "-k", "cpu")),
    Mutant("SAME: extra pad on top/left instead of bottom/right", "jax_deform/_params.py",
           "pads.append((total // 2, total - total // 2))",
           "pads.append((total - total // 2, total // 2))",
           (FORWARD, "-k", "cpu")),
    Mutant("bf16 output truncated instead of rounded to nearest even", "lib/cpu_dtypes.h",
           "  u += 0x7fffu + ((u >> 16) & 1u);\n", "",
           (HALF, "-k", "cpu")),
    Mutant("grad_mask loses its NaN for NaN offsets", "lib/cpu_kernels.cc",
           "std::fill(val, val + count, t.b.poison);\n  std::fill(dvy, dvy + count, t.b.poison);",
           "std::fill(val, val + count, 0.f);\n  std::fill(dvy, dvy + count, t.b.poison);",
           (HOSTILE_BACKWARD, "-k", "cpu")),
    Mutant("Flax mask = 1 + tanh(logits) instead of 2 * sigmoid(logits)", "jax_deform/_flax_common.py",
           "mask = 2.0 * jax.nn.sigmoid(pred[..., n_off:])",
           "mask = 1.0 + jnp.tanh(pred[..., n_off:])",
           ("tests/test_nnx.py", "tests/test_linen.py", "-k", "sigmoid")),
    # ---- kernels (CPU)
    Mutant("d(weight)/dx of corner 2 uses the wrong fraction", "lib/deform_math.h",
           "dx[2] = -b.ly * b.valid[2];", "dx[2] = -hy * b.valid[2];",
           (GRADIENTS, "-k", "cpu")),
    Mutant("right-edge corner dropped (x0 + 1 < w - 1)", "lib/deform_math.h",
           "const bool x0_in = x0 >= 0, x1_in = x0 + 1 < w;",
           "const bool x0_in = x0 >= 0, x1_in = x0 + 1 < w - 1;",
           (FORWARD, "-k", "cpu")),
    Mutant("grad_offset dx not multiplied by the mask", "lib/cpu_kernels.cc",
           "grad_offset[oi + 1] = t.mask * sum_dx;", "grad_offset[oi + 1] = sum_dx;",
           (GRADIENTS, "-k", "cpu")),
    Mutant("grad_x not multiplied by the mask", "lib/cpu_kernels.cc",
           "const A w = t.mask * t.wgt[i];", "const A w = t.wgt[i];",
           (GRADIENTS, "-k", "cpu")),
    Mutant("grad_weight skips the first image", "lib/cpu_kernels.cc",
           "for (int64_t n = 0; n < s.n; ++n) sum += weight_partial",
           "for (int64_t n = 1; n < s.n; ++n) sum += weight_partial",
           (GRADIENTS, "-k", "cpu")),
    Mutant("depth multiplier: column gradient reads weight j = 0 only", "lib/cpu_kernels.cc",
           "sum += wk[(c0 + c) * m + j] * gy[(c0 + c) * m + j];",
           "sum += wk[(c0 + c) * m] * gy[(c0 + c) * m + j];",
           (GRADIENTS, "-k", "cpu")),
    Mutant("forward: NaN sample position no longer poisons", "lib/cpu_kernels.cc",
           "std::fill(val, val + count, t.b.poison);\n  for (int i = 0; i < 4; ++i) {",
           "std::fill(val, val + count, 0.f);\n  for (int i = 0; i < 4; ++i) {",
           ("tests/test_hostile.py", "-k", "extreme_offsets and cpu")),
    Mutant("float16 output truncated instead of rounded", "lib/cpu_dtypes.h",
           "  r += 0xfffu + ((r >> 13) & 1u);\n", "",
           (HALF, "-k", "cpu")),
    # ---- Python side
    Mutant("grad_bias summed over the first image only", "jax_deform/_autodiff.py",
           "return (y.astype(acc) + bias.astype(acc)).astype(y.dtype)",
           "return y.astype(acc).at[:1].add(bias.astype(acc)).astype(y.dtype)",
           (GRADIENTS, "-k", "cpu")),
    Mutant("vmap of grad: grad_mask's batch order reversed", "jax_deform/_batching.py",
           "            out.append(_unfold_last(g, size))\n",
           "            out.append(_unfold_last(g, size)[..., ::-1, :] if i == 2 else _unfold_last(g, size))\n",
           ("tests/test_api.py::test_vmap_of_grad_every_axis_pattern", "-k", "cpu")),
    Mutant("deterministic=None ignores the XLA flag", "jax_deform/api.py",
           "deterministic = deterministic_by_default()", "deterministic = False",
           ("tests/test_determinism.py", "-k", "flag")),
    Mutant("NCHW result transposed to (N, C, W, H)", "jax_deform/_layout.py",
           "jnp.transpose(y, (0, 3, 1, 2))", "jnp.transpose(y, (0, 3, 2, 1))",
           (GRADIENTS, "-k", "cpu")),
    Mutant("output width from the vertical dilation", "jax_deform/_params.py",
           "wo = (w + pl + pr - dilation_[1] * (kw - 1) - 1) // stride_[1] + 1",
           "wo = (w + pl + pr - dilation_[0] * (kw - 1) - 1) // stride_[1] + 1",
           (GRADIENTS, "-k", "cpu")),
    Mutant("CPU tangent kernel drops the y-offset term", "lib/cpu_kernels.cc",
           "const A sample_dot = val_dot[c] + dvy[c] * dy + dvx[c] * dx;",
           "const A sample_dot = val_dot[c] + dvx[c] * dx;",
           ("tests/test_autodiff.py", "-k", "per_operand")),
    Mutant("CPU tangent kernel ignores the mask's tangent", "lib/cpu_kernels.cc",
           "const A by_rest = m_dot * val[c] + t.mask * sample_dot;",
           "const A by_rest = t.mask * sample_dot;",
           ("tests/test_autodiff.py", "-k", "per_operand")),
    Mutant("forward mode on a mesh: the tangent takes the reference's jvp", "jax_deform/_primitives.py",
           "lowering = (_tangent_partitioned_lowering if", "lowering = (_tangent_fallback_lowering if",
           ("tests/test_sharding.py", "-k", "forward_mode")),
    Mutant("forward mode on a mesh: offset and mask tangents split as each other", "jax_deform/_sharding.py",
           '_TANGENT_ROLES = ("x", "offset", "mask", "weight") * 2',
           '_TANGENT_ROLES = ("x", "offset", "mask", "weight", "x", "mask", "offset", "weight")',
           ("tests/test_sharding.py", "-k", "forward_mode")),
    # ---- CUDA kernels: run only where a GPU is visible
    Mutant("CUDA: lane reduction skips the first halving", "lib/cuda_backward.cu",
           "for (int d = lanes / 2; d > 0; d /= 2)", "for (int d = lanes / 4; d > 0; d /= 2)",
           GPU_API_AND_DETERMINISM, cuda=True),
    Mutant("CUDA: scalar atomic add drops the first element", "lib/cuda_common.cuh",
           "for (int i = 0; i < V; ++i) atomicAdd(p + i, v[i]);",
           "for (int i = 1; i < V; ++i) atomicAdd(p + i, v[i]);",
           GPU_API_AND_DETERMINISM, cuda=True),
    Mutant("CUDA: gather drops the corner weight", "lib/cuda_grad_x_gather.cu",
           "run[r][v] += scale * gv[r][v];", "run[r][v] += gv[r][v];",
           GPU_API_AND_DETERMINISM, cuda=True),
    Mutant("CUDA: sample kernel's reduce-scatter skips the widest exchange", "lib/cuda_backward.cu",
           "for (int d = L / 2; d > 0; d /= 2)", "for (int d = L / 4; d > 0; d /= 2)",
           GPU_GRADIENTS, cuda=True),
    Mutant("CUDA: channel-slice sums drop the last slice", "lib/cuda_backward.cu",
           "for (int sl = 0; sl < slices; ++sl)", "for (int sl = 0; sl < slices - 1; ++sl)",
           GPU_GRADIENTS, cuda=True),
    Mutant("CUDA: sample kernel at 8 channels a load counts its lanes' vectors in fours",
           "lib/cuda_backward.cu",
           "for (int q = 0; q < R; ++q) active[q] = (slice * R + q) * L + lane < cg / V;",
           "for (int q = 0; q < R; ++q) active[q] = (slice * R + q) * L + lane < cg / kSampleVec;",
           GPU_HALF_PRECISION, cuda=True),
    Mutant("CUDA: 16-bit sample kernel's grad_weight slots of 4 channels at 8 a load",
           "lib/cuda_backward.cu", ".Bytes(p.chunk_taps, p.rounds, p.vec,",
           ".Bytes(p.chunk_taps, p.rounds, kSampleVec,",
           GPU_HALF_PRECISION, cuda=True),
    Mutant("CUDA: sample kernel's grad_weight sums read a lane's first quad of channels twice",
           "lib/cuda_backward.cu",
           "const A* slot = weight_sums + tq * tap_stride + (v / 4) * quad_stride + l * 4 + v % 4;",
           "const A* slot = weight_sums + tq * tap_stride + l * 4 + v % 4;",
           GPU_HALF_PRECISION, cuda=True),
    Mutant("CUDA: sample kernel's grad_weight slot strides assume 8 warps (3 vectors a lane run 5)",
           "lib/cuda_backward.cu", "constexpr int kThreads = SampleWarps(R) * 32;",
           "constexpr int kThreads = SampleWarps(1) * 32;", GPU_GRADIENTS, cuda=True),
    Mutant("CUDA: offsets loaded ahead for the wrong pixel", "lib/cuda_backward.cu",
           "load_ahead(next_pixel);", "load_ahead(pixel);",
           GPU_GRADIENTS, cuda=True),
    Mutant("CUDA: corner offsets forget the image", "lib/cuda_common.cuh",
           "const Off base = ((static_cast<Off>(image) * h + y0) * w + x0) * pixel_bytes;",
           "const Off base = (y0 * w + x0) * pixel_bytes;",
           GPU_FORWARD, cuda=True),
    Mutant("CUDA: the bottom-left corner reads the bottom-right one", "lib/cuda_common.cuh",
           "if (y1_in && x0_in) t.start[2] = base + w * pixel_bytes;",
           "if (y1_in && x0_in) t.start[2] = base + (w + 1) * pixel_bytes;",
           GPU_GRADIENTS, cuda=True),
    Mutant("CUDA: forward tap table's counter forgets the column carry", "lib/cuda_forward.cu",
           "if (kx >= kw) kx -= kw, ++ky;", "if (kx >= kw) kx -= kw;",
           GPU_FORWARD, cuda=True),
    Mutant("CUDA: forward's second pixel of a pass reads the first one's taps", "lib/cuda_forward.cu",
           "tap_table + (pixel[1] >= 0 ? lp1 : lp) * taps}", "tap_table + lp * taps}",
           GPU_FORWARD, cuda=True),
    Mutant("CUDA: bfloat16 loads swap the halves of each word", "lib/cuda_common.cuh",
           "out[2 * i] = __uint_as_float(words[i] << 16);",
           "out[2 * i] = __uint_as_float(words[i] & 0xffff0000u);",
           ("tests/test_api.py", "-m", "gpu", "-k", "half_precision and vector"), cuda=True),
    Mutant("CUDA: sample kernel's pixel cursor forgets the next row", "lib/cuda_backward.cu",
           "ox -= wo;\n      band_y0 += 1 << band_bits;", "ox -= wo;",
           GPU_GRADIENTS, cuda=True),
    Mutant("CUDA: pixel decoding mixes up height and width", "lib/cuda_common.cuh",
           "return {row / ho, row % ho, p - row * wo};", "return {row / ho, row % ho, p - row * ho};",
           GPU_GRADIENTS, cuda=True),
    # One fetch serves the steps and the sample-by-sample loop.
    Mutant("CUDA: gather sub-warps read another sub-warp's entries",
           "lib/cuda_grad_x_gather.cu", "__shfl_sync(lanes_mask, mine, at, L)",
           "__shfl_sync(lanes_mask, mine, at)",
           GPU_GATHER_ORDER, cuda=True),
    Mutant("CUDA: gather keeps one tap's sum running into the next tap", "lib/cuda_grad_x_gather.cu",
           "if (run_tap != taps) close_run();\n              run_tap = k;", "run_tap = k;",
           GPU_GATHER_ORDER, cuda=True),
    Mutant("CUDA: gather reads its corner-0 samples from the corner-1 cell", "lib/cuda_grad_x_gather.cu",
           "const unsigned cell0 = cell3 + (w + 2) * groups,",
           "const unsigned cell0 = cell3 + (w + 1) * groups,",
           GPU_DETERMINISM, cuda=True),
    Mutant("CUDA: gather's first sample of each run counts as the previous run's", "lib/cuda_grad_x_gather.cu",
           "if (__shfl_sync(lanes_mask, run_begin, holder + step, L) <= item) holder += step;",
           "if (__shfl_sync(lanes_mask, run_begin, holder + step, L) < item) holder += step;",
           GPU_DETERMINISM, cuda=True),
    Mutant("CUDA: gather's sample-by-sample loop (one vector a lane in fp32; after whole steps) "
           "drops a batch's last sample",
           "lib/cuda_grad_x_gather.cu", "for (; j < count; ++j) one_sample(j);",
           "for (; j + 1 < count; ++j) one_sample(j);",
           GPU_GATHER_ORDER, cuda=True),
    Mutant("CUDA: gather's tap chunks skip the tap after each chunk", "lib/cuda_grad_x_gather.cu",
           "for (unsigned t0 = 0; t0 < taps; t0 += chunk_taps) {",
           "for (unsigned t0 = 0; t0 < taps; t0 += chunk_taps + 1) {",
           GPU_DETERMINISM, cuda=True),
    Mutant("CUDA: gather weighs corner-1 samples as corner 2", "lib/cuda_grad_x_gather.cu",
           "corner == 1 ? hy * f.lx", "corner == 1 ? f.ly * hx",
           GPU_DETERMINISM, cuda=True),
    # The band gather (also forced on eight cases by test_deterministic_gradients_with_each_gather).
    Mutant("CUDA: band gather stores the column left of its segment too", "lib/cuda_grad_x_gather.cu",
           "if (cx > x0) {", "if (cx >= x0) {",
           GPU_GATHER_ORDER, cuda=True),
    Mutant("CUDA: band gather weighs top-right corners as bottom-right", "lib/cuda_grad_x_gather.cu",
           "next[r - 1][q][v] += sc[1] * gw;", "next[r - 1][q][v] += sc[3] * gw;",
           GPU_GATHER_ORDER, cuda=True),
    Mutant("CUDA: band gather's second vector a lane starts in the next slice", "lib/cuda_grad_x_gather.cu",
           "vec[q] = (blockIdx.y * R + q) * L + lane;", "vec[q] = (blockIdx.y + q) * L + lane;",
           GPU_GATHER_ORDER, cuda=True),
    Mutant("CUDA: band gather skips the image's last cell row", "lib/cuda_grad_x_gather.cu",
           "if (y0 + r > h) break;", "if (y0 + r >= h) break;",
           GPU_GATHER_ORDER, cuda=True),
    Mutant("CUDA: band gather's keys keep the tap", "lib/cuda_grad_x_gather.cu",
           "key = static_cast<unsigned>(cell) * key_taps + (key_taps > 1 ? k : 0);",
           "key = static_cast<unsigned>(cell) * key_taps + k;",
           GPU_GATHER_ORDER, cuda=True),
    Mutant("CUDA: sample keys forget the padding row of the cell grid", "lib/cuda_grad_x_gather.cu",
           "const int64_t cell = ((at.image * (s.h + 1) + static_cast<int64_t>(fy) + 1)",
           "const int64_t cell = ((at.image * s.h + static_cast<int64_t>(fy) + 1)",
           GPU_DETERMINISM, cuda=True),
    Mutant("CUDA: sample kernel's all-inside test forgets the bottom-right corner", "lib/cuda_backward.cu",
           "kInteriorLoads && (tap.start[0] | tap.start[1] | tap.start[2] | tap.start[3]) >= 0;",
           "kInteriorLoads && (tap.start[0] | tap.start[1] | tap.start[2]) >= 0;",
           GPU_HALF_PRECISION, cuda=True),
    Mutant("CUDA: sample kernel's offset-y sum takes the rows the wrong way round", "lib/cuda_backward.cu",
           "sums[3 * t + 1] += poison + (bottom - top);", "sums[3 * t + 1] += poison + (top - bottom);",
           GPU_GRADIENTS, cuda=True),
    # The sample kernel's visit order (bands: 7x7, 5x5, stride-2 cases by default).
    Mutant("CUDA: sample kernel's bands skip their padded last band", "lib/cuda_backward.cu",
           "if (band_y0 >= ho) band_y0 = 0, ++image;",
           "if (band_y0 + (1 << band_bits) > ho) band_y0 = 0, ++image;",
           GPU_GRADIENTS, cuda=True),
    Mutant("CUDA: sample kernel's band cursor carries a column for every row", "lib/cuda_backward.cu",
           "ox += v >> band_bits;", "ox += v;",
           GPU_GRADIENTS, cuda=True),
    Mutant("CUDA: tangent kernel drops the offsets' x term", "lib/cuda_tangent.cu",
           "val_dot[v] + dvy[v] * dy_dot + dvx[v] * dx_dot;", "val_dot[v] + dvy[v] * dy_dot;",
           ("tests/test_autodiff.py", "-k", "jvp"), cuda=True),
    Mutant("CUDA: grad_weight tile sum skips the last row", "lib/cuda_backward.cu",
           "for (int r = 0; r < kSumRows; ++r) total += rows[r][threadIdx.x];",
           "for (int r = 0; r < kSumRows - 1; ++r) total += rows[r][threadIdx.x];",
           GPU_API_AND_DETERMINISM, cuda=True),
    Mutant("CUDA: segment starts take an upper bound (a destination's tap 0 goes to the one before)",
           "lib/cuda_grad_x_gather.cu", "if (keys[mid] < want) {", "if (keys[mid] <= want) {",
           GPU_GRADIENTS, cuda=True),
    Mutant("CUDA: sample kernel's later vectors of a lane read its first one's channels",
           "lib/cuda_backward.cu", "const char* xc = x_lane + q * kVecStride * int{sizeof(T)};",
           "const char* xc = x_lane;",
           GPU_GRADIENTS, cuda=True),
]


def _has_gpu() -> bool:
    try:
        import jax

        return len(jax.devices("gpu")) > 0
    except Exception:  # noqa: BLE001  (no CUDA plugin, no device)
        return False


def _run(cmd, cwd, env=None, log=None):
    result = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{result.stdout}\n")
    return result


class Workspace:
    """One copy of the repository and one CMake build directory, reused by
    every mutant; files are restored after each."""

    def __init__(self, directory: str, cuda: bool):
        self.dir = directory
        self.src = os.path.join(directory, "src")
        self.build = os.path.join(directory, "build")
        self.log = os.path.join(directory, "log.txt")
        self.cuda = cuda
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                "--exclude-standard"], cwd=ROOT, check=True,
                               stdout=subprocess.PIPE).stdout.decode().split("\0")
        for rel in filter(None, files):
            src = os.path.join(ROOT, rel)
            if os.path.isfile(src):
                os.makedirs(os.path.dirname(os.path.join(self.src, rel)), exist_ok=True)
                shutil.copy2(src, os.path.join(self.src, rel))
        self.configured = False

    def read(self, rel: str) -> str:
        with open(os.path.join(self.src, rel)) as f:
            return f.read()

    def write(self, rel: str, text: str) -> None:
        with open(os.path.join(self.src, rel), "w") as f:
            f.write(text)

    def build_extension(self) -> tuple[bool, str]:
        if not self.configured:
            # JAX_DEFORM_CUDA_ARCHITECTURES (e.g. 90) narrows the CUDA build, as for pip.
            archs = os.environ.get("JAX_DEFORM_CUDA_ARCHITECTURES")
            r = _run(["cmake", "-S", self.src, "-B", self.build,
                      *(["-G", "Ninja"] if shutil.which("ninja") else []),
                      f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release",
                      f"-DJAX_DEFORM_CUDA={'ON' if self.cuda else 'OFF'}",
                      *([f"-DJAX_DEFORM_CUDA_ARCHITECTURES={archs}"] if archs and self.cuda else [])],
                     self.dir, log=self.log)
            if r.returncode:
                return False, r.stdout[-2000:]
            self.configured = True
        r = _run(["cmake", "--build", self.build, "-j", str(os.cpu_count() or 2)], self.dir,
                 log=self.log)
        if r.returncode:
            return False, r.stdout[-2000:]
        for name in os.listdir(self.build):
            if name.startswith("_jax_deform") and name.endswith(sysconfig.get_config_var(
                    "EXT_SUFFIX")):
                shutil.copy2(os.path.join(self.build, name),
                             os.path.join(self.src, "jax_deform", name))
                return True, ""
        return False, "no extension module in the build directory"

    def pytest(self, args) -> subprocess.CompletedProcess:
        # -S: no .pth files, so an editable install of the checkout (an import
        # hook) cannot shadow the copy; site-packages are added back as plain paths.
        paths = [self.src] + site.getsitepackages()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
        return _run([sys.executable, "-S", "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                     *args], self.src, env=env, log=self.log)


def _first_failure(output: str) -> str:
    m = re.search(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", output, re.M)
    if m:
        return m.group(1)
    m = re.search(r"^E\s+(.*)$", output, re.M)
    return m.group(1)[:80] if m else "(see log)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("words", nargs="*", help="run only mutants whose name contains one")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS
               if not args.words or any(w.lower() in m.name.lower() for w in args.words)]
    if args.list:
        for m in mutants:
            print(f"{m.name:70s} {m.path:25s} {' '.join(m.tests)}")
        return 0

    gpu = _has_gpu()
    directory = tempfile.mkdtemp(prefix="jax_deform_mutants_")
    ws = Workspace(directory, cuda=gpu)
    print(f"copy and build in {directory} (log: {ws.log}); GPU: {'yes' if gpu else 'no'}",
          flush=True)
    results = []  # (mutant, status, detail, seconds)
    try:
        # The list must match the code: every search string exactly once.
        runnable = []
        for m in mutants:
            count = ws.read(m.path).count(m.old)
            if count != 1:
                results.append((m, "ERROR", f"search string found {count} times in {m.path}", 0))
            elif m.cuda and not gpu:
                results.append((m, "NOT RUN", "needs a CUDA device (search string checked)", 0))
            else:
                runnable.append(m)
        ok, why = ws.build_extension()
        if not ok:
            print(f"the unmutated copy does not build:\n{why}")
            return 2
        # Unmutated, every selection must pass, or a "kill" would mean nothing.
        for sel in sorted({m.tests for m in runnable}):
            r = ws.pytest(sel)
            if r.returncode:
                print(f"the unmutated copy fails {' '.join(sel)}:\n{r.stdout[-3000:]}")
                return 2
        print(f"baseline passes; {len(runnable)} mutants to run", flush=True)
        # Python mutants first: they need no rebuild.
        for m in sorted(runnable, key=lambda m: m.compiled):
            start = time.time()
            original = ws.read(m.path)
            ws.write(m.path, original.replace(m.old, m.new))
            try:
                built, why = ws.build_extension() if m.compiled else (True, "")
                if not built:
                    status, detail = "ERROR", "does not compile: " + why.splitlines()[-1]
                else:
                    r = ws.pytest(m.tests)
                    if r.returncode == 0:
                        status, detail = "SURVIVED", "all selected tests pass"
                    elif r.returncode in (1, 2):  # tests failed / collection broke
                        status, detail = "KILLED", _first_failure(r.stdout)
                    else:
                        status, detail = "ERROR", f"pytest exit {r.returncode}"
            finally:
                ws.write(m.path, original)
            results.append((m, status, detail, time.time() - start))
            print(f"{status:8s} {m.name} ({m.path}): {detail} [{time.time() - start:.0f} s]",
                  flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)

    print("\n| mutant | where | result | first failing test |\n|---|---|---|---|")
    for m, status, detail, _ in sorted(results, key=lambda r: MUTANTS.index(r[0])):
        print(f"| {m.name} | {m.path} | {status} | {detail} |")
    bad = [r for r in results if r[1] in ("SURVIVED", "ERROR")]
    print(f"\n{sum(r[1] == 'KILLED' for r in results)} killed, "
          f"{sum(r[1] == 'SURVIVED' for r in results)} survived, "
          f"{sum(r[1] == 'ERROR' for r in results)} errors, "
          f"{sum(r[1] == 'NOT RUN' for r in results)} not run")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
