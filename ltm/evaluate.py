"""Evaluation (docs/model.md, 'Evaluation'): ELBO perplexity bounds on held-out tokens, at several inner-loop lengths T
in one run (the inference-time scaling curve).

The data is cut into consecutive windows of seq_len + 1 tokens (ltm.data.eval_blocks). Per window b with
N_b scored tokens, the inner loop fits q(z | x_b) in T steps, then:
    NELBO_b       = CE(x_b | z) + KL(q || p) at the loop's final parameters and its fixed noise
    nelbo/token   = sum_b NELBO_b / sum_b N_b;   ppl_bound = exp(nelbo/token)
    ppl_mean_exp  = mean_b exp(NELBO_b / N_b)    (the published aggregate)
    iw (K samples, fresh noise): -log p(x_b) <= -log (1/K) sum_k p(x_b | z_k) p(z_k) / q(z_k),  z_k ~ q
The importance-weighted bound is tighter than the ELBO and free of the fixed-noise bias of the loop's sample.
Every window's initial (mu, logvar, noise) comes from its own seed, the same for every T.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ltm.data import eval_blocks
from ltm.files import atomic_write_text
from ltm.latents import INNER_LOOP, seeded_latents
from ltm.progress import progress_bar
from ltm.validation import COUNT, NON_NEGATIVE, SEED, STEPS, Range


def _exp(x: float) -> float:
    """exp, inf past float64's range: a bound of e^800 (a short window, a large KL) is a valid inf bound."""
    return math.exp(x) if x < 709.0 else math.inf


def _iw_nelbo(model, tokens, targets, mu, logvar, samples: int, generator) -> torch.Tensor:
    """-log of the K-sample importance-weighted estimate of p(x), per sequence (B,)."""
    log_w = []
    with torch.no_grad():
        for _ in range(samples):
            eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype).to(mu.device)
            z = mu + eps * torch.exp(0.5 * logvar)
            # log p(z) - log q(z): the 2 pi terms cancel
            log_ratio = (-0.5 * z.pow(2) + 0.5 * eps.pow(2) + 0.5 * logvar).flatten(1).sum(-1)
            log_w.append(log_ratio - model.sequence_nll(tokens, targets, z).double())
    return -(torch.logsumexp(torch.stack(log_w), 0) - math.log(samples))


def elbo_eval(
    model,
    data,
    steps: Sequence[int] = (0, 16),
    seq_len: int | None = None,
    batch_size: int = 8,
    lr: float = INNER_LOOP.lr,
    schedule: str = INNER_LOOP.schedule,
    iw_samples: int = 0,
    max_blocks: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> list[dict]:
    """One result dict per T in `steps` (see the module docstring for every field). `data`: a TokenData, or a
    1-D array/tensor of token ids; `max_blocks` (>= 1, None: all) caps the number of windows scored. A bound
    beyond float64's range (e.g. seq_len=1: one token carries the whole KL) is inf."""
    cfg = model.cfg
    Range(int, 1, cfg.max_seq_len, optional=True).check("seq_len", seq_len)
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    if isinstance(steps, (int, str)) or not steps:
        raise ValueError(f"steps must be a non-empty list of ints >= 0, got {steps!r}")
    for t in steps:
        STEPS.check("steps (each)", t)
    COUNT.check("batch_size", batch_size)
    STEPS.check("iw_samples", iw_samples)
    Range(int, 1, optional=True).check("max_blocks", max_blocks)
    NON_NEGATIVE.check("lr", lr)
    SEED.check("seed", seed)
    blocks = eval_blocks(data, seq_len)[:max_blocks]
    # Windows of equal length batch together; only the last one may be shorter.
    full = [i for i, b in enumerate(blocks) if len(b) == seq_len + 1]
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[i] for i, b in enumerate(blocks) if len(b) != seq_len + 1]
    device = model.tok_embeddings.weight.device
    results = []
    bar = progress_bar(progress, total=len(steps) * len(batches), desc="eval", unit=" batch")
    for T in steps:
        bar.set_postfix(T=T)
        nelbo, nll, kl, iw, n_tok = [], [], [], [], []
        generator = torch.Generator().manual_seed(seed + 1)
        for ids in batches:
            w = torch.stack([blocks[i] for i in ids]).to(device)
            tokens, targets = w[:, :-1], w[:, 1:]
            mu, logvar, noise = seeded_latents(cfg, [(seed, i, 3) for i in ids], device)
            post = model.infer_posterior(
                tokens, targets, steps=T, lr=lr, schedule=schedule, mu=mu, logvar=logvar, noise=noise
            )
            nll.append(post.nll.double().cpu())
            kl.append(post.kl.double().cpu())
            nelbo.append(nll[-1] + kl[-1])
            n_tok.append(torch.full((len(ids),), targets.shape[1], dtype=torch.float64))
            if iw_samples:
                iw.append(_iw_nelbo(model, tokens, targets, post.mu, post.logvar, iw_samples, generator).cpu())
            bar.update(1)
        nelbo, nll, kl, n_tok = (torch.cat(x) for x in (nelbo, nll, kl, n_tok))
        total = float(n_tok.sum())
        r = dict(
            T=T,
            sequences=len(nelbo),
            tokens=int(total),
            nelbo_per_token=float(nelbo.sum()) / total,
            nll_per_token=float(nll.sum()) / total,
            kl_per_seq=float(kl.mean()),
            ppl_bound=_exp(float(nelbo.sum()) / total),
            ppl_mean_exp=float(torch.exp(nelbo / n_tok).mean()),
        )
        if iw_samples:
            iw_all = torch.cat(iw)
            r.update(
                iw_samples=iw_samples,
                iw_nelbo_per_token=float(iw_all.sum()) / total,
                ppl_iw=_exp(float(iw_all.sum()) / total),
            )
        results.append(r)
    bar.close()
    return results


def format_table(results: list[dict]) -> str:
    cols = ["T", "nelbo_per_token", "ppl_bound", "ppl_mean_exp", "nll_per_token", "kl_per_seq"]
    if "ppl_iw" in results[0]:
        cols += ["iw_nelbo_per_token", "ppl_iw"]
    lines = ["  ".join(f"{c:>18}" for c in cols)]
    for r in results:
        lines.append("  ".join(f"{r[c]:>18}" if isinstance(r[c], int) else f"{r[c]:>18.4f}" for c in cols))
    return "\n".join(lines)


def write_results(results: list[dict], path, meta: dict | None = None) -> None:
    """JSON {"meta", "results"}; a bound that overflows (inf) is written as null, keeping the file standard JSON."""

    def plain(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value

    rows = [{k: plain(v) for k, v in r.items()} for r in results]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"meta": meta or {}, "results": rows}, indent=2) + "\n")


def plot_scaling(results: list[dict], path) -> bool:
    """PNG of ppl bound against T (needs matplotlib; returns False, drawing nothing, without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ts = [r["T"] for r in results]
    ax.plot(ts, [r["ppl_bound"] for r in results], "o-", label="ELBO bound")
    if "ppl_iw" in results[0]:
        ax.plot(ts, [r["ppl_iw"] for r in results], "s--", label=f"IW bound (K={results[0]['iw_samples']})")
    ax.set_xlabel("inner-loop steps T")
    ax.set_ylabel("perplexity bound")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
