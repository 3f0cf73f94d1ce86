"""A first run: one deformable depthwise conv on the current backend, checked
against the pure-jnp reference, then a small timing table.

    python examples/demo.py
"""

import jax
import jax.numpy as jnp
import numpy as np

import jax_deform
from jax_deform import bench, reference


def main():
    key = jax.random.PRNGKey(0)
    kx, ko, km, kw = jax.random.split(key, 4)
    n, h, w, c = 2, 16, 16, 32
    x = jax.random.normal(kx, (n, h, w, c))
    offset = 2.0 * jax.random.normal(ko, (n, h, w, 2 * 9))  # one offset group, 3x3
    mask = jax.random.uniform(km, (n, h, w, 9))
    weight = jax.random.normal(kw, (3, 3, 1, c))

    y = jax_deform.deform_conv2d(x, offset, weight, mask, padding=1)
    y_ref = reference.deform_conv2d(x, offset, weight, mask, padding=1)
    err = float(jnp.linalg.norm(y - y_ref) / jnp.linalg.norm(y_ref))
    print(f"backend: {jax.default_backend()}, kernels built for: {sorted(jax_deform.kernel_platforms())}")
    print(f"y {y.shape} {y.dtype}; y[0, 0, 0, :4] = {np.asarray(y[0, 0, 0, :4]).round(4)}")
    print(f"relative error vs the jnp reference: {err:.2e}  ({'OK' if err < 1e-5 else 'MISMATCH'})")
    if err >= 1e-5:
        raise SystemExit(1)

    shape = (4, 32, 32, 64) if jax.default_backend() == "cpu" else (16, 64, 64, 512)
    report = bench.run([bench.Case(*shape)], ["float32"], repeats=5, calls=3, with_torch=False)
    print(bench.format_table(report))


if __name__ == "__main__":
    main()
