#!/usr/bin/env bash
# Nsight Compute on the kernels of one fwd+bwd (the next optimization's first
# step; about 2 minutes on one GPU after the build):
#   bash benchmarks/profile_run.sh OUT_DIR [N,H,W,C] [dtype]
# For each of the forward, the backward's sample kernel and the grad_x gather:
# speed of light, occupancy, warp stall reasons (and where in the source they
# sit), memory and compute workload; reports as
# text in OUT_DIR/<kernel>.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-profile_out}; mkdir -p "$out"
shape=${2:-16,64,64,512}; dtype=${3:-float32}
ncu=${NCU:-/usr/local/cuda/bin/ncu}
JAX_DEFORM_CUDA=ON JAX_DEFORM_CUDA_ARCHITECTURES=90 \
  python3 -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 \
  || { tail -30 "$out/build.log"; exit 1; }
for kernel in ForwardKernel BackwardSampleKernel GatherKernel; do
  timeout 240 "$ncu" --kernel-name "regex:$kernel" --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section LaunchStats --section SchedulerStats \
    --section ComputeWorkloadAnalysis --section InstructionStats --section SourceCounters \
    python3 benchmarks/profile_one.py "$shape" "$dtype" > "$out/$kernel.txt" 2>&1
  echo "$kernel: exit $?"
  grep -E "Duration|Registers Per|Achieved Occupancy|Memory Throughput|L1/TEX Hit|L2 Hit|Stall" \
    "$out/$kernel.txt" | head -14
done
