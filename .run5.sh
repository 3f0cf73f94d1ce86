nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONUNBUFFERED=1
JAX_DEFORM_CUDA=ON JAX_DEFORM_CUDA_ARCHITECTURES=90 CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
timeout 300 python3 -m jax_deform.bench --suite models --no-torch --repeats 10 --json $OUT/models.json > $OUT/models.md 2>&1; echo "models exit $?"
grep "^|" $OUT/models.md | head -40
timeout 250 bash benchmarks/profile_run.sh $OUT/prof 16,64,64,512 float32
cd $OUT && tar czf prof.tgz prof && rm -rf prof
