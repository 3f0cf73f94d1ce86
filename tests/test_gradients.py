"""Every gradient of the compiled kernels, element by element, against central
differences of the float64 NumPy oracle (tests/numpy_reference.py). Nothing
here goes through jax_deform.reference or jax_deform._params: padding comes
from tests/helpers.geometry, derivatives from the forward oracle alone.

Offsets sit at least 0.1 px from the integer lattice, where bilinear sampling
has its kinks (and the -1 < y < H boundary lies). Between kinks the oracle is
linear in each single operand element (bilinear in (dy, dx) jointly), so a
central difference with a step below that distance is exact up to float64
rounding: the tolerance only has to cover the float32 kernel's rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_deform
from tests import numpy_reference
from tests.helpers import DEVICES, device_of, make_problem

NAMES = ("x", "offset", "weight", "mask", "bias")
STEP = 1e-3
# Elementwise, relative to the largest derivative of the operand. The float32
# kernels' error was at most 1.2e-6 of it over 20 seeds of every case below.
RTOL = 3e-5


def _oracle_losses(p, cot, **override):
    """sum(y * cot) per image, for operands possibly stacked along N."""
    ops = {name: getattr(p, name) for name in NAMES}
    ops.update(override)
    y = numpy_reference.deform_conv2d(ops["x"], ops["offset"], ops["weight"], ops["mask"],
                                      ops["bias"], stride=p.stride, pad=p.pad,
                                      dilation=p.dilation)
    n = cot.shape[0]
    y = y.reshape((-1, n) + y.shape[1:])
    return np.sum(y * cot, axis=(2, 3, 4))  # (perturbations, N)


def central_differences(p, cot):
    """{name: d sum(y * cot) / d operand}, by central differences of the oracle.

    Per-image operands (x, offset, mask) are perturbed one element position at
    a time in every image at once, all positions in one oracle call: each image
    only sees its own operands, so image b's loss gives the derivative at b.
    """
    n = p.x.shape[0]
    grads = {}
    for name in ("x", "offset", "mask"):
        a = getattr(p, name)
        if a is None:
            continue
        per_image = int(np.prod(a.shape[1:]))
        eye = np.eye(per_image).reshape((per_image, 1) + a.shape[1:])
        stacked = {}
        for sign in (1, -1):
            perturbed = (a[None] + sign * STEP * eye).reshape((-1,) + a.shape[1:])
            others = {m: np.tile(getattr(p, m), (per_image, 1, 1, 1))
                      for m in ("x", "offset", "mask")
                      if m != name and getattr(p, m) is not None}
            stacked[sign] = _oracle_losses(p, cot, **{name: perturbed}, **others)
        d = (stacked[1] - stacked[-1]) / (2 * STEP)  # (per_image, N)
        grads[name] = d.T.reshape(a.shape)
    for name in ("weight", "bias"):
        a = getattr(p, name)
        if a is None:
            continue
        g = np.zeros(a.size)
        for i in range(a.size):
            e = np.zeros(a.size)
            e[i] = STEP
            plus = _oracle_losses(p, cot, **{name: a + e.reshape(a.shape)}).sum()
            minus = _oracle_losses(p, cot, **{name: a - e.reshape(a.shape)}).sum()
            g[i] = (plus - minus) / (2 * STEP)
        grads[name] = g.reshape(a.shape)
    return grads


def off_the_kinks(rng, p):
    """Offsets of integer + [0.1, 0.9], so that no sample lies within 0.1 px of
    a bilinear kink or of the image boundary; a few land outside the image."""
    p.offset = rng.integers(-3, 3, p.offset.shape) + rng.uniform(0.1, 0.9, p.offset.shape)
    return p


def to_nchw(a):
    return None if a is None else jnp.transpose(a, (0, 3, 1, 2))


def kernel_grads(p, cot, device, nchw=False):
    """Gradients of sum(y * cot) through the float32 kernels, in NHWC."""
    args = p.args(np.float32, device)
    argnums = tuple(i for i, a in enumerate(args) if a is not None)
    cot32 = jnp.asarray(cot, jnp.float32)

    def loss(x, offset, weight, mask, bias):
        if nchw:
            y = jax_deform.deform_conv2d(to_nchw(x), to_nchw(offset), weight, to_nchw(mask),
                                         bias, data_format="NCHW", implementation="ffi",
                                         **p.kwargs())
            y = jnp.transpose(y, (0, 2, 3, 1))
        else:
            y = jax_deform.deform_conv2d(x, offset, weight, mask, bias, implementation="ffi",
                                         **p.kwargs())
        return jnp.sum(y * cot32)

    got = jax.jit(jax.grad(loss, argnums))(*args)
    return {NAMES[i]: np.asarray(g, np.float64) for i, g in zip(argnums, got)}


def assert_matches_differences(got, want, rtol=RTOL):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape, name
        assert np.isfinite(g).all(), name
        scale = np.abs(w).max()
        assert scale > 0, name
        err = np.abs(g - w)
        worst = np.unravel_index(np.argmax(err), err.shape)
        assert err.max() <= rtol * scale, (
            f"grad_{name}: |kernel - central difference| = {err.max():.3g} at {worst} "
            f"(kernel {g[worst]:.9g}, oracle {w[worst]:.9g}), tolerance {rtol * scale:.3g}")
        # Where nothing is read (samples outside the image, pixels no sample
        # touches) the derivative is exactly zero, and so must the kernel's be.
        zero = w == 0
        assert not np.any(g[zero]), f"grad_{name} nonzero where the oracle's is exactly 0"


# Each row: make_problem overrides. Together: offset groups, depth multiplier,
# stride, dilation, SAME with an odd total (bottom/right get the extra row),
# VALID, asymmetric explicit padding, non-square kernels, mask/bias absent, NCHW.
FD_CASES = [
    dict(),
    dict(c=4, groups=2, multiplier=2),
    dict(stride=2, dilation=2, padding=2, h=8, w=7, c=2),
    dict(padding="SAME", stride=2, h=6, w=8, c=3, groups=3),  # totals 1 and 1
    dict(padding="SAME", kernel=(2, 4), h=5, w=6, c=2, multiplier=2),  # totals 1 and 3
    dict(padding="VALID", kernel=(2, 3), h=6, w=7, with_mask=False),
    dict(padding=((0, 2), (1, 0)), kernel=(3, 2), stride=(1, 2), dilation=(2, 1), h=6, w=9, c=4,
         groups=4, with_bias=False),
    dict(c=4, groups=2, multiplier=2, stride=(2, 1), padding=((2, 0), (0, 1)), nchw=True),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return device_of(request.param)


@pytest.mark.parametrize("case", FD_CASES, ids=[str(i) for i in range(len(FD_CASES))])
def test_every_gradient_matches_central_differences(rng, device, case):
    case = dict(case)
    nchw = case.pop("nchw", False)
    p = off_the_kinks(rng, make_problem(rng, n=2, h=case.pop("h", 5), w=case.pop("w", 6),
                                        **{"c": 2, **case}))
    p.round_to(np.float32)  # the oracle differentiates exactly what the kernel reads
    cot = np.asarray(np.float32(rng.standard_normal(p.expected().shape)), np.float64)
    want = central_differences(p, cot)
    got = kernel_grads(p, cot, device, nchw=nchw)
    assert_matches_differences(got, want)


def test_the_oracle_is_sensitive():
    """The comparison fails for the errors it is there to catch: one gradient
    scaled by 1.5, or a single element off by 1e-3 of the gradient's scale."""
    rng = np.random.default_rng(0)
    p = off_the_kinks(rng, make_problem(rng, n=1, h=5, w=5, c=2))
    p.round_to(np.float32)
    cot = np.asarray(np.float32(rng.standard_normal(p.expected().shape)), np.float64)
    want = central_differences(p, cot)
    got = kernel_grads(p, cot, jax.devices("cpu")[0])
    assert_matches_differences(got, want)
    for name in NAMES:
        scaled = dict(got, **{name: got[name] * 1.5})
        with pytest.raises(AssertionError, match=f"grad_{name}"):
            assert_matches_differences(scaled, want)
        nudged = dict(got, **{name: got[name].copy()})
        nudged[name].flat[np.argmax(np.abs(want[name]))] += 1e-3 * np.abs(want[name]).max()
        with pytest.raises(AssertionError, match=f"grad_{name}"):
            assert_matches_differences(nudged, want)
