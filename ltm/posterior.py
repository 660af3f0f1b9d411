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

import torch

from ltm.engine import cached_inner_loop
from ltm.latents import (
    ADAM_BETAS,
    ADAM_EPS,
    INNER_LOOP,
    LOGVAR_INIT_MEAN,
    LOGVAR_INIT_STD,
    MU_INIT_STD,
    SCHEDULES,
    InnerLoopConfig,
    NonFiniteError,
    Posterior,
    check_inputs,
    check_loop_settings,
    draw_latents,
    kl_divergence,
    raise_if_non_finite,
    scheduled_lr,
)

__all__ = [
    "ADAM_BETAS",
    "ADAM_EPS",
    "INNER_LOOP",
    "LOGVAR_INIT_MEAN",
    "LOGVAR_INIT_STD",
    "MU_INIT_STD",
    "SCHEDULES",
    "InnerLoopConfig",
    "NonFiniteError",
    "Posterior",
    "eager_inner_loop",
    "elbo_terms",
    "infer_posterior",
    "kl_divergence",
    "scheduled_lr",
]


def elbo_terms(model, tokens, targets, mu, logvar, noise, check_finite: bool = True):
    """LTMDecoder.elbo_terms: (nll, kl), each (B,), at z = mu + noise * exp(logvar / 2)."""
    for x, name in ((mu, "mu"), (logvar, "logvar"), (noise, "noise")):
        if x is None:
            raise ValueError(
                f"elbo_terms: {name} is required, a tensor of shape (B, n_z, d) (e.g. the "
                f"Posterior.{name} of infer_posterior), got None"
            )
    tokens, targets, mu, logvar, noise = check_inputs(model, tokens, targets, mu, logvar, noise)
    z = mu + noise * torch.exp(0.5 * logvar)
    nll, kl = model.sequence_nll(tokens, targets, z), kl_divergence(mu, logvar)
    if check_finite:
        raise_if_non_finite("elbo_terms", Posterior(mu=mu, logvar=logvar, z=z, noise=noise, nll=nll, kl=kl), mu, logvar)
    return nll, kl


def eager_inner_loop(
    model,
    tokens,
    targets,
    steps: int,
    lr: float,
    schedule: str,
    weight_decay: float,
    mu,
    logvar,
    noise,
    final_nll: bool = True,
) -> Posterior:
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
            ops.posterior_step(
                mu,
                logvar,
                *moments,
                z,
                grad_z,
                noise,
                step,
                lr,
                steps,
                SCHEDULES.index(schedule),
                ADAM_BETAS[0],
                ADAM_BETAS[1],
                ADAM_EPS,
                weight_decay,
            )
        nll = model.sequence_nll(tokens, targets, z) if final_nll else None
        kl = kl_divergence(mu, logvar)
    return Posterior(mu=mu, logvar=logvar, z=z, noise=noise, nll=nll, kl=kl)


def infer_posterior(
    model,
    tokens,
    targets,
    steps: int | None = INNER_LOOP.steps,
    lr: float = INNER_LOOP.lr,
    schedule: str = INNER_LOOP.schedule,
    weight_decay: float = INNER_LOOP.weight_decay,
    mu=None,
    logvar=None,
    noise=None,
    generator: torch.Generator | None = None,
    check_finite: bool = True,
    final_nll: bool = True,
) -> Posterior:
    """LTMDecoder.infer_posterior: the eager loop for backend="eager", else the engine (ltm.engine), cached
    per model and loop shape (on CUDA its graph is captured on the first call of a shape and replayed after).
    `check_finite`: raise NonFiniteError when the result holds nan/inf (checked once, after the loop).
    `final_nll`: compute Posterior.nll, one forward at the fitted z after the last step (~1/(3T) of the
    loop); False leaves it None, for callers that need only the latents or run that forward themselves
    (training: the decoder's loss is the same CE at the same z)."""
    if torch.is_inference_mode_enabled():
        # The loop differentiates the decoder with respect to z, which inference tensors forbid: run it with
        # inference mode off, on ordinary copies of the inputs; the results are ordinary tensors.
        with torch.inference_mode(False):
            tokens, targets, mu, logvar, noise = (
                x.clone() if isinstance(x, torch.Tensor) else x for x in (tokens, targets, mu, logvar, noise)
            )
            return infer_posterior(
                model,
                tokens,
                targets,
                steps,
                lr,
                schedule,
                weight_decay,
                mu,
                logvar,
                noise,
                generator,
                check_finite,
                final_nll,
            )
    steps = model.cfg.t_fast if steps is None else steps
    check_loop_settings(steps, lr, schedule, weight_decay, final_nll)
    tokens, targets, mu, logvar, noise = check_inputs(model, tokens, targets, mu, logvar, noise)
    if model.backend != "eager":
        loop = cached_inner_loop(model, tokens.shape[0], tokens.shape[1], steps, lr, schedule, weight_decay, final_nll)
        post = loop.run(tokens, targets, mu, logvar, noise, generator=generator, checked=True)
        mu, logvar = loop.mu0, loop.logvar0
    else:
        mu, logvar, noise = draw_latents(model, tokens.shape[0], mu, logvar, noise, generator)
        # Clones: the loop updates in place and must never write into the caller's tensors.
        post = eager_inner_loop(
            model,
            tokens,
            targets,
            steps,
            lr,
            schedule,
            weight_decay,
            mu.detach().clone(),
            logvar.detach().clone(),
            noise.detach().clone(),
            final_nll,
        )
    if check_finite:
        raise_if_non_finite("infer_posterior", post, mu, logvar, steps, lr, schedule)
    return post
