"""The one dispatch point: which implementation runs each hot op of the model.

Backends (docs/backends.md):
- ``eager``  plain PyTorch (`ltm_kernels.reference`): the readable reference and the fallback everywhere.
- ``cpp``    the compiled extension `ltm_kernels._C` for the ops it implements on the model's device
             (CPU: every op: posterior step, blocked sliding-window self-attention, latent cross-attention,
             the LM head with its cross-entropy, RMSNorm, residual add + RMSNorm, SwiGLU; CUDA:
             posterior step where built with nvcc); the remaining ops run eagerly, as `Ops.impl` records.
             On CPU its linear layers run through oneDNN (`ltm_kernels.linear_onednn`, impl "onednn").
             Asking for it without a built extension, or on a device it has no kernel for, is an error.
- ``triton`` fused Triton kernels (`rms_norm`, `add_rms_norm`, `swiglu`, `self_attention`, `latent_attention`,
             `lm_head_nll`, `posterior_step`) on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (slow, fp32:
             for tests).
- ``auto``   the fastest implementation available for each op on the model's device: Triton kernels on
             CUDA (half and fp32 tensors), the extension where built (and oneDNN linears on CPU, except
             float32 ones where the linked BLAS is faster: MKL on Intel, impl "blas+onednn"), else eager.
             Never the interpreter.

The eager LM head (`lm_head_nll` of eager, and of cpp / auto where the extension has no kernel) is the
chunked PyTorch loss `ltm_kernels.lm_head_nll_chunked`, so no backend materialises (B*N, V) logits;
`reference.lm_head_nll_ref` remains the readable definition the tests compare against.

`ltm/` reaches the kernels only through this module; the kernels know nothing of the model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

import ltm_kernels
from ltm_kernels import reference

# Pure helpers of the kernels' math that the model and the inner loop use: re-exported, so that ltm/ reaches
# ltm_kernels through this module only.
from ltm_kernels.reference import SCHEDULES, kl_ref, rope_tables, scheduled_lr  # noqa: F401

BACKENDS = ("auto", "eager", "cpp", "triton")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why."""


@dataclass(frozen=True)
class Ops:
    """The implementations one model uses. `impl` maps op name -> backend that provides it (for reports)."""

    linear: Callable
    rms_norm: Callable
    add_rms_norm: Callable
    swiglu: Callable
    self_attention: Callable
    latent_attention: Callable
    lm_head_nll: Callable
    posterior_step: Callable
    impl: tuple


_EAGER = dict(
    linear=torch.nn.functional.linear,
    rms_norm=reference.rms_norm_ref,
    add_rms_norm=reference.add_rms_norm_ref,
    swiglu=reference.swiglu_ref,
    self_attention=reference.self_attention_ref,
    latent_attention=reference.latent_attention_ref,
    lm_head_nll=ltm_kernels.lm_head_nll_chunked,
    posterior_step=reference.posterior_step_ref,
)

# Ops the C++ extension implements, by name (schema `ltm::<name>`, except add_rms_norm: `ltm::rms_norm` with a
# residual); the functional wrappers live in ltm_kernels.
_CPP = dict(
    posterior_step=ltm_kernels.posterior_step_cpp,
    self_attention=ltm_kernels.self_attention_cpp,
    latent_attention=ltm_kernels.latent_attention_cpp,
    lm_head_nll=ltm_kernels.lm_head_nll_cpp,
    rms_norm=ltm_kernels.rms_norm_cpp,
    add_rms_norm=ltm_kernels.add_rms_norm_cpp,
    swiglu=ltm_kernels.swiglu_cpp,
)

_CPP_SCHEMA = {"add_rms_norm": "rms_norm"}


# The CPU GEMM of the linear layers under cpp / auto (a library choice, not an extension kernel): oneDNN for
# these dtypes, F.linear (the linked BLAS) for the rest. `auto` leaves float32 to the BLAS where it is the faster.
def _linear_onednn_else_eager(onednn_dtypes: tuple) -> Callable:
    def linear(x, weight):
        if x.dtype in onednn_dtypes and weight.dtype == x.dtype:
            return ltm_kernels.linear_onednn(x, weight)
        return torch.nn.functional.linear(x, weight)

    return linear


_LINEAR_ONEDNN = _linear_onednn_else_eager((torch.float32, torch.bfloat16))  # impl "onednn"
_LINEAR_ONEDNN_BF16 = _linear_onednn_else_eager((torch.bfloat16,))  # impl "blas+onednn"


# Ops with a Triton kernel; the first argument's dtype decides whether `auto` may use it.
_TRITON = dict(
    rms_norm=ltm_kernels.rms_norm_triton,
    add_rms_norm=ltm_kernels.add_rms_norm_triton,
    swiglu=ltm_kernels.swiglu_triton,
    self_attention=ltm_kernels.self_attention_triton,
    latent_attention=ltm_kernels.latent_attention_triton,
    lm_head_nll=ltm_kernels.lm_head_nll_triton,
)
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_takes(name: str, x: torch.Tensor, args) -> bool:
    if name == "latent_attention" and args[0].shape[-2] > ltm_kernels.MAX_LATENTS:
        return False  # keys held on chip: more than the kernel's limit run eagerly under `auto`
    return x.dtype in _TRITON_DTYPES


def _triton_else_eager(name: str) -> Callable:
    """For `auto`: the Triton kernel for the inputs it takes, eager otherwise (an fp64 model on CUDA)."""
    fast, eager = _TRITON[name], _EAGER[name]

    def op(x, *args):
        return (fast if _triton_takes(name, x, args) else eager)(x, *args)

    op.__name__ = op.__qualname__ = f"{name}_triton_else_eager"
    return op


def decode_attention(ops: Ops, n_keys: int) -> Callable:
    """The unmasked attention of one decoded token over `n_keys` cached keys (KV-cache generation): the
    model's `latent_attention` op where it takes that many keys, the eager one otherwise."""
    if n_keys > ltm_kernels.MAX_LATENTS and dict(ops.impl)["latent_attention"] == "triton":
        return _EAGER["latent_attention"]
    return ops.latent_attention


def _posterior_step_triton_else_eager(mu, *args):
    """For `auto` on CUDA without the C++ CUDA kernel: Triton for fp32/bf16/fp16 latents, eager for fp64."""
    fast = ltm_kernels.posterior_step_triton if mu.dtype in _TRITON_DTYPES else reference.posterior_step_ref
    return fast(mu, *args)


def backend_status() -> dict[str, tuple[bool, str]]:
    """{backend: (available, reason)} for this machine, for reports and error messages."""
    ext_ok, ext_reason = ltm_kernels.extension_status()
    return {
        "eager": (True, "plain PyTorch"),
        "cpp": (ext_ok, ext_reason),
        "triton": ltm_kernels.triton_status(),
        "auto": (True, "triton on CUDA where installed, cpp where built for the device, else eager"),
    }


def check_backend(name: str) -> str:
    """Validate a backend name for LTMDecoder(backend=...); raise saying why it cannot run here."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    ok, reason = backend_status()[name]
    if not ok:
        raise BackendUnavailableError(f"{name} backend is not available: {reason}")
    return name


@functools.cache
def select_ops(backend: str, device: torch.device) -> Ops:
    """The implementation of every op for `backend` on `device` (device type decides: cpu / cuda / ...)."""
    check_backend(backend)
    chosen = dict(_EAGER)
    impl = {name: "eager" for name in _EAGER}
    if backend in ("cpp", "auto"):
        for name, fn in _CPP.items():
            if ltm_kernels.has_op(_CPP_SCHEMA.get(name, name), device.type):
                chosen[name], impl[name] = fn, "cpp"
        if device.type == "cpu" and ltm_kernels.linear_onednn_status()[0]:
            if backend == "auto" and ltm_kernels.blas_outruns_onednn():
                chosen["linear"], impl["linear"] = _LINEAR_ONEDNN_BF16, "blas+onednn"
            else:
                chosen["linear"], impl["linear"] = _LINEAR_ONEDNN, "onednn"
        if backend == "cpp" and "cpp" not in impl.values():
            missing = ", ".join(f"ltm::{name}" for name in _CPP)
            raise BackendUnavailableError(
                f"cpp backend: the extension has no {device.type} kernel for {missing} "
                f"(CUDA kernels are built only when torch has CUDA and nvcc is present)"
            )
    if backend == "triton" or (backend == "auto" and device.type == "cuda"):
        if ltm_kernels.triton_device_ok(device):
            for name, fn in _TRITON.items():
                chosen[name] = fn if backend == "triton" else _triton_else_eager(name)
                impl[name] = "triton"
        elif backend == "triton":
            raise BackendUnavailableError(
                f"triton backend: its kernels run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 "
                f"is set before ltm is imported; not on {device.type} here"
            )
    # posterior_step: Triton under `triton`; under `auto` the C++ kernel where built (CPU; CUDA when compiled
    # with nvcc), else Triton on CUDA, else eager.
    if ltm_kernels.triton_device_ok(device) and (
        backend == "triton" or (backend == "auto" and device.type == "cuda" and impl["posterior_step"] != "cpp")
    ):
        chosen["posterior_step"] = (
            ltm_kernels.posterior_step_triton if backend == "triton" else _posterior_step_triton_else_eager
        )
        impl["posterior_step"] = "triton"
    return Ops(**chosen, impl=tuple(sorted(impl.items())))
