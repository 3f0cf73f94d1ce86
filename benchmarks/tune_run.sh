#!/usr/bin/env bash
# Kernel variants side by side on one GPU, through the bench (distinct calls,
# profiler kernel time): bash benchmarks/tune_run.sh OUT_DIR [SWEEP ...]
# Sweeps (default: all): backward (sample vs tile kernel, atomics vs gather),
# forward (register use, tiles, channel splits), lanes (lanes a pixel in the
# forward and the sample kernel, for channel counts that leave lanes idle:
# the model layers' 96 and 144 channels), rounds (two channel vectors a lane
# in the sample kernel), fit (the sample kernel's lanes and vectors a lane
# fitted to the group, with the forward's lanes, at the model layers), scatter
# (the gather path's sample kernel with or without the atomics compiled in),
# gather (vectors a lane in the gather), band (the band gather against the run
# gather, and its segment width and samples a step), order (the sample kernel's
# visit order: rows or bands).
# Variants are picked with
# JAX_DEFORM_CUDA_TUNING (see lib/cuda_common.cuh); each is its own process.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-tune_out}; mkdir -p "$out"
sweeps=${*:2}; sweeps=${sweeps:-backward forward lanes rounds fit scatter gather band order}
want() { [[ " $sweeps " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1
bench() {  # bench NAME TUNING ARGS...
  local name=$1 tuning=$2; shift 2
  JAX_DEFORM_CUDA_TUNING=$tuning timeout 150 python3 -m jax_deform.bench --no-torch --repeats 10 \
    --json "$out/$name.json" "$@" > "$out/$name.md" 2>&1 || tail -5 "$out/$name.md"
}
shapes=(--shape 16,64,64,512 --shape 32,56,56,64 --dtype float32 --dtype bfloat16)
bwd=(--only jax_deform --only "jax_deform deterministic" --mode fwd+bwd)
if want backward; then
  bench sample "" "${shapes[@]}" "${bwd[@]}"
  bench sample_atomic "grad_x=atomic" "${shapes[@]}" --only jax_deform --mode fwd+bwd
  bench tile "backward_kernel=1" "${shapes[@]}" "${bwd[@]}"
  bench sample7 "" --shape 32,56,56,96 --kernel 7 --dtype float32 --dtype bfloat16 "${bwd[@]}"
  bench tile7 "backward_kernel=1" --shape 32,56,56,96 --kernel 7 --dtype float32 --dtype bfloat16 "${bwd[@]}"
fi
if want forward; then
  fwd3=(--shape 16,64,64,512 --shape 32,56,56,64 --shape 8,128,128,128 --dtype float32
        --dtype bfloat16 --mode fwd --only jax_deform)
  for v in "" forward_weights_in_registers=0 forward_weights_in_registers=1 forward_splits=2 \
           forward_tile=32 forward_tile=128; do
    bench "fwd_${v:-default}" "$v" "${fwd3[@]}"
  done
fi
if want lanes; then
  # 7x7 with 96 channels (24 vectors), 5x5 with 144 (36 vectors): fwd+bwd
  # shows the forward and the sample kernel in the top kernels.
  for k in 7 5; do
    shape=$([ $k = 7 ] && echo 32,56,56,96 || echo 32,56,56,144)
    for v in "" forward_lanes=4,sample_lanes=8 forward_lanes=8,sample_lanes=8 \
             forward_lanes=16,sample_lanes=16; do
      bench "k${k}_${v:-default}" "$v" --shape "$shape" --kernel $k --dtype float32 \
        --dtype bfloat16 --only jax_deform --mode fwd+bwd
    done
  done
  # The forced lane counts must still be right (the defaults' tests never run them).
  JAX_DEFORM_CUDA_TUNING=forward_lanes=4,sample_lanes=8 timeout 200 python3 -m pytest -q -m gpu \
    tests/test_api.py -k "forward_matches or gradients_match" > "$out/lanes_tests.log" 2>&1
  tail -1 "$out/lanes_tests.log"
  nvcc -std=c++17 -O2 -arch=sm_90 --expt-relaxed-constexpr -I lib lib/cuda_forward.cu \
    lib/cuda_backward.cu lib/cuda_grad_x_gather.cu lib/cuda_tangent.cu benchmarks/sanitize_kernels.cu \
    -o /tmp/sanitize_kernels && JAX_DEFORM_CUDA_TUNING=forward_lanes=4,sample_lanes=8 \
    /usr/local/cuda/bin/compute-sanitizer --tool memcheck --error-exitcode 9 /tmp/sanitize_kernels \
    > "$out/lanes_memcheck.log" 2>&1
  echo "memcheck with forced lanes: exit $?"
fi
if want rounds; then
  # Two channel vectors a lane (sample kernel): half the slices where a group
  # has more than 32 vectors; checked by the GPU tests with the key set.
  for v in "" sample_rounds=2; do
    bench "rounds_${v:-default}" "$v" --shape 16,64,64,512 --shape 8,128,128,128 \
      --dtype float32 --dtype bfloat16 "${bwd[@]}"
    bench "rounds7_${v:-default}" "$v" --shape 32,28,28,192 --shape 32,14,14,384 --kernel 7 \
      --dtype float32 --dtype bfloat16 --only jax_deform --mode fwd+bwd
  done
  JAX_DEFORM_CUDA_TUNING=sample_rounds=2 timeout 200 python3 -m pytest -q -m gpu \
    tests/test_api.py tests/test_determinism.py -k "gradients_match or bitwise" > "$out/rounds_tests.log" 2>&1
  tail -1 "$out/rounds_tests.log"
fi
if want fit; then
  # 96 channels: 8 lanes x 3 vectors; 144: 16 x 3; 192: 16 x 3; 384: 32 x 3 (one slice each).
  for v in "" sample_fit=1 sample_fit=1,forward_lanes=4 sample_fit=1,forward_lanes=8; do
    bench "fit7_${v:-default}" "$v" --shape 32,56,56,96 --shape 32,28,28,192 --shape 32,14,14,384 \
      --kernel 7 --dtype float32 --dtype bfloat16 --only jax_deform --mode fwd+bwd
    bench "fit5_${v:-default}" "$v" --shape 32,56,56,144 --kernel 5 --dtype float32 --dtype bfloat16 \
      --only jax_deform --mode fwd+bwd
  done
fi
if want scatter; then
  for v in "" sample_no_scatter=0; do
    bench "scatter_${v:-default}" "$v" --shape 16,64,64,512 --shape 16,32,32,512 --shape 8,128,128,128 \
      --dtype float32 --dtype bfloat16 "${bwd[@]}"
  done
fi
if want gather; then
  # Vectors a lane in the gather (deterministic rows, and the fast path where
  # it takes the gather): up to 2 (default), 1; checked by the GPU tests with
  # the key set.
  for v in "" gather_vectors=1; do
    bench "gather_${v:-default}" "$v" --shape 16,64,64,512 --shape 16,32,32,512 \
      --dtype float32 --dtype bfloat16 "${bwd[@]}"
    bench "gather7_${v:-default}" "$v" --shape 32,14,14,384 --kernel 7 --dtype float32 \
      --only jax_deform --mode fwd+bwd
  done
  JAX_DEFORM_CUDA_TUNING=gather_vectors=1 timeout 200 python3 -m pytest -q -m gpu \
    tests/test_api.py tests/test_determinism.py -k "gradients_match or bitwise" > "$out/gather_tests.log" 2>&1
  tail -1 "$out/gather_tests.log"
fi
if want band; then
  # The two gathers (cuda_grad_x_gather.cu: UseBandGather picks by channels a
  # group) and the band gather's segment width and samples a step, on the
  # channel counts either side of the rule.
  for v in "" gather_kernel=runs gather_kernel=band gather_segment=8 gather_band_step=1; do
    bench "band3_${v:-default}" "$v" --shape 16,64,64,512 --shape 8,128,128,128 --shape 32,56,56,64 \
      --dtype float32 --dtype bfloat16 "${bwd[@]}"
    bench "band7_${v:-default}" "$v" --shape 32,56,56,96 --shape 32,28,28,192 --kernel 7 \
      --dtype float32 --dtype bfloat16 "${bwd[@]}"
  done
fi
if want order; then
  # The sample kernel's visit order (SampleBandBits): row by row against bands
  # of 8 rows, at the speed shapes and the model layers.
  for v in "" sample_band_rows=1 sample_band_rows=8; do
    bench "order3_${v:-default}" "$v" --shape 16,64,64,512 --shape 8,128,128,128 --shape 32,56,56,64 \
      --dtype float32 --dtype bfloat16 --only jax_deform --mode fwd+bwd
    bench "order_models_${v:-default}" "$v" --suite models --only jax_deform --mode fwd+bwd
  done
fi
python3 - "$out" <<'PY'
import json, sys, glob, os, re
def short(kernel):  # the kernel's own name and template arguments, not its namespace
    m = re.search(r"(\w+(?:<[^()]*>)?)\(", kernel)
    return m.group(1)[:48] if m else kernel[:48]
for path in sorted(glob.glob(sys.argv[1] + "/*.json")):
    name = os.path.basename(path)[:-5]
    for r in json.load(open(path))["results"]:
        if r["impl"] == "DRAM floor":
            continue
        c = r["case"]
        top = ", ".join(f"{short(k)} {v:.3f}" for k, v in r["top_kernels_ms"].items())
        print(f"{name:34s} {c['n']},{c['h']},{c['w']},{c['c']} k{c['kernel']} {r['dtype']:8s} {r['mode']:7s} "
              f"{r['impl'][:24]:24s} {r['ms']:.4f} kern {r['kernel_ms'] or 0:.4f} | {top}")
PY
