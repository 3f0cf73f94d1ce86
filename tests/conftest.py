"""Test-session setup. XLA reads its flags once, when jax first initializes a
backend, so they are set here before anything imports jax."""

import os

_FLAGS = "--xla_force_host_platform_device_count=8"
if _FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAGS).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

import jax_deform  # noqa: E402

# The suite tests the compiled kernels: without them it would skip itself green.
if "cpu" not in jax_deform.kernel_platforms():
    raise pytest.UsageError(
        "jax_deform's compiled extension is not importable; install as README.md says "
        "(pip install -e ...) before running the tests"
    )

# Property tests: a few examples by default (fast CI); `--hypothesis-profile=long`
# for a thorough run on a GPU machine.
settings.register_profile("default", max_examples=15, deadline=None)
settings.register_profile("long", max_examples=200, deadline=None)

# float64 references need x64; kernel inputs are always created with explicit dtypes.
jax.config.update("jax_enable_x64", True)


def _has_gpu() -> bool:
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False


HAS_GPU = _has_gpu()

# The device run sets JAX_DEFORM_REQUIRE_GPU=1: there a GPU test that does not
# run (no device visible, kernels built without CUDA, a skip inside the test)
# is a failure, not a quiet skip.
REQUIRE_GPU = os.environ.get("JAX_DEFORM_REQUIRE_GPU", "") not in ("", "0")
if REQUIRE_GPU and not (HAS_GPU and "cuda" in jax_deform.kernel_platforms()):
    raise pytest.UsageError(
        "JAX_DEFORM_REQUIRE_GPU is set but "
        + ("jax sees no GPU" if not HAS_GPU else
           f"jax_deform has no CUDA kernels (built for {sorted(jax_deform.kernel_platforms())})")
    )


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_GPU and report.skipped and "gpu" in item.keywords:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"GPU test skipped under JAX_DEFORM_REQUIRE_GPU=1: {reason}"


@pytest.fixture
def rng(request):
    """Fresh random data every run; the seed is printed so a failure can be replayed."""
    seed = int(os.environ.get("JAX_DEFORM_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    print(f"seed={seed} (JAX_DEFORM_TEST_SEED={seed} replays it)")
    return np.random.default_rng(seed)
