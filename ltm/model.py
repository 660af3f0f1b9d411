"""The LTM decoder (docs/model.md, 'The decoder'): a pre-norm transformer whose every layer cross-attends to its own
latent thought vectors.

Module and parameter names follow the published implementation (`tok_embeddings`, `layers.{i}.attention.wq`,
...), so `state_dict()` is already in the published naming; `ltm.interop` only normalises variants.
Every hot op goes through `self.ops`, chosen once by `ltm.backends` (the one dispatch point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ltm import backends
from ltm.backends import rope_tables
from ltm.config import LTMConfig
from ltm.latents import INNER_LOOP


class RMSNorm(nn.Module):
    """Holds the norm weight (published name `*.weight`); the norm itself is the backend op `rms_norm`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, ops: backends.Ops) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """One attention block: its projections around an attention that is a backend op, passed in as `attend`
    (sliding-window self-attention, latent cross-attention, or decoding against a KV cache)."""

    def __init__(self, cfg: LTMConfig):
        super().__init__()
        d = cfg.d_model
        self.n_head = cfg.n_head
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, attend, ops: backends.Ops) -> torch.Tensor:
        """(B, L, d) -> (B, L, d): q, k, v of x, `attend(q, k, v)` -> heads (B, H, L, hd), output projection."""
        return self.output(attend(*self.project_qkv(x, ops)), ops)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, d) -> (B, H, L, hd)
        return x.unflatten(-1, (self.n_head, -1)).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, L, hd) -> (B, L, d)
        return x.transpose(1, 2).flatten(-2)

    def project(self, x: torch.Tensor, linear: nn.Linear, ops: backends.Ops) -> torch.Tensor:
        """One projection, split into heads (B, H, L, hd)."""
        return self.split_heads(ops.linear(x, linear.weight))

    def project_qkv(self, x: torch.Tensor, ops: backends.Ops):
        """q, k, v (B, H, L, hd) of one input: one GEMM with the three weights stacked (three times the
        columns per call runs closer to the machine's matmul rate); the heads are views into its output."""
        qkv = ops.linear(x, torch.cat((self.wq.weight, self.wk.weight, self.wv.weight)))
        return tuple(self.split_heads(t) for t in qkv.chunk(3, dim=-1))

    def output(self, attn: torch.Tensor, ops: backends.Ops) -> torch.Tensor:
        """The output projection of the attention heads (B, H, L, hd) -> (B, L, d)."""
        return ops.linear(self.merge_heads(attn), self.wo.weight)


class FeedForward(nn.Module):
    def __init__(self, cfg: LTMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, ops: backends.Ops) -> torch.Tensor:
        gate, up = ops.linear(x, self.gate_proj.weight), ops.linear(x, self.up_proj.weight)
        return ops.linear(ops.swiglu(gate, up), self.down_proj.weight)


class DecoderLayer(nn.Module):
    """One pre-norm block: sliding-window self-attention, cross-attention to the layer's latents, SwiGLU MLP,
    each with a residual. The stages are separate methods because the inner loop computes layer 0's first
    two (which do not depend on z) once per loop, and KV-cache decoding attends against its cache."""

    def __init__(self, cfg: LTMConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.cross_attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.cross_attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, z_layer, rope_tokens, rope_latents, window: int, ops: backends.Ops):
        return self.after_self_attention(
            x,
            self.self_attention(x, rope_tokens, window, ops),
            self.latent_kv(z_layer, ops),
            rope_tokens,
            rope_latents,
            ops,
        )

    def self_attention(self, x, rope_tokens, window: int, ops: backends.Ops):
        """The self-attention branch (B, N, d) of the block's input x (B, N, d), before its residual."""
        return self.attention(
            self.attention_norm(x, ops), lambda q, k, v: ops.self_attention(q, k, v, *rope_tokens, window), ops
        )

    def latent_kv(self, z_layer: torch.Tensor, ops: backends.Ops):
        """Keys and values (B, H, n_z_per_layer, hd) of the layer's latents (B, n_z_per_layer, d)."""
        ca = self.cross_attention
        return ca.project(z_layer, ca.wk, ops), ca.project(z_layer, ca.wv, ops)

    def cross_attention_query(self, x, attended, ops: backends.Ops):
        """The residual h = x + attended (the self-attention branch), and the cross-attention query
        (h, q (B, H, N, hd))."""
        h_norm, h = ops.add_rms_norm(x, attended, self.cross_attention_norm.weight, self.cross_attention_norm.eps)
        return h, self.cross_attention.project(h_norm, self.cross_attention.wq, ops)

    def after_cross_attention_query(self, h, q, latent_kv, rope_queries, rope_latents, ops: backends.Ops):
        """Cross-attention to the layer's latents (k, v given) with its residual, then the SwiGLU MLP."""
        attn = ops.latent_attention(q, *latent_kv, *rope_queries, *rope_latents)
        h_norm, h = ops.add_rms_norm(h, self.cross_attention.output(attn, ops), self.ffn_norm.weight, self.ffn_norm.eps)
        return h + self.feed_forward(h_norm, ops)

    def after_self_attention(self, x, attended, latent_kv, rope_queries, rope_latents, ops: backends.Ops):
        """The rest of the block once the self-attention branch `attended` (B, N, d) is done (shared with
        KV-cache decoding)."""
        h, q = self.cross_attention_query(x, attended, ops)
        return self.after_cross_attention_query(h, q, latent_kv, rope_queries, rope_latents, ops)


@dataclass
class KVCache:
    """Decoding state of LTMDecoder.decode_step (see init_kv_cache)."""

    latent_kv: list  # per layer: (k, v) of its latents, each (B, H, n_z_per_layer, hd), RoPE not applied
    k: torch.Tensor  # (n_layer, B, H, S, hd): self-attention keys of the last S positions, RoPE not applied
    v: torch.Tensor  # (n_layer, B, H, S, hd)
    slot_pos: torch.Tensor  # (S,): the position each slot holds (-1: empty)
    max_len: int
    position: int = 0  # tokens consumed so far


class LTMDecoder(nn.Module):
    """Latent Thought Model decoder. `backend`: "auto" | "eager" | "cpp" | "triton" (see ltm.backends)."""

    def __init__(self, cfg: LTMConfig, backend: str = "auto"):
        super().__init__()
        if not isinstance(cfg, LTMConfig):
            raise TypeError(f"cfg must be an LTMConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self._backend = backends.check_backend(backend)
        self._ops = None
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight  # tied, as published
        self._rope_cache: dict = {}
        self.reset_parameters()

    # ---------------------------------------------------------------- init and bookkeeping
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
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
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str):
        self._backend = backends.check_backend(name)
        self._ops = None

    @property
    def ops(self) -> backends.Ops:
        """The op implementations for this backend on the model's device. Resolved once per device/backend
        and kept as a plain attribute, so torch.compile sees a constant instead of tracing the dispatcher."""
        if self._ops is None:
            self._ops = backends.select_ops(self._backend, self.tok_embeddings.weight.device)
        return self._ops

    def _rope(self, n_tokens: int, device: torch.device, dtype: torch.dtype):
        """RoPE tables for token positions 0..N-1 and the latent key positions; fp32 (fp64 for fp64 models)."""
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        key = (n_tokens, device, table_dtype)
        if key not in self._rope_cache:
            cfg = self.cfg
            tokens = torch.arange(n_tokens, device=device)
            latents = torch.arange(cfg.n_z_per_layer, device=device) * cfg.latent_stride
            self._rope_cache[key] = (
                rope_tables(tokens, cfg.head_dim, cfg.rope_theta, table_dtype),
                rope_tables(latents, cfg.head_dim, cfg.rope_theta, table_dtype),
            )
        return self._rope_cache[key]

    def _apply(self, fn, recurse=True):
        self._rope_cache, self._ops = {}, None  # tables and kernels follow the model's device
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
            raise ValueError(
                f"{name} has {tokens.shape[1]} positions, longer than the context max_seq_len={cfg.max_seq_len}"
            )
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
    def latent_free_prefix(self, tokens: torch.Tensor) -> tuple:
        """What the forward computes before anything depends on z: the embedding and layer 0 up to its
        cross-attention query, as (h, q). The inner loop computes it once per loop, not once per step, and
        under no_grad, so that no step differentiates into it (layer 0's query gets no gradient)."""
        ops, layer = self.ops, self.layers[0]
        x = self.tok_embeddings(tokens)
        rope_tokens, _ = self._rope(tokens.shape[1], x.device, x.dtype)
        return layer.cross_attention_query(x, layer.self_attention(x, rope_tokens, self.cfg.window_size, ops), ops)

    def hidden_states(self, tokens: torch.Tensor, z: torch.Tensor, prefix: tuple | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, N, d), no input checks (inner loops validate once, up front).
        `prefix`: `latent_free_prefix(tokens)` when the caller already has it."""
        cfg, ops = self.cfg, self.ops
        h, q = self.latent_free_prefix(tokens) if prefix is None else prefix
        z = z.to(h.dtype).view(z.shape[0], cfg.n_layer, cfg.n_z_per_layer, cfg.d_model)
        rope_tokens, rope_latents = self._rope(tokens.shape[1], h.device, h.dtype)
        first = self.layers[0]
        x = first.after_cross_attention_query(h, q, first.latent_kv(z[:, 0], ops), rope_tokens, rope_latents, ops)
        for i, layer in enumerate(self.layers[1:], start=1):
            x = layer(x, z[:, i], rope_tokens, rope_latents, cfg.window_size, ops)
        return self.norm(x, ops)

    def forward(self, tokens: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Logits (B, N, vocab) for tokens (B, N) given latents z (B, n_z, d) or (B, n_layer, n_z/n_layer, d)."""
        tokens = self.check_tokens(tokens)
        z = self.check_latent(z, tokens.shape[0], "z")
        return self.output(self.hidden_states(tokens, z))

    def sequence_nll(
        self, tokens: torch.Tensor, targets: torch.Tensor, z: torch.Tensor, prefix: tuple | None = None
    ) -> torch.Tensor:
        """Per-sequence summed cross-entropy (B,); targets == -1 are ignored. No input checks. `prefix`: as
        for hidden_states."""
        h = self.hidden_states(tokens, z, prefix)
        return self.ops.lm_head_nll(h, self.output.weight, targets)

    def elbo_terms(self, tokens, targets, mu, logvar, noise, check_finite=True):
        """(nll, kl), each (B,): summed CE of x given z = mu + noise * exp(logvar / 2), and KL(q || N(0, I)).
        `check_finite`: raise ltm.posterior.NonFiniteError on nan/inf results."""
        from ltm.posterior import elbo_terms

        return elbo_terms(self, tokens, targets, mu, logvar, noise, check_finite=check_finite)

    def infer_posterior(
        self,
        tokens,
        targets,
        steps=INNER_LOOP.steps,
        lr=INNER_LOOP.lr,
        schedule=INNER_LOOP.schedule,
        weight_decay=INNER_LOOP.weight_decay,
        mu=None,
        logvar=None,
        noise=None,
        generator=None,
        check_finite=True,
        final_nll=True,
    ):
        """Fit q(z | x) = N(mu, diag exp(logvar)) with the fast inner loop (docs/model.md, 'The inner loop').
        `check_finite`: raise ltm.posterior.NonFiniteError when the loop diverges (one check, after it).
        `final_nll`: False skips the forward that computes Posterior.nll at the fitted z (nll is then None)."""
        from ltm.posterior import infer_posterior

        return infer_posterior(
            self,
            tokens,
            targets,
            steps=steps,
            lr=lr,
            schedule=schedule,
            weight_decay=weight_decay,
            mu=mu,
            logvar=logvar,
            noise=noise,
            generator=generator,
            check_finite=check_finite,
            final_nll=final_nll,
        )

    # ---------------------------------------------------------------- KV-cache decoding (generation)
    # Each new token costs one small forward: the latents' keys/values are projected once per sequence, and
    # the self-attention keys/values of the last `window_size` positions live in a ring buffer (slot =
    # position % size). A query at position p attends to exactly the cached positions p-W+1..p, so the
    # backend's `latent_attention` op (unmasked, separate RoPE tables for queries and keys) computes it.
    def init_kv_cache(self, z: torch.Tensor, max_len: int) -> KVCache:
        """An empty cache for decoding up to `max_len` (<= max_seq_len) tokens given latents z (B, n_z, d)."""
        cfg = self.cfg
        if not isinstance(max_len, int) or not 0 < max_len <= cfg.max_seq_len:
            raise ValueError(f"max_len must be an int in [1, max_seq_len={cfg.max_seq_len}], got {max_len!r}")
        dtype, device = self.tok_embeddings.weight.dtype, self.tok_embeddings.weight.device
        if not isinstance(z, torch.Tensor) or z.dim() not in (3, 4):
            raise ValueError(
                f"z must be a tensor of shape (B, {cfg.n_z}, {cfg.d_model}) or (B, {cfg.n_layer}, "
                f"{cfg.n_z_per_layer}, {cfg.d_model}), got "
                f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}"
            )
        batch = z.shape[0]
        z = self.check_latent(z, batch, "z").to(dtype).view(batch, cfg.n_layer, cfg.n_z_per_layer, cfg.d_model)
        latent_kv = [layer.latent_kv(z[:, i], self.ops) for i, layer in enumerate(self.layers)]
        size = min(cfg.window_size, max_len)
        shape = (cfg.n_layer, batch, cfg.n_head, size, cfg.head_dim)
        return KVCache(
            latent_kv=latent_kv,
            k=torch.zeros(shape, dtype=dtype, device=device),
            v=torch.zeros(shape, dtype=dtype, device=device),
            slot_pos=torch.full((size,), -1, dtype=torch.long, device=device),
            max_len=max_len,
        )

    def decode_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, L, vocab) of `tokens` (B, L) at positions cache.position.. (given everything cached
        before); appends them to the cache. L > 1 after the first call runs token by token."""
        tokens = self.check_tokens(tokens)
        batch, n = tokens.shape
        if batch != cache.k.shape[1]:
            raise ValueError(f"tokens has batch {batch} but the cache was made for batch {cache.k.shape[1]}")
        if cache.position + n > cache.max_len:
            raise ValueError(
                f"tokens would take the cache to {cache.position + n} positions, beyond its max_len={cache.max_len}"
            )
        if cache.position > 0 and n > 1:
            return torch.cat([self.decode_step(tokens[:, i : i + 1], cache) for i in range(n)], dim=1)
        cfg, ops = self.cfg, self.ops
        x = self.tok_embeddings(tokens)
        (cos, sin), rope_latents = self._rope(cache.max_len, x.device, x.dtype)
        p, size = cache.position, cache.k.shape[3]
        cos_q, sin_q = cos[p : p + n], sin[p : p + n]
        # Slots written by this call: the last `size` of its positions.
        new_pos = torch.arange(max(p, p + n - size), p + n, device=x.device)
        slots = new_pos % size
        cache.slot_pos[slots] = new_pos
        for i, layer in enumerate(self.layers):

            def attend(q, k, v, i=i):
                cache.k[i][:, :, slots], cache.v[i][:, :, slots] = k[:, :, -len(slots) :], v[:, :, -len(slots) :]
                if p == 0:  # prefill from position 0: exactly the full forward's attention
                    return ops.self_attention(q, k, v, cos_q, sin_q, cfg.window_size)
                valid = min(p + 1, size)  # one token: all valid slots hold exactly its window
                kp = cache.slot_pos[:valid]
                return backends.decode_attention(ops, valid)(
                    q, cache.k[i][:, :, :valid], cache.v[i][:, :, :valid], cos_q, sin_q, cos[kp], sin[kp]
                )

            attended = layer.attention(layer.attention_norm(x, ops), attend, ops)
            x = layer.after_self_attention(x, attended, cache.latent_kv[i], (cos_q, sin_q), rope_latents, ops)
        cache.position = p + n
        return self.output(self.norm(x, ops))

    # ---------------------------------------------------------------- checkpoints
    def load_published_state_dict(self, state_dict) -> None:
        from ltm.interop import load_published_state_dict

        load_published_state_dict(self, state_dict)

    @classmethod
    def from_published_checkpoint(cls, path_or_dict, backend: str = "auto", **config_overrides) -> LTMDecoder:
        from ltm.interop import from_published_checkpoint

        return from_published_checkpoint(cls, path_or_dict, backend=backend, **config_overrides)

    def save_pretrained(self, directory) -> None:
        from ltm.interop import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, backend: str = "auto", encoding: str | None = None, **hub_options):
        from ltm.interop import from_pretrained  # directory: a save_pretrained folder, or a Hub repo id (ltm.hub)

        return from_pretrained(cls, directory, backend=backend, encoding=encoding, **hub_options)

    def push_to_hub(self, repo_id: str, **hub_options):
        from ltm.hub import push_to_hub

        return push_to_hub(self, repo_id, **hub_options)
