"""Before/after table of benchmarks/ab_run.sh's output:

    python3 benchmarks/ab_summary.py OUT_DIR NAME [NAME ...]

reads OUT_DIR/NAME_ROUND.json (the bench's JSON) and prints, per case, one row
per revision: each round's wall-clock median and profiler kernel time (ms),
the kernel time relative to the first revision (best round of each), and the
three largest kernels of its best round.
"""

import glob
import json
import os
import re
import sys


def short(kernel: str) -> str:
    m = re.search(r"(\w+(?:<[^()]*>)?)\(", kernel)
    return (m.group(1) if m else kernel)[:48]


def case_key(r: dict) -> tuple:
    c = r["case"]
    shape = f"({c['n']},{c['h']},{c['w']},{c['c']}) k{c['kernel']} s{c['stride']}"
    return (shape, r["dtype"], r["mode"], r["impl"])


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    runs: dict[tuple, dict[str, list[dict]]] = {}
    device = None
    for name in names:
        paths = sorted(glob.glob(os.path.join(out, f"{name}_*.json")),
                       key=lambda p: int(p.rsplit("_", 1)[1][:-5]))
        for path in paths:
            data = json.load(open(path))
            device = device or data.get("device")
            for r in data["results"]:
                if r["impl"] == "DRAM floor":
                    continue
                runs.setdefault(case_key(r), {}).setdefault(name, []).append(r)
    print(f"device: {device}")
    print("| case | dtype | mode | impl | revision | ms (rounds) | kernel ms (rounds) | best vs first | largest kernels |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, by_name in runs.items():
        base = None
        for name in names:
            rs = by_name.get(name)
            if not rs:
                continue
            kern = [r["kernel_ms"] for r in rs if r.get("kernel_ms")]
            best = min(kern) if kern else min(r["ms"] for r in rs)
            base = base or best
            top = min(rs, key=lambda r: r.get("kernel_ms") or r["ms"]).get("top_kernels_ms") or {}
            tops = ", ".join(f"{short(k)} {v:.3f}" for k, v in list(top.items())[:3])
            walls = " / ".join(f"{r['ms']:.4f}" for r in rs)
            kernels = " / ".join(f"{k:.4f}" for k in kern) or "-"
            print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {name} | {walls} | {kernels} | "
                  f"{best / base:.3f} | {tops} |")


if __name__ == "__main__":
    main()
