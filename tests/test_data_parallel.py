"""examples/data_parallel.py on 8 CPU devices: the compiled train step's only
cross-device traffic is one all-reduce of the parameter gradients (plus the
loss scalar), whose reducer is a bare add (what XLA:GPU needs), under
Explicit and Auto mesh axes, under `jax.set_mesh` as the example runs and
without it."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import contextlib

import jax
import pytest

from tests.sharding_checks import callback_sees_mesh, reducer_problems, sharding_custom_calls

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "data_parallel.py"

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")


def load_example():
    spec = importlib.util.spec_from_file_location("data_parallel", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = ["--batch-per-device", "2", "--image-size", "8", "--channels", "8"]


@pytest.mark.parametrize("axis_type,groups,set_mesh", [
    ("explicit", 1, True), ("explicit", 2, True), ("auto", 1, True), ("auto", 2, True),
    ("explicit", 1, False)])
def test_only_collective_is_the_gradient_all_reduce(axis_type, groups, set_mesh):
    dp = load_example()
    args = dp.parse_args(SMALL + ["--devices", "8", "--groups", str(groups),
                                  "--axis-type", axis_type])
    mesh = dp.make_mesh(8, axis_type)
    with contextlib.ExitStack() as stack:
        if set_mesh:  # as the example runs; the callbacks see it too, as on jax >= 0.11
            stack.enter_context(jax.set_mesh(mesh))
            stack.enter_context(callback_sees_mesh(mesh))
        step, state = dp.build(mesh, args)
        hlo = step.lower(*state).compile().as_text()
    found = dp.collectives(hlo)
    params = dp.param_bytes(state[0])
    assert not reducer_problems(hlo), reducer_problems(hlo)
    assert not sharding_custom_calls(hlo), sharding_custom_calls(hlo)
    assert set(found) == {"all-reduce"}, found
    loss_scalar = 4
    assert params <= found["all-reduce"]["bytes"] <= params + loss_scalar, (found, params)


def test_collective_accounting():
    dp = load_example()
    hlo = """
  %all-reduce.2 = (f32[], f32[16]{0}, f32[3,3,1,16]{3,2,1,0}) all-reduce(%a, %b, %c), channel_id=1
  %ag = bf16[8,4]{1,0} all-gather(%x), dimensions={0}
  %ars = f32[4]{0} all-reduce-start(%y), channel_id=2
  %ard = f32[4]{0} all-reduce-done(%ars)
  %arc = ((f32[], f32[8]{0}), (f32[], f32[8]{0})) all-reduce-start(%p, %q), channel_id=3
  %ardc = (f32[], f32[8]{0}) all-reduce-done(%arc)
"""
    assert dp.collectives(hlo) == {
        "all-reduce": {"count": 3, "bytes": 4 + 64 + 576 + 16 + 4 + 32},
        "all-gather": {"count": 1, "bytes": 64},
    }


def test_script_runs():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--devices", "4", *SMALL, "--steps", "2",
         "--windows", "2", "--warmup", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "only the gradient all-reduce crosses devices: yes" in out.stdout
    assert "images/s" in out.stdout
