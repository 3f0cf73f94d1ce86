#!/usr/bin/env bash
# Before/after timings of whole revisions in one run on one GPU: each revision
# is built into its own folder and the bench runs them in turn, round after
# round (A B A B ...), so that clock and thermal drift hit every revision
# alike. For changes that a tuning key cannot switch (JAX_DEFORM_CUDA_TUNING,
# benchmarks/tune_run.sh is the tool for those).
#
# 1. In a git checkout, pack the revisions (git archive, so only committed
#    code) into .ab/NAME.tar:
#      bash benchmarks/ab_run.sh pack before=HEAD~1 after=HEAD
# 2. Where the GPU is (the checkout there needs no .git; .ab/ travels with it):
#      bash benchmarks/ab_run.sh run OUT_DIR ROUNDS [bench args...]
#    e.g. ... run ab_out 2 --shape 16,64,64,512 --mode fwd+bwd --only jax_deform --no-torch
#    Builds every packed revision (JAX_DEFORM_CUDA_ARCHITECTURES, default 90; CPU-only
#    where there is no nvcc or JAX_DEFORM_CUDA=OFF), then runs `python -m jax_deform.bench ARGS` with
#    each in the order packed (the first is the baseline), ROUNDS times, into OUT_DIR/NAME_ROUND.json, and prints one line per
#    case and revision: the wall-clock and profiler kernel medians of each
#    round and the largest kernels (benchmarks/ab_summary.py).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}; shift || true
case "$mode" in
  pack)
    [ $# -gt 0 ] || { echo "usage: $0 pack NAME=REV ..." >&2; exit 2; }
    rm -rf .ab && mkdir -p .ab
    for spec in "$@"; do
      name=${spec%%=*}; rev=${spec#*=}
      [[ $name =~ ^[A-Za-z0-9_-]+$ ]] || { echo "bad name: $name" >&2; exit 2; }
      git archive --format=tar -o ".ab/$name.tar" "$rev"
      echo "$name" >> .ab/order  # the run's order: the first is the baseline
      echo ".ab/$name.tar: $(git rev-parse --short "$rev") $(git log -1 --format=%s "$rev" | cut -c1-70)"
    done
    ;;
  run)
    out=${1:?usage: $0 run OUT_DIR ROUNDS [bench args...]}; rounds=${2:?rounds}; shift 2
    mkdir -p "$out"
    [ -f .ab/order ] || { echo "no .ab/order: run '$0 pack' first" >&2; exit 2; }
    names=(); while read -r name; do names+=("$name"); done < .ab/order
    export PYTHONUNBUFFERED=1
    if command -v nvcc > /dev/null; then cuda=ON; else cuda=OFF; fi
    cuda=${JAX_DEFORM_CUDA:-$cuda}
    archs=${JAX_DEFORM_CUDA_ARCHITECTURES:-90}
    jobs=$(( $(nproc) / ${#names[@]} )); [ "$jobs" -ge 1 ] || jobs=1
    for name in "${names[@]}"; do
      rm -f "$out/${name}"_[0-9]*.json "$out/${name}"_[0-9]*.md  # an earlier run's
      src=$out/src_$name; rm -rf "$src" "$out/pkg_$name"; mkdir -p "$src"; tar xf ".ab/$name.tar" -C "$src"
      # Built side by side, each with its share of the cores.
      ( JAX_DEFORM_CUDA=$cuda JAX_DEFORM_CUDA_ARCHITECTURES=$archs CMAKE_BUILD_PARALLEL_LEVEL=$jobs \
          python3 -m pip install -q --no-build-isolation --no-deps --target "$out/pkg_$name" "$src" \
          > "$out/build_$name.log" 2>&1 && rm -rf "$src" && echo "built $name" ) \
        || { tail -30 "$out/build_$name.log"; exit 1; } &
    done
    wait
    for name in "${names[@]}"; do
      [ -f "$out/pkg_$name/jax_deform/__init__.py" ] || { echo "build of $name failed" >&2; exit 1; }
    done
    for round in $(seq "$rounds"); do
      for name in "${names[@]}"; do
        python3 benchmarks/run_installed.py "$out/pkg_$name" jax_deform.bench \
          --json "$out/${name}_$round.json" "$@" > "$out/${name}_$round.md" 2>&1 \
          || { tail -20 "$out/${name}_$round.md"; exit 1; }
        echo "round $round: $name done"
      done
    done
    python3 benchmarks/ab_summary.py "$out" "${names[@]}" | tee "$out/summary.md"
    ;;
  *)
    echo "usage: $0 pack NAME=REV ... | run OUT_DIR ROUNDS [bench args...]" >&2; exit 2 ;;
esac
