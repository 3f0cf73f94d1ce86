"""Pure-jnp depthwise deformable convolution: the "xla" implementation.

Written for reading, not speed: it gathers the four bilinear corners of every
(pixel, tap, channel) into one large array. It is the oracle of the tests and
the fallback wherever no kernel is built. Differentiable with jax.grad.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, auto_axes

from jax_deform import _sharding
from jax_deform._params import ConvParams, IntPair, Layout, Padding, check_arguments
from jax_deform._layout import from_nhwc, to_nhwc


def deform_conv2d(
    x,
    offset,
    weight,
    mask=None,
    bias=None,
    *,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    data_format: str = "NHWC",
):
    """Same arguments and result as `jax_deform.deform_conv2d`, in plain jnp."""
    params, layout = check_arguments(
        x, offset, weight, mask, bias, stride, padding, dilation, data_format
    )
    x, offset, mask = to_nhwc(data_format, x, offset, mask)
    y = deform_conv2d_nhwc(x, offset, weight, mask, bias, params, layout)
    return from_nhwc(data_format, y)


def deform_conv2d_nhwc(x, offset, weight, mask, bias, params: ConvParams, layout: Layout):
    """The computation on checked NHWC operands (mask and bias may be None)."""
    y_sharding = _sharding.forward_output_sharding(
        jax.typeof(x), jax.typeof(offset), jax.typeof(weight))
    if any(t == AxisType.Explicit for t in y_sharding.mesh.axis_types):
        # The gathers and reshapes below have no sharding-in-types rules for a
        # split batch or channel axis; XLA partitions them itself instead.
        compute = functools.partial(_deform_conv2d_nhwc, params=params, layout=layout)
        return auto_axes(compute, out_sharding=y_sharding)(x, offset, weight, mask, bias)
    return _deform_conv2d_nhwc(x, offset, weight, mask, bias, params=params, layout=layout)


def _deform_conv2d_nhwc(x, offset, weight, mask, bias, *, params: ConvParams, layout: Layout):
    out_dtype = x.dtype
    dtype = jnp.promote_types(x.dtype, jnp.float32)  # float32, or float64 for float64 input
    n, h, w, c = x.shape
    l = layout
    g, k, cg, m = l.groups, l.taps, l.c // l.groups, l.multiplier

    offset = offset.astype(dtype).reshape(n, l.ho, l.wo, g, k, 2)
    tap_i = jnp.arange(k) // l.kw
    tap_j = jnp.arange(k) % l.kw
    base_y = (jnp.arange(l.ho) * params.stride[0] - params.padding[0])[:, None] + (
        tap_i * params.dilation[0]
    )  # (Ho, K)
    base_x = (jnp.arange(l.wo) * params.stride[1] - params.padding[1])[:, None] + (
        tap_j * params.dilation[1]
    )  # (Wo, K)
    py = base_y[None, :, None, None, :].astype(dtype) + offset[..., 0]  # (N, Ho, Wo, G, K)
    px = base_x[None, None, :, None, :].astype(dtype) + offset[..., 1]

    # torchvision's rule: a sample counts only when -1 < y < H and -1 < x < W.
    inside = (py > -1) & (py < h) & (px > -1) & (px < w)
    py_safe = jnp.where(inside, py, 0)  # keeps floor/int casts finite for inf and 1e30
    px_safe = jnp.where(inside, px, 0)
    y0 = jnp.floor(py_safe)
    x0 = jnp.floor(px_safe)
    ly, lx = py_safe - y0, px_safe - x0
    y0 = y0.astype(jnp.int32)
    x0 = x0.astype(jnp.int32)

    xg = x.astype(dtype).reshape(n, h * w, g, cg)
    batch_idx = jnp.arange(n)[:, None, None, None, None]
    group_idx = jnp.arange(g)[None, None, None, :, None]
    value = jnp.zeros((n, l.ho, l.wo, g, k, cg), dtype)
    for dy, dx, weight_y, weight_x in (
        (0, 0, 1 - ly, 1 - lx),
        (0, 1, 1 - ly, lx),
        (1, 0, ly, 1 - lx),
        (1, 1, ly, lx),
    ):
        yy, xx = y0 + dy, x0 + dx
        corner_in = inside & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        flat = jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1)
        corner = xg[batch_idx, flat, group_idx]  # (N, Ho, Wo, G, K, Cg)
        corner = jnp.where(corner_in[..., None], corner, 0)
        value = value + (weight_y * weight_x * corner_in)[..., None] * corner
    # A NaN sample position yields NaN: the divergence must stay visible.
    value = jnp.where((jnp.isnan(py) | jnp.isnan(px))[..., None], jnp.nan, value)
    if mask is not None:
        value = value * mask.astype(dtype).reshape(n, l.ho, l.wo, g, k)[..., None]

    # (N, Ho, Wo, G, K, Cg) -> (N, Ho, Wo, K, C), then the depthwise weights.
    value = jnp.moveaxis(value, 4, 3).reshape(n, l.ho, l.wo, k, c)
    wk = weight.astype(dtype).reshape(k, c, m)
    y = jnp.einsum("nhwkc,kcm->nhwcm", value, wk, precision=lax.Precision.HIGHEST)
    y = y.reshape(n, l.ho, l.wo, c * m)
    if bias is not None:
        y = y + bias.astype(dtype)
    return y.astype(out_dtype)
