"""Shardings of the primitives' outputs (sharding in types, Explicit mesh axes)."""

from __future__ import annotations


def _spec(aval):
    sharding = getattr(aval, "sharding", None)
    return None if sharding is None else sharding


def like(aval):
    """Output sharded exactly like the given operand."""
    return _spec(aval)


def output_sharding(x, ho, wo):
    """The forward output keeps x's batch and channel sharding; spatial axes
    change size, so they are replicated unless the size is unchanged."""
    sharding = _spec(x)
    if sharding is None:
        return None
    spec = tuple(sharding.spec) + (None,) * (4 - len(sharding.spec))
    n_ax, h_ax, w_ax, c_ax = spec
    h_ax = h_ax if ho == x.shape[1] else None
    w_ax = w_ax if wo == x.shape[2] else None
    return sharding.update(spec=type(sharding.spec)(n_ax, h_ax, w_ax, c_ax))
