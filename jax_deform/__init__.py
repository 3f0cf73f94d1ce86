"""jax-deform: fast depthwise deformable convolution for JAX and Flax."""

from jax_deform import reference
from jax_deform.api import (
    deform_conv2d,
    deterministic_by_default,
    disabled_checks,
    kernel_platforms,
)

__all__ = [
    "deform_conv2d",
    "deterministic_by_default",
    "disabled_checks",
    "kernel_platforms",
    "reference",
]
__version__ = "0.1.0"
