"""deform_conv2d on two or more GPUs: batch, channel and data x model
sharding, forward, every gradient and forward mode (jvp on the tangent
kernel, shard-local) against one GPU, under each way of
putting a mesh to work (`jax.set_mesh` with Explicit axes, Explicit
shardings on the arrays only, Auto axes, `jax.shard_map`).

Each case is its own process (tests/multi_gpu_case.py): XLA:GPU aborts the
process on a collective it cannot run (e.g. `all_reduce_thunk.cc: Check
failed: reduction_kind.has_value()`), which then fails that test with the
message instead of ending the run. The cases start together, a few at a
time, when the first test needs them. Skipped unless >= 2 GPUs are visible.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import subprocess
import sys

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "multi_gpu_case.py"


def _gpu_count() -> int:
    try:
        return len(jax.devices("gpu"))
    except RuntimeError:
        return 0


GPUS = _gpu_count()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(GPUS < 2, reason="needs >= 2 GPUs")]

CASES = ("batch", "channel", "data_x_model")
STYLES = ("set_mesh", "explicit", "auto", "auto_set_mesh", "shard_map")
#: On two GPUs a 2-D mesh is 2x1 or 1x2: both run; from four on, (n/2)x2.
MESHES_2D = ("2x1", "1x2") if GPUS < 4 else (None,)
PARAMS = [(case, style, mesh) for case in CASES for style in STYLES
          for mesh in (MESHES_2D if case == "data_x_model" else (None,))]
TIMEOUT_S = 240


def _run(case, style, mesh):
    cmd = [sys.executable, str(SCRIPT), "--case", case, "--style", style]
    if mesh:
        cmd += ["--mesh", mesh]
    # Each process takes GPU memory as it needs it, so that several fit.
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S,
                              cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(cmd, "timeout", e.stdout or "", e.stderr or "")


@pytest.fixture(scope="module")
def runs(request):
    """Starts every selected case, a few processes at a time."""
    selected = [tuple(item.callspec.params[k] for k in ("case", "style", "mesh"))
                for item in request.session.items
                if item.path == request.path and hasattr(item, "callspec")]
    workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        yield {p: pool.submit(_run, *p) for p in selected}


@pytest.mark.parametrize("case,style,mesh", PARAMS,
                         ids=[f"{c}-{s}" + (f"-{m}" if m else "") for c, s, m in PARAMS])
def test_case(runs, case, style, mesh):
    out = runs[(case, style, mesh)].result()
    print(out.stdout)
    if out.returncode != 0:
        stderr = out.stderr if isinstance(out.stderr, str) else out.stderr.decode()
        pytest.fail(f"{case}/{style} exited with {out.returncode}\n"
                    f"--- stdout\n{out.stdout[-4000:]}\n--- stderr (tail)\n{stderr[-6000:]}",
                    pytrace=False)
    assert f"OK {case} {style}" in out.stdout
