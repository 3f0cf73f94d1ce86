"""Moves operands between the caller's data_format and the kernels' NHWC."""

from __future__ import annotations

import jax.numpy as jnp


def to_nhwc(data_format: str, *arrays):
    """Transposes each (N, C, H, W) array to (N, H, W, C); None passes through."""
    if data_format == "NHWC":
        return arrays
    return tuple(None if a is None else jnp.transpose(a, (0, 2, 3, 1)) for a in arrays)


def from_nhwc(data_format: str, y):
    """Inverse of to_nhwc for the result."""
    return y if data_format == "NHWC" else jnp.transpose(y, (0, 3, 1, 2))
