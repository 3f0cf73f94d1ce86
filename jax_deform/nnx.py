"""Flax NNX layer: depthwise deformable convolution that predicts its own offsets.

Needs the optional ``flax`` extra; ``import jax_deform`` alone never imports flax::

    from jax_deform import nnx as dnnx
    layer = dnnx.DeformConv(32, (3, 3), modulated=True, rngs=nnx.Rngs(0))
    y = layer(x)                      # x: (N, H, W, 32) -> y: (N, H, W, 32)

At initialization the layer computes exactly a plain depthwise convolution with
the same kernel: the offset predictor's kernel and bias start at zero, so the
offsets are zero, and the modulation mask is ``2 * sigmoid(logits)``, which is
exactly 1 at zero logits (a plain ``sigmoid`` would start at 0.5 and halve the
output).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jax_deform import _params
from jax_deform._flax_common import (
    Array,
    Dtype,
    Initializer,
    PaddingLike,
    _pair,
    check_input,
    check_layer_arguments,
    deform_conv_in_dtype,
    offsets_for_call,
    split_prediction,
)

__all__ = ["DeformConv", "from_depthwise_conv"]

default_kernel_init = nnx.initializers.lecun_normal()


class DeformConv(nnx.Module):
    """Depthwise deformable convolution (DCNv1, or DCNv2 with ``modulated=True``).

    Parameters:
      ``kernel``: ``(kh, kw, 1, C*M)``, the same layout as a depthwise
        ``nnx.Conv(C, C*M, kernel_size, feature_group_count=C)``;
      ``bias``: ``(C*M,)`` when ``use_bias``;
      ``offset_conv``: an ``nnx.Conv(C, P, kernel_size)`` with the same strides,
        padding and dilation, ``P = 2*G*kh*kw`` (``3*G*kh*kw`` if modulated),
        kernel and bias initialized to zero. Only present when ``predict_offsets``.

    With ``predict_offsets=False`` the layer holds no offset predictor and the
    caller passes ``offset`` (and optionally ``mask``, used as is) to
    ``__call__``, like ``torchvision.ops.DeformConv2d``.

    Args:
      in_features: input channels C.
      kernel_size: ``(kh, kw)``; an int means a square kernel.
      depth_multiplier: M, output channels per input channel (output has C*M).
      strides, kernel_dilation: int or ``(h, w)``.
      padding: ``"SAME"`` (default, as nnx.Conv), ``"VALID"``, int, ``(ph, pw)``
        or ``((top, bottom), (left, right))``; zero padding only.
      offset_groups: G, channel groups that share one offset field; divides C.
      modulated: also predict a mask ``2*sigmoid(logits)`` in ``(0, 2)`` (DCNv2).
      predict_offsets: create the offset predictor (default) or take offsets
        from the caller.
      use_bias: add ``bias``.
      dtype: computation dtype (default: inferred from input and params).
        The offsets and mask are computed in it as well.
      param_dtype: dtype of all parameters.
      precision: passed to the offset predictor's ``lax.conv_general_dilated``
        (the deformable op itself accumulates in float32).
      kernel_init, bias_init: initializers of ``kernel`` and ``bias``.
      offset_kernel_init, offset_bias_init: initializers of the predictor
        (default zeros: the layer starts as a plain depthwise conv). Wrap any
        initializer with ``nnx.with_partitioning(init, axes)`` to annotate the
        parameter for sharding, as for nnx.Conv.
      implementation, deterministic: passed to `jax_deform.deform_conv2d`
        (``deterministic`` is about bitwise-reproducible gradients, not dropout).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        in_features: int,
        kernel_size: int | Sequence[int],
        *,
        depth_multiplier: int = 1,
        strides: int | Sequence[int] = 1,
        padding: PaddingLike = "SAME",
        kernel_dilation: int | Sequence[int] = 1,
        offset_groups: int = 1,
        modulated: bool = False,
        predict_offsets: bool = True,
        use_bias: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = nnx.initializers.zeros_init(),
        offset_kernel_init: Initializer = nnx.initializers.zeros_init(),
        offset_bias_init: Initializer = nnx.initializers.zeros_init(),
        implementation: str | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs,
    ):
        if not _params.is_int(in_features) or in_features < 1:
            raise ValueError(f"in_features must be an int >= 1, got {in_features!r}")
        geometry = check_layer_arguments(
            kernel_size, strides, padding, kernel_dilation, depth_multiplier, offset_groups,
            in_features, dtype, implementation, deterministic,
        )
        kh, kw = geometry.kernel_size
        self.in_features = in_features
        self.out_features = in_features * depth_multiplier
        self.kernel_size = (kh, kw)
        self.depth_multiplier = depth_multiplier
        self.strides = geometry.strides
        self.padding = geometry.padding
        self.kernel_dilation = geometry.dilation
        self.offset_groups = offset_groups
        self.modulated = modulated
        self.predict_offsets = predict_offsets
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.implementation = implementation
        self.deterministic = deterministic

        self.kernel = nnx.Param(
            kernel_init(rngs.params(), (kh, kw, 1, self.out_features), param_dtype)
        )
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), (self.out_features,), param_dtype))
        else:
            self.bias = nnx.data(None) if hasattr(nnx, "data") else None
        if predict_offsets:
            taps = kh * kw
            self.offset_conv = nnx.Conv(
                in_features,
                (3 if modulated else 2) * offset_groups * taps,
                (kh, kw),
                strides=self.strides,
                padding=self.padding,
                kernel_dilation=self.kernel_dilation,
                dtype=dtype,
                param_dtype=param_dtype,
                precision=precision,
                kernel_init=offset_kernel_init,
                bias_init=offset_bias_init,
                rngs=rngs,
            )
        else:
            self.offset_conv = None

    def sampling_offsets(self, x: Array) -> tuple[Array, Array | None]:
        """The offsets (and mask) the layer predicts for ``x``, e.g. for `jax_deform.viz`.

        Args:
          x: ``(N, H, W, C)``.

        Returns:
          ``offset`` ``(N, Ho, Wo, 2*G*kh*kw)`` and ``mask`` ``(N, Ho, Wo, G*kh*kw)``
          (None unless ``modulated``).
        """
        if not self.predict_offsets:
            raise ValueError(
                "this DeformConv was built with predict_offsets=False and has no offset "
                "predictor; it takes its offsets from the caller"
            )
        check_input(x, self.in_features)
        kh, kw = self.kernel_size
        return split_prediction(self.offset_conv(x), self.offset_groups, kh * kw, self.modulated)

    def __call__(
        self, x: Array, offset: Array | None = None, mask: Array | None = None
    ) -> Array:
        """Applies the layer.

        Args:
          x: ``(N, H, W, C)``.
          offset: only with ``predict_offsets=False`` (then required):
            ``(N, Ho, Wo, 2*G*kh*kw)`` with ``G = offset_groups``, in the op's
            ``[g][k][(dy, dx)]`` order.
          mask: only with ``predict_offsets=False``: ``(N, Ho, Wo, G*kh*kw)``,
            used as is (no sigmoid).

        Returns:
          ``(N, Ho, Wo, C*M)`` in the computation dtype.
        """
        check_input(x, self.in_features)
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        dtype = self.dtype or jnp.result_type(x.dtype, kernel.dtype)
        offset, mask = offsets_for_call(
            self.predict_offsets, offset, mask, lambda: self.sampling_offsets(x),
            self.offset_groups, self.kernel_size,
        )
        return deform_conv_in_dtype(
            dtype,
            x,
            offset,
            kernel,
            mask,
            bias,
            stride=self.strides,
            padding=self.padding,
            dilation=self.kernel_dilation,
            implementation=self.implementation,
            deterministic=self.deterministic,
        )


def _depthwise_geometry(conv: nnx.Conv) -> tuple[int, int]:
    """(C, M) of a depthwise 2D nnx.Conv, or a ValueError saying why it is not one."""
    kernel_size = tuple(conv.kernel_size)
    c, groups = conv.in_features, conv.feature_group_count
    if len(kernel_size) != 2:
        raise ValueError(f"only 2D convolutions can be converted, got kernel_size {kernel_size}")
    if groups != c or conv.out_features % c:
        raise ValueError(
            "the conv is not depthwise: need feature_group_count == in_features and "
            f"out_features a multiple of it, got in_features={c}, "
            f"feature_group_count={groups}, out_features={conv.out_features}"
        )
    if _pair("input_dilation", conv.input_dilation) != (1, 1):
        raise ValueError(
            f"the conv has input_dilation={conv.input_dilation!r}; convs with input dilation "
            "(transposed convs) cannot be converted"
        )
    if getattr(conv, "mask", None) is not None:
        raise ValueError("the conv has a kernel mask; masked convs cannot be converted")
    return c, conv.out_features // c


def from_depthwise_conv(
    conv: nnx.Conv,
    *,
    offset_groups: int = 1,
    modulated: bool = False,
    rngs: nnx.Rngs | None = None,
    **kwargs: Any,
) -> DeformConv:
    """A `DeformConv` that computes exactly what a trained depthwise ``conv`` does.

    The kernel and bias are copied (as new arrays), strides, padding, dilation,
    dtype, param_dtype and precision taken over, and the offset predictor starts
    at zero, so the result equals ``conv(x)`` until it is trained.

    Args:
      conv: a depthwise 2D ``nnx.Conv`` (``feature_group_count == in_features``).
      offset_groups, modulated: as for `DeformConv`.
      rngs: only used for initializers that draw random numbers (default ``Rngs(0)``).
      **kwargs: other `DeformConv` arguments (e.g. ``offset_kernel_init``).

    Raises:
      ValueError: if ``conv`` is not a depthwise 2D convolution with zero padding.
    """
    if not isinstance(conv, nnx.Conv):
        raise ValueError(f"conv must be an nnx.Conv, got {type(conv).__name__}")
    c, m = _depthwise_geometry(conv)
    layer = DeformConv(
        c,
        tuple(conv.kernel_size),
        depth_multiplier=m,
        strides=_pair("strides", conv.strides),
        padding=conv.padding,
        kernel_dilation=_pair("kernel_dilation", conv.kernel_dilation),
        offset_groups=offset_groups,
        modulated=modulated,
        use_bias=conv.bias is not None,
        dtype=conv.dtype,
        param_dtype=conv.param_dtype,
        precision=conv.precision,
        rngs=rngs if rngs is not None else nnx.Rngs(0),
        **kwargs,
    )
    layer.kernel[...] = jnp.array(conv.kernel[...], dtype=layer.kernel[...].dtype)
    if conv.bias is not None:
        layer.bias[...] = jnp.array(conv.bias[...], dtype=layer.bias[...].dtype)
    return layer
