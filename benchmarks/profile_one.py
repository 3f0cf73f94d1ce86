"""One jitted forward+backward, run three times: a target for Nsight Compute.

    ncu --kernel-name regex:BackwardSampleKernel --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python3 benchmarks/profile_one.py 16,64,64,512 float32
"""

import sys

import jax
import jax.numpy as jnp

from jax_deform import bench


def main():
    shape = tuple(int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "16,64,64,512").split(","))
    dtype = jnp.dtype(sys.argv[2] if len(sys.argv) > 2 else "float32")
    kernel = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    case = bench.Case(*shape, kernel=kernel)
    (inputs,) = bench.make_inputs(jax.random.PRNGKey(0), case, dtype, 1)
    step = jax.jit(bench.with_backward(bench.ours(case)))
    for _ in range(3):
        jax.block_until_ready(step(**inputs))


if __name__ == "__main__":
    main()
