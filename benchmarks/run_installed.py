"""Runs a module of the jax_deform installed in a folder (pip install --target):

    python3 benchmarks/run_installed.py PKG_DIR MODULE [ARGS...]

for before/after runs of several builds on one machine (benchmarks/ab_run.sh).
An editable install of the checkout, if there is one, registers an import hook
that would win over sys.path: it is taken out first, and the import is checked.
"""

import os
import runpy
import sys


def main() -> None:
    pkg = os.path.realpath(sys.argv[1])
    module = sys.argv[2]
    sys.meta_path[:] = [f for f in sys.meta_path if "ScikitBuild" not in type(f).__name__]
    sys.path.insert(0, pkg)
    import jax_deform

    where = os.path.realpath(jax_deform.__file__)
    if not where.startswith(pkg + os.sep):
        raise SystemExit(f"jax_deform was imported from {where}, not from {pkg}")
    print(f"jax_deform from {os.path.dirname(where)}", flush=True)
    sys.argv = [module] + sys.argv[3:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
