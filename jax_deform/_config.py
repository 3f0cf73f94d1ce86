"""What the installed build carries (platforms, dtypes, CUDA architectures),
and the once-only warning for a GPU that this build has no kernels for."""

from __future__ import annotations

import re
import sys
import warnings

import jax

from jax_deform._params import KERNEL_DTYPES
from jax_deform._ffi import KERNEL_PLATFORMS
from jax_deform._ffi import extension as _extension


class MissingKernelWarning(UserWarning):
    """deform_conv2d runs on a GPU that the installed build has no kernels for."""


def _build_info() -> dict:
    info = getattr(_extension, "build_info", None)
    if info is None:
        return {"cuda_architectures": "", "cuda_compiler_version": ""}
    return dict(info())


def cuda_architectures() -> tuple[str, ...]:
    """The CUDA architectures compiled into the extension, as nvcc names them:
    ``sm_XY`` is machine code (SASS) for compute capability X.Y, ``compute_XY``
    is PTX, which the driver compiles for any GPU of compute capability >= X.Y.
    Empty when the build has no CUDA kernels."""
    text = _build_info()["cuda_architectures"]
    return tuple(a for a in text.split(",") if a)


_ARCH = re.compile(r"(sm|compute)_(\d+)([af]?)")


def covers(architectures, compute_capability: str) -> bool:
    """Whether code built for ``architectures`` loads on a GPU of
    ``compute_capability`` ("9.0"): SASS for X.Y runs on X.Z with Z >= Y (an
    "a" variant only on X.Y itself); PTX for X.Y is JIT-compiled for any X'.Z'
    >= X.Y (an "a"/"f" variant only within major X)."""
    major, minor = (int(v) for v in str(compute_capability).split(".")[:2])
    for arch in architectures:
        m = _ARCH.fullmatch(arch)
        if m is None:
            continue
        kind, number, variant = m.group(1), int(m.group(2)), m.group(3)
        a_major, a_minor = divmod(number, 10)
        if variant == "a":
            ok = (major, minor) == (a_major, a_minor)
        elif kind == "sm" or variant == "f":
            ok = major == a_major and minor >= a_minor
        else:
            ok = (major, minor) >= (a_major, a_minor)
        if ok:
            return True
    return False


def _gpus() -> list:
    try:
        return list(jax.devices("gpu"))
    except RuntimeError:
        return []


def _gpu_api(device) -> str:
    """'cuda' or 'rocm' (the platform version string of the device's client)."""
    version = str(getattr(getattr(device, "client", None), "platform_version", "")).lower()
    return "rocm" if "rocm" in version else "cuda"


def build_config() -> dict:
    """What the installed jax_deform carries and what it finds at run time:
    kernel platforms and dtypes, CUDA architectures and nvcc version of the
    build, the jax version, the default backend, and each visible GPU with its
    compute capability and whether the build's CUDA code loads on it."""
    from jax_deform import __version__

    archs = cuda_architectures()
    gpus = []
    for d in _gpus():
        cc = getattr(d, "compute_capability", None)
        cuda = "cuda" in KERNEL_PLATFORMS and _gpu_api(d) == "cuda"
        gpus.append({
            "device": str(d),
            "kind": getattr(d, "device_kind", ""),
            "compute_capability": cc,
            "kernels": bool(cuda and cc is not None and covers(archs, cc)),
        })
    return {
        "version": __version__,
        "extension": getattr(_extension, "__file__", None),
        "kernel_platforms": sorted(KERNEL_PLATFORMS),
        "kernel_dtypes": list(KERNEL_DTYPES) if KERNEL_PLATFORMS else [],
        "cuda_architectures": list(archs),
        "cuda_compiler_version": _build_info()["cuda_compiler_version"] or None,
        "jax_version": jax.__version__,
        "default_backend": jax.default_backend(),
        "gpus": gpus,
    }


def show_config(file=None) -> None:
    """Prints `build_config()`, one item a line."""
    cfg = build_config()
    out = file or sys.stdout
    none = "none"
    print(f"jax_deform {cfg['version']}", file=out)
    print(f"  extension:          {cfg['extension'] or 'not built (pure-jnp path only)'}",
          file=out)
    print(f"  kernel platforms:   {', '.join(cfg['kernel_platforms']) or none}", file=out)
    print(f"  kernel dtypes:      {', '.join(cfg['kernel_dtypes']) or none}", file=out)
    print(f"  CUDA architectures: {', '.join(cfg['cuda_architectures']) or none}", file=out)
    if cfg["cuda_compiler_version"]:
        print(f"  built with nvcc:    {cfg['cuda_compiler_version']} "
              "(static CUDA runtime; needs a driver that supports it)", file=out)
    print(f"  jax:                {cfg['jax_version']}, default backend "
          f"{cfg['default_backend']}", file=out)
    for g in cfg["gpus"]:
        print(f"  GPU {g['device']}: {g['kind']}, compute capability "
              f"{g['compute_capability']}, kernels: {'yes' if g['kernels'] else 'NO'}", file=out)


# ------------------------------------------------------------------ warning

_warned = False


def _default_backend() -> str:
    return jax.default_backend()


def _missing_kernel_message() -> str | None:
    """Why deform_conv2d would not run compiled kernels on the default GPU
    backend, or None when it does (or the default backend is not a GPU)."""
    if _default_backend() != "gpu":
        return None
    gpus = _gpus()
    device = gpus[0] if gpus else None
    if device is not None and _gpu_api(device) == "rocm":
        return ("jax_deform: JAX's default backend is a ROCm GPU, for which jax_deform has no "
                "kernels; deform_conv2d runs the pure-jnp path there (much slower than the "
                "CUDA kernels). implementation='xla' silences this warning.")
    if "cuda" not in KERNEL_PLATFORMS:
        built = ", ".join(sorted(KERNEL_PLATFORMS)) or "none (the extension is not built)"
        return (
            "jax_deform: JAX's default backend is a GPU, but the installed jax_deform has no "
            f"CUDA kernels (kernels for: {built}), so deform_conv2d runs the pure-jnp path "
            "there, typically 10-60x slower. Cause: it was built from source where no CUDA "
            "compiler (nvcc) was found, which quietly leaves the CUDA kernels out. Fix: install "
            "a jax_deform wheel (they carry the CUDA kernels), or rebuild with nvcc on PATH and "
            "JAX_DEFORM_CUDA=ON so that a missing compiler is an error: "
            "JAX_DEFORM_CUDA=ON pip install --force-reinstall --no-deps <jax-deform source>. "
            "jax_deform.show_config() shows what the build carries; implementation='xla' "
            "silences this warning."
        )
    cc = getattr(device, "compute_capability", None)
    archs = cuda_architectures()
    if cc is not None and archs and not covers(archs, cc):
        return (
            f"jax_deform: the GPU ({getattr(device, 'device_kind', device)}, compute capability "
            f"{cc}) is not covered by the CUDA architectures this jax_deform was built for "
            f"({', '.join(archs)}), so its kernels will fail to load ('no kernel image is "
            "available'). Fix: rebuild for this GPU, e.g. JAX_DEFORM_CUDA=ON "
            "JAX_DEFORM_CUDA_ARCHITECTURES=native pip install --force-reinstall --no-deps "
            "<jax-deform source>, or use implementation='xla'."
        )
    return None


def warn_once_if_gpu_lacks_kernels(stacklevel: int = 3) -> None:
    """Warns, on the first call only, when the default backend is a GPU that
    the installed build has no loadable kernels for. The default stacklevel
    points at the caller of deform_conv2d."""
    global _warned
    if _warned:
        return
    _warned = True
    try:
        message = _missing_kernel_message()
    except Exception:  # a probe failing must never break the op itself
        return
    if message is not None:
        warnings.warn(message, MissingKernelWarning, stacklevel=stacklevel)
