"""The variational posterior of the inner loop: q(z | x) = N(mu, diag exp(logvar)) per sequence.

What both drivers of the loop (`ltm.posterior.eager_inner_loop`, `ltm.engine.InnerLoop`) share: the result
type `Posterior`, the published settings (`InnerLoopConfig`, `INNER_LOOP`) and initialisation, the KL, the
input checks, and the one non-finite check after a loop.

Initialisation (Kong et al. 2025): mu ~ N(0, 0.01^2), logvar = -5 + 0.1 N(0, 1), noise ~ N(0, I), drawn
in that order; `latents_from_normals` maps three standard normals to them, for every caller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ltm.backends import SCHEDULES, kl_ref
from ltm.backends import scheduled_lr as _scheduled_lr

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
MU_INIT_STD = 0.01
LOGVAR_INIT_MEAN, LOGVAR_INIT_STD = -5.0, 0.1
# Initial values beyond these overflow the decoder or the KL in fp32 (|z| ~ exp(logvar / 2) feeds squared
# norms; exp(logvar) > 3.4e38 past 88): the range the non-finite error suggests.
LOGVAR_RANGE, MU_RANGE = (-30.0, 30.0), 1e4


@dataclass(frozen=True)
class InnerLoopConfig:
    """Settings of one inner loop; the defaults are the published ones (Kong et al. 2025)."""

    steps: int | None = None  # T; None: the model's t_fast
    lr: float = 0.34  # peak lr of AdamW on (mu, logvar)
    schedule: str = "cosine"  # one of SCHEDULES; lr_min = lr / 10
    weight_decay: float = 0.01

    def check(self) -> InnerLoopConfig:
        check_loop_settings(0 if self.steps is None else self.steps, self.lr, self.schedule, self.weight_decay)
        return self


INNER_LOOP = InnerLoopConfig()  # the published defaults, which every signature's defaults read


class NonFiniteError(RuntimeError):
    """The inner loop or the ELBO became nan/inf; the message names the terms and what to change."""


@dataclass
class Posterior:
    mu: torch.Tensor  # (B, n_z, d)
    logvar: torch.Tensor  # (B, n_z, d)
    z: torch.Tensor  # (B, n_z, d): mu + noise * exp(logvar / 2) at the final parameters
    noise: torch.Tensor  # (B, n_z, d): the fixed noise of this loop
    nll: torch.Tensor | None  # (B,): summed CE over tokens at the final z; None if not asked for (final_nll)
    kl: torch.Tensor  # (B,): summed KL over latent dims at the final parameters

    @property
    def nelbo(self) -> torch.Tensor:
        if self.nll is None:
            raise ValueError(
                "Posterior.nelbo needs the final nll, which this posterior was fitted without "
                "(final_nll=False); use elbo_terms(mu, logvar, noise) or infer_posterior(final_nll=True)"
            )
        return self.nll + self.kl


def scheduled_lr(step: int, total: int, lr: float, schedule: str) -> float:
    """Learning rate of step `step` (0-based) of `total` (formulas: ltm.posterior). The one definition is
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
    latents = [
        None if x is None else model.check_latent(x, batch, name).to(dtype)
        for x, name in ((mu, "mu"), (logvar, "logvar"), (noise, "noise"))
    ]
    return (tokens, targets, *latents)


def check_loop_settings(steps, lr, schedule, weight_decay, final_nll=True) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite non-negative number, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite non-negative number, got {weight_decay!r}")
    if not isinstance(final_nll, bool):
        raise ValueError(f"final_nll must be a bool (True: the Posterior's nll at the fitted z), got {final_nll!r}")


def raise_if_non_finite(
    what: str, post: Posterior, mu0, logvar0, steps: int = 0, lr: float = 0.0, schedule: str = INNER_LOOP.schedule
) -> None:
    """NonFiniteError if any term of `post` is nan/inf, naming them and suggesting a smaller lr or initial
    (mu0, logvar0) in range. One host read, after the loop: nothing inside a loop or a CUDA graph waits."""
    terms = {"nll (the CE term)": post.nll, "kl": post.kl, "mu": post.mu, "logvar": post.logvar, "z": post.z}
    terms = {name: t for name, t in terms.items() if t is not None}  # nll: None under final_nll=False
    bad = torch.stack([~torch.isfinite(t).all() for t in terms.values()]).tolist()
    if not any(bad):
        return
    names = ", ".join(name for name, b in zip(terms, bad) if b)
    hints = []
    lv_lo, lv_hi = float(logvar0.min()), float(logvar0.max())
    if not (LOGVAR_RANGE[0] <= lv_lo and lv_hi <= LOGVAR_RANGE[1]):
        hints.append(f"logvar in [{LOGVAR_RANGE[0]:g}, {LOGVAR_RANGE[1]:g}] (given: [{lv_lo:.3g}, {lv_hi:.3g}])")
    mu_max = float(mu0.abs().max())
    if not mu_max <= MU_RANGE:
        hints.append(f"|mu| <= {MU_RANGE:g} (given: up to {mu_max:.3g})")
    if steps > 0 and lr > 0:
        hints.append(
            f"a smaller lr (given: lr={lr:g}, schedule={schedule!r}, steps={steps}; published: "
            f"lr={INNER_LOOP.lr}, {INNER_LOOP.schedule!r})"
        )
    loop = f"the inner loop diverged: after {steps} steps " if what == "infer_posterior" else ""
    raise NonFiniteError(
        f"{what}: {loop}{names} became non-finite (nan/inf); use "
        f"{' or '.join(hints) or 'finite inputs of moderate size'}. The prior is N(0, I); the "
        f"published initialisation is mu ~ N(0, {MU_INIT_STD}^2), logvar = {LOGVAR_INIT_MEAN:g} "
        f"+ {LOGVAR_INIT_STD} N(0, 1). (check_finite=False returns the values as they are.)"
    )


def latents_from_normals(n_mu: torch.Tensor, n_logvar: torch.Tensor, n_noise: torch.Tensor) -> tuple:
    """(mu, logvar, noise) of the published initialisation from three standard-normal tensors."""
    return n_mu * MU_INIT_STD, LOGVAR_INIT_MEAN + LOGVAR_INIT_STD * n_logvar, n_noise


def draw_latents(model, batch: int, mu, logvar, noise, generator: torch.Generator | None):
    """(mu, logvar, noise) for one loop: the given tensors as they are, the others drawn as documented, in
    this order from `generator`: mu ~ N(0, 0.01^2), logvar = -5 + 0.1 N(0, 1), noise ~ N(0, I)."""
    cfg = model.cfg
    shape = (batch, cfg.n_z, cfg.d_model)
    factory = dict(device=model.tok_embeddings.weight.device, dtype=_param_dtype(model))
    given = (mu, logvar, noise)
    initial = latents_from_normals(
        *(torch.randn(shape, generator=generator, **factory) if x is None else x for x in given)
    )
    return tuple(init if x is None else x for x, init in zip(given, initial))


def seeded_latents(cfg, keys: Sequence[Sequence[int]], device) -> tuple:
    """(mu, logvar, noise), each (len(keys), n_z, d): sequence i's three normals from its own generator, seeded
    by numpy's SeedSequence(keys[i]). Independent of batch composition, rank and micro-step (training and
    evaluation key them by seed, step / window and sequence index)."""
    draws = []
    for key in keys:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0]))
        draws.append(torch.randn((3, cfg.n_z, cfg.d_model), generator=g))
    d = torch.stack(draws).to(device)  # (B, 3, n_z, d)
    return latents_from_normals(d[:, 0], d[:, 1], d[:, 2])
