"""Flax NNX DeformConv: init == depthwise conv, gradients, conversion,
checkpoints, dtypes, jit, caller offsets, partitioning, errors, the example."""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("flax")
optax = pytest.importorskip("optax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax import lax  # noqa: E402

import jax_deform  # noqa: E402
from jax_deform.nnx import DeformConv, from_depthwise_conv  # noqa: E402
from tests.helpers import constant_prediction_oracle  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _x(rng, shape, dtype=np.float32):
    return jnp.asarray(rng.standard_normal(shape).astype(dtype))


def _lax_padding(padding):
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


def depthwise_reference(x, kernel, bias, strides, padding, dilation):
    y = lax.conv_general_dilated(
        x, kernel, strides, _lax_padding(padding), rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
        precision=lax.Precision.HIGHEST,
    )
    return y if bias is None else y + bias


def _randomize(rng, layer, names=("kernel", "bias")):
    for name in names:
        var = getattr(layer, name)
        if var is not None:
            var[...] = _x(rng, var[...].shape).astype(var[...].dtype)


GEOMETRIES = [
    # kernel, strides, padding, dilation, M, G, modulated
    ((3, 3), 1, "SAME", 1, 1, 1, False),
    ((3, 3), 2, "SAME", 1, 2, 2, True),
    ((3, 5), (2, 1), ((1, 2), (0, 3)), (1, 2), 1, 4, True),
    ((2, 2), 1, "VALID", 2, 3, 1, False),
    ((3, 3), 1, 1, 1, 1, 2, True),
    ((3, 3), 2, (1, 0), 1, 1, 1, False),
]


@pytest.mark.parametrize("kernel,strides,padding,dilation,m,g,modulated", GEOMETRIES)
def test_init_equals_depthwise_conv(rng, kernel, strides, padding, dilation, m, g, modulated):
    c = 4
    layer = DeformConv(c, kernel, depth_multiplier=m, strides=strides, padding=padding,
                       kernel_dilation=dilation, offset_groups=g, modulated=modulated,
                       rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    _randomize(rng, layer)  # a random bias too, so it is checked as well
    assert layer.kernel[...].shape == (*kernel, 1, c * m)
    assert layer.bias[...].shape == (c * m,)
    taps = kernel[0] * kernel[1]
    assert layer.offset_conv.kernel[...].shape == (*kernel, c, (3 if modulated else 2) * g * taps)
    assert not np.any(np.asarray(layer.offset_conv.kernel[...]))
    assert not np.any(np.asarray(layer.offset_conv.bias[...]))

    x = _x(rng, (2, 11, 10, c))
    y = layer(x)
    sd = (strides, strides) if isinstance(strides, int) else strides
    dd = (dilation, dilation) if isinstance(dilation, int) else dilation
    want = depthwise_reference(x, layer.kernel[...], layer.bias[...], sd, padding, dd)
    assert y.shape == want.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)

    offset, mask = layer.sampling_offsets(x)
    assert offset.shape == y.shape[:3] + (2 * g * taps,)
    if modulated:
        assert mask.shape == y.shape[:3] + (g * taps,)
        assert np.all(np.asarray(mask) == 1.0)  # exactly 1, not 0.5
    else:
        assert mask is None


@pytest.mark.parametrize("strides,padding,g", [(1, "SAME", 1), (2, "SAME", 2), (1, 1, 4)])
def test_predicted_mask_is_twice_the_sigmoid_of_the_logits(rng, strides, padding, g):
    # Nonzero logits and offsets: a zero predictor kernel with a random bias
    # predicts the same offsets and mask logits at every pixel.
    c = 4
    layer = DeformConv(c, (3, 3), strides=strides, padding=padding, offset_groups=g,
                       modulated=True, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    _randomize(rng, layer)
    x = _x(rng, (2, 7, 8, c))
    pred_bias, want, want_mask = constant_prediction_oracle(
        rng, x, layer.kernel[...], layer.bias[...], strides=strides, padding=padding,
        dilation=1, groups=g)
    layer.offset_conv.bias[...] = jnp.asarray(pred_bias)
    _, mask = layer.sampling_offsets(x)
    np.testing.assert_allclose(np.asarray(mask), want_mask, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(layer(x)), want, rtol=1e-5, atol=1e-5)


def test_no_bias(rng):
    layer = DeformConv(3, (3, 3), use_bias=False, rngs=nnx.Rngs(0))
    assert layer.bias is None
    x = _x(rng, (1, 7, 7, 3))
    want = depthwise_reference(x, layer.kernel[...], None, (1, 1), "SAME", (1, 1))
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("modulated", [False, True])
def test_offset_predictor_gets_gradients_and_learns(rng, modulated):
    c, g = 4, 2
    layer = DeformConv(c, (3, 3), offset_groups=g, modulated=modulated,
                       rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    x = _x(rng, (2, 9, 9, c))
    target = _x(rng, (2, 9, 9, c))

    def loss_fn(model):
        return jnp.mean((model(x) - target) ** 2)

    grads = nnx.grad(loss_fn)(layer)
    gk = np.asarray(grads.offset_conv.kernel[...])
    gb = np.asarray(grads.offset_conv.bias[...])
    n_off = 2 * g * 9
    # Zero offsets sit on integer positions, where the bilinear weights still
    # have a derivative: the predictor must receive a gradient at exactly init.
    assert np.abs(gk[..., :n_off]).max() > 1e-4
    assert np.abs(gb[:n_off]).max() > 1e-4
    if modulated:
        assert np.abs(gk[..., n_off:]).max() > 1e-4  # mask logits too

    # Same gradients through the pure-jnp implementation.
    ref_layer = DeformConv(c, (3, 3), offset_groups=g, modulated=modulated,
                           implementation="xla", rngs=nnx.Rngs(0))
    nnx.update(ref_layer, nnx.state(layer))
    ref = nnx.grad(loss_fn)(ref_layer)
    np.testing.assert_allclose(gk, np.asarray(ref.offset_conv.kernel[...]), rtol=1e-4, atol=1e-5)

    optimizer = nnx.Optimizer(layer, optax.sgd(1e-2), wrt=nnx.Param)
    before = float(loss_fn(layer))
    optimizer.update(layer, grads)
    offset, _ = layer.sampling_offsets(x)
    assert np.abs(np.asarray(offset)).max() > 0
    assert float(loss_fn(layer)) < before


def test_from_depthwise_conv(rng):
    c, m = 6, 2
    conv = nnx.Conv(c, c * m, (3, 3), strides=(2, 1), padding=((1, 1), (2, 0)),
                    kernel_dilation=(1, 2), feature_group_count=c,
                    rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    conv.bias[...] = _x(rng, (c * m,))
    layer = from_depthwise_conv(conv, offset_groups=3, modulated=True)
    assert layer.depth_multiplier == m and layer.offset_groups == 3
    x = _x(rng, (2, 12, 11, c))
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(conv(x)), rtol=1e-5, atol=1e-5)
    # Copies, not shared arrays: training the new layer leaves the conv alone.
    layer.kernel[...] = layer.kernel[...] + 1.0
    assert not np.allclose(np.asarray(layer.kernel[...]), np.asarray(conv.kernel[...]))


def _conv(*args, **kwargs):
    return nnx.Conv(*args, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("make,message", [
    (lambda: nnx.Linear(4, 4, rngs=nnx.Rngs(0)), r"conv must be an nnx.Conv, got Linear"),
    (lambda: _conv(4, 8, (3, 3)),
     r"the conv is not depthwise: .*got in_features=4, feature_group_count=1, out_features=8"),
    (lambda: _conv(4, 4, (3, 3), feature_group_count=2),
     r"the conv is not depthwise: .*feature_group_count=2"),
    (lambda: _conv(4, 4, (3,), feature_group_count=4),
     r"only 2D convolutions can be converted, got kernel_size \(3,\)"),
    (lambda: _conv(4, 4, (3, 3), feature_group_count=4, input_dilation=2),
     r"the conv has input_dilation=2; convs with input dilation \(transposed convs\)"),
    (lambda: _conv(4, 4, (3, 3), feature_group_count=4, mask=jnp.ones((3, 3, 1, 4))),
     r"the conv has a kernel mask"),
    (lambda: _conv(4, 4, (3, 3), feature_group_count=4, padding="CIRCULAR"),
     r"padding 'CIRCULAR' is not supported: .*zero padding"),
])
def test_from_depthwise_conv_rejects_non_depthwise(make, message):
    with pytest.raises(ValueError, match=message):
        from_depthwise_conv(make())


def test_from_depthwise_conv_checks_its_arguments():
    conv = _conv(4, 4, (3, 3), feature_group_count=4)
    with pytest.raises(ValueError, match=r"offset_groups=3 must divide the number of input "
                                         r"channels \(4\)"):
        from_depthwise_conv(conv, offset_groups=3)
    with pytest.raises(ValueError, match=r"implementation must be one of"):
        from_depthwise_conv(conv, implementation="cuda")


def test_checkpoint_roundtrip(rng, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")

    def make(seed):
        return DeformConv(4, (3, 3), depth_multiplier=2, modulated=True, offset_groups=2,
                          rngs=nnx.Rngs(seed))

    layer = make(int(rng.integers(1 << 30)))
    # Non-zero predictor, so restored offsets matter for the output.
    layer.offset_conv.kernel[...] = 0.1 * _x(rng, layer.offset_conv.kernel[...].shape)
    _randomize(rng, layer)
    x = _x(rng, (2, 8, 8, 4))
    want = np.asarray(layer(x))

    path = (tmp_path / "ckpt").absolute()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, nnx.state(layer))
    checkpointer.wait_until_finished()

    abstract = nnx.eval_shape(lambda: make(0))
    graphdef, abstract_state = nnx.split(abstract)
    restored = nnx.merge(graphdef, checkpointer.restore(path, abstract_state))
    np.testing.assert_array_equal(np.asarray(restored(x)), want)
    fresh = make(1)
    assert not np.allclose(np.asarray(fresh(x)), want)


@pytest.mark.parametrize("dtype,param_dtype", [
    (jnp.bfloat16, jnp.float32), (jnp.bfloat16, jnp.bfloat16), (jnp.float16, jnp.float32),
])
def test_mixed_precision(rng, dtype, param_dtype):
    layer = DeformConv(4, (3, 3), modulated=True, dtype=dtype, param_dtype=param_dtype,
                       rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    params = jax.tree.leaves(nnx.state(layer, nnx.Param))
    assert params and all(p.dtype == param_dtype for p in params)
    layer.offset_conv.kernel[...] = (0.1 * _x(rng, layer.offset_conv.kernel[...].shape)).astype(
        param_dtype)
    x = _x(rng, (2, 8, 8, 4))
    y = layer(x)
    assert y.dtype == dtype
    full = DeformConv(4, (3, 3), modulated=True, rngs=nnx.Rngs(0))
    nnx.update(full, jax.tree.map(lambda a: a.astype(jnp.float32), nnx.state(layer)))
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(full(x)),
                               rtol=5e-2, atol=5e-2)
    grads = nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32)))(layer)
    assert grads.kernel[...].dtype == param_dtype


def test_jit(rng):
    layer = DeformConv(4, (3, 3), strides=2, modulated=True,
                       rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    layer.offset_conv.kernel[...] = 0.1 * _x(rng, layer.offset_conv.kernel[...].shape)
    x = _x(rng, (2, 9, 9, 4))
    eager = np.asarray(layer(x))
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, v: m(v))(layer, x)), eager,
                               rtol=1e-6, atol=1e-6)
    graphdef, state = nnx.split(layer)
    pure = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))
    np.testing.assert_allclose(np.asarray(pure(state, x)), eager, rtol=1e-6, atol=1e-6)


def test_caller_offsets_equal_op(rng):
    c, g, m = 6, 3, 2
    layer = DeformConv(c, (3, 3), depth_multiplier=m, strides=2, padding=1, offset_groups=g,
                       predict_offsets=False, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    _randomize(rng, layer)
    assert layer.offset_conv is None
    assert "offset_conv" not in nnx.state(layer)
    x = _x(rng, (2, 9, 8, c))
    offset = 2.0 * _x(rng, (2, 5, 4, 2 * g * 9))
    mask = jnp.asarray(rng.uniform(0, 1, (2, 5, 4, g * 9)).astype(np.float32))
    for mk in (None, mask):
        got = layer(x, offset, mk)
        want = jax_deform.deform_conv2d(x, offset, layer.kernel[...], mk, layer.bias[...],
                                        stride=2, padding=1)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="needs an offset"):
        layer(x)
    predicting = DeformConv(c, (3, 3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="predict_offsets=False"):
        predicting(x, jnp.zeros((2, 9, 8, 18), jnp.float32))


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices")
def test_partitioning_metadata(rng):
    mesh = jax.make_mesh((2,), ("model",), devices=jax.devices()[:2],
                         axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        layer = DeformConv(
            4, (3, 3), depth_multiplier=2, modulated=True,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                              (None, None, None, "model")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("model",)),
            offset_kernel_init=nnx.with_partitioning(nnx.initializers.zeros_init(),
                                                     (None, None, "model", None)),
            rngs=nnx.Rngs(int(rng.integers(1 << 30))),
        )
        specs = nnx.get_partition_spec(nnx.state(layer))
        assert tuple(specs["kernel"].get_value()) == (None, None, None, "model")
        assert tuple(specs["bias"].get_value()) == ("model",)
        assert tuple(specs["offset_conv"]["kernel"].get_value()) == (None, None, "model", None)
        assert tuple(specs["offset_conv"]["bias"].get_value()) == ()
        # The annotation is applied: the kernel is split over the two devices.
        kernel = layer.kernel[...]
        assert len(kernel.sharding.device_set) == 2
        assert kernel.addressable_shards[0].data.shape == (3, 3, 1, 4)
        x = _x(rng, (2, 8, 8, 4))
        y = nnx.jit(lambda m, v: m(v))(layer, x)
    plain = depthwise_reference(x, np.asarray(kernel), np.asarray(layer.bias[...]), (1, 1),
                                "SAME", (1, 1))
    np.testing.assert_allclose(np.asarray(y), np.asarray(plain), rtol=1e-5, atol=1e-5)


PADDING_FORMS = (r"padding must be 'SAME', 'VALID', an int, \(ph, pw\) or "
                 r"\(\(top, bottom\), \(left, right\)\)")

# Each row: DeformConv(4, (3, 3), **kwargs) arguments and the message it raises
# (all ValueError, the constructor's one exception type, except deterministic).
BAD_CONSTRUCTOR = [
    (dict(in_features=0), ValueError, r"in_features must be an int >= 1, got 0"),
    (dict(in_features=4.0), ValueError, r"in_features must be an int >= 1, got 4.0"),
    (dict(kernel_size=(3, 3, 3)), ValueError,
     r"kernel_size must be an int or a pair of ints, got \(3, 3, 3\)"),
    (dict(kernel_size=3.0), ValueError, r"kernel_size must be an int or a pair of ints, got 3.0"),
    (dict(kernel_size=None), ValueError, r"kernel_size must be an int or a pair of ints, got None"),
    (dict(kernel_size=(0, 3)), ValueError, r"kernel_size must be >= 1, got \(0, 3\)"),
    (dict(strides=0), ValueError, r"strides must be >= 1, got 0"),
    (dict(strides=1.5), ValueError, r"strides must be an int or a pair of ints, got 1.5"),
    (dict(kernel_dilation=(1, 0)), ValueError, r"kernel_dilation must be >= 1, got \(1, 0\)"),
    (dict(padding="CIRCULAR"), ValueError,
     r"padding 'CIRCULAR' is not supported: a deformable conv samples with zero padding; "
     r"use 'SAME', 'VALID'"),
    (dict(padding=-1), ValueError, r"padding must be >= 0, got -1"),
    (dict(padding=((1, 1), (1, -1))), ValueError,
     r"padding must be >= 0, got \(\(1, 1\), \(1, -1\)\)"),
    (dict(padding=1.0), ValueError, PADDING_FORMS + r", got 1.0"),
    (dict(padding=((1, True), (1, 1))), ValueError,
     PADDING_FORMS + r", got \(\(1, True\), \(1, 1\)\)"),
    (dict(depth_multiplier=0), ValueError, r"depth_multiplier must be an int >= 1, got 0"),
    (dict(depth_multiplier=True), ValueError, r"depth_multiplier must be an int >= 1, got True"),
    (dict(offset_groups=0), ValueError, r"offset_groups must be an int >= 1, got 0"),
    (dict(in_features=6, offset_groups=4), ValueError,
     r"offset_groups=4 must divide the number of input channels \(6\)"),
    (dict(dtype=jnp.int32), ValueError, r"dtype must be a floating dtype or None, got int32"),
    (dict(implementation="cuda"), ValueError,
     r"implementation must be one of None, 'auto', 'ffi', 'xla'; got 'cuda'"),
    (dict(deterministic="yes"), TypeError, r"deterministic must be True, False or None, got 'yes'"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_CONSTRUCTOR,
                         ids=[str(k) for k, _, _ in BAD_CONSTRUCTOR])
def test_bad_constructor_arguments(kwargs, error, message):
    args = dict(in_features=4, kernel_size=(3, 3))
    args.update(kwargs)
    with pytest.raises(error, match=message):
        DeformConv(args.pop("in_features"), args.pop("kernel_size"), rngs=nnx.Rngs(0), **args)


def _caller_layer(**kwargs):
    return DeformConv(4, (3, 3), predict_offsets=False, rngs=nnx.Rngs(0), **kwargs)


# Each row: a layer, the call's arguments, the error and its message.
BAD_CALLS = [
    ("x channels", lambda: DeformConv(4, (3, 3), rngs=nnx.Rngs(0)), (jnp.zeros((1, 8, 8, 5)),),
     ValueError, r"x has shape \(1, 8, 8, 5\) but expected \(N, H, W, 4\)"),
    ("x rank 3", lambda: DeformConv(4, (3, 3), rngs=nnx.Rngs(0)), (jnp.zeros((8, 8, 4)),),
     ValueError, r"x has shape \(8, 8, 4\) but expected \(N, H, W, 4\)"),
    ("x a list", lambda: DeformConv(4, (3, 3), rngs=nnx.Rngs(0)), ([[0.0]],),
     TypeError, r"x must be an array \(N, H, W, 4\), got list"),
    ("offset to a predicting layer", lambda: DeformConv(4, (3, 3), rngs=nnx.Rngs(0)),
     (jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 8, 8, 18))), ValueError,
     r"this DeformConv predicts its own offsets; build it with predict_offsets=False"),
    ("no offset", _caller_layer, (jnp.zeros((1, 8, 8, 4)),), ValueError,
     r"DeformConv\(predict_offsets=False\) needs an offset argument"),
    ("offset of other groups", lambda: _caller_layer(offset_groups=2),
     (jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 8, 8, 18))), ValueError,
     r"offset has shape \(1, 8, 8, 18\) but this DeformConv \(offset_groups=2, kernel 3x3\) "
     r"expects \(N, Ho, Wo, 2\*G\*kh\*kw\) = \(N, Ho, Wo, 36\)"),
    ("offset spatial", _caller_layer, (jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 7, 8, 18))),
     ValueError, r"offset has shape \(1, 7, 8, 18\) but expected \(1, 8, 8, 18\)"),
    ("mask groups", _caller_layer,
     (jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 8, 8, 18)), jnp.zeros((1, 8, 8, 18))), ValueError,
     r"mask has shape \(1, 8, 8, 18\) but expected \(1, 8, 8, 9\) = \(N, Ho, Wo, G\*kh\*kw\)"),
    ("empty output", lambda: DeformConv(4, (5, 5), padding="VALID", rngs=nnx.Rngs(0)),
     (jnp.zeros((1, 3, 3, 4)),), ValueError, r"the output would be empty: x spatial size \(3, 3\)"),
]


@pytest.mark.parametrize("make,args,error,message", [r[1:] for r in BAD_CALLS],
                         ids=[r[0] for r in BAD_CALLS])
def test_bad_calls(make, args, error, message):
    layer = make()
    args = tuple(jnp.asarray(a, jnp.float32) if hasattr(a, "dtype") else a for a in args)
    with pytest.raises(error, match=message):
        layer(*args)


def test_bad_calls_under_jit():
    layer = DeformConv(4, (3, 3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x has shape \(1, 8, 8, 5\) but expected \(N, H, W, 4\)"):
        nnx.jit(lambda m, v: m(v))(layer, jnp.zeros((1, 8, 8, 5), jnp.float32))
    caller = _caller_layer()
    with pytest.raises(ValueError, match=r"offset has shape \(1, 7, 8, 18\) but expected"):
        nnx.jit(lambda m, v, o: m(v, o))(caller, jnp.zeros((1, 8, 8, 4), jnp.float32),
                                         jnp.zeros((1, 7, 8, 18), jnp.float32))


def test_sampling_offsets_errors():
    with pytest.raises(ValueError, match=r"built with predict_offsets=False and has no offset "
                                         r"predictor"):
        _caller_layer().sampling_offsets(jnp.zeros((1, 8, 8, 4), jnp.float32))
    # Checked before the offset predictor's conv, which would fail with lax's words.
    with pytest.raises(ValueError, match=r"x has shape \(1, 8, 8, 5\) but expected \(N, H, W, 4\)"):
        DeformConv(4, (3, 3), rngs=nnx.Rngs(0)).sampling_offsets(
            jnp.zeros((1, 8, 8, 5), jnp.float32))


def test_import_without_flax_does_not_import_flax():
    code = "import sys, jax_deform; assert 'flax' not in sys.modules, 'flax imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_example_quick_run(tmp_path):
    for mod in ("sklearn", "matplotlib", "tqdm"):
        pytest.importorskip(mod)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "train_digits.py"), "--quick",
         "--out", str(out)],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "depthwise: test acc" in proc.stdout and "deformable: test acc" in proc.stdout
    png = out / "sampling_points.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_convnext_step_example_tiny_run():
    pytest.importorskip("optax")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "convnext_step.py"), "--device", "cpu",
         "--tiny", "--dtype", "float32"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    times = re.findall(r"(plain|deformable):\s+([0-9.]+) ms/step", proc.stdout)
    assert [name for name, _ in times] == ["plain", "deformable"]
    assert all(float(ms) > 0 for _, ms in times)
    assert "deformable / plain step time:" in proc.stdout
