"""Benchmark: ``python -m jax_deform.bench [--shape N,H,W,C ...] [--plot FILE.png]``.

Times, on one device and the same data: this op, the pure-jnp "xla" path, XLA's
own (non-deformable) depthwise conv, torchvision's deform_conv2d with groups=C
and the dense zero-padded-weight trick (when torch/torchvision import), and the
DRAM floor (bytes that must move / measured copy bandwidth). Forward and
forward+backward; float32 and bfloat16; peak device memory.

JAX timings: K calls on rotating input sets are unrolled into one compiled
program, so device work runs back to back; the program is timed after warm-up
with a device synchronization, K times over, and the median per call is
reported. torch timings use CUDA events around each call (medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jax_deform

DEFAULT_SHAPES = [(16, 64, 64, 512), (16, 32, 32, 512), (8, 128, 128, 128), (32, 56, 56, 64),
                  (1, 32, 32, 512)]
INPUT_SETS = 3  # rotated so that repeated calls do not just re-read the L2 cache


def _inputs(key, shape, dtype, n_sets):
    n, h, w, c = shape
    sets = []
    for k in jax.random.split(key, n_sets):
        kx, ko, km, kw, kb = jax.random.split(k, 5)
        sets.append(dict(
            x=jax.random.normal(kx, (n, h, w, c), dtype),
            offset=(2.0 * jax.random.normal(ko, (n, h, w, 18))).astype(dtype),
            mask=jax.random.uniform(km, (n, h, w, 9), dtype),
            weight=(jax.random.normal(kw, (3, 3, 1, c)) / 3).astype(dtype),
            bias=jax.random.normal(kb, (c,), dtype),
        ))
    return sets


def _time_program(fn, sets, calls, repeats):
    """Median seconds per call of fn, with `calls` calls unrolled in one program."""

    def program(sets):
        return [fn(**sets[i % len(sets)]) for i in range(calls)]

    compiled = jax.jit(program).lower(sets).compile()
    jax.block_until_ready(compiled(sets))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(sets))
        times.append((time.perf_counter() - start) / calls)
    memory = None
    try:
        stats = compiled.memory_analysis()
        if stats is not None:
            memory = (stats.temp_size_in_bytes + stats.output_size_in_bytes) / calls
    except Exception:  # noqa: BLE001  (backends without memory stats)
        memory = None
    return statistics.median(times), memory


def _with_backward(forward):
    def fwd_bwd(x, offset, mask, weight, bias):
        y, vjp = jax.vjp(forward, x, offset, mask, weight, bias)
        return vjp(y)  # any cotangent of the right shape: y itself

    return fwd_bwd


def _ours(implementation, deterministic=False):
    def f(x, offset, mask, weight, bias):
        return jax_deform.deform_conv2d(x, offset, weight, mask, bias, padding=1,
                                        implementation=implementation,
                                        deterministic=deterministic)

    return f


def _xla_depthwise(x, offset, mask, weight, bias):
    del offset, mask
    y = lax.conv_general_dilated(x, weight, (1, 1), ((1, 1), (1, 1)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 feature_group_count=x.shape[-1])
    return y + bias


def _copy_bandwidth(device_kind):
    """Measured bytes/s of a large device copy (read + write)."""
    n = (1 << 28) if device_kind == "gpu" else (1 << 24)
    a = jnp.ones((n,), jnp.float32)
    t, _ = _time_program(lambda a: a * 1.0, [dict(a=a)], 4, 10)
    return 2 * a.nbytes / t


def _floor_bytes(shape, itemsize, backward):
    n, h, w, c = shape
    act = n * h * w * c * itemsize
    side = n * h * w * 27 * itemsize  # offsets (18) + mask (9)
    if not backward:
        return 2 * act + side  # read x, write y, read offset + mask
    # forward, then read x, grad_y, offsets, mask; write grad_x, grad_offset, grad_mask
    return 2 * act + side + 3 * act + 2 * side


def _torch_rows(shape, dtype_name, repeats):
    try:
        import torch
        import torchvision
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    n, h, w, c = shape
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, c, h, w, device=dev, dtype=dtype, generator=gen)
    offset = (2 * torch.randn(n, 18, h, w, device=dev, generator=gen)).to(dtype)
    mask = torch.rand(n, 9, h, w, device=dev, generator=gen).to(dtype)
    weight = torch.randn(c, 1, 3, 3, device=dev, generator=gen).to(dtype)
    bias = torch.randn(c, device=dev, generator=gen).to(dtype)
    dense = torch.zeros(c, c, 3, 3, device=dev, dtype=dtype)
    dense[torch.arange(c), torch.arange(c)] = weight[:, 0]
    deform = torchvision.ops.deform_conv2d

    def timed(fn, backward):
        tensors = [x, offset, mask]
        for t in tensors:
            t.requires_grad_(backward)
        times = []
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for i in range(repeats + 3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y = fn()
            if backward:
                y.backward(y.detach())
            end.record()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(end) / 1e3)
            for t in tensors:
                t.grad = None
        peak = torch.cuda.max_memory_allocated() - base
        return statistics.median(times), peak

    rows = {}
    for backward in (False, True):
        kind = "fwd+bwd" if backward else "fwd"
        weight.requires_grad_(backward)
        dense.requires_grad_(backward)
        for name, w in (("torchvision groups=C", weight), ("torchvision dense trick", dense)):
            try:
                rows[(name, kind)] = timed(
                    lambda w=w: deform(x, offset, w, bias, padding=(1, 1), mask=mask), backward)
            except (NotImplementedError, RuntimeError) as e:  # e.g. no bfloat16 kernel
                print(f"  {name} {shape} {dtype_name} {kind}: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:80]}")
                torch.cuda.empty_cache()
    return rows


def run(shapes, dtypes, repeats=20, calls=10, with_reference=True, with_torch=True):
    device = jax.devices()[0]
    kind = "gpu" if device.platform in ("gpu", "cuda") else device.platform
    bandwidth = _copy_bandwidth(kind)
    results = []
    key = jax.random.PRNGKey(0)
    for shape in shapes:
        for dtype_name in dtypes:
            dtype = jnp.dtype(dtype_name)
            sets = _inputs(key, shape, dtype, INPUT_SETS)
            contenders = [("jax_deform", _ours("ffi")), ("xla depthwise (not deformable)", _xla_depthwise)]
            if with_reference:
                contenders.insert(1, ("jax_deform xla reference", _ours("xla")))
            for backward in (False, True):
                mode = "fwd+bwd" if backward else "fwd"
                extra = [("jax_deform deterministic", _ours("ffi", True))] if backward else []
                for name, fn in contenders + extra:
                    fn = _with_backward(fn) if backward else fn
                    n_calls = calls if name != "jax_deform xla reference" else 2
                    try:
                        t, mem = _time_program(fn, sets, n_calls, max(3, repeats // (1 if n_calls == calls else 4)))
                    except Exception as e:  # noqa: BLE001  (e.g. out of memory for the reference)
                        print(f"  {name} {shape} {dtype_name} {mode}: failed ({type(e).__name__})")
                        continue
                    results.append(dict(shape=shape, dtype=dtype_name, mode=mode, impl=name,
                                        ms=t * 1e3, peak_mib=None if mem is None else mem / 2**20))
                floor = _floor_bytes(shape, dtype.itemsize, backward) / bandwidth
                results.append(dict(shape=shape, dtype=dtype_name, mode=mode, impl="DRAM floor",
                                    ms=floor * 1e3, peak_mib=None))
            if with_torch and kind == "gpu":
                for (name, mode), (t, peak) in _torch_rows(shape, dtype_name, repeats).items():
                    results.append(dict(shape=shape, dtype=dtype_name, mode=mode, impl=name,
                                        ms=t * 1e3, peak_mib=peak / 2**20))
    return dict(device=str(device.device_kind), platform=device.platform,
                copy_bandwidth_gbs=bandwidth / 1e9, jax=jax.__version__, results=results)


def format_table(report) -> str:
    lines = [f"device: {report['device']} ({report['platform']}), jax {report['jax']}, "
             f"copy bandwidth {report['copy_bandwidth_gbs']:.0f} GB/s",
             "| shape (N,H,W,C) | dtype | pass | implementation | ms | vs ours | peak MiB |",
             "|---|---|---|---|---|---|---|"]
    ours = {(tuple(r["shape"]), r["dtype"], r["mode"]): r["ms"]
            for r in report["results"] if r["impl"] == "jax_deform"}
    for r in report["results"]:
        base = ours.get((tuple(r["shape"]), r["dtype"], r["mode"]))
        ratio = f"{r['ms'] / base:.2f}x" if base else "-"
        mem = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {tuple(r['shape'])} | {r['dtype']} | {r['mode']} | {r['impl']} | "
                     f"{r['ms']:.4f} | {ratio} | {mem} |")
    return "\n".join(lines)


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["impl"] == "torchvision groups=C"]
    ours = {(tuple(r["shape"]), r["dtype"], r["mode"]): r["ms"]
            for r in report["results"] if r["impl"] == "jax_deform"}
    labels, speedups = [], []
    for r in rows:
        key = (tuple(r["shape"]), r["dtype"], r["mode"])
        if key in ours:
            labels.append(f"{key[0]}\n{key[1]} {key[2]}")
            speedups.append(r["ms"] / ours[key])
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.9), 4.5))
    ax.bar(range(len(labels)), speedups, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speed-up over torchvision groups=C (x)")
    ax.set_yscale("log")
    ax.set_title(f"jax_deform on {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _shape(text):
    parts = tuple(int(v) for v in text.split(","))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"--shape wants N,H,W,C, got {text!r}")
    return parts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=_shape, action="append", help="N,H,W,C (repeatable)")
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--calls", type=int, default=10, help="calls unrolled per timed program")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow jnp path")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", default="bench_results.json", help="where to write the results")
    parser.add_argument("--plot", help="PNG of speed-ups over torchvision")
    args = parser.parse_args(argv)
    report = run(args.shape or DEFAULT_SHAPES, args.dtype or ["float32", "bfloat16"],
                 repeats=args.repeats, calls=args.calls, with_reference=not args.no_reference,
                 with_torch=not args.no_torch)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    if args.plot:
        plot(report, args.plot)
    print(format_table(report))


if __name__ == "__main__":
    main()
