"""The public function: checks arguments, picks an implementation, and keeps
the caller's data_format."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from jax_deform import _batching  # noqa: F401  (registers the vmap rules)
from jax_deform import _config, reference
from jax_deform._autodiff import deform_conv2d_ffi
from jax_deform._layout import from_nhwc, to_nhwc
from jax_deform._params import (
    KERNEL_DTYPES,
    IntPair,
    Padding,
    check_arguments,
    check_deterministic,
    check_implementation,
)
from jax_deform._ffi import KERNEL_PLATFORMS, TARGETS


def kernel_platforms() -> frozenset[str]:
    """Platforms ("cpu", "cuda") for which compiled kernels are registered.
    `jax_deform.show_config()` tells dtypes and CUDA architectures too."""
    return KERNEL_PLATFORMS


def disabled_checks() -> list:
    """What to pass as ``jax.export.export(..., disabled_checks=...)`` to export a
    function that calls `deform_conv2d`.

    jax.export refuses custom calls that are not on jax's own list of stable
    targets; this op's kernels are custom calls with versioned names
    (``jax_deform_forward_v1``, ``jax_deform_backward_v1``, and for forward
    mode on CPU ``jax_deform_tangent_v1``) that this package
    promises to keep loading (README, "Saving and exporting"). The returned
    list disables the check for exactly those targets. A program that runs the
    exported function must ``import jax_deform`` first, which registers them.
    """
    from jax import export

    return [export.DisabledSafetyCheck.custom_call(target) for target in TARGETS]


def deterministic_by_default() -> bool:
    """True when XLA is asked for deterministic ops (XLA_FLAGS
    --xla_gpu_deterministic_ops=true), which then also governs this op."""
    flags = os.environ.get("XLA_FLAGS", "")
    return any(
        f.lower() in ("--xla_gpu_deterministic_ops=true", "--xla_gpu_deterministic_ops")
        for f in flags.split()
    )


def _choose(implementation, dtype) -> str:
    kernel_ok = bool(KERNEL_PLATFORMS) and np.dtype(dtype).name in KERNEL_DTYPES
    if implementation == "ffi" and not kernel_ok:
        if not KERNEL_PLATFORMS:
            raise ValueError(
                "implementation='ffi' but the jax_deform extension is not built; "
                "use implementation=None or 'xla'"
            )
        raise TypeError(
            f"implementation='ffi' supports x dtypes {', '.join(KERNEL_DTYPES)}, got "
            f"{np.dtype(dtype)}; use implementation=None or 'xla' for it"
        )
    if implementation == "xla" or not kernel_ok:
        return "xla"
    return "ffi"


def deform_conv2d(
    x: jax.Array,
    offset: jax.Array,
    weight: jax.Array,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    data_format: str = "NHWC",
    implementation: str | None = None,
    deterministic: bool | None = None,
) -> jax.Array:
    """Depthwise deformable convolution (DCNv1, or DCNv2 with ``mask``).

    Exactly ``torchvision.ops.deform_conv2d`` with ``groups = C``, channels last.

    Args:
      x: input, ``(N, H, W, C)`` (``(N, C, H, W)`` if ``data_format="NCHW"``).
      offset: ``(N, Ho, Wo, 2*G*kh*kw)``, channel order ``[g][k][(dy, dx)]`` with
        ``k = i*kw + j``; G offset groups, channel ``c`` uses group ``c // (C/G)``.
        ``(N, 2*G*kh*kw, Ho, Wo)`` for NCHW.
      weight: ``(kh, kw, 1, C*M)`` depthwise HWIO kernel (``feature_group_count=C``);
        output channel ``c*M + j`` reads input channel ``c``.
      mask: optional modulation, ``(N, Ho, Wo, G*kh*kw)``, order ``[g][k]``.
      bias: optional ``(C*M,)``.
      stride, dilation: int or ``(h, w)``, >= 1.
      padding: int, ``(ph, pw)``, ``((top, bottom), (left, right))``, ``"SAME"`` or ``"VALID"``.
      data_format: ``"NHWC"`` or ``"NCHW"``.
      implementation: ``None``/``"auto"`` uses the compiled kernel where one is
        registered for the platform (else the pure-jnp path), ``"ffi"`` insists
        on the kernel, ``"xla"`` uses `jax_deform.reference`.
      deterministic: gradients bitwise reproducible run to run. ``None`` follows
        ``--xla_gpu_deterministic_ops`` in XLA_FLAGS. The CPU kernel always is.

    Returns:
      ``(N, Ho, Wo, C*M)`` (``(N, C*M, Ho, Wo)`` for NCHW), dtype of ``x``. Tap
      ``(i, j)`` of output ``(ho, wo)`` samples
      ``(ho*sh - pad_top + i*dh + dy, wo*sw - pad_left + j*dw + dx)`` bilinearly,
      with zeros outside the image; a sample counts only when ``-1 < y < H``
      and ``-1 < x < W``. A NaN sample position gives NaN.
    """
    check_implementation(implementation)
    check_deterministic(deterministic)
    if implementation in (None, "auto"):
        _config.warn_once_if_gpu_lacks_kernels()
    params, layout = check_arguments(
        x, offset, weight, mask, bias, stride, padding, dilation, data_format
    )
    x, offset, mask = to_nhwc(data_format, x, offset, mask)
    if _choose(implementation, x.dtype) == "xla":
        y = reference.deform_conv2d_nhwc(x, offset, weight, mask, bias, params, layout)
    else:
        if deterministic is None:
            deterministic = deterministic_by_default()
        params = dataclasses.replace(params, kernel_required=implementation == "ffi")
        y = deform_conv2d_ffi(x, offset, mask, weight, bias, params, bool(deterministic))
    return from_nhwc(data_format, y)
