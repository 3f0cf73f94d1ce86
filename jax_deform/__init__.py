"""jax-deform: fast depthwise deformable convolution for JAX and Flax."""

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
