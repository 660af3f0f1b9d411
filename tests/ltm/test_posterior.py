"""The eager inner loop (docs/model.md, 'The inner loop') against a plain torch.optim.AdamW loop, and its properties."""

import math

import pytest
import torch

from ltm import LTMConfig, LTMDecoder
from ltm.posterior import scheduled_lr

CFG = LTMConfig.from_name("ltm-tiny")


def make_model(backend="eager", seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    return LTMDecoder(LTMConfig.from_name("ltm-tiny", **overrides), backend=backend).to(dtype)


def make_batch(cfg, batch=3, n=37, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, n + 1), generator=g)
    targets = tokens[:, 1:].clone()
    targets[0, :5] = -1  # ignored positions
    shape = (batch, cfg.n_z, cfg.d_model)
    mu = 0.01 * torch.randn(shape, generator=g, dtype=dtype)
    logvar = -5 + 0.1 * torch.randn(shape, generator=g, dtype=dtype)
    noise = torch.randn(shape, generator=g, dtype=dtype)
    return tokens[:, :-1], targets, mu, logvar, noise


def adamw_loop(model, tokens, targets, mu, logvar, noise, steps, lr, schedule, weight_decay=0.01):
    """The published way: autograd through the ELBO and torch.optim.AdamW. Yields (mu, logvar) per step."""
    mu, logvar = mu.clone().requires_grad_(True), logvar.clone().requires_grad_(True)
    opt = torch.optim.AdamW([mu, logvar], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    for t in range(steps):
        opt.param_groups[0]["lr"] = scheduled_lr(t, steps, lr, schedule)
        opt.zero_grad()
        z = mu + noise * torch.exp(0.5 * logvar)
        nll = model.sequence_nll(tokens, targets, z)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
        (nll.sum() + kl.sum()).backward()
        opt.step()
        yield mu.detach().clone(), logvar.detach().clone()


def assert_close(got, want, rtol, name):
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    assert err <= rtol, f"{name}: max relative error {err:.3e} > {rtol:.1e}"


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_infer_posterior_equals_torch_adamw(schedule, steps):
    model = make_model()
    tokens, targets, mu, logvar, noise = make_batch(model.cfg)
    post = model.infer_posterior(
        tokens, targets, steps=steps, lr=0.34, schedule=schedule, mu=mu, logvar=logvar, noise=noise
    )
    *_, (mu_ref, logvar_ref) = adamw_loop(model, tokens, targets, mu, logvar, noise, steps, 0.34, schedule)
    assert_close(post.mu, mu_ref, 1e-12, "mu")
    assert_close(post.logvar, logvar_ref, 1e-12, "logvar")
    z_ref = mu_ref + noise * torch.exp(0.5 * logvar_ref)
    assert_close(post.z, z_ref, 1e-12, "z")
    nll_ref = model.sequence_nll(tokens, targets, z_ref).detach()
    kl_ref = (-0.5 * (1 + logvar_ref - mu_ref.pow(2) - logvar_ref.exp())).flatten(1).sum(-1)
    assert_close(post.nll, nll_ref, 1e-12, "nll")
    assert_close(post.kl, kl_ref, 1e-12, "kl")
    assert post.mu.shape == post.logvar.shape == post.z.shape == (3, CFG.n_z, CFG.d_model)
    assert post.nll.shape == post.kl.shape == (3,)


def test_infer_posterior_step_by_step():
    """With a constant lr the loop after k steps is the AdamW loop after k steps, for every k."""
    model = make_model()
    tokens, targets, mu, logvar, noise = make_batch(model.cfg, batch=2, n=20)
    for k, (mu_ref, logvar_ref) in enumerate(
        adamw_loop(model, tokens, targets, mu, logvar, noise, 5, 0.1, "constant"), start=1
    ):
        post = model.infer_posterior(
            tokens, targets, steps=k, lr=0.1, schedule="constant", mu=mu, logvar=logvar, noise=noise
        )
        assert_close(post.mu, mu_ref, 1e-12, f"mu after {k} steps")
        assert_close(post.logvar, logvar_ref, 1e-12, f"logvar after {k} steps")


def test_schedules():
    assert scheduled_lr(0, 16, 0.34, "cosine") == pytest.approx(0.34)
    assert scheduled_lr(8, 16, 0.34, "cosine") == pytest.approx(0.034 + 0.5 * 0.306)
    assert scheduled_lr(15, 16, 0.34, "cosine") == pytest.approx(
        0.034 + 0.5 * (1 + math.cos(math.pi * 15 / 16)) * 0.306
    )
    assert scheduled_lr(8, 16, 0.34, "linear") == pytest.approx(0.34 - 0.306 / 2)
    assert scheduled_lr(9, 16, 0.34, "constant") == 0.34


def test_deterministic_and_inputs_untouched():
    model = make_model()
    tokens, targets, mu, logvar, noise = make_batch(model.cfg)
    copies = [x.clone() for x in (mu, logvar, noise)]
    a = model.infer_posterior(tokens, targets, steps=3, mu=mu, logvar=logvar, noise=noise)
    b = model.infer_posterior(tokens, targets, steps=3, mu=mu, logvar=logvar, noise=noise)
    assert torch.equal(a.mu, b.mu) and torch.equal(a.logvar, b.logvar) and torch.equal(a.z, b.z)
    for x, c in zip((mu, logvar, noise), copies):
        assert torch.equal(x, c), "infer_posterior wrote into the caller's tensors"
    # Drawn from a generator: reproducible from the seed, different for another seed.
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    c = model.infer_posterior(tokens, targets, steps=2, generator=g(5))
    d = model.infer_posterior(tokens, targets, steps=2, generator=g(5))
    e = model.infer_posterior(tokens, targets, steps=2, generator=g(6))
    assert torch.equal(c.mu, d.mu) and torch.equal(c.noise, d.noise)
    assert not torch.equal(c.noise, e.noise)
    # The documented init: mu ~ N(0, 0.01^2), logvar = -5 + 0.1 N(0, 1).
    init = model.infer_posterior(tokens, targets, steps=0, generator=g(7))
    assert abs(init.mu.std().item() - 0.01) < 0.002
    assert abs(init.logvar.mean().item() + 5) < 0.02 and abs(init.logvar.std().item() - 0.1) < 0.02


def test_no_decoder_weight_gradients():
    """The inner loop computes gradients for (mu, logvar) only: no weight gradient is formed or stored."""
    model = make_model()
    tokens, targets, mu, logvar, noise = make_batch(model.cfg)
    touched = []
    handles = [p.register_hook(lambda grad, n=n: touched.append(n)) for n, p in model.named_parameters()]
    try:
        model.infer_posterior(tokens, targets, steps=2, mu=mu, logvar=logvar, noise=noise)
    finally:
        for h in handles:
            h.remove()
    assert touched == [], f"weight gradients computed for {touched}"
    assert all(p.grad is None for p in model.parameters())


def test_latent_layouts_are_equivalent():
    model = make_model()
    tokens, targets, mu, logvar, noise = make_batch(model.cfg)
    layered = lambda x: x.view(x.shape[0], CFG.n_layer, CFG.n_z_per_layer, CFG.d_model)  # noqa: E731
    a = model.infer_posterior(tokens, targets, steps=2, mu=mu, logvar=logvar, noise=noise)
    b = model.infer_posterior(tokens, targets, steps=2, mu=layered(mu), logvar=layered(logvar), noise=layered(noise))
    assert torch.equal(a.mu, b.mu)
    nll, kl = model.elbo_terms(tokens, targets, layered(mu), layered(logvar), layered(noise))
    nll2, kl2 = model.elbo_terms(tokens, targets, mu, logvar, noise)
    assert torch.equal(nll, nll2) and torch.equal(kl, kl2)


def _train_tiny_ltm(model, data, iters, steps):
    """A few iterations of Algorithm 1: inner loop, then a decoder step on mean CE(x | z)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(iters):
        idx = torch.randint(0, data.shape[0], (16,), generator=g)
        tokens, targets = data[idx, :-1], data[idx, 1:]
        z = model.infer_posterior(tokens, targets, steps=steps, generator=g).z
        loss = model.sequence_nll(tokens, targets, z).sum() / targets.numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_elbo_improves_over_the_inner_loop_on_a_trained_model():
    """After a short training (Algorithm 1) on sequences that each repeat one of K random motifs, more
    inner-loop steps give a strictly better bound: NELBO(T=16) < NELBO(T=4) < NELBO(T=0), same init and noise.
    (A decoder this briefly trained mostly ignores z, so the gain is in the KL term; that the latents carry
    sequence-level information is test_evaluate.py's test_ltm_learns_sequence_level_structure.)"""
    model = make_model(dtype=torch.float32, seed=3)
    g = torch.Generator().manual_seed(1)
    motifs = torch.randint(0, 256, (4, 6), generator=g)
    which = torch.randint(0, 4, (64,), generator=g)
    data = motifs[which].repeat(1, 6)[:, :33]  # (64, 33): 6 repeats of a 6-token motif, cut
    untrained_nll = model.infer_posterior(data[:8, :-1], data[:8, 1:], steps=0).nll.sum()
    _train_tiny_ltm(model, data, iters=40, steps=4)
    tokens, targets = data[:8, :-1], data[:8, 1:]
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731  same init and noise for every run
    nelbo = [model.infer_posterior(tokens, targets, steps=t, generator=gen()).nelbo.sum() for t in (0, 4, 16)]
    assert model.infer_posterior(tokens, targets, steps=0, generator=gen()).nll.sum() < 0.5 * untrained_nll
    assert nelbo[2] < nelbo[1] < nelbo[0], nelbo
    assert nelbo[2] < 0.8 * nelbo[0], nelbo


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(steps=-1), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(schedule="warmup"), "schedule"),
        (dict(lr=float("nan")), "lr"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(final_nll=1), "final_nll"),
        (dict(final_nll="no"), "final_nll"),
    ],
)
def test_bad_loop_settings(kwargs, word):
    model = make_model()
    tokens, targets, *_ = make_batch(model.cfg)
    with pytest.raises(ValueError, match=word):
        model.infer_posterior(tokens, targets, **kwargs)


def test_bad_posterior_inputs():
    model = make_model()
    tokens, targets, mu, logvar, noise = make_batch(model.cfg)
    with pytest.raises(ValueError, match="targets"):
        model.infer_posterior(tokens, targets[:, :-1])
    with pytest.raises(ValueError, match="targets"):
        model.infer_posterior(tokens, torch.full_like(targets, CFG.vocab_size))
    with pytest.raises(ValueError, match="mu"):
        model.infer_posterior(tokens, targets, mu=mu[:, :-1])
    bad = noise.clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="noise"):
        model.infer_posterior(tokens, targets, noise=bad)
    with pytest.raises(TypeError, match="logvar"):
        model.elbo_terms(tokens, targets, mu, logvar.long(), noise)
    with pytest.raises(ValueError, match="tokens"):
        model.infer_posterior(
            torch.zeros(2, CFG.max_seq_len + 1, dtype=torch.long), torch.zeros(2, CFG.max_seq_len + 1, dtype=torch.long)
        )


@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_without_the_final_nll(backend):
    """final_nll=False skips the forward at the fitted z and nothing else: the latents and kl are the same,
    nll is None, and what needs it (nelbo) says how to get it."""
    model = make_model(backend=backend, dtype=torch.float32)
    tokens, targets, mu, logvar, noise = (x.float() if x.is_floating_point() else x for x in make_batch(model.cfg))
    kw = dict(steps=3, mu=mu, logvar=logvar, noise=noise)
    full = model.infer_posterior(tokens, targets, **kw)
    lean = model.infer_posterior(tokens, targets, final_nll=False, **kw)
    assert lean.nll is None and full.nll is not None
    for name in ("mu", "logvar", "z", "noise", "kl"):
        torch.testing.assert_close(getattr(lean, name), getattr(full, name), rtol=0, atol=0)
    want = model.elbo_terms(tokens, targets, full.mu, full.logvar, full.noise)[0]
    torch.testing.assert_close(full.nll, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="final_nll"):
        _ = lean.nelbo
