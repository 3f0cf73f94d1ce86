"""The backward's workspace bound for a symbolic batch (jax.export with shape
polymorphism): at least what the CUDA kernels ask for at every batch."""

from types import SimpleNamespace

import pytest

from jax_deform import _ffi
from jax_deform._primitives import largest_kernel_batch, workspace_bound

pytestmark = pytest.mark.skipif(
    not hasattr(_ffi.extension, "cuda_backward_workspace_bytes"),
    reason="the extension is built without CUDA")

# (H, W, C, kernel, G): the speed and model suites' layers, the tests' small
# and odd ones, a tiny image (every part of the workspace switches at large
# batches there), several offset groups.
LAYOUTS = [(64, 64, 512, 3, 1), (32, 32, 512, 3, 1), (128, 128, 128, 3, 1), (56, 56, 64, 3, 1),
           (56, 56, 96, 7, 1), (28, 28, 192, 7, 1), (14, 14, 384, 7, 1), (7, 7, 768, 7, 1),
           (56, 56, 144, 5, 1), (32, 32, 1024, 3, 4), (6, 5, 144, 5, 1), (4, 4, 128, 3, 1),
           (1, 1, 256, 1, 1), (8, 8, 2048, 5, 8)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("h, w, c, k, g", LAYOUTS)
def test_symbolic_batch_workspace_covers_every_batch(h, w, c, k, g, dtype, deterministic):
    layout = SimpleNamespace(h=h, w=w, c=c, ho=h, wo=w, kh=k, kw=k, groups=g, multiplier=1)
    params = SimpleNamespace(stride=(1, 1), padding=(k // 2, k // 2), dilation=(1, 1))

    def nbytes(n):
        return _ffi.cuda_backward_workspace_bytes(n, layout, params, dtype, deterministic)

    largest = largest_kernel_batch(layout)
    slope, intercept = workspace_bound(nbytes, largest)
    short = [n for n in range(1, min(largest, 2048) + 1) if slope * n + intercept < nbytes(n)]
    assert not short, f"bound below the kernels' workspace at batches {short[:8]}"
    # Not wasteful at the largest batch: within 2x + 32 MiB. (Below it a line
    # over-sizes where the fast path has not yet switched to the gather,
    # whose scratch the line must already hold.)
    assert slope * largest + intercept <= 2 * nbytes(largest) + (32 << 20)


SM_COUNTS = (16, 46, 80, 108, 114, 132, 142, 148, 170, 256)  # from small GPUs to the most sized for


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("h, w, c, k, g", LAYOUTS)
def test_workspace_covers_every_gpu_up_to_256_sms(h, w, c, k, g, deterministic):
    """The workspace a program is lowered with (sm_count 0) holds what the
    kernels plan on each GPU: the per-block partial sums grow with the SM
    count and the small-grid slices depend on it both ways."""
    layout = SimpleNamespace(h=h, w=w, c=c, ho=h, wo=w, kh=k, kw=k, groups=g, multiplier=1)
    params = SimpleNamespace(stride=(1, 1), padding=(k // 2, k // 2), dilation=(1, 1))
    largest = largest_kernel_batch(layout)
    for dtype in ("float32", "bfloat16"):
        for n in sorted({min(b, largest) for b in (1, 2, 3, 5, 8, 16, 33, 64, 128, 256)}):
            lowered = _ffi.cuda_backward_workspace_bytes(n, layout, params, dtype, deterministic)
            for sms in SM_COUNTS:
                on_gpu = _ffi.cuda_backward_workspace_bytes(n, layout, params, dtype, deterministic,
                                                           sm_count=sms)
                assert lowered >= on_gpu, (dtype, n, sms)
