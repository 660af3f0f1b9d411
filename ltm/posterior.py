"""Posterior inference: the fast inner loop (docs/model.md, 'The inner loop').

Per sequence, q(z | x) = N(mu, diag exp(logvar)) is fitted by T AdamW steps on
    loss = sum_tokens CE(x | z) + sum_dims KL(q || N(0, I)),   z = mu + noise * exp(logvar / 2),
with the noise drawn once and held fixed, and the decoder frozen: gradients flow to (mu, logvar) only,
and decoder weight gradients are never computed (`torch.autograd.grad` with respect to z alone).

The step itself (KL gradient, chain rule from dL/dz to (mu, logvar), AdamW, next z) is the backend op
`posterior_step`: eager PyTorch, the fused C++ kernel (CPU, CUDA) or the Triton kernel, chosen by
`ltm.backends`. Its step counter is a device tensor and it computes the scheduled lr itself, so no step
of the loop needs a host value.

Two drivers of the same loop: `eager_inner_loop` below (the reference path, backend="eager") and
`ltm.engine.InnerLoop` (static buffers, no allocation of its own and no host synchronisation in the loop,
on CUDA one CUDA graph per loop), which `infer_posterior` uses for every other backend.

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

from ltm_kernels.reference import SCHEDULES, kl_ref
from ltm_kernels.reference import scheduled_lr as _scheduled_lr

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
    """Learning rate of step `step` (0-based) of `total`; see the module docstring. The one definition is
    `ltm_kernels.reference.scheduled_lr`, which the kernels follow on the device."""
    return _scheduled_lr(step, total, lr, schedule)


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


def check_loop_settings(steps, lr, schedule, weight_decay) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite non-negative number, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite non-negative number, got {weight_decay!r}")


def draw_latents(model, batch: int, mu, logvar, noise, generator: Optional[torch.Generator]):
    """(mu, logvar, noise) for one loop: the given tensors as they are, the others drawn as documented, in
    this order from `generator`: mu ~ N(0, 0.01^2), logvar = -5 + 0.1 N(0, 1), noise ~ N(0, I)."""
    cfg = model.cfg
    shape = (batch, cfg.n_z, cfg.d_model)
    factory = dict(device=model.tok_embeddings.weight.device, dtype=_param_dtype(model))
    if mu is None:
        mu = torch.randn(shape, generator=generator, **factory) * MU_INIT_STD
    if logvar is None:
        logvar = LOGVAR_INIT_MEAN + LOGVAR_INIT_STD * torch.randn(shape, generator=generator, **factory)
    if noise is None:
        noise = torch.randn(shape, generator=generator, **factory)
    return mu, logvar, noise


def eager_inner_loop(model, tokens, targets, steps: int, lr: float, schedule: str, weight_decay: float,
                     mu, logvar, noise) -> Posterior:
    """The inner loop in plain Python over the backend ops: the reference path. Updates mu, logvar in place
    (callers pass tensors of their own)."""
    ops = model.ops
    moments = [torch.zeros_like(mu) for _ in range(4)]  # exp_avg / exp_avg_sq of mu, logvar
    step = torch.zeros(1, dtype=torch.int64, device=mu.device)  # updates done: the op reads and increments it
    with torch.no_grad():
        z = mu + noise * torch.exp(0.5 * logvar)
        for _ in range(steps):
            z_leaf = z.detach().requires_grad_(True)
            with torch.enable_grad():
                nll = model.sequence_nll(tokens, targets, z_leaf)
                (grad_z,) = torch.autograd.grad(nll.sum(), z_leaf)
            ops.posterior_step(mu, logvar, *moments, z, grad_z, noise, step, lr, steps, SCHEDULES.index(schedule),
                               ADAM_BETAS[0], ADAM_BETAS[1], ADAM_EPS, weight_decay)
        nll = model.sequence_nll(tokens, targets, z)
        kl = kl_divergence(mu, logvar)
    return Posterior(mu=mu, logvar=logvar, z=z, noise=noise, nll=nll, kl=kl)


def infer_posterior(model, tokens, targets, steps: Optional[int] = None, lr: float = 0.34,
                    schedule: str = "cosine", weight_decay: float = 0.01, mu=None, logvar=None, noise=None,
                    generator: Optional[torch.Generator] = None) -> Posterior:
    """LTMDecoder.infer_posterior: the eager loop for backend="eager", else the engine (ltm.engine), cached
    per model and loop shape (on CUDA its graph is captured on the first call of a shape and replayed after)."""
    steps = model.cfg.t_fast if steps is None else steps
    check_loop_settings(steps, lr, schedule, weight_decay)
    tokens, targets, mu, logvar, noise = check_inputs(model, tokens, targets, mu, logvar, noise)
    if model.backend != "eager":
        from ltm.engine import cached_inner_loop

        loop = cached_inner_loop(model, tokens.shape[0], tokens.shape[1], steps, lr, schedule, weight_decay)
        return loop.run(tokens, targets, mu, logvar, noise, generator=generator, checked=True)
    mu, logvar, noise = draw_latents(model, tokens.shape[0], mu, logvar, noise, generator)
    # Clones: the loop updates in place and must never write into the caller's tensors.
    return eager_inner_loop(model, tokens, targets, steps, lr, schedule, weight_decay,
                            mu.detach().clone(), logvar.detach().clone(), noise.detach().clone())
