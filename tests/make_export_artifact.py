"""Writes a serialized jax.export artifact of deform_conv2d for the
compatibility test (tests/test_export.py::test_checked_in_artifact_still_runs),
as jax's own back-compat tests keep serialized modules with their inputs and
expected outputs.

    python tests/make_export_artifact.py [--out tests/data/export_v1.npz]

Run it only to add an artifact for a new target version (or, on a CUDA build,
one that holds the CUDA kernels too: --out tests/data/export_v1_cuda.npz);
never to refresh an existing one, whose whole point is that it was written by
an older version. The function, inputs and expected outputs are defined here
so that the test needs nothing but the file.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

import jax_deform

DEFAULT_OUT = pathlib.Path(__file__).parent / "data" / "export_v1.npz"


def exported_function(x, offset, weight, mask, bias):
    """DCNv2 with bias, stride 1, SAME padding, NHWC."""
    return jax_deform.deform_conv2d(x, offset, weight, mask, bias, padding="SAME")


def inputs(n: int = 2):
    rng = np.random.default_rng(15)
    x = rng.standard_normal((n, 6, 7, 8)).astype(np.float32)
    offset = (2.0 * rng.standard_normal((n, 6, 7, 18))).astype(np.float32)
    weight = rng.standard_normal((3, 3, 1, 8)).astype(np.float32)
    mask = rng.uniform(0.0, 1.0, (n, 6, 7, 9)).astype(np.float32)
    bias = rng.standard_normal((8,)).astype(np.float32)
    cot = rng.standard_normal((n, 6, 7, 8)).astype(np.float32)
    return (x, offset, weight, mask, bias), cot


def export_it(platforms=("cpu", "cuda")):
    """Exported with a symbolic batch dimension, for CPU and CUDA."""
    (n,) = export.symbolic_shape("n")
    specs = (
        jax.ShapeDtypeStruct((n, 6, 7, 8), jnp.float32),
        jax.ShapeDtypeStruct((n, 6, 7, 18), jnp.float32),
        jax.ShapeDtypeStruct((3, 3, 1, 8), jnp.float32),
        jax.ShapeDtypeStruct((n, 6, 7, 9), jnp.float32),
        jax.ShapeDtypeStruct((8,), jnp.float32),
    )
    return export.export(jax.jit(exported_function), platforms=platforms,
                         disabled_checks=jax_deform.disabled_checks())(*specs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    serialized = export_it().serialize(vjp_order=1)
    operands, cot = inputs()
    # Expected values from the pure-jnp reference in float64, not from the kernels.
    with jax.enable_x64(True) if hasattr(jax, "enable_x64") else _x64():
        ops64 = [jnp.asarray(a, jnp.float64) for a in operands]

        def ref(*ops):
            return jax_deform.reference.deform_conv2d(*ops[:3], ops[3], ops[4], padding="SAME")

        y, vjp = jax.vjp(ref, *ops64)
        grads = vjp(jnp.asarray(cot, jnp.float64))
    names = ("x", "offset", "weight", "mask", "bias")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        serialized=np.frombuffer(serialized, np.uint8),
        cot=cot,
        y=np.asarray(y),
        **{f"in_{k}": v for k, v in zip(names, operands)},
        **{f"grad_{k}": np.asarray(g) for k, g in zip(names, grads)},
        targets=np.array(sorted(t for t in jax_deform._ffi.TARGETS)),
        kernel_platforms=np.array(sorted(jax_deform.kernel_platforms())),
        written_by=np.array(f"jax_deform {jax_deform.__version__}, jax {jax.__version__}, "
                            f"{datetime.date.today().isoformat()}"),
    )
    print(f"wrote {args.out} ({len(serialized)} bytes serialized)")
    return 0


def _x64():
    from jax.experimental import enable_x64

    return enable_x64()


if __name__ == "__main__":
    sys.exit(main())
