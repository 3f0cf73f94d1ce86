#!/usr/bin/env bash
# The wheel on a GPU machine as a user gets it: installed into a fresh venv
# with no CUDA compiler on PATH, the GPU tests run from outside the checkout.
#   bash benchmarks/wheel_gpu_run.sh OUT_DIR [WHEEL]
# WHEEL: a release wheel for this machine's Python (cp312-abi3 for 3.12+, from
# tools/build_release.sh). Without it, one is built here first, as
# tools/build_release.sh would (release architectures, static libstdc++,
# auditwheel repair when auditwheel is installed), but offline: `pip wheel
# --no-build-isolation` with the system python's scikit-build-core, nanobind and
# jax. nvcc is used for that build only; afterwards every PATH entry holding a
# CUDA compiler is dropped. The venv has --system-site-packages (jax with CUDA
# comes from the system python; no package index is needed) and gets the wheel
# with --no-deps. Logs and a summary land in OUT_DIR (OUT_DIR/logs.tgz).
# Run it where no editable jax_deform is installed in the system python (a
# fresh machine): tools/test_installed.sh stops if the import comes from the
# checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
src=$(pwd)
out=$(mkdir -p "${1:-wheel_gpu_out}" && cd "${1:-wheel_gpu_out}" && pwd)
mkdir -p "$out/logs"
wheel=${2:-}
export PYTHONUNBUFFERED=1
t0=$(date +%s)
log() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$out/summary.txt"; }
nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv | tee "$out/gpu.txt"
python3 --version | tee -a "$out/gpu.txt"

if [ -z "$wheel" ]; then
  archs=${JAX_DEFORM_WHEEL_ARCHITECTURES:-release}
  log "building the wheel (CUDA architectures: $archs) with $(command -v nvcc)"
  JAX_DEFORM_CUDA=ON JAX_DEFORM_CUDA_ARCHITECTURES=$archs JAX_DEFORM_STATIC_LIBSTDCXX=ON \
    timeout 400 python3 -m pip wheel --no-build-isolation --no-deps -v -w "$out/raw" . \
    > "$out/logs/build.log" 2>&1 || { tail -40 "$out/logs/build.log"; exit 1; }
  grep -E "jax_deform: building" "$out/logs/build.log" | tee -a "$out/summary.txt"
  wheel=$(ls "$out"/raw/jax_deform-*.whl)
  if python3 -m auditwheel --version > /dev/null 2>&1; then
    python3 -m auditwheel repair -w "$out/dist" "$wheel" > "$out/logs/auditwheel.log" 2>&1 \
      && wheel=$(ls "$out"/dist/jax_deform-*.whl)
  fi
  log "built $(basename "$wheel")"
fi
wheel=$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")

# From here on: no CUDA compiler on PATH, as on a user's machine.
clean_path=
IFS=: read -ra entries <<< "$PATH"
for d in "${entries[@]}"; do
  [ -x "$d/nvcc" ] && continue
  clean_path=${clean_path:+$clean_path:}$d
done
export PATH=$clean_path
unset CUDA_HOME CUDA_PATH CUDACXX
if command -v nvcc > /dev/null; then log "error: nvcc still on PATH"; exit 1; fi
log "nvcc is not on PATH"

venv=$(mktemp -d)/venv
python3 -m venv --system-site-packages "$venv"
# --system-site-packages does not reach the system python's user site or
# PYTHONPATH-style package folders, where jax may live: a .pth file puts every
# package folder of the system python behind the venv's own, so the wheel in
# the venv wins.
python3 -c "import site, sys; print('\n'.join(dict.fromkeys(site.getsitepackages() + [site.getusersitepackages()] + [p for p in sys.path if p.endswith(('site-packages', 'dist-packages'))])))" \
  > "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/system_site.pth"
# shellcheck disable=SC1091
source "$venv/bin/activate"
python -c "import jax, sys; print('jax', jax.__version__, 'from', jax.__file__, 'in', sys.prefix)" \
  | tee -a "$out/summary.txt" || { log "error: jax does not import in the venv"; exit 1; }
python -m pip install --no-deps --no-index "$wheel" > "$out/logs/install.log" 2>&1 \
  || { cat "$out/logs/install.log"; exit 1; }
log "installed $(basename "$wheel") into $venv (--system-site-packages, --no-deps)"

# WHEEL_TESTS: the test files to run (default: install, api, determinism, gradients).
JAX_DEFORM_REQUIRE_GPU=1 timeout 300 bash tools/test_installed.sh "$src" -q -rs -m gpu \
  ${WHEEL_TESTS:-tests/test_install.py tests/test_api.py tests/test_determinism.py tests/test_gradients.py} \
  > "$out/logs/gpu_tests.log" 2>&1
log "GPU tests from outside the checkout: exit $?"
sed -n '1,12p' "$out/logs/gpu_tests.log" | tee -a "$out/summary.txt"
tail -3 "$out/logs/gpu_tests.log" | tee -a "$out/summary.txt"

# The kernels' speed as installed (no torch; one shape of the speed suite).
(cd "$(dirname "$venv")" && timeout 120 python -m jax_deform.bench \
  --shape 16,64,64,512 --kernel 3 --no-torch --repeats 5 --json "$out/logs/bench.json") \
  > "$out/logs/bench.log" 2>&1
log "bench from the wheel: exit $?"
tail -12 "$out/logs/bench.log" | tee -a "$out/summary.txt"
tar czf "$out/logs.tgz" -C "$out" logs summary.txt gpu.txt
log "done"
