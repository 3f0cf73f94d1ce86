#!/usr/bin/env bash
# Kernel variants side by side on one GPU, through the bench (distinct calls,
# profiler kernel time): bash benchmarks/tune_run.sh OUT_DIR
# Variants are picked with JAX_DEFORM_CUDA_TUNING (see lib/cuda_common.cuh).
set -uo pipefail
out=${1:-tune_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
bench() {  # bench NAME TUNING ARGS...
  local name=$1 tuning=$2; shift 2
  JAX_DEFORM_CUDA_TUNING=$tuning python3 -m jax_deform.bench --no-torch --repeats 10 \
    --json "$out/$name.json" "$@" > "$out/$name.md" 2>&1 || tail -5 "$out/$name.md"
}
shapes=(--shape 16,64,64,512 --shape 32,56,56,64 --dtype float32 --dtype bfloat16)
bwd=(--only jax_deform --only "jax_deform deterministic" --mode fwd+bwd)
bench sample "" "${shapes[@]}" "${bwd[@]}"
bench sample_atomic "grad_x=atomic" "${shapes[@]}" --only jax_deform --mode fwd+bwd
bench tile "backward_kernel=1" "${shapes[@]}" "${bwd[@]}"
bench sample7 "" --shape 32,56,56,96 --kernel 7 --dtype float32 --dtype bfloat16 "${bwd[@]}"
bench tile7 "backward_kernel=1" --shape 32,56,56,96 --kernel 7 --dtype float32 --dtype bfloat16 "${bwd[@]}"
python3 - "$out" <<'PY'
import json, sys, glob, os
for path in sorted(glob.glob(sys.argv[1] + "/*.json")):
    name = os.path.basename(path)[:-5]
    for r in json.load(open(path))["results"]:
        if r["impl"] == "DRAM floor":
            continue
        c = r["case"]
        top = ", ".join(f"{k[:40]} {v:.3f}" for k, v in r["top_kernels_ms"].items())
        print(f"{name:15s} {c['n']},{c['h']},{c['w']},{c['c']} k{c['kernel']} {r['dtype']:8s} {r['mode']:7s} "
              f"{r['impl'][:24]:24s} {r['ms']:.4f} kern {r['kernel_ms'] or 0:.4f} | {top}")
PY
