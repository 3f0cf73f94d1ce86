"""The compiled extension and XLA: loading it, registering its FFI targets
(versioned names) and asking it for the CUDA backward's workspace size. The
only module that touches the extension's kernels."""

from __future__ import annotations

import jax

try:
    from jax_deform import _jax_deform as extension
except ImportError:  # not built: every call takes the pure-jnp path
    extension = None

# Versioned FFI target names: what a lowered (and exported) program calls.
# README "Saving and exporting" states the compatibility promise; a change of
# operands, results, attributes or meaning gets a new version, and the old
# name stays registered.
FORWARD_TARGET = "jax_deform_forward_v1"
BACKWARD_TARGET = "jax_deform_backward_v1"
TARGETS = (FORWARD_TARGET, BACKWARD_TARGET)


def _register_targets() -> frozenset[str]:
    if extension is None:
        return frozenset()
    platforms = set()
    for platform, targets in extension.registrations().items():
        for name, capsule in targets.items():
            jax.ffi.register_ffi_target(name, capsule, platform=platform)
        platforms.add(platform.lower())
    return frozenset(platforms)


#: Lower-case platform names ("cpu", "cuda") that have compiled kernels.
KERNEL_PLATFORMS: frozenset[str] = _register_targets()


def cuda_backward_workspace_bytes(n, layout, dtype: str, deterministic: bool) -> int:
    """Device workspace bytes the CUDA backward needs for batch n (a number)."""
    return int(extension.cuda_backward_workspace_bytes(
        n, layout.h, layout.w, layout.c, layout.ho, layout.wo, layout.kh, layout.kw,
        layout.groups, layout.multiplier, dtype, bool(deterministic)))
