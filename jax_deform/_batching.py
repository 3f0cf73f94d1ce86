"""vmap rules for the primitives: a batch axis is folded into the operands the
kernels already loop over, so vmap costs one kernel launch, never a loop.

* Forward with unbatched weight and bias: the batch axis joins N.
* Otherwise (batched weight or bias, and always for the backward, whose
  grad_weight must stay per batch element): the batch axis joins the channels.
  Depthwise channels are independent, and giving each batch element its own
  offset groups (G' = B*G) keeps every channel reading its own offsets.

The tangent primitive (forward mode) folds as the forward does, each tangent
with its primal.

The same folding serves the primitives and the partitioned calls that wrap
them (custom_vmap), so a vmapped call stays one partitioned kernel call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from jax.interpreters import batching

from jax_deform._primitives import backward_p, forward_p, tangent_p


def _batch_first(a, dim, size):
    if dim is None:
        return jnp.broadcast_to(a, (size,) + a.shape)
    return jnp.moveaxis(a, dim, 0)


def _fold_into_n(a, dim, size):
    a = _batch_first(a, dim, size)
    return a.reshape((size * a.shape[1],) + a.shape[2:])


def _explicit_spec(a):
    """a's PartitionSpec entries (padded to its rank) when a is sharded over
    Explicit mesh axes, else None."""
    sharding = getattr(jax.typeof(a), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or AxisType.Explicit not in tuple(getattr(mesh, "axis_types", ())):
        return None
    spec = tuple(sharding.spec)
    return spec + (None,) * (a.ndim - len(spec))


def _reshape_sharded(a, shape, spec):
    """Reshape to `shape` with the result sharded as `spec` on a's mesh."""
    return jax.lax.reshape(a, shape, out_sharding=jax.typeof(a).sharding.update(spec=P(*spec)))


def _fold_into_last(a, dim, size):
    """(B, ..., L) -> (..., B*L): the batch index becomes the major part of the last axis.
    A channel axis sharded over Explicit mesh axes stays sharded over them
    (JAX cannot infer that for a merge with the batch; it moves the data)."""
    a = jnp.moveaxis(_batch_first(a, dim, size), 0, -2)
    shape = a.shape[:-2] + (size * a.shape[-1],)
    spec = _explicit_spec(a)
    if spec is None or spec[-1] is None:
        return a.reshape(shape)
    return _reshape_sharded(a, shape, (*spec[:-2], spec[-1]))


def _unfold_last(a, size):
    """(..., B*L) -> (..., B, L), batch axis at ndim - 2; a sharded last axis
    (Explicit) stays sharded as L."""
    shape = a.shape[:-1] + (size, a.shape[-1] // size)
    spec = _explicit_spec(a)
    if spec is None or spec[-1] is None:
        return a.reshape(shape)
    return _reshape_sharded(a, shape, (*spec[:-1], None, spec[-1]))


def _batch_size(args, dims):
    return next(a.shape[d] for a, d in zip(args, dims) if d is not None)


def _optional(a, dim, fold, size):
    """Empty (absent) operands are never batched and stay empty."""
    return a if a.size == 0 and dim is None else fold(a, dim, size)


def _forward_folded(call, args, dims, size):
    """Runs call(x, offset, mask, weight, bias) once on the folded batch;
    returns y and the axis of y that holds the batch."""
    x, offset, mask, weight, bias = args
    xd, od, md, wd, bd = dims
    if wd is None and bd is None:
        y = call(
            _fold_into_n(x, xd, size),
            _fold_into_n(offset, od, size),
            _optional(mask, md, _fold_into_n, size),
            weight,
            bias,
        )
        return y.reshape((size, y.shape[0] // size) + y.shape[1:]), 0
    y = call(
        _fold_into_last(x, xd, size),
        _fold_into_last(offset, od, size),
        _optional(mask, md, _fold_into_last, size),
        _fold_into_last(weight, wd, size),
        _optional(bias, bd, _fold_into_last, size),
    )
    return _unfold_last(y, size), 3


def _backward_folded(call, args, dims, size):
    """Runs call(x, offset, mask, weight, grad_y) -> 4 gradients once with the
    batch folded into the channels; returns the gradients and their batch axes."""
    x, offset, mask, weight, grad_y = args
    xd, od, md, wd, gd = dims
    has_mask = mask.size > 0
    grads = call(
        _fold_into_last(x, xd, size),
        _fold_into_last(offset, od, size),
        _optional(mask, md, _fold_into_last, size),
        _fold_into_last(weight, wd, size),
        _fold_into_last(grad_y, gd, size),
    )
    # The batch lands just before the last axis (after any leading partial-sum axis).
    out, out_dims = [], []
    for i, g in enumerate(grads):
        if i == 2 and not has_mask:
            out.append(g)
            out_dims.append(None)
        else:
            out.append(_unfold_last(g, size))
            out_dims.append(g.ndim - 1)
    return out, out_dims


def _tangent_folded(call, args, dims, size):
    """As _forward_folded, for call(x, offset, mask, weight, x_dot, offset_dot,
    mask_dot, weight_dot): each tangent folds as its primal does."""
    into_channels = dims[3] is not None or dims[7] is not None  # a weight is batched
    fold = _fold_into_last if into_channels else _fold_into_n

    def folded(i, a, d):
        role = i % 4  # x, offset, mask, weight
        if role == 3 and not into_channels:
            return a
        return _optional(a, d, fold, size) if role == 2 else fold(a, d, size)

    y = call(*(folded(i, a, d) for i, (a, d) in enumerate(zip(args, dims))))
    if into_channels:
        return _unfold_last(y, size), 3
    return y.reshape((size, y.shape[0] // size) + y.shape[1:]), 0


def _forward_batch(args, dims, *, params):
    call = functools.partial(_bind_forward, params=params)
    return _forward_folded(call, args, dims, _batch_size(args, dims))


def _bind_forward(*args, params):
    return forward_p.bind(*args, params=params)


def _backward_batch(args, dims, *, params, deterministic, partials):
    def call(*a):
        return backward_p.bind(*a, params=params, deterministic=deterministic,
                               partials=partials)

    return _backward_folded(call, args, dims, _batch_size(args, dims))


def _tangent_batch(args, dims, *, params, deterministic):
    def call(*a):
        return tangent_p.bind(*a, params=params, deterministic=deterministic)

    return _tangent_folded(call, args, dims, _batch_size(args, dims))


batching.primitive_batchers[forward_p] = _forward_batch
batching.primitive_batchers[tangent_p] = _tangent_batch
batching.primitive_batchers[backward_p] = _backward_batch


# The partitioned calls (see _sharding) are custom_partitioning functions,
# which have no vmap rule of their own; custom_vmap gives them the same folding.


def _batched_at_0(in_batched):
    return [0 if b else None for b in in_batched]


def vmappable_forward(forward):
    """forward(x, offset, mask, weight, bias, params) made vmappable."""

    def call(x, offset, mask, weight, bias, params):
        @custom_vmap
        def f(x, offset, mask, weight, bias):
            return forward(x, offset, mask, weight, bias, params)

        @f.def_vmap
        def rule(axis_size, in_batched, *args):
            folded = functools.partial(call, params=params)
            y, dim = _forward_folded(folded, args, _batched_at_0(in_batched), axis_size)
            return jnp.moveaxis(y, dim, 0), True

        return f(x, offset, mask, weight, bias)

    return call


def vmappable_backward(backward):
    """backward(x, offset, mask, weight, grad_y, params, deterministic) made vmappable."""

    def call(x, offset, mask, weight, grad_y, params, deterministic):
        @custom_vmap
        def f(x, offset, mask, weight, grad_y):
            return tuple(backward(x, offset, mask, weight, grad_y, params, deterministic))

        @f.def_vmap
        def rule(axis_size, in_batched, *args):
            def folded(*a):
                return call(*a, params=params, deterministic=deterministic)

            grads, dims = _backward_folded(folded, args, _batched_at_0(in_batched), axis_size)
            out = tuple(g if d is None else jnp.moveaxis(g, d, 0) for g, d in zip(grads, dims))
            return out, tuple(d is not None for d in dims)

        return f(x, offset, mask, weight, grad_y)

    return call
