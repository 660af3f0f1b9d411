"""ltm_kernels: fused kernels for Latent Thought Models, with the eager reference of every op.

Importing this package needs neither the compiled extension `ltm_kernels._C` nor Triton;
`extension_status()` says whether the extension loaded and, if not, why.
"""

from ._extension import extension_status, has_op
from .posterior_step import posterior_step
from .reference import kl_ref, posterior_step_ref

__all__ = ["extension_status", "has_op", "kl_ref", "posterior_step", "posterior_step_ref"]
