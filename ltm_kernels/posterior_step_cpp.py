"""posterior_step_cpp: one fused step of posterior inference, the innermost update of the LTM inner loop.

Given grad_z = dCE/dz at the current sample z = mu + noise * sigma, sigma = exp(logvar / 2), and the loss
CE + sum KL with KL = -0.5 * (1 + logvar - mu^2 - exp(logvar)):

    g_mu     = grad_z + mu
    g_logvar = 0.5 * grad_z * noise * sigma + 0.5 * (exp(logvar) - 1)
    lr_t         = scheduled_lr(t, total_steps, lr, schedule)     # t = step[0], the updates done so far
    (mu, logvar) <- AdamW((mu, logvar), (g_mu, g_logvar), lr_t)   # exactly torch.optim.AdamW, 1-based t + 1
    z            <- mu + noise * exp(logvar / 2)                  # the sample for the next step
    step         <- t + 1

Why fuse: eager PyTorch runs ~30 elementwise kernels here, each a full pass over (B, n_z, d); the fused
op reads 8 and writes 7 tensors once. The eager math is `reference.posterior_step_ref`.

The step counter is a device tensor, and the learning rate is computed from it inside the kernel: a CUDA
graph freezes scalar arguments at capture, so with host `lr, step` scalars every step of the inner loop
would be a different launch and the T-step loop could not be one graph. (We changed the one op rather than
adding a second, scheduled one: the scheduled op does everything the old one did, the constant schedule
giving a fixed lr, and two ops would be two kernels per device to keep in step.)

The op `torch.ops.ltm.posterior_step` (schema in csrc/ltm_ops.cpp, CPU kernel in csrc/posterior_step.cpp,
CUDA kernel in csrc/cuda/posterior_step.cu) mutates mu, logvar, the four moments, z and step and returns
nothing; it has no autograd (an optimizer step, run under no_grad). A Triton kernel of the same op is
`ltm_kernels.posterior_step_triton` (`torch.ops.ltm_triton.posterior_step`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._extension import has_op, on_load, require_extension
from .reference import check_posterior_step_args


def _posterior_step_fake(
    mu,
    logvar,
    exp_avg_mu,
    exp_avg_sq_mu,
    exp_avg_logvar,
    exp_avg_sq_logvar,
    z,
    grad_z,
    noise,
    step,
    lr,
    total_steps,
    schedule,
    beta1,
    beta2,
    eps,
    weight_decay,
) -> None:
    # Mutates its inputs in place and returns nothing: no output metadata to describe.
    return None


@on_load
def _register_fake() -> None:
    # register_fake also installs a Meta kernel: its presence means we (or a reload of us) already did.
    if not has_op("posterior_step", "meta"):
        torch.library.register_fake("ltm::posterior_step")(_posterior_step_fake)


def posterior_step_cpp(
    mu: Tensor,
    logvar: Tensor,
    exp_avg_mu: Tensor,
    exp_avg_sq_mu: Tensor,
    exp_avg_logvar: Tensor,
    exp_avg_sq_logvar: Tensor,
    z: Tensor,
    grad_z: Tensor,
    noise: Tensor,
    step: Tensor,
    lr: float,
    total_steps: int,
    schedule: int = 0,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> None:
    """Fused `posterior_step_ref` through the compiled extension; same arguments, same in-place updates.

    The nine latent tensors share shape, dtype and device (float32/float64/bfloat16/float16); the seven
    updated ones must be contiguous. `step`: int64, one element, on their device. `schedule`: a name in
    `reference.SCHEDULES` or its index. Raises RuntimeError if the extension is not available, ValueError
    naming the argument and its range for a bad scalar (`reference.check_posterior_step_args`), and
    RuntimeError from the op for bad tensors.
    """
    require_extension("posterior_step_cpp")
    schedule = check_posterior_step_args(lr, total_steps, schedule, beta1, beta2, eps, weight_decay)
    torch.ops.ltm.posterior_step(
        mu,
        logvar,
        exp_avg_mu,
        exp_avg_sq_mu,
        exp_avg_logvar,
        exp_avg_sq_logvar,
        z,
        grad_z,
        noise,
        step,
        float(lr),
        int(total_steps),
        schedule,
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
    )
