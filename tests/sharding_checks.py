"""What the sharding tests check in a compiled program, shared by the CPU
tests and the multi-GPU case runner (tests/multi_gpu_case.py).

XLA:GPU accepts an all-reduce only when its reduction computation is a bare
`add(p0, p1)` (or another single binary op): one wrapped in sharding custom
calls aborts the process (`all_reduce_thunk.cc: Check failed:
reduction_kind.has_value()`). XLA:CPU compiles such reducers, so the CPU
tests check the compiled text instead, and `callback_sees_mesh` makes jax 0.10
trace the partitioning callbacks the way jax 0.11 does.
"""

from __future__ import annotations

import contextlib
import re

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.+?\s+(?P<op>[\w\-]+)\((?P<args>.*)$")


def computations(hlo: str) -> dict[str, list[str]]:
    """{name: instruction lines} of an HLO module's text."""
    found: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = found.setdefault(m.group(1), [])
        elif line.strip() == "}":
            current = None
        elif current is not None and line.strip():
            current.append(line)
    return found


def collective_lines(hlo: str) -> list[str]:
    ops = "|".join(COLLECTIVES)
    return [line for line in hlo.splitlines()
            if re.search(rf"\s({ops})(?:-start)?\(", line)]


def reducer_problems(hlo: str) -> list[str]:
    """Every all-reduce / reduce-scatter whose reduction computation is not a
    bare binary op of its two parameters, with that computation."""
    comps = computations(hlo)
    problems = []
    for line in collective_lines(hlo):
        m = re.search(r"to_apply=%?([\w.\-]+)", line)
        if not m:
            continue
        body = comps.get(m.group(1))
        if body is None:
            problems.append(f"reducer {m.group(1)} not found for: {line.strip()}")
            continue
        ops = [i.group("op") for i in map(_INSTRUCTION.match, body) if i]
        if sorted(ops) != ["add", "parameter", "parameter"]:
            problems.append(f"{line.strip()}\n  reducer {m.group(1)}: {ops}")
    return problems


def sums_from_partitioned_call(hlo: str) -> list[str]:
    """All-reduces (and reduce-scatters) traced inside a custom_partitioning
    callback: they keep that call's name in their metadata. (Gathers the
    partitioner adds to reshard the call's operands carry it too, but have no
    reducer.)"""
    return [line.strip() for line in collective_lines(hlo)
            if re.search(r"\s(all-reduce|reduce-scatter)(?:-start)?\(", line)
            and re.search(r'op_name="[^"]*custom_partitioning', line)]


def sharding_custom_calls(hlo: str) -> list[str]:
    return [line.strip() for line in hlo.splitlines()
            if re.search(r'custom_call_target="(Sharding|xla\.sdy\.\w+)"', line)]


@contextlib.contextmanager
def callback_sees_mesh(mesh):
    """Makes `mesh` current in every thread, not only this one, while compiling.

    jax >= 0.11 runs custom_partitioning callbacks under the caller's
    `jax.set_mesh`; jax 0.10 runs them on an XLA thread where no mesh is
    current. With the mesh set process-wide, jax 0.10 traces them as 0.11
    does, which is what turned the op's old in-callback psum into a reducer
    XLA:GPU rejects. A no-op where the (private) setting is missing.
    """
    try:
        from jax._src import config as jax_config  # test-only: no public equivalent

        setting = jax_config.abstract_mesh_context_manager
        previous = setting.get_global()
    except (ImportError, AttributeError):
        yield
        return
    setting.set_global(mesh.abstract_mesh)
    try:
        yield
    finally:
        setting.set_global(previous)
