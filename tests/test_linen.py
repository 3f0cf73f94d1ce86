"""Flax Linen DeformConv: init == depthwise conv, gradients, conversion,
checkpoints, dtypes, jit, caller offsets, logical partitioning, errors."""

import pytest

pytest.importorskip("flax")
optax = pytest.importorskip("optax")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import jax_deform  # noqa: E402
from jax_deform.linen import DeformConv, from_depthwise_conv  # noqa: E402
from tests.helpers import constant_prediction_oracle  # noqa: E402


def _x(rng, shape, dtype=np.float32):
    return jnp.asarray(rng.standard_normal(shape).astype(dtype))


def _key(rng):
    return jax.random.key(int(rng.integers(1 << 30)))


def depthwise_reference(x, kernel, bias, strides, padding, dilation):
    y = lax.conv_general_dilated(
        x, kernel, strides, padding, rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
        precision=lax.Precision.HIGHEST,
    )
    return y if bias is None else y + bias


def _randomize(rng, params, names=("kernel", "bias")):
    params = dict(params)
    for name in names:
        if name in params:
            params[name] = _x(rng, params[name].shape).astype(params[name].dtype)
    return params


@pytest.mark.parametrize("strides,padding,dilation,m,g,modulated", [
    ((1, 1), "SAME", (1, 1), 1, 1, False),
    ((2, 2), "SAME", (1, 1), 2, 2, True),
    ((2, 1), ((1, 2), (0, 3)), (1, 2), 1, 4, True),
    ((1, 1), "VALID", (2, 2), 3, 1, False),
])
def test_init_equals_depthwise_conv(rng, strides, padding, dilation, m, g, modulated):
    c = 4
    layer = DeformConv(kernel_size=(3, 3), depth_multiplier=m, strides=strides, padding=padding,
                       kernel_dilation=dilation, offset_groups=g, modulated=modulated)
    x = _x(rng, (2, 11, 10, c))
    params = layer.init(_key(rng), x)["params"]
    p = 3 if modulated else 2
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes == {"kernel": (3, 3, 1, c * m), "bias": (c * m,),
                      "offset_conv": {"kernel": (3, 3, c, p * g * 9), "bias": (p * g * 9,)}}
    assert not any(np.any(np.asarray(a)) for a in jax.tree.leaves(params["offset_conv"]))
    params = _randomize(rng, params)
    y = layer.apply({"params": params}, x)
    want = depthwise_reference(x, params["kernel"], params["bias"], strides, padding, dilation)
    assert y.shape == want.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strides,padding,g", [((1, 1), "SAME", 1), ((2, 2), "SAME", 2),
                                              ((1, 1), ((1, 1), (1, 1)), 4)])
def test_predicted_mask_is_twice_the_sigmoid_of_the_logits(rng, strides, padding, g):
    # Nonzero logits and offsets: a zero predictor kernel with a random bias
    # predicts the same offsets and mask logits at every pixel.
    layer = DeformConv(kernel_size=(3, 3), strides=strides, padding=padding, offset_groups=g,
                       modulated=True)
    x = _x(rng, (2, 7, 8, 4))
    params = _randomize(rng, layer.init(_key(rng), x)["params"])
    pred_bias, want, _ = constant_prediction_oracle(
        rng, x, params["kernel"], params["bias"], strides=strides, padding=padding,
        dilation=1, groups=g)
    params["offset_conv"] = dict(params["offset_conv"], bias=jnp.asarray(pred_bias))
    y = layer.apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


def test_gradients_reach_offset_predictor_and_optax_step(rng):
    layer = DeformConv(kernel_size=(3, 3), offset_groups=2, modulated=True)
    x = _x(rng, (2, 9, 9, 4))
    target = _x(rng, (2, 9, 9, 4))
    params = layer.init(_key(rng), x)["params"]

    def loss_fn(p):
        return jnp.mean((layer.apply({"params": p}, x) - target) ** 2)

    grads = jax.grad(loss_fn)(params)
    gk = np.asarray(grads["offset_conv"]["kernel"])
    n_off = 2 * 2 * 9
    assert np.abs(gk[..., :n_off]).max() > 1e-4
    assert np.abs(gk[..., n_off:]).max() > 1e-4

    tx = optax.sgd(1e-2)
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    assert np.abs(np.asarray(new["offset_conv"]["kernel"])).max() > 0
    assert float(loss_fn(new)) < float(loss_fn(params))


def test_from_depthwise_conv(rng):
    c, m = 6, 2
    conv = nn.Conv(c * m, (3, 3), strides=(2, 1), padding=((1, 1), (2, 0)),
                   kernel_dilation=(1, 2), feature_group_count=c)
    x = _x(rng, (2, 12, 11, c))
    variables = conv.init(_key(rng), x)
    variables = {"params": _randomize(rng, variables["params"])}
    module, params = from_depthwise_conv(conv, variables, offset_groups=3, modulated=True)
    assert module.depth_multiplier == m
    # The converted params have exactly the structure init gives.
    init_params = module.init(_key(rng), x)["params"]
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, init_params)
    np.testing.assert_allclose(np.asarray(module.apply({"params": params}, x)),
                               np.asarray(conv.apply(variables, x)), rtol=1e-5, atol=1e-5)


X4 = jnp.zeros((1, 8, 8, 4), jnp.float32)


def _with_params(conv, **replace):
    params = dict(conv.init(jax.random.key(0), X4)["params"])
    params.update(replace)
    return params


DEPTHWISE = nn.Conv(4, (3, 3), feature_group_count=4)

# Each row: the converter's arguments (as a thunk) and its ValueError message.
BAD_CONVERSIONS = [
    ("not a conv", lambda: (nn.Dense(4), {}), r"conv must be an nn.Conv, got Dense"),
    ("params not a mapping", lambda: (DEPTHWISE, None),
     r"conv_params must be the conv's params, .*got NoneType"),
    ("no kernel", lambda: (DEPTHWISE, {"bias": jnp.zeros(4)}),
     r"conv_params has no 'kernel' \(keys: \['bias'\]\)"),
    ("1D", lambda: (nn.Conv(4, (3,), feature_group_count=4), {"kernel": jnp.zeros((3, 1, 4))}),
     r"only 2D convolutions can be converted, got kernel shape \(3, 1, 4\)"),
    ("full conv", lambda: (nn.Conv(8, (3, 3)), _with_params(nn.Conv(8, (3, 3)))),
     r"the conv is not depthwise: .*got kernel shape \(3, 3, 4, 8\), feature_group_count=1"),
    ("grouped conv", lambda: (nn.Conv(4, (3, 3), feature_group_count=2),
                              _with_params(nn.Conv(4, (3, 3), feature_group_count=2))),
     r"the conv is not depthwise: .*feature_group_count=2"),
    ("another layer's kernel", lambda: (DEPTHWISE, _with_params(DEPTHWISE,
                                                                kernel=jnp.zeros((3, 3, 1, 8)))),
     r"conv_params\['kernel'\] has shape \(3, 3, 1, 8\) but the conv \(kernel_size=\(3, 3\), "
     r"features=4\) expects \(3, 3, 1, 4\)"),
    ("input dilation", lambda: (nn.Conv(4, (3, 3), feature_group_count=4, input_dilation=2),
                                _with_params(DEPTHWISE)),
     r"the conv has input_dilation=2; convs with input dilation \(transposed convs\)"),
    ("kernel mask", lambda: (nn.Conv(4, (3, 3), feature_group_count=4,
                                     mask=jnp.ones((3, 3, 1, 4))), _with_params(DEPTHWISE)),
     r"the conv has a kernel mask"),
    ("bias not expected", lambda: (nn.Conv(4, (3, 3), feature_group_count=4, use_bias=False),
                                   _with_params(DEPTHWISE)),
     r"conv.use_bias=False but conv_params has a 'bias' \(keys: \['bias', 'kernel'\]\)"),
    ("bias missing", lambda: (DEPTHWISE, {"kernel": jnp.zeros((3, 3, 1, 4))}),
     r"conv.use_bias=True but conv_params has no 'bias' \(keys: \['kernel'\]\)"),
    ("bias length", lambda: (DEPTHWISE, _with_params(DEPTHWISE, bias=jnp.zeros(5))),
     r"conv_params\['bias'\] has shape \(5,\) but expected \(4,\) = \(features,\)"),
    ("circular padding", lambda: (nn.Conv(4, (3, 3), feature_group_count=4, padding="CIRCULAR"),
                                  _with_params(DEPTHWISE)),
     r"padding 'CIRCULAR' is not supported"),
]


@pytest.mark.parametrize("make,message", [r[1:] for r in BAD_CONVERSIONS],
                         ids=[r[0] for r in BAD_CONVERSIONS])
def test_from_depthwise_conv_rejects_non_depthwise(make, message):
    conv, conv_params = make()
    with pytest.raises(ValueError, match=message):
        from_depthwise_conv(conv, conv_params)


def test_from_depthwise_conv_checks_overrides():
    params = _with_params(DEPTHWISE)
    with pytest.raises(ValueError, match=r"offset_groups=3 must divide the number of input "
                                         r"channels \(4\)"):
        from_depthwise_conv(DEPTHWISE, params, offset_groups=3)
    with pytest.raises(ValueError, match=r"strides must be >= 1, got 0"):
        from_depthwise_conv(DEPTHWISE, params, strides=0)


def test_checkpoint_roundtrip(rng, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    layer = DeformConv(kernel_size=(3, 3), depth_multiplier=2, modulated=True)
    x = _x(rng, (2, 8, 8, 4))
    params = layer.init(_key(rng), x)["params"]
    params["offset_conv"] = _randomize(rng, params["offset_conv"])
    params["offset_conv"]["kernel"] = 0.1 * params["offset_conv"]["kernel"]
    want = np.asarray(layer.apply({"params": params}, x))

    path = (tmp_path / "ckpt").absolute()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, params)
    checkpointer.wait_until_finished()
    abstract = jax.eval_shape(lambda: layer.init(jax.random.key(0), x)["params"])
    restored = checkpointer.restore(path, abstract)
    np.testing.assert_array_equal(np.asarray(layer.apply({"params": restored}, x)), want)


@pytest.mark.parametrize("dtype,param_dtype", [
    (jnp.bfloat16, jnp.float32), (jnp.bfloat16, jnp.bfloat16), (jnp.float16, jnp.float32),
])
def test_mixed_precision(rng, dtype, param_dtype):
    layer = DeformConv(kernel_size=(3, 3), modulated=True, dtype=dtype, param_dtype=param_dtype)
    x = _x(rng, (2, 8, 8, 4))
    params = layer.init(_key(rng), x)["params"]
    assert all(p.dtype == param_dtype for p in jax.tree.leaves(params))
    params["offset_conv"]["kernel"] = (
        0.1 * _x(rng, params["offset_conv"]["kernel"].shape)).astype(param_dtype)
    y = layer.apply({"params": params}, x)
    assert y.dtype == dtype
    full = DeformConv(kernel_size=(3, 3), modulated=True)
    want = full.apply({"params": jax.tree.map(lambda a: a.astype(jnp.float32), params)}, x)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want), rtol=5e-2, atol=5e-2)


def test_jit(rng):
    layer = DeformConv(kernel_size=(3, 3), strides=2, modulated=True)
    x = _x(rng, (2, 9, 9, 4))
    params = layer.init(_key(rng), x)["params"]
    params["offset_conv"]["kernel"] = 0.1 * _x(rng, params["offset_conv"]["kernel"].shape)
    eager = np.asarray(layer.apply({"params": params}, x))
    jitted = jax.jit(lambda p, v: layer.apply({"params": p}, v))(params, x)
    np.testing.assert_allclose(np.asarray(jitted), eager, rtol=1e-6, atol=1e-6)


def test_caller_offsets_equal_op(rng):
    c, g = 6, 3
    layer = DeformConv(kernel_size=(3, 3), strides=2, padding=1, offset_groups=g,
                       predict_offsets=False)
    x = _x(rng, (2, 9, 8, c))
    offset = 2.0 * _x(rng, (2, 5, 4, 2 * g * 9))
    mask = jnp.asarray(rng.uniform(0, 1, (2, 5, 4, g * 9)).astype(np.float32))
    params = layer.init(_key(rng), x, offset, mask)["params"]
    assert set(params) == {"kernel", "bias"}
    params = _randomize(rng, params)
    got = layer.apply({"params": params}, x, offset, mask)
    want = jax_deform.deform_conv2d(x, offset, params["kernel"], mask, params["bias"],
                                    stride=2, padding=1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="needs an offset"):
        layer.apply({"params": params}, x)


def test_logical_partitioning_metadata(rng):
    layer = DeformConv(
        kernel_size=(3, 3), modulated=True,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 (None, None, None, "channels")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("channels",)),
        offset_kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                        (None, None, "channels", None)),
    )
    x = _x(rng, (2, 8, 8, 4))
    variables = layer.init(_key(rng), x)
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["kernel"]) == (None, None, None, "channels")
    assert tuple(specs["bias"]) == ("channels",)
    assert tuple(specs["offset_conv"]["kernel"]) == (None, None, "channels", None)
    # Boxed params still apply, and the converter unboxes them.
    y = layer.apply(variables, x)
    plain = nn.unbox(variables)["params"]
    want = depthwise_reference(x, plain["kernel"], plain["bias"], (1, 1), "SAME", (1, 1))
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
    conv = nn.Conv(4, (3, 3), feature_group_count=4,
                   kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                            (None, None, None, "channels")))
    conv_vars = conv.init(_key(rng), x)
    module, params = from_depthwise_conv(conv, conv_vars)
    np.testing.assert_allclose(np.asarray(module.apply({"params": params}, x)),
                               np.asarray(conv.apply(conv_vars, x)), rtol=1e-5, atol=1e-5)


PADDING_FORMS = (r"padding must be 'SAME', 'VALID', an int, \(ph, pw\) or "
                 r"\(\(top, bottom\), \(left, right\)\)")

# Each row: DeformConv attributes, init's arguments besides the key (x is
# (1, 8, 8, 6) unless given), the error and its message. Linen checks at init.
X6 = jnp.zeros((1, 8, 8, 6), jnp.float32)
BAD = [
    ("kernel_size 3D", dict(kernel_size=(3, 3, 3)), (), ValueError,
     r"kernel_size must be an int or a pair of ints, got \(3, 3, 3\)"),
    ("kernel_size 0", dict(kernel_size=0), (), ValueError, r"kernel_size must be >= 1, got 0"),
    ("strides 0", dict(strides=0), (), ValueError, r"strides must be >= 1, got 0"),
    ("strides float", dict(strides=2.0), (), ValueError,
     r"strides must be an int or a pair of ints, got 2.0"),
    ("dilation 0", dict(kernel_dilation=0), (), ValueError, r"kernel_dilation must be >= 1, got 0"),
    ("padding REFLECT", dict(padding="REFLECT"), (), ValueError,
     r"padding 'REFLECT' is not supported: a deformable conv samples with zero padding"),
    ("padding negative", dict(padding=-1), (), ValueError, r"padding must be >= 0, got -1"),
    ("padding float", dict(padding=(1, 1.5)), (), ValueError, PADDING_FORMS + r", got \(1, 1.5\)"),
    ("depth_multiplier 0", dict(depth_multiplier=0), (), ValueError,
     r"depth_multiplier must be an int >= 1, got 0"),
    ("offset_groups 0", dict(offset_groups=0), (), ValueError,
     r"offset_groups must be an int >= 1, got 0"),
    ("offset_groups divide", dict(offset_groups=4), (), ValueError,
     r"offset_groups=4 must divide the number of input channels \(6\)"),
    ("dtype", dict(dtype=jnp.int32), (), ValueError,
     r"dtype must be a floating dtype or None, got int32"),
    ("implementation", dict(implementation="cuda"), (), ValueError,
     r"implementation must be one of None, 'auto', 'ffi', 'xla'; got 'cuda'"),
    ("deterministic", dict(deterministic="yes"), (), TypeError,
     r"deterministic must be True, False or None, got 'yes'"),
    ("x rank 3", dict(), (jnp.zeros((8, 8, 6), jnp.float32),), ValueError,
     r"x has shape \(8, 8, 6\) but expected \(N, H, W, C\) with C >= 1"),
    ("x no channels", dict(), (jnp.zeros((1, 8, 8, 0), jnp.float32),), ValueError,
     r"x has shape \(1, 8, 8, 0\) but expected \(N, H, W, C\) with C >= 1"),
    ("x a list", dict(), ([[0.0]],), TypeError,
     r"x must be an array \(N, H, W, C\) with C >= 1, got list"),
    ("offset to a predicting layer", dict(), (X6, jnp.zeros((1, 8, 8, 18), jnp.float32)),
     ValueError, r"this DeformConv predicts its own offsets; build it with predict_offsets=False"),
    ("no offset", dict(predict_offsets=False), (), ValueError,
     r"DeformConv\(predict_offsets=False\) needs an offset argument"),
    ("offset of other groups", dict(predict_offsets=False, offset_groups=3),
     (X6, jnp.zeros((1, 8, 8, 18), jnp.float32)), ValueError,
     r"offset has shape \(1, 8, 8, 18\) but this DeformConv \(offset_groups=3, kernel 3x3\) "
     r"expects \(N, Ho, Wo, 2\*G\*kh\*kw\) = \(N, Ho, Wo, 54\)"),
    ("mask groups", dict(predict_offsets=False),
     (X6, jnp.zeros((1, 8, 8, 18), jnp.float32), jnp.zeros((1, 8, 8, 18), jnp.float32)),
     ValueError, r"mask has shape \(1, 8, 8, 18\) but expected \(1, 8, 8, 9\)"),
    ("empty output", dict(kernel_size=(5, 5), padding="VALID"),
     (jnp.zeros((1, 3, 3, 6), jnp.float32),), ValueError,
     r"the output would be empty: x spatial size \(3, 3\)"),
]


@pytest.mark.parametrize("attrs,args,error,message", [r[1:] for r in BAD], ids=[r[0] for r in BAD])
def test_bad_arguments(attrs, args, error, message):
    attrs = dict(dict(kernel_size=(3, 3)), **attrs)
    with pytest.raises(error, match=message):
        DeformConv(**attrs).init(jax.random.key(0), *(args or (X6,)))


def test_bad_arguments_under_jit():
    layer = DeformConv(kernel_size=(3, 3), predict_offsets=False)
    with pytest.raises(ValueError, match=r"offset has shape \(1, 7, 8, 18\) but expected"):
        jax.jit(layer.init)(jax.random.key(0), X6, jnp.zeros((1, 7, 8, 18), jnp.float32))


def test_linen_does_not_import_flax_nnx():
    import subprocess
    import sys

    code = "import sys, jax_deform.linen; assert 'flax.nnx' not in sys.modules, 'flax.nnx imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
