"""Train a small depthwise-separable CNN on handwritten digits, with plain
depthwise convs and with deformable ones, and draw where the deformable
kernels look.

Data: scikit-learn's ``load_digits`` (1797 8x8 images, shipped with the
package), upsampled to 32x32. Training images are randomly rotated, scaled
and shifted; the test set is scored both as is and with a fixed random
rotation/scale/shift, which is where learned sampling positions should help.

    python examples/train_digits.py                # a few minutes on a laptop CPU
    python examples/train_digits.py --quick        # seconds: smoke run
    python examples/train_digits.py --epochs 30 --out runs/digits

Needs: flax, optax, scikit-learn, matplotlib, tqdm. Runs unchanged on GPU.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from jax_deform import viz
from jax_deform.nnx import DeformConv

SIZE = 32
# (in, out, stride) of the pointwise + depthwise blocks after the stem.
BLOCKS = ((16, 32, 2), (32, 64, 2), (64, 64, 1))


# ----------------------------------------------------------------------------- data


def load_data(seed: int):
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )

    def upsample(a):
        a = jnp.asarray(a)[..., None]
        return np.asarray(jax.image.resize(a, (a.shape[0], SIZE, SIZE, 1), "linear"))

    return upsample(x_tr), y_tr.astype(np.int32), upsample(x_te), y_te.astype(np.int32)


def _warp_one(key, image, max_angle, scale_range, max_shift):
    """Random rotation, scale and shift of one (H, W, 1) image, bilinear, zeros outside."""
    k1, k2, k3 = jax.random.split(key, 3)
    angle = jnp.deg2rad(jax.random.uniform(k1, (), minval=-max_angle, maxval=max_angle))
    scale = jax.random.uniform(k2, (), minval=scale_range[0], maxval=scale_range[1])
    shift = jax.random.uniform(k3, (2,), minval=-max_shift, maxval=max_shift)
    h, w = image.shape[:2]
    center = jnp.array([(h - 1) / 2, (w - 1) / 2])
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                          indexing="ij")
    # Inverse map: output pixel -> source position (rotate by -angle, divide by scale).
    dy, dx = yy - center[0] - shift[0], xx - center[1] - shift[1]
    c, s = jnp.cos(angle), jnp.sin(angle)
    sy = (c * dy - s * dx) / scale + center[0]
    sx = (s * dy + c * dx) / scale + center[1]
    out = jax.scipy.ndimage.map_coordinates(image[..., 0], [sy, sx], order=1, cval=0.0)
    return out[..., None]


def augment(key, images, max_angle=25.0, scale_range=(0.8, 1.15), max_shift=2.5):
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, im: _warp_one(k, im, max_angle, scale_range, max_shift))(
        keys, images
    )


augment_jit = jax.jit(augment)


# ----------------------------------------------------------------------------- model


class Net(nnx.Module):
    """3x3 stem, then pointwise + 3x3 depthwise blocks (plain or deformable), pool, linear."""

    def __init__(self, deformable: bool, *, rngs: nnx.Rngs):
        self.deformable = deformable
        self.stem = nnx.Conv(1, BLOCKS[0][0], (3, 3), rngs=rngs)
        pw, dw, norm = [], [], []
        for cin, cout, stride in BLOCKS:
            pw.append(nnx.Conv(cin, cout, (1, 1), rngs=rngs))
            # GroupNorm needs no train/eval switch, unlike BatchNorm, and gets the
            # unnormalized ReLU stack out of its slow start.
            norm.append(nnx.GroupNorm(cout, num_groups=8, rngs=rngs))
            if deformable:
                dw.append(DeformConv(cout, (3, 3), strides=stride, modulated=True, rngs=rngs))
            else:
                dw.append(nnx.Conv(cout, cout, (3, 3), strides=stride,
                                   feature_group_count=cout, rngs=rngs))
        self.pw = nnx.List(pw) if hasattr(nnx, "List") else pw
        self.dw = nnx.List(dw) if hasattr(nnx, "List") else dw
        self.norm = nnx.List(norm) if hasattr(nnx, "List") else norm
        self.head = nnx.Linear(BLOCKS[-1][1], 10, rngs=rngs)

    def features(self, x):
        """Logits and the input of every depthwise layer (for drawing offsets)."""
        h = jax.nn.relu(self.stem(x))
        dw_inputs = []
        for pw, dw, norm in zip(self.pw, self.dw, self.norm):
            h = jax.nn.relu(pw(h))
            dw_inputs.append(h)
            h = jax.nn.relu(norm(dw(h)))
        return self.head(h.mean(axis=(1, 2))), dw_inputs

    def __call__(self, x):
        return self.features(x)[0]


def loss_fn(model, x, y):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def predict(model, x):
    return jnp.argmax(model(x), axis=-1)


def accuracy(model, x, y, batch=256):
    correct = 0
    for i in range(0, len(x), batch):
        correct += int(jnp.sum(predict(model, jnp.asarray(x[i:i + batch])) == y[i:i + batch]))
    return correct / len(x)


def train(name, deformable, data, args):
    x_tr, y_tr, x_te, y_te, x_te_aug = data
    model = Net(deformable, rngs=nnx.Rngs(args.seed))
    steps_per_epoch = len(x_tr) // args.batch
    total = steps_per_epoch * args.epochs
    schedule = optax.cosine_decay_schedule(args.lr, total)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=1e-4), wrt=nnx.Param)
    key = jax.random.key(args.seed + 1)
    order_rng = np.random.default_rng(args.seed)
    times = []
    bar = tqdm(total=total, desc=f"{name:>10}", unit="step", dynamic_ncols=True)
    for epoch in range(args.epochs):
        order = order_rng.permutation(len(x_tr))
        for s in range(steps_per_epoch):
            idx = order[s * args.batch:(s + 1) * args.batch]
            key, sub = jax.random.split(key)
            xb = augment_jit(sub, jnp.asarray(x_tr[idx]))
            yb = jnp.asarray(y_tr[idx])
            xb.block_until_ready()
            t0 = time.perf_counter()
            loss = train_step(model, optimizer, xb, yb)
            loss.block_until_ready()
            times.append(time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss):.3f}")
    bar.close()
    result = dict(
        acc=accuracy(model, x_te, y_te),
        acc_aug=accuracy(model, x_te_aug, y_te),
        # The first step includes compilation; the median of the rest is the steady state.
        step_ms=1e3 * float(np.median(times[1:] if len(times) > 1 else times)),
        params=sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param))),
    )
    return model, result


# ----------------------------------------------------------------------------- picture


def sampling_layers(model, image):
    """viz.SamplingLayer for each deformable layer of ``model`` on one image (H, W, 1)."""
    _, inputs = model.features(jnp.asarray(image)[None])
    layers = []
    for layer, h in zip(model.dw, inputs):
        offset, mask = layer.sampling_offsets(h)
        layers.append(viz.SamplingLayer(
            np.asarray(offset[0]), layer.kernel_size, layer.strides, layer.padding,
            layer.kernel_dilation, input_size=h.shape[1:3],
            mask=None if mask is None else np.asarray(mask[0]),
        ))
    return layers


def draw(model, images, labels, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(images)
    fig = Figure(figsize=(2.6 * n, 5.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, n, squeeze=False)
    for k, (image, label) in enumerate(zip(images, labels)):
        layers = sampling_layers(model, image)
        first = layers[0]
        ho, wo = first.offset.shape[:2]
        viz.plot_sampling_points(
            image[..., 0], first.offset, [(ho // 2 - 3, wo // 2), (ho // 2 + 3, wo // 2 - 2)],
            kernel_size=first.kernel_size, stride=first.stride, padding=first.padding,
            dilation=first.dilation, mask=first.mask, ax=axes[0, k],
            title=f"digit {label}: layer 1, 2 units",
        )
        plain = [viz.SamplingLayer(np.zeros_like(l.offset), l.kernel_size, l.stride, l.padding,
                                   l.dilation, l.input_size) for l in layers]
        # With "SAME" padding and stride 2 the extra padding row/column goes to the
        # bottom/right, so the unit at (Ho/2 - 1, Wo/2 - 1) is the one centered on the image.
        last = layers[-1].offset.shape[:2]
        viz.plot_traced_points(
            image[..., 0], layers, [(last[0] // 2 - 1, last[1] // 2 - 1)], axes=[axes[1, k]],
            reference_layers=plain, titles=[f"layers 1-3: {9 ** len(layers)} points"],
        )
    fig.suptitle("Learned sampling positions (gray: plain 3x3 grid; dot size: mask)",
                 fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="digits_out", help="folder for the PNG")
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke run)")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    x_tr, y_tr, x_te, y_te = load_data(args.seed)
    if args.quick:
        args.epochs = 1
        x_tr, y_tr = x_tr[: 4 * args.batch], y_tr[: 4 * args.batch]
        x_te, y_te = x_te[:128], y_te[:128]
    # A fixed random warp of the test set: same recipe as training augmentation.
    x_te_aug = np.asarray(augment_jit(jax.random.key(1234), jnp.asarray(x_te)))
    data = (x_tr, y_tr, x_te, y_te, x_te_aug)
    print(f"devices: {jax.devices()}  train {len(x_tr)}  test {len(x_te)}  "
          f"epochs {args.epochs}  batch {args.batch}")

    results = {}
    for name, deformable in (("depthwise", False), ("deformable", True)):
        model, results[name] = train(name, deformable, data, args)
    for name, r in results.items():
        print(f"{name:>10}: test acc {r['acc']:.4f}  warped-test acc {r['acc_aug']:.4f}  "
              f"median step {r['step_ms']:.1f} ms  params {r['params']}")

    picks = [int(np.flatnonzero(y_te == d)[0]) for d in (2, 3, 5, 7) if np.any(y_te == d)]
    path = draw(model, x_te_aug[picks], y_te[picks], os.path.join(args.out, "sampling_points.png"))
    print(f"sampling points: {path}")
    print(f"total time {time.perf_counter() - start:.1f} s")
    return results


if __name__ == "__main__":
    main()
