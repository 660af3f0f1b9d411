"""ltm_kernels: fused kernels for Latent Thought Models, with the eager reference of every op.

Importing this package needs neither the compiled extension `ltm_kernels._C` nor Triton;
`extension_status()` says whether the extension loaded and, if not, why, and `triton_status()` whether
the Triton kernels (`self_attention`, `latent_attention`, `linear_cross_entropy`, `rms_norm`, `add_rms_norm`,
`swiglu`, `posterior_step_triton`) can run here. The C++ ops (`posterior_step`, `self_attention_cpp`,
`latent_attention_cpp`, `lm_head_nll_cpp`, `rms_norm_cpp`, `add_rms_norm_cpp`,
`swiglu_cpp`) need the extension.
"""

from ._extension import extension_status, has_op
from ._triton import triton_device_ok, triton_status
from .attention_cpp import latent_attention_cpp, self_attention_cpp
from .latent_attention import MAX_LATENTS, latent_attention
from .elementwise_cpp import add_rms_norm_cpp, rms_norm_cpp, swiglu_cpp
from .lm_head_nll_cpp import lm_head_nll_cpp
from .linear_onednn import linear_onednn, linear_onednn_status
from .linear_cross_entropy import chunked_linear_cross_entropy, linear_cross_entropy
from .posterior_step import posterior_step
from .posterior_step_triton import posterior_step_triton
from .reference import SCHEDULES, kl_ref, posterior_step_ref, scheduled_lr
from .rms_norm import add_rms_norm, rms_norm
from .self_attention import self_attention
from .swiglu import swiglu

__all__ = ["add_rms_norm", "add_rms_norm_cpp", "chunked_linear_cross_entropy", "extension_status", "has_op", "kl_ref",
           "latent_attention", "latent_attention_cpp", "linear_cross_entropy", "linear_onednn", "linear_onednn_status", "lm_head_nll_cpp", "MAX_LATENTS", "posterior_step",
           "posterior_step_ref", "posterior_step_triton", "rms_norm", "rms_norm_cpp", "scheduled_lr", "SCHEDULES",
           "self_attention", "self_attention_cpp", "swiglu", "swiglu_cpp",
           "triton_device_ok", "triton_status"]
