"""Derivatives of the FFI path, forward and reverse mode, any order.

* The op is a custom JVP: y comes from the forward kernel, y_dot from
  `tangent_p`, a primitive linear in the tangents of x, offset, mask and
  weight (the bias' tangent is added outside).
* Reverse mode is linearize + transpose: the transpose of `tangent_p` is ONE
  backward kernel call giving grad_x, grad_offset, grad_mask and grad_weight
  (grad_bias is a sum over the cotangent), so `jax.grad` runs one forward and
  one backward kernel, and never evaluates `tangent_p`.
* Forward mode (`jax.jvp`, `jax.linearize`, `jax.jacfwd`) evaluates
  `tangent_p`: the tangent kernel (CPU, CUDA), per shard where XLA partitions
  the program, split as the forward is (see _primitives).
* Second order: `tangent_p` has a JVP rule: in the tangents it is tangent_p
  again (so it still transposes to the backward kernel), in the primals the
  pure-jnp reference differentiated twice. The backward is a custom JVP around
  the backward kernel whose tangent is the pure-jnp reference's vjp
  differentiated. First-order code never reaches those rules.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.interpreters import ad

from jax_deform import _batching, _sharding
from jax_deform._params import ConvParams, accum_dtype
from jax_deform._primitives import (backward_p, empty_like_absent, forward_p,
                                    reference_without_bias, tangent_p, varying_axes)

class Operands(NamedTuple):
    """The four arrays every kernel reads (NHWC; an absent mask is an empty
    array), or their tangents or gradients. The primitives take them flat:
    `*ops`."""

    x: Any
    offset: Any
    mask: Any
    weight: Any


# The kernels as XLA sees them: split over a mesh by the rules in _sharding,
# vmappable by the rules in _batching.
_forward_call = _batching.vmappable_forward(_sharding.partitioned_forward(forward_p.bind))
_backward_call = _batching.vmappable_backward(_sharding.partitioned_backward(backward_p.bind))


def deform_conv2d_ffi(x, offset, mask, weight, bias, params: ConvParams, deterministic: bool):
    """NHWC operands, already checked; mask and bias may be None."""
    x, offset, mask, weight, bias = _vary_together(x, offset, mask, weight, bias)
    return _deform_conv2d(x, offset, mask, weight, bias, params, deterministic)


def _vary_together(*operands):
    """Inside shard_map, makes every operand vary over the manual axes any of
    them varies over, as jax does for its own primitives. The cast's
    transpose then sums, e.g., a replicated weight's gradient over the shards,
    and the backward's results have the types of the tangents they transpose."""
    axes = frozenset().union(*(varying_axes(jax.typeof(a)) for a in operands if a is not None))
    if not axes:
        return operands

    def cast(a):
        missing = tuple(sorted(axes - varying_axes(jax.typeof(a)), key=str))
        if not missing:
            return a
        if hasattr(jax.lax, "pcast"):
            return jax.lax.pcast(a, missing, to="varying")
        return jax.lax.pvary(a, missing)

    return tuple(None if a is None else cast(a) for a in operands)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6))
def _deform_conv2d(x, offset, mask, weight, bias, params: ConvParams, deterministic: bool):
    return _forward_call(
        x, offset, empty_like_absent(mask, x.dtype), weight,
        empty_like_absent(bias, x.dtype), params,
    )


@_deform_conv2d.defjvp
def _deform_conv2d_jvp(params, deterministic, primals, tangents):
    """y by the forward kernel; y_dot by tangent_p, linear in the tangents,
    whose transpose is the backward kernel (so reverse mode = one forward and
    one backward kernel); the bias' tangent is added outside."""
    *ops, bias = primals
    *dots, bias_dot = tangents
    ops, dots = Operands(*ops), Operands(*dots)
    y = _deform_conv2d(*ops, bias, params, deterministic)
    y_dot = tangent_p.bind(
        *ops._replace(mask=empty_like_absent(ops.mask, ops.x.dtype)),
        *dots._replace(mask=empty_like_absent(dots.mask, ops.x.dtype)),
        params=params, deterministic=deterministic,
    )
    if bias is not None:
        y_dot = _add_bias(y_dot, bias_dot)
    return y, y_dot


def _add_bias(y, bias):
    """y + bias in the kernels' accumulation type: its transpose, grad_bias, is
    then summed over (N, Ho, Wo) in float32 (float64), not in a 16-bit type."""
    acc = accum_dtype(y.dtype)
    return (y.astype(acc) + bias.astype(acc)).astype(y.dtype)


# ------------------------------------------------------- tangent_p: transpose, jvp


def _tangent_transpose(ct, *args, params, deterministic):
    """Cotangents of the four tangents (args: the operands, then their
    tangents): one backward kernel call."""
    ops, dots = Operands(*args[:4]), Operands(*args[4:])
    if any(ad.is_undefined_primal(a) for a in ops):
        raise ValueError("deform_conv2d's tangent is linear in the tangents only")
    if type(ct) is ad.Zero:
        return [None] * 8
    grads = _backward(ops, ct, params, deterministic)
    return [None] * 4 + [g if ad.is_undefined_primal(d) else None for g, d in zip(grads, dots)]


def _tangent_jvp(primals, tangents, *, params, deterministic):
    """d(tangent) = tangent_p at the new tangents (linear part, transposes to
    the backward kernel) + the second-order term in the primals' tangents,
    which has no kernel: the jvp of the pure-jnp reference's jvp."""
    out = tangent_p.bind(*primals, params=params, deterministic=deterministic)
    ops, dots = Operands(*primals[:4]), Operands(*primals[4:])
    ops_dot, dots_dot = Operands(*tangents[:4]), Operands(*tangents[4:])
    terms = []
    if any(type(t) is not ad.Zero for t in dots_dot):
        terms.append(tangent_p.bind(*ops, *map(ad.instantiate_zeros, dots_dot), params=params,
                                    deterministic=deterministic))
    if any(type(t) is not ad.Zero for t in ops_dot):
        f = reference_without_bias(params, *ops)

        def tangent(*ops):
            return jax.jvp(f, ops, tuple(dots))[1]

        terms.append(jax.jvp(tangent, tuple(ops), tuple(map(ad.instantiate_zeros, ops_dot)))[1])
    return out, functools.reduce(jnp.add, terms)


ad.primitive_jvps[tangent_p] = _tangent_jvp
ad.primitive_transposes[tangent_p] = _tangent_transpose


# ----------------------------------------------------------------- the backward


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _backward(ops: Operands, grad_y, params: ConvParams, deterministic: bool) -> Operands:
    """The gradients of the operands in their dtypes, by the backward kernel; an
    absent mask is an empty array, and so its gradient."""
    grads = _backward_call(*ops, grad_y.astype(ops.x.dtype), params, deterministic)
    return Operands(*(g.astype(a.dtype) for g, a in zip(grads, ops)))


@_backward.defjvp
def _backward_jvp(params, deterministic, primals, tangents):
    """Second order (grad of grad, hvp): the gradients by the kernel, their
    tangent by differentiating the pure-jnp reference's vjp. Written in jnp, it
    transposes and differentiates further like any jnp code."""
    ops, grad_y = primals
    out = _backward(ops, grad_y, params, deterministic)
    f = reference_without_bias(params, *ops)

    def grads(ops, grad_y):
        _, vjp = jax.vjp(f, *ops)
        return Operands(*(g.astype(a.dtype) for g, a in zip(vjp(grad_y.astype(ops.x.dtype)), ops)))

    return out, jax.jvp(grads, primals, tangents)[1]
