"""Hostile inputs: NaN/inf/huge offsets, NaN/inf data, random problems from
hypothesis, concurrency and repeated calls. On the CPU and (gpu marker) CUDA."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, reject, settings
from hypothesis import strategies as st

import jax_deform
from jax_deform import reference
from tests.helpers import (
    DEVICES,
    assert_rounded_from,
    device_of,
    make_problem,
    rel_err,
    unit_roundoff,
)



@pytest.fixture(params=DEVICES)
def device(request):
    return device_of(request.param)


def _ffi(*args, **kw):
    return jax_deform.deform_conv2d(*args, implementation="ffi", **kw)


def _ref64(p, offset=None, x=None):
    args = [p.x if x is None else x, p.offset if offset is None else offset, p.weight, p.mask, p.bias]
    return reference.deform_conv2d(*[jnp.asarray(a, jnp.float64) for a in args], **p.kwargs())


def _assert_same_nans_and_close(got, want, tol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    if finite.any():  # (a NaN offset in every group makes grad_weight all NaN, rightly)
        assert rel_err(got[finite], want[finite]) < tol


@pytest.mark.parametrize("value", [np.inf, -np.inf, 1e30, -1e30, 3e9, np.nan])
def test_extreme_offsets(rng, device, value):
    p = make_problem(rng, c=8, groups=2)
    hostile = p.offset.copy()
    hit = rng.random(hostile.shape) < 0.2
    hostile[hit] = value
    x, _, weight, mask, bias = p.args(np.float32, device)
    y = _ffi(x, jax.device_put(jnp.asarray(hostile, jnp.float32), device), weight, mask, bias,
             **p.kwargs())
    want = _ref64(p, offset=hostile)
    if np.isnan(value):
        assert np.isnan(np.asarray(y)).any()  # the divergence is visible...
    _assert_same_nans_and_close(y, want)      # ...exactly where the oracle has it


NAMES = ("x", "offset", "weight", "mask", "bias")


def _assert_same_nonfinite_and_close(got, want, name, tol=1e-5):
    """Same NaNs, same +inf and -inf, and the finite elements each within
    tol of the largest finite one."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    for kind in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(kind(got), kind(want), err_msg=f"grad_{name} {kind.__name__}")
    finite = np.isfinite(want)
    if finite.any():
        scale = max(np.abs(want[finite]).max(), 1e-30)
        assert np.abs(got[finite] - want[finite]).max() <= tol * scale, f"grad_{name}"


def _all_grads(p, args, cot):
    """Kernel (float32) and float64 reference gradients of sum(y * cot) for
    every operand present."""
    argnums = tuple(i for i, a in enumerate(args) if a is not None)

    def loss(conv, *a):
        return jnp.sum(conv(*a, **p.kwargs()) * cot)

    got = jax.grad(lambda *a: loss(_ffi, *a), argnums)(*args)
    want = jax.grad(lambda *a: loss(reference.deform_conv2d, *a), argnums)(
        *[None if a is None else jnp.asarray(np.asarray(a, np.float64)) for a in args])
    return {NAMES[i]: (np.asarray(g, np.float64), np.asarray(w)) for i, g, w in
            zip(argnums, got, want)}


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan, 1e30])
def test_extreme_offsets_backward(rng, device, value):
    p = make_problem(rng, c=8, groups=2, multiplier=2)
    hostile = p.offset.copy()
    hostile[rng.random(hostile.shape) < 0.2] = value
    p.offset = hostile
    args = p.args(np.float32, device)
    cot = rng.standard_normal(p.expected().shape)
    grads = _all_grads(p, args, cot)
    for name in ("x", "weight", "mask", "bias"):
        _assert_same_nonfinite_and_close(*grads[name], name)
    g_off, want_off = grads["offset"]
    if np.isnan(value):
        # NaN sample positions give NaN offset gradients there (and only there);
        # the jnp reference's autodiff has none (its where() guards them).
        nan_taps = np.isnan(hostile).reshape(hostile.shape[:-1] + (-1, 2)).any(-1)
        np.testing.assert_array_equal(
            np.isnan(g_off).reshape(nan_taps.shape + (2,)),
            np.broadcast_to(nan_taps[..., None], nan_taps.shape + (2,)))
        np.testing.assert_array_equal(np.isinf(g_off), False)
        g_off = np.where(np.isnan(g_off), 0.0, g_off)
    _assert_same_nonfinite_and_close(g_off, want_off, "offset")


@pytest.mark.parametrize("stride,padding", [
    ((2**32, 1), ((2**32, 0), (1, 1))),  # row 0 samples at -2**32: 0 in 32-bit arithmetic
    ((2**30, 1), ((0, 2**32), (1, 1))),  # row 4 samples at 2**32: 0 in 32-bit arithmetic
    ((1, 2**32), ((1, 1), (2**32, 0))),  # column 0 samples at -2**32: 0 in 32-bit arithmetic
])
def test_positions_beyond_32_bits(rng, device, stride, padding):
    # Absurd strides and paddings put sample positions beyond 32-bit integers;
    # only zero padding is sampled there, whatever the kernel's arithmetic.
    p = make_problem(rng, n=2, h=3, w=5, c=8, stride=stride, padding=padding)
    args = p.args(np.float32, device)
    assert rel_err(_ffi(*args, **p.kwargs()), p.expected()) < 1e-5
    cot = rng.standard_normal(p.expected().shape)
    for name, (got, want) in _all_grads(p, args, cot).items():
        _assert_same_nonfinite_and_close(got, want, name)


def _poisoned_taps(p):
    """(N, Ho, Wo, G, K): taps whose own mask value, or whose weight for some
    output channel of the group, is not finite."""
    n, ho, wo, _ = p.offset.shape
    kh, kw, _, cm = p.weight.shape
    groups = p.offset.shape[-1] // (2 * kh * kw)
    bad_weight = ~np.isfinite(p.weight.reshape(kh * kw, groups, cm // groups)).all(-1)
    taps = np.broadcast_to(bad_weight.T, (n, ho, wo, groups, kh * kw))
    if p.mask is not None:
        taps = taps | ~np.isfinite(p.mask.reshape(n, ho, wo, groups, kh * kw))
    return taps


@pytest.mark.parametrize("operand", ["x", "mask", "weight"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
# M = 2 runs CUDA's tile kernel, M = 1 (4 channels a group) its sample kernel.
@pytest.mark.parametrize("multiplier", [2, 1])
def test_nonfinite_operands_backward(rng, device, operand, value, multiplier):
    # NaN/inf in x, mask or weight: every gradient has the NaNs, infs and
    # finite values IEEE arithmetic gives the float64 reference's autodiff...
    p = make_problem(rng, c=8, groups=2, multiplier=multiplier)
    cot = rng.standard_normal(p.expected().shape)
    a = getattr(p, operand).copy()
    a.reshape(-1)[rng.choice(a.size, max(2, a.size // 50), replace=False)] = value
    setattr(p, operand, a)
    args = p.args(np.float32, device)
    grads = _all_grads(p, args, cot)
    for name in ("x", "weight", "mask", "bias"):
        _assert_same_nonfinite_and_close(*grads[name], name)
    # ...except grad_offset at taps multiplied by a bad mask or weight value:
    # the kernel's d/d(offset) = mask * sum_c gcol_c * dval_c is NaN/inf there
    # even when the sample reads nothing (NaN * 0), where the reference's
    # where() gives 0, and inf, not the reference's NaN, at partly outside ones.
    g_off, want_off = grads["offset"]
    taps = np.repeat(_poisoned_taps(p).reshape(g_off.shape[:-1] + (-1,)), 2, axis=-1)
    assert taps.any() == (operand != "x")
    np.testing.assert_array_equal(~np.isfinite(g_off), ~np.isfinite(want_off) | taps)
    _assert_same_nonfinite_and_close(np.where(taps, 0.0, g_off), np.where(taps, 0.0, want_off),
                                     "offset")


@pytest.mark.parametrize("value", [np.inf, np.nan])
def test_nonfinite_data_propagates_like_ieee(rng, device, value):
    p = make_problem(rng, c=4)
    x = p.x.copy()
    x[0, 3, 4, 1] = value
    args = list(p.args(np.float32, device))
    args[0] = jax.device_put(jnp.asarray(x, jnp.float32), device)
    y = np.asarray(_ffi(*args, **p.kwargs()))
    want = np.asarray(_ref64(p, x=x))
    # inf and NaN both mark "touched the bad pixel"; compare that pattern and the rest.
    _assert_same_nans_and_close(np.where(np.isinf(y), np.nan, y),
                                np.where(np.isinf(want), np.nan, want))
    # only channel 1 (and only outputs whose samples read that pixel) can change
    assert np.isfinite(np.asarray(y)[..., [0, 2, 3]]).all()


# Whole-array relative tolerances of float32 against the float64 oracle. Half
# precision adds the unit roundoff of its one final rounding (the oracle sees
# the same rounded inputs) and, element by element, must be the float32
# kernel's result rounded to nearest even (helpers.assert_rounded_from).
_F32_TOL = (1e-5, 1e-4)  # forward, gradients
_PROPERTY_DTYPES = ["float32", "bfloat16", "float16"]


def _tolerances(dtype):
    extra = 0.0 if dtype == "float32" else unit_roundoff(dtype)
    return tuple(t + extra for t in _F32_TOL)


@settings(deadline=None)  # example count: the profile (tests/conftest.py)
@given(
    n=st.integers(1, 2), h=st.integers(1, 9), w=st.integers(1, 9),
    groups=st.sampled_from([1, 2, 3]), cg=st.integers(1, 4), multiplier=st.integers(1, 3),
    kh=st.integers(1, 4), kw=st.integers(1, 4), stride=st.integers(1, 3),
    dilation=st.integers(1, 2), pad=st.integers(0, 3), with_mask=st.booleans(),
    with_bias=st.booleans(), offsets=st.sampled_from(["random", "integer", "half"]),
    dtype=st.sampled_from(_PROPERTY_DTYPES), nchw=st.booleans(), deterministic=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_problems_match_the_oracle(n, h, w, groups, cg, multiplier, kh, kw, stride,
                                          dilation, pad, with_mask, with_bias, offsets, dtype,
                                          nchw, deterministic, seed):
    if (h + 2 * pad - dilation * (kh - 1) - 1) < 0 or (w + 2 * pad - dilation * (kw - 1) - 1) < 0:
        reject()  # empty output: covered by the error tests
    rng = np.random.default_rng(seed)
    p = make_problem(rng, n=n, h=h, w=w, c=groups * cg, kernel=(kh, kw), stride=stride,
                     padding=pad, dilation=dilation, groups=groups, multiplier=multiplier,
                     with_mask=with_mask, with_bias=with_bias, offsets=offsets)
    forward_tol, grad_tol = _tolerances(dtype)
    p.round_to(dtype)
    args = p.args(dtype)
    want_y = p.expected()
    cot = np.asarray(jnp.asarray(rng.standard_normal(want_y.shape), dtype), np.float64)
    to_nchw = (lambda a: jnp.transpose(a, (0, 3, 1, 2))) if nchw else (lambda a: a)
    from_nchw = (lambda a: jnp.transpose(a, (0, 2, 3, 1))) if nchw else (lambda a: a)

    def ours(x, offset, weight, mask, bias):
        y = _ffi(to_nchw(x), to_nchw(offset), weight, None if mask is None else to_nchw(mask),
                 bias, data_format="NCHW" if nchw else "NHWC", deterministic=deterministic,
                 **p.kwargs())
        return from_nchw(y)

    y = jax.jit(ours)(*args)  # one compilation per example, not one per op
    assert y.dtype == dtype
    assert rel_err(y, want_y) < forward_tol
    argnums = tuple(i for i, a in enumerate(args) if a is not None)
    grad_fn = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a).astype(jnp.float64) * cot), argnums))
    got = grad_fn(*args)
    want = jax.jit(jax.grad(lambda *a: jnp.sum(reference.deform_conv2d(*a, **p.kwargs()) * cot),
                            argnums))(*p.args(np.float64))
    for i, g, wnt in zip(argnums, got, want):
        name = ("x", "offset", "weight", "mask", "bias")[i]
        assert g.dtype == dtype, name
        assert rel_err(g, wnt) < grad_tol, name
    if dtype != "float32":  # the same values through the float32 kernels, then rounded
        args32 = p.args(np.float32)
        assert_rounded_from(y, jax.jit(ours)(*args32), dtype)
        for i, g, g32 in zip(argnums, got, grad_fn(*args32)):
            assert_rounded_from(g, g32, dtype, what=("x", "offset", "weight", "mask", "bias")[i])


def test_calls_from_many_threads(rng, device):
    problems = [make_problem(rng, c=8, groups=2) for _ in range(8)]
    f = jax.jit(lambda *a: _ffi(*a, **problems[0].kwargs()))
    results = [None] * len(problems)

    def work(i):
        for _ in range(5):
            results[i] = np.asarray(f(*problems[i].args(np.float32, device)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(problems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p, y in zip(problems, results):
        assert rel_err(y, p.expected()) < 1e-5


def test_jit_with_donation(rng, device):
    p = make_problem(rng, c=8)
    args = p.args(np.float32, device)
    f = jax.jit(lambda x, *rest: _ffi(x, *rest, **p.kwargs()), donate_argnums=0)
    assert rel_err(f(*args), p.expected()) < 1e-5


@pytest.mark.gpu
def test_repeated_calls_do_not_leak_device_memory(rng):
    device = device_of("gpu")
    p = make_problem(rng, n=2, h=16, w=16, c=32)
    args = p.args(np.float32, device)
    step = jax.jit(jax.grad(lambda *a: jnp.sum(_ffi(*a, **p.kwargs())), argnums=(0, 1, 2, 3, 4)))
    jax.block_until_ready(step(*args))
    before = device.memory_stats()["bytes_in_use"]
    for _ in range(1000):
        out = step(*args)
    jax.block_until_ready(out)
    del out
    assert device.memory_stats()["bytes_in_use"] <= before + (1 << 20)


@pytest.mark.gpu
def test_more_than_2_to_the_31_elements():
    # bf16 x and y of 2.16e9 elements each. Integer offsets make every sample an
    # exact pixel, so outputs can be checked directly at scattered positions.
    device = device_of("gpu")
    n, h, w, c = 2, 1024, 1024, 1032
    assert n * h * w * c > 2**31
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (n, h, w, c), jnp.bfloat16)
    shift = jax.random.randint(jax.random.PRNGKey(1), (n, h, w, 18), -1, 2).astype(jnp.bfloat16)
    weight = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 1, c), jnp.bfloat16)
    x, shift, weight = (jax.device_put(a, device) for a in (x, shift, weight))
    y = _ffi(x, shift, weight, padding=1)
    assert y.shape == (n, h, w, c)
    rng = np.random.default_rng(0)
    points = [(n - 1, h - 1, w - 1), (n - 1, h - 2, 5), (1, 700, 1000)] + [
        tuple(int(v) for v in rng.integers(0, (n, h, w))) for _ in range(5)]
    wk = np.asarray(weight, np.float64).reshape(9, c)
    for b, oy, ox in points:
        s = np.asarray(shift[b, oy, ox], np.float64).reshape(9, 2)
        want = np.zeros(c)
        for k in range(9):
            yy, xx = oy - 1 + k // 3 + int(s[k, 0]), ox - 1 + k % 3 + int(s[k, 1])
            if 0 <= yy < h and 0 <= xx < w:
                want += wk[k] * np.asarray(x[b, yy, xx], np.float64)
        got = np.asarray(y[b, oy, ox], np.float64)
        assert np.abs(got - want).max() < 0.05 * (np.abs(want).max() + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_more_than_2_to_the_31_elements_backward(deterministic):
    # The cotangent is nonzero on a few whole output rows, the last ones among
    # them (flat indices past 2^31). With offsets within a pixel, row oy only
    # touches input rows oy-2..oy+2, so each row's gradients equal those of the
    # float64 reference run on a 7-row crop around it; every other gradient
    # element must be exactly zero.
    device = device_of("gpu")
    n, h, w, c = 2, 1024, 1024, 1032
    assert n * h * w * c > 2**31
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    with jax.default_device(device):
        x = jax.random.normal(keys[0], (n, h, w, c), jnp.bfloat16)
        offset = (jax.random.randint(keys[1], (n, h, w, 18), -2, 3) / 2).astype(jnp.bfloat16)
        mask = jax.random.uniform(keys[2], (n, h, w, 9), jnp.bfloat16)
        weight = jax.random.normal(keys[3], (3, 3, 1, c), jnp.bfloat16)
        bias = jnp.zeros((c,), jnp.bfloat16)
        rows = [(0, 0), (1, 1), (1, 700), (1, h - 1)]
        rng = np.random.default_rng(0)
        row_cots = [jnp.asarray(rng.standard_normal((w, c)), jnp.bfloat16) for _ in rows]
        cot = jnp.zeros((n, h, w, c), jnp.bfloat16)
        for (b, oy), row in zip(rows, row_cots):
            cot = cot.at[b, oy].set(row)

        def conv(*a):
            return _ffi(*a, padding=1, deterministic=deterministic)

        grads = jax.jit(lambda a, g: jax.vjp(conv, *a)[1](g))((x, offset, weight, mask, bias), cot)
        gx, goff, gw, gm, gb = grads
        del cot

        want_gw = np.zeros((3, 3, 1, c))
        want_gb = np.zeros(c)
        windows = []
        for (b, oy), row in zip(rows, row_cots):
            r0, r1 = max(0, oy - 3), min(h, oy + 4)
            windows.append((b, r0, r1, oy))
            crop = [jnp.asarray(a[b:b + 1, r0:r1], jnp.float64) for a in (x, offset, mask)]
            crop_cot = jnp.zeros((1, r1 - r0, w, c), jnp.float64).at[0, oy - r0].set(
                jnp.asarray(row, jnp.float64))
            _, vjp = jax.vjp(
                lambda xx, oo, ww, mm: reference.deform_conv2d(xx, oo, ww, mm, padding=1),
                crop[0], crop[1], jnp.asarray(weight, jnp.float64), crop[2])
            r_gx, r_goff, r_gw, r_gm = (np.asarray(g) for g in vjp(crop_cot))
            assert rel_err(gx[b, r0:r1], r_gx[0]) < 2e-2
            assert rel_err(goff[b, oy], r_goff[0, oy - r0]) < 2e-2
            assert rel_err(gm[b, oy], r_gm[0, oy - r0]) < 2e-2
            want_gw += r_gw
            want_gb += np.asarray(row, np.float64).sum(0)
        assert rel_err(gw, want_gw) < 2e-2
        assert rel_err(gb, want_gb) < 2e-2
        for b, r0, r1, oy in windows:  # everything outside the windows is exactly zero
            gx = gx.at[b, r0:r1].set(0)
            goff = goff.at[b, oy].set(0)
            gm = gm.at[b, oy].set(0)
        assert float(jnp.abs(gx).max()) == 0.0
        assert float(jnp.abs(goff).max()) == 0.0
        assert float(jnp.abs(gm).max()) == 0.0


_CAPTURE_SCRIPT = """
import sys, numpy as np, jax, jax.numpy as jnp
import jax_deform
d = np.load(sys.argv[1])
def loss(x, o, w, m, b):
    return jnp.sum(jax_deform.deform_conv2d(x, o, w, m, b, padding=1, implementation="ffi",
                                            deterministic=True) * d["cot"])
f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
args = [jnp.asarray(d[k], jnp.float32) for k in ("x", "o", "w", "m", "b")]
for _ in range(3):  # replays of the captured graph
    value, grads = f(*args)
np.savez(sys.argv[2], value=value, *[np.asarray(g) for g in grads])
"""


@pytest.mark.gpu
@pytest.mark.parametrize("flags", ["--xla_gpu_enable_command_buffer=", (
    "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1")])
def test_correct_inside_xla_command_buffers(rng, tmp_path, flags):
    import os
    import subprocess
    import sys

    p = make_problem(rng, n=2, h=12, w=12, c=16, groups=2)
    cot = rng.standard_normal(p.expected().shape)
    np.savez(tmp_path / "in.npz", x=p.x, o=p.offset, w=p.weight, m=p.mask, b=p.bias, cot=cot)
    env = dict(os.environ, XLA_FLAGS=flags)
    subprocess.run([sys.executable, "-c", _CAPTURE_SCRIPT, str(tmp_path / "in.npz"),
                    str(tmp_path / "out.npz")], check=True, env=env, timeout=300)
    out = np.load(tmp_path / "out.npz")
    args = [jnp.asarray(np.asarray(a, np.float64)) for a in (p.x, p.offset, p.weight, p.mask, p.bias)]
    want = jax.grad(lambda *a: jnp.sum(reference.deform_conv2d(*a, padding=1) * cot),
                    argnums=(0, 1, 2, 3, 4))(*args)
    for i, w in enumerate(want):
        assert rel_err(out[f"arr_{i}"], w) < 1e-5
