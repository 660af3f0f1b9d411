"""ltm_kernels: fused kernels for Latent Thought Models, with the eager reference of every op.

Naming: every op `<op>` (rms_norm, add_rms_norm, swiglu, self_attention, latent_attention, lm_head_nll,
posterior_step) has the functionals `<op>_ref` (eager PyTorch, `reference.py`), `<op>_triton` (Triton kernels)
and `<op>_cpp` (the compiled extension) where that implementation exists, plus `lm_head_nll_chunked` (the
chunked PyTorch LM head). The registered ops behind them are `torch.ops.ltm.<op>` / `<op>_backward` (C++),
`torch.ops.ltm_triton.<op>` / `<op>_backward` (Triton) and `torch.ops.ltm_torch.lm_head_nll_chunked` /
`..._backward`; each has a fake kernel (torch.compile) and, where differentiable, autograd.

Importing this package loads the compiled extension `ltm_kernels._C` (so `torch.ops.ltm.*` exist at once)
but needs neither it nor Triton: `extension_status()` says whether the extension loaded and, if not, why,
and `triton_status()` whether the Triton kernels can run here. The `*_cpp` functionals need the extension,
and `linear_onednn` a torch built with oneDNN.
"""

from ._extension import extension_status, has_op
from ._triton import triton_device_ok, triton_status
from .attention_cpp import latent_attention_cpp, self_attention_cpp
from .elementwise_cpp import add_rms_norm_cpp, rms_norm_cpp, swiglu_cpp
from .latent_attention import MAX_LATENTS, latent_attention_triton
from .linear_onednn import blas_outruns_onednn, linear_onednn, linear_onednn_status
from .lm_head_nll import lm_head_nll_chunked, lm_head_nll_triton
from .lm_head_nll_cpp import lm_head_nll_cpp
from .posterior_step_cpp import posterior_step_cpp
from .posterior_step_triton import posterior_step_triton
from .reference import (
    SCHEDULES,
    add_rms_norm_ref,
    kl_ref,
    latent_attention_ref,
    lm_head_nll_ref,
    posterior_step_ref,
    rms_norm_ref,
    scheduled_lr,
    self_attention_ref,
    swiglu_ref,
)
from .rms_norm import add_rms_norm_triton, rms_norm_triton
from .self_attention import self_attention_triton
from .swiglu import swiglu_triton

__all__ = [
    "add_rms_norm_cpp",
    "add_rms_norm_ref",
    "add_rms_norm_triton",
    "extension_status",
    "has_op",
    "kl_ref",
    "latent_attention_cpp",
    "latent_attention_ref",
    "latent_attention_triton",
    "blas_outruns_onednn",
    "linear_onednn",
    "linear_onednn_status",
    "lm_head_nll_chunked",
    "lm_head_nll_cpp",
    "lm_head_nll_ref",
    "lm_head_nll_triton",
    "MAX_LATENTS",
    "posterior_step_cpp",
    "posterior_step_ref",
    "posterior_step_triton",
    "rms_norm_cpp",
    "rms_norm_ref",
    "rms_norm_triton",
    "scheduled_lr",
    "SCHEDULES",
    "self_attention_cpp",
    "self_attention_ref",
    "self_attention_triton",
    "swiglu_cpp",
    "swiglu_ref",
    "swiglu_triton",
    "triton_device_ok",
    "triton_status",
]

# Loaded here, not on first use: `torch.ops.ltm.*` then exist right after `import ltm_kernels`. A missing or
# broken build is recorded for extension_status(), never raised.
extension_status()
