"""Forward mode and second order on the kernel path (implementation="ffi").

* jvp, linearize and jacfwd against the jvp of the pure-jnp reference, for
  each operand's tangent, in float64 (1e-9) and float32 (1e-5).
* grad of grad and Hessian-vector products for every pair of operands against
  the reference differentiated twice; an R1 gradient penalty.
* jax.grad still compiles to one forward and one backward kernel call.
* vmap of jvp, jvp on a mesh of 8 CPU devices and inside shard_map.

Offsets sit at least 0.1 px from the integer lattice (tests/test_gradients.py
says why): derivatives are then those of one smooth piece on both sides.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_deform
from jax_deform import bench, reference
from jax_deform._ffi import BACKWARD_TARGET, FORWARD_TARGET, TANGENT_PLATFORMS, TANGENT_TARGET
from tests.helpers import make_problem, rel_err
from tests.sharding_checks import callback_sees_mesh
from tests.test_sharding import kernel_x_shapes

NAMES = ("x", "offset", "weight", "mask", "bias")
TOL = {jnp.float64: 1e-9, jnp.float32: 1e-5}


def _problem(rng, **kwargs):
    p = make_problem(rng, **{"n": 2, "h": 5, "w": 6, "c": 4, "groups": 2, "multiplier": 2,
                             **kwargs})
    p.offset = np.floor(p.offset) + np.clip(p.offset - np.floor(p.offset), 0.1, 0.9)
    return p


def _convs(p):
    """(kernel, reference) as functions of (x, offset, weight, mask, bias)."""
    kw = p.kwargs()
    ffi = functools.partial(jax_deform.deform_conv2d, implementation="ffi", **kw)
    ref = functools.partial(reference.deform_conv2d, **kw)
    return ffi, ref


def _tangents(rng, args, dtype):
    return tuple(None if a is None else jnp.asarray(rng.standard_normal(a.shape), dtype)
                 for a in args)


def _only(args, tangents, i):
    """The tangents with all but operand i's zero."""
    return tuple(None if a is None else (t if j == i else jnp.zeros_like(a))
                 for j, (a, t) in enumerate(zip(args, tangents)))


def _present(args):
    return [i for i, a in enumerate(args) if a is not None]


def _bind(f, args):
    """f as a function of the present operands only."""
    present = _present(args)

    def g(*ops):
        full = list(args)
        for i, a in zip(present, ops):
            full[i] = a
        return f(*full)

    return g, tuple(args[i] for i in present)


# ------------------------------------------------------------------ forward mode


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", [dict(), dict(with_mask=False, with_bias=False, groups=1),
                                  dict(stride=2, dilation=(2, 1), padding=2, h=7),
                                  # M = 1 and 8 channels a group: the CUDA tangent
                                  # kernel's 16-byte vector path
                                  dict(multiplier=1, c=16, groups=2)],
                         ids=["dcnv2", "no_mask", "stride", "vectors"])
def test_jvp_matches_the_reference_per_operand(rng, dtype, case):
    p = _problem(rng, **case)
    ffi, ref = _convs(p)
    args = p.args(dtype)
    ffi_b, ops = _bind(ffi, args)
    ref_b, _ = _bind(ref, args)
    tangents = _tangents(rng, ops, dtype)
    jvp = jax.jit(lambda o, t: jax.jvp(ffi_b, o, t))
    for i in range(len(ops)):
        t = _only(ops, tangents, i)
        y, y_dot = jvp(ops, t)
        want_y, want_dot = jax.jvp(ref_b, ops, t)
        assert y.dtype == y_dot.dtype == dtype
        assert rel_err(y, want_y) < TOL[dtype]
        assert rel_err(y_dot, want_dot) < TOL[dtype], NAMES[_present(args)[i]]
    # All tangents at once, and the linearized function at two tangents.
    y, f_lin = jax.linearize(ffi_b, *ops)
    for scale in (1.0, -2.5):
        t = tuple(scale * a for a in tangents)
        assert rel_err(f_lin(*t), jax.jvp(ref_b, ops, t)[1]) < TOL[dtype]


def test_jacfwd_matches_the_reference(rng):
    p = _problem(rng, n=1, h=4, w=4, c=2, groups=1, multiplier=1)
    ffi, ref = _convs(p)
    args = p.args(jnp.float64)
    for argnum in range(5):
        got = jax.jit(jax.jacfwd(ffi, argnums=argnum))(*args)
        want = jax.jit(jax.jacfwd(ref, argnums=argnum))(*args)
        assert got.shape == want.shape
        assert rel_err(got, want) < 1e-9, NAMES[argnum]


@pytest.mark.parametrize("case", [dict(), dict(multiplier=1, c=32, groups=2)],
                         ids=["multiplier", "vectors"])
def test_jvp_of_half_precision(rng, case):
    p = _problem(rng, **case)
    ffi, ref = _convs(p)
    args = p.args(jnp.bfloat16)
    tangents = _tangents(rng, args, jnp.bfloat16)
    y, y_dot = jax.jit(lambda a, t: jax.jvp(ffi, a, t))(args, tangents)
    assert y_dot.dtype == jnp.bfloat16
    as64 = lambda v: tuple(jnp.asarray(a, jnp.float64) for a in v)  # noqa: E731
    assert rel_err(y_dot, jax.jvp(ref, as64(args), as64(tangents))[1]) < 2e-2


@pytest.mark.parametrize("weights_batched", [False, True], ids=["shared_w", "batched_w"])
def test_vmap_of_jvp(rng, weights_batched):
    """vmap folds the tangent as it folds the forward: into N, or into the
    channels when a weight (or its tangent) is batched."""
    p = _problem(rng)
    ffi, ref = _convs(p)
    args = p.args(jnp.float64)
    b = 3
    tangents = jnp.asarray(rng.standard_normal((b,) + args[1].shape))  # offset tangents
    ws = jnp.asarray(rng.standard_normal((b,) + args[2].shape))

    def one(conv, t, w):
        w = w if weights_batched else args[2]
        primals = (args[0], args[1], w, args[3], args[4])
        tans = (jnp.zeros_like(args[0]), t, jnp.ones_like(w), jnp.zeros_like(args[3]),
                jnp.zeros_like(args[4]))
        return jax.jvp(conv, primals, tans)[1]

    got = jax.jit(jax.vmap(functools.partial(one, ffi)))(tangents, ws)
    for j in range(b):
        assert rel_err(got[j], one(ref, tangents[j], ws[j])) < 1e-9


# ------------------------------------------------------------------ second order


def _loss(conv, cot):
    def f(*a):
        y = conv(*a)
        return jnp.sum(jnp.sin(y) * cot)

    return f


def test_grad_of_grad_and_hvp_every_pair(rng):
    """For each operand i: grad of <g_i, v_i> (g_i = d loss / d operand_i)
    with respect to every operand j, and the jvp of the full gradient along
    operand j's tangent: all (i, j) blocks of the Hessian, both ways."""
    p = _problem(rng, n=1, h=4, w=5)
    ffi, ref = _convs(p)
    args = p.args(jnp.float64)
    cot = jnp.asarray(rng.standard_normal(p.expected().shape))
    losses = {}
    for name, conv in (("ffi", ffi), ("ref", ref)):
        losses[name], ops = _bind(_loss(conv, cot), args)
    n = len(ops)
    probes = _tangents(rng, ops, jnp.float64)
    argnums = tuple(range(n))

    def grad_of_grad(loss, i):
        return jax.grad(lambda *o: jnp.vdot(jax.grad(loss, i)(*o), probes[i]), argnums)

    def hvp_column(loss, j):
        return lambda *o: jax.jvp(jax.grad(loss, argnums), o, _only(o, probes, j))[1]

    def every_pair(loss):  # one program for all pairs: one compilation
        return jax.jit(lambda *o: [(grad_of_grad(loss, i)(*o), hvp_column(loss, i)(*o))
                                   for i in range(n)])

    got, want = every_pair(losses["ffi"])(*ops), every_pair(losses["ref"])(*ops)
    for i in range(n):
        for j in range(n):
            assert rel_err(got[i][0][j], want[i][0][j]) < 1e-9, ("grad of grad", i, j)
            assert rel_err(got[i][1][j], want[i][1][j]) < 1e-9, ("hvp", j, i)


def test_hessian_reverse_over_forward(rng):
    """jax.hessian (jacfwd of jacrev) of a scalar loss of the offsets."""
    p = _problem(rng, n=1, h=3, w=3, c=2, groups=1, multiplier=1)
    ffi, ref = _convs(p)
    x, offset, weight, mask, bias = p.args(jnp.float64)
    cot = jnp.asarray(rng.standard_normal(p.expected().shape))

    def loss(conv):
        return lambda o: _loss(conv, cot)(x, o, weight, mask, bias)

    got = jax.jit(jax.hessian(loss(ffi)))(offset)
    assert rel_err(got, jax.jit(jax.hessian(loss(ref)))(offset)) < 1e-9


def test_r1_gradient_penalty(rng):
    """The R1 penalty of a GAN discriminator: d/dtheta ||d D(x) / dx||^2, where
    theta = the weight and an offset predictor's parameters (the offsets
    depend on x), as the reference gives it."""
    p = _problem(rng, n=2, h=5, w=5, c=2, groups=1, multiplier=2, padding="SAME")
    ffi, ref = _convs(p)
    x, offset, weight, mask, _ = p.args(jnp.float64)
    theta = dict(weight=weight, scale=jnp.asarray(0.3), base=offset)

    def discriminator(conv, theta, x):
        off = theta["base"] + theta["scale"] * jnp.tanh(jnp.mean(x, axis=-1, keepdims=True))
        y = conv(x, off, theta["weight"], mask, None)
        return jnp.sum(jax.nn.softplus(y))

    def r1(conv, theta, x):
        g = jax.grad(functools.partial(discriminator, conv), argnums=1)(theta, x)
        return jnp.sum(g * g)

    got = jax.jit(jax.value_and_grad(functools.partial(r1, ffi)))(theta, x)
    want = jax.jit(jax.value_and_grad(functools.partial(r1, ref)))(theta, x)
    assert rel_err(got[0], want[0]) < 1e-9
    for k in theta:
        assert rel_err(got[1][k], want[1][k]) < 1e-9, k


# ---------------------------------------------------------------- the fast path


@pytest.mark.parametrize("argnums", [(0, 1, 2, 3, 4), (0,), (1,), (2,)],
                         ids=["all", "x", "offset", "weight"])
def test_grad_is_one_forward_and_one_backward_kernel(rng, argnums):
    """Reverse mode transposes the tangent into the backward kernel: jax.grad
    compiles to exactly the calls it compiled to before forward mode existed,
    and never to the tangent's fallback (no gathers)."""
    p = _problem(rng)
    ffi, _ = _convs(p)
    args = p.args(jnp.float32)
    loss = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(ffi(*a))), argnums))
    ops = bench.heavy_ops(loss.lower(*args).compile().as_text())
    assert ops == {FORWARD_TARGET: 1, BACKWARD_TARGET: 1}, dict(ops)


def _tangent_kernels_expected() -> int:
    """1 where the default device's lowering platform has the tangent kernel.
    jax names the backend "gpu"; lowering platforms are "cuda" and "rocm"."""
    device = jax.devices()[0]
    platform = device.platform
    if platform == "gpu":
        version = str(getattr(device.client, "platform_version", "")).lower()
        platform = "rocm" if "rocm" in version else "cuda"
    return 1 if platform in TANGENT_PLATFORMS else 0


def test_jvp_runs_the_forward_and_tangent_kernels(rng):
    """One device: the primal on the forward kernel, the tangent on the tangent
    kernel where the build has one (CPU, CUDA), with no gathers of the fallback."""
    p = _problem(rng)
    ffi, _ = _convs(p)
    args = p.args(jnp.float32)
    f = jax.jit(lambda a, t: jax.jvp(ffi, a, t))
    ops = bench.heavy_ops(f.lower(args, args).compile().as_text())
    assert ops[FORWARD_TARGET] == 1 and ops[BACKWARD_TARGET] == 0, dict(ops)
    assert ops[TANGENT_TARGET] == _tangent_kernels_expected(), dict(ops)
    if _tangent_kernels_expected():
        assert ops["gather"] == 0, dict(ops)


# ------------------------------------------------------------------------ meshes


BOTH = P("data", None, None, "model")
MESH_CASES = {
    "batch": ((8,), ("data",), dict(groups=2), dict(x=P("data"), offset=P("data"),
                                                    mask=P("data"))),
    "data_x_model": ((4, 2), ("data", "model"), dict(groups=2),
                     dict(x=BOTH, offset=BOTH, mask=BOTH, weight=P(None, None, None, "model"),
                          bias=P("model"))),
}


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")
@pytest.mark.parametrize("style", ["explicit", "auto", "set_mesh"])
@pytest.mark.parametrize("case", sorted(MESH_CASES))
def test_jvp_on_a_mesh(rng, case, style):
    """Right values, y and y_dot sharded as x. The primal and the tangent run
    shard-local on their kernels (tests/test_sharding.py checks the
    collectives)."""
    shape, names, kwargs, specs = MESH_CASES[case]
    axis_type = AxisType.Auto if style == "auto" else AxisType.Explicit
    mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))
    p = make_problem(rng, n=8, h=6, w=6, c=8, multiplier=2, **kwargs)
    ffi, ref = _convs(p)
    args = p.args(jnp.float32)
    tangents = _tangents(rng, args, jnp.float32)

    def put(values):
        return tuple(jax.device_put(v, NamedSharding(mesh, specs.get(k, P())))
                     for k, v in zip(NAMES, values))

    f = jax.jit(lambda a, t: jax.jvp(ffi, a, t))
    if style == "set_mesh":
        with jax.set_mesh(mesh), callback_sees_mesh(mesh):
            (y, y_dot), hlo = f(put(args), put(tangents)), f.lower(
                put(args), put(tangents)).compile().as_text()
    else:
        (y, y_dot), hlo = f(put(args), put(tangents)), f.lower(
            put(args), put(tangents)).compile().as_text()
    want_y, want_dot = jax.jvp(ref, tuple(jnp.asarray(a, jnp.float64) for a in args),
                               tuple(jnp.asarray(t, jnp.float64) for t in tangents))
    assert rel_err(y, want_y) < 1e-5
    assert rel_err(y_dot, want_dot) < 1e-5
    assert kernel_x_shapes(hlo) == {NamedSharding(mesh, specs["x"]).shard_shape(args[0].shape)}
    # Partitioned like the forward, not the reference's jvp (with its gathers).
    heavy = bench.heavy_ops(hlo)
    assert heavy[TANGENT_TARGET] == _tangent_kernels_expected(), dict(heavy)
    if _tangent_kernels_expected():
        assert heavy["gather"] == 0, dict(heavy)
    assert NamedSharding(mesh, specs["x"]).is_equivalent_to(y.sharding, 4)
    assert NamedSharding(mesh, specs["x"]).is_equivalent_to(y_dot.sharding, 4)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")
def test_jvp_and_grad_of_grad_inside_shard_map(rng):
    """Per shard: the jvp, and the weight gradient of an R1-style penalty."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    p = _problem(rng, n=8)
    ffi, ref = _convs(p)
    args = p.args(jnp.float64)
    tangents = _tangents(rng, args, jnp.float64)
    specs = (P("data"), P("data"), P(), P("data"), P())

    def local(conv):
        def f(a, t):
            y_dot = jax.jvp(conv, a, t)[1]

            def penalty(w):
                gx = jax.grad(lambda x: jnp.sum(jnp.sin(conv(x, a[1], w, *a[3:]))))(a[0])
                return jnp.sum(gx * gx)

            return y_dot, jax.grad(penalty)(a[2])[None]

        return f

    def put(values):
        return tuple(jax.device_put(v, NamedSharding(mesh, s)) for v, s in zip(values, specs))

    run = jax.jit(jax.shard_map(local(ffi), mesh=mesh, in_specs=(specs, specs),
                                out_specs=(P("data"), P("data"))))
    got = run(put(args), put(tangents))
    # Per shard the program runs whole: the tangent on the tangent kernel.
    hlo = run.lower(put(args), put(tangents)).compile().as_text()
    assert bench.heavy_ops(hlo)[TANGENT_TARGET] == _tangent_kernels_expected()
    got = [np.asarray(g) for g in got]
    ref_local = jax.jit(local(ref))
    penalty_grad = 0
    for i in range(8):
        def shard(v):
            return tuple(a if s == P() else a[i:i + 1] for a, s in zip(v, specs))

        want = ref_local(shard(args), shard(tangents))
        assert rel_err(got[0][i:i + 1], want[0]) < 1e-9, i
        penalty_grad = penalty_grad + want[1][0]
    # The weight is the same on every shard: its gradient sums over the shards.
    for i in range(8):
        assert rel_err(got[1][i], penalty_grad) < 1e-9, i


def test_checkpointed_grad_and_jvp(rng):
    p = _problem(rng)
    ffi, ref = _convs(p)
    args = p.args(jnp.float64)
    tangents = _tangents(rng, args, jnp.float64)
    checkpointed = jax.checkpoint(ffi)
    got = jax.jit(jax.grad(_loss(checkpointed, 1.0), range(5)))(*args)
    want = jax.grad(_loss(ref, 1.0), range(5))(*args)
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 1e-9, name
    got = jax.jit(lambda a, t: jax.jvp(checkpointed, a, t)[1])(args, tangents)
    assert rel_err(got, jax.jvp(ref, args, tangents)[1]) < 1e-9


@pytest.mark.skipif("cpu" not in TANGENT_PLATFORMS, reason="the build has no CPU tangent kernel")
def test_tangent_kernel_refuses_a_tangent_unlike_its_operand():
    """A malformed custom call (not reachable through the API, which builds the
    tangents from the operands) gets an error, never a read past a buffer."""
    cpu = jax.devices("cpu")[0]
    x, off = jnp.ones((1, 5, 5, 2), jnp.float32), jnp.full((1, 5, 5, 18), 0.3, jnp.float32)
    mask, w = jnp.zeros((0,), jnp.float32), jnp.ones((3, 3, 1, 2), jnp.float32)
    x, off, mask, w = jax.device_put((x, off, mask, w), cpu)
    attrs = {k: np.int64(1) for k in ("stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w")}
    call = jax.jit(lambda *a: jax.ffi.ffi_call(
        TANGENT_TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype))(*a, **attrs))
    assert np.isfinite(np.asarray(call(x, off, mask, w, x, off, mask, w))).all()
    with pytest.raises(Exception, match="each tangent must have its operand's shape"):
        np.asarray(call(x, off, mask, w, x[:, :4], off, mask, w))
