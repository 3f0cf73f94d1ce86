"""Shared test helpers: random problems, poisoned calls, error measures."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import numpy_reference

DEVICES = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]


def device_of(kind: str):
    return jax.devices(kind)[0]


@dataclasses.dataclass
class Problem:
    x: np.ndarray
    offset: np.ndarray
    weight: np.ndarray
    mask: np.ndarray | None
    bias: np.ndarray | None
    stride: tuple
    pad: tuple  # (top, left) for the oracle
    padding: object  # what the API is given
    dilation: tuple

    def args(self, dtype=np.float32, device=None):
        def put(a):
            if a is None:
                return None
            return jax.device_put(jnp.asarray(a, dtype), device)

        return put(self.x), put(self.offset), put(self.weight), put(self.mask), put(self.bias)

    def round_to(self, dtype):
        """Rounds the data to `dtype` in place (kept in float64), so that the
        oracle sees exactly what a kernel in `dtype` reads."""
        for name in ("x", "offset", "weight", "mask", "bias"):
            a = getattr(self, name)
            if a is not None:
                setattr(self, name, np.asarray(jnp.asarray(a, dtype), np.float64))

    def kwargs(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation)

    def expected(self):
        return numpy_reference.deform_conv2d(
            self.x, self.offset, self.weight, self.mask, self.bias,
            stride=self.stride, pad=self.pad, dilation=self.dilation,
        )


def offsets_of(rng, shape, kind: str):
    if kind == "random":  # std 2 px, one in ten far outside the image
        off = 2.0 * rng.standard_normal(shape)
        far = rng.random(shape) < 0.1
        off = np.where(far, rng.choice([-1, 1], shape) * rng.uniform(20, 60, shape), off)
        # Sample positions are integer + offset. Within float32 rounding of an
        # integer, the kernel (float32 positions) and a float64 oracle can sit on
        # opposite sides of bilinear's kink, where d(value)/d(offset) jumps; the
        # integer and half-pixel kinds test those points on purpose instead.
        near = np.abs(off - np.round(off)) < 1e-3
        return np.where(near, off + 2e-3, off)
    if kind == "integer":
        return rng.integers(-3, 4, shape).astype(np.float64)
    if kind == "half":
        return rng.integers(-6, 7, shape) / 2.0
    raise ValueError(kind)


def make_problem(rng, *, n=2, h=7, w=9, c=4, kernel=(3, 3), stride=1, padding=1,
                 dilation=1, groups=1, multiplier=1, with_mask=True, with_bias=True,
                 offsets="random") -> Problem:
    kh, kw = kernel
    stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
    dilation = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    pad, (ho, wo) = geometry((h, w), kernel, stride, padding, dilation)
    x = rng.standard_normal((n, h, w, c))
    weight = rng.standard_normal((kh, kw, 1, c * multiplier))
    off = offsets_of(rng, (n, ho, wo, 2 * groups * kh * kw), offsets)
    mask = rng.uniform(0.0, 1.0, (n, ho, wo, groups * kh * kw)) if with_mask else None
    bias = rng.standard_normal(c * multiplier) if with_bias else None
    return Problem(x, off, weight, mask, bias, stride, pad, padding, dilation)


def geometry(in_hw, kernel, stride, padding, dilation):
    """((pad_top, pad_left), (Ho, Wo)) by the usual convolution arithmetic."""
    if padding == "VALID":
        pads = [(0, 0), (0, 0)]
    elif padding == "SAME":
        pads = []
        for size, k, s, d in zip(in_hw, kernel, stride, dilation):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
    elif isinstance(padding, int):
        pads = [(padding, padding)] * 2
    elif isinstance(padding[0], int):
        pads = [(padding[0], padding[0]), (padding[1], padding[1])]
    else:
        pads = [tuple(p) for p in padding]
    out = tuple(
        (size + lo + hi - d * (k - 1) - 1) // s + 1
        for size, (lo, hi), k, s, d in zip(in_hw, pads, kernel, stride, dilation)
    )
    return (pads[0][0], pads[1][0]), out


def rel_err(got, want) -> float:
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert not np.isnan(got).any(), "NaN in result (unwritten or poisoned element?)"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def poisoned(fn, out_shapes, *args):
    """Runs fn(*args) under jit with its outputs placed in donated buffers that
    are filled with NaN first, so an element the kernel forgets to write shows
    up as NaN. Checks that XLA really aliased every output to a poisoned buffer."""
    poison = [jnp.full(s, jnp.nan, d) for s, d in out_shapes]
    jitted = jax.jit(lambda p, *a: fn(*a), donate_argnums=0, keep_unused=True)
    compiled = jitted.lower(poison, *args).compile()
    text = compiled.as_text()
    assert text.count("may-alias") + text.count("must-alias") >= len(out_shapes), (
        "outputs were not aliased to the poisoned buffers"
    )
    return compiled(poison, *args)


# ------------------------------------------------------------ dtype rounding

def ulp(values, dtype) -> np.ndarray:
    """The spacing of `dtype` at |values| (one unit in the last place)."""
    info = jnp.finfo(dtype)
    a = np.abs(np.asarray(values, np.float64))
    with np.errstate(divide="ignore"):
        exponent = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    exponent = np.where(a > 0, np.maximum(exponent, info.minexp), info.minexp)
    return np.exp2(exponent - info.nmant)


def unit_roundoff(dtype) -> float:
    """Largest relative error of rounding to nearest in `dtype`: half its epsilon."""
    return float(jnp.finfo(dtype).eps) / 2


def assert_rounded_from(got, f32, dtype, min_exact=0.99, what="output", atol=0.0):
    """`got` (in `dtype`) is the float32 result `f32` rounded to nearest even:
    bitwise for at least `min_exact` of the elements (a GPU may sum in another
    order and land on the other side of a rounding tie), within one ulp (plus
    `atol`, for sums made in another order than `f32`'s) of it everywhere,
    with the same NaNs."""
    got = np.asarray(got)
    assert got.dtype == np.dtype(dtype), (got.dtype, dtype)
    got = got.astype(np.float64)
    # NumPy's (ml_dtypes') conversion rounds to nearest even; XLA is not involved.
    want = np.asarray(f32, np.float32).astype(dtype).astype(np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=what)
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    mismatched = int(np.size(same) - np.count_nonzero(same))
    assert mismatched <= (1 - min_exact) * np.size(same), (
        f"{what}: {mismatched} of {np.size(same)} elements are not the float32 result "
        f"rounded to nearest even {np.dtype(dtype).name}")
    off = ~same
    assert np.all(np.abs(got[off] - want[off]) <= ulp(want[off], dtype) + atol), (
        f"{what}: more than one ulp from the rounded float32 result")


# ------------------------------------------------------------ Flax layers

def constant_prediction_oracle(rng, x, kernel, bias, *, strides, padding, dilation, groups):
    """For a DeformConv whose offset predictor has a zero kernel: a random bias
    for that predictor (offsets off the integer lattice, mask logits in
    [-3, 3]) and the layer output the float64 oracle gives for it, with the
    README's mask = 2 * sigmoid(logits). Returns (predictor_bias, expected y,
    expected mask)."""
    kh, kw = kernel.shape[:2]
    taps = kh * kw
    offsets = rng.integers(-2, 2, 2 * groups * taps) + rng.uniform(0.1, 0.9, 2 * groups * taps)
    logits = rng.uniform(-3, 3, groups * taps)
    stride = (strides, strides) if isinstance(strides, int) else tuple(strides)
    dil = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    pad, (ho, wo) = geometry(x.shape[1:3], (kh, kw), stride, padding, dil)
    n = x.shape[0]
    mask = np.broadcast_to(2.0 / (1.0 + np.exp(-logits)), (n, ho, wo, groups * taps))
    y = numpy_reference.deform_conv2d(
        np.asarray(x, np.float64), np.broadcast_to(offsets, (n, ho, wo, 2 * groups * taps)),
        np.asarray(kernel, np.float64), mask, None if bias is None else np.asarray(bias),
        stride=stride, pad=pad, dilation=dil)
    return np.concatenate([offsets, logits]).astype(np.float32), y, mask
