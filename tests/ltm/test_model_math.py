"""Independent check of the LTM decoder's math (docs/model.md, 'The decoder') through the public API only.

The reference below is written from docs/model.md, in float64, with plain loops / index arithmetic (no SDPA,
nothing shared with `ltm/`). Random weights in the PUBLISHED naming are loaded with
`load_published_state_dict`, and the model's logits / ELBO terms are compared with the reference.

Tolerance: 1e-10 relative to max|logits| (float64 end to end). The spec builds the RoPE cos/sin tables in
fp32 (as published); a float64 model may instead build them in float64. Both are exact readings of the
math and differ by ~1e-6 (fp32 angle rounding), so the model must match, to 1e-10, the reference built
with fp32 tables OR the one built with float64 tables -- anything in between (e.g. a float64 model that
silently computes a norm or a projection in fp32) fails. `test_tolerance_discriminates_spec_mistakes`
proves that plausible mistakes (rotate-half RoPE, window off by one, wrong latent positions, wrong
latent-to-layer mapping, wrong eps, ...) move the logits by orders of magnitude more than the tolerance.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from helpers import random_published_sd
from ltm import LTMConfig, LTMDecoder

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# Random weights in the published naming
# ----------------------------------------------------------------------------------------------
def make_model(cfg: LTMConfig, sd: dict, dtype=F64) -> LTMDecoder:
    model = LTMDecoder(cfg, backend="eager").to(dtype)
    model.load_published_state_dict(sd)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------
# The reference (docs/model.md, 'The decoder'), float64, straightforward
# ----------------------------------------------------------------------------------------------
def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float, table_dtype):
    """cos/sin of angle pos * theta^(-2i/head_dim) for pair i; shape (T, head_dim // 2), returned in float64.

    table_dtype=float32 builds them as the published code does (fp32 frequencies and angles)."""
    if table_dtype == torch.float32:
        freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        ang = positions.to(torch.float32)[:, None] * freqs[None, :]
    else:
        i = torch.arange(head_dim // 2, dtype=F64)
        freqs = theta ** (-2.0 * i / head_dim)
        ang = positions.to(F64)[:, None] * freqs[None, :]
    return torch.cos(ang).to(F64), torch.sin(ang).to(F64)


def apply_rope(x, cos, sin, pairing="adjacent"):
    """x (B, T, H, hd); cos/sin (T, hd/2). Adjacent pairs (0,1),(2,3),...: dims 2i, 2i+1 rotated by angle i."""
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.empty_like(x)
    if pairing == "adjacent":
        a, b = x[..., 0::2], x[..., 1::2]
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
    elif pairing == "half":  # deliberate mistake (GPT-NeoX style), used only to prove the test can fail
        h = x.shape[-1] // 2
        a, b = x[..., :h], x[..., h:]
        out[..., :h] = a * c - b * s
        out[..., h:] = a * s + b * c
    else:
        raise AssertionError(pairing)
    return out


def attend(q, k, v, allowed):
    """q (B, Tq, H, hd), k/v (B, Tk, H, hd), allowed (Tq, Tk) bool -> (B, Tq, H*hd)."""
    B, Tq, H, hd = q.shape
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(~allowed[None, None], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v).reshape(B, Tq, H * hd)


def window_mask(N: int, W: int) -> torch.Tensor:
    """allowed[n, m] iff n - W + 1 <= m <= n (token n sees n-W+1 .. n)."""
    n = torch.arange(N)[:, None]
    m = torch.arange(N)[None, :]
    return (m <= n) & (m >= n - W + 1)


def ref_logits(
    sd,
    cfg: LTMConfig,
    tokens,
    z,
    *,
    table_dtype=torch.float32,
    pairing="adjacent",
    window=None,
    latent_pos_stride=None,
    rope_on_latent_k=True,
    rope_on_cross_q=True,
    layer_block=None,
    scale=None,
    eps=None,
):
    """Logits of docs/model.md, 'The decoder'. Keyword arguments other than table_dtype exist only to build
    deliberately wrong variants for `test_tolerance_discriminates_spec_mistakes`."""
    sd = {k: v.to(F64) for k, v in sd.items()}
    B, N = tokens.shape
    L, H, hd, d = cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.d_model
    nzpl = cfg.n_z // cfg.n_layer
    W = cfg.window_size if window is None else window
    stride = cfg.max_seq_len // cfg.n_z if latent_pos_stride is None else latent_pos_stride
    eps = cfg.norm_eps if eps is None else eps
    z = z.to(F64).reshape(B, cfg.n_z, d)

    tok_cos, tok_sin = rope_tables(hd, torch.arange(N), cfg.rope_theta, table_dtype)
    lat_cos, lat_sin = rope_tables(hd, torch.arange(nzpl) * stride, cfg.rope_theta, table_dtype)
    causal_window = window_mask(N, W)
    no_mask = torch.ones(N, nzpl, dtype=torch.bool)

    E = sd["tok_embeddings.weight"]
    x = E[tokens]  # (B, N, d)
    for i in range(L):
        p = f"layers.{i}."
        # self-attention, causal sliding window, RoPE on q and k at token positions
        a = rms_norm(x, sd[p + "attention_norm.weight"], eps)
        q = (a @ sd[p + "attention.wq.weight"].T).view(B, N, H, hd)
        k = (a @ sd[p + "attention.wk.weight"].T).view(B, N, H, hd)
        v = (a @ sd[p + "attention.wv.weight"].T).view(B, N, H, hd)
        q = apply_rope(q, tok_cos, tok_sin, pairing)
        k = apply_rope(k, tok_cos, tok_sin, pairing)
        if scale is not None:
            q = q * (scale * math.sqrt(hd))
        h = x + attend(q, k, v, causal_window) @ sd[p + "attention.wo.weight"].T
        # cross-attention to this layer's own latents
        blk = i if layer_block is None else layer_block(i)
        zi = z[:, blk * nzpl : (blk + 1) * nzpl]  # (B, nzpl, d), no norm
        c = rms_norm(h, sd[p + "cross_attention_norm.weight"], eps)
        q = (c @ sd[p + "cross_attention.wq.weight"].T).view(B, N, H, hd)
        k = (zi @ sd[p + "cross_attention.wk.weight"].T).view(B, nzpl, H, hd)
        v = (zi @ sd[p + "cross_attention.wv.weight"].T).view(B, nzpl, H, hd)
        if rope_on_cross_q:
            q = apply_rope(q, tok_cos, tok_sin, pairing)
        if rope_on_latent_k:
            k = apply_rope(k, lat_cos, lat_sin, pairing)
        h = h + attend(q, k, v, no_mask) @ sd[p + "cross_attention.wo.weight"].T
        # SwiGLU MLP
        f = rms_norm(h, sd[p + "ffn_norm.weight"], eps)
        gate = f @ sd[p + "feed_forward.gate_proj.weight"].T
        up = f @ sd[p + "feed_forward.up_proj.weight"].T
        x = h + (F.silu(gate) * up) @ sd[p + "feed_forward.down_proj.weight"].T
    x = rms_norm(x, sd["norm.weight"], eps)
    return x @ E.T  # tied output projection


def ref_nll(logits, targets):
    """Per-sequence sum of cross-entropy, targets == -1 ignored (explicit log-softmax + gather)."""
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    valid = targets != -1
    picked = torch.gather(logp, -1, targets.clamp(min=0)[..., None])[..., 0]
    return -(picked * valid).sum(-1)


def ref_kl(mu, logvar):
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).flatten(1).sum(-1)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def rand_inputs(cfg, B, N, seed, dtype=F64):
    g = torch.Generator().manual_seed(1000 + seed)
    tokens = torch.randint(0, cfg.vocab_size, (B, N), generator=g)
    z = torch.randn(B, cfg.n_z, cfg.d_model, generator=g, dtype=F64).to(dtype)
    return tokens, z


def first_mismatch(got, want, atol):
    bad = ((got - want).abs() > atol).nonzero()
    if len(bad) == 0:
        return "none"
    idx = tuple(bad[0].tolist())
    return f"{idx}: got {got[idx].item()!r}, want {want[idx].item()!r} ({len(bad)} entries off)"


TOL = 1e-10  # relative to max|logits|


def closest_reference(got, sd, cfg, tokens, z):
    """(relative error, reference, table dtype, scale) for the closer of the fp32-table / fp64-table references."""
    best = None
    for table_dtype in (torch.float32, F64):
        ref = ref_logits(sd, cfg, tokens, z, table_dtype=table_dtype)
        scale = ref.abs().max().item()
        err = (got.to(F64) - ref).abs().max().item() / scale
        print(f"  rel err vs reference with {str(table_dtype)[6:]} RoPE tables: {err:.3g}")
        if best is None or err < best[0]:
            best = (err, ref, table_dtype, scale)
    return best


# name, overrides of ltm-tiny, batch, N, seed[, random_published_sd kwargs]
CASES = [
    ("tiny", {}, 3, 37, 0),  # N odd, > window 16
    ("tiny-full-context", {}, 2, 64, 1),  # N == max_seq_len
    ("tiny-one-token", {}, 2, 1, 2),
    ("3layer-window1", dict(n_layer=3, n_z=12, window_size=1), 2, 23, 3),  # latent stride 64//12 = 5
    ("3layer-window-ge-N", dict(n_layer=3, n_z=9, window_size=64), 3, 50, 4),  # stride 7, nzpl 3
    ("1layer-window-eq-N", dict(n_layer=1, n_z=5, window_size=29), 2, 29, 5),  # stride 12
    ("4heads-hd16", dict(n_head=4, n_z=6, max_seq_len=48, window_size=7), 2, 45, 6),  # head_dim 16
    ("tiny-small-embeddings", {}, 2, 37, 7, dict(emb_std=0.003)),  # mean(x^2) ~ eps: eps matters
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_logits_match_independent_reference(case):
    name, overrides, B, N, seed = case[:5]
    sd_kwargs = case[5] if len(case) > 5 else {}
    cfg = LTMConfig.from_name("ltm-tiny", **overrides)
    sd = random_published_sd(cfg, seed, **sd_kwargs)
    model = make_model(cfg, sd)
    tokens, z = rand_inputs(cfg, B, N, seed)
    with torch.no_grad():
        got = model(tokens, z)
    assert got.shape == (B, N, cfg.vocab_size)
    assert got.dtype == F64
    print(f"{name}:")
    err, want, table_dtype, scale = closest_reference(got, sd, cfg, tokens, z)
    assert err <= TOL, (
        f"{name}: rel err {err:.3g} > {TOL:g} (closest: {table_dtype} tables); "
        f"first mismatch {first_mismatch(got, want, TOL * scale)}"
    )


def test_attention_is_not_trivially_uniform():
    """Guard on the test data: with these weights the self-attention probabilities are far from uniform,
    so positional/window mistakes are visible."""
    cfg = LTMConfig.from_name("ltm-tiny")
    sd = random_published_sd(cfg, 0)
    tokens, _ = rand_inputs(cfg, 2, 37, 0)
    x = sd["tok_embeddings.weight"][tokens]
    a = rms_norm(x, sd["layers.0.attention_norm.weight"], cfg.norm_eps)
    hd = cfg.head_dim
    q = (a @ sd["layers.0.attention.wq.weight"].T)[..., :hd]  # head 0
    k = (a @ sd["layers.0.attention.wk.weight"].T)[..., :hd]
    s = torch.einsum("bqd,bkd->bqk", q, k)[:, 20, 5:21] / math.sqrt(hd)  # query 20, its 16-token window
    p = torch.softmax(s, -1)
    assert p.max().item() > 3.0 / 16, f"attention nearly uniform: max prob {p.max().item():.3f}"


MISTAKES = {
    "rotate-half RoPE": dict(pairing="half"),
    "window W+1": dict(window=17),
    "window W-1": dict(window=15),
    "latent positions j (stride 1)": dict(latent_pos_stride=1),
    "latent stride from n_z_per_layer": dict(latent_pos_stride=64 // 4),
    "no RoPE on latent keys": dict(rope_on_latent_k=False),
    "no RoPE on cross-attention queries": dict(rope_on_cross_q=False),
    "layer i uses layer L-1-i latents": dict(layer_block=lambda i: 1 - i),
    "scale 1/head_dim": dict(scale=1.0 / 32),
    "norm eps 1e-6": dict(eps=1e-6),
}


@pytest.mark.parametrize("emb_std", [0.5, 0.003])
def test_tolerance_discriminates_spec_mistakes(emb_std):
    """The model is within tolerance of the correct reference and far (>= 1000x tolerance) from each
    plausible wrong variant: the comparison above is able to fail. (Small embeddings make eps visible.)"""
    cfg = LTMConfig.from_name("ltm-tiny")
    sd = random_published_sd(cfg, 11, emb_std=emb_std)
    model = make_model(cfg, sd)
    tokens, z = rand_inputs(cfg, 2, 37, 11)
    with torch.no_grad():
        got = model(tokens, z)
    err, want, table_dtype, scale = closest_reference(got, sd, cfg, tokens, z)
    assert err <= TOL
    tol = TOL
    for label, kw in MISTAKES.items():
        if "eps" in label and emb_std > 0.01:
            continue  # with O(1) activations eps is invisible by construction
        wrong = ref_logits(sd, cfg, tokens, z, table_dtype=table_dtype, **kw)
        dist = (got - wrong).abs().max().item() / scale
        print(f"{label}: rel distance {dist:.3g} (tolerance {tol:.3g})")
        assert dist > 1000 * tol, f"mistake '{label}' is not distinguishable: {dist:.3g} vs tol {tol:.3g}"


# ----------------------------------------------------------------------------------------------
# ELBO terms
# ----------------------------------------------------------------------------------------------
def test_elbo_terms_match_reference():
    cfg = LTMConfig.from_name("ltm-tiny", n_layer=3, n_z=9, window_size=5)
    B, N = 3, 21
    sd = random_published_sd(cfg, 21)
    model = make_model(cfg, sd)
    g = torch.Generator().manual_seed(21)
    tokens = torch.randint(0, cfg.vocab_size, (B, N), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (B, N), generator=g)
    targets[0, [0, 3, 4, 20]] = -1
    targets[2, 10:] = -1
    mu = 0.5 * torch.randn(B, cfg.n_z, cfg.d_model, generator=g, dtype=F64)
    logvar = -1.0 + 0.5 * torch.randn(B, cfg.n_z, cfg.d_model, generator=g, dtype=F64)
    noise = torch.randn(B, cfg.n_z, cfg.d_model, generator=g, dtype=F64)

    with torch.no_grad():
        nll, kl = model.elbo_terms(tokens, targets, mu, logvar, noise)
    z = mu + noise * torch.exp(logvar / 2)
    want_kl = ref_kl(mu, logvar)
    assert nll.shape == (B,) and kl.shape == (B,)
    # the closer of the two RoPE-table readings (see module docstring), to 1e-10 relative
    errs = {}
    for table_dtype in (torch.float32, F64):
        logits = ref_logits(sd, cfg, tokens, z, table_dtype=table_dtype)
        want_nll = ref_nll(logits, targets)
        errs[str(table_dtype)] = ((nll.to(F64) - want_nll).abs() / want_nll.abs().clamp(min=1.0)).max().item()
        # independent cross-check of ref_nll with torch's CE (ignore_index=-1)
        ce = F.cross_entropy(logits.reshape(B * N, -1), targets.reshape(-1), ignore_index=-1, reduction="none")
        torch.testing.assert_close(ce.view(B, N).sum(-1), want_nll, rtol=1e-12, atol=1e-12)
    print(f"nll got {nll.tolist()}; rel err vs references {errs}")
    print(f"kl  got {kl.tolist()} want {want_kl.tolist()}")
    assert min(errs.values()) <= TOL, f"nll {nll.tolist()}: rel err {errs}"
    torch.testing.assert_close(kl.to(F64), want_kl, rtol=1e-12, atol=1e-9)
    # the ignored targets must really be ignored: the un-masked NLL differs a lot
    assert (ref_nll(logits, targets.clamp(min=0)) - want_nll).abs().max() > 1.0


def test_elbo_terms_fully_ignored_sequence_has_zero_nll():
    cfg = LTMConfig.from_name("ltm-tiny")
    sd = random_published_sd(cfg, 22)
    model = make_model(cfg, sd)
    tokens, mu = rand_inputs(cfg, 2, 12, 22)
    targets = tokens.roll(-1, dims=1)
    targets[1] = -1
    logvar = torch.full_like(mu, -2.0)
    noise = torch.zeros_like(mu)
    with torch.no_grad():
        nll, kl = model.elbo_terms(tokens, targets, mu, logvar, noise)
    assert torch.isfinite(nll).all(), nll
    assert nll[1].item() == 0.0, nll
    assert nll[0].item() > 1.0, nll


# ----------------------------------------------------------------------------------------------
# Causality and the sliding window, through the logits
# ----------------------------------------------------------------------------------------------
def _pos_change(model, tokens, z, tokens2):
    with torch.no_grad():
        a = model(tokens, z)
        b = model(tokens2, z)
    return (a - b).abs().amax(dim=(0, 2)), a.abs().max().item()  # (N,), scale


@pytest.mark.parametrize("cut", [0, 13, 38])
def test_causality(cut):
    cfg = LTMConfig.from_name("ltm-tiny")
    model = make_model(cfg, random_published_sd(cfg, 31))
    tokens, z = rand_inputs(cfg, 2, 40, 31)
    tokens2 = tokens.clone()
    tokens2[:, cut + 1 :] = (tokens[:, cut + 1 :] + 1 + torch.arange(40 - cut - 1)) % cfg.vocab_size
    change, scale = _pos_change(model, tokens, z, tokens2)
    leaked = (change[: cut + 1] > 1e-12 * scale).nonzero().flatten().tolist()
    assert not leaked, f"positions {leaked} changed when only tokens after {cut} changed: {change[: cut + 1]}"
    assert (change[cut + 1 :] > 1e-6 * scale).all(), "later positions should see their own changed tokens"


def _affected_positions(cfg, W, N, m, seed):
    model = make_model(cfg, random_published_sd(cfg, seed))
    tokens, z = rand_inputs(cfg, 2, N, seed)
    tokens2 = tokens.clone()
    tokens2[:, m] = (tokens[:, m] + 7) % cfg.vocab_size
    change, scale = _pos_change(model, tokens, z, tokens2)
    changed = change > 1e-8 * scale
    unchanged = change <= 1e-12 * scale
    ambiguous = ~(changed | unchanged)
    assert not ambiguous.any(), f"positions {ambiguous.nonzero().flatten().tolist()} changed by a tiny amount"
    return set(changed.nonzero().flatten().tolist())


@pytest.mark.parametrize("W", [1, 5, 16])
@pytest.mark.parametrize("m", [0, 3, 11, 23])
def test_sliding_window_one_layer(W, m):
    """One layer: changing token m changes exactly positions m .. m+W-1 (so position n depends on
    token n-W+1 but not on token n-W)."""
    cfg = LTMConfig.from_name("ltm-tiny", n_layer=1, n_z=8, window_size=W)
    N = 24
    got = _affected_positions(cfg, W, N, m, seed=40 + W)
    want = set(range(m, min(m + W, N)))
    assert got == want, (
        f"W={W}, changed token {m}: positions affected {sorted(got)}, expected {sorted(want)}; "
        f"unexpected {sorted(got - want)}, missing {sorted(want - got)}"
    )


@pytest.mark.parametrize("W", [1, 4])
def test_sliding_window_receptive_field_grows_per_layer(W):
    """L layers: token m reaches exactly positions m .. m + L*(W-1)."""
    cfg = LTMConfig.from_name("ltm-tiny", n_layer=3, n_z=12, window_size=W)
    N, m = 30, 6
    got = _affected_positions(cfg, W, N, m, seed=50 + W)
    want = set(range(m, min(m + 3 * (W - 1) + 1, N)))
    assert got == want, f"W={W}: affected {sorted(got)}, expected {sorted(want)}"


# ----------------------------------------------------------------------------------------------
# Latents: each layer uses exactly its own block of the flat layout
# ----------------------------------------------------------------------------------------------
def _logit_change_from_latent(model, tokens, z, flat_idx):
    z2 = z.clone()
    z2[:, flat_idx] += torch.linspace(-1, 1, z.shape[-1], dtype=z.dtype)
    with torch.no_grad():
        a = model(tokens, z)
        b = model(tokens, z2)
    return (a - b).abs().max().item() / a.abs().max().item()


def test_latents_of_each_layer_matter_and_only_through_that_layer():
    cfg = LTMConfig.from_name("ltm-tiny", n_layer=3, n_z=9, window_size=6)
    L, nzpl = cfg.n_layer, cfg.n_z_per_layer
    sd = random_published_sd(cfg, 61)
    tokens, z = rand_inputs(cfg, 2, 19, 61)
    model = make_model(cfg, sd)
    for i in range(L):
        for j in range(nzpl):
            c = _logit_change_from_latent(model, tokens, z, i * nzpl + j)
            assert c > 1e-6, f"latent {j} of layer {i} (flat {i * nzpl + j}) has no effect on the logits ({c:.3g})"

    for i in range(L):
        sd_i = dict(sd)
        sd_i[f"layers.{i}.cross_attention.wo.weight"] = torch.zeros_like(sd[f"layers.{i}.cross_attention.wo.weight"])
        model_i = make_model(cfg, sd_i)
        for blk in range(L):
            for j in range(nzpl):
                flat = blk * nzpl + j
                c = _logit_change_from_latent(model_i, tokens, z, flat)
                if blk == i:
                    assert c <= 1e-13, (
                        f"layer {i} cross-attn output zeroed, yet latent flat {flat} (layer {i}) "
                        f"changes logits by {c:.3g}: it is used by another layer"
                    )
                else:
                    assert c > 1e-6, f"layer {i} zeroed: latent flat {flat} (layer {blk}) stopped mattering ({c:.3g})"


def test_z_layouts_give_identical_logits():
    cfg = LTMConfig.from_name("ltm-tiny", n_layer=3, n_z=12)
    model = make_model(cfg, random_published_sd(cfg, 71))
    tokens, z = rand_inputs(cfg, 3, 27, 71)
    with torch.no_grad():
        flat = model(tokens, z)
        layered = model(tokens, z.view(3, cfg.n_layer, cfg.n_z_per_layer, cfg.d_model))
    assert torch.equal(flat, layered), first_mismatch(flat, layered, 0.0)
    # a permuted 4-D layout must NOT give the same answer (the 4-D form is a view, not a reinterpretation)
    wrong = z.view(3, cfg.n_z_per_layer, cfg.n_layer, cfg.d_model).transpose(1, 2)
    with torch.no_grad():
        other = model(tokens, wrong)
    assert not torch.allclose(flat, other)


def test_non_contiguous_inputs():
    cfg = LTMConfig.from_name("ltm-tiny")
    model = make_model(cfg, random_published_sd(cfg, 72))
    tokens, z = rand_inputs(cfg, 2, 60, 72)
    tok_nc = tokens[:, ::2]
    z_nc = z.transpose(1, 2).contiguous().transpose(1, 2)
    assert not tok_nc.is_contiguous() and not z_nc.is_contiguous()
    with torch.no_grad():
        a = model(tok_nc, z_nc)
        b = model(tok_nc.contiguous(), z_nc.contiguous())
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12 * b.abs().max().item())


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def _bad_cases():
    cfg = LTMConfig.from_name("ltm-tiny")
    B, N, V, nz, d = 2, 10, cfg.vocab_size, cfg.n_z, cfg.d_model
    tok = torch.randint(0, V, (B, N), generator=torch.Generator().manual_seed(0))
    z = torch.randn(B, nz, d, generator=torch.Generator().manual_seed(0))

    def with_tok(idx, val):
        t = tok.clone()
        t[idx] = val
        return t

    def with_z(val):
        zz = z.clone()
        zz[1, 3, 5] = val
        return zz

    return [
        ("tokens-float", tok.float(), z, "tokens"),
        ("tokens-1d", tok[0], z, "tokens"),
        ("tokens-3d", tok[..., None], z, "tokens"),
        ("tokens-id-eq-vocab", with_tok((1, 4), V), z, "tokens"),
        ("tokens-id-negative", with_tok((0, 0), -1), z, "tokens"),
        ("tokens-too-long", torch.zeros(B, cfg.max_seq_len + 1, dtype=torch.long), z, "tokens"),
        ("z-too-many-latents", tok, torch.randn(B, nz + 1, d), "z"),
        ("z-too-few-latents", tok, torch.randn(B, nz - 1, d), "z"),
        ("z-wrong-width", tok, torch.randn(B, nz, d + 1), "z"),
        ("z-2d", tok, torch.randn(nz, d), "z"),
        ("z-4d-wrong-layers", tok, torch.randn(B, cfg.n_layer + 1, nz // cfg.n_layer, d), "z"),
        ("z-4d-wrong-per-layer", tok, torch.randn(B, cfg.n_layer, nz // cfg.n_layer + 1, d), "z"),
        ("z-nan", tok, with_z(float("nan")), "z"),
        ("z-inf", tok, with_z(float("inf")), "z"),
        ("z-neg-inf", tok, with_z(float("-inf")), "z"),
        ("z-batch-mismatch", tok, torch.randn(B + 1, nz, d), "z"),
        ("z-int", tok, torch.zeros(B, nz, d, dtype=torch.long), "z"),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("name,tokens,z,arg", BAD, ids=[c[0] for c in BAD])
def test_bad_input_names_the_argument(name, tokens, z, arg):
    cfg = LTMConfig.from_name("ltm-tiny")
    model = LTMDecoder(cfg, backend="eager")
    with pytest.raises((ValueError, TypeError)) as info:
        with torch.no_grad():
            model(tokens, z)
    msg = str(info.value)
    print(f"{name}: {type(info.value).__name__}: {msg}")
    assert re.search(rf"\b{arg}\b", msg), f"{name}: message does not name '{arg}': {msg!r}"


def _bad_elbo_cases():
    cfg = LTMConfig.from_name("ltm-tiny")
    B, N, V, nz, d = 2, 10, cfg.vocab_size, cfg.n_z, cfg.d_model
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, V, (B, N), generator=g)
    tgt = torch.randint(0, V, (B, N), generator=g)
    mu = torch.randn(B, nz, d, generator=g)
    lv = torch.full((B, nz, d), -3.0)
    eps = torch.randn(B, nz, d, generator=g)
    bad_tgt = tgt.clone()
    bad_tgt[0, 2] = V
    neg_tgt = tgt.clone()
    neg_tgt[1, 1] = -2
    lv_nan = lv.clone()
    lv_nan[0, 0, 0] = float("nan")
    return [
        ("targets-wrong-shape", (tok, tgt[:, :-1], mu, lv, eps), "targets"),
        ("targets-id-eq-vocab", (tok, bad_tgt, mu, lv, eps), "targets"),
        ("targets-minus-two", (tok, neg_tgt, mu, lv, eps), "targets"),
        ("mu-wrong-shape", (tok, tgt, mu[:, :-1], lv, eps), "mu"),
        ("logvar-nan", (tok, tgt, mu, lv_nan, eps), "logvar"),
        ("noise-wrong-shape", (tok, tgt, mu, lv, eps[:, :, :-1]), "noise"),
    ]


BAD_ELBO = _bad_elbo_cases()


@pytest.mark.parametrize("name,args,arg", BAD_ELBO, ids=[c[0] for c in BAD_ELBO])
def test_elbo_terms_bad_input_names_the_argument(name, args, arg):
    model = LTMDecoder(LTMConfig.from_name("ltm-tiny"), backend="eager")
    with pytest.raises((ValueError, TypeError)) as info:
        with torch.no_grad():
            model.elbo_terms(*args)
    msg = str(info.value)
    print(f"{name}: {type(info.value).__name__}: {msg}")
    assert re.search(rf"\b{arg}\b", msg), f"{name}: message does not name '{arg}': {msg!r}"
