"""posterior_step_triton: the same op as `ltm_kernels.posterior_step_cpp` (math in posterior_step_cpp.py, eager
reference `reference.posterior_step_ref`), registered as `torch.ops.ltm_triton.posterior_step` (the schema of
ltm::posterior_step, mutations declared), one kernel per step, for CUDA tensors (or CPU tensors under
TRITON_INTERPRET=1) in fp32 / bf16 / fp16, computing in fp32.

Bytes: reads 8 and writes 7 tensors of (B, n_z, d) once, 60 bytes per element in fp32; the eager reference
makes ~30 passes. The step counter and the scheduled learning rate live on the device, as in the C++ op:
each program takes a ticket on the counter (an atomic add of 2^32: high 32 bits tickets, low 32 the count
t) and the program that draws the last ticket, which knows every program has read t, stores t + 1. So every
launch of a T-step loop is identical and a CUDA graph can replay all of them (csrc/cuda/posterior_step.cu
explains the same scheme).

Precision of the scalars: lr, the betas, eps and weight decay are passed as fp64 (annotated; Triton would
pass Python floats as fp32), and the schedule and AdamW's bias corrections are computed in fp64 once per
program, then rounded to fp32, as the C++ kernels do (1 - beta2^t at t = 1 is 1e-3: in fp32 it would lose
four digits). beta^t is exp(t log beta) in fp64 (no pow in tl.math), within ~1e-15 of pow.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._triton import TRITON_AVAILABLE, check_triton_tensor, tl, triton
from .reference import check_posterior_step_args

_NAMES = ("mu", "logvar", "exp_avg_mu", "exp_avg_sq_mu", "exp_avg_logvar", "exp_avg_sq_logvar", "z", "grad_z", "noise")
_BLOCK = 1024

if TRITON_AVAILABLE:

    @triton.jit
    def _posterior_step_kernel(
        mu_ptr,
        lv_ptr,
        m_mu_ptr,
        v_mu_ptr,
        m_lv_ptr,
        v_lv_ptr,
        z_ptr,
        g_ptr,
        e_ptr,
        step_ptr,
        n,
        total_steps,
        lr: tl.float64,
        beta1: tl.float64,
        beta2: tl.float64,
        eps: tl.float64,
        weight_decay: tl.float64,
        SCHEDULE: tl.constexpr,
        LERP_FROM_M: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # The step counter: read with a ticket; the last program to read publishes t + 1 (tickets cleared).
        old = tl.atomic_add(step_ptr, 4294967296)  # 2^32
        t = old & 4294967295
        tl.store(step_ptr, t + 1, mask=(old >> 32) == tl.num_programs(0) - 1)

        # This update's scalars, in fp64 (the operation order of reference.scheduled_lr), then fp32. Under the
        # interpreter the float arguments arrive as Python floats, which Triton would turn into fp32 constants
        # in tl.log / tl.cast; adding them to an fp64 zero keeps them fp64 on both paths.
        td = t.to(tl.float64)
        zero = td * 0
        lr = zero + lr
        beta1 = zero + beta1
        beta2 = zero + beta2
        lr_min = lr / 10
        if SCHEDULE == 0:
            lr_t = lr_min + 0.5 * (1 + tl.cos(3.141592653589793 * td / total_steps)) * (lr - lr_min)
        elif SCHEDULE == 1:
            lr_t = lr - (lr - lr_min) * td / total_steps
        else:
            lr_t = lr
        k = td + 1  # AdamW's 1-based step
        decay = (1 - lr_t * weight_decay).to(tl.float32)
        lerp_w = (1 - beta1).to(tl.float32)
        one_minus_beta2 = (1 - beta2).to(tl.float32)
        neg_step_size = (-(lr_t / (1 - tl.exp(k * tl.log(beta1))))).to(tl.float32)
        bias_correction2_sqrt = tl.sqrt(1 - tl.exp(k * tl.log(beta2))).to(tl.float32)
        beta2_f = beta2.to(tl.float32)
        eps_f = (zero + eps).to(tl.float32)

        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        # All loads first (an input may be the very memory of an output: each element is read, then written).
        mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        lv = tl.load(lv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m_mu = tl.load(m_mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v_mu = tl.load(v_mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m_lv = tl.load(m_lv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v_lv = tl.load(v_lv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # Gradients at the old (mu, logvar): CE through z = mu + e * sigma, plus the analytic KL.
        sigma = tl.exp(0.5 * lv)
        g_mu = g + mu
        g_lv = 0.5 * g * e * sigma + 0.5 * (sigma * sigma - 1)
        mu, m_mu, v_mu = _adamw(
            mu,
            g_mu,
            m_mu,
            v_mu,
            decay,
            lerp_w,
            beta2_f,
            one_minus_beta2,
            neg_step_size,
            bias_correction2_sqrt,
            eps_f,
            LERP_FROM_M,
        )
        lv, m_lv, v_lv = _adamw(
            lv,
            g_lv,
            m_lv,
            v_lv,
            decay,
            lerp_w,
            beta2_f,
            one_minus_beta2,
            neg_step_size,
            bias_correction2_sqrt,
            eps_f,
            LERP_FROM_M,
        )
        mu = mu.to(mu_ptr.dtype.element_ty)
        lv = lv.to(lv_ptr.dtype.element_ty)
        tl.store(mu_ptr + offs, mu, mask=mask)
        tl.store(lv_ptr + offs, lv, mask=mask)
        tl.store(m_mu_ptr + offs, m_mu.to(m_mu_ptr.dtype.element_ty), mask=mask)
        tl.store(v_mu_ptr + offs, v_mu.to(v_mu_ptr.dtype.element_ty), mask=mask)
        tl.store(m_lv_ptr + offs, m_lv.to(m_lv_ptr.dtype.element_ty), mask=mask)
        tl.store(v_lv_ptr + offs, v_lv.to(v_lv_ptr.dtype.element_ty), mask=mask)
        # From the stored (rounded) parameters, so z is exactly the sample of what the caller holds.
        z = mu.to(tl.float32) + e * tl.exp(0.5 * lv.to(tl.float32))
        tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _adamw(
        p,
        grad,
        m,
        v,
        decay,
        lerp_w,
        beta2,
        one_minus_beta2,
        neg_step_size,
        bias_correction2_sqrt,
        eps,
        LERP_FROM_M: tl.constexpr,
    ):
        """One AdamW update in torch.optim.AdamW's op order (csrc/posterior_step.h adamw_update), fp32."""
        p = p * decay
        if LERP_FROM_M:  # torch.lerp's two formulas, picked by weight < 0.5
            m = m + lerp_w * (grad - m)
        else:
            m = grad - (grad - m) * (1 - lerp_w)
        v = v * beta2 + one_minus_beta2 * grad * grad
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
        return p + tl.div_rn(neg_step_size * m, denom), m, v


# ------------------------------------------------------------------------------------------ registration
# ltm_triton::posterior_step: the schema of ltm::posterior_step (csrc/ltm_ops.cpp), mutations declared; no
# autograd (an optimizer step, run under no_grad). Inputs as `posterior_step_triton` checks them.
@torch.library.custom_op(
    "ltm_triton::posterior_step",
    mutates_args=("mu", "logvar", "exp_avg_mu", "exp_avg_sq_mu", "exp_avg_logvar", "exp_avg_sq_logvar", "z", "step"),
)
def _posterior_step_op(
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
    schedule: int,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    n = mu.numel()
    lerp_from_m = bool(np.float32(1 - beta1) < 0.5)  # as the kernel rounds it
    grid = (max(triton.cdiv(n, _BLOCK), 1),)  # at least one program: the counter must advance
    _posterior_step_kernel[grid](
        mu,
        logvar,
        exp_avg_mu,
        exp_avg_sq_mu,
        exp_avg_logvar,
        exp_avg_sq_logvar,
        z,
        grad_z.contiguous(),
        noise.contiguous(),
        step,
        n,
        total_steps,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        SCHEDULE=schedule,
        LERP_FROM_M=lerp_from_m,
        BLOCK=_BLOCK,
        num_warps=4,
    )


@torch.library.register_fake("ltm_triton::posterior_step")
def _(
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
):
    return None  # mutates its inputs in place and returns nothing: no output metadata to describe


# ------------------------------------------------------------------------------------------- functional
def posterior_step_triton(
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
    """`posterior_step_ref` as one Triton kernel; same arguments, same in-place updates (step incremented).

    The nine latent tensors: one shape, dtype (fp32 / bf16 / fp16) and device; the seven updated ones
    contiguous. `step`: one-element int64 tensor on their device. `schedule`: a name in `reference.SCHEDULES`
    or its index; the scalars are checked by `reference.check_posterior_step_args` (ValueError naming the
    argument and its range). No host synchronisation: graph-capturable.
    """
    tensors = (mu, logvar, exp_avg_mu, exp_avg_sq_mu, exp_avg_logvar, exp_avg_sq_logvar, z, grad_z, noise)
    for name, t in zip(_NAMES, tensors):
        check_triton_tensor(t, name)
        if t.shape != mu.shape or t.dtype != mu.dtype or t.device != mu.device:
            raise ValueError(
                f"posterior_step: {name} must match mu (shape {tuple(mu.shape)}, {mu.dtype}, "
                f"{mu.device}), got shape {tuple(t.shape)}, {t.dtype}, {t.device}"
            )
    for name, t in zip(_NAMES[:7], tensors[:7]):
        if not t.is_contiguous():
            raise ValueError(f"posterior_step: {name} must be contiguous")
    if not (isinstance(step, Tensor) and step.dtype == torch.int64 and step.numel() == 1 and step.device == mu.device):
        raise ValueError(
            f"posterior_step: step must be a one-element int64 tensor on {mu.device} (the number of "
            f"updates done), got {step!r}"
        )
    schedule = check_posterior_step_args(lr, total_steps, schedule, beta1, beta2, eps, weight_decay)
    torch.ops.ltm_triton.posterior_step(
        *tensors,
        step,
        float(lr),
        int(total_steps),
        schedule,
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
    )
