"""The one dispatch point: which implementation runs each hot op of the model.

Backends (DESIGN section 4):
- ``eager``  plain PyTorch (`ltm_kernels.reference`): the readable reference and the fallback everywhere.
- ``cpp``    the compiled extension `ltm_kernels._C` for the ops it implements on the model's device;
             the remaining ops run eagerly. Asking for it without a built extension is an error.
- ``triton`` fused Triton kernels on CUDA (or on CPU under TRITON_INTERPRET=1).
- ``auto``   the fastest implementation available for each op on the model's device.

`ltm/` reaches the kernels only through this module; the kernels know nothing of the model.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

import ltm_kernels
from ltm_kernels import reference

BACKENDS = ("auto", "eager", "cpp", "triton")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why."""


@dataclass(frozen=True)
class Ops:
    """The implementations one model uses. `impl` maps op name -> backend that provides it (for reports)."""

    rms_norm: Callable
    swiglu: Callable
    self_attention: Callable
    latent_attention: Callable
    lm_head_nll: Callable
    posterior_step: Callable
    impl: tuple


_EAGER = dict(
    rms_norm=reference.rms_norm_ref,
    swiglu=reference.swiglu_ref,
    self_attention=reference.self_attention_ref,
    latent_attention=reference.latent_attention_ref,
    lm_head_nll=reference.lm_head_nll_ref,
    posterior_step=reference.posterior_step_ref,
)

# Ops the C++ extension implements, by name (schema `ltm::<name>`); the functional wrappers live in ltm_kernels.
_CPP = dict(posterior_step=ltm_kernels.posterior_step)


def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as err:  # a broken triton install must not break `import ltm`
        return False, f"triton is not installed or failed to import ({err})"
    return False, "no Triton kernels are implemented yet (attention / LM-head / posterior-step issues)"


def backend_status() -> dict[str, tuple[bool, str]]:
    """{backend: (available, reason)} for this machine, for reports and error messages."""
    ext_ok, ext_reason = ltm_kernels.extension_status()
    return {
        "eager": (True, "plain PyTorch"),
        "cpp": (ext_ok, ext_reason),
        "triton": _triton_status(),
        "auto": (True, "cpp where built for the device, else eager"),
    }


def check_backend(name: str) -> str:
    """Validate a backend name for LTMDecoder(backend=...); raise saying why it cannot run here."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    ok, reason = backend_status()[name]
    if not ok:
        raise BackendUnavailableError(f"{name} backend is not available: {reason}")
    return name


@functools.lru_cache(maxsize=None)
def select_ops(backend: str, device: torch.device) -> Ops:
    """The implementation of every op for `backend` on `device` (device type decides: cpu / cuda / ...)."""
    check_backend(backend)
    chosen = dict(_EAGER)
    impl = {name: "eager" for name in _EAGER}
    if backend in ("cpp", "auto"):
        for name, fn in _CPP.items():
            if ltm_kernels.has_op(name, device.type):
                chosen[name], impl[name] = fn, "cpp"
            elif backend == "cpp":
                raise BackendUnavailableError(
                    f"cpp backend: the extension has no {device.type} kernel for ltm::{name} "
                    f"(CUDA kernels are built only when torch has CUDA and nvcc is present)")
    return Ops(**chosen, impl=tuple(sorted(impl.items())))
