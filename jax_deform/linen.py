"""Flax Linen layer: depthwise deformable convolution that predicts its own offsets.

Needs the optional ``flax`` extra; ``import jax_deform`` alone never imports flax::

    from jax_deform import linen as dlinen
    layer = dlinen.DeformConv(kernel_size=(3, 3), modulated=True)
    variables = layer.init(key, x)    # x: (N, H, W, C)
    y = layer.apply(variables, x)     # (N, H, W, C)

Same design as `jax_deform.nnx.DeformConv`: at initialization the offset
predictor's kernel and bias are zero and the mask is ``2 * sigmoid(0) = 1``,
so the layer computes exactly a plain depthwise convolution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from jax_deform._flax_common import (
    LayerGeometry,
    PaddingLike,
    _pair,
    check_input,
    check_layer_arguments,
    deform_conv_in_dtype,
    normalize_padding,
    offsets_for_call,
    split_prediction,
)

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

__all__ = ["DeformConv", "from_depthwise_conv"]


class DeformConv(nn.Module):
    """Depthwise deformable convolution (DCNv1, or DCNv2 with ``modulated=True``).

    Parameters (collection ``params``):
      ``kernel``: ``(kh, kw, 1, C*M)``, the layout of a depthwise
        ``nn.Conv(features=C*M, feature_group_count=C)``;
      ``bias``: ``(C*M,)`` when ``use_bias``;
      ``offset_conv``: ``{"kernel": (kh, kw, C, P), "bias": (P,)}``, a plain
        ``nn.Conv`` with the same strides, padding and dilation, where
        ``P = 2*G*kh*kw`` (``3*G*kh*kw`` if modulated), initialized to zero.
        Only present when ``predict_offsets``.

    Attributes:
      kernel_size: ``(kh, kw)``; an int means a square kernel.
      depth_multiplier: M; the output has C*M channels (C is read from the input).
      strides, kernel_dilation: int or ``(h, w)``.
      padding: ``"SAME"`` (default, as nn.Conv), ``"VALID"``, int, ``(ph, pw)``
        or ``((top, bottom), (left, right))``; zero padding only.
      offset_groups: G, channel groups sharing one offset field; divides C.
      modulated: also predict a mask ``2*sigmoid(logits)`` in ``(0, 2)`` (DCNv2).
      predict_offsets: create the offset predictor (default), or take ``offset``
        (and optionally ``mask``, used as is) from the caller in ``__call__``.
      use_bias, dtype, param_dtype: as nn.Conv (dtype is the computation dtype,
        default inferred from input and params).
      precision: for the offset predictor's convolution.
      kernel_init, bias_init, offset_kernel_init, offset_bias_init: initializers;
        wrap them with ``nn.with_logical_partitioning(init, names)`` to annotate
        parameters with logical axis names.
      implementation, deterministic: passed to `jax_deform.deform_conv2d`
        (``deterministic`` is about bitwise-reproducible gradients, not dropout).
    """

    kernel_size: int | Sequence[int]
    depth_multiplier: int = 1
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    offset_groups: int = 1
    modulated: bool = False
    predict_offsets: bool = True
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()
    offset_kernel_init: Initializer = nn.initializers.zeros_init()
    offset_bias_init: Initializer = nn.initializers.zeros_init()
    implementation: str | None = None
    deterministic: bool | None = None

    def _checked(self, channels: int) -> LayerGeometry:
        """The attributes, checked against C = ``channels`` input channels."""
        return check_layer_arguments(
            self.kernel_size, self.strides, self.padding, self.kernel_dilation,
            self.depth_multiplier, self.offset_groups, channels, self.dtype,
            self.implementation, self.deterministic,
        )

    @nn.compact
    def __call__(
        self, x: Array, offset: Array | None = None, mask: Array | None = None
    ) -> Array:
        """Applies the layer.

        Args:
          x: ``(N, H, W, C)``.
          offset: only with ``predict_offsets=False`` (then required):
            ``(N, Ho, Wo, 2*G*kh*kw)`` with ``G = offset_groups``, order ``[g][k][(dy, dx)]``.
          mask: only with ``predict_offsets=False``: ``(N, Ho, Wo, G*kh*kw)``, used as is.

        Returns:
          ``(N, Ho, Wo, C*M)`` in the computation dtype.
        """
        c = check_input(x, None)
        (kh, kw), strides, padding, dilation = self._checked(c)

        kernel = self.param(
            "kernel", self.kernel_init, (kh, kw, 1, c * self.depth_multiplier), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (c * self.depth_multiplier,), self.param_dtype)
            if self.use_bias
            else None
        )
        dtype = self.dtype or jnp.result_type(x.dtype, kernel.dtype)
        def predict():
            pred = nn.Conv(
                (3 if self.modulated else 2) * self.offset_groups * kh * kw,
                (kh, kw),
                strides=strides,
                padding=padding,
                kernel_dilation=dilation,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                precision=self.precision,
                kernel_init=self.offset_kernel_init,
                bias_init=self.offset_bias_init,
                name="offset_conv",
            )(x)
            return split_prediction(pred, self.offset_groups, kh * kw, self.modulated)

        offset, mask = offsets_for_call(
            self.predict_offsets, offset, mask, predict, self.offset_groups, (kh, kw)
        )
        return deform_conv_in_dtype(
            dtype,
            x,
            offset,
            kernel,
            mask,
            bias,
            stride=strides,
            padding=padding,
            dilation=dilation,
            implementation=self.implementation,
            deterministic=self.deterministic,
        )


def from_depthwise_conv(
    conv: nn.Conv,
    conv_params: Mapping[str, Any],
    *,
    offset_groups: int = 1,
    modulated: bool = False,
    **overrides: Any,
) -> tuple[DeformConv, dict]:
    """A `DeformConv` and its params that compute exactly what a trained
    depthwise ``nn.Conv`` does.

    Args:
      conv: the depthwise ``nn.Conv`` module (``feature_group_count`` = number
        of input channels C, ``features`` = C*M); its strides, padding,
        dilation, dtypes and precision are taken over.
      conv_params: its params, ``{"kernel": (kh, kw, 1, C*M), "bias": (C*M,)}``
        (or ``{"params": {...}}``); logically partitioned boxes are unboxed.
      offset_groups, modulated: as for `DeformConv`.
      **overrides: other `DeformConv` attributes.

    Returns:
      ``(module, params)``: ``params`` holds copies of kernel and bias and a
      zero offset predictor, ready for ``module.apply({"params": params}, x)``
      or to replace the conv's entry in a larger model's params.

    Raises:
      ValueError: if ``conv`` is not a depthwise 2D convolution with zero padding,
        or the params do not match it.
    """
    if not isinstance(conv, nn.Conv):
        raise ValueError(f"conv must be an nn.Conv, got {type(conv).__name__}")
    if not isinstance(conv_params, Mapping):
        raise ValueError(
            "conv_params must be the conv's params, {'kernel': ..., 'bias': ...} or "
            f"{{'params': {{...}}}}, got {type(conv_params).__name__}"
        )
    params = nn.unbox(dict(conv_params))
    if "params" in params and "kernel" not in params:
        params = dict(params["params"])
    if "kernel" not in params:
        raise ValueError(f"conv_params has no 'kernel' (keys: {sorted(params)})")
    kernel = params["kernel"]
    c = conv.feature_group_count
    if kernel.ndim != 4:
        raise ValueError(f"only 2D convolutions can be converted, got kernel shape {kernel.shape}")
    if kernel.shape[2] != 1 or conv.features % c:
        raise ValueError(
            "the conv is not depthwise: need a kernel (kh, kw, 1, C*M) with "
            f"feature_group_count = C; got kernel shape {tuple(kernel.shape)}, "
            f"feature_group_count={c}, features={conv.features}"
        )
    ks = conv.kernel_size
    conv_kernel_size = tuple(ks) if isinstance(ks, Sequence) else (ks,)
    if tuple(kernel.shape) != (*conv_kernel_size, 1, conv.features):
        # Most likely the params of another layer.
        raise ValueError(
            f"conv_params['kernel'] has shape {tuple(kernel.shape)} but the conv "
            f"(kernel_size={conv_kernel_size}, features={conv.features}) expects "
            f"{(*conv_kernel_size, 1, conv.features)}"
        )
    if _pair("input_dilation", conv.input_dilation) != (1, 1):
        raise ValueError(
            f"the conv has input_dilation={conv.input_dilation!r}; convs with input dilation "
            "(transposed convs) cannot be converted"
        )
    if conv.mask is not None:
        raise ValueError("the conv has a kernel mask; masked convs cannot be converted")
    if conv.use_bias != ("bias" in params):
        has = "has a" if "bias" in params else "has no"
        raise ValueError(
            f"conv.use_bias={conv.use_bias} but conv_params {has} 'bias' (keys: {sorted(params)})"
        )
    if conv.use_bias and tuple(jnp.shape(params["bias"])) != (conv.features,):
        raise ValueError(
            f"conv_params['bias'] has shape {tuple(jnp.shape(params['bias']))} but expected "
            f"({conv.features},) = (features,)"
        )
    kh, kw = kernel.shape[:2]
    attrs = dict(
        kernel_size=(kh, kw),
        depth_multiplier=conv.features // c,
        strides=_pair("strides", conv.strides),
        padding=normalize_padding(conv.padding),
        kernel_dilation=_pair("kernel_dilation", conv.kernel_dilation),
        offset_groups=offset_groups,
        modulated=modulated,
        use_bias=conv.use_bias,
        dtype=conv.dtype,
        param_dtype=conv.param_dtype,
        precision=conv.precision,
    )
    attrs.update(overrides)
    module = DeformConv(**attrs)
    module._checked(c)  # the overrides too, before any params are built from them
    param_dtype = module.param_dtype
    new = {"kernel": jnp.array(kernel, dtype=param_dtype)}
    if conv.use_bias:
        new["bias"] = jnp.array(params["bias"], dtype=param_dtype)
    if module.predict_offsets:
        p = (3 if module.modulated else 2) * module.offset_groups * kh * kw
        new["offset_conv"] = {
            "kernel": jnp.zeros((kh, kw, c, p), param_dtype),
            "bias": jnp.zeros((p,), param_dtype),
        }
    return module, new
