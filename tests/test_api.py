"""deform_conv2d on the compiled kernels against an independent float64 oracle,
on fresh random data each run. Every test runs on the CPU and, with the gpu
marker, on a CUDA device."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_deform
from jax_deform import reference
from tests.helpers import (
    DEVICES,
    assert_rounded_from,
    device_of,
    make_problem,
    poisoned,
    rel_err,
    unit_roundoff,
)



@pytest.fixture(params=DEVICES)
def device(request):
    return device_of(request.param)


def ffi_conv(x, offset, weight, mask, bias, **kw):
    return jax_deform.deform_conv2d(x, offset, weight, mask, bias, implementation="ffi", **kw)


def run_forward(p, device, dtype=np.float32):
    x, offset, weight, mask, bias = p.args(dtype, device)
    shape = p.expected().shape
    return poisoned(
        lambda *a: ffi_conv(*a, **p.kwargs()), [(shape, dtype)], x, offset, weight, mask, bias
    )


# Each row: geometry overrides for make_problem. Together they cover every
# parameter: kernel 1x1/3x3/5x5/3x5, stride, dilation, asymmetric and named
# padding, G in {1, 2, C}, M in {1, 2}, mask and bias on/off.
CASES = [
    dict(),
    dict(kernel=(1, 1), padding=0),
    dict(kernel=(5, 5), padding=2, c=6, groups=2),
    dict(kernel=(3, 5), padding=((1, 2), (0, 3)), multiplier=2),
    dict(stride=2, padding="SAME", groups=4),
    dict(stride=(2, 1), dilation=(1, 2), padding="VALID", h=9, w=11),
    dict(dilation=2, padding=2, with_mask=False, with_bias=False),
    dict(c=8, groups=8, multiplier=2, with_bias=False),
    dict(c=12, groups=3, stride=3, padding=1, h=10, w=8),
    dict(n=1, h=1, w=1, kernel=(1, 1), padding=0, c=3, groups=3),
    # SAME with odd totals: the extra row/column goes to the bottom/right.
    dict(padding="SAME", stride=2, kernel=(3, 4), h=8, w=6),  # totals 1 and 2
    dict(padding="SAME", kernel=(2, 4), dilation=(1, 2), groups=2),  # totals 1 and 6
    dict(padding="SAME", kernel=(4, 2), h=5, w=4, multiplier=2),  # totals 3 and 1
    # 32 channels: the CUDA forward's 8-lane pixels, several pixels a thread.
    dict(c=32),
    # Three rounds of channel vectors a lane (ForwardLanes): 96 channels on
    # 8 lanes (7x7), 192 on 16.
    dict(n=1, h=6, w=7, c=96, kernel=(7, 7), padding=3),
    dict(n=1, h=5, w=6, c=192),
    # A grid under one wave with 2^19 output elements (twice the least): the
    # CUDA forward's 16-pixel tiles (WithSmallGridTiles).
    dict(n=1, h=32, w=32, c=512),
]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("offsets", ["random", "integer", "half"])
def test_forward_matches_float64_oracle(rng, device, case, offsets):
    p = make_problem(rng, offsets=offsets, **case)
    assert rel_err(run_forward(p, device), p.expected()) < 1e-5


def test_reference_matches_float64_oracle(rng):
    for case in CASES:
        p = make_problem(rng, **case)
        args = [None if a is None else jnp.asarray(a, jnp.float64)
                for a in (p.x, p.offset, p.weight, p.mask, p.bias)]
        got = reference.deform_conv2d(*args, **p.kwargs())
        assert rel_err(got, p.expected()) < 1e-12


def test_nchw_matches_nhwc(rng, device):
    p = make_problem(rng, c=6, groups=2, multiplier=2)
    x, offset, weight, mask, bias = p.args(np.float32, device)
    to_nchw = lambda a: jnp.transpose(a, (0, 3, 1, 2))  # noqa: E731
    y = ffi_conv(to_nchw(x), to_nchw(offset), weight, to_nchw(mask), bias,
                 data_format="NCHW", **p.kwargs())
    assert y.shape == (p.x.shape[0], 12) + p.expected().shape[1:3]
    assert rel_err(jnp.transpose(y, (0, 2, 3, 1)), p.expected()) < 1e-5


# With grad_x by the gather (deterministic here) and above 64 channels a
# group, the CUDA sample kernel reads 8 16-bit channels a load where float32
# reads 4, so its channel sums (grad_offset, grad_mask) and pixel sums
# (grad_weight) run in another order than the float32 kernel's. (grad_x: the
# gather sums each element in one order for every dtype.)
REORDERED = ("offset", "weight", "mask")


@pytest.mark.parametrize("case", [
    dict(c=8, groups=2, multiplier=2),  # the CUDA kernels' scalar paths
    dict(c=64, groups=2),  # their vector loads (8 bfloat16 a load) and the sample kernel
    # The sample kernel at 8 channels a load: 32 lanes with 24 busy; 16 lanes
    # a pixel (two pixels a warp) with 7x7 taps in chunks; three channel
    # slices, the last partial.
    dict(n=1, h=6, w=5, c=192, deterministic=True),
    dict(n=1, h=7, w=6, c=96, kernel=(7, 7), padding=3, deterministic=True),
    dict(n=1, h=5, w=4, c=640, deterministic=True),
], ids=["scalar", "vector", "sample8-idle-lanes", "sample8-16-lanes-7x7", "sample8-slices"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_is_the_float32_result_rounded(rng, device, dtype, case):
    # Inputs exactly representable in dtype: the kernel reads them, computes in
    # float32 and rounds once to nearest even. So its output is the float32
    # kernel's on the same values, rounded (not truncated), element by element,
    # and within the unit roundoff of the float64 oracle (plus float32 error).
    case = dict(case)
    deterministic = case.pop("deterministic", False)
    p = make_problem(rng, **case)
    p.round_to(dtype)
    y = run_forward(p, device, dtype)
    y32 = run_forward(p, device, np.float32)
    assert y.dtype == dtype
    assert rel_err(y32, p.expected()) < 1e-5
    assert_rounded_from(y, y32, dtype)
    assert rel_err(y, p.expected()) < unit_roundoff(dtype) + 1e-5
    # Gradients are computed in float32 and rounded to dtype the same way.
    cot = jnp.asarray(rng.standard_normal(p.expected().shape), dtype)

    def grads(dt):
        args = p.args(dt, device)
        c = jax.device_put(cot.astype(dt), device)
        conv = functools.partial(ffi_conv, deterministic=deterministic)
        return jax.vjp(lambda *a: conv(*a, **p.kwargs()), *args)[1](c)

    reordered = deterministic and p.x.shape[-1] // case.get("groups", 1) > 64
    for name, g, g32 in zip(["x", "offset", "weight", "mask", "bias"],
                            grads(dtype), grads(np.float32)):
        # Another order of float32 additions: off by ~1e-7 of the summands,
        # far below a 16-bit ulp, except where a sum cancels to near zero.
        atol = 1e-5 * float(np.max(np.abs(g32))) if reordered and name in REORDERED else 0.0
        assert_rounded_from(g, g32, dtype, what=f"grad_{name}", atol=atol)


def test_lowers_to_the_custom_call(rng):
    p = make_problem(rng)
    args = p.args()
    f = jax.jit(lambda *a: ffi_conv(*a, **p.kwargs()))
    text = f.lower(*args).as_text()
    assert "jax_deform_forward" in text
    grad_text = jax.jit(jax.grad(lambda *a: ffi_conv(*a, **p.kwargs()).sum())).lower(*args).as_text()
    assert "jax_deform_backward" in grad_text


def test_auto_uses_kernel_and_xla_does_not(rng):
    p = make_problem(rng)
    args = p.args()
    auto = jax.jit(lambda *a: jax_deform.deform_conv2d(*a, **p.kwargs())).lower(*args).as_text()
    xla = jax.jit(
        lambda *a: jax_deform.deform_conv2d(*a, implementation="xla", **p.kwargs())
    ).lower(*args).as_text()
    assert "jax_deform_forward" in auto
    assert "jax_deform_forward" not in xla
    np.testing.assert_allclose(
        jax.jit(lambda *a: jax_deform.deform_conv2d(*a, **p.kwargs()))(*args),
        jax_deform.deform_conv2d(*args, implementation="xla", **p.kwargs()),
        rtol=1e-4, atol=1e-4,
    )


def test_empty_batch(device):
    x = jax.device_put(jnp.zeros((0, 5, 5, 4), jnp.float32), device)
    offset = jnp.zeros((0, 5, 5, 18), jnp.float32)
    weight = jnp.ones((3, 3, 1, 8), jnp.float32)
    y = ffi_conv(x, offset, weight, None, None, padding=1)
    assert y.shape == (0, 5, 5, 8)
    g = jax.grad(lambda w: ffi_conv(x, offset, w, None, None, padding=1).sum())(weight)
    np.testing.assert_array_equal(g, 0)


# ------------------------------------------------------------------ gradients

GRAD_CASES = [
    dict(),
    dict(kernel=(3, 5), stride=2, padding=((1, 2), (0, 3)), c=6, groups=2, multiplier=2),
    dict(c=4, groups=4, dilation=2, padding=2, with_mask=False),
    dict(kernel=(1, 1), padding=0, with_bias=False),
    # The CUDA backward's paths by channel count (grad_x by atomics here: the
    # fast path takes the sorted gather only above 8 MiB of grad_x; the
    # deterministic test below runs these cases through the gather), channel
    # slices (C = 512 and 384: two vectors a lane, two slices), idle lanes (C = 96), sub-warps of 16 lanes
    # (C = 64), 7x7 in tap chunks.
    dict(n=1, h=6, w=5, c=512),
    dict(n=1, h=9, w=9, c=384, kernel=(7, 7), padding=3),
    dict(n=1, h=8, w=8, c=96, kernel=(7, 7), padding=3),
    dict(c=64, stride=2),
    # The sample kernel's lane counts (8, 16, 32 lanes a pixel), channel slices
    # of several offset groups, tap chunks (5x5: 9 + 9 + 7 taps), no mask.
    dict(c=32, groups=2, kernel=(5, 5), padding=2, with_mask=False),
    dict(n=1, h=6, w=7, c=128, groups=2, kernel=(5, 5), padding=2),
    dict(n=1, h=5, w=6, c=512, groups=2, stride=2, with_mask=False),
    # Two vectors a lane (C = 512) with taps in chunks (5x5).
    dict(n=1, h=5, w=5, c=512, kernel=(5, 5), padding=2),
    # Three vectors a lane (the fitted plan): 16 lanes x 3 for 144 channels,
    # the third round a quarter full.
    dict(n=1, h=6, w=5, c=144, kernel=(5, 5), padding=2),
    # A grid under one wave with 2^19 output elements (twice the least): the
    # sample kernel's 16 lanes in 8 slices where 32 x 2 would take 2
    # (MakeSamplePlan).
    dict(n=1, h=32, w=32, c=512),
]


def _loss(conv, p, cotangent):
    def f(x, offset, weight, mask, bias):
        return jnp.sum(conv(x, offset, weight, mask, bias, **p.kwargs()) * cotangent)

    return f


def _check_gradients(rng, device, case, conv):
    p = make_problem(rng, **case)
    cotangent = rng.standard_normal(p.expected().shape)
    args32 = p.args(np.float32, device)
    args64 = [None if a is None else jnp.asarray(a, jnp.float64)
              for a in (p.x, p.offset, p.weight, p.mask, p.bias)]
    argnums = tuple(i for i, a in enumerate(args32) if a is not None)
    want = jax.grad(_loss(reference.deform_conv2d, p, cotangent), argnums)(*args64)
    cot32 = jax.device_put(jnp.asarray(cotangent, jnp.float32), device)
    got = jax.jit(jax.grad(_loss(conv, p, cot32), argnums))(*args32)
    for name, g, w in zip(["x", "offset", "weight", "mask", "bias"], got, want):
        assert g.dtype == jnp.float32
        assert rel_err(g, w) < 1e-5, name


@pytest.mark.parametrize("case", GRAD_CASES, ids=[str(i) for i in range(len(GRAD_CASES))])
def test_gradients_match_reference_autodiff(rng, device, case):
    _check_gradients(rng, device, case, ffi_conv)


# On the GPU the deterministic backward always takes the sorted gather for
# grad_x (and the sample kernel without atomics): every variant of it (lanes
# 4-32, vectors a lane 1-2, 7x7 and 5x5 tap chunks, groups) against float64.
@pytest.mark.gpu
@pytest.mark.parametrize("case", GRAD_CASES, ids=[str(i) for i in range(len(GRAD_CASES))])
def test_deterministic_gradients_match_reference_autodiff(rng, case):
    _check_gradients(rng, device_of("gpu"), case, functools.partial(ffi_conv, deterministic=True))


# grad_x has two gathers (cuda_grad_x_gather.cu): the band gather for groups
# of 64 channels or more whose band grid fills the GPU, the run gather for
# the rest (so every case above, each too small to fill it, meets the run
# gather only). Each runs the cases below, forced by its tuning key in a
# fresh process: one lane and four lanes a group (cases 0, 2), several
# channel slices and two vectors a lane (5: 384 channels, 13: 512 on a 32x32
# image of many bands and segments, 10: two groups of 256), two groups of 64
# (9), one slice of 16 and 32 lanes (7, 6).
# (All fourteen cases a gather took the GPU tests past their time limit.)
EACH_GATHER_CASES = (0, 2, 5, 6, 7, 9, 10, 13)


def _gpu_tests_pass_with_tuning(tuning, tests):
    """Runs these tests of this file in a fresh process under the tuning key
    (read once a process) and asserts that every one ran and passed."""
    env = dict(os.environ, JAX_DEFORM_CUDA_TUNING=tuning)
    ids = [f"{__file__}::{t}" for t in tests]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *ids],
                         env=env, capture_output=True, text=True, check=False,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert f"{len(tests)} passed" in run.stdout, run.stdout[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("gather", ["band", "runs"])
def test_deterministic_gradients_with_each_gather(gather):
    _gpu_tests_pass_with_tuning(
        f"gather_kernel={gather}",
        [f"test_deterministic_gradients_match_reference_autodiff[{i}]" for i in EACH_GATHER_CASES])


# The sample kernel visits output pixels in bands of rows, column by column,
# for kernels of more than 9 taps or strides over 1, row by row otherwise
# (SampleBandBits). Each order runs the cases the default gives the other,
# forced by its tuning key in a fresh process: bands of 8 rows, whose last
# band is padded past the image at every height here (3 to 9 rows; 32 is
# whole), on the 3x3 cases and the rest; rows on the 7x7, 5x5 and stride-2
# cases.
SAMPLE_ORDER_CASES = {"sample_band_rows=8": (0, 4, 5, 7, 8, 10, 12, 13),
                      "sample_band_rows=1": (5, 6, 7, 9, 12)}


@pytest.mark.gpu
@pytest.mark.parametrize("tuning", sorted(SAMPLE_ORDER_CASES))
def test_gradients_in_each_sample_order(tuning):
    _gpu_tests_pass_with_tuning(
        tuning, [f"test_gradients_match_reference_autodiff[gpu-{i}]" for i in SAMPLE_ORDER_CASES[tuning]])


def test_backward_writes_every_output(rng, device):
    p = make_problem(rng, c=6, groups=3, multiplier=2)
    args = p.args(np.float32, device)
    cot = jax.device_put(jnp.asarray(rng.standard_normal(p.expected().shape), jnp.float32), device)
    grads = poisoned(
        lambda *a: jax.grad(_loss(ffi_conv, p, cot), (0, 1, 2, 3, 4))(*a),
        [(a.shape, jnp.float32) for a in args], *args,
    )
    for g in grads:
        assert not np.isnan(np.asarray(g)).any()


def test_check_grads_finite_differences(rng):
    # Offsets are kept off the integer lattice: bilinear sampling has kinks there.
    p = make_problem(rng, n=1, h=5, w=5, c=2, groups=2)
    p.offset = np.floor(p.offset) + rng.uniform(0.2, 0.8, p.offset.shape)
    p.offset = np.clip(p.offset, -3.5, 3.5)
    x, offset, weight, mask, bias = p.args(np.float32)

    def f(x, offset, weight, mask, bias):
        return ffi_conv(x, offset, weight, mask, bias, **p.kwargs())

    check_grads(f, (x, offset, weight, mask, bias), order=1, modes=["rev"],
                atol=5e-2, rtol=5e-2, eps=1e-2)


# ------------------------------------------------------------------ transforms

def test_jit_matches_eager(rng, device):
    p = make_problem(rng)
    args = p.args(np.float32, device)
    eager = ffi_conv(*args, **p.kwargs())
    jitted = jax.jit(lambda *a: ffi_conv(*a, **p.kwargs()))(*args)
    np.testing.assert_array_equal(eager, jitted)


VMAP_AXES = [
    (0, 0, None, 0, None),        # the usual: data batched, parameters shared
    (1, None, None, None, None),  # only x, along a non-leading axis
    (None, 2, None, None, None),  # only offset
    (0, 0, 0, 0, 0),              # everything, per-example weights and bias
    (None, None, 3, None, None),  # only weight, along its last axis
    (None, None, None, None, 0),  # only bias
    (0, None, None, 1, None),     # x and mask
]


def _stack_operands(problems, in_axes, device):
    """The five operands of `problems` stacked along in_axes (the first
    problem's operand, unstacked, where the axis is None)."""
    stacked = []
    for i, axis in enumerate(in_axes):
        parts = [pr.args(np.float32, device)[i] for pr in problems]
        stacked.append(parts[0] if axis is None else jnp.stack(parts, axis))
    return stacked


def _example(stacked, in_axes, j):
    """Example j of operands stacked by _stack_operands."""
    return [a if axis is None else jnp.take(a, j, axis) for a, axis in zip(stacked, in_axes)]


@pytest.mark.parametrize("in_axes", VMAP_AXES, ids=[str(a) for a in VMAP_AXES])
def test_vmap_matches_loop(rng, device, in_axes):
    b = 3
    problems = [make_problem(rng, c=4, groups=2, multiplier=2) for _ in range(b)]
    stacked = _stack_operands(problems, in_axes, device)
    kw = problems[0].kwargs()
    got = jax.vmap(lambda *a: ffi_conv(*a, **kw), in_axes=in_axes)(*stacked)
    for j in range(b):
        one = _example(stacked, in_axes, j)
        want = reference.deform_conv2d(*[jnp.asarray(a, jnp.float64) for a in one], **kw)
        assert rel_err(got[j], want) < 1e-5


def test_grad_of_vmap_and_vmap_of_grad(rng, device):
    b = 2
    problems = [make_problem(rng, c=4, groups=2) for _ in range(b)]
    xs = jnp.stack([pr.args(np.float32, device)[0] for pr in problems])
    offs = jnp.stack([pr.args(np.float32, device)[1] for pr in problems])
    _, _, weight, mask, bias = problems[0].args(np.float32, device)
    kw = problems[0].kwargs()

    def loss(conv, x, off, w):
        return jnp.sum(jnp.sin(conv(x, off, w, mask, bias, **kw)))

    ref64 = lambda *a: reference.deform_conv2d(*[None if v is None else jnp.asarray(v, jnp.float64) for v in a[:5]], **a[5])  # noqa: E731,E501

    def ref_conv(x, off, w, m, bb, **k):
        return ref64(x, off, w, m, bb, k)

    # grad of vmap: one weight gradient summed over the batch
    gv = jax.grad(lambda w: jnp.sum(jax.vmap(lambda x, o: loss(ffi_conv, x, o, w))(xs, offs)))(weight)
    gv_ref = jax.grad(lambda w: jnp.sum(jax.vmap(lambda x, o: loss(ref_conv, x, o, w))(xs, offs)))(
        jnp.asarray(weight, jnp.float64))
    assert rel_err(gv, gv_ref) < 1e-5
    # vmap of grad: per-example gradients for x, offset and weight
    per_ex = jax.vmap(jax.grad(lambda x, o, w: loss(ffi_conv, x, o, w), (0, 1, 2)),
                      in_axes=(0, 0, None))(xs, offs, weight)
    for j in range(b):
        want = jax.grad(lambda x, o, w: loss(ref_conv, x, o, w), (0, 1, 2))(
            *[jnp.asarray(a, jnp.float64) for a in (xs[j], offs[j], weight)])
        for g, w_ in zip(per_ex, want):
            assert rel_err(g[j], w_) < 1e-5


@pytest.mark.parametrize("in_axes", VMAP_AXES, ids=[str(a) for a in VMAP_AXES])
def test_vmap_of_grad_every_axis_pattern(rng, device, in_axes):
    # Per-example gradients of all five operands, for every in_axes pattern
    # (batched weight, mask and bias included): the backward's vmap rule.
    b = 3
    problems = [make_problem(rng, c=4, groups=2, multiplier=2) for _ in range(b)]
    stacked = _stack_operands(problems, in_axes, device)
    kw = problems[0].kwargs()

    def loss(conv, *a):
        return jnp.sum(jnp.sin(conv(*a, **kw)))

    per_example = jax.jit(jax.vmap(jax.grad(lambda *a: loss(ffi_conv, *a), (0, 1, 2, 3, 4)),
                                   in_axes=in_axes))(*stacked)
    for j in range(b):
        one = _example(stacked, in_axes, j)
        want = jax.grad(lambda *a: loss(reference.deform_conv2d, *a), (0, 1, 2, 3, 4))(
            *[jnp.asarray(a, jnp.float64) for a in one])
        for name, g, w in zip(["x", "offset", "weight", "mask", "bias"], per_example, want):
            assert g.shape[1:] == w.shape, name
            assert rel_err(g[j], w) < 1e-5, (name, j)


# ------------------------------------------------------------------ bad input
# Every message of jax_deform._params and jax_deform.api, met through the public
# function: each names the argument, what it got and what it wanted.

def _good():
    f32 = jnp.float32
    return dict(
        x=jnp.zeros((2, 6, 6, 4), f32), offset=jnp.zeros((2, 6, 6, 18), f32),
        weight=jnp.zeros((3, 3, 1, 4), f32), mask=jnp.zeros((2, 6, 6, 9), f32),
        bias=jnp.zeros((4,), f32),
    )


def _z(*shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


def _bad(id_, change, error, message):
    return pytest.param(change, error, message, id=id_)


# Each row: operands replacing the good ones (with padding=1), the error, and a
# regex of the parts of the message that matter.
BAD = [
    _bad("x not an array", dict(x=[[0.0]]), TypeError, r"x must be an array, got list"),
    _bad("offset None", dict(offset=None), TypeError, r"offset must be an array, got NoneType"),
    _bad("weight not an array", dict(weight=3.0), TypeError, r"weight must be an array, got float"),
    _bad("mask not an array", dict(mask=[1.0]), TypeError,
         r"mask must be an array or None, got list"),
    _bad("bias not an array", dict(bias=0.0), TypeError,
         r"bias must be an array or None, got float"),
    _bad("x integer", dict(x=_z(2, 6, 6, 4, dtype=jnp.int32)), TypeError,
         r"x must have a floating dtype \(float32, bfloat16, float16, float64\), got int32"),
    _bad("x complex", dict(x=_z(2, 6, 6, 4, dtype=jnp.complex64)), TypeError,
         r"x must have a floating dtype .*got complex64"),
    _bad("offset dtype", dict(offset=_z(2, 6, 6, 18, dtype=jnp.float16)), TypeError,
         r"offset has dtype float16 but x has dtype float32; they must match"),
    _bad("weight dtype", dict(weight=_z(3, 3, 1, 4, dtype=jnp.int32)), TypeError,
         r"weight has dtype int32 but x has dtype float32"),
    _bad("mask dtype", dict(mask=_z(2, 6, 6, 9, dtype=jnp.bfloat16)), TypeError,
         r"mask has dtype bfloat16 but x has dtype float32"),
    _bad("bias dtype", dict(bias=_z(4, dtype=jnp.float16)), TypeError,
         r"bias has dtype float16 but x has dtype float32"),
    _bad("x rank 3", dict(x=_z(6, 6, 4)), ValueError,
         r"x must be rank 4 \(N, H, W, C\), got shape \(6, 6, 4\)"),
    _bad("x no channels", dict(x=_z(2, 6, 6, 0)), ValueError,
         r"x has shape \(2, 6, 6, 0\) but expected \(N, H, W, C\) with C >= 1"),
    _bad("weight not depthwise", dict(weight=_z(3, 3, 4, 4)), ValueError,
         r"weight has shape \(3, 3, 4, 4\) but expected \(kh, kw, 1, C\*M\) with C = 4"),
    _bad("weight C*M", dict(weight=_z(3, 3, 1, 6)), ValueError,
         r"weight has shape \(3, 3, 1, 6\) but expected \(kh, kw, 1, C\*M\) with C = 4"),
    _bad("weight rank 3", dict(weight=_z(3, 3, 4)), ValueError,
         r"weight has shape \(3, 3, 4\) but expected \(kh, kw, 1, C\*M\)"),
    _bad("weight torch OIHW", dict(weight=_z(4, 1, 3, 3)), ValueError,
         r"weight has shape \(4, 1, 3, 3\) but expected \(kh, kw, 1, C\*M\)"),
    _bad("weight empty kernel", dict(weight=_z(0, 3, 1, 4)), ValueError,
         r"weight has shape \(0, 3, 1, 4\) but expected \(kh, kw, 1, C\*M\) with kh, kw >= 1"),
    _bad("offset rank 3", dict(offset=_z(6, 6, 18)), ValueError,
         r"offset must be rank 4 \(N, Ho, Wo, 2\*G\*kh\*kw\), got shape \(6, 6, 18\); "
         r"expected \(2, 6, 6, 18\)"),
    _bad("offset channels", dict(offset=_z(2, 6, 6, 17)), ValueError,
         r"offset has shape \(2, 6, 6, 17\) but expected \(N, Ho, Wo, 2\*G\*kh\*kw\): "
         r".*multiple of 18 \(kernel 3x3\)"),
    _bad("offset no channels", dict(offset=_z(2, 6, 6, 0)), ValueError,
         r"offset has shape \(2, 6, 6, 0\) .*multiple of 18"),
    _bad("offset spatial", dict(offset=_z(2, 5, 6, 18)), ValueError,
         r"offset has shape \(2, 5, 6, 18\) but expected \(2, 6, 6, 18\) = "
         r"\(N, Ho, Wo, 2\*G\*kh\*kw\) with G = 1"),
    _bad("offset batch", dict(offset=_z(1, 6, 6, 18)), ValueError,
         r"offset has shape \(1, 6, 6, 18\) but expected \(2, 6, 6, 18\)"),
    _bad("groups do not divide C", dict(offset=_z(2, 6, 6, 54)), ValueError,
         r"offset has shape \(2, 6, 6, 54\), i.e. G = 3 offset groups, "
         r"but the C = 4 channels of x are not divisible by G"),
    _bad("mask groups", dict(mask=_z(2, 6, 6, 18)), ValueError,
         r"mask has shape \(2, 6, 6, 18\) but expected \(2, 6, 6, 9\) = "
         r"\(N, Ho, Wo, G\*kh\*kw\) with G = 1 \(from offset\)"),
    _bad("mask groups of offset", dict(offset=_z(2, 6, 6, 36)), ValueError,
         r"mask has shape \(2, 6, 6, 9\) but expected \(2, 6, 6, 18\) = .* with G = 2"),
    _bad("mask rank 3", dict(mask=_z(6, 6, 9)), ValueError,
         r"mask has shape \(6, 6, 9\) but expected \(2, 6, 6, 9\)"),
    _bad("bias length", dict(bias=_z(5)), ValueError,
         r"bias has shape \(5,\) but expected \(4,\) = \(C\*M,\)"),
    _bad("bias rank 2", dict(bias=_z(1, 4)), ValueError,
         r"bias has shape \(1, 4\) but expected \(4,\)"),
]


def _call(a, **kwargs):
    return jax_deform.deform_conv2d(a["x"], a["offset"], a["weight"], a["mask"], a["bias"],
                                    **kwargs)


@pytest.fixture
def no_kernel_runs(monkeypatch):
    """Makes reaching either implementation a test failure: bad input must be
    rejected before anything is traced into a kernel or the pure-jnp path."""
    from jax_deform import api

    def reached(*args, **kwargs):
        raise AssertionError("bad input reached an implementation")

    monkeypatch.setattr(api, "deform_conv2d_ffi", reached)
    monkeypatch.setattr(reference, "deform_conv2d_nhwc", reached)


@pytest.mark.parametrize("change,error,message", BAD)
def test_bad_arrays_are_named(no_kernel_runs, change, error, message):
    a = _good()
    a.update(change)
    with pytest.raises(error, match=message):
        _call(a, padding=1)


SHAPE_ERRORS = [p for p in BAD if p.values[1] is ValueError]


@pytest.mark.parametrize("change,error,message", SHAPE_ERRORS)
def test_bad_shapes_are_named_under_jit(change, error, message):
    # The checks read static shapes, so tracing raises the same error.
    a = _good()
    a.update(change)
    f = jax.jit(lambda x, offset, weight, mask, bias: jax_deform.deform_conv2d(
        x, offset, weight, mask, bias, padding=1))
    with pytest.raises(error, match=message):
        f(a["x"], a["offset"], a["weight"], a["mask"], a["bias"])


@pytest.mark.parametrize("change,message", [
    (dict(x=_z(2, 4, 6)), r"x must be rank 4 \(N, C, H, W\), got shape \(2, 4, 6\)"),
    # An NHWC x read as NCHW: the message says which C it read, and from where.
    (dict(x=_z(2, 6, 6, 4)),
     r"weight has shape \(3, 3, 1, 4\) but expected \(kh, kw, 1, C\*M\) with C = 6, "
     r"the channels of x \(N, C, H, W\)"),
    (dict(offset=_z(2, 17, 6, 6)),
     r"offset has shape \(2, 17, 6, 6\) but expected \(N, 2\*G\*kh\*kw, Ho, Wo\)"),
    (dict(offset=_z(2, 6, 6, 18)),
     r"offset has shape \(2, 6, 6, 18\) but expected \(N, 2\*G\*kh\*kw, Ho, Wo\)"),
    (dict(mask=_z(2, 6, 6, 9)),
     r"mask has shape \(2, 6, 6, 9\) but expected \(2, 9, 6, 6\) = \(N, G\*kh\*kw, Ho, Wo\)"),
])
def test_nchw_messages_use_nchw_letters(no_kernel_runs, change, message):
    a = dict(x=_z(2, 4, 6, 6), offset=_z(2, 18, 6, 6), weight=_z(3, 3, 1, 4),
             mask=_z(2, 9, 6, 6), bias=_z(4))
    a.update(change)
    with pytest.raises(ValueError, match=message):
        _call(a, padding=1, data_format="NCHW")


PADDING_FORMS = (r"padding must be 'SAME', 'VALID', an int, \(ph, pw\) or "
                 r"\(\(top, bottom\), \(left, right\)\)")


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(stride=0), ValueError, r"stride must be >= 1, got 0"),
    (dict(stride=(2, -1)), ValueError, r"stride must be >= 1, got \(2, -1\)"),
    (dict(stride=1.5), TypeError, r"stride must be an int or a pair of ints, got 1.5"),
    (dict(stride=True), TypeError, r"stride must be an int or a pair of ints, got True"),
    (dict(stride=(1, 1, 1)), TypeError,
     r"stride must be an int or a pair of ints, got \(1, 1, 1\)"),
    (dict(stride=jnp.asarray(2)), TypeError,
     r"stride must be an int or a pair of ints, got Array\(2.*must be static"),
    (dict(dilation=(1, 0)), ValueError, r"dilation must be >= 1, got \(1, 0\)"),
    (dict(dilation=2.0), TypeError, r"dilation must be an int or a pair of ints, got 2.0"),
    (dict(padding=-1), ValueError, r"padding must be >= 0, got -1"),
    (dict(padding=(1, -1)), ValueError, r"padding must be >= 0, got \(1, -1\)"),
    (dict(padding=((1, 1), (0, -2))), ValueError,
     r"padding must be >= 0, got \(\(1, 1\), \(0, -2\)\)"),
    (dict(padding="FULL"), ValueError, PADDING_FORMS + r", got 'FULL'"),
    (dict(padding=1.0), TypeError, PADDING_FORMS + r", got 1.0"),
    (dict(padding=True), TypeError, PADDING_FORMS + r", got True"),
    (dict(padding=None), TypeError, PADDING_FORMS + r", got None"),
    (dict(padding=(1, 1, 1)), TypeError, PADDING_FORMS + r", got \(1, 1, 1\)"),
    (dict(padding=((1, 1.0), (1, 1))), TypeError,
     PADDING_FORMS + r", got \(\(1, 1.0\), \(1, 1\)\)"),
    (dict(data_format="NCWH"), ValueError, r"data_format must be 'NHWC' or 'NCHW', got 'NCWH'"),
    (dict(data_format=None), ValueError, r"data_format must be 'NHWC' or 'NCHW', got None"),
    (dict(implementation="cuda"), ValueError,
     r"implementation must be one of None, 'auto', 'ffi', 'xla'; got 'cuda'"),
    (dict(implementation=["ffi"]), ValueError, r"implementation must be one of .*got \['ffi'\]"),
    (dict(deterministic="no"), TypeError, r"deterministic must be True, False or None, got 'no'"),
])
def test_bad_options_are_named(no_kernel_runs, kwargs, error, message):
    kwargs.setdefault("padding", 1)
    with pytest.raises(error, match=message):
        _call(_good(), **kwargs)


def test_traced_stride_under_jit_is_named():
    a = _good()
    f = jax.jit(lambda x, offset, weight, s: jax_deform.deform_conv2d(
        x, offset, weight, stride=s, padding=1))
    with pytest.raises(TypeError, match=r"stride must be an int .*must be static"):
        f(a["x"], a["offset"], a["weight"], 1)


@pytest.mark.parametrize("x_shape,weight_shape,padding,message", [
    ((1, 2, 2, 4), (5, 5, 1, 4), 0,
     r"output would be empty: x spatial size \(2, 2\) with kernel \(5, 5\), dilation \(1, 1\), "
     r"padding \(\(0, 0\), \(0, 0\)\) and stride \(1, 1\) gives an output of \(-2, -2\)"),
    ((1, 0, 3, 4), (1, 1, 1, 4), 0, r"output would be empty: x spatial size \(0, 3\).*\(0, 3\)"),
])
def test_empty_output_is_an_error(no_kernel_runs, x_shape, weight_shape, padding, message):
    with pytest.raises(ValueError, match=message):
        jax_deform.deform_conv2d(_z(*x_shape), _z(1, 1, 1, 50), _z(*weight_shape),
                                 padding=padding)


def test_float64_runs_on_the_kernel_and_stays_float64():
    a = {k: v.astype(jnp.float64) for k, v in _good().items()}
    y = jax_deform.deform_conv2d(a["x"], a["offset"], a["weight"], implementation="ffi", padding=1)
    assert y.dtype == jnp.float64


def test_ffi_insists_on_a_compiled_kernel_for_the_platform():
    # No platform is built for TPU: lowering for it (an export needs no TPU)
    # takes the pure-jnp computation, unless the caller insisted on the kernel.
    from jax import export

    a = _good()

    def exported(implementation):
        def loss(x, offset, weight):
            return jax_deform.deform_conv2d(x, offset, weight, padding=1,
                                            implementation=implementation).sum()
        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        return export.export(f, platforms=["tpu"])(a["x"], a["offset"], a["weight"])

    assert "jax_deform_forward" not in exported(None).mlir_module()
    with pytest.raises(ValueError, match=r"implementation='ffi' but jax_deform has no compiled "
                                         r"kernel for tpu \(built for: .*cpu"):
        exported("ffi")


def test_ffi_without_the_extension_is_named(monkeypatch):
    from jax_deform import api

    monkeypatch.setattr(api, "KERNEL_PLATFORMS", frozenset())
    a = _good()
    with pytest.raises(ValueError, match=r"implementation='ffi' but the jax_deform extension "
                                         r"is not built; use implementation=None or 'xla'"):
        _call(a, padding=1, implementation="ffi")
    assert _call(a, padding=1).shape == (2, 6, 6, 4)  # auto falls back to the jnp path
