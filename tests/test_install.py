"""What the installed build says it carries (show_config, build_config), the
once-only warning on a GPU without kernels, and, when CI runs the suite
against an installed wheel or sdist, that the package really comes from there."""

from __future__ import annotations

import io
import os
import pathlib
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_deform
from jax_deform import _config, api
from jax_deform._params import KERNEL_DTYPES

RELEASE = ("sm_80", "sm_90", "sm_100", "sm_120", "compute_120")


def _small_args():
    x = jnp.ones((1, 5, 5, 2), jnp.float32)
    offset = jnp.zeros((1, 5, 5, 18), jnp.float32)  # padding=1: 5x5 out
    weight = jnp.ones((3, 3, 1, 2), jnp.float32)
    return x, offset, weight


# ------------------------------------------------------------ build config

def test_build_config_matches_the_extension():
    cfg = jax_deform.build_config()
    assert cfg["version"] == jax_deform.__version__
    assert cfg["kernel_platforms"] == sorted(jax_deform.kernel_platforms())
    assert "cpu" in cfg["kernel_platforms"]
    assert cfg["kernel_dtypes"] == list(KERNEL_DTYPES)
    assert cfg["extension"] and os.path.exists(cfg["extension"])
    assert cfg["default_backend"] == jax.default_backend()
    archs = cfg["cuda_architectures"]
    if "cuda" in cfg["kernel_platforms"]:
        # Straight from the compiled module: what CMake compiled it for.
        assert archs and all(re.fullmatch(r"(sm|compute)_\d+[af]?", a) for a in archs), archs
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?", cfg["cuda_compiler_version"])
    else:
        assert archs == [] and cfg["cuda_compiler_version"] is None


def test_extension_reports_its_architectures():
    info = jax_deform._config._extension.build_info()
    assert set(info) == {"cuda_architectures", "cuda_compiler_version"}
    assert _config.cuda_architectures() == tuple(a for a in info["cuda_architectures"].split(",")
                                                 if a)


def test_show_config_prints_platforms_dtypes_and_architectures():
    buf = io.StringIO()
    jax_deform.show_config(file=buf)
    text = buf.getvalue()
    assert text.startswith(f"jax_deform {jax_deform.__version__}")
    assert "kernel platforms:   cpu" in text
    assert "float32, bfloat16, float16" in text
    assert "CUDA architectures:" in text


@pytest.mark.parametrize("cc, covered", [
    ("8.0", True), ("8.6", True), ("8.9", True), ("9.0", True), ("10.0", True),
    ("10.3", True), ("12.0", True), ("12.1", True), ("13.0", True),  # PTX for newer
    ("7.5", False), ("11.0", False),
])
def test_release_architectures_cover(cc, covered):
    assert _config.covers(RELEASE, cc) is covered


def test_covers_rules():
    assert not _config.covers(["sm_80"], "9.0")          # SASS: same major only
    assert _config.covers(["compute_80"], "9.0")         # PTX: any newer GPU
    assert not _config.covers(["compute_90"], "8.6")
    assert _config.covers(["sm_90a"], "9.0") and not _config.covers(["sm_90a"], "9.1")
    assert not _config.covers([], "9.0")


# ------------------------------------------------------------ the warning

@pytest.fixture
def gpu_without_cuda_kernels(monkeypatch):
    """Pretends the default backend is a CUDA GPU and the build has only CPU
    kernels (what a source build without nvcc gives); the op itself still runs
    on the CPU arrays it is given."""
    monkeypatch.setattr(_config, "_default_backend", lambda: "gpu")
    monkeypatch.setattr(_config, "_gpus", lambda: [])
    monkeypatch.setattr(_config, "KERNEL_PLATFORMS", frozenset({"cpu"}))
    monkeypatch.setattr(_config, "_warned", False)


def test_gpu_without_cuda_kernels_warns_once(gpu_without_cuda_kernels):
    x, offset, weight = _small_args()
    with pytest.warns(jax_deform.MissingKernelWarning) as record:
        y = jax_deform.deform_conv2d(x, offset, weight, padding=1)
    assert len(record) == 1
    message = str(record[0].message)
    assert "no CUDA kernels" in message and "pure-jnp" in message  # what happens
    assert "nvcc" in message                                          # the cause
    assert "JAX_DEFORM_CUDA=ON" in message and "wheel" in message     # the fix
    assert record[0].filename == __file__  # points at the caller
    np.testing.assert_allclose(y[0, 2, 2], 9.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax_deform.deform_conv2d(x, offset, weight, padding=1)  # once only


def test_no_warning_for_explicit_xla_or_on_cpu(gpu_without_cuda_kernels, monkeypatch):
    x, offset, weight = _small_args()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax_deform.deform_conv2d(x, offset, weight, padding=1, implementation="xla")
        assert _config._warned is False
        monkeypatch.setattr(_config, "_default_backend", lambda: "cpu")
        jax_deform.deform_conv2d(x, offset, weight, padding=1)


def test_gpu_of_an_architecture_not_built_for_warns(monkeypatch):
    class Device:
        device_kind = "Some GPU"
        compute_capability = "7.5"
        client = None

    monkeypatch.setattr(_config, "_default_backend", lambda: "gpu")
    monkeypatch.setattr(_config, "_gpus", lambda: [Device()])
    monkeypatch.setattr(_config, "KERNEL_PLATFORMS", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(_config, "cuda_architectures", lambda: RELEASE)
    message = _config._missing_kernel_message()
    assert "compute capability 7.5" in message and "sm_80" in message
    assert "JAX_DEFORM_CUDA_ARCHITECTURES=native" in message
    Device.compute_capability = "12.0"
    assert _config._missing_kernel_message() is None


def test_ffi_still_raises_without_the_extension(gpu_without_cuda_kernels, monkeypatch):
    monkeypatch.setattr(api, "KERNEL_PLATFORMS", frozenset())
    x, offset, weight = _small_args()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an error, and no warning before it
        with pytest.raises(ValueError, match="implementation='ffi'"):
            jax_deform.deform_conv2d(x, offset, weight, padding=1, implementation="ffi")


@pytest.mark.gpu
def test_gpu_build_carries_kernels_for_this_gpu():
    assert "cuda" in jax_deform.kernel_platforms()
    cfg = jax_deform.build_config()
    assert cfg["gpus"] and all(g["kernels"] for g in cfg["gpus"]), cfg
    assert _config._missing_kernel_message() is None
    x, offset, weight = _small_args()
    x, offset, weight = (jax.device_put(a, jax.devices("gpu")[0]) for a in (x, offset, weight))
    y = jax_deform.deform_conv2d(x, offset, weight, padding=1, implementation="ffi")
    np.testing.assert_allclose(np.asarray(y)[0, 2, 2], 9.0)


# ------------------------------------------------------------ installed copy

@pytest.mark.skipif(not os.environ.get("JAX_DEFORM_SOURCE_TREE"),
                    reason="set by CI's installed-package run (tools/test_installed.sh)")
def test_package_is_the_installed_one():
    """Run against a wheel or sdist install, the package must not come from the
    checkout (else a file missing from the wheel would go unnoticed)."""
    source = pathlib.Path(os.environ["JAX_DEFORM_SOURCE_TREE"]).resolve()
    package = pathlib.Path(jax_deform.__file__).resolve().parent
    assert source not in package.parents, package
    assert "site-packages" in package.parts
    assert pathlib.Path(jax_deform.build_config()["extension"]).parent == package


@pytest.mark.skipif("JAX_DEFORM_EXPECT_ARCHITECTURES" not in os.environ,
                    reason="set by CI's installed-package run: what it built")
def test_installed_build_carries_the_expected_architectures():
    expect = [a for a in os.environ["JAX_DEFORM_EXPECT_ARCHITECTURES"].split(",") if a]
    assert jax_deform.build_config()["cuda_architectures"] == expect
    assert ("cuda" in jax_deform.kernel_platforms()) == bool(expect)
