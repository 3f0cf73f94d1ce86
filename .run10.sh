nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONUNBUFFERED=1
bash benchmarks/release_run.sh $OUT/rel build sanitizer
tail -4 $OUT/rel/logs/sanitizer.log
timeout 150 python3 -m pytest -q tests/test_autodiff.py tests/test_export.py 2>&1 | tail -4
python3 -c "import jax_deform._ffi as f; print('tangent platforms', sorted(f.TANGENT_PLATFORMS))"
timeout 60 python3 benchmarks/forward_mode.py --shape 16,64,64,512 2>&1 | grep -v "^W1127\|Delay kernel" | tail -6
export JAX_DEFORM_CUDA_ARCHITECTURES=90 CMAKE_BUILD_PARALLEL_LEVEL=16
timeout 200 python3 tests/mutants.py "tangent kernel drops" 2>&1 | tail -4
