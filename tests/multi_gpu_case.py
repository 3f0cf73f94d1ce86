"""One multi-device case of deform_conv2d, run as its own process by
tests/test_multi_gpu.py so that an abort inside XLA is a failed test with
its message, not a dead test run.

    python tests/multi_gpu_case.py --case batch --style set_mesh [--mesh 2x1]
    python tests/multi_gpu_case.py --case channel --style auto --platform cpu --devices 4

Runs the forward and the gradients with respect to every operand on a mesh
of all devices (or --devices), checks them against one device, checks that
every all-reduce of the compiled program has a bare add as reducer, prints
the program's collectives; then forward mode (jax.jvp along every operand):
y_dot against one device, computed by the tangent kernel on each shard with
no collective. Exits 0, or 1 on a wrong result.

Cases (G: offset groups): batch (x split over N, G = 2: grad_weight summed
over batch shards), channel (x, weight, bias split over C, G = 1:
grad_offset and grad_mask summed over channel shards), data_x_model (both,
on a 2-D mesh). Styles: set_mesh (Explicit axes under `jax.set_mesh`, as
JAX's docs do), explicit (Explicit shardings on the arrays only), auto
(Auto axes), auto_set_mesh, shard_map (the op inside `jax.shard_map`, under
`jax.set_mesh`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = ("batch", "channel", "data_x_model")
STYLES = ("set_mesh", "explicit", "auto", "auto_set_mesh", "shard_map")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=CASES, required=True)
    p.add_argument("--style", choices=STYLES, required=True)
    p.add_argument("--mesh", default=None,
                   help="mesh shape, e.g. 2 or 2x2 (default: every device; 2-D: (n/2)x2)")
    p.add_argument("--platform", default=None, help="e.g. cpu (default: jax's default)")
    p.add_argument("--devices", type=int, default=None,
                   help="with --platform cpu: how many host devices to expose")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={ARGS.devices}")
if ARGS is not None and ARGS.platform:
    os.environ["JAX_PLATFORMS"] = ARGS.platform

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(ROOT))
import jax_deform  # noqa: E402
from jax_deform import bench  # noqa: E402
from jax_deform._ffi import TANGENT_TARGET  # noqa: E402
from tests.sharding_checks import collective_lines, reducer_problems  # noqa: E402

KEYS = ("x", "offset", "mask", "weight", "bias")
KW = dict(stride=1, padding=1, dilation=1)
BATCH, CHANNEL = P("data"), P(None, None, None, "model")


def case_setup(case: str, devices: int, mesh_arg: str | None):
    """(mesh shape, axis names, offset groups, operand specs)."""
    if mesh_arg:
        shape = tuple(int(s) for s in mesh_arg.split("x"))
    elif case == "data_x_model":
        shape = (max(devices // 2, 1), 2) if devices >= 2 else (1, 1)
    else:
        shape = (devices,)
    if case == "batch":
        return shape, ("data",), 2, dict(x=BATCH, offset=BATCH, mask=BATCH)
    if case == "channel":
        return shape, ("model",), 1, dict(x=CHANNEL, weight=CHANNEL, bias=P("model"))
    return shape, ("data", "model"), 1, dict(
        x=P("data", None, None, "model"), offset=BATCH, mask=BATCH, weight=CHANNEL,
        bias=P("model"))


def problem(groups, n=16, h=12, w=12, c=32, multiplier=2, k=9):
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return dict(
        x=f(n, h, w, c),
        offset=(1.5 * f(n, h, w, 2 * groups * k)).astype(np.float32),
        mask=rng.uniform(0, 1, (n, h, w, groups * k)).astype(np.float32),
        weight=f(3, 3, 1, c * multiplier),
        bias=f(c * multiplier),
    ), f(n, h, w, c * multiplier)


def global_program():
    def loss(ops, cotangent):
        y = jax_deform.deform_conv2d(ops["x"], ops["offset"], ops["weight"], ops["mask"],
                                     ops["bias"], **KW)
        return jnp.sum(y * cotangent), y

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def y_spec(specs) -> P:
    """y is split like x over the batch and the channels."""
    x = tuple(specs["x"]) + (None,) * (4 - len(specs["x"]))
    return P(x[0], None, None, x[3])


def shard_map_program(mesh, specs, names):
    def local(x, offset, mask, weight, bias, cotangent):
        y = jax_deform.deform_conv2d(x, offset, weight, mask, bias, **KW)
        return jax.lax.psum(jnp.sum(y * cotangent), names), y

    in_specs = tuple(specs.get(k, P()) for k in KEYS) + (y_spec(specs),)
    mapped = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(P(), y_spec(specs)))

    def loss(ops, cotangent):
        return mapped(*(ops[k] for k in KEYS), cotangent)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def forward_mode_program(mesh, specs, style):
    """jit of jax.jvp of the op along a tangent of every operand; inside
    shard_map for that style."""

    def conv(x, offset, mask, weight, bias):
        return jax_deform.deform_conv2d(x, offset, weight, mask, bias, **KW)

    def jvp(primals, tangents):
        return jax.jvp(conv, primals, tangents)

    if style == "shard_map":
        in_specs = tuple(specs.get(k, P()) for k in KEYS)
        jvp = jax.shard_map(jvp, mesh=mesh, in_specs=(in_specs, in_specs),
                            out_specs=(y_spec(specs), y_spec(specs)))
    return jax.jit(lambda ops, dots: jvp(tuple(ops[k] for k in KEYS),
                                         tuple(dots[k] for k in KEYS)))


def max_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1.0))


def main(args) -> int:
    devices = jax.devices()
    shape, names, groups, specs = case_setup(args.case, len(devices), args.mesh)
    count = int(np.prod(shape))
    if count > len(devices):
        print(f"SKIP: mesh {shape} needs {count} devices, have {len(devices)}")
        return 0
    axis_type = AxisType.Auto if args.style.startswith("auto") else AxisType.Explicit
    mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape),
                         devices=devices[:count])
    ops, cotangent = problem(groups)
    rng = np.random.default_rng(1)
    dots = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in ops.items()}
    print(f"jax {jax.__version__}, {devices[0].platform} x{len(devices)} "
          f"({devices[0].device_kind}); case {args.case}, style {args.style}, "
          f"mesh {dict(mesh.shape)}")

    # One device: the reference.
    one = jax.devices()[0]
    f = global_program()
    (want_value, want_y), want_grads = f(jax.device_put(ops, one),
                                         jax.device_put(cotangent, one))
    _, want_y_dot = forward_mode_program(None, specs, "global")(jax.device_put(ops, one),
                                                                jax.device_put(dots, one))

    use_set_mesh = args.style in ("set_mesh", "auto_set_mesh", "shard_map")
    with jax.set_mesh(mesh) if use_set_mesh else contextlib.nullcontext():
        f = shard_map_program(mesh, specs, names) if args.style == "shard_map" else \
            global_program()
        placed = {k: jax.device_put(v, NamedSharding(mesh, specs.get(k, P())))
                  for k, v in ops.items()}
        ct = jax.device_put(cotangent, NamedSharding(mesh, y_spec(specs)))
        hlo = f.lower(placed, ct).compile().as_text()
        (value, y), grads = f(placed, ct)
        jax.block_until_ready(grads)
        jvp = forward_mode_program(mesh, specs, args.style)
        placed_dots = {k: jax.device_put(v, NamedSharding(mesh, specs.get(k, P())))
                       for k, v in dots.items()}
        jvp_hlo = jvp.lower(placed, placed_dots).compile().as_text()
        _, y_dot = jvp(placed, placed_dots)

    print("collectives of the compiled step:")
    for line in collective_lines(hlo):
        print("  ", line.strip()[:220])
    failures = []
    bad = reducer_problems(hlo)
    if bad:
        failures.append("all-reduce reducers that are not a bare add:\n" + "\n".join(bad))
    errors = {"y": max_error(y, want_y), "loss": max_error(value, want_value)}
    errors.update({f"grad_{k}": max_error(grads[k], want_grads[k]) for k in KEYS})
    errors["y_dot"] = max_error(y_dot, want_y_dot)
    tangent_calls = bench.heavy_ops(jvp_hlo)[TANGENT_TARGET]
    print(f"forward mode: {tangent_calls} tangent kernel call(s), "
          f"{len(collective_lines(jvp_hlo))} collective(s)")
    if tangent_calls != 1:
        failures.append(f"forward mode: {tangent_calls} tangent kernel calls, expected 1 per shard")
    if collective_lines(jvp_hlo):
        failures.append("forward mode: collectives in a program that should run shard-local")
    print("max error relative to the largest magnitude, vs one device:",
          ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    tolerance = 1e-4
    failures += [f"{k}: error {v:.2e} > {tolerance}" for k, v in errors.items() if v > tolerance]
    if failures:
        print("FAIL:", *failures, sep="\n")
        return 1
    print(f"OK {args.case} {args.style} {dict(mesh.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
