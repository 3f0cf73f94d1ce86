"""One training step of a ConvNeXt-T-shaped network, timed twice: with XLA's
plain 7x7 depthwise convs, and with `jax_deform.nnx.DeformConv` in every block.

    python examples/convnext_step.py --device gpu --dtype bfloat16     # 224x224, batch 32
    python examples/convnext_step.py --device gpu --dtype float32
    python examples/convnext_step.py --device cpu --tiny                # seconds: smoke run
    python examples/convnext_step.py --device gpu --profile             # + where the time goes

ConvNeXt-T: a 4x4/4 stem, four stages of (3, 3, 9, 3) blocks at widths
(96, 192, 384, 768) with 2x2/2 downsampling between them; a block is a 7x7
depthwise conv, LayerNorm, a 4x MLP with GELU, a layer scale and the residual.
In the deformable model the depthwise conv is a DCNv2 `DeformConv` whose
offsets and mask logits come from a pointwise (1x1) projection of the block
input (as DCNv3/InternImage do; a dense 7x7 offset conv would cost more than
the rest of the block), zero-initialized, so each deformable conv starts as a
plain depthwise conv. Synthetic images and labels; parameters in float32, compute in
``--dtype``. Prints the median step time, images/s and the deformable/plain
ratio; with ``--profile`` also the ops that hold the time, from a
`jax.profiler` trace of a few steps.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_deform.nnx import DeformConv

KERNEL = 7


def _list(items):
    return nnx.List(items) if hasattr(nnx, "List") else items


class Block(nnx.Module):
    def __init__(self, dim: int, deformable: bool, dtype, rngs: nnx.Rngs):
        self.deformable = deformable
        taps = KERNEL * KERNEL
        if deformable:
            self.dw = DeformConv(dim, KERNEL, padding=KERNEL // 2, modulated=True,
                                 predict_offsets=False, dtype=dtype, rngs=rngs)
            # offsets (2 per tap) and mask logits (1 per tap), one offset group
            self.offsets = nnx.Linear(dim, 3 * taps, dtype=dtype, rngs=rngs,
                                      kernel_init=nnx.initializers.zeros_init())
        else:
            self.dw = nnx.Conv(dim, dim, (KERNEL, KERNEL), padding=KERNEL // 2,
                               feature_group_count=dim, dtype=dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.up = nnx.Linear(dim, 4 * dim, dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(4 * dim, dim, dtype=dtype, rngs=rngs)
        self.scale = nnx.Param(jnp.full((dim,), 1e-6, jnp.float32))

    def __call__(self, x):
        if self.deformable:
            predicted = self.offsets(x)
            taps = KERNEL * KERNEL
            offset, logits = predicted[..., :2 * taps], predicted[..., 2 * taps:]
            h = self.dw(x, offset, 2 * jax.nn.sigmoid(logits))
        else:
            h = self.dw(x)
        h = self.down(jax.nn.gelu(self.up(self.norm(h))))
        scale = self.scale[...] if hasattr(nnx.Variable, "get_value") else self.scale.value
        return x + scale.astype(h.dtype) * h


class ConvNeXt(nnx.Module):
    def __init__(self, depths, dims, classes, deformable, dtype, rngs: nnx.Rngs):
        self.stem = nnx.Conv(3, dims[0], (4, 4), strides=4, padding="VALID", dtype=dtype,
                             rngs=rngs)
        self.stem_norm = nnx.LayerNorm(dims[0], dtype=dtype, rngs=rngs)
        downs, stages = [], []
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            if i > 0:
                downs.append(_list([
                    nnx.LayerNorm(dims[i - 1], dtype=dtype, rngs=rngs),
                    nnx.Conv(dims[i - 1], dim, (2, 2), strides=2, padding="VALID",
                             dtype=dtype, rngs=rngs)]))
            stages.append(_list([Block(dim, deformable, dtype, rngs) for _ in range(depth)]))
        self.downs, self.stages = _list(downs), _list(stages)
        self.head_norm = nnx.LayerNorm(dims[-1], dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(dims[-1], classes, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = self.stem_norm(self.stem(x))
        for i, stage in enumerate(self.stages):
            if i > 0:
                norm, conv = self.downs[i - 1]
                x = conv(norm(x))
            for block in stage:
                x = block(x)
        return self.head(self.head_norm(x.mean(axis=(1, 2)))).astype(jnp.float32)


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


class TrainStep:
    """The train step as one jitted function of the model's and optimizer's
    state, split once. (`nnx.jit` walks the module graph in Python on every
    call: on a busy host that took as long as the GPU's step, and the step
    time measured the host: 34 and 48 ms for the same plain bf16 model.)
    The state is donated to each step, so the model and optimizer passed in
    are left without buffers; `nnx.merge(graphdef, self.state)` would give
    the trained ones back."""

    def __init__(self, model, optimizer):
        graphdef, self.state = nnx.split((model, optimizer))

        def step(state, x, y):
            model, optimizer = nnx.merge(graphdef, state)
            loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
            optimizer.update(model, grads)
            return nnx.state((model, optimizer)), loss

        self._step = jax.jit(step, donate_argnums=0)

    def __call__(self, x, y):
        self.state, loss = self._step(self.state, x, y)
        return loss


def time_steps(train_step, batches, warmup, windows, steps):
    """Median seconds per step over `windows` windows of `steps` steps."""
    for i in range(warmup):
        train_step(*batches[i % len(batches)]).block_until_ready()
    times = []
    for _ in range(windows):
        start = time.perf_counter()
        for i in range(steps):
            loss = train_step(*batches[i % len(batches)])
        loss.block_until_ready()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times), float(loss)


def device_ops(train_step, batches, steps=3):
    """Device time per step of every op, from a jax.profiler trace (ms)."""
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir):
            for i in range(steps):
                loss = train_step(*batches[i % len(batches)])
            loss.block_until_ready()
        paths = glob.glob(f"{log_dir}/plugins/profile/*/*.trace.json.gz")
        if not paths:
            return collections.Counter()
        with gzip.open(paths[0]) as f:
            trace = json.load(f)
    processes = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    by_op = collections.Counter()
    for e in trace["traceEvents"]:
        if e.get("ph") != "X" or not processes.get(e["pid"], "").startswith("/device:"):
            continue
        if threads.get((e["pid"], e["tid"]), "").startswith("Stream"):
            by_op[e["name"]] += e["dur"] * 1e-3 / steps  # ms per step
    return by_op


def run(name, deformable, args, batches):
    dtype = jnp.dtype(args.dtype)
    model = ConvNeXt(args.depths, args.dims, args.classes, deformable, dtype,
                     nnx.Rngs(args.seed))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)
    train_step = TrainStep(model, optimizer)
    seconds, loss = time_steps(train_step, batches, args.warmup, args.windows, args.steps)
    print(f"{name:>10}: {seconds * 1e3:8.2f} ms/step, {args.batch / seconds:9.1f} images/s, "
          f"loss {loss:.4f}")
    if args.profile:
        ops = device_ops(train_step, batches)
        if ops:
            print(f"{'':12s}{sum(ops.values()):8.3f} ms/step  all device ops (profiler)")
            for op, ms in ops.most_common(12):
                print(f"{'':12s}{ms:8.3f} ms/step  {op[:90]}")
        else:
            print(f"{'':12s}(the trace has no device streams on this platform)")
    return seconds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--depths", type=lambda s: tuple(int(v) for v in s.split(",")),
                   default=(3, 3, 9, 3))
    p.add_argument("--dims", type=lambda s: tuple(int(v) for v in s.split(",")),
                   default=(96, 192, 384, 768))
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps per timing window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="print the ops that hold the time")
    p.add_argument("--tiny", action="store_true",
                   help="32x32 images, batch 2, one block a stage at widths 16-128 (smoke run)")
    args = p.parse_args(argv)
    if args.tiny:
        args.image_size, args.batch, args.classes = 32, 2, 10
        args.depths, args.dims = (1, 1, 1, 1), (16, 32, 64, 128)
        args.warmup, args.windows, args.steps = 1, 2, 2
    return args


def main(argv=None):
    args = parse_args(argv)
    device = jax.devices(args.device)[0]
    with jax.default_device(device):
        rng = np.random.default_rng(args.seed)
        batches = [(jnp.asarray(rng.standard_normal(
                        (args.batch, args.image_size, args.image_size, 3)), args.dtype),
                    jnp.asarray(rng.integers(0, args.classes, args.batch), jnp.int32))
                   for _ in range(2)]
        print(f"{device.device_kind} ({device.platform}), {args.dtype}, batch {args.batch}, "
              f"{args.image_size}x{args.image_size}, depths {args.depths}, dims {args.dims}")
        plain = run("plain", False, args, batches)
        deformable = run("deformable", True, args, batches)
    print(f"deformable / plain step time: {deformable / plain:.2f}x")


if __name__ == "__main__":
    main()
