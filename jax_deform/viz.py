"""Where a deformable kernel looks: sample positions and pictures of them.

`sampling_positions` and `trace_sampling_points` are plain numpy (no
matplotlib needed). The plotting functions draw with matplotlib's Agg canvas
(no pyplot, no global backend change) and write PNGs, in the style of the
deformable-convolution papers: the image, the output pixel, and the points its
kernel taps sample.

Coordinates are ``(y, x)`` in pixels of the layer's input, pixel centers at
integers (row ``y``, column ``x``), exactly as `jax_deform.deform_conv2d`
samples: tap ``(i, j)`` of output ``(ho, wo)`` reads
``(ho*sh - pad_top + i*dh + dy, wo*sw - pad_left + j*dw + dx)``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jax_deform._params import _padding, _pair, is_int

__all__ = [
    "SamplingLayer",
    "sampling_positions",
    "trace_sampling_points",
    "plot_sampling_points",
    "plot_traced_points",
]


def _geometry(kernel_size, stride, padding, dilation, input_size):
    kh, kw = _pair("kernel_size", kernel_size, 1)
    sh, sw = _pair("stride", stride, 1)
    dh, dw = _pair("dilation", dilation, 1)
    if isinstance(padding, str) and padding.upper() == "SAME" and input_size is None:
        raise ValueError("padding='SAME' needs input_size=(H, W) to know the padding")
    hw = (1, 1)
    if input_size is not None:
        if (not isinstance(input_size, (Sequence, np.ndarray)) or len(input_size) != 2
                or not all(is_int(v) and v >= 1 for v in input_size)):
            raise ValueError(f"input_size must be (H, W), two ints >= 1, got {input_size!r}")
        hw = (int(input_size[0]), int(input_size[1]))
    (pt, _), (pl, _) = _padding(padding, hw, (kh, kw), (sh, sw), (dh, dw))
    return (kh, kw), (sh, sw), (dh, dw), (pt, pl)


def sampling_positions(
    offset: Any,
    *,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: Any = 0,
    dilation: int | Sequence[int] = 1,
    input_size: Sequence[int] | None = None,
) -> np.ndarray:
    """Sample positions of every tap of every output pixel, as the op computes them.

    Args:
      offset: ``(..., Ho, Wo, 2*G*kh*kw)`` (NHWC, batch axes optional), channel
        order ``[g][k][(dy, dx)]``, ``k = i*kw + j``.
      kernel_size, stride, padding, dilation: the conv's geometry, as for
        `jax_deform.deform_conv2d`.
      input_size: ``(H, W)`` of the conv's input; needed only for ``"SAME"``.

    Returns:
      float64 array ``(..., Ho, Wo, G, kh*kw, 2)`` of ``(y, x)`` positions in
      the input's pixel coordinates.
    """
    offset = np.asarray(offset, dtype=np.float64)
    (kh, kw), (sh, sw), (dh, dw), (pt, pl) = _geometry(
        kernel_size, stride, padding, dilation, input_size
    )
    taps = kh * kw
    if offset.ndim < 3 or offset.shape[-1] % (2 * taps) or offset.shape[-1] == 0:
        raise ValueError(
            f"offset has shape {offset.shape} but expected (..., Ho, Wo, 2*G*kh*kw) = "
            f"(..., Ho, Wo, 2*G*{taps}) for a {kh}x{kw} kernel"
        )
    ho, wo = offset.shape[-3:-1]
    groups = offset.shape[-1] // (2 * taps)
    off = offset.reshape(offset.shape[:-1] + (groups, taps, 2))
    i, j = np.divmod(np.arange(taps), kw)
    base_y = np.arange(ho)[:, None] * sh - pt + i[None, :] * dh  # (Ho, K)
    base_x = np.arange(wo)[:, None] * sw - pl + j[None, :] * dw  # (Wo, K)
    base = np.stack(
        np.broadcast_arrays(base_y[:, None, None, :], base_x[None, :, None, :]), axis=-1
    )  # (Ho, Wo, 1, K, 2)
    return base + off


@dataclasses.dataclass(frozen=True)
class SamplingLayer:
    """One deformable layer's offsets (one example) and geometry, for tracing.

    Attributes:
      offset: ``(Ho, Wo, 2*G*kh*kw)``.
      kernel_size, stride, padding, dilation: the layer's geometry.
      input_size: ``(H, W)`` of its input (needed for ``"SAME"``).
      mask: optional ``(Ho, Wo, G*kh*kw)`` modulation.
      group: which offset group to follow.
    """

    offset: Any
    kernel_size: int | Sequence[int]
    stride: int | Sequence[int] = 1
    padding: Any = 0
    dilation: int | Sequence[int] = 1
    input_size: Sequence[int] | None = None
    mask: Any = None
    group: int = 0


def _one_example(name: str, value, letters: str) -> np.ndarray:
    """``value`` as ``(Ho, Wo, ...)``: a leading batch axis of 1 is dropped, a
    larger batch is an error (which example to draw would be a guess)."""
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(
            f"{name} has shape {np.shape(value)} but expected {letters} for one example "
            "(or a batch of 1)"
        )
    return array


def _layer_taps(layer: SamplingLayer):
    """(Ho, Wo, K, 2) positions and (Ho, Wo, K) weights of one group of one layer."""
    if not isinstance(layer, SamplingLayer):
        raise TypeError(f"layers must hold SamplingLayer objects, got {type(layer).__name__}")
    offset = _one_example("offset", layer.offset, "(Ho, Wo, 2*G*kh*kw)")
    pos = sampling_positions(
        offset,
        kernel_size=layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        input_size=layer.input_size,
    )
    ho, wo, groups, taps, _ = pos.shape
    if not is_int(layer.group) or not 0 <= layer.group < groups:
        raise ValueError(
            f"group must be an int in [0, G) = [0, {groups}) for offsets of shape "
            f"{offset.shape}, got {layer.group!r}"
        )
    pos = pos[..., layer.group, :, :]
    if layer.mask is None:
        weight = np.ones(pos.shape[:-1])
    else:
        mask = _one_example("mask", layer.mask, "(Ho, Wo, G*kh*kw)")
        if mask.shape != (ho, wo, groups * taps):
            raise ValueError(
                f"mask has shape {mask.shape} but expected {(ho, wo, groups * taps)} = "
                f"(Ho, Wo, G*kh*kw) with G = {groups} (from offset)"
            )
        weight = mask.reshape(ho, wo, groups, taps)[..., layer.group, :]
    return pos, weight


def _pixel(name: str, pixel, grid: tuple[int, int]) -> tuple[int, int]:
    """``pixel`` as ``(ho, wo)`` inside an output grid ``(Ho, Wo)``."""
    if (not isinstance(pixel, (Sequence, np.ndarray)) or len(pixel) != 2
            or not all(is_int(p) for p in pixel)):
        raise ValueError(f"{name} must be (ho, wo), a pair of ints, got {pixel!r}")
    ho, wo = int(pixel[0]), int(pixel[1])
    if not (0 <= ho < grid[0] and 0 <= wo < grid[1]):
        raise ValueError(
            f"{name} = {(ho, wo)} is outside the output grid (Ho, Wo) = {tuple(grid)}"
        )
    return ho, wo


def _pixels(pixels) -> list:
    """``pixels`` as a list, checked to be a sequence of pairs, not one pair."""
    if not isinstance(pixels, (Sequence, np.ndarray)) or any(is_int(p) for p in pixels):
        raise ValueError(f"pixels must be a list of (ho, wo) pairs, got {pixels!r}")
    return list(pixels)


def trace_sampling_points(
    layers: Sequence[SamplingLayer], pixel: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Follows a stack of deformable layers from one output pixel back to the input.

    ``layers`` runs from the first (closest to the image) to the last; layer
    ``l``'s output grid must be layer ``l+1``'s input grid (only pointwise or
    stride-1 ops in between). The last layer's taps at ``pixel`` give positions
    in its input; each is rounded to the nearest pixel of the previous layer's
    output (clipped to the grid), whose taps are followed in turn, as in the
    figures of Dai et al. (2017).

    Args:
      layers: the deformable layers, first to last.
      pixel: ``(ho, wo)`` in the last layer's output.

    Returns:
      ``(positions, weights)``: ``(K_1*...*K_L, 2)`` ``(y, x)`` positions in the
      first layer's input coordinates and the product of the masks along each
      path (ones without masks).
    """
    if isinstance(layers, SamplingLayer) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a list of SamplingLayer, got {type(layers).__name__}")
    if not layers:
        raise ValueError("layers is empty: need at least one SamplingLayer")
    taps = [_layer_taps(layer) for layer in layers]
    pos_last, w_last = taps[-1]
    ho, wo = _pixel("pixel", pixel, pos_last.shape[:2])
    points, weights = pos_last[ho, wo], w_last[ho, wo]
    for pos, w in reversed(taps[:-1]):
        iy = np.clip(np.rint(points[:, 0]).astype(int), 0, pos.shape[0] - 1)
        ix = np.clip(np.rint(points[:, 1]).astype(int), 0, pos.shape[1] - 1)
        weights = (weights[:, None] * w[iy, ix]).reshape(-1)
        points = pos[iy, ix].reshape(-1, 2)
    return points, weights


def _show_image(ax, image):
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        ax.imshow(image, cmap="gray", interpolation="nearest")
    elif image.ndim == 3 and image.shape[-1] in (3, 4):
        lo, hi = image.min(), image.max()
        ax.imshow((image - lo) / (hi - lo or 1.0), interpolation="nearest")
    else:
        raise ValueError(
            f"image has shape {image.shape} but expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
        )
    h, w = image.shape[:2]
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])


def _new_axes(ncols: int, size: float = 3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size * ncols, size + 0.3), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(k % 10) for k in range(n)]


def _finish(fig, path):
    if path is None:
        return fig
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _sizes(weights: np.ndarray, base: float) -> np.ndarray:
    # Marker area follows the modulation, so taps the mask switches off fade out.
    return base * np.clip(weights, 0.05, None)


def plot_sampling_points(
    image: Any,
    offset: Any,
    pixels: Sequence[Sequence[int]],
    *,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: Any = 0,
    dilation: int | Sequence[int] = 1,
    mask: Any = None,
    group: int = 0,
    path: str | os.PathLike | None = None,
    ax: Any = None,
    title: str | None = None,
):
    """Draws the sample positions of chosen output pixels of one layer over its input.

    Each pixel gets a color: a cross at the center of its regular (undeformed)
    kernel, hollow squares at the regular grid, dots at the deformed samples
    (dot area proportional to the mask, if given), with a line from each grid
    point to its sample.

    Args:
      image: the layer's input for one example, ``(H, W)``, ``(H, W, 1)`` or RGB(A).
      offset: ``(Ho, Wo, 2*G*kh*kw)`` (or ``(1, Ho, Wo, ...)``) for that example.
      pixels: ``[(ho, wo), ...]`` output pixels to draw.
      kernel_size, stride, padding, dilation: the layer's geometry.
      mask: optional ``(Ho, Wo, G*kh*kw)``.
      group: offset group to draw.
      path: where to write the PNG; without it the matplotlib Figure is returned.
      ax: draw into this Axes instead of a new figure (then nothing is saved
        and the Axes is returned).
      title: optional title.

    Returns:
      ``path``, the Figure, or ``ax``.
    """
    image = np.asarray(image)
    pixels = _pixels(pixels)
    layer = SamplingLayer(offset, kernel_size, stride, padding, dilation,
                          input_size=image.shape[:2], mask=mask, group=group)
    pos, weight = _layer_taps(layer)
    zero = dataclasses.replace(layer, offset=np.zeros_like(np.asarray(offset)), mask=None)
    grid, _ = _layer_taps(zero)
    fig = None
    if ax is None:
        fig, (ax,) = _new_axes(1, size=5.0)
    _show_image(ax, image)
    kh, kw = _pair("kernel_size", kernel_size, 1)
    center = (kh // 2) * kw + kw // 2
    for k, (pixel, color) in enumerate(zip(pixels, _colors(len(pixels)))):
        ho, wo = _pixel(f"pixels[{k}]", pixel, pos.shape[:2])
        p, g, w = pos[ho, wo], grid[ho, wo], weight[ho, wo]
        for a, b in zip(g, p):
            ax.plot([a[1], b[1]], [a[0], b[0]], color=color, lw=0.8, alpha=0.6)
        ax.scatter(g[:, 1], g[:, 0], s=22, marker="s", facecolors="none",
                   edgecolors=[color], linewidths=0.8, alpha=0.7)
        ax.scatter(p[:, 1], p[:, 0], s=_sizes(w, 40.0), color=[color],
                   edgecolors="white", linewidths=0.5, zorder=3)
        ax.scatter([g[center, 1]], [g[center, 0]], s=90, marker="x", color=[color],
                   linewidths=2.0, zorder=4)
    if title:
        ax.set_title(title, fontsize=9)
    if fig is None:
        return ax
    return _finish(fig, path)


def plot_traced_points(
    image: Any,
    layers: Sequence[SamplingLayer],
    pixels: Sequence[Sequence[int]],
    *,
    path: str | os.PathLike | None = None,
    titles: Sequence[str] | None = None,
    reference_layers: Sequence[SamplingLayer] | None = None,
    axes: Sequence[Any] | None = None,
):
    """One panel per output pixel of the last layer: all points that the stack
    of deformable layers samples for it (see `trace_sampling_points`), over the
    image (the first layer's input).

    Args:
      image: ``(H, W)``, ``(H, W, 1)`` or RGB(A): the first layer's input.
      layers: deformable layers, first to last.
      pixels: ``[(ho, wo), ...]`` in the last layer's output.
      path: PNG to write; without it the Figure is returned.
      titles: optional per-panel titles.
      reference_layers: optional second stack (e.g. the same geometry with zero
        offsets, i.e. a plain conv) drawn underneath as small gray dots.
      axes: draw into these Axes (one per pixel) instead of a new figure; then
        nothing is saved and the Axes are returned.

    Returns:
      ``path``, the Figure, or ``axes``.
    """
    pixels = _pixels(pixels)
    if not pixels:
        raise ValueError("pixels is empty: need at least one (ho, wo) to draw a panel for")
    if titles and len(titles) != len(pixels):
        raise ValueError(f"titles has {len(titles)} entries but pixels has {len(pixels)}")
    if reference_layers is not None and not reference_layers:
        raise ValueError("reference_layers is empty: pass None or at least one SamplingLayer")
    fig = None
    if axes is None:
        fig, axes = _new_axes(len(pixels))
    elif len(axes) != len(pixels):
        raise ValueError(f"axes has {len(axes)} Axes but pixels has {len(pixels)}; need one each")
    for k, (ax, pixel, color) in enumerate(zip(axes, pixels, _colors(len(pixels)))):
        _show_image(ax, image)
        if reference_layers is not None:
            ref, _ = trace_sampling_points(reference_layers, pixel)
            ax.scatter(ref[:, 1], ref[:, 0], s=4, color="0.6", alpha=0.7, linewidths=0)
        pts, w = trace_sampling_points(layers, pixel)
        ax.scatter(pts[:, 1], pts[:, 0], s=_sizes(w, 7.0), color=[color], alpha=0.8,
                   linewidths=0, zorder=3)
        # The unit's location: the center of its regular (zero-offset) receptive field.
        plain = [dataclasses.replace(l, offset=np.zeros_like(np.asarray(l.offset)), mask=None)
                 for l in layers]
        grid, _ = trace_sampling_points(plain, pixel)
        cy, cx = grid[:, 0].mean(), grid[:, 1].mean()
        ax.scatter([cx], [cy], s=90, marker="*", color="lime", edgecolors="black",
                   linewidths=0.6, zorder=4)
        ax.set_title(titles[k] if titles else f"unit {tuple(pixel)}", fontsize=9)
    if fig is None:
        return axes
    return _finish(fig, path)
