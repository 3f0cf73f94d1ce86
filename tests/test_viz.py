"""jax_deform.viz: the positions agree with where the op really samples; the
multi-layer trace; the PNGs."""

import jax.numpy as jnp
import numpy as np
import pytest

import jax_deform
from jax_deform import viz


@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    ((3, 3), 1, "SAME", 1),
    ((3, 2), (2, 1), ((1, 2), (2, 0)), (2, 1)),
    ((2, 3), 2, 1, (1, 2)),
    ((3, 3), 2, "SAME", 2),
])
def test_positions_are_where_the_op_samples(rng, kernel, stride, padding, dilation):
    # Bilinear sampling of a linear ramp returns the sample position itself, so
    # a one-hot depthwise kernel makes the op print the positions it reads.
    h, w, g = 13, 12, 2
    kh, kw = kernel
    taps = kh * kw
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                         indexing="ij")
    x = np.stack([yy, xx] * g, axis=-1)[None]  # channels: group 0 (y, x), group 1 (y, x)
    c = x.shape[-1]
    ho, wo = _out_size((h, w), kernel, stride, padding, dilation)
    offset = rng.uniform(-2.5, 2.5, (1, ho, wo, 2 * g * taps))
    pos = viz.sampling_positions(offset, kernel_size=kernel, stride=stride, padding=padding,
                                 dilation=dilation, input_size=(h, w))
    assert pos.shape == (1, ho, wo, g, taps, 2)
    for k in range(taps):
        weight = np.zeros((kh, kw, 1, c))
        weight[k // kw, k % kw] = 1.0
        y = np.asarray(jax_deform.deform_conv2d(
            jnp.asarray(x), jnp.asarray(offset), jnp.asarray(weight),
            stride=stride, padding=padding, dilation=dilation,
        ))  # float64: the pure-jnp path, exact
        for grp in range(g):
            p = pos[0, :, :, grp, k]  # (Ho, Wo, 2)
            # Where all four bilinear corners are inside, the ramp is read exactly.
            inside = (p[..., 0] >= 0) & (p[..., 0] <= h - 1) & (p[..., 1] >= 0) & (p[..., 1] <= w - 1)
            assert inside.sum() > 0
            np.testing.assert_allclose(y[0, ..., 2 * grp][inside], p[..., 0][inside], atol=1e-9)
            np.testing.assert_allclose(y[0, ..., 2 * grp + 1][inside], p[..., 1][inside],
                                       atol=1e-9)


def _out_size(hw, kernel, stride, padding, dilation):
    s = (stride, stride) if isinstance(stride, int) else stride
    d = (dilation, dilation) if isinstance(dilation, int) else dilation
    out = []
    for ax in range(2):
        if padding == "SAME":
            out.append(-(-hw[ax] // s[ax]))
            continue
        if isinstance(padding, int):
            lo = hi = padding
        else:
            lo, hi = padding[ax]
        out.append((hw[ax] + lo + hi - d[ax] * (kernel[ax] - 1) - 1) // s[ax] + 1)
    return tuple(out)


def test_positions_formula_by_hand():
    offset = np.zeros((2, 3, 2 * 2 * 4))  # G=2, 2x2 kernel
    offset[1, 2, 2 * 4 + 2 * 3:2 * 4 + 2 * 3 + 2] = (0.25, -1.5)  # group 1, tap 3 = (1, 1)
    pos = viz.sampling_positions(offset, kernel_size=2, stride=(3, 2), padding=((1, 0), (2, 2)),
                                 dilation=(2, 1))
    # (ho*sh - pad_top + i*dh + dy, wo*sw - pad_left + j*dw + dx)
    np.testing.assert_allclose(pos[1, 2, 1, 3], (1 * 3 - 1 + 1 * 2 + 0.25, 2 * 2 - 2 + 1 - 1.5))
    np.testing.assert_allclose(pos[1, 2, 0, 3], (4, 3))
    np.testing.assert_allclose(pos[0, 0, 0, 0], (-1, -2))


def test_sampling_positions_errors():
    with pytest.raises(ValueError, match="input_size"):
        viz.sampling_positions(np.zeros((2, 2, 18)), kernel_size=3, padding="SAME")
    with pytest.raises(ValueError, match="2\\*G\\*9"):
        viz.sampling_positions(np.zeros((2, 2, 10)), kernel_size=3)


def test_trace_two_plain_layers_covers_5x5_with_binomial_counts():
    zero = np.zeros((6, 6, 18))
    layers = [viz.SamplingLayer(zero, 3, padding=1, input_size=(6, 6), mask=np.full((6, 6, 9), 0.5)),
              viz.SamplingLayer(zero, 3, padding=1, input_size=(6, 6), mask=np.full((6, 6, 9), 3.0))]
    pts, w = viz.trace_sampling_points(layers, (3, 2))
    assert pts.shape == (81, 2)
    np.testing.assert_allclose(w, 1.5)
    counts = np.zeros((5, 5), int)
    for y, x in pts:
        counts[int(y) - 1, int(x) - 0] += 1
    np.testing.assert_array_equal(counts, np.outer([1, 2, 3, 2, 1], [1, 2, 3, 2, 1]))


def test_trace_follows_offsets_through_strides(rng):
    # First layer: stride 2 from 8x8 to 4x4 with a constant shift; second: 1x1 at 4x4
    # pointing at a fractional position that rounds to a known pixel.
    first = np.zeros((4, 4, 18))
    first[..., 0::2] = 0.5   # dy
    first[..., 1::2] = -1.0  # dx
    second = np.zeros((4, 4, 2))
    second[1, 2] = (1.4, -0.6)  # (1, 2) + offset = (2.4, 1.4) -> pixel (2, 1)
    layers = [viz.SamplingLayer(first, 3, 2, padding=1, input_size=(8, 8)),
              viz.SamplingLayer(second, 1, input_size=(4, 4))]
    pts, _ = viz.trace_sampling_points(layers, (1, 2))
    want = viz.sampling_positions(first, kernel_size=3, stride=2, padding=1)[2, 1, 0]
    np.testing.assert_allclose(pts, want)
    np.testing.assert_allclose(pts[4], (2 * 2 - 1 + 1 + 0.5, 2 * 1 - 1 + 1 - 1.0))
    with pytest.raises(ValueError, match="outside"):
        viz.trace_sampling_points(layers, (4, 0))


def test_plots_write_pngs(rng, tmp_path):
    pytest.importorskip("matplotlib")
    image = rng.random((16, 16))
    offset = rng.normal(size=(8, 8, 2 * 2 * 9))
    mask = rng.uniform(0, 2, (8, 8, 2 * 9))
    path = viz.plot_sampling_points(image, offset, [(1, 1), (4, 6)], kernel_size=3, stride=2,
                                    padding="SAME", mask=mask, group=1,
                                    path=tmp_path / "a" / "one.png", title="t")
    assert str(path).endswith("one.png")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000

    layers = [viz.SamplingLayer(offset, 3, 2, "SAME", input_size=(16, 16), mask=mask),
              viz.SamplingLayer(rng.normal(size=(8, 8, 18)), 3, 1, "SAME", input_size=(8, 8))]
    path2 = viz.plot_traced_points(np.stack([image] * 3, -1), layers, [(2, 2), (5, 5), (7, 0)],
                                   path=str(tmp_path / "trace.png"))
    assert open(path2, "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"

    fig = viz.plot_sampling_points(image, offset, [(0, 0)], kernel_size=3, stride=2,
                                   padding="SAME")
    assert fig.__class__.__name__ == "Figure"
    ax = fig.axes[0]
    assert viz.plot_sampling_points(image, offset, [(0, 0)], kernel_size=3, stride=2,
                                    padding="SAME", ax=ax) is ax
    with pytest.raises(ValueError, match="outside"):
        viz.plot_sampling_points(image, offset, [(8, 0)], kernel_size=3, stride=2, padding="SAME")
    with pytest.raises(ValueError, match="group"):
        viz.plot_sampling_points(image, offset, [(0, 0)], kernel_size=3, stride=2, padding="SAME",
                                 group=2)


def test_viz_import_does_not_need_matplotlib():
    import subprocess
    import sys

    code = ("import sys; import jax_deform.viz; "
            "assert not any(m.startswith('matplotlib') for m in sys.modules), 'matplotlib'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
