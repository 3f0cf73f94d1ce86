#!/usr/bin/env bash
# Everything a kernel change must pass on a machine with 2 GPUs, in order of
# weight, each step with its own time limit:
#   bash benchmarks/release_run.sh OUT_DIR [STEP ...]
# Steps (default: all, about 14 minutes, so split them over calls of at most
# 10 minutes, e.g. "build multi_gpu gpu_tests sanitizer hostile", then
# "build speed", then "build models"): build, multi_gpu (multi-GPU checks),
# gpu_tests (one GPU), speed and models (the bench suites, ~4 minutes each with
# torchvision), sanitizer (memcheck on the kernel harness), hostile.
# Logs: OUT_DIR/logs.tgz (refreshed after every step), OUT_DIR/speed.md, OUT_DIR/models.md.
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
steps=${*:2}
steps=${steps:-build multi_gpu gpu_tests speed models sanitizer hostile}
want() { [[ " $steps " == *" $1 "* ]]; }
want build && step build 120 env JAX_DEFORM_CUDA=ON JAX_DEFORM_CUDA_ARCHITECTURES=90 \
  python3 -m pip install --no-build-isolation --no-deps -e .
if want multi_gpu; then  # builds again (quick: nothing changed) as it does standing alone
  step multi_gpu 220 bash benchmarks/multi_gpu_run.sh "$out/logs/multi_gpu"
  grep -E "passed|failed|img/s|all-reduce|upstream" "$out/logs/multi_gpu.log" | tail -12
fi
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}; CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES%%,*}  # one GPU: the first the caller names
if want gpu_tests; then
  step gpu_tests 300 env JAX_DEFORM_REQUIRE_GPU=1 python3 -m pytest -q -m gpu tests/test_api.py \
    tests/test_determinism.py tests/test_gradients.py tests/test_float64.py tests/test_install.py
  tail -2 "$out/logs/gpu_tests.log"
  # Not marked gpu: with a GPU as jax's default device these run the CUDA kernels.
  step gpu_transforms 150 python3 -m pytest -q tests/test_autodiff.py tests/test_export.py
  tail -2 "$out/logs/gpu_transforms.log"
fi
if want speed; then
  step speed 300 python3 -m jax_deform.bench --suite speed --repeats 10 --json "$out/logs/speed.json" --plot "$out/logs/speedup.png"
  cp "$out/logs/speed.log" "$out/speed.md"
fi
if want models; then
  step models 300 python3 -m jax_deform.bench --suite models --repeats 10 --json "$out/logs/models.json"
  cp "$out/logs/models.log" "$out/models.md"
fi
if want sanitizer; then
  # The sources compile side by side (one nvcc for all took most of the limit).
  step sanitizer 240 bash -c "rm -rf /tmp/sanitize && mkdir -p /tmp/sanitize && for f in lib/cuda_forward.cu lib/cuda_backward.cu \
    lib/cuda_grad_x_gather.cu lib/cuda_tangent.cu benchmarks/sanitize_kernels.cu; do \
    nvcc -std=c++17 -O2 -arch=sm_90 --expt-relaxed-constexpr -I lib -c \$f -o /tmp/sanitize/\$(basename \$f).o & done; wait \
    && nvcc -arch=sm_90 /tmp/sanitize/*.o -o /tmp/sanitize_kernels \
    && /usr/local/cuda/bin/compute-sanitizer --tool memcheck --error-exitcode 9 /tmp/sanitize_kernels \
    && /usr/local/cuda/bin/compute-sanitizer --tool racecheck --error-exitcode 9 /tmp/sanitize_kernels"
  tail -3 "$out/logs/sanitizer.log"
fi
if want hostile; then
  step hostile 150 python3 -m pytest -q -m gpu tests/test_hostile.py -k "not random_problems"
  tail -2 "$out/logs/hostile.log"
fi
echo "[$(( $(date +%s) - t0 )) s] done"
