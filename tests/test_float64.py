"""float64 on the compiled kernels (implementation="ffi"): computed and
accumulated in float64, gradients returned in float64.

The forward is checked against the float64 NumPy oracle at 1e-10, every
gradient against central differences of that oracle at 1e-9, and each
operand's first and second derivatives, forward and reverse mode, with
jax.test_util.check_grads. Offsets sit at least
0.1 px from the integer lattice (tests/test_gradients.py says why), so the
op is linear in x, mask, weight and bias and bilinear in each (dy, dx) pair
along any check direction: central differences are exact up to rounding
and the tolerances can be tight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_deform
from tests.helpers import DEVICES, device_of, make_problem, rel_err
from tests.test_gradients import central_differences

NAMES = ("x", "offset", "weight", "mask", "bias")

CASES = {
    "3x3": dict(),
    "no_mask_no_bias": dict(with_mask=False, with_bias=False),
    "groups_multiplier": dict(c=6, groups=3, multiplier=2),
    "stride_dilation": dict(h=9, w=8, stride=2, dilation=(2, 1), padding=2),
    "5x3_wide": dict(c=16, kernel=(5, 3), padding=((2, 1), (1, 0))),
}


def _off_lattice(p):
    """Offsets moved to at least 0.1 px from the lattice (see the docstring)."""
    frac = p.offset - np.floor(p.offset)
    p.offset = np.floor(p.offset) + np.clip(frac, 0.1, 0.9)
    return p


def _call(p, dtype=jnp.float64, device=None):
    x, offset, weight, mask, bias = p.args(dtype, device)

    def f(x, offset, weight, mask, bias):
        return jax_deform.deform_conv2d(x, offset, weight, mask, bias, implementation="ffi",
                                        **p.kwargs())

    return f, (x, offset, weight, mask, bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_the_float64_oracle(rng, case, device):
    p = make_problem(rng, **CASES[case])
    f, args = _call(p, device=device_of(device))
    y = jax.jit(f)(*args)
    assert y.dtype == jnp.float64
    assert rel_err(y, p.expected()) < 1e-10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["3x3", "groups_multiplier", "stride_dilation"])
def test_gradients_match_central_differences_of_the_oracle(rng, case, device):
    p = _off_lattice(make_problem(rng, **CASES[case]))
    cot = rng.standard_normal(p.expected().shape)
    f, args = _call(p, device=device_of(device))
    present = [i for i, a in enumerate(args) if a is not None]

    def loss(*ops):
        full = list(args)
        for i, a in zip(present, ops):
            full[i] = a
        return jnp.sum(f(*full) * cot)

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(present)))))(
        *[args[i] for i in present])
    want = central_differences(p, cot)
    for i, g in zip(present, grads):
        name = NAMES[i]
        assert g.dtype == jnp.float64, name
        w = np.asarray(want[name])
        err = np.max(np.abs(np.asarray(g) - w)) / max(np.max(np.abs(w)), 1e-30)
        assert err < 1e-9, (name, err)


def _only(f, args, i):
    """f as a function of operand i alone, the others held at args."""
    def g(a):
        full = list(args)
        full[i] = a
        return f(*full)
    return g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["3x3", "groups_multiplier"])
def test_check_grads_first_order_reverse(rng, case, device):
    """check_grads on each operand with the others held fixed: along any
    direction the op is then linear (x, mask, weight, bias) or a sum of
    bilinear terms in (dy, dx) (offset), which central differences
    differentiate exactly; 1e-9 covers float64 rounding."""
    p = _off_lattice(make_problem(rng, **CASES[case]))
    f, args = _call(p, device=device_of(device))
    for i, name in enumerate(NAMES):
        if args[i] is None:
            continue

        # check_grads draws a random cotangent
        check_grads(_only(f, args, i), (args[i],), order=1, modes=("rev",), atol=1e-9,
                    rtol=1e-9, eps=1e-5)


def test_check_grads_second_order_forward_and_reverse(rng):
    """Forward mode and second order (jvp of jvp, vjp of vjp, jvp of vjp) of
    each operand with the others held fixed. Checking a vjp moves the operand
    and the cotangent together, so the checked function is cubic along the
    direction for the offsets: eps = 3e-6 keeps that term small, and rounding
    (float64 epsilon times the checked sum over eps) leaves up to ~5e-9 for
    some draws (seed 919709756: 3.8e-9 at eps 3e-6, 5.1e-9 at 1e-6, 1.6e-8 at
    1e-5), hence tolerances of 2e-8: a wrong derivative term is off by O(1)."""
    p = _off_lattice(make_problem(rng, n=1, h=5, w=5, c=4, groups=2, multiplier=2))
    f, args = _call(p)
    for i, name in enumerate(NAMES):
        if args[i] is None:
            continue

        check_grads(_only(f, args, i), (args[i],), order=2, modes=("fwd", "rev"), atol=2e-8,
                    rtol=2e-8, eps=3e-6)


def test_gradients_are_float64_in_the_kernel_call(rng):
    """The backward custom call itself returns float64 (not float32 cast up)."""
    p = make_problem(rng, n=1, h=5, w=5, c=2)
    f, args = _call(p)
    text = jax.jit(jax.grad(lambda x: jnp.sum(f(x, *args[1:])))).lower(args[0]).as_text()
    calls = [line for line in text.splitlines() if "jax_deform_backward_v1" in line]
    assert calls, text
    assert all("xf32" not in line for line in calls), calls
    assert any("xf64" in line.split("->")[-1] for line in calls), calls


def test_float32_kernels_unchanged_by_float64(rng):
    """float32 still computes in float32 and returns float32 gradients."""
    p = make_problem(rng, n=1, h=5, w=5, c=4)
    f, args = _call(p, jnp.float32)
    grads = jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2, 3, 4))(*args)
    assert all(g.dtype == jnp.float32 for g in grads)
    y32 = f(*args)
    f64, args64 = _call(p, jnp.float64)
    assert y32.dtype == jnp.float32
    assert 1e-9 < rel_err(y32, f64(*args64)) < 1e-5  # float32 rounding, not float64
