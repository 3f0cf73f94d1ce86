"""Forward mode (jax.jvp: y and y_dot) on the kernels vs the pure-jnp path:

    python benchmarks/forward_mode.py [--shape N,H,W,C]

One jitted jvp per implementation, median of 15 runs after warm-up, the
compiled program's heavy operations printed beside the time (the kernel path
must hold one forward and one tangent kernel call).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_deform
from jax_deform import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4,32,32,64")
    args = parser.parse_args()
    n, h, w, c = map(int, args.shape.split(","))
    rng = np.random.default_rng(0)
    ops = (
        jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32),
        jnp.asarray(2 * rng.standard_normal((n, h, w, 18)), jnp.float32),
        jnp.asarray(rng.standard_normal((3, 3, 1, c)), jnp.float32),
        jnp.asarray(rng.uniform(size=(n, h, w, 9)), jnp.float32),
    )
    tangents = tuple(jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for a in ops)
    results = {}
    for impl in ("ffi", "xla"):
        def conv(*o, impl=impl):
            return jax_deform.deform_conv2d(*o, padding=1, implementation=impl)

        f = jax.jit(lambda a, t: jax.jvp(conv, a, t))
        results[impl] = jax.block_until_ready(f(ops, tangents))
        times = []
        for _ in range(15):
            start = time.perf_counter()
            jax.block_until_ready(f(ops, tangents))
            times.append(time.perf_counter() - start)
        heavy = dict(bench.heavy_ops(f.lower(ops, tangents).compile().as_text()))
        print(f"{jax.devices()[0].platform} ({n},{h},{w},{c}) 3x3 fp32 jvp, {impl}: "
              f"{np.median(times) * 1e3:.2f} ms  {heavy}")
    diff = jnp.max(jnp.abs(results["ffi"][1] - results["xla"][1]))
    print(f"max |y_dot(ffi) - y_dot(xla)| = {float(diff):.2e}")


if __name__ == "__main__":
    main()
