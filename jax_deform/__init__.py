"""jax-deform: fast depthwise deformable convolution for JAX and Flax.

The stack a call goes through, one module per room:

    api.deform_conv2d        check arguments (_params), pick the implementation,
       |                     keep the caller's data_format (_layout)
       |-- "xla": reference.deform_conv2d (pure jnp)
       v
    _autodiff                custom JVP: forward kernel for y, tangent_p for y_dot;
       |                     grad = transpose of tangent_p = ONE backward kernel
       v
    _batching                vmap: fold the batch into N (or into the channels)
       v
    _sharding                custom_partitioning: run per shard, partial sums out
       v
    _primitives              forward_p / backward_p / tangent_p: abstract eval,
       |                     lowering to the FFI targets (or the jnp fallback)
       v
    _ffi                     the extension loaded, its versioned targets registered
       v
    lib/ (_jax_deform)       C++ CPU and CUDA kernels behind XLA FFI handlers

Beside it: nnx.py / linen.py (Flax layers, sharing _flax_common), viz.py,
bench.py, _config.py (what the installed build carries).
"""

from jax_deform import reference
from jax_deform._config import MissingKernelWarning, build_config, show_config
from jax_deform.api import (
    deform_conv2d,
    deterministic_by_default,
    disabled_checks,
    kernel_platforms,
)

__all__ = [
    "MissingKernelWarning",
    "build_config",
    "deform_conv2d",
    "deterministic_by_default",
    "disabled_checks",
    "kernel_platforms",
    "reference",
    "show_config",
]
__version__ = "0.1.0"
