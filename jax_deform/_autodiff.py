"""Gradients of the FFI path: a custom VJP whose backward is one kernel call
(grad_x, grad_offset, grad_mask, grad_weight); grad_bias is a plain sum."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_deform import _batching, _sharding
from jax_deform._params import ConvParams, accum_dtype
from jax_deform._primitives import backward_p, empty_like_absent, forward_p, varying_axes

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
    and the backward's results have the types custom_vjp expects."""
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _deform_conv2d(x, offset, mask, weight, bias, params: ConvParams, deterministic: bool):
    return _forward_call(
        x, offset, empty_like_absent(mask, x.dtype), weight,
        empty_like_absent(bias, x.dtype), params,
    )


def _forward(x, offset, mask, weight, bias, params, deterministic):
    y = _deform_conv2d(x, offset, mask, weight, bias, params, deterministic)
    return y, (x, offset, mask, weight, bias)


def _backward(params, deterministic, residuals, grad_y):
    x, offset, mask, weight, bias = residuals
    grad_x, grad_offset, grad_mask, grad_weight = _backward_call(
        x, offset, empty_like_absent(mask, x.dtype), weight, grad_y.astype(x.dtype),
        params, deterministic,
    )
    grad_bias = None
    if bias is not None:
        grad_bias = jnp.sum(grad_y.astype(accum_dtype(x.dtype)), axis=(0, 1, 2)).astype(bias.dtype)
    return (
        grad_x.astype(x.dtype),
        grad_offset.astype(offset.dtype),
        None if mask is None else grad_mask.astype(mask.dtype),
        grad_weight.astype(weight.dtype),
        grad_bias,
    )


_deform_conv2d.defvjp(_forward, _backward)
