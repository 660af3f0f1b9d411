"""The LTM decoder (DESIGN section 1): a pre-norm transformer whose every layer cross-attends to its own
latent thought vectors.

Module and parameter names follow the published implementation (`tok_embeddings`, `layers.{i}.attention.wq`,
...), so `state_dict()` is already in the published naming; `ltm.interop` only normalises variants.
Every hot op goes through `self.ops`, chosen once by `ltm.backends` (the one dispatch point).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ltm import backends
from ltm.config import LTMConfig


class RMSNorm(nn.Module):
    """Holds the norm weight (published name `*.weight`); the norm itself is the backend op `rms_norm`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, ops: backends.Ops) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Projections of one attention block; the attention itself is a backend op."""

    def __init__(self, cfg: LTMConfig):
        super().__init__()
        d = cfg.d_model
        self.n_head = cfg.n_head
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, d) -> (B, H, L, hd)
        return x.unflatten(-1, (self.n_head, -1)).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, L, hd) -> (B, L, d)
        return x.transpose(1, 2).flatten(-2)


class FeedForward(nn.Module):
    def __init__(self, cfg: LTMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, ops: backends.Ops) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LTMConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.cross_attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.cross_attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, z_layer, rope_tokens, rope_latents, window: int, ops: backends.Ops):
        sa = self.attention
        x_norm = self.attention_norm(x, ops)
        q, k, v = (sa.split_heads(w(x_norm)) for w in (sa.wq, sa.wk, sa.wv))
        h = x + sa.wo(sa.merge_heads(ops.self_attention(q, k, v, *rope_tokens, window)))

        ca = self.cross_attention
        q = ca.split_heads(ca.wq(self.cross_attention_norm(h, ops)))
        k, v = ca.split_heads(ca.wk(z_layer)), ca.split_heads(ca.wv(z_layer))
        h = h + ca.wo(ca.merge_heads(ops.latent_attention(q, k, v, *rope_tokens, *rope_latents)))

        return h + self.feed_forward(self.ffn_norm(h, ops), ops)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (len(positions), head_dim // 2); pair i turns at theta^(-2i / head_dim)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=dtype, device=positions.device) / head_dim)
    angles = positions.to(dtype)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


class LTMDecoder(nn.Module):
    """Latent Thought Model decoder. `backend`: "auto" | "eager" | "cpp" | "triton" (see ltm.backends)."""

    def __init__(self, cfg: LTMConfig, backend: str = "auto"):
        super().__init__()
        if not isinstance(cfg, LTMConfig):
            raise TypeError(f"cfg must be an LTMConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.backend = backends.check_backend(backend)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight  # tied, as published
        self._rope_cache: dict = {}
        self.reset_parameters()

    # ---------------------------------------------------------------- init and bookkeeping
    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None):
        """Published init: every Linear/Embedding ~ N(0, 0.02); attention `wo` and the MLP up projection
        re-drawn with std 0.02 / sqrt(2 n_layer) (residual-branch scaling); norm weights 1."""
        if self.tok_embeddings.weight.is_meta:
            return
        small = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                std = small if name.endswith(("wo.weight", "up_proj.weight")) else 0.02
                p.normal_(0.0, std, generator=generator)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def ops(self) -> backends.Ops:
        return backends.select_ops(self.backend, self.tok_embeddings.weight.device)

    def _rope(self, n_tokens: int, device: torch.device, dtype: torch.dtype):
        """RoPE tables for token positions 0..N-1 and the latent key positions; fp32 (fp64 for fp64 models)."""
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        key = (n_tokens, device, table_dtype)
        if key not in self._rope_cache:
            cfg = self.cfg
            tokens = torch.arange(n_tokens, device=device)
            latents = torch.arange(cfg.n_z_per_layer, device=device) * cfg.latent_stride
            self._rope_cache[key] = (rope_tables(tokens, cfg.head_dim, cfg.rope_theta, table_dtype),
                                     rope_tables(latents, cfg.head_dim, cfg.rope_theta, table_dtype))
        return self._rope_cache[key]

    def _apply(self, fn, recurse=True):
        self._rope_cache = {}  # tables follow the model's device
        return super()._apply(fn, recurse)

    # ---------------------------------------------------------------- input checks
    def check_tokens(self, tokens, name: str = "tokens", allow_ignore: bool = False) -> torch.Tensor:
        """Validate a (B, N) integer tensor of token ids (targets may use -1 = ignored)."""
        cfg = self.cfg
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, N), got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"{name} must have an integer dtype (int64), got {tokens.dtype}")
        if tokens.dim() != 2:
            raise ValueError(f"{name} must have shape (B, N), got {tuple(tokens.shape)}")
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"{name} must be non-empty, got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > cfg.max_seq_len:
            raise ValueError(f"{name} has {tokens.shape[1]} positions, longer than the context "
                             f"max_seq_len={cfg.max_seq_len}")
        device = self.tok_embeddings.weight.device
        if tokens.device != device:
            raise ValueError(f"{name} is on {tokens.device} but the model is on {device}")
        low = -1 if allow_ignore else 0
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < low or hi >= cfg.vocab_size:
            bad = lo if lo < low else hi
            allowed = f"[{low}, {cfg.vocab_size})" + (" (-1 = ignored)" if allow_ignore else "")
            raise ValueError(f"{name} contains id {bad}, outside {allowed}")
        return tokens.long()

    def check_latent(self, x, batch: int, name: str) -> torch.Tensor:
        """Validate a latent-shaped float tensor: (B, n_z, d) or (B, n_layer, n_z_per_layer, d) -> flat view."""
        cfg = self.cfg
        flat, layered = (batch, cfg.n_z, cfg.d_model), (batch, cfg.n_layer, cfg.n_z_per_layer, cfg.d_model)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {flat}, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if tuple(x.shape) not in (flat, layered):
            raise ValueError(f"{name} must have shape {flat} or {layered}, got {tuple(x.shape)}")
        device = self.tok_embeddings.weight.device
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the model is on {device}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains non-finite values (nan or inf)")
        return x.reshape(flat)

    # ---------------------------------------------------------------- forward
    def hidden_states(self, tokens: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (B, N, d), no input checks (inner loops validate once, up front)."""
        cfg, ops = self.cfg, self.ops
        x = self.tok_embeddings(tokens)
        z = z.to(x.dtype).view(z.shape[0], cfg.n_layer, cfg.n_z_per_layer, cfg.d_model)
        rope_tokens, rope_latents = self._rope(tokens.shape[1], x.device, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, z[:, i], rope_tokens, rope_latents, cfg.window_size, ops)
        return self.norm(x, ops)

    def forward(self, tokens: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Logits (B, N, vocab) for tokens (B, N) given latents z (B, n_z, d) or (B, n_layer, n_z/n_layer, d)."""
        tokens = self.check_tokens(tokens)
        z = self.check_latent(z, tokens.shape[0], "z")
        return self.output(self.hidden_states(tokens, z))

    def sequence_nll(self, tokens: torch.Tensor, targets: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Per-sequence summed cross-entropy (B,); targets == -1 are ignored. No input checks."""
        h = self.hidden_states(tokens, z)
        return self.ops.lm_head_nll(h, self.output.weight, targets)

    def elbo_terms(self, tokens, targets, mu, logvar, noise):
        """(nll, kl), each (B,): summed CE of x given z = mu + noise * exp(logvar / 2), and KL(q || N(0, I))."""
        from ltm.posterior import check_inputs, kl_divergence

        tokens, targets, mu, logvar, noise = check_inputs(self, tokens, targets, mu, logvar, noise)
        z = mu + noise * torch.exp(0.5 * logvar)
        return self.sequence_nll(tokens, targets, z), kl_divergence(mu, logvar)

    def infer_posterior(self, tokens, targets, steps=None, lr=0.34, schedule="cosine", weight_decay=0.01,
                        mu=None, logvar=None, noise=None, generator=None):
        """Fit q(z | x) = N(mu, diag exp(logvar)) with the fast inner loop (DESIGN section 2)."""
        from ltm.posterior import infer_posterior

        return infer_posterior(self, tokens, targets, steps=steps, lr=lr, schedule=schedule,
                               weight_decay=weight_decay, mu=mu, logvar=logvar, noise=noise, generator=generator)

    # ---------------------------------------------------------------- checkpoints
    def load_published_state_dict(self, state_dict) -> None:
        from ltm.interop import load_published_state_dict

        load_published_state_dict(self, state_dict)

    @classmethod
    def from_published_checkpoint(cls, path_or_dict, backend: str = "auto", **config_overrides) -> "LTMDecoder":
        from ltm.interop import from_published_checkpoint

        return from_published_checkpoint(cls, path_or_dict, backend=backend, **config_overrides)

    def save_pretrained(self, directory) -> None:
        from ltm.interop import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, backend: str = "auto", encoding: Optional[str] = None) -> "LTMDecoder":
        from ltm.interop import from_pretrained

        return from_pretrained(cls, directory, backend=backend, encoding=encoding)
