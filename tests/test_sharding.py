"""deform_conv2d under jit on a mesh of 8 CPU devices: sharded results,
gradients and forward-mode tangents equal the unsharded ones, batch and
channel sharding run shard-local (no all-gather in the compiled program), and
spatial sharding or an unsupported channel split still gives the right answer. Every case runs
with Explicit and with Auto mesh axes; the gradient sums across shards are
checked to compile on XLA:GPU under every way of putting a mesh to work
(tests/sharding_checks.py says how, on CPU)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_deform
from jax_deform import bench
from jax_deform._ffi import TANGENT_TARGET
from tests.sharding_checks import (callback_sees_mesh, sums_from_partitioned_call,
                                   reducer_problems, sharding_custom_calls)

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")

AXIS_TYPES = [AxisType.Explicit, AxisType.Auto]
KW = dict(stride=1, padding=1, dilation=1)


def problem(rng, n=8, h=6, w=6, c=8, groups=1, multiplier=2, dtype=np.float32):
    k = 9
    f = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    return dict(
        x=f(n, h, w, c),
        offset=(1.5 * f(n, h, w, 2 * groups * k)).astype(dtype),
        mask=rng.uniform(0, 1, (n, h, w, groups * k)).astype(dtype),
        weight=f(3, 3, 1, c * multiplier),
        bias=f(c * multiplier),
    )


def loss_and_grads(implementation="ffi"):
    """jit(value_and_grad) of sum(y * cotangent) with respect to every operand."""

    def loss(ops, cotangent):
        y = jax_deform.deform_conv2d(
            ops["x"], ops["offset"], ops["weight"], ops["mask"], ops["bias"],
            implementation=implementation, **KW,
        )
        return jnp.sum(y * cotangent), y

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def place(mesh, ops, specs):
    return {k: jax.device_put(v, NamedSharding(mesh, specs.get(k, P()))) for k, v in ops.items()}


def run_sharded(mesh, ops, specs, implementation="ffi"):
    """(loss, y, grads) of the sharded call and the compiled program's text."""
    f = loss_and_grads(implementation)
    sharded = place(mesh, ops, specs)
    cotangent = jax.device_put(np.ones((1,), np.float32), NamedSharding(mesh, P()))
    (value, y), grads = f(sharded, cotangent)
    hlo = f.lower(sharded, cotangent).compile().as_text()
    if implementation == "ffi":  # reverse mode transposes the tangent, never evaluates it
        assert not bench.heavy_ops(hlo)[TANGENT_TARGET] and not gathers(hlo)
    return value, y, grads, hlo


def unsharded(ops, implementation="ffi"):
    device = jax.devices()[0]
    local = {k: jax.device_put(v, device) for k, v in ops.items()}
    (value, y), grads = loss_and_grads(implementation)(local, np.ones((1,), np.float32))
    return value, y, grads


def assert_close(got, want, rtol=2e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(np.abs(want).max(), 1.0)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def assert_same_as_unsharded(result, ops, implementation="ffi"):
    value, y, grads, _ = result
    want_value, want_y, want_grads = unsharded(ops, implementation)
    assert_close(y, want_y)
    # The loss sums y over shards in another order: its error scales with sum |y|.
    assert abs(float(value) - float(want_value)) <= 1e-5 * float(np.abs(want_y).sum())
    for name in ops:
        assert_close(grads[name], want_grads[name]), name


def collectives(hlo: str) -> set[str]:
    ops = r"all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter"
    return set(re.findall(rf"\b({ops})(?:-start)?\(", hlo))


def gathers(hlo: str) -> list[str]:
    """Gather ops (the pure-jnp reference samples with them), not all-gathers."""
    return re.findall(r"(?<![\w-])gather\(", hlo)


def kernel_x_shapes(hlo: str) -> set[tuple[int, ...]]:
    """The x operand shapes the forward, backward and tangent kernels run on."""
    found = re.findall(r'custom_call_target="jax_deform_(?:forward|backward|tangent)(?:_v\d+)?", '
                       r"operand_layout_constraints=\{f32\[([\d,]+)\]", hlo)
    return {tuple(int(d) for d in s.split(",")) for s in found}


def make_mesh(shape, names, axis_type):
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda t: t.name)
def test_batch_sharded_is_shard_local(rng, axis_type):
    mesh = make_mesh((8,), ("data",), axis_type)
    ops = problem(rng, groups=2)
    batch = P("data")
    result = run_sharded(mesh, ops, dict(x=batch, offset=batch, mask=batch))
    assert_same_as_unsharded(result, ops)
    _, y, grads, hlo = result
    assert y.sharding.spec[0] == "data"
    assert grads["x"].sharding.spec[0] == "data"
    assert kernel_x_shapes(hlo) == {(1, 6, 6, 8)}
    # Only the parameter gradients (weight, bias) and the loss are reduced.
    assert collectives(hlo) <= {"all-reduce"}, collectives(hlo)


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("groups,shards", [(1, 4), (2, 2), (4, 4)])
def test_channel_sharded_is_shard_local(rng, axis_type, groups, shards):
    mesh = make_mesh((shards,), ("model",), axis_type)
    ops = problem(rng, n=2, groups=groups)
    channel = P(None, None, None, "model")
    offsets = P() if groups == 1 else channel  # G = 1: every shard reads all offsets
    specs = dict(x=channel, offset=offsets, mask=offsets, weight=channel, bias=P("model"))
    result = run_sharded(mesh, ops, specs)
    assert_same_as_unsharded(result, ops)
    _, y, grads, hlo = result
    assert y.sharding.spec[3] == "model"
    assert grads["weight"].sharding.spec[3] == "model"
    assert kernel_x_shapes(hlo) == {(2, 6, 6, 8 // shards)}
    # G = 1: the offsets' gradient is summed over channel shards (all-reduce).
    assert collectives(hlo) <= {"all-reduce"}, collectives(hlo)


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda t: t.name)
def test_data_by_model_mesh(rng, axis_type):
    mesh = make_mesh((4, 2), ("data", "model"), axis_type)
    ops = problem(rng, groups=2)
    both = P("data", None, None, "model")
    specs = dict(x=both, offset=both, mask=both, weight=P(None, None, None, "model"),
                 bias=P("model"))
    result = run_sharded(mesh, ops, specs)
    assert_same_as_unsharded(result, ops)
    _, y, _, hlo = result
    assert tuple(y.sharding.spec) == ("data", None, None, "model")
    assert kernel_x_shapes(hlo) == {(2, 6, 6, 4)}
    assert collectives(hlo) <= {"all-reduce"}, collectives(hlo)


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda t: t.name)
def test_spatially_sharded_is_correct(rng, axis_type):
    mesh = make_mesh((2, 4), ("rows", "cols"), axis_type)
    ops = problem(rng, n=2, h=8, w=8)
    spatial = P(None, "rows", "cols")
    result = run_sharded(mesh, ops, dict(x=spatial, offset=spatial, mask=spatial))
    assert_same_as_unsharded(result, ops)


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda t: t.name)
def test_channel_split_inside_a_group_is_correct(rng, axis_type):
    # 4 channel shards but G = 2: a shard would hold half a group, so the
    # channels are gathered instead.
    mesh = make_mesh((4,), ("model",), axis_type)
    ops = problem(rng, n=2, groups=2)
    channel = P(None, None, None, "model")
    result = run_sharded(mesh, ops, dict(x=channel, weight=channel))
    assert_same_as_unsharded(result, ops)


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda t: t.name)
def test_reference_path_sharded(rng, axis_type):
    mesh = make_mesh((4, 2), ("data", "model"), axis_type)
    ops = problem(rng, groups=2)
    both = P("data", None, None, "model")
    result = run_sharded(mesh, ops, dict(x=both, offset=both, mask=both), "xla")
    assert_same_as_unsharded(result, ops, "xla")


def test_gspmd_partitioner(rng):
    """The same rules through the GSPMD callbacks, with Shardy off."""
    mesh = make_mesh((4, 2), ("data", "model"), AxisType.Auto)
    ops = problem(rng, groups=2)
    both = P("data", None, None, "model")
    previous = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", False)
    try:
        result = run_sharded(mesh, ops, dict(x=both, offset=both, mask=both,
                                             weight=P(None, None, None, "model")))
    finally:
        jax.config.update("jax_use_shardy_partitioner", previous)
    assert_same_as_unsharded(result, ops)
    assert collectives(result[3]) <= {"all-reduce"}, collectives(result[3])


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda t: t.name)
def test_gradients_through_shard_map(rng, axis_type):
    mesh = make_mesh((8,), ("data",), axis_type)
    ops = problem(rng)

    def local_loss(x, offset, mask, weight, bias):
        y = jax_deform.deform_conv2d(x, offset, weight, mask, bias, **KW)
        return jax.lax.psum(jnp.sum(y), "data")

    batch = P("data")
    sharded_loss = jax.shard_map(local_loss, mesh=mesh, in_specs=(batch,) * 3 + (P(), P()),
                                 out_specs=P())
    names = ("x", "offset", "mask", "weight", "bias")
    args = [ops[k] for k in names]
    sharded = place(mesh, ops, dict(x=batch, offset=batch, mask=batch))
    grad = jax.jit(jax.value_and_grad(sharded_loss, argnums=(0, 1, 2, 3, 4)))
    value, grads = grad(*[sharded[k] for k in names])

    def plain_loss(x, offset, mask, weight, bias):
        return jnp.sum(jax_deform.deform_conv2d(x, offset, weight, mask, bias, **KW))

    want_value, want_grads = jax.jit(jax.value_and_grad(plain_loss, argnums=(0, 1, 2, 3, 4)))(
        *args)
    assert_close(value, want_value)
    for got, want in zip(grads, want_grads):
        assert_close(got, want)


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda t: t.name)
def test_vmap_of_batch_sharded(rng, axis_type):
    """vmap inside jit folds into the partitioned call and stays shard-local."""
    mesh = make_mesh((8,), ("data",), axis_type)
    ops = problem(rng, n=8)
    stacked_w = np.stack([ops["weight"], 2 * ops["weight"]])

    def f(x, offset, ws):
        return jax.vmap(lambda w: jax_deform.deform_conv2d(x, offset, w, **KW))(ws)

    batch = NamedSharding(mesh, P("data"))
    x, offset = jax.device_put(ops["x"], batch), jax.device_put(ops["offset"], batch)
    with jax.set_mesh(mesh):
        got = jax.jit(f)(x, offset, stacked_w)
    assert_close(got, jax.jit(f)(ops["x"], ops["offset"], stacked_w))


def test_one_device_mesh(rng):
    mesh = make_mesh((1,), ("data",), AxisType.Explicit)
    ops = problem(rng, n=2)
    result = run_sharded(mesh, ops, dict(x=P("data")))
    assert_same_as_unsharded(result, ops)


# ------------------------------------ cross-shard sums under every mesh style

BATCH, CHANNEL = P("data"), P(None, None, None, "model")
#: Cases where gradients are summed across shards: (mesh shape, axis names,
#: problem, operand specs). grad_weight over batch shards; with G = 1,
#: grad_offset and grad_mask over channel shards; the 2-D mesh does both.
REDUCING = {
    "batch": ((8,), ("data",), dict(groups=2), dict(x=BATCH, offset=BATCH, mask=BATCH)),
    "channel": ((4,), ("model",), dict(n=2, groups=1),
                dict(x=CHANNEL, weight=CHANNEL, bias=P("model"))),
    "data_x_model": ((4, 2), ("data", "model"), dict(groups=1),
                     dict(x=P("data", None, None, "model"), offset=BATCH, mask=BATCH,
                          weight=CHANNEL, bias=P("model"))),
}
#: How a user puts the mesh to work: jax.set_mesh with Explicit axes (as
#: JAX's docs do), Explicit shardings on the arrays only, Auto axes with and
#: without set_mesh.
STYLES = ("set_mesh", "explicit", "auto", "auto_set_mesh")


def mesh_context(mesh, style):
    """The style's context; with set_mesh, the partitioning callbacks see the
    mesh too, as on jax >= 0.11."""
    if not style.endswith("set_mesh"):
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(callback_sees_mesh(mesh))
    return stack


def assert_sums_compile_on_gpu(hlo, no_collective_inside: bool):
    """Every all-reduce's reducer is a bare add; no sharding custom call is
    left; with Explicit axes no all-reduce comes from inside the partitioned
    call (the sums are XLA's own)."""
    assert not reducer_problems(hlo), reducer_problems(hlo)
    assert not sharding_custom_calls(hlo), sharding_custom_calls(hlo)
    if no_collective_inside:
        assert not sums_from_partitioned_call(hlo), sums_from_partitioned_call(hlo)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("case", REDUCING)
def test_cross_shard_sums(rng, case, style):
    shape, names, kwargs, specs = REDUCING[case]
    axis_type = AxisType.Auto if style.startswith("auto") else AxisType.Explicit
    mesh = make_mesh(shape, names, axis_type)
    ops = problem(rng, **kwargs)
    with mesh_context(mesh, style):
        result = run_sharded(mesh, ops, specs)
    assert_same_as_unsharded(result, ops)
    _, y, grads, hlo = result
    assert_sums_compile_on_gpu(hlo, no_collective_inside=axis_type == AxisType.Explicit)
    assert collectives(hlo) <= {"all-reduce"}, collectives(hlo)
    x_sharding = NamedSharding(mesh, specs["x"])
    assert kernel_x_shapes(hlo) == {x_sharding.shard_shape(ops["x"].shape)}  # shard-local
    if axis_type == AxisType.Explicit:  # the gradients' types are the operands'
        for name, spec in specs.items():
            assert NamedSharding(mesh, spec).is_equivalent_to(grads[name].sharding, 4 - (
                name == "bias") * 3), name


def test_mixed_axis_types_under_set_mesh(rng):
    """Channels split over an Auto axis while the current mesh has an Explicit
    one: the channel sum is not in the types and a psum in the callback would
    get a bad reducer, so the channels are gathered: correct, compiles."""
    mesh = jax.make_mesh((4, 2), ("data", "model"),
                         axis_types=(AxisType.Explicit, AxisType.Auto))
    ops = problem(rng, groups=1)
    specs = dict(x=P("data", None, None, "model"), offset=BATCH, mask=BATCH, weight=CHANNEL,
                 bias=P("model"))
    with mesh_context(mesh, "set_mesh"):
        result = run_sharded(mesh, ops, specs)
    assert_same_as_unsharded(result, ops)
    assert_sums_compile_on_gpu(result[3], no_collective_inside=True)


@pytest.mark.parametrize("case", ["batch", "data_x_model"])
def test_shard_map_under_set_mesh(rng, case):
    """Inside shard_map the op sees local shapes and needs no collective; the
    sums over shards are shard_map's own (the transpose of its casts)."""
    shape, names, kwargs, specs = REDUCING[case]
    mesh = make_mesh(shape, names, AxisType.Explicit)
    ops = problem(rng, **kwargs)
    keys = ("x", "offset", "mask", "weight", "bias")
    in_specs = tuple(specs.get(k, P()) for k in keys)

    def local_loss(x, offset, mask, weight, bias):
        y = jax_deform.deform_conv2d(x, offset, weight, mask, bias, **KW)
        return jax.lax.psum(jnp.sum(y * y), names)

    def plain_loss(x, offset, mask, weight, bias):
        return jnp.sum(jax_deform.deform_conv2d(x, offset, weight, mask, bias, **KW) ** 2)

    grad = jax.jit(jax.value_and_grad(
        jax.shard_map(local_loss, mesh=mesh, in_specs=in_specs, out_specs=P()),
        argnums=range(5)))
    with mesh_context(mesh, "set_mesh"):
        sharded = place(mesh, ops, specs)
        args = [sharded[k] for k in keys]
        value, grads = grad(*args)
        hlo = grad.lower(*args).compile().as_text()
    assert_sums_compile_on_gpu(hlo, no_collective_inside=True)
    want_value, want_grads = jax.jit(jax.value_and_grad(plain_loss, argnums=range(5)))(
        *[ops[k] for k in keys])
    assert_close(value, want_value)
    for got, want in zip(grads, want_grads):
        assert_close(got, want)


def test_vmap_of_gradients_under_set_mesh(rng):
    """vmap folds the batch into the channels, so the folded call has its own
    partial-sum counts; the gradients still come out whole."""
    mesh = make_mesh((8,), ("data",), AxisType.Explicit)
    ops = problem(rng, groups=1)
    stacked_w = np.stack([ops["weight"], -0.5 * ops["weight"]])

    def grads(x, offset, mask, ws):
        def one(w):
            return jax.grad(lambda x, w: jnp.sum(jax_deform.deform_conv2d(
                x, offset, w, mask, **KW) ** 2), argnums=(0, 1))(x, w)
        return jax.vmap(one)(ws)

    specs = dict(x=BATCH, offset=BATCH, mask=BATCH)
    with mesh_context(mesh, "set_mesh"):
        sharded = place(mesh, ops, specs)
        f = jax.jit(grads)
        got = f(sharded["x"], sharded["offset"], sharded["mask"], stacked_w)
        hlo = f.lower(sharded["x"], sharded["offset"], sharded["mask"], stacked_w).compile()
    assert_sums_compile_on_gpu(hlo.as_text(), no_collective_inside=True)
    want = jax.jit(grads)(ops["x"], ops["offset"], ops["mask"], stacked_w)
    for g, w in zip(got, want):
        assert_close(g, w)


@pytest.mark.parametrize("batch", [2, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_vmap_with_channel_sharded_operands_under_explicit_axes(rng, groups, batch):
    """Batched weights and vmap of grad fold the batch into the channels; with
    the channels sharded over Explicit axes the folded axis stays sharded
    (JAX moves the data), where the plain reshape raised ShardingTypeError.
    The folded call has batch * groups offset groups: when the 2 channel
    shards do not divide them it runs on whole channels (still correct)."""
    mesh = make_mesh((2,), ("model",), AxisType.Explicit)
    ops = problem(rng, n=2, c=8, groups=groups, multiplier=1)
    scales = (1.0, -0.5, 2.0)[:batch]
    stacked_w = np.stack([s * ops["weight"] for s in scales])
    stacked_x = np.stack([s * ops["x"] for s in scales])

    def batched_weights(x, offset, ws):
        return jax.vmap(lambda w: jax_deform.deform_conv2d(x, offset, w, **KW))(ws)

    def per_example_grads(xs, offset, w):
        def one(x):
            return jax.grad(lambda x, w: jnp.sum(jnp.sin(jax_deform.deform_conv2d(
                x, offset, w, **KW))), argnums=(0, 1))(x, w)
        return jax.vmap(one)(xs)

    channels = NamedSharding(mesh, P(None, None, None, "model"))
    stacked = NamedSharding(mesh, P(None, None, None, None, "model"))
    x, w = jax.device_put(ops["x"], channels), jax.device_put(ops["weight"], channels)
    xs, ws = jax.device_put(stacked_x, stacked), jax.device_put(stacked_w, stacked)
    sharded_out = (batch * groups) % 2 == 0
    got = jax.jit(batched_weights)(x, ops["offset"], ws)
    assert got.sharding.spec[-1] == "model" or not sharded_out
    assert_close(got, jax.jit(batched_weights)(ops["x"], ops["offset"], stacked_w))
    got_grads = jax.jit(per_example_grads)(xs, ops["offset"], w)
    want_grads = jax.jit(per_example_grads)(stacked_x, ops["offset"], ops["weight"])
    for g, want in zip(got_grads, want_grads):
        assert g.sharding.spec[-1] == "model" or not sharded_out
        assert_close(g, want)


# ------------------------------------------------------------------ forward mode

#: Meshes as above: (mesh shape, axis names, problem, operand specs). With
#: G = 1 every channel shard reads all offsets (replicated); with G = 2 and 2
#: shards each holds one offset group.
FORWARD_MODE = {
    "batch": ((8,), ("data",), dict(groups=2), dict(x=BATCH, offset=BATCH, mask=BATCH)),
    "channel_g1": ((4,), ("model",), dict(n=2, groups=1),
                   dict(x=CHANNEL, weight=CHANNEL, bias=P("model"))),
    "channel_g2": ((2,), ("model",), dict(n=2, groups=2),
                   dict(x=CHANNEL, offset=CHANNEL, mask=CHANNEL, weight=CHANNEL,
                        bias=P("model"))),
    "data_x_model": ((4, 2), ("data", "model"), dict(groups=2),
                     dict(x=P("data", None, None, "model"), offset=P("data", None, None, "model"),
                          mask=P("data", None, None, "model"), weight=CHANNEL,
                          bias=P("model"))),
}


def forward_mode(mode: str):
    """jit of (y, y_dot) by jax.jvp or jax.linearize, every operand with a tangent."""

    def conv(ops):
        return jax_deform.deform_conv2d(ops["x"], ops["offset"], ops["weight"], ops["mask"],
                                        ops["bias"], implementation="ffi", **KW)

    def linearized(ops, dots):
        y, tangent = jax.linearize(conv, ops)
        return y, tangent(dots)

    if mode == "jvp":
        return jax.jit(lambda ops, dots: jax.jvp(conv, (ops,), (dots,)))
    return jax.jit(linearized)


def check_forward_mode_is_shard_local(rng, mesh, kwargs, specs, mode, style="explicit"):
    """y and y_dot equal the unsharded ones and are sharded as x; the tangent
    runs on its kernel, on each shard's part of x, with no collective and
    none of the gathers of the reference's jvp (its fallback)."""
    ops = problem(rng, **kwargs)
    dots = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in ops.items()}
    f = forward_mode(mode)
    device = jax.devices()[0]
    want_y, want_dot = f(jax.device_put(ops, device), jax.device_put(dots, device))
    with mesh_context(mesh, style):
        sharded_ops, sharded_dots = place(mesh, ops, specs), place(mesh, dots, specs)
        y, y_dot = f(sharded_ops, sharded_dots)
        hlo = f.lower(sharded_ops, sharded_dots).compile().as_text()
    assert_close(y, want_y)
    assert_close(y_dot, want_dot)
    x_sharding = NamedSharding(mesh, specs["x"])
    assert x_sharding.is_equivalent_to(y_dot.sharding, 4), y_dot.sharding
    assert bench.heavy_ops(hlo)[TANGENT_TARGET] == 1 and not gathers(hlo)
    assert kernel_x_shapes(hlo) == {x_sharding.shard_shape(ops["x"].shape)}
    assert not collectives(hlo), collectives(hlo)


@pytest.mark.parametrize("mode", ["jvp", "linearize"])
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("case", FORWARD_MODE)
def test_forward_mode_is_shard_local(rng, case, style, mode):
    shape, names, kwargs, specs = FORWARD_MODE[case]
    axis_type = AxisType.Auto if style.startswith("auto") else AxisType.Explicit
    mesh = make_mesh(shape, names, axis_type)
    check_forward_mode_is_shard_local(rng, mesh, kwargs, specs, mode, style)


def test_forward_mode_gspmd_partitioner(rng):
    """The tangent's rules through the GSPMD callbacks, with Shardy off."""
    shape, names, kwargs, specs = FORWARD_MODE["data_x_model"]
    mesh = make_mesh(shape, names, AxisType.Auto)
    previous = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", False)
    try:
        check_forward_mode_is_shard_local(rng, mesh, kwargs, specs, "jvp", "auto")
    finally:
        jax.config.update("jax_use_shardy_partitioner", previous)


@pytest.mark.parametrize("case", ["batch", "data_x_model"])
def test_tangent_alone_on_a_mesh_is_right(rng, case):
    """y_dot without y: the program holds the tangent alone, whose lowering jit
    hands no devices (no public API asks for them), so it takes the
    reference's jvp, partitioned by XLA; the values and sharding must still be
    right (a jax that does hand devices over gets the kernel instead)."""
    shape, names, kwargs, specs = FORWARD_MODE[case]
    mesh = make_mesh(shape, names, AxisType.Explicit)
    ops = problem(rng, **kwargs)
    dots = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in ops.items()}

    def conv(ops):
        return jax_deform.deform_conv2d(ops["x"], ops["offset"], ops["weight"], ops["mask"],
                                        ops["bias"], implementation="ffi", **KW)

    f = jax.jit(lambda ops, dots: jax.jvp(conv, (ops,), (dots,))[1])
    device = jax.devices()[0]
    want = f(jax.device_put(ops, device), jax.device_put(dots, device))
    with mesh_context(mesh, "explicit"):
        sharded_ops, sharded_dots = place(mesh, ops, specs), place(mesh, dots, specs)
        got = f(sharded_ops, sharded_dots)
        hlo = f.lower(sharded_ops, sharded_dots).compile().as_text()
    assert_close(got, want)
    assert NamedSharding(mesh, specs["x"]).is_equivalent_to(got.sharding, 4), got.sharding
    on_kernel = bench.heavy_ops(hlo)[TANGENT_TARGET] == 1 and not gathers(hlo)
    on_reference = bench.heavy_ops(hlo)[TANGENT_TARGET] == 0 and gathers(hlo)
    assert on_kernel or on_reference


@pytest.mark.parametrize("style", ["set_mesh", "shard_map"])
def test_multi_gpu_case_runner_on_cpu(style):
    """tests/multi_gpu_case.py, which the multi-GPU tests run on GPUs, on 4 CPU
    devices: forward, every gradient and forward mode against one device."""
    script = pathlib.Path(__file__).resolve().parent / "multi_gpu_case.py"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    r = subprocess.run([sys.executable, str(script), "--case", "data_x_model", "--style", style,
                        "--platform", "cpu", "--devices", "4"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "forward mode: 1 tangent kernel call(s), 0 collective(s)" in r.stdout, r.stdout
