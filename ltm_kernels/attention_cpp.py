"""self_attention_cpp / latent_attention_cpp: the model's two attention ops as C++ CPU kernels, RoPE inside.

For q (B, H, N, hd), k, v (B, H, M, hd) and RoPE tables of adjacent pairs (rows: positions, hd/2 columns):

    rope(x)[2i]   = x[2i] cos_i - x[2i+1] sin_i,     rope(x)[2i+1] = x[2i] sin_i + x[2i+1] cos_i
    S   = rope(q) rope(k)^T / sqrt(hd)                                         (N, M) per (batch, head)
    self-attention (M = N, one table for q and k): S[i, j] = -inf unless i - window < j <= i
    latent attention (separate tables for q and k, v unrotated): no mask
    P   = softmax(S) over keys,  out = P v,  lse = logsumexp(S) over keys       (saved for the backward)

    backward, with dO the upstream gradient, P recomputed as exp(S - lse):
    dV = P^T dO,  dP = dO v^T,  dS = P (dP - delta) with delta = rowsum(dO out)
    dq = rope^-1(dS rope(k) / sqrt(hd)),  dk = rope^-1(dS^T rope(q) / sqrt(hd))
    rope^-1(g)[2i] = g[2i] cos_i + g[2i+1] sin_i,  rope^-1(g)[2i+1] = -g[2i] sin_i + g[2i+1] cos_i

Why: the eager references (`reference.self_attention_ref`, `latent_attention_ref`) rotate q and k in
separate passes and call SDPA with a dense (N, N) window mask, so self-attention costs O(N^2 hd) whatever
the window, plus the mask. The C++ kernel (csrc/attention.cpp) walks the queries of each (batch, head) in
blocks of 64 and computes scores only against the keys the block can see, [i0 - window + 1, i1): O(N
(window + 64) hd) work, no N x N tensor; RoPE is applied once per (batch, head) into a buffer, and the
backward recomputes P from the saved lse instead of storing it. Latent attention is the same code with
all M keys for every query (also KV-cache decoding: N = 1, M = the cached window; M is not capped).

Ops (schemas in csrc/ltm_ops.cpp), CPU kernels only:
    torch.ops.ltm.self_attention(q, k, v, cos, sin, window) -> (out, lse)
    torch.ops.ltm.self_attention_backward(grad_out, q, k, v, cos, sin, out, lse, window) -> (dq, dk, dv)
    torch.ops.ltm.latent_attention(q, k, v, cos_q, sin_q, cos_k, sin_k) -> (out, lse)
    torch.ops.ltm.latent_attention_backward(grad_out, q, k, v, cos_q, sin_q, cos_k, sin_k, out, lse, q_grad=True)
        -> (dq, dk, dv)                                                          dq empty when not q_grad
lse is (B, H, N), the natural-log logsumexp of the scaled scores, float32 (float64 for float64 inputs).
The forward ops are differentiable in q, k, v (autograd registered here; the tables get no gradient, lse
none either); fake kernels make them traceable by torch.compile.

Dtypes: float32 and float64 compute in their own precision; bfloat16 and float16 are computed in float32
and rounded once on output. The tables may be any floating dtype and are converted to the compute dtype.
out, dq, dk, dv have the layout of q, k, v where those are dense (empty_like).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._extension import has_op, on_load, require_extension


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _forward_fake(q, k, v, *tables_and_window):
    B, H, N, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, N), dtype=_lse_dtype(q))


def _backward_fake(grad_out, q, k, v, *rest):
    q_grad = rest[-1] if isinstance(rest[-1], bool) else True  # latent_attention_backward's q_grad
    return torch.empty_like(q) if q_grad else q.new_empty((0,)), torch.empty_like(k), torch.empty_like(v)


def _self_attention_setup_context(ctx, inputs, output):
    q, k, v, cos, sin, window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, cos, sin, out, lse)
    ctx.window = window
    ctx.mark_non_differentiable(lse)  # a statistic for the backward: self_attention_cpp returns only out


def _self_attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, cos, sin, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.ltm.self_attention_backward(grad_out, q, k, v, cos, sin, out, lse, ctx.window)
    return dq, dk, dv, None, None, None


def _latent_attention_setup_context(ctx, inputs, output):
    out, lse = output
    ctx.save_for_backward(*inputs, out, lse)
    ctx.mark_non_differentiable(lse)  # a statistic for the backward: latent_attention_cpp returns only out


def _latent_attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, cos_q, sin_q, cos_k, sin_k, out, lse = ctx.saved_tensors
    q_grad = ctx.needs_input_grad[0]  # False for the inner loop's layer 0, whose query is computed once
    dq, dk, dv = torch.ops.ltm.latent_attention_backward(
        grad_out, q, k, v, cos_q, sin_q, cos_k, sin_k, out, lse, q_grad
    )
    return (dq if q_grad else None), dk, dv, None, None, None, None


@on_load
def _register() -> None:
    # register_fake also installs a Meta kernel: its presence means we (or a reload of us) already did all this.
    if has_op("self_attention", "meta"):
        return
    for name in ("self_attention", "latent_attention"):
        torch.library.register_fake(f"ltm::{name}")(_forward_fake)
        torch.library.register_fake(f"ltm::{name}_backward")(_backward_fake)
    torch.library.register_autograd(
        "ltm::self_attention", _self_attention_backward, setup_context=_self_attention_setup_context
    )
    torch.library.register_autograd(
        "ltm::latent_attention", _latent_attention_backward, setup_context=_latent_attention_setup_context
    )


def self_attention_cpp(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, window: int) -> Tensor:
    """`reference.self_attention_ref` through the C++ CPU kernel: causal sliding-window attention (query i
    sees keys i - window < j <= i; window >= N is plain causal) with RoPE on q and k.

    q, k, v (B, H, N, hd), hd even, one dtype among float32, float64, bfloat16, float16, any strides;
    cos, sin (N, hd/2). CPU tensors. Differentiable in q, k, v. Raises RuntimeError if the extension is not
    built, and on bad input (naming the argument).
    """
    require_extension("self_attention_cpp")
    return torch.ops.ltm.self_attention(q, k, v, cos, sin, window)[0]


def latent_attention_cpp(
    q: Tensor, k: Tensor, v: Tensor, cos_q: Tensor, sin_q: Tensor, cos_k: Tensor, sin_k: Tensor
) -> Tensor:
    """`reference.latent_attention_ref` through the C++ CPU kernel: every query attends to all M keys.

    q (B, H, N, hd), k, v (B, H, M, hd) with M >= 1 (any M), hd even, one dtype among float32, float64,
    bfloat16, float16, any strides; cos_q, sin_q (N, hd/2) at the query positions, cos_k, sin_k (M, hd/2) at
    the key positions (v is not rotated). CPU tensors. Differentiable in q, k, v. Raises RuntimeError if the
    extension is not built, and on bad input (naming the argument).
    """
    require_extension("latent_attention_cpp")
    return torch.ops.ltm.latent_attention(q, k, v, cos_q, sin_q, cos_k, sin_k)[0]
