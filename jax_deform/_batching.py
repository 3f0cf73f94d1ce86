"""vmap rules for the primitives: a batch axis is folded into the operands the
kernels already loop over, so vmap costs one kernel launch, never a loop.

* Forward with unbatched weight and bias: the batch axis joins N.
* Otherwise (batched weight or bias, and always for the backward, whose
  grad_weight must stay per batch element): the batch axis joins the channels.
  Depthwise channels are independent, and giving each batch element its own
  offset groups (G' = B*G) keeps every channel reading its own offsets.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.interpreters import batching

from jax_deform._primitives import backward_p, forward_p


def _batch_first(a, dim, size):
    if dim is None:
        return jnp.broadcast_to(a, (size,) + a.shape)
    return jnp.moveaxis(a, dim, 0)


def _fold_into_n(a, dim, size):
    a = _batch_first(a, dim, size)
    return a.reshape((size * a.shape[1],) + a.shape[2:])


def _fold_into_last(a, dim, size):
    """(B, ..., L) -> (..., B*L): the batch index becomes the major part of the last axis."""
    a = jnp.moveaxis(_batch_first(a, dim, size), 0, -2)
    return a.reshape(a.shape[:-2] + (size * a.shape[-1],))


def _unfold_last(a, size):
    """(..., B*L) -> (..., B, L), batch axis at ndim - 2."""
    return a.reshape(a.shape[:-1] + (size, a.shape[-1] // size))


def _batch_size(args, dims):
    return next(a.shape[d] for a, d in zip(args, dims) if d is not None)


def _optional(a, dim, fold, size):
    """Empty (absent) operands are never batched and stay empty."""
    return a if a.size == 0 and dim is None else fold(a, dim, size)


def _forward_batch(args, dims, *, params):
    x, offset, mask, weight, bias = args
    xd, od, md, wd, bd = dims
    size = _batch_size(args, dims)
    if wd is None and bd is None:
        y = forward_p.bind(
            _fold_into_n(x, xd, size),
            _fold_into_n(offset, od, size),
            _optional(mask, md, _fold_into_n, size),
            weight,
            bias,
            params=params,
        )
        return y.reshape((size, y.shape[0] // size) + y.shape[1:]), 0
    y = forward_p.bind(
        _fold_into_last(x, xd, size),
        _fold_into_last(offset, od, size),
        _optional(mask, md, _fold_into_last, size),
        _fold_into_last(weight, wd, size),
        _optional(bias, bd, _fold_into_last, size),
        params=params,
    )
    return _unfold_last(y, size), 3


def _backward_batch(args, dims, *, params, deterministic):
    x, offset, mask, weight, grad_y = args
    xd, od, md, wd, gd = dims
    size = _batch_size(args, dims)
    has_mask = mask.size > 0
    grads = backward_p.bind(
        _fold_into_last(x, xd, size),
        _fold_into_last(offset, od, size),
        _optional(mask, md, _fold_into_last, size),
        _fold_into_last(weight, wd, size),
        _fold_into_last(grad_y, gd, size),
        params=params,
        deterministic=deterministic,
    )
    grad_x, grad_offset, grad_mask, grad_weight = grads
    out = [_unfold_last(grad_x, size), _unfold_last(grad_offset, size)]
    if has_mask:
        out.append(_unfold_last(grad_mask, size))
        mask_dim = 3
    else:
        out.append(grad_mask)
        mask_dim = None
    out.append(_unfold_last(grad_weight, size))
    return out, [3, 3, mask_dim, 3]


batching.primitive_batchers[forward_p] = _forward_batch
batching.primitive_batchers[backward_p] = _backward_batch
