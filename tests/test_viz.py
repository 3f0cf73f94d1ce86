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


OFF = np.zeros((4, 4, 18))  # a 3x3 kernel, G = 1, Ho = Wo = 4

# Each row: sampling_positions' keyword arguments besides offset=OFF, the error and its message.
BAD_POSITIONS = [
    ("SAME without size", dict(padding="SAME"), ValueError,
     r"padding='SAME' needs input_size=\(H, W\)"),
    ("offset channels", dict(offset=np.zeros((2, 2, 10))), ValueError,
     r"offset has shape \(2, 2, 10\) but expected \(\.\.\., Ho, Wo, 2\*G\*kh\*kw\) = "
     r"\(\.\.\., Ho, Wo, 2\*G\*9\) for a 3x3 kernel"),
    ("offset rank 2", dict(offset=np.zeros((4, 18))), ValueError, r"offset has shape \(4, 18\)"),
    ("kernel_size 0", dict(kernel_size=0), ValueError, r"kernel_size must be >= 1, got 0"),
    ("kernel_size float", dict(kernel_size=3.0), TypeError,
     r"kernel_size must be an int or a pair of ints, got 3.0"),
    ("stride 0", dict(stride=0), ValueError, r"stride must be >= 1, got 0"),
    ("dilation 3D", dict(dilation=(1, 1, 1)), TypeError,
     r"dilation must be an int or a pair of ints, got \(1, 1, 1\)"),
    ("padding negative", dict(padding=-1), ValueError, r"padding must be >= 0, got -1"),
    ("padding REFLECT", dict(padding="REFLECT"), ValueError,
     r"padding must be 'SAME', 'VALID', an int, \(ph, pw\) or "
     r"\(\(top, bottom\), \(left, right\)\), got 'REFLECT'"),
    ("input_size", dict(padding="SAME", input_size=(8, 8, 3)), ValueError,
     r"input_size must be \(H, W\), two ints >= 1, got \(8, 8, 3\)"),
]


@pytest.mark.parametrize("kwargs,error,message", [r[1:] for r in BAD_POSITIONS],
                         ids=[r[0] for r in BAD_POSITIONS])
def test_sampling_positions_errors(kwargs, error, message):
    kwargs = dict(dict(offset=OFF, kernel_size=3), **kwargs)
    with pytest.raises(error, match=message):
        viz.sampling_positions(kwargs.pop("offset"), **kwargs)


def _layer(**kwargs):
    return viz.SamplingLayer(**dict(dict(offset=OFF, kernel_size=3, padding=1), **kwargs))


# Each row: trace_sampling_points' (layers, pixel), the error and its message.
BAD_TRACES = [
    ("no layers", ([], (0, 0)), ValueError, r"layers is empty: need at least one SamplingLayer"),
    ("one layer, not a list", (_layer(), (0, 0)), TypeError,
     r"layers must be a list of SamplingLayer, got SamplingLayer"),
    ("not a SamplingLayer", ([OFF], (0, 0)), TypeError,
     r"layers must hold SamplingLayer objects, got ndarray"),
    ("offset batch of 2", ([_layer(offset=np.zeros((2, 4, 4, 18)))], (0, 0)), ValueError,
     r"offset has shape \(2, 4, 4, 18\) but expected \(Ho, Wo, 2\*G\*kh\*kw\) for one example"),
    ("group too large", ([_layer(group=1)], (0, 0)), ValueError,
     r"group must be an int in \[0, G\) = \[0, 1\) for offsets of shape \(4, 4, 18\), got 1"),
    ("group negative", ([_layer(group=-1)], (0, 0)), ValueError, r"got -1"),
    ("mask groups", ([_layer(mask=np.ones((4, 4, 18)))], (0, 0)), ValueError,
     r"mask has shape \(4, 4, 18\) but expected \(4, 4, 9\) = \(Ho, Wo, G\*kh\*kw\) with G = 1"),
    ("mask grid", ([_layer(mask=np.ones((3, 4, 9)))], (0, 0)), ValueError,
     r"mask has shape \(3, 4, 9\) but expected \(4, 4, 9\)"),
    ("pixel outside", ([_layer()], (4, 0)), ValueError,
     r"pixel = \(4, 0\) is outside the output grid \(Ho, Wo\) = \(4, 4\)"),
    ("pixel negative", ([_layer()], (0, -1)), ValueError, r"pixel = \(0, -1\) is outside"),
    ("pixel not a pair", ([_layer()], 1), ValueError,
     r"pixel must be \(ho, wo\), a pair of ints, got 1"),
    ("pixel float", ([_layer()], (1.0, 1)), ValueError,
     r"pixel must be \(ho, wo\), a pair of ints, got \(1.0, 1\)"),
]


@pytest.mark.parametrize("args,error,message", [r[1:] for r in BAD_TRACES],
                         ids=[r[0] for r in BAD_TRACES])
def test_trace_errors(args, error, message):
    with pytest.raises(error, match=message):
        viz.trace_sampling_points(*args)


def _plot_one(**kwargs):
    args = dict(image=np.zeros((8, 8)), offset=OFF, pixels=[(0, 0)], kernel_size=3, padding=1)
    args.update(kwargs)
    return viz.plot_sampling_points(args.pop("image"), args.pop("offset"), args.pop("pixels"),
                                    **args)


def _plot_traced(**kwargs):
    args = dict(image=np.zeros((4, 4)), layers=[_layer(input_size=(4, 4))], pixels=[(0, 0)])
    args.update(kwargs)
    return viz.plot_traced_points(args.pop("image"), args.pop("layers"), args.pop("pixels"),
                                  **args)


BAD_PLOTS = [
    ("image shape", lambda: _plot_one(image=np.zeros((8, 8, 2))),
     r"image has shape \(8, 8, 2\) but expected \(H, W\), \(H, W, 1\), \(H, W, 3\) or \(H, W, 4\)"),
    ("one pixel, not a list", lambda: _plot_one(pixels=(1, 1)),
     r"pixels must be a list of \(ho, wo\) pairs, got \(1, 1\)"),
    ("pixel outside", lambda: _plot_one(pixels=[(0, 0), (9, 0)]),
     r"pixels\[1\] = \(9, 0\) is outside the output grid \(Ho, Wo\) = \(4, 4\)"),
    ("mask shape", lambda: _plot_one(mask=np.ones((4, 4, 4))),
     r"mask has shape \(4, 4, 4\) but expected \(4, 4, 9\)"),
    ("group", lambda: _plot_one(group=3), r"group must be an int in \[0, G\) = \[0, 1\)"),
    ("traced: image shape", lambda: _plot_traced(image=np.zeros((1, 4, 4, 3))),
     r"image has shape \(1, 4, 4, 3\) but expected"),
    ("traced: no pixels", lambda: _plot_traced(pixels=[]),
     r"pixels is empty: need at least one \(ho, wo\)"),
    ("traced: one pixel, not a list", lambda: _plot_traced(pixels=(1, 1)),
     r"pixels must be a list of \(ho, wo\) pairs, got \(1, 1\)"),
    ("traced: titles", lambda: _plot_traced(pixels=[(0, 0), (1, 1)], titles=["a"]),
     r"titles has 1 entries but pixels has 2"),
    ("traced: axes", lambda: _plot_traced(axes=[None, None]),
     r"axes has 2 Axes but pixels has 1; need one each"),
    ("traced: no reference layers", lambda: _plot_traced(reference_layers=[]),
     r"reference_layers is empty: pass None or at least one SamplingLayer"),
    ("traced: pixel outside", lambda: _plot_traced(pixels=[(0, 4)]),
     r"pixel = \(0, 4\) is outside the output grid"),
]


@pytest.mark.parametrize("plot,message", [r[1:] for r in BAD_PLOTS], ids=[r[0] for r in BAD_PLOTS])
def test_plot_errors(plot, message):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match=message):
        plot()


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
