#!/usr/bin/env bash
# Build, test on the GPU and benchmark in one go on a CUDA machine:
#   bash benchmarks/device_run.sh [OUT_DIR] [pytest args...] -- [bench args...]
# Results land in OUT_DIR (default ./bench_out): build log, test log, bench JSON/table/plot.
set -uo pipefail
out=${1:-bench_out}; shift || true
mkdir -p "$out"
pytest_args=(); bench_args=(); seen=0
for a in "$@"; do
  if [ "$a" = "--" ]; then seen=1; continue; fi
  if [ $seen = 0 ]; then pytest_args+=("$a"); else bench_args+=("$a"); fi
done
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
start=$(date +%s)
JAX_DEFORM_CUDA=ON JAX_DEFORM_CUDA_ARCHITECTURES=${JAX_DEFORM_CUDA_ARCHITECTURES:-90} \
  python3 -m pip install --no-build-isolation --no-deps -v -e . > "$out/build.log" 2>&1 \
  || { tail -50 "$out/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
python3 -c "import jax, jax_deform; print(jax.__version__, jax.devices(), jax_deform.kernel_platforms())"
if [ ${#pytest_args[@]} -gt 0 ]; then
  python3 -m pytest "${pytest_args[@]}" 2>&1 | tee "$out/tests.log" | tail -25
fi
if [ ${#bench_args[@]} -gt 0 ]; then
  python3 -m jax_deform.bench --json "$out/bench.json" "${bench_args[@]}" 2>&1 | tee "$out/bench.md"
fi
