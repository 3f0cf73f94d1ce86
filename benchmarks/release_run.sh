#!/usr/bin/env bash
# Everything a kernel change must pass on a machine with 2 GPUs, in one go and
# in order of weight, each step with its own time limit (about 9 minutes):
#   bash benchmarks/release_run.sh OUT_DIR
# multi-GPU checks (builds the package), GPU tests on one GPU, the speed and
# models suites of the bench, compute-sanitizer memcheck on the kernel harness,
# hostile-input GPU tests. Logs: OUT_DIR/logs.tgz (refreshed after every step),
# OUT_DIR/speed.md, OUT_DIR/models.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-release_out}; mkdir -p "$out/logs"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
step() {  # step NAME SECONDS COMMAND...: run with a limit, log, pack the logs
  local name=$1 limit=$2; shift 2
  echo "[$(( $(date +%s) - t0 )) s] $name"
  timeout "$limit" "$@" > "$out/logs/$name.log" 2>&1; echo "  exit $?" | tee -a "$out/logs/$name.log"
  tar czf "$out/logs.tgz" -C "$out" logs
}
step multi_gpu 220 bash benchmarks/multi_gpu_run.sh "$out/logs/multi_gpu"
grep -E "passed|failed|img/s|all-reduce|upstream" "$out/logs/multi_gpu.log" | tail -12
export CUDA_VISIBLE_DEVICES=0
step gpu_tests 100 env JAX_DEFORM_REQUIRE_GPU=1 python3 -m pytest -q -m gpu tests/test_api.py tests/test_determinism.py
tail -2 "$out/logs/gpu_tests.log"
step speed 140 python3 -m jax_deform.bench --suite speed --repeats 10 --json "$out/logs/speed.json" --plot "$out/logs/speedup.png"
cp "$out/logs/speed.log" "$out/speed.md"
step models 140 python3 -m jax_deform.bench --suite models --repeats 10 --json "$out/logs/models.json"
cp "$out/logs/models.log" "$out/models.md"
step sanitizer 60 bash -c "nvcc -std=c++17 -O2 -arch=sm_90 --expt-relaxed-constexpr -I lib lib/cuda_forward.cu \
  lib/cuda_backward.cu lib/cuda_grad_x_gather.cu benchmarks/sanitize_kernels.cu -o /tmp/sanitize_kernels \
  && /usr/local/cuda/bin/compute-sanitizer --tool memcheck --error-exitcode 9 /tmp/sanitize_kernels"
tail -3 "$out/logs/sanitizer.log"
step hostile 60 python3 -m pytest -q -m gpu tests/test_hostile.py -k "not 2_to_the_31 and not random_problems"
tail -2 "$out/logs/hostile.log"
echo "[$(( $(date +%s) - t0 )) s] done"
