"""Benchmark: ``python -m jax_deform.bench [--suite speed|models] [--shape N,H,W,C ...]``.

Times, on one device: this op (fast and deterministic backward), XLA's own
non-deformable depthwise conv, optionally the pure-jnp "xla" path, and
torchvision's deform_conv2d with groups=C (when torch/torchvision import and a
GPU is present); forward and forward+backward; float32 and bfloat16.

Every timed call is distinct work, so that XLA cannot merge calls (it removes
identical pure computations, custom calls included): K calls are unrolled into
one compiled program, each on its own input set (K sets in device memory).
Before timing, the compiled program is checked to hold K times the heavy
operations (custom calls, convolutions, gathers) of a one-call program; a
program that does not is an error, not a figure. The program runs after
warm-up, ``repeats`` times, and the median wall time per call is reported.
On GPUs, one more run is traced with ``jax.profiler`` and the kernels' own
device time per call is reported beside it ("kernel ms"): the two must agree.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

import jax_deform


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer: input (N, H, W, C), a k x k depthwise kernel, a stride."""

    n: int
    h: int
    w: int
    c: int
    kernel: int = 3
    stride: int = 1
    label: str = ""

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def out_hw(self) -> tuple[int, int]:
        def out(size):
            return (size + 2 * self.padding - self.kernel) // self.stride + 1
        return out(self.h), out(self.w)

    @property
    def taps(self) -> int:
        return self.kernel * self.kernel

    def describe(self) -> str:
        geometry = f"({self.n},{self.h},{self.w},{self.c}) {self.kernel}x{self.kernel}"
        if self.stride != 1:
            geometry += f" s{self.stride}"
        return f"{self.label} {geometry}" if self.label else geometry


SUITES: dict[str, list[Case]] = {
    # The speed issue's headline shapes: 3x3, stride 1, one offset group, mask.
    "speed": [Case(16, 64, 64, 512), Case(16, 32, 32, 512), Case(8, 128, 128, 128),
              Case(32, 56, 56, 64), Case(1, 32, 32, 512)],
    # Depthwise layers of real models.
    "models": [Case(32, 56, 56, 96, 7, label="ConvNeXt-T stage 1"),
               Case(32, 28, 28, 192, 7, label="ConvNeXt-T stage 2"),
               Case(32, 14, 14, 384, 7, label="ConvNeXt-T stage 3"),
               Case(32, 56, 56, 144, 5, label="EfficientNet 5x5"),
               Case(32, 112, 112, 96, 3, 2, label="MobileNet stride 2")],
}

OURS = "jax_deform"
OURS_DETERMINISTIC = "jax_deform deterministic"
XLA_PLAIN = "xla depthwise (not deformable)"
REFERENCE = "jax_deform xla reference"


def make_inputs(key, case: Case, dtype, count: int) -> list[dict]:
    """`count` independent input sets (x, offset, mask, weight, bias)."""
    ho, wo = case.out_hw
    sets = []
    for k in jax.random.split(key, count):
        kx, ko, km, kw, kb = jax.random.split(k, 5)
        sets.append(dict(
            x=jax.random.normal(kx, (case.n, case.h, case.w, case.c), dtype),
            offset=(2.0 * jax.random.normal(ko, (case.n, ho, wo, 2 * case.taps))).astype(dtype),
            mask=jax.random.uniform(km, (case.n, ho, wo, case.taps), dtype),
            weight=(jax.random.normal(kw, (case.kernel, case.kernel, 1, case.c))
                    / case.kernel).astype(dtype),
            bias=jax.random.normal(kb, (case.c,), dtype),
        ))
    return sets


def ours(case: Case, implementation: str = "ffi", deterministic: bool = False) -> Callable:
    def f(x, offset, mask, weight, bias):
        return jax_deform.deform_conv2d(x, offset, weight, mask, bias, stride=case.stride,
                                        padding=case.padding, implementation=implementation,
                                        deterministic=deterministic)
    return f


def xla_depthwise(case: Case) -> Callable:
    def f(x, offset, mask, weight, bias):
        del offset, mask
        p = case.padding
        y = lax.conv_general_dilated(x, weight, (case.stride, case.stride), ((p, p), (p, p)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=x.shape[-1])
        return y + bias
    return f


def with_backward(forward: Callable) -> Callable:
    """Forward, then the gradients of every operand (the cotangent is y itself)."""
    def fwd_bwd(x, offset, mask, weight, bias):
        y, vjp = jax.vjp(forward, x, offset, mask, weight, bias)
        return vjp(y)
    return fwd_bwd


def program(fn: Callable, calls: int) -> Callable:
    """One jittable function running `fn` once on each of `calls` input sets."""
    def run_all(sets):
        return [fn(**sets[i]) for i in range(calls)]
    return run_all


_HEAVY = re.compile(r'custom_call_target="([^"]+)"|\b(convolution|gather)\(')


def heavy_ops(hlo_text: str) -> collections.Counter:
    """How often each heavy operation (custom-call target, convolution, gather)
    appears in an HLO module's text, fused computations included."""
    counts = collections.Counter()
    for target, opcode in _HEAVY.findall(hlo_text):
        counts[target or opcode] += 1
    return counts


class MergedCallsError(RuntimeError):
    """The compiled program does fewer calls than were asked for."""


def compile_distinct(fn: Callable, sets: Sequence[dict], check: bool = True):
    """Compiles `fn` over every input set, and (with `check`) that XLA kept every
    call: the program's heavy operations must be len(sets) times one call's."""
    calls = len(sets)
    compiled = jax.jit(program(fn, calls)).lower(list(sets)).compile()
    if not check:
        return compiled
    one = heavy_ops(jax.jit(program(fn, 1)).lower(list(sets[:1])).compile().as_text())
    many = heavy_ops(compiled.as_text())
    want = collections.Counter({op: calls * n for op, n in one.items()})
    if not one or many != want:
        raise MergedCallsError(
            f"{calls} distinct calls compiled to {dict(many)}; one call has {dict(one)}")
    return compiled


def _device_streams(trace: dict) -> set:
    """(pid, tid) of the GPU stream rows of a profiler trace (kernels, copies)."""
    processes = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    rows = set()
    for e in trace["traceEvents"]:
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            process = processes.get(e["pid"], "")
            if process.startswith("/device:GPU") and e["args"]["name"].startswith("Stream"):
                rows.add((e["pid"], e["tid"]))
    return rows


def kernel_time(compiled, sets) -> tuple[float | None, dict]:
    """Device time (s) of one run of `compiled`, from a profiler trace: the sum
    of the durations of everything on the GPU's streams, and the top kernels.
    (None, {}) where the trace has no GPU streams (CPU)."""
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir):
            jax.block_until_ready(compiled(sets))
        paths = glob.glob(f"{log_dir}/plugins/profile/*/*.trace.json.gz")
        if not paths:
            return None, {}
        with gzip.open(paths[0]) as f:
            trace = json.load(f)
    rows = _device_streams(trace)
    if not rows:
        return None, {}
    by_kernel = collections.Counter()
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and (e["pid"], e["tid"]) in rows:
            by_kernel[e["name"]] += e["dur"] * 1e-6
    return sum(by_kernel.values()), dict(by_kernel.most_common(4))


def time_program(fn: Callable, sets: Sequence[dict], repeats: int, profile: bool,
                 check: bool = True) -> dict:
    """Median wall seconds per call over `repeats` runs of all the sets, and
    (on GPU) profiler kernel seconds per call."""
    compiled = compile_distinct(fn, sets, check)
    jax.block_until_ready(compiled(sets))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(sets))
        times.append((time.perf_counter() - start) / len(sets))
    kernel, top = kernel_time(compiled, sets) if profile else (None, {})
    return dict(s=statistics.median(times),
                kernel_s=None if kernel is None else kernel / len(sets),
                top_kernels={k: v / len(sets) for k, v in top.items()})


def copy_bandwidth(platform: str) -> float:
    """Measured bytes/s of large device copies (read + write), distinct arrays."""
    n = (1 << 27) if platform == "gpu" else (1 << 23)
    arrays = [dict(a=jnp.full((n,), i, jnp.float32)) for i in range(4)]
    t = time_program(lambda a: a + 1.0, arrays, 10, profile=False, check=False)["s"]
    return 2 * n * 4 / t


def floor_bytes(case: Case, itemsize: int, backward: bool) -> int:
    """Bytes that must move: each input read once, each output written once."""
    ho, wo = case.out_hw
    x = case.n * case.h * case.w * case.c * itemsize
    y = case.n * ho * wo * case.c * itemsize
    side = case.n * ho * wo * 3 * case.taps * itemsize  # offsets (2 per tap) + mask
    if not backward:
        return x + y + side
    # then read x, grad_y, offsets, mask; write grad_x (float32), grad_offset, grad_mask
    return x + y + side + x + y + side + case.n * case.h * case.w * case.c * 4 + side


def torch_rows(case: Case, dtype_name: str, repeats: int) -> dict:
    """torchvision deform_conv2d with groups=C, CUDA events around each call."""
    try:
        import torch
        import torchvision
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    ho, wo = case.out_hw
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0, uniform=False):
        f = torch.rand if uniform else torch.randn
        return (scale * f(*shape, device="cuda", generator=gen)).to(dtype)

    sets = [dict(x=rand(case.n, case.c, case.h, case.w), offset=rand(case.n, 2 * case.taps, ho, wo, scale=2.0),
                 mask=rand(case.n, case.taps, ho, wo, uniform=True)) for _ in range(2)]
    weight = rand(case.c, 1, case.kernel, case.kernel)
    bias = rand(case.c)
    rows = {}
    for backward in (False, True):
        mode = "fwd+bwd" if backward else "fwd"
        weight.requires_grad_(backward)
        for s in sets:
            for t in s.values():
                t.requires_grad_(backward)
        times = []
        try:
            for i in range(repeats + 3):
                s = sets[i % 2]
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                y = torchvision.ops.deform_conv2d(s["x"], s["offset"], weight, bias,
                                                  stride=case.stride, padding=case.padding,
                                                  mask=s["mask"])
                if backward:
                    y.backward(y.detach())
                end.record()
                torch.cuda.synchronize()
                if i >= 3:
                    times.append(start.elapsed_time(end) / 1e3)
                for t in list(s.values()) + [weight]:
                    t.grad = None
        except (NotImplementedError, RuntimeError) as e:  # e.g. no bfloat16 kernel
            print(f"  torchvision {case.describe()} {dtype_name} {mode}: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:80]}")
            continue
        rows[mode] = statistics.median(times)
    return rows


def run(cases: Sequence[Case], dtypes: Sequence[str], repeats: int = 20, calls: int = 10,
        with_reference: bool = False, with_torch: bool = True,
        only: Sequence[str] | None = None, modes: Sequence[str] = ("fwd", "fwd+bwd")) -> dict:
    device = jax.devices()[0]
    platform = "gpu" if device.platform in ("gpu", "cuda") else device.platform
    profile = platform == "gpu"
    bandwidth = copy_bandwidth(platform)
    results = []
    key = jax.random.PRNGKey(0)
    for case in cases:
        for dtype_name in dtypes:
            dtype = jnp.dtype(dtype_name)
            sets = make_inputs(key, case, dtype, calls)
            contenders = [(OURS, ours(case)), (XLA_PLAIN, xla_depthwise(case))]
            if with_reference:
                contenders.append((REFERENCE, ours(case, "xla")))
            for backward in (False, True):
                mode = "fwd+bwd" if backward else "fwd"
                if mode not in modes:
                    continue
                extra = [(OURS_DETERMINISTIC, ours(case, deterministic=True))] if backward else []
                for name, fn in contenders + extra:
                    if only and name not in only:
                        continue
                    fn = with_backward(fn) if backward else fn
                    # the jnp path is slow and memory-hungry: two distinct calls
                    use = sets[:2] if name == REFERENCE else sets
                    try:
                        timing = time_program(fn, use, repeats if name != REFERENCE else 3, profile)
                    except MergedCallsError:
                        raise
                    except Exception as e:  # noqa: BLE001  (e.g. out of memory)
                        print(f"  {name} {case.describe()} {dtype_name} {mode}: failed "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:100]})")
                        continue
                    results.append(dict(case=dataclasses.asdict(case), dtype=dtype_name,
                                        mode=mode, impl=name, ms=timing["s"] * 1e3,
                                        kernel_ms=None if timing["kernel_s"] is None
                                        else timing["kernel_s"] * 1e3,
                                        top_kernels_ms={k: v * 1e3 for k, v in
                                                        timing["top_kernels"].items()}))
                results.append(dict(case=dataclasses.asdict(case), dtype=dtype_name, mode=mode,
                                    impl="DRAM floor", kernel_ms=None, top_kernels_ms={},
                                    ms=floor_bytes(case, dtype.itemsize, backward) / bandwidth * 1e3))
            del sets
            if with_torch and platform == "gpu" and (not only or "torchvision groups=C" in only):
                for mode, t in torch_rows(case, dtype_name, repeats).items():
                    results.append(dict(case=dataclasses.asdict(case), dtype=dtype_name, mode=mode,
                                        impl="torchvision groups=C", ms=t * 1e3, kernel_ms=None,
                                        top_kernels_ms={}))
    return dict(device=str(device.device_kind), platform=device.platform, calls=calls,
                copy_bandwidth_gbs=bandwidth / 1e9, jax=jax.__version__, results=results,
                date=time.strftime("%Y-%m-%d"))


def _key(r):
    return (json.dumps(r["case"], sort_keys=True), r["dtype"], r["mode"])


def format_table(report) -> str:
    lines = [f"device: {report['device']} ({report['platform']}), jax {report['jax']}, "
             f"{report['calls']} distinct calls per program, copy bandwidth "
             f"{report['copy_bandwidth_gbs']:.0f} GB/s, {report['date']}",
             "| layer | dtype | pass | implementation | ms | kernel ms | this / ours | "
             "this / XLA plain |",
             "|---|---|---|---|---|---|---|---|"]
    by_impl = {impl: {_key(r): r["ms"] for r in report["results"] if r["impl"] == impl}
               for impl in (OURS, XLA_PLAIN)}
    for r in report["results"]:
        ours_ms = by_impl[OURS].get(_key(r))
        plain_ms = by_impl[XLA_PLAIN].get(_key(r))
        vs_ours = f"{r['ms'] / ours_ms:.2f}x" if ours_ms and r["impl"] != OURS else "-"
        vs_plain = f"{r['ms'] / plain_ms:.2f}x" if plain_ms and r["impl"] != XLA_PLAIN else "-"
        kernel = "-" if r["kernel_ms"] is None else f"{r['kernel_ms']:.4f}"
        lines.append(f"| {Case(**r['case']).describe()} | {r['dtype']} | {r['mode']} | "
                     f"{r['impl']} | {r['ms']:.4f} | {kernel} | {vs_ours} | {vs_plain} |")
    return "\n".join(lines)


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours_ms = {_key(r): r["ms"] for r in report["results"] if r["impl"] == OURS}
    labels, speedups = [], []
    for r in report["results"]:
        if r["impl"] == "torchvision groups=C" and _key(r) in ours_ms:
            labels.append(f"{Case(**r['case']).describe()}\n{r['dtype']} {r['mode']}")
            speedups.append(r["ms"] / ours_ms[_key(r)])
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.9), 4.5))
    ax.bar(range(len(labels)), speedups, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speed-up over torchvision groups=C (x)")
    ax.set_yscale("log")
    ax.set_title(f"jax_deform on {report['device']} ({report['date']}), distinct calls")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _shape(text):
    parts = tuple(int(v) for v in text.split(","))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"--shape wants N,H,W,C, got {text!r}")
    return parts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="speed")
    parser.add_argument("--shape", type=_shape, action="append",
                        help="N,H,W,C (repeatable; replaces the suite)")
    parser.add_argument("--kernel", type=int, default=3, help="kernel size, with --shape")
    parser.add_argument("--stride", type=int, default=1, help="stride, with --shape")
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--calls", type=int, default=10,
                        help="distinct calls (and input sets) per timed program")
    parser.add_argument("--reference", action="store_true", help="also time the slow jnp path")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--only", action="append",
                        help="time only this implementation (repeatable), e.g. jax_deform")
    parser.add_argument("--mode", action="append", choices=["fwd", "fwd+bwd"])
    parser.add_argument("--json", default="bench_results.json", help="where to write the results")
    parser.add_argument("--plot", help="PNG of speed-ups over torchvision")
    args = parser.parse_args(argv)
    cases = ([Case(*s, kernel=args.kernel, stride=args.stride) for s in args.shape]
             if args.shape else SUITES[args.suite])
    report = run(cases, args.dtype or ["float32", "bfloat16"], repeats=args.repeats,
                 calls=args.calls, with_reference=args.reference, with_torch=not args.no_torch,
                 only=args.only, modes=args.mode or ("fwd", "fwd+bwd"))
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    if args.plot:
        plot(report, args.plot)
    print(format_table(report))


if __name__ == "__main__":
    main()
