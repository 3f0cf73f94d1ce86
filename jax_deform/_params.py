"""Argument checking and normalization for deform_conv2d.

Everything a user can get wrong is caught here, before tracing reaches a
kernel, with a message that names the argument, what it got and what it
expected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Union

import numpy as np

IntPair = Union[int, Sequence[int]]
Padding = Union[str, int, Sequence[int], Sequence[Sequence[int]]]

KERNEL_DTYPES = ("float32", "bfloat16", "float16", "float64")
FLOAT_DTYPES = KERNEL_DTYPES
IMPLEMENTATIONS = (None, "auto", "ffi", "xla")


def accum_dtype(dtype) -> np.dtype:
    """What the kernels compute in, and the dtype of their gradients: float64
    for float64 operands, float32 for float32 and the 16-bit dtypes."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


@dataclasses.dataclass(frozen=True)
class ConvParams:
    """Static geometry of one call, hashable so it can be a primitive parameter."""

    stride: tuple[int, int]
    padding: tuple[int, int]  # (top, left); bottom/right only set the output size
    dilation: tuple[int, int]
    # implementation='ffi': a platform without a compiled kernel is an error,
    # not a silent switch to the pure-jnp computation.
    kernel_required: bool = False

    def ffi_attrs(self) -> dict[str, np.int64]:
        return dict(
            stride_h=np.int64(self.stride[0]),
            stride_w=np.int64(self.stride[1]),
            pad_h=np.int64(self.padding[0]),
            pad_w=np.int64(self.padding[1]),
            dil_h=np.int64(self.dilation[0]),
            dil_w=np.int64(self.dilation[1]),
        )


@dataclasses.dataclass(frozen=True)
class Layout:
    """Sizes of one call, all in NHWC terms."""

    n: int
    h: int
    w: int
    c: int
    kh: int
    kw: int
    ho: int
    wo: int
    groups: int
    multiplier: int

    @property
    def taps(self) -> int:
        return self.kh * self.kw


def is_int(value) -> bool:
    """A Python or numpy integer, not a bool (True would pass as 1 otherwise)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _static_hint(value) -> str:
    # A jax array here usually means the geometry was passed through jit as a
    # traced argument; it has to be a static Python value.
    return " (it must be static: Python ints, not an array)" if hasattr(value, "shape") else ""


def _pair(
    name: str, value: IntPair, minimum: int, type_error: type[Exception] = TypeError
) -> tuple[int, int]:
    """``(a, b)`` from an int or a pair; ``type_error`` lets the Flax layers keep
    raising ValueError for every bad argument, as they always have."""
    if is_int(value):
        pair = (int(value), int(value))
    elif isinstance(value, Sequence) and len(value) == 2 and all(is_int(v) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise type_error(
            f"{name} must be an int or a pair of ints, got {value!r}{_static_hint(value)}"
        )
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


PADDING_FORMS = "'SAME', 'VALID', an int, (ph, pw) or ((top, bottom), (left, right))"


def padding_spec(
    padding: Padding, type_error: type[Exception] = TypeError
) -> Union[str, tuple[tuple[int, int], tuple[int, int]]]:
    """``"SAME"``, ``"VALID"`` or ``((top, bottom), (left, right))``, checked.

    Errors always show the whole ``padding`` the caller gave, not a part of it.
    ``type_error`` as for `_pair`.
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode not in ("SAME", "VALID"):
            raise ValueError(f"padding must be {PADDING_FORMS}, got {padding!r}")
        return mode
    pads = None
    if is_int(padding):
        pads = ((int(padding),) * 2,) * 2
    elif isinstance(padding, Sequence) and len(padding) == 2:
        if all(is_int(p) for p in padding):
            pads = tuple((int(p), int(p)) for p in padding)
        elif all(isinstance(p, Sequence) and len(p) == 2 and all(is_int(q) for q in p)
                 for p in padding):
            pads = tuple((int(p[0]), int(p[1])) for p in padding)
    if pads is None:
        raise type_error(
            f"padding must be {PADDING_FORMS}, got {padding!r}{_static_hint(padding)}"
        )
    if min(min(p) for p in pads) < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    return pads  # type: ignore[return-value]


def _padding(
    padding: Padding,
    in_hw: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Returns ((top, bottom), (left, right))."""
    spec = padding_spec(padding)
    if spec == "VALID":
        return (0, 0), (0, 0)
    if spec == "SAME":
        pads = []
        for size, k, s, d in zip(in_hw, kernel, stride, dilation):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        return pads[0], pads[1]
    return spec  # type: ignore[return-value]


def check_implementation(implementation: str | None) -> None:
    if not isinstance(implementation, (str, type(None))) or implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of None, 'auto', 'ffi', 'xla'; got {implementation!r}"
        )


def check_deterministic(deterministic: bool | None) -> None:
    # bool() of a string or array would silently pick a mode (bool("no") is True).
    if deterministic is not None and not isinstance(deterministic, (bool, np.bool_)):
        raise TypeError(f"deterministic must be True, False or None, got {deterministic!r}")


def _check_dtypes(arrays: dict) -> np.dtype:
    dtypes = {name: np.dtype(a.dtype) for name, a in arrays.items() if a is not None}
    x_dtype = dtypes["x"]
    if x_dtype.name not in FLOAT_DTYPES:
        raise TypeError(f"x must have a floating dtype ({', '.join(FLOAT_DTYPES)}), got {x_dtype}")
    for name, dtype in dtypes.items():
        if dtype != x_dtype:
            raise TypeError(f"{name} has dtype {dtype} but x has dtype {x_dtype}; they must match")
    return x_dtype


def _expect_shape(name: str, got: tuple, want: tuple, letters: str) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(f"{name} has shape {tuple(got)} but expected {tuple(want)} = {letters}")


def check_arguments(
    x, offset, weight, mask, bias, stride, padding, dilation, data_format: str
) -> tuple[ConvParams, Layout]:
    """Validates shapes, dtypes and options; returns the normalized geometry.

    Shapes are read in the caller's data_format; Layout is in NHWC terms.
    """
    if not isinstance(data_format, str) or data_format not in ("NHWC", "NCHW"):
        raise ValueError(f"data_format must be 'NHWC' or 'NCHW', got {data_format!r}")
    nchw = data_format == "NCHW"
    for name, arr in (("x", x), ("offset", offset), ("weight", weight)):
        if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(arr).__name__}")
    # Before the dtype check, which reads .dtype of every operand.
    for name, arr in (("mask", mask), ("bias", bias)):
        if arr is not None and (not hasattr(arr, "shape") or not hasattr(arr, "dtype")):
            raise TypeError(f"{name} must be an array or None, got {type(arr).__name__}")
    _check_dtypes(dict(x=x, offset=offset, weight=weight, mask=mask, bias=bias))

    def nhwc(shape):
        return (shape[0], shape[2], shape[3], shape[1]) if nchw else tuple(shape)

    def in_format(shape):
        return (shape[0], shape[3], shape[1], shape[2]) if nchw else tuple(shape)

    def letters(channels: str) -> str:
        """An (N, Ho, Wo, channels) shape in the caller's axis order."""
        return f"(N, {channels}, Ho, Wo)" if nchw else f"(N, Ho, Wo, {channels})"

    axes = "(N, C, H, W)" if nchw else "(N, H, W, C)"
    if x.ndim != 4:
        raise ValueError(f"x must be rank 4 {axes}, got shape {tuple(x.shape)}")
    n, h, w, c = nhwc(x.shape)
    if c == 0:
        raise ValueError(f"x has shape {tuple(x.shape)} but expected {axes} with C >= 1")
    if weight.ndim != 4 or weight.shape[2] != 1 or weight.shape[3] % c or weight.shape[3] == 0:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but expected (kh, kw, 1, C*M) with C = {c}, "
            f"the channels of x {axes} (an HWIO depthwise kernel, as lax.conv_general_dilated "
            "with feature_group_count=C)"
        )
    kh, kw, _, cm = weight.shape
    if kh < 1 or kw < 1:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but expected (kh, kw, 1, C*M) "
            "with kh, kw >= 1"
        )
    stride_ = _pair("stride", stride, 1)
    dilation_ = _pair("dilation", dilation, 1)
    (pt, pb), (pl, pr) = _padding(padding, (h, w), (kh, kw), stride_, dilation_)
    ho = (h + pt + pb - dilation_[0] * (kh - 1) - 1) // stride_[0] + 1
    wo = (w + pl + pr - dilation_[1] * (kw - 1) - 1) // stride_[1] + 1
    if ho < 1 or wo < 1:
        raise ValueError(
            f"the output would be empty: x spatial size {(h, w)} with kernel {(kh, kw)}, "
            f"dilation {dilation_}, padding {((pt, pb), (pl, pr))} and stride {stride_} "
            f"gives an output of {(ho, wo)}"
        )
    taps = kh * kw
    if offset.ndim != 4:
        raise ValueError(
            f"offset must be rank 4 {letters('2*G*kh*kw')}, got shape {tuple(offset.shape)}; "
            f"expected {in_format((n, ho, wo, 2 * taps))} for G = 1 offset group"
        )
    off_nhwc = nhwc(offset.shape)
    if off_nhwc[3] == 0 or off_nhwc[3] % (2 * taps):
        raise ValueError(
            f"offset has shape {tuple(offset.shape)} but expected {letters('2*G*kh*kw')}: "
            f"its channel axis must be a multiple of {2 * taps} (kernel {kh}x{kw})"
        )
    groups = off_nhwc[3] // (2 * taps)
    if c % groups:
        raise ValueError(
            f"offset has shape {tuple(offset.shape)}, i.e. G = {groups} offset groups, but "
            f"the C = {c} channels of x are not divisible by G"
        )
    _expect_shape("offset", offset.shape, in_format((n, ho, wo, 2 * groups * taps)),
                  f"{letters('2*G*kh*kw')} with G = {groups}")
    if mask is not None:
        _expect_shape("mask", mask.shape, in_format((n, ho, wo, groups * taps)),
                      f"{letters('G*kh*kw')} with G = {groups} (from offset)")
    if bias is not None:
        _expect_shape("bias", bias.shape, (cm,), "(C*M,)")
    params = ConvParams(stride=stride_, padding=(pt, pl), dilation=dilation_)
    layout = Layout(n=n, h=h, w=w, c=c, kh=kh, kw=kw, ho=ho, wo=wo, groups=groups,
                    multiplier=cm // c)
    return params, layout


def layout_of(x, offset, weight) -> Layout:
    """Layout of already-checked NHWC operands (used where only shapes are at hand)."""
    n, h, w, c = x.shape
    _, ho, wo, off_c = offset.shape
    kh, kw, _, cm = weight.shape
    return Layout(n=n, h=h, w=w, c=c, kh=kh, kw=kw, ho=ho, wo=wo,
                  groups=off_c // (2 * kh * kw), multiplier=cm // c)
