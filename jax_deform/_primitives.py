"""The JAX primitives behind deform_conv2d: abstract evaluation and lowering to
the FFI kernels (registered with XLA by _ffi).

Operands are always NHWC. An absent mask or bias travels as an empty array
(shape (0,)), which the kernels read as "none".
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.extend.mlir import ir
from jax.extend.mlir.dialects import stablehlo as hlo
from jax.interpreters import mlir

from jax_deform import _sharding
from jax_deform._params import ConvParams, accum_dtype, layout_of
from jax_deform.reference import deform_conv2d_nhwc as _reference_nhwc

from jax_deform._ffi import (BACKWARD_TARGET, FORWARD_TARGET, KERNEL_PLATFORMS,
                             TANGENT_PLATFORMS, TANGENT_TARGET, cuda_backward_workspace_bytes)


def empty_like_absent(value, dtype):
    """The kernels' encoding of an absent mask or bias."""
    return jnp.zeros((0,), dtype) if value is None else value


def _none_if_empty(value):
    return None if value.size == 0 else value


def reference_without_bias(params: ConvParams, x, offset, mask, weight):
    """The pure-jnp computation f(x, offset, mask, weight) (no bias) for
    operands shaped like these; an empty mask stands for none. The fallback
    that lowerings and the second-order rules differentiate."""
    layout = layout_of(x, offset, weight)
    has_mask = mask.size > 0

    def f(x, offset, mask, weight):
        return _reference_nhwc(x, offset, weight, mask if has_mask else None, None,
                               params, layout)

    return f


def _impl(prim: Primitive):
    @functools.lru_cache(maxsize=None)
    def jitted(**params):
        return jax.jit(functools.partial(prim.bind, **params))

    return lambda *args, **params: jitted(**params)(*args)


def varying_axes(aval) -> frozenset:
    """The manual (shard_map) axes over which a value varies."""
    if hasattr(aval, "vma"):
        return frozenset(aval.vma)
    return frozenset(getattr(getattr(aval, "mat", None), "varying", ()))


def _result_like(operands, shape, dtype, sharding):
    """A result aval. Inside shard_map a result varies over the manual axes its
    operands vary over, so it is derived from the most varying operand (which
    also keeps whatever else that jax version tracks per aval)."""
    template = max(operands, key=lambda a: len(varying_axes(a)))
    return template.update(shape=shape, dtype=dtype, weak_type=False, sharding=sharding)


def _fallback_lowering(fallback, multiple_results):
    """Platforms without a compiled kernel lower to the pure-jnp computation,
    unless the caller asked for the kernel (implementation='ffi')."""
    lower = mlir.lower_fun(fallback, multiple_results=multiple_results)

    def lowering(ctx, *args, params: ConvParams, **kwargs):
        if params.kernel_required:
            platforms = ", ".join(ctx.module_context.platforms)
            built = ", ".join(sorted(KERNEL_PLATFORMS)) or "none"
            raise ValueError(
                f"implementation='ffi' but jax_deform has no compiled kernel for {platforms} "
                f"(built for: {built}); use implementation=None or 'xla' there"
            )
        return lower(ctx, *args, params=params, **kwargs)

    return lowering


# ---------------------------------------------------------------- forward

forward_p = Primitive("deform_conv2d_forward")
forward_p.def_impl(_impl(forward_p))


def _forward_abstract_eval(x, offset, mask, weight, bias, *, params: ConvParams):
    n, _, _, _ = x.shape
    _, ho, wo, _ = offset.shape
    return _result_like((x, offset, mask, weight, bias), (n, ho, wo, weight.shape[3]),
                        x.dtype, _sharding.forward_output_sharding(x, offset, weight))


forward_p.def_abstract_eval(_forward_abstract_eval)


def _forward_lowering(ctx, x, offset, mask, weight, bias, *, params: ConvParams):
    return jax.ffi.ffi_lowering(FORWARD_TARGET)(
        ctx, x, offset, mask, weight, bias, **params.ffi_attrs()
    )


def _forward_fallback(x, offset, mask, weight, bias, *, params: ConvParams):
    return _reference_nhwc(x, offset, weight, _none_if_empty(mask), _none_if_empty(bias),
                           params, layout_of(x, offset, weight))


for _platform in KERNEL_PLATFORMS:
    mlir.register_lowering(forward_p, _forward_lowering, platform=_platform)
mlir.register_lowering(forward_p, _fallback_lowering(_forward_fallback, False))


# ---------------------------------------------------------------- tangent

# The forward's tangent: linear in (x_dot, offset_dot, mask_dot, weight_dot),
# which follow x, offset, mask and weight. Its transpose (in _autodiff) is the
# backward kernel, so reverse mode never evaluates it. Evaluating it (forward
# mode) runs the tangent kernel, split over the mesh like the forward, where
# the build has one (CPU, CUDA), and elsewhere the jvp of the pure-jnp reference.

tangent_p = Primitive("deform_conv2d_tangent")
tangent_p.def_impl(_impl(tangent_p))


def _tangent_abstract_eval(x, offset, mask, weight, x_dot, offset_dot, mask_dot, weight_dot,
                           *, params: ConvParams, deterministic: bool):
    del params, deterministic
    n, _, _, _ = x.shape
    _, ho, wo, _ = offset.shape
    operands = (x, offset, mask, weight, x_dot, offset_dot, mask_dot, weight_dot)
    return _result_like(operands, (n, ho, wo, weight.shape[3]), x.dtype,
                        _sharding.forward_output_sharding(x, offset, weight))


tangent_p.def_abstract_eval(_tangent_abstract_eval)


def _tangent_fallback(x, offset, mask, weight, x_dot, offset_dot, mask_dot, weight_dot, *,
                      params: ConvParams, deterministic: bool):
    del deterministic
    f = reference_without_bias(params, x, offset, mask, weight)
    return jax.jvp(f, (x, offset, mask, weight), (x_dot, offset_dot, mask_dot, weight_dot))[1]


def _runs_whole(ctx) -> bool:
    """Whether this lowering is for one device, or for one shard inside a
    shard_map over every mesh axis: no partitioning by XLA follows."""
    axis_context = ctx.module_context.axis_context
    mesh = getattr(axis_context, "mesh", None)
    if mesh is not None:
        return (mesh.size == 1
                or set(getattr(axis_context, "manual_axes", ())) == set(mesh.axis_names))
    return getattr(axis_context, "num_devices", 0) == 1


def _partitioner_has_devices(ctx) -> bool:
    """Whether a custom_partitioning call can be lowered here: it needs the
    devices the program runs on, which jit hands to the lowering only when the
    program holds a primitive that asks for them (the forward's partitioned
    call does: every jvp that also returns y), and inside a shard_map over
    some mesh axes only with a concrete mesh. A program holding the tangent
    alone (y_dot without y, or the linear function of jax.linearize compiled
    on its own) gets no devices: jax has no public way to ask for them (its
    private registry of such primitives is what custom_partitioning uses)."""
    axis_context = ctx.module_context.axis_context
    if hasattr(axis_context, "device_assignment"):  # jit
        return axis_context.device_assignment is not None
    return isinstance(getattr(axis_context, "mesh", None), jax.sharding.Mesh)  # shard_map


_tangent_fallback_lowering = mlir.lower_fun(_tangent_fallback, multiple_results=False)

# The tangent kernel split over the mesh as the forward is. Its per-shard
# program binds tangent_p again, and is lowered with every mesh axis manual:
# there the call runs whole, on the kernel.
_tangent_partitioned_lowering = mlir.lower_fun(
    _sharding.partitioned_tangent(tangent_p.bind), multiple_results=False)


def _tangent_lowering(ctx, *args, params: ConvParams, deterministic: bool):
    """The tangent kernel where the program runs whole (one device, or per shard
    inside shard_map); where XLA partitions it, a partitioned call of the
    kernel, split as the forward is. The reference's jvp, which XLA
    partitions, where that call cannot be lowered (no devices known here)."""
    if _runs_whole(ctx):
        return jax.ffi.ffi_lowering(TANGENT_TARGET)(ctx, *args, **params.ffi_attrs())
    lowering = (_tangent_partitioned_lowering if _partitioner_has_devices(ctx)
                else _tangent_fallback_lowering)
    return lowering(ctx, *args, params=params, deterministic=deterministic)


# Not cacheable: the choice above depends on where in the program the call is
# lowered, which the lowering cache's key does not see. A jax whose
# register_lowering has no such switch keeps the fallback everywhere.
if "cacheable" in inspect.signature(mlir.register_lowering).parameters:
    for _platform in TANGENT_PLATFORMS:
        mlir.register_lowering(tangent_p, _tangent_lowering, platform=_platform, cacheable=False)
mlir.register_lowering(tangent_p, _tangent_fallback_lowering)


# ---------------------------------------------------------------- backward

backward_p = Primitive("deform_conv2d_backward")
backward_p.multiple_results = True
backward_p.def_impl(_impl(backward_p))


def _backward_abstract_eval(x, offset, mask, weight, grad_y, *, params, deterministic,
                            partials):
    """grad_x, then grad_offset, grad_mask and grad_weight as partial sums along
    a leading axis (see _sharding.Partials); float32, or float64 for float64
    operands."""
    del params, deterministic
    operands = (x, offset, mask, weight, grad_y)
    shapes = partials.result_shapes(x.shape, offset.shape, mask.shape, weight.shape)
    shardings = _sharding.backward_output_shardings(x, offset, mask, weight, partials)
    return tuple(_result_like(operands, shape, accum_dtype(x.dtype), s)
                 for shape, s in zip(shapes, shardings))


backward_p.def_abstract_eval(_backward_abstract_eval)


def _backward_lowering(ctx, x, offset, mask, weight, grad_y, *, params, deterministic,
                       partials, workspace=()):
    """The kernel writes whole gradients; the partial-sum axis is added after it
    with bare reshape/pad ops. They carry no sharding annotation, so this is also
    what runs in the per-shard program of the partitioned call."""
    del partials  # in ctx.avals_out
    grad_dtype = accum_dtype(ctx.avals_in[0].dtype)
    whole = [jax.core.ShapedArray(a.shape, grad_dtype) for a in ctx.avals_in[:4]]
    results = jax.ffi.ffi_lowering(BACKWARD_TARGET)(
        ctx.replace(avals_out=[*whole, *workspace]), x, offset, mask, weight, grad_y,
        deterministic=bool(deterministic), **params.ffi_attrs()
    )
    return [_as_partials(ctx, r, a) for r, a in zip(results[:4], ctx.avals_out)]


def _as_partials(ctx, value, aval_out):
    """A whole gradient as aval_out: itself, or the first of aval_out.shape[0]
    partial sums along a new leading axis (the others zero)."""
    rank = len(ir.RankedTensorType(value.type).shape)
    if aval_out.ndim == rank:
        return value
    count, shape = aval_out.shape[0], aval_out.shape[1:]
    one = jax.core.ShapedArray((1, *shape), aval_out.dtype)
    one_type = mlir.aval_to_ir_type(ctx.module_context, one)
    if all(isinstance(d, (int, np.integer)) for d in shape):
        value = hlo.reshape(one_type, value)
    else:  # symbolic dimensions (jax.export with shape polymorphism)
        i32_1d = ir.RankedTensorType.get((1,), ir.IntegerType.get_signless(32))
        dims = [mlir.ir_constant(np.array([1], np.int32))] + [
            hlo.reshape(i32_1d, hlo.get_dimension_size(value, i)) for i in range(rank)]
        value = hlo.dynamic_reshape(one_type, value, hlo.concatenate(dims, 0))
    if count == 1:
        return value
    zero = mlir.ir_constant(np.zeros((), aval_out.dtype))
    high = [count - 1] + [0] * len(shape)
    return hlo.pad(value, zero, mlir.dense_int_array([0] * len(high)),
                   mlir.dense_int_array(high), mlir.dense_int_array([0] * len(high)))


def _backward_fallback(x, offset, mask, weight, grad_y, *, params, deterministic, partials):
    del deterministic
    _, vjp = jax.vjp(reference_without_bias(params, x, offset, mask, weight),
                     x, offset, mask, weight)
    grads = [g.astype(accum_dtype(x.dtype)) for g in vjp(grad_y)]
    shapes = partials.result_shapes(x.shape, offset.shape, mask.shape, weight.shape)
    return [g if g.ndim == len(shape) else
            jnp.pad(g[None], [(0, shape[0] - 1)] + [(0, 0)] * g.ndim)
            for g, shape in zip(grads, shapes)]


def _backward_lowering_cuda(ctx, x, offset, mask, weight, grad_y, *, params, deterministic,
                            partials):
    """The CUDA kernel also needs device workspace (per-tile grad_weight partial
    sums; the deterministic path's sorted samples). XLA allocates it as an
    extra result of the custom call, which is dropped here."""
    layout = layout_of(*(ctx.avals_in[i] for i in (0, 1, 3)))
    dtype = jnp.dtype(ctx.avals_in[0].dtype).name

    def nbytes(n):
        return cuda_backward_workspace_bytes(n, layout, params, dtype, deterministic)

    size = workspace_size(nbytes, layout.n, largest_kernel_batch(layout))
    workspace = jax.core.ShapedArray((size,), jnp.uint8)
    return _backward_lowering(ctx, x, offset, mask, weight, grad_y, params=params,
                              deterministic=deterministic, partials=partials,
                              workspace=(workspace,))


def workspace_size(nbytes, n, largest):
    """Workspace bytes for batch n: nbytes(n) when n is a number, else (a
    symbolic batch: jax.export with shape polymorphism) the bound of
    workspace_bound. The kernel checks the size it is given and fails with an
    error, never out of bounds, if it is too small."""
    if isinstance(n, (int, np.integer)):
        return max(nbytes(int(n)), 1)
    slope, intercept = workspace_bound(nbytes, largest)
    return slope * n + intercept


def workspace_bound(nbytes, largest):
    """(slope, intercept) with slope * n + intercept >= nbytes(n) for batches
    n up to `largest` (a power of two: the largest batch the kernels' 32-bit
    offsets allow). The workspace is not linear in the batch: the per-block
    grad_weight partial sums grow until the grid reaches its block count and
    then stay, small grids take more channel slices, and the fast path
    switches to the sorted gather above a size. Past those switches it grows
    linearly, so the slope is taken between `largest` and half of it (plus
    1/16), and the intercept is the largest excess over that line at every
    batch up to 1024 and every power of two after (plus 1 MiB).
    tests/test_primitives.py checks the bound at every batch up to 2048 for
    the benchmarks' and the tests' layouts."""
    largest = max(2, largest)
    batches = list(range(1, min(largest, 1024) + 1))
    batches += [1 << k for k in range(11, largest.bit_length())]
    sizes = {k: nbytes(k) for k in batches}
    far, near = batches[-1], batches[-1] // 2
    slope = max(-(-(sizes[far] - sizes[near]) // (far - near)), 1)  # ceil
    slope += -(-slope // 16)
    intercept = max(size - slope * k for k, size in sizes.items())
    return slope, max(intercept, 0) + (1 << 20)


def largest_kernel_batch(layout) -> int:
    """The largest power-of-two batch for which x and the samples' byte
    offsets fit the kernels' 32 bits."""
    per_image = 4 * max(layout.h * layout.w * layout.c,
                        layout.ho * layout.wo * layout.kh * layout.kw * layout.groups)
    return 1 << max(1, (((1 << 31) - 1) // per_image).bit_length() - 1)


for _platform in KERNEL_PLATFORMS:
    mlir.register_lowering(
        backward_p,
        _backward_lowering_cuda if _platform == "cuda" else _backward_lowering,
        platform=_platform,
    )
mlir.register_lowering(backward_p, _fallback_lowering(_backward_fallback, True))
