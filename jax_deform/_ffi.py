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
TANGENT_TARGET = "jax_deform_tangent_v1"  # forward mode (jvp)
TARGETS = (FORWARD_TARGET, BACKWARD_TARGET, TANGENT_TARGET)


def _register_targets() -> dict[str, frozenset[str]]:
    """Registers every handler; returns platform -> the target names it has."""
    if extension is None:
        return {}
    registered = {}
    for platform, targets in extension.registrations().items():
        for name, capsule in targets.items():
            jax.ffi.register_ffi_target(name, capsule, platform=platform)
        registered[platform.lower()] = frozenset(targets)
    return registered


_REGISTERED = _register_targets()

#: Lower-case platform names ("cpu", "cuda") that have compiled kernels.
KERNEL_PLATFORMS: frozenset[str] = frozenset(_REGISTERED)

#: Platforms whose build has the forward-mode (tangent) kernel.
TANGENT_PLATFORMS: frozenset[str] = frozenset(
    p for p, names in _REGISTERED.items() if TANGENT_TARGET in names)


def cuda_backward_workspace_bytes(n, layout, params, dtype: str, deterministic: bool,
                                  sm_count: int = 0) -> int:
    """Device workspace bytes the CUDA backward needs for batch n (a number) of
    `layout` with `params`' geometry (the kernels' plan depends on both and on
    the GPU's SM count): on a GPU of `sm_count` SMs, or with 0 on any GPU of
    up to 256 (a lowered program may be exported and run elsewhere)."""
    return int(extension.cuda_backward_workspace_bytes(
        n, layout.h, layout.w, layout.c, layout.ho, layout.wo, layout.kh, layout.kw,
        *params.stride, *params.padding, *params.dilation,
        layout.groups, layout.multiplier, dtype, bool(deterministic), int(sm_count)))
