"""Data-parallel training of a small deformable CNN over a device mesh.

The batch is split over a 1-D mesh axis "data"; parameters and optimizer state
are replicated. deform_conv2d runs shard-local (its sharding rules keep the
batch split), so the only cross-device traffic of a step is the all-reduce of
the parameter gradients. The script checks that in the compiled program and
prints the collectives and their bytes per step, then times the step. The
step is built, compiled and run under `with jax.set_mesh(mesh):`, as JAX's
docs do (--no-set-mesh: shardings on the arrays only).

    python examples/data_parallel.py --devices 8            # 8 CPU devices
    python examples/data_parallel.py                         # all GPUs, if any

On CPU, --devices K makes XLA expose K host devices (set before jax starts).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=None,
                   help="mesh size (default: every device of the default backend)")
    p.add_argument("--batch-per-device", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--groups", type=int, default=1, help="offset groups G")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=10, help="steps per timing window")
    p.add_argument("--windows", type=int, default=5, help="timing windows (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--axis-type", choices=("explicit", "auto"), default="explicit")
    p.add_argument("--no-set-mesh", dest="set_mesh", action="store_false",
                   help="do not make the mesh current (jax.set_mesh)")
    p.add_argument("--implementation", default=None, help="deform_conv2d implementation")
    return p.parse_args(argv)


def _expose_host_devices(count: int | None) -> None:
    """XLA reads the host device count once, when jax starts: set it first.
    The flag only concerns the CPU platform, so it is harmless on GPU."""
    if count:
        flag = f"--xla_force_host_platform_device_count={count}"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


if __name__ == "__main__":
    _expose_host_devices(parse_args().devices)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jax_deform import deform_conv2d  # noqa: E402

KERNEL = 3
DIMENSIONS = ("NHWC", "HWIO", "NHWC")


# ------------------------------------------------------------------ model


def init_params(key, *, channels: int, groups: int, classes: int, in_channels: int = 3):
    """A parameter dict: stem conv, offset predictor, deformable depthwise conv,
    pointwise conv, classifier."""
    k = jax.random.split(key, 4)
    taps = KERNEL * KERNEL

    def he(key, shape, fan_in):
        return jax.random.normal(key, shape, jnp.float32) * np.float32(np.sqrt(2.0 / fan_in))

    def zeros(*shape):
        return jnp.zeros(shape, jnp.float32)

    return {
        "stem_w": he(k[0], (3, 3, in_channels, channels), 9 * in_channels),
        "stem_b": zeros(channels),
        # Zero offsets at start: the deformable conv begins as a plain one.
        "offset_w": zeros(3, 3, channels, 2 * groups * taps),
        "offset_b": zeros(2 * groups * taps),
        "dw_w": he(k[1], (KERNEL, KERNEL, 1, channels), taps),
        "dw_b": zeros(channels),
        "pw_w": he(k[2], (1, 1, channels, channels), channels),
        "head_w": he(k[3], (channels, classes), channels) * np.float32(0.1),
        "head_b": zeros(classes),
    }


def conv(x, w, b=None):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DIMENSIONS)
    return y if b is None else y + b


def forward(params, images, implementation=None):
    h = jax.nn.relu(conv(images, params["stem_w"], params["stem_b"]))
    offset = conv(h, params["offset_w"], params["offset_b"])
    h = deform_conv2d(h, offset, params["dw_w"], bias=params["dw_b"], padding="SAME",
                      implementation=implementation)
    h = jax.nn.relu(conv(jax.nn.relu(h), params["pw_w"]))
    return jnp.mean(h, axis=(1, 2)) @ params["head_w"] + params["head_b"]


def loss_fn(params, images, labels, implementation=None):
    logits = forward(params, images, implementation)
    # A one-hot product rather than an integer-label gather: elementwise ops keep
    # the batch sharding under Explicit axes, where a gather's gradient (a
    # scatter) has no unambiguous output sharding on some jax versions.
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return jnp.mean(optax.softmax_cross_entropy(logits, one_hot))


# ------------------------------------------------------------------ setup


def make_mesh(devices: int | None, axis_type: str = "explicit"):
    available = jax.devices()
    count = len(available) if devices is None else devices
    if count > len(available):
        raise SystemExit(f"asked for {count} devices, {jax.default_backend()} has "
                         f"{len(available)}")
    kind = AxisType.Explicit if axis_type == "explicit" else AxisType.Auto
    return jax.make_mesh((count,), ("data",), axis_types=(kind,), devices=available[:count])


def build(mesh, args):
    """The jitted train step and its sharded inputs: (step, (params, opt_state,
    images, labels))."""
    optimizer = optax.adam(1e-3)
    replicated = NamedSharding(mesh, P())
    batch = NamedSharding(mesh, P("data"))
    params = init_params(jax.random.key(0), channels=args.channels, groups=args.groups,
                         classes=args.classes)
    params = jax.device_put(params, replicated)
    opt_state = jax.device_put(optimizer.init(params), replicated)

    global_batch = args.batch_per_device * mesh.size
    rng = np.random.default_rng(0)
    images = rng.standard_normal((global_batch, args.image_size, args.image_size, 3))
    labels = rng.integers(0, args.classes, (global_batch,))
    images = jax.device_put(images.astype(np.float32), batch)
    labels = jax.device_put(labels.astype(np.int32), batch)

    def step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels, args.implementation)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1),
                   out_shardings=(replicated, replicated, replicated))
    return step, (params, opt_state, images, labels)


# ------------------------------------------------------------------ HLO accounting

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.+?)\s+(?P<op>" + "|".join(COLLECTIVES)
    + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{op: {"count", "bytes"}} for the cross-device ops of a compiled HLO
    module; bytes are the op's result sizes (for an all-reduce: the data
    reduced). Async pairs are counted once, at their start."""
    found: dict[str, dict[str, int]] = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        result = m.group("type")
        if m.group("start") and (m.group("op") != "all-reduce" or result.startswith("((")):
            # An async start can type as ((operands), (results)) (all-gather-start
            # always; a combined all-reduce-start on GPU too): keep the results.
            result = result.split("),", 1)[-1]
        size = sum(_BYTES[dt] * int(np.prod([int(d) for d in dims.split(",") if d]))
                   for dt, dims in _ARRAY.findall(result))
        entry = found.setdefault(m.group("op"), {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += size
    return found


def param_bytes(params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))


# ------------------------------------------------------------------ main


def time_steps(step, state, *, warmup, steps, windows):
    params, opt_state, images, labels = state
    for _ in range(warmup):
        params, opt_state, loss = step(params, opt_state, images, labels)
    loss.block_until_ready()
    rates = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(steps):
            params, opt_state, loss = step(params, opt_state, images, labels)
        loss.block_until_ready()
        rates.append(steps / (time.perf_counter() - start))
    return float(np.median(rates)), float(loss)


def main(argv=None):
    args = parse_args(argv)
    mesh = make_mesh(args.devices, args.axis_type)
    with jax.set_mesh(mesh) if args.set_mesh else contextlib.nullcontext():
        return run(mesh, args)


def run(mesh, args):
    step, state = build(mesh, args)
    hlo = step.lower(*state).compile().as_text()
    found = collectives(hlo)
    params_size = param_bytes(state[0])

    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
          f"mesh {dict(mesh.shape)} ({args.axis_type} axes"
          f"{', under jax.set_mesh' if args.set_mesh else ''}), "
          f"global batch {args.batch_per_device * mesh.size}")
    print(f"parameters: {params_size} bytes")
    print("collectives per step:")
    for op, entry in sorted(found.items()):
        print(f"  {op:20s} x{entry['count']:<3d} {entry['bytes']} bytes")
    total = sum(e["bytes"] for e in found.values())
    if mesh.size == 1:
        print(f"cross-device bytes per step: {total} (one device)")
    else:
        print(f"cross-device bytes per step: {total} (parameters {params_size} + "
              f"{total - params_size} other)")
    only_gradients = set(found) <= {"all-reduce"} and total - params_size <= 64
    print("only the gradient all-reduce crosses devices:", "yes" if only_gradients or
          mesh.size == 1 else "NO")

    steps_per_s, loss = time_steps(step, state, warmup=args.warmup, steps=args.steps,
                                   windows=args.windows)
    print(f"{steps_per_s:.2f} steps/s, {steps_per_s * args.batch_per_device * mesh.size:.1f} "
          f"images/s (median of {args.windows} windows of {args.steps} steps), loss {loss:.4f}")
    return 0 if only_gradients or mesh.size == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
