"""Bitwise-reproducible gradients: 20 backward runs on the same inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_deform
from tests.helpers import DEVICES, device_of, make_problem, rel_err, unit_roundoff

RUNS = 20


def _cotangent(p, dtype):
    """A fixed cotangent, rounded to the dtype under test (the oracle sees the same)."""
    shape = p.expected().shape
    return np.asarray(jnp.asarray(np.cos(np.arange(np.prod(shape))).reshape(shape), dtype),
                      np.float64)


def _grads(p, device, deterministic, dtype=np.float32, runs=RUNS):
    args = p.args(dtype, device)
    cot = jax.device_put(jnp.asarray(_cotangent(p, dtype), jnp.float32), device)

    def loss(*a):
        y = jax_deform.deform_conv2d(*a, implementation="ffi", deterministic=deterministic,
                                     **p.kwargs())
        return jnp.sum(y.astype(jnp.float32) * cot)

    f = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    return [[np.asarray(g) for g in f(*args)] for _ in range(runs)]


def _identical(runs):
    return all(np.array_equal(a, b, equal_nan=True) for run in runs[1:] for a, b in zip(runs[0], run))


@pytest.mark.parametrize("device_kind", DEVICES)
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_deterministic_backward_is_bitwise_stable(rng, device_kind, dtype):
    # Offsets that pile many samples onto few pixels maximize colliding adds.
    p = make_problem(rng, n=4, h=24, w=24, c=64, groups=2, multiplier=1)
    p.offset = p.offset * 0.5
    device = device_of(device_kind)
    runs = _grads(p, device, True, dtype)
    assert _identical(runs)
    cot = _cotangent(p, dtype)
    want = jax.grad(
        lambda *a: jnp.sum(jax_deform.deform_conv2d(*a, implementation="xla", **p.kwargs()) * cot),
        argnums=(0, 1, 2, 3, 4),
    )(*[jnp.asarray(np.asarray(a, np.float64)) for a in p.args(dtype)])
    # bf16: the float32 gradients rounded once (inputs and cotangent are bf16-exact).
    tol = 1e-5 if dtype == np.float32 else unit_roundoff(dtype) + 1e-5
    for g, w in zip(runs[0], want):
        assert rel_err(g.astype(np.float64), w) < tol


# grad_x's band gather takes groups of 64 channels or more and a grid of at
# least one block an SM (cuda_grad_x_gather.cu, UseBandGather): the problem
# above (32 channels a group) never meets it, this one does (64 channels, 256
# band blocks in float32 and bfloat16) on GPUs of up to 256 SMs.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_band_gather_backward_is_bitwise_stable(rng, dtype):
    if getattr(device_of("gpu"), "core_count", 0) > 256:
        pytest.skip("more SMs than this problem's band blocks: it would take the run gather")
    p = make_problem(rng, n=16, h=64, w=64, c=64, multiplier=1)
    p.offset = p.offset * 0.5
    runs = _grads(p, device_of("gpu"), True, dtype)
    assert _identical(runs)
    # Against the fast path (grad_x by atomics at 64 channels): float32 sums
    # of the same terms in another order (in bfloat16, each rounded once).
    fast = _grads(p, device_of("gpu"), False, dtype, runs=1)[0]
    tol = 1e-5 if dtype == np.float32 else unit_roundoff(dtype) + 1e-5
    for g, f in zip(runs[0], fast):
        assert rel_err(g.astype(np.float64), f.astype(np.float64)) < tol


@pytest.mark.gpu
def test_fast_path_reports_its_variation(rng):
    p = make_problem(rng, n=4, h=24, w=24, c=64, groups=2)
    runs = _grads(p, device_of("gpu"), False)
    names = ["x", "offset", "weight", "mask", "bias"]
    varying = [n for i, n in enumerate(names)
               if not all(np.array_equal(runs[0][i], r[i]) for r in runs[1:])]
    print(f"fast path: gradients that varied across {RUNS} runs: {varying or 'none'}")
    # Only grad_x is scattered with atomics; every other gradient is fixed-order.
    assert set(varying) <= {"x"}


@pytest.mark.parametrize("flags,expected", [
    ("", False),
    ("--xla_gpu_deterministic_ops=true", True),
    ("--xla_gpu_deterministic_ops=TRUE", True),
    ("--xla_gpu_deterministic_ops", True),
    ("--xla_gpu_deterministic_ops=false", False),
    ("--xla_force_host_platform_device_count=8 --xla_gpu_deterministic_ops=true", True),
    ("--xla_gpu_deterministic_ops=true_ish", False),
    ("--xla_gpu_deterministic_ops_extra=true", False),
])
def test_deterministic_default_reads_the_xla_flag(monkeypatch, flags, expected):
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert jax_deform.deterministic_by_default() is expected


@pytest.mark.parametrize("flags,deterministic,expected", [
    ("", None, False),
    ("--xla_gpu_deterministic_ops=true", None, True),
    ("--xla_gpu_deterministic_ops=true", False, False),  # an explicit argument wins
    ("", True, True),
])
def test_deterministic_none_follows_the_flag(rng, monkeypatch, flags, deterministic, expected):
    # What reaches the backward kernel: its `deterministic` attribute.
    monkeypatch.setenv("XLA_FLAGS", flags)
    p = make_problem(rng, n=1, h=5, w=5, c=2)

    def loss(x, *rest):
        return jnp.sum(jax_deform.deform_conv2d(x, *rest, implementation="ffi",
                                                deterministic=deterministic, **p.kwargs()))

    text = jax.jit(jax.grad(loss)).lower(*p.args()).as_text()
    assert "jax_deform_backward" in text
    assert f"deterministic = {str(expected).lower()}" in text
