"""An independent float64 NumPy oracle for the tests, written separately from
jax_deform.reference (per-tap loop, explicit corner checks)."""

from __future__ import annotations

import numpy as np


def deform_conv2d(x, offset, weight, mask=None, bias=None, *, stride=(1, 1), pad=(0, 0),
                  dilation=(1, 1)):
    """NHWC; pad is (top, left); the output size is read off offset."""
    x = np.asarray(x, np.float64)
    offset = np.asarray(offset, np.float64)
    weight = np.asarray(weight, np.float64)
    n, h, w, c = x.shape
    _, ho, wo, off_c = offset.shape
    kh, kw, _, cm = weight.shape
    k_total = kh * kw
    groups = off_c // (2 * k_total)
    cg, m = c // groups, cm // c
    off = offset.reshape(n, ho, wo, groups, k_total, 2)
    msk = None if mask is None else np.asarray(mask, np.float64).reshape(n, ho, wo, groups, k_total)
    xs = x.reshape(n, h, w, groups, cg)
    out = np.zeros((n, ho, wo, c, m))
    n_idx = np.arange(n)[:, None, None, None]
    g_idx = np.arange(groups)[None, None, None, :]
    for k in range(k_total):
        i, j = divmod(k, kw)
        py = (np.arange(ho) * stride[0] - pad[0] + i * dilation[0])[None, :, None, None] + off[..., k, 0]
        px = (np.arange(wo) * stride[1] - pad[1] + j * dilation[1])[None, None, :, None] + off[..., k, 1]
        with np.errstate(invalid="ignore"):
            counts = (py > -1) & (py < h) & (px > -1) & (px < w)
        sample = np.zeros((n, ho, wo, groups, cg))
        y0 = np.floor(np.where(counts, py, 0)).astype(np.int64)
        x0 = np.floor(np.where(counts, px, 0)).astype(np.int64)
        fy = np.where(counts, py, 0) - y0
        fx = np.where(counts, px, 0) - x0
        for cy, cx, wgt in ((y0, x0, (1 - fy) * (1 - fx)), (y0, x0 + 1, (1 - fy) * fx),
                            (y0 + 1, x0, fy * (1 - fx)), (y0 + 1, x0 + 1, fy * fx)):
            ok = counts & (cy >= 0) & (cy <= h - 1) & (cx >= 0) & (cx <= w - 1)
            vals = xs[n_idx, np.clip(cy, 0, h - 1), np.clip(cx, 0, w - 1), g_idx]
            sample += np.where(ok[..., None], wgt[..., None] * vals, 0.0)
        sample[np.isnan(py) | np.isnan(px)] = np.nan
        if msk is not None:
            sample = sample * msk[..., k][..., None]
        wk = weight[i, j, 0].reshape(c, m)
        out += sample.reshape(n, ho, wo, c)[..., None] * wk
    out = out.reshape(n, ho, wo, cm)
    if bias is not None:
        out = out + np.asarray(bias, np.float64)
    return out
