"""jax.export of functions that call deform_conv2d: versioned kernel targets,
jax_deform.disabled_checks(), round trips through serialization into a fresh
Python process (forward and gradient, symbolic batch), and a checked-in
artifact written by an earlier version that must keep running.

Serialization needs the `flatbuffers` package (the `test` extra installs it).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jax_deform
from tests import make_export_artifact
from tests.helpers import rel_err

pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers")

NAMES = ("x", "offset", "weight", "mask", "bias")
ARTIFACTS = sorted((pathlib.Path(__file__).parent / "data").glob("export_v*.npz"))

# Run in a fresh interpreter: it imports jax_deform (which registers the
# kernels' FFI targets) and nothing else of this project, deserializes, and
# runs the forward and the gradient (the vjp serialized with vjp_order=1).
_RUNNER = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    from jax import export
    if sys.argv[1] == "import":
        import jax_deform  # noqa: F401  (registers the FFI targets)
    names = ("x", "offset", "weight", "mask", "bias")
    for path in sys.argv[2:]:
        data = np.load(path)
        exported = export.deserialize(bytearray(data["serialized"].tobytes()))
        ops = [data["in_" + k] for k in names]
        y, vjp = jax.vjp(exported.call, *ops)
        grads = vjp(data["cot"])
        np.savez(path + ".out.npz", y=np.asarray(y),
                 **{"grad_" + k: np.asarray(g) for k, g in zip(names, grads)})
        print("ran", path, "on", jax.devices()[0].platform)
""")


def _run_fresh(paths, import_jax_deform=True):
    return subprocess.run(
        [sys.executable, "-c", _RUNNER, "import" if import_jax_deform else "no-import",
         *map(str, paths)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "")},
    )


def _check_outputs(path, data, tol=2e-5):
    got = np.load(str(path) + ".out.npz")
    assert rel_err(got["y"], data["y"]) < tol
    for k in NAMES:
        assert got[f"grad_{k}"].dtype == data[f"in_{k}"].dtype, k
        assert rel_err(got[f"grad_{k}"], data[f"grad_{k}"]) < tol, k


def test_disabled_checks_names_the_versioned_targets():
    checks = jax_deform.disabled_checks()
    assert checks == [export.DisabledSafetyCheck.custom_call("jax_deform_forward_v1"),
                      export.DisabledSafetyCheck.custom_call("jax_deform_backward_v1"),
                      export.DisabledSafetyCheck.custom_call("jax_deform_tangent_v1")]


def test_export_without_disabled_checks_is_refused():
    spec = [jax.ShapeDtypeStruct(s, jnp.float32)
            for s in ((1, 5, 5, 2), (1, 5, 5, 18), (3, 3, 1, 2))]
    f = jax.jit(lambda x, o, w: jax_deform.deform_conv2d(x, o, w, padding=1,
                                                         implementation="ffi"))
    with pytest.raises(ValueError, match="jax_deform_forward_v1"):
        export.export(f, platforms=("cpu",))(*spec)
    export.export(f, platforms=("cpu",), disabled_checks=jax_deform.disabled_checks())(*spec)


def test_exported_module_calls_the_versioned_kernels():
    exported = make_export_artifact.export_it()
    assert exported.platforms == ("cpu", "cuda")
    assert str(exported.in_avals[0].shape[0]) == "n"
    text = exported.mlir_module()
    assert "@jax_deform_forward_v1(" in text
    assert "@jax_deform_forward(" not in text  # the unversioned alias is never emitted
    # The vjp (what vjp_order=1 serializes) calls the backward kernel.
    vjp_text = exported.vjp().mlir_module()
    assert "@jax_deform_backward_v1(" in vjp_text


def test_round_trip_in_a_fresh_process(tmp_path):
    """Exported for ("cpu", "cuda") with a symbolic batch, serialized with
    vjp_order=1, run at two batch sizes in a process that only imports
    jax_deform; a process that does not import it cannot run the kernels."""
    serialized = make_export_artifact.export_it().serialize(vjp_order=1)
    paths = []
    for n in (3, 1):
        operands, cot = make_export_artifact.inputs(n)
        with jax.default_device(jax.devices("cpu")[0]):
            ops64 = [jnp.asarray(a, jnp.float64) for a in operands]
            y, vjp = jax.vjp(
                lambda *o: jax_deform.reference.deform_conv2d(*o[:3], o[3], o[4],
                                                              padding="SAME"), *ops64)
            grads = vjp(jnp.asarray(cot, jnp.float64))
        path = tmp_path / f"n{n}.npz"
        np.savez(path, serialized=np.frombuffer(serialized, np.uint8), cot=cot,
                 y=np.asarray(y), **{f"in_{k}": v for k, v in zip(NAMES, operands)},
                 **{f"grad_{k}": np.asarray(g) for k, g in zip(NAMES, grads)})
        paths.append(path)
    proc = _run_fresh(paths)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for path in paths:
        _check_outputs(path, np.load(path))

    if jax.devices()[0].platform == "cpu":  # the CPU module holds the kernel call
        proc = _run_fresh(paths[:1], import_jax_deform=False)
        assert proc.returncode != 0
        assert "jax_deform_forward_v1" in proc.stderr, proc.stderr[-4000:]


@pytest.mark.parametrize("path", ARTIFACTS, ids=[p.name for p in ARTIFACTS])
def test_checked_in_artifact_still_runs(path, tmp_path):
    """An artifact serialized by an earlier version (tests/make_export_artifact.py)
    keeps loading and computing the same values: README's compatibility promise."""
    data = np.load(path)
    written_with = _jax_version_of(data)
    if written_with > _version(jax.__version__):
        pytest.skip(f"{path.name} was serialized with jax {'.'.join(map(str, written_with))}: "
                    f"jax {jax.__version__} cannot read it (jax promises only that newer "
                    "versions read older artifacts)")
    local = tmp_path / path.name
    local.write_bytes(path.read_bytes())
    proc = _run_fresh([local])
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check_outputs(local, data)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def _jax_version_of(data) -> tuple[int, ...]:
    """The jax version in an artifact's written_by ("jax_deform 0.1.0, jax 0.11.2, date")."""
    for field in str(data["written_by"]).split(","):
        name, _, version = field.strip().partition(" ")
        if name == "jax":
            return _version(version)
    raise AssertionError(f"no jax version in written_by: {data['written_by']}")


def test_artifacts_hold_the_cuda_kernels_too():
    """One checked-in artifact was written on a CUDA build, so its CUDA module
    calls the kernels' versioned targets (not a fallback)."""
    platforms = [set(np.load(p)["kernel_platforms"].tolist()) for p in ARTIFACTS]
    assert any("cuda" in found for found in platforms), platforms


def test_an_artifact_is_checked_in():
    assert ARTIFACTS, "tests/data/export_v*.npz is missing (tests/make_export_artifact.py)"
    data = np.load(ARTIFACTS[0])
    assert "jax_deform_forward_v1" in list(data["targets"])


def test_the_artifact_writer_still_runs(tmp_path):
    """tests/make_export_artifact.py, run as a new target version would need it:
    the file it writes loads and runs in a fresh process like a checked-in one."""
    out = tmp_path / "export_vtest.npz"
    assert make_export_artifact.main(["--out", str(out)]) == 0
    data = np.load(out)
    assert sorted(data["targets"]) == sorted(jax_deform._ffi.TARGETS)
    proc = _run_fresh([out])
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check_outputs(out, data)
