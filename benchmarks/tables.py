"""The RESULTS.md tables from a bench JSON (`python -m jax_deform.bench --json OUT.json`):

    python benchmarks/tables.py h100_speed_894ed98.json speed    # the speed issue's table
    python benchmarks/tables.py h100_models_894ed98.json models  # the model-layer table

Kernel ms (the profiler's device time) is the primary figure, wall ms in
parentheses; every ratio is of kernel ms within the one run the JSON holds.
"""

from __future__ import annotations

import argparse
import json

from jax_deform.bench import OURS, OURS_DETERMINISTIC, XLA_PLAIN

TORCHVISION = "torchvision groups=C"
# The speed issue's absolute targets (ms): (fwd fp32, fwd+bwd fp32).
SPEED_TARGETS = {(16, 64, 64, 512): (0.15, 0.6), (16, 32, 32, 512): (0.05, 0.2),
                 (8, 128, 128, 128): (0.08, 0.35), (32, 56, 56, 64): (0.04, 0.15),
                 (1, 32, 32, 512): (0.02, 0.06)}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ratio(a, b) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


class Rows:
    def __init__(self, report: dict):
        self.rows = {}
        self.layers = []
        for r in report["results"]:
            c = r["case"]
            layer = ((c["n"], c["h"], c["w"], c["c"]), c["kernel"], c["stride"])
            if layer not in self.layers:
                self.layers.append(layer)
            self.rows[layer + (r["dtype"], r["mode"], r["impl"])] = r

    def get(self, layer, dtype, mode, impl, field="kernel_ms"):
        r = self.rows.get(layer + (dtype, mode, impl))
        return None if r is None else r[field]


def speed_table(rows: Rows) -> list[str]:
    out = ["| shape (N,H,W,C) | fwd fp32 kernel (wall) | target | XLA plain fwd; ours / XLA "
           "| fwd+bwd fp32 kernel (wall) | target | XLA plain fwd+bwd; ours / XLA "
           "| fwd bf16 kernel; bf16 / fp32 | fwd+bwd bf16 kernel "
           "| deterministic fwd+bwd fp32; / fast | torchvision fwd+bwd fp32 (wall); / ours (wall) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for layer in rows.layers:
        def g(dtype, mode, impl, field="kernel_ms"):
            return rows.get(layer, dtype, mode, impl, field)

        fwd, fwd_wall = g("float32", "fwd", OURS), g("float32", "fwd", OURS, "ms")
        both, both_wall = g("float32", "fwd+bwd", OURS), g("float32", "fwd+bwd", OURS, "ms")
        xla_fwd, xla_both = g("float32", "fwd", XLA_PLAIN), g("float32", "fwd+bwd", XLA_PLAIN)
        bf16 = g("bfloat16", "fwd", OURS)
        det = g("float32", "fwd+bwd", OURS_DETERMINISTIC)
        torch_wall = g("float32", "fwd+bwd", TORCHVISION, "ms")
        target = SPEED_TARGETS.get(layer[0], ("-", "-"))
        torch = "-" if torch_wall is None else f"{torch_wall:.3f}; {torch_wall / both_wall:.1f}x"
        out.append(
            f"| {layer[0]} | {_fmt(fwd)} ({_fmt(fwd_wall)}) | {target[0]} | {_fmt(xla_fwd)}; "
            f"{_ratio(fwd, xla_fwd)} | {_fmt(both)} ({_fmt(both_wall)}) | {target[1]} | "
            f"{_fmt(xla_both)}; {_ratio(both, xla_both)} | {_fmt(bf16)}; {_ratio(bf16, fwd)} | "
            f"{_fmt(g('bfloat16', 'fwd+bwd', OURS))} | {_fmt(det)}; {_ratio(det, both)} | {torch} |")
    return out


def models_table(rows: Rows) -> list[str]:
    out = ["| layer (N,H,W,C), k, stride | dtype | fwd kernel ms (wall) | XLA plain fwd "
           "| ours / XLA fwd | fwd+bwd kernel ms (wall) | XLA plain fwd+bwd | ours / XLA fwd+bwd "
           "| bf16 / fp32 fwd |",
           "|---|---|---|---|---|---|---|---|---|"]
    for layer in rows.layers:
        shape, k, stride = layer
        for dtype in ("float32", "bfloat16"):
            def g(mode, impl, field="kernel_ms"):
                return rows.get(layer, dtype, mode, impl, field)

            fwd, both = g("fwd", OURS), g("fwd+bwd", OURS)
            xla_fwd, xla_both = g("fwd", XLA_PLAIN), g("fwd+bwd", XLA_PLAIN)
            by_fp32 = ("" if dtype == "float32"
                       else _ratio(fwd, rows.get(layer, "float32", "fwd", OURS)))
            out.append(
                f"| {shape}, {k}x{k}, {stride} | {dtype} | {_fmt(fwd)} ({_fmt(g('fwd', OURS, 'ms'))}) "
                f"| {_fmt(xla_fwd)} | {_ratio(fwd, xla_fwd)} | {_fmt(both)} "
                f"({_fmt(g('fwd+bwd', OURS, 'ms'))}) | {_fmt(xla_both)} | {_ratio(both, xla_both)} "
                f"| {by_fp32} |")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    parser.add_argument("table", choices=("speed", "models"))
    args = parser.parse_args(argv)
    with open(args.json) as f:
        rows = Rows(json.load(f))
    print("\n".join(speed_table(rows) if args.table == "speed" else models_table(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
