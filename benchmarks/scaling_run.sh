#!/usr/bin/env bash
# Data-parallel scaling on one machine: the same model and per-GPU batch on 1
# GPU and on every GPU (run after benchmarks/device_run.sh has built the package).
#   bash benchmarks/scaling_run.sh OUT_DIR [data_parallel.py args...]
set -uo pipefail
out=${1:-bench_out}; shift || true
mkdir -p "$out"
export PYTHONUNBUFFERED=1
gpus=$(python3 -c "import jax; print(len(jax.devices()))")
for k in 1 "$gpus"; do
  echo "== $k GPU(s)"
  python3 examples/data_parallel.py --devices "$k" "$@" 2>&1 | tee "$out/data_parallel_$k.log" | tail -8
done
