"""What the Flax NNX and Linen layers share: argument checks, padding, splitting
the offset predictor's output, and the cast-and-call of the op. Imports no
Flax module, so Linen users never import flax.nnx."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp

from jax_deform import _params
from jax_deform.api import deform_conv2d

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]
PaddingLike = Union[str, int, Sequence[int], Sequence[Sequence[int]]]


def _pair(name: str, value: int | Sequence[int] | None, minimum: int = 1) -> tuple[int, int]:
    """An int or ``(h, w)``, each >= ``minimum``; None means 1, flax's historical
    sentinel for strides and dilations."""
    if value is None:
        return (1, 1)
    return _params._pair(name, value, minimum, type_error=ValueError)


def normalize_padding(padding: PaddingLike):
    """``"SAME"``/``"VALID"`` or ``((top, bottom), (left, right))``.

    Follows flax's conventions: an int pads every side, ``(ph, pw)`` pads both
    sides of each axis. Padding modes other than zeros (``"CIRCULAR"``,
    ``"REFLECT"``, ``"CAUSAL"``) have no deformable counterpart and are rejected.
    """
    if isinstance(padding, str) and padding.upper() not in ("SAME", "VALID"):
        raise ValueError(
            f"padding {padding!r} is not supported: a deformable conv samples with zero "
            f"padding; use {_params.PADDING_FORMS}"
        )
    return _params.padding_spec(padding, type_error=ValueError)


class LayerGeometry(NamedTuple):
    """A layer's checked geometry, in the forms nnx.Conv and deform_conv2d take."""

    kernel_size: tuple[int, int]
    strides: tuple[int, int]
    padding: Any  # "SAME", "VALID" or ((top, bottom), (left, right))
    dilation: tuple[int, int]


def check_layer_arguments(
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] | None,
    padding: PaddingLike,
    kernel_dilation: int | Sequence[int] | None,
    depth_multiplier: int,
    offset_groups: int,
    channels: int | None,
    dtype: Dtype | None,
    implementation: str | None,
    deterministic: bool | None,
) -> LayerGeometry:
    """Checks the arguments the NNX and Linen layers share, so that a bad one
    fails here, named, and not later inside the offset predictor's conv."""
    ks = _params._pair("kernel_size", kernel_size, 1, type_error=ValueError)
    geometry = LayerGeometry(
        ks, _pair("strides", strides), normalize_padding(padding),
        _pair("kernel_dilation", kernel_dilation),
    )
    if not _params.is_int(depth_multiplier) or depth_multiplier < 1:
        raise ValueError(f"depth_multiplier must be an int >= 1, got {depth_multiplier!r}")
    if not _params.is_int(offset_groups) or offset_groups < 1:
        raise ValueError(f"offset_groups must be an int >= 1, got {offset_groups!r}")
    if channels is not None and channels % offset_groups:
        raise ValueError(
            f"offset_groups={offset_groups} must divide the number of input channels ({channels})"
        )
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype or None, got {jnp.dtype(dtype)}")
    _params.check_implementation(implementation)
    _params.check_deterministic(deterministic)
    return geometry


def check_input(x, in_features: int | None) -> int:
    """Checks a layer's input ``(N, H, W, C)``; returns C."""
    want = "(N, H, W, C) with C >= 1" if in_features is None else f"(N, H, W, {in_features})"
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x must be an array {want}, got {type(x).__name__}")
    shape = tuple(x.shape)
    if len(shape) != 4 or shape[-1] < 1 or (in_features is not None and shape[-1] != in_features):
        raise ValueError(f"x has shape {shape} but expected {want}")
    return shape[-1]


def split_prediction(pred: Array, offset_groups: int, taps: int, modulated: bool):
    """Splits the offset predictor's output into (offset, mask).

    Channels ``[0, 2*G*K)`` are offsets in the op's ``[g][k][(dy, dx)]`` order;
    with ``modulated`` the next ``G*K`` are mask logits, mapped through
    ``2 * sigmoid`` so that zero logits give a mask of exactly 1.
    """
    n_off = 2 * offset_groups * taps
    offset = pred[..., :n_off]
    mask = 2.0 * jax.nn.sigmoid(pred[..., n_off:]) if modulated else None
    return offset, mask


def offsets_for_call(
    predict_offsets: bool,
    offset,
    mask,
    predict: Callable[[], tuple],
    offset_groups: int,
    kernel_size: tuple[int, int],
):
    """The (offset, mask) a layer call uses: predicted by ``predict()`` when the
    layer predicts its own, else the caller's; shared by the NNX and Linen layers."""
    if predict_offsets:
        if offset is not None or mask is not None:
            raise ValueError(
                "this DeformConv predicts its own offsets; build it with "
                "predict_offsets=False to pass offset/mask"
            )
        return predict()
    if offset is None:
        raise ValueError("DeformConv(predict_offsets=False) needs an offset argument")
    # The op would take any G from the offsets; a G other than the layer's
    # offset_groups means the layer and its caller disagree.
    kh, kw = kernel_size
    want = 2 * offset_groups * kh * kw
    shape = tuple(getattr(offset, "shape", ()))
    if len(shape) == 4 and shape[-1] != want:
        raise ValueError(
            f"offset has shape {shape} but this DeformConv (offset_groups={offset_groups}, "
            f"kernel {kh}x{kw}) expects (N, Ho, Wo, 2*G*kh*kw) = (N, Ho, Wo, {want})"
        )
    return offset, mask


def deform_conv_in_dtype(dtype, x, offset, kernel, mask, bias, **kwargs) -> Array:
    """deform_conv2d with every operand cast to the layer's computation dtype
    (the op wants one dtype throughout); shared by the NNX and Linen layers."""
    cast = lambda a: None if a is None else jnp.asarray(a, dtype)  # noqa: E731
    return deform_conv2d(cast(x), cast(offset), cast(kernel), cast(mask), cast(bias), **kwargs)
