"""Eager PyTorch references of every op in ltm_kernels: the one definition of the math that tests,
benchmarks and the CPU fallback share. Plain tensor ops, no fusion, readable first."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_ref(mu: Tensor, logvar: Tensor) -> Tensor:
    """Elementwise KL(N(mu, exp(logvar)) || N(0, 1)); sum it over latent dimensions for the KL of q."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


SCHEDULES = ("cosine", "linear", "constant")  # posterior_step's `schedule`: an index into this, or the name


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_posterior_step_args(lr, total_steps, schedule, beta1, beta2, eps, weight_decay) -> int:
    """Validate posterior_step's scalar arguments, naming the bad one and its range (every implementation's
    wrapper calls this before touching a tensor); returns the schedule as its index into SCHEDULES, which
    may be given by name ("cosine") or index (0)."""
    if isinstance(schedule, str) and schedule in SCHEDULES:
        schedule = SCHEDULES.index(schedule)
    elif isinstance(schedule, bool) or not isinstance(schedule, numbers.Integral) or schedule not in range(3):
        raise ValueError(f"posterior_step: schedule must be one of {SCHEDULES} or its index 0, 1, 2; got {schedule!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
        raise ValueError(
            f"posterior_step: total_steps must be an int >= 1 (the number of updates the schedule "
            f"spans), got {total_steps!r}"
        )
    ranges = (
        ("lr", lr, "a finite number >= 0", lambda x: x >= 0),
        ("beta1", beta1, "a finite number in [0, 1)", lambda x: 0 <= x < 1),
        ("beta2", beta2, "a finite number in [0, 1)", lambda x: 0 <= x < 1),
        ("eps", eps, "a finite number > 0", lambda x: x > 0),
        ("weight_decay", weight_decay, "a finite number >= 0", lambda x: x >= 0),
    )
    for name, value, allowed, ok in ranges:
        if not (_is_real(value) and math.isfinite(value) and ok(value)):
            raise ValueError(f"posterior_step: {name} must be {allowed}, got {value!r}")
    return int(schedule)


def scheduled_lr(step, total: int, lr: float, schedule: str):
    """Learning rate of update `step` (0-based) of `total`, lr_min = lr / 10:
        cosine   lr_min + 0.5 * (1 + cos(pi t / T)) * (lr - lr_min)      (published default)
        linear   lr - (lr - lr_min) * t / T
        constant lr
    `step` is a number, or a float64 tensor (then so is the result, on its device: no host read)."""
    lr_min = lr / 10
    if schedule == "cosine":
        cos = torch.cos if isinstance(step, Tensor) else math.cos
        return lr_min + 0.5 * (1 + cos(math.pi * step / total)) * (lr - lr_min)
    if schedule == "linear":
        return lr - (lr - lr_min) * step / total
    if schedule == "constant":
        return lr + 0 * step  # a tensor step gives a tensor, like the other schedules
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def _adamw_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    lr: Tensor,
    step: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    # torch.optim.AdamW's single-tensor path, op for op, except that lr and the 1-based step are 0-d float64
    # tensors (on CPU they act as Python scalars do; on CUDA, half-precision tensors see them rounded to their
    # dtype) and addcdiv_, which takes no tensor `value`, is written out in its own order, value * t1 / t2.
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2.sqrt()).add_(eps)
    param.add_(-step_size * exp_avg / denom)


@torch.no_grad()
def posterior_step_ref(
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
    """One AdamW step on (mu, logvar) of the loss CE(z) + sum KL(mu, logvar), then the next sample z.

    grad_z is dCE/dz at the current sample z = mu + noise * exp(logvar / 2). `step` is a one-element int64
    tensor holding the number of updates done so far, t: this is update t + 1 (AdamW's 1-based step) at
    `scheduled_lr(t, total_steps, lr, SCHEDULES[schedule])`, and `step` is incremented. Updates mu, logvar, the
    four moments, z and step in place. Only tensor ops, no host read: a CUDA graph can capture it. The
    scalars are checked as the fused ops check them (`check_posterior_step_args`).
    """
    schedule = check_posterior_step_args(lr, total_steps, schedule, beta1, beta2, eps, weight_decay)
    t = step.reshape(()).to(torch.float64)
    lr_t = scheduled_lr(t, total_steps, lr, SCHEDULES[schedule])
    sigma = torch.exp(0.5 * logvar)
    g_mu = grad_z + mu  # dz/dmu = 1; dKL/dmu = mu
    g_lv = 0.5 * grad_z * noise * sigma + 0.5 * (torch.exp(logvar) - 1)  # dz/dlogvar = noise*sigma/2
    _adamw_(mu, g_mu, exp_avg_mu, exp_avg_sq_mu, lr_t, t + 1, beta1, beta2, eps, weight_decay)
    _adamw_(logvar, g_lv, exp_avg_logvar, exp_avg_sq_logvar, lr_t, t + 1, beta1, beta2, eps, weight_decay)
    z.copy_(mu + noise * torch.exp(0.5 * logvar))
    step.add_(1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, otherwise the tensor's own (fp64 tests stay in fp64)."""
    return torch.promote_types(dtype, torch.float32)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Published RMSNorm: statistics in fp32, normalised x cast back to x's dtype, then scaled."""
    xf = x.to(_compute_dtype(x.dtype))
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm_ref(x + residual), x + residual): the residual add and the pre-norm that follows it."""
    h = x + residual
    return rms_norm_ref(h, weight, eps), h


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """RoPE tables cos, sin of shape (len(positions), head_dim // 2); pair i turns at theta^(-2i / head_dim)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=dtype, device=positions.device) / head_dim)
    angles = positions.to(dtype)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[..., 2i], x[..., 2i+1]) of x (..., L, hd) by the angles in cos/sin (L, hd/2)."""
    xf = x.to(torch.promote_types(x.dtype, cos.dtype)).unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def sliding_window_mask(n_tokens: int, window: int, device=None) -> torch.Tensor:
    """(N, N) boolean mask, True where query i may attend key j: i - window < j <= i."""
    i = torch.arange(n_tokens, device=device)[:, None]
    j = torch.arange(n_tokens, device=device)[None, :]
    return (j <= i) & (j > i - window)


def self_attention_ref(q, k, v, cos, sin, window: int) -> torch.Tensor:
    """Causal sliding-window attention with RoPE on q and k; q, k, v: (B, H, N, hd). Query i sees keys
    i - window < j <= i, so window >= 1 (a query always sees itself), as the fused ops require."""
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise ValueError(f"window must be an int >= 1 (query i sees keys i - window < j <= i), got {window!r}")
    mask = sliding_window_mask(q.shape[-2], window, q.device)
    return F.scaled_dot_product_attention(apply_rope_ref(q, cos, sin), apply_rope_ref(k, cos, sin), v, attn_mask=mask)


def latent_attention_ref(q, k, v, cos_q, sin_q, cos_k, sin_k) -> torch.Tensor:
    """Tokens attend to all M latents of their layer; q: (B, H, N, hd), k, v: (B, H, M, hd); RoPE on q and k."""
    return F.scaled_dot_product_attention(apply_rope_ref(q, cos_q, sin_q), apply_rope_ref(k, cos_k, sin_k), v)


def lm_head_nll_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sequence summed cross-entropy (B,) of logits = hidden @ weight.T; targets == -1 ignored."""
    logits = F.linear(hidden, weight)
    logits = logits.to(_compute_dtype(logits.dtype))
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
    return nll.view(targets.shape).sum(-1)
