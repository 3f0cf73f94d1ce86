"""Runs the CUDA kernels through XLA on odd shapes and hostile offsets, for
compute-sanitizer's memcheck and racecheck:

    compute-sanitizer --tool memcheck --kernel-name kns=jax_deform python3 benchmarks/sanitize.py

initcheck runs on the kernels alone (benchmarks/sanitize_kernels.cu, same
cases): inside XLA, filtered, it cannot see the writes of XLA's own kernels.
Each case runs forward, fast backward and deterministic backward in float32 and
bfloat16.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_deform

CASES = [  # (N, H, W, C, G, M, kernel, stride, padding)
    (2, 7, 9, 3, 1, 1, (3, 3), 1, 1),     # C not a multiple of 4 or 8
    (1, 5, 1, 6, 2, 1, (3, 3), 1, 1),     # W = 1
    (1, 1, 6, 12, 3, 2, (3, 3), 1, 1),    # H = 1, M = 2
    (2, 8, 8, 8, 8, 1, (1, 1), 1, 0),     # 1x1, G = C
    (1, 11, 10, 16, 1, 1, (7, 7), 3, 3),  # 7x7, stride 3
    (2, 9, 9, 520, 1, 1, (3, 3), 2, 1),   # C = 520: vector path, a partial lane round
    (1, 6, 7, 96, 1, 1, (7, 7), 1, 3),    # C = 96, 7x7: 8 lanes x 3 vectors (sample_fit=1)
    (1, 5, 6, 144, 1, 1, (5, 5), 1, 2),   # C = 144, 5x5: 16 lanes x 3, a partial round
    (1, 24, 32, 512, 1, 1, (3, 3), 1, 1),  # a grid under one wave: the small-grid plans
]


def main():
    rng = np.random.default_rng(0)
    cases = CASES[: int(sys.argv[1])] if len(sys.argv) > 1 else CASES  # a prefix, for slow tools
    for n, h, w, c, g, m, (kh, kw), stride, pad in cases:
        ho = (h + 2 * pad - kh) // stride + 1
        wo = (w + 2 * pad - kw) // stride + 1
        offset = 3 * rng.standard_normal((n, ho, wo, 2 * g * kh * kw))
        offset.flat[::7] = 1e30
        offset.flat[1::11] = -np.inf
        offset.flat[2::13] = np.nan
        offset.flat[3::5] = rng.choice([-60.0, 60.0])
        for dtype in (jnp.float32, jnp.bfloat16):
            args = [jnp.asarray(a, dtype) for a in (
                rng.standard_normal((n, h, w, c)), offset, rng.standard_normal((kh, kw, 1, c * m)),
                rng.uniform(size=(n, ho, wo, g * kh * kw)), rng.standard_normal(c * m))]
            for deterministic in (False, True):
                def loss(*a):
                    y = jax_deform.deform_conv2d(*a, stride=stride, padding=pad,
                                                 implementation="ffi", deterministic=deterministic)
                    return jnp.sum(jnp.where(jnp.isnan(y), 0, y).astype(jnp.float32))
                value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)
                jax.block_until_ready(grads)
            print(f"ok: N,H,W,C={n, h, w, c} G={g} M={m} k={kh}x{kw} s={stride} {jnp.dtype(dtype).name}")


if __name__ == "__main__":
    main()
