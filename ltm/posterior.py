"""Posterior inference: the fast inner loop of DESIGN section 2.

Per sequence, q(z | x) = N(mu, diag exp(logvar)) is fitted by T AdamW steps on
    loss = sum_tokens CE(x | z) + sum_dims KL(q || N(0, I)),   z = mu + noise * exp(logvar / 2),
with the noise drawn once and held fixed, and the decoder frozen: gradients flow to (mu, logvar) only,
and decoder weight gradients are never computed (`torch.autograd.grad` with respect to z alone).

The step itself (KL gradient, chain rule from dL/dz to (mu, logvar), AdamW, next z) is the backend op
`posterior_step`: eager PyTorch or the fused C++ kernel, chosen by `ltm.backends`.

Schedules (lr_t for step t = 0..T-1, lr_min = lr / 10):
    cosine   lr_min + 0.5 * (1 + cos(pi t / T)) * (lr - lr_min)      (published default, lr = 0.34)
    linear   lr - (lr - lr_min) * t / T
    constant lr
With logvar starting near -5, the cosine schedule at T = 16 cannot move logvar far enough and leaves a
KL floor near 0.47 nats per latent dimension; at T = 64 it does not. Raise `lr`, use `constant`, or run
more steps when the posterior variance matters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ltm_kernels.reference import kl_ref

SCHEDULES = ("cosine", "linear", "constant")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
MU_INIT_STD = 0.01
LOGVAR_INIT_MEAN, LOGVAR_INIT_STD = -5.0, 0.1


@dataclass
class Posterior:
    mu: torch.Tensor       # (B, n_z, d)
    logvar: torch.Tensor   # (B, n_z, d)
    z: torch.Tensor        # (B, n_z, d): mu + noise * exp(logvar / 2) at the final parameters
    noise: torch.Tensor    # (B, n_z, d): the fixed noise of this loop
    nll: torch.Tensor      # (B,): summed CE over tokens at the final z
    kl: torch.Tensor       # (B,): summed KL over latent dims at the final parameters

    @property
    def nelbo(self) -> torch.Tensor:
        return self.nll + self.kl


def scheduled_lr(step: int, total: int, lr: float, schedule: str) -> float:
    """Learning rate of step `step` (0-based) of `total`; see the module docstring."""
    lr_min = lr / 10
    if schedule == "cosine":
        return lr_min + 0.5 * (1 + math.cos(math.pi * step / total)) * (lr - lr_min)
    if schedule == "linear":
        return lr - (lr - lr_min) * step / total
    if schedule == "constant":
        return lr
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over all latent dims of each sequence: (B,)."""
    return kl_ref(mu, logvar).flatten(1).sum(-1)


def _param_dtype(model) -> torch.dtype:
    """Variational parameters stay at least fp32, even for a half-precision decoder."""
    return torch.promote_types(model.tok_embeddings.weight.dtype, torch.float32)


def check_inputs(model, tokens, targets, mu, logvar, noise):
    """Validate the inputs of elbo_terms / infer_posterior; latents come back flat (B, n_z, d), own dtype."""
    tokens = model.check_tokens(tokens, "tokens")
    targets = model.check_tokens(targets, "targets", allow_ignore=True)
    if targets.shape != tokens.shape:
        raise ValueError(f"targets must have the shape of tokens {tuple(tokens.shape)}, got {tuple(targets.shape)}")
    batch, dtype = tokens.shape[0], _param_dtype(model)
    latents = [None if x is None else model.check_latent(x, batch, name).to(dtype)
               for x, name in ((mu, "mu"), (logvar, "logvar"), (noise, "noise"))]
    return (tokens, targets, *latents)


def infer_posterior(model, tokens, targets, steps: Optional[int] = None, lr: float = 0.34,
                    schedule: str = "cosine", weight_decay: float = 0.01, mu=None, logvar=None, noise=None,
                    generator: Optional[torch.Generator] = None) -> Posterior:
    cfg = model.cfg
    steps = cfg.t_fast if steps is None else steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite non-negative number, got {lr!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite non-negative number, got {weight_decay!r}")
    tokens, targets, mu, logvar, noise = check_inputs(model, tokens, targets, mu, logvar, noise)

    shape = (tokens.shape[0], cfg.n_z, cfg.d_model)
    factory = dict(device=tokens.device, dtype=_param_dtype(model))
    # Clones: the loop updates in place and must never write into the caller's tensors.
    mu = (torch.randn(shape, generator=generator, **factory) * MU_INIT_STD) if mu is None else mu.detach().clone()
    if logvar is None:
        logvar = LOGVAR_INIT_MEAN + LOGVAR_INIT_STD * torch.randn(shape, generator=generator, **factory)
    else:
        logvar = logvar.detach().clone()
    noise = torch.randn(shape, generator=generator, **factory) if noise is None else noise.detach().clone()

    ops = model.ops
    moments = [torch.zeros(shape, **factory) for _ in range(4)]  # exp_avg / exp_avg_sq of mu, logvar
    with torch.no_grad():
        z = mu + noise * torch.exp(0.5 * logvar)
        for t in range(steps):
            z_leaf = z.detach().requires_grad_(True)
            with torch.enable_grad():
                nll = model.sequence_nll(tokens, targets, z_leaf)
                (grad_z,) = torch.autograd.grad(nll.sum(), z_leaf)
            ops.posterior_step(mu, logvar, *moments, z, grad_z, noise, scheduled_lr(t, steps, lr, schedule),
                               t + 1, ADAM_BETAS[0], ADAM_BETAS[1], ADAM_EPS, weight_decay)
        nll = model.sequence_nll(tokens, targets, z)
        kl = kl_divergence(mu, logvar)
    return Posterior(mu=mu, logvar=logvar, z=z, noise=noise, nll=nll, kl=kl)
