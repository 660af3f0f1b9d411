"""latent_attention_triton: tokens cross-attend to the M (<= 64) latent vectors of their layer, RoPE inside.

For queries q (B, H, N, hd), latent keys and values k, v (B, H, M, hd), and RoPE tables cos_q, sin_q
(N, hd/2) at the token positions and cos_k, sin_k (M, hd/2) at the latent positions:

    rope(x)[2i]   = x[2i] cos_i - x[2i+1] sin_i          adjacent pairs (2i, 2i+1), as the published model
    rope(x)[2i+1] = x[2i] sin_i + x[2i+1] cos_i
    S   = scale * rope(q) @ rope(k)^T,  scale = 1/sqrt(hd)        (B, H, N, M), no mask
    P   = softmax(S) over the M latents;  out = P @ v                               (B, H, N, hd)

    backward, with dO the upstream gradient and delta = rowsum(dO * out):
    dP  = dO @ v^T;   dS = P * (dP - delta)
    dv  = P^T @ dO                     summed over the N tokens
    dq  = rope^-1(scale * dS @ rope(k)),   dk = rope^-1(scale * dS^T @ rope(q))
    rope^-1(d)[2i] = d[2i] cos_i + d[2i+1] sin_i,   rope^-1(d)[2i+1] = -d[2i] sin_i + d[2i+1] cos_i

Why fuse: M is tiny (n_z_per_layer: 4 to 8 in the presets), so eager attention is pure memory traffic:
the two RoPE passes over q and k, the (B, H, N, M) scores, and SDPA's own passes. Here all M keys and
values of a (batch, head) fit on chip at once, so one program computes a block of BLOCK_N queries with a
plain (not online) softmax: the forward reads q once and writes out once (plus 4 bytes of logsumexp per
query); the backward reads q, out, dO once and writes dq once. RoPE is applied to the loaded tiles (even
and odd columns are loaded as two (rows, hd/2) tiles, so the rotation is elementwise and S is the sum of
two dots), never written back. The eager math is `reference.latent_attention_ref`.

Softmax: fp32, exp2 with log2(e) folded into the scale; the saved `lse` is in base 2 (log2 of the row's
sum of exp2), one fp32 per query, so the backward recomputes P = exp2(S * scale * log2(e) - lse).
Low precision: the rotated q, k and P are rounded to the input dtype before the tensor-core dots (as the
eager reference rounds rope(q), rope(k), and flash attention rounds P); accumulation is fp32. For fp32
inputs the dots use `input_precision="ieee"` (not TF32), so fp32 results match an fp32 reference.

dK, dV are sums over all N tokens of a (batch, head). Deterministically, without atomics: the backward
grid is (n_chunks x B*H) programs; a program owns a contiguous chunk of query blocks of one (batch,
head), computes their dq directly, and keeps dK, dV partial sums for all M keys in registers over its
chunk. With one chunk per (batch, head) (enough programs already: B*H >= 2 x SM count, e.g. 512 for
ltm-l at batch 64) it writes dk, dv directly; otherwise it writes an fp32 partial (B, H, n_chunks, M, hd)
that a torch `.sum` reduces in a fixed order. n_chunks is chosen from N and the SM count so that about two
programs per SM run (`_num_chunks`); the same device and shape always give the same chunks, hence
bit-identical gradients run to run.

Launch configurations are fixed per (N, M, hd, dtype) (`_fwd_config`, `_bwd_config`: chosen from ptxas's register
and spill report for sm_90), not autotuned: no benchmarking on first use, no host synchronisation ever, so
the op can be captured in a CUDA graph at any time (also with a shape seen first during capture, e.g.
N = 1 for KV-cache decoding), and the chunking, hence the gradients' bits, never depends on timing.

Registered as `torch.ops.ltm_triton.latent_attention` (-> out, lse) and `latent_attention_backward`
(-> dq, dk, dv), custom ops with fake kernels and autograd, so torch.compile traces through them (no
graph break) and CUDA graphs capture them. Only q, k, v get gradients; the RoPE tables get None.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._triton import INTERPRET, TRITON_AVAILABLE, check_triton_tensor, fp32_tables, sm_count, tl, triton

MAX_LATENTS = 64  # all keys of a (batch, head) are one on-chip tile
HEAD_DIMS = (32, 64, 128)
LOG2E = 1.4426950408889634

# ----------------------------------------------------------------------------------------------- kernels
if TRITON_AVAILABLE:

    @triton.jit
    def _load_rope(x_ptr, stride_row, stride_d, cos_ptr, sin_ptr, rows, row_mask, HALF: tl.constexpr):
        """Rows `rows` of x (rows, hd) as RoPE-rotated even and odd halves, (rows, HALF) fp32 each, and the
        (rows, HALF) cos and sin used (tables contiguous (rows, HALF) fp32)."""
        cols = tl.arange(0, HALF)
        mask = row_mask[:, None]
        even = x_ptr + rows[:, None] * stride_row + (2 * cols[None, :]) * stride_d
        x_e = tl.load(even, mask=mask, other=0.0).to(tl.float32)
        x_o = tl.load(even + stride_d, mask=mask, other=0.0).to(tl.float32)
        tab = rows[:, None] * HALF + cols[None, :]
        c = tl.load(cos_ptr + tab, mask=mask, other=0.0)
        s = tl.load(sin_ptr + tab, mask=mask, other=0.0)
        return x_e * c - x_o * s, x_e * s + x_o * c, c, s

    @triton.jit
    def _store_unrope(ptr, stride_row, stride_d, rows, row_mask, d_e, d_o, c, s, HALF: tl.constexpr):
        """Store rope^-1(d) for the gradient d = (d_e, d_o) of rotated rows: the transpose of the rotation."""
        cols = tl.arange(0, HALF)
        mask = row_mask[:, None]
        even = ptr + rows[:, None] * stride_row + (2 * cols[None, :]) * stride_d
        tl.store(even, (d_e * c + d_o * s).to(ptr.dtype.element_ty), mask=mask)
        tl.store(even + stride_d, (d_o * c - d_e * s).to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _latent_attn_fwd_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        cq_ptr,
        sq_ptr,
        ck_ptr,
        sk_ptr,
        o_ptr,
        lse_ptr,
        stride_qb,
        stride_qh,
        stride_qn,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_km,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vm,
        stride_vd,
        stride_ob,
        stride_oh,
        stride_on,
        stride_od,
        H,
        N,
        M,
        n_blocks,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Queries [blk * BLOCK_N, ...) of one (batch, head): out and the base-2 logsumexp of each row."""
        HALF: tl.constexpr = HEAD_DIM // 2
        pid = tl.program_id(0)
        blk = pid % n_blocks  # query blocks of one (batch, head) are neighbours: its K, V stay in L2
        bh = pid // n_blocks
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        dtype = q_ptr.dtype.element_ty

        keys = tl.arange(0, BLOCK_M)
        key_mask = keys < M
        k_e, k_o, _, _ = _load_rope(
            k_ptr + b * stride_kb + h * stride_kh, stride_km, stride_kd, ck_ptr, sk_ptr, keys, key_mask, HALF
        )
        dims = tl.arange(0, HEAD_DIM)
        v = tl.load(
            v_ptr + b * stride_vb + h * stride_vh + keys[:, None] * stride_vm + dims[None, :] * stride_vd,
            mask=key_mask[:, None],
            other=0.0,
        )

        rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        q_e, q_o, _, _ = _load_rope(
            q_ptr + b * stride_qb + h * stride_qh, stride_qn, stride_qd, cq_ptr, sq_ptr, rows, row_mask, HALF
        )
        s = tl.dot(q_e.to(dtype), tl.trans(k_e.to(dtype)), input_precision=PRECISION)
        s = tl.dot(q_o.to(dtype), tl.trans(k_o.to(dtype)), s, input_precision=PRECISION)
        s = tl.where(key_mask[None, :], s * qk_scale, float("-inf"))  # base-2 logits; padded keys: -inf
        m = tl.max(s, axis=1)
        p = tl.exp2(s - m[:, None])
        denom = tl.sum(p, axis=1)
        acc = tl.dot(p.to(dtype), v, input_precision=PRECISION)
        out = acc / denom[:, None]
        tl.store(
            o_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + dims[None, :] * stride_od,
            out.to(o_ptr.dtype.element_ty),
            mask=row_mask[:, None],
        )
        tl.store(lse_ptr + bh.to(tl.int64) * N + rows, m + tl.log2(denom), mask=row_mask)

    @triton.jit
    def _latent_attn_bwd_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        cq_ptr,
        sq_ptr,
        ck_ptr,
        sk_ptr,
        o_ptr,
        do_ptr,
        lse_ptr,
        dq_ptr,
        dk_ptr,
        dv_ptr,
        stride_qb,
        stride_qh,
        stride_qn,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_km,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vm,
        stride_vd,
        stride_ob,
        stride_oh,
        stride_on,
        stride_od,
        stride_dob,
        stride_doh,
        stride_don,
        stride_dod,
        stride_dqb,
        stride_dqh,
        stride_dqn,
        stride_dqd,
        stride_dkb,
        stride_dkh,
        stride_dkc,
        stride_dkm,
        stride_dkd,
        stride_dvb,
        stride_dvh,
        stride_dvc,
        stride_dvm,
        stride_dvd,
        H,
        N,
        M,
        n_blocks,
        n_chunks,
        blocks_per_chunk,
        qk_scale,
        sm_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Query blocks [chunk * blocks_per_chunk, ...) of one (batch, head): their dq, and this chunk's
        dk, dv sums over its tokens, stored at index `chunk` of dk_ptr / dv_ptr (fp32 partials, or dk, dv
        themselves when there is one chunk)."""
        HALF: tl.constexpr = HEAD_DIM // 2
        pid = tl.program_id(0)
        chunk = pid % n_chunks
        bh = pid // n_chunks
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        dtype = q_ptr.dtype.element_ty

        keys = tl.arange(0, BLOCK_M)
        key_mask = keys < M
        k_e, k_o, _, _ = _load_rope(
            k_ptr + b * stride_kb + h * stride_kh, stride_km, stride_kd, ck_ptr, sk_ptr, keys, key_mask, HALF
        )
        k_e = k_e.to(dtype)
        k_o = k_o.to(dtype)
        dims = tl.arange(0, HEAD_DIM)
        v = tl.load(
            v_ptr + b * stride_vb + h * stride_vh + keys[:, None] * stride_vm + dims[None, :] * stride_vd,
            mask=key_mask[:, None],
            other=0.0,
        )

        q_base = q_ptr + b * stride_qb + h * stride_qh
        o_base = o_ptr + b * stride_ob + h * stride_oh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        dq_base = dq_ptr + b * stride_dqb + h * stride_dqh
        lse_base = lse_ptr + bh.to(tl.int64) * N

        dk_e = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)  # gradient w.r.t. rope(k), even / odd halves
        dk_o = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
        dv = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        first = chunk * blocks_per_chunk
        for blk in range(first, tl.minimum(first + blocks_per_chunk, n_blocks)):
            rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
            row_mask = rows < N
            q_e, q_o, cq, sq = _load_rope(q_base, stride_qn, stride_qd, cq_ptr, sq_ptr, rows, row_mask, HALF)
            q_e = q_e.to(dtype)
            q_o = q_o.to(dtype)
            s = tl.dot(q_e, tl.trans(k_e), input_precision=PRECISION)
            s = tl.dot(q_o, tl.trans(k_o), s, input_precision=PRECISION)
            lse = tl.load(lse_base + rows, mask=row_mask, other=0.0)
            p = tl.exp2(s * qk_scale - lse[:, None])
            p = tl.where(key_mask[None, :] & row_mask[:, None], p, 0.0)

            do = tl.load(
                do_base + rows[:, None] * stride_don + dims[None, :] * stride_dod, mask=row_mask[:, None], other=0.0
            )
            o = tl.load(
                o_base + rows[:, None] * stride_on + dims[None, :] * stride_od, mask=row_mask[:, None], other=0.0
            )
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = (p * (dp - delta[:, None])).to(dtype)  # dS / scale; the scale is applied below, in fp32

            dv = tl.dot(tl.trans(p.to(dtype)), do, dv, input_precision=PRECISION)
            dk_e = tl.dot(tl.trans(ds), q_e, dk_e, input_precision=PRECISION)
            dk_o = tl.dot(tl.trans(ds), q_o, dk_o, input_precision=PRECISION)
            dq_e = tl.dot(ds, k_e, input_precision=PRECISION) * sm_scale
            dq_o = tl.dot(ds, k_o, input_precision=PRECISION) * sm_scale
            _store_unrope(dq_base, stride_dqn, stride_dqd, rows, row_mask, dq_e, dq_o, cq, sq, HALF)

        c64 = chunk.to(tl.int64)
        tab = keys[:, None] * HALF + tl.arange(0, HALF)[None, :]  # reloaded, not held in registers over the loop
        ck = tl.load(ck_ptr + tab, mask=key_mask[:, None], other=0.0)
        sk = tl.load(sk_ptr + tab, mask=key_mask[:, None], other=0.0)
        _store_unrope(
            dk_ptr + b * stride_dkb + h * stride_dkh + c64 * stride_dkc,
            stride_dkm,
            stride_dkd,
            keys,
            key_mask,
            dk_e * sm_scale,
            dk_o * sm_scale,
            ck,
            sk,
            HALF,
        )
        tl.store(
            dv_ptr
            + b * stride_dvb
            + h * stride_dvh
            + c64 * stride_dvc
            + keys[:, None] * stride_dvm
            + dims[None, :] * stride_dvd,
            dv.to(dv_ptr.dtype.element_ty),
            mask=key_mask[:, None],
        )


# --------------------------------------------------------------------------------------------- launchers
def _block_m(M: int) -> int:
    return max(16, triton.next_power_of_2(M))  # tl.dot needs every dimension >= 16


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" only names the default: unused for half types


def _fwd_config(N: int, hd: int, dtype: torch.dtype) -> dict:
    """Queries per program and warps. Memory-bound (M <= 64 keys: ~4 M flops per byte of q), so large
    blocks, which load the (batch, head)'s K, V fewer times; small blocks for short N (decoding: N = 1).
    fp32 (exact "ieee" dots, on FMA units rather than tensor cores) needs smaller tiles not to spill."""
    if INTERPRET:
        return dict(BLOCK_N=16, num_warps=4)
    if dtype == torch.float32:
        block, warps = 32, 8
    else:
        block = 128 if hd <= 64 else 64
        warps = 8 if block * hd >= 8192 else 4
    return dict(BLOCK_N=min(block, max(16, triton.next_power_of_2(N))), num_warps=warps)


def _bwd_config(N: int, M: int, hd: int, dtype: torch.dtype) -> dict:
    """The backward holds K, V and the fp32 dK, dV accumulators of BLOCK_M keys besides its query block, so
    registers are tight: for fp16/bf16 these are the configurations that ptxas (sm_90) compiles without
    spilling, or nearly (hd 64 with 17..32 keys: 56 bytes; hd 128 with 64 keys: 32). Two pipeline stages:
    three spill at 64 keys. fp32 (FMA dots) gets the smallest tile; it still spills at hd 128."""
    if INTERPRET:
        return dict(BLOCK_N=16, num_warps=4, num_stages=1)
    block, warps = 64, 8
    if dtype == torch.float32:
        block = 16
    elif hd == 128 or (hd == 64 and _block_m(M) == 32):
        block, warps = 32, 8 if hd == 128 else 4
    return dict(BLOCK_N=min(block, max(16, triton.next_power_of_2(N))), num_warps=warps, num_stages=2)


def _num_chunks(n_blocks: int, bh: int, sms: int, waves: int = 2) -> tuple[int, int]:
    """(n_chunks, blocks_per_chunk) for the backward: about `waves` programs per SM over the bh (batch,
    head) pairs, each chunk a contiguous run of query blocks; one chunk when bh alone fills the GPU."""
    want = min(n_blocks, max(1, triton.cdiv(waves * sms, bh)))
    per_chunk = triton.cdiv(n_blocks, want)
    return triton.cdiv(n_blocks, per_chunk), per_chunk


def _latent_attention_fwd(q, k, v, cos_q, sin_q, cos_k, sin_k) -> tuple[Tensor, Tensor]:
    B, H, N, hd = q.shape
    M = k.shape[2]
    cos_q, sin_q, cos_k, sin_k = fp32_tables(cos_q, sin_q, cos_k, sin_k)
    out = torch.empty_like(q)  # q's layout when dense: a (B, N, H, hd) view in gives one out
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    cfg = _fwd_config(N, hd, q.dtype)
    n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    _latent_attn_fwd_kernel[(n_blocks * B * H,)](
        q,
        k,
        v,
        cos_q,
        sin_q,
        cos_k,
        sin_k,
        out,
        lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        H,
        N,
        M,
        n_blocks,
        LOG2E / math.sqrt(hd),
        HEAD_DIM=hd,
        BLOCK_M=_block_m(M),
        PRECISION=_precision(q.dtype),
        **cfg,
    )
    return out, lse


def _latent_attention_bwd(grad_out, q, k, v, cos_q, sin_q, cos_k, sin_k, out, lse):
    B, H, N, hd = q.shape
    M = k.shape[2]
    cos_q, sin_q, cos_k, sin_k = fp32_tables(cos_q, sin_q, cos_k, sin_k)
    sms = sm_count(q.device.index) if q.is_cuda else 2
    cfg = _bwd_config(N, M, hd, q.dtype)
    n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    n_chunks, per_chunk = _num_chunks(n_blocks, B * H, sms)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if n_chunks == 1:  # the program's sums are the gradients: write them directly (chunk stride unused)
        dk_part, dv_part = dk, dv
        dk_strides = (dk.stride(0), dk.stride(1), 0, dk.stride(2), dk.stride(3))
        dv_strides = (dv.stride(0), dv.stride(1), 0, dv.stride(2), dv.stride(3))
    else:
        dk_part = torch.empty((B, H, n_chunks, M, hd), dtype=torch.float32, device=q.device)
        dv_part = torch.empty_like(dk_part)
        dk_strides, dv_strides = dk_part.stride(), dv_part.stride()
    sm_scale = 1.0 / math.sqrt(hd)
    _latent_attn_bwd_kernel[(n_chunks * B * H,)](
        q,
        k,
        v,
        cos_q,
        sin_q,
        cos_k,
        sin_k,
        out,
        grad_out,
        lse,
        dq,
        dk_part,
        dv_part,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        *grad_out.stride(),
        *dq.stride(),
        *dk_strides,
        *dv_strides,
        H,
        N,
        M,
        n_blocks,
        n_chunks,
        per_chunk,
        sm_scale * LOG2E,
        sm_scale,
        HEAD_DIM=hd,
        BLOCK_M=_block_m(M),
        PRECISION=_precision(q.dtype),
        **cfg,
    )
    if n_chunks > 1:  # fixed-order reduction over the chunks: deterministic
        dk.copy_(dk_part.sum(2))
        dv.copy_(dv_part.sum(2))
    return dq, dk, dv


# ------------------------------------------------------------------------------------------ registration
# ltm_triton::latent_attention(q, k, v, cos_q, sin_q, cos_k, sin_k) -> (out, lse) and
# ltm_triton::latent_attention_backward(grad_out, q, k, v, cos_q, sin_q, cos_k, sin_k, out, lse) -> (dq, dk, dv):
# opaque ops for torch.compile and CUDA graphs, autograd from Python. Inputs as `latent_attention_triton` checks;
# lse (B, H, N) fp32 is the base-2 logsumexp of the scaled scores (see the module docstring).
@torch.library.custom_op("ltm_triton::latent_attention", mutates_args=())
def _latent_attention_op(
    q: Tensor, k: Tensor, v: Tensor, cos_q: Tensor, sin_q: Tensor, cos_k: Tensor, sin_k: Tensor
) -> tuple[Tensor, Tensor]:
    return _latent_attention_fwd(q, k, v, cos_q, sin_q, cos_k, sin_k)


@torch.library.register_fake("ltm_triton::latent_attention")
def _(q, k, v, cos_q, sin_q, cos_k, sin_k):
    B, H, N, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("ltm_triton::latent_attention_backward", mutates_args=())
def _latent_attention_backward_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos_q: Tensor,
    sin_q: Tensor,
    cos_k: Tensor,
    sin_k: Tensor,
    out: Tensor,
    lse: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    return _latent_attention_bwd(grad_out, q, k, v, cos_q, sin_q, cos_k, sin_k, out, lse)


@torch.library.register_fake("ltm_triton::latent_attention_backward")
def _(grad_out, q, k, v, cos_q, sin_q, cos_k, sin_k, out, lse):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    out, lse = output
    ctx.save_for_backward(*inputs, out, lse)
    ctx.mark_non_differentiable(lse)  # a statistic for the backward: latent_attention_triton returns only out


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, cos_q, sin_q, cos_k, sin_k, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.ltm_triton.latent_attention_backward(grad_out, q, k, v, cos_q, sin_q, cos_k, sin_k, out, lse)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("ltm_triton::latent_attention", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------- functional
def _check(q, k, v, cos_q, sin_q, cos_k, sin_k) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_triton_tensor(t, name)
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (B, H, {'N' if name == 'q' else 'M'}, hd), got shape {tuple(t.shape)}"
            )
    floats = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    for name, t in (("cos_q", cos_q), ("sin_q", sin_q), ("cos_k", cos_k), ("sin_k", sin_k)):
        check_triton_tensor(t, name, floats)
    B, H, N, hd = q.shape
    if hd not in HEAD_DIMS:
        raise ValueError(f"head dim hd (the last dim of q) must be one of {HEAD_DIMS}, got {hd}")
    if 0 in (B, H, N):
        raise ValueError(f"q must be non-empty (B, H, N, hd), got shape {tuple(q.shape)}")
    M = k.shape[2]
    if M == 0:
        raise ValueError(f"k must have at least one latent key (M >= 1), got shape {tuple(k.shape)}")
    if M > MAX_LATENTS:
        raise ValueError(
            f"k has M = {M} latent keys: latent_attention keeps all keys of a (batch, head) "
            f"on chip and supports at most {MAX_LATENTS}"
        )
    if tuple(k.shape) != (B, H, M, hd):
        raise ValueError(f"k must have shape (B, H, M, hd) = ({B}, {H}, M, {hd}) to match q, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    for name, t, rows in (("cos_q", cos_q, N), ("sin_q", sin_q, N), ("cos_k", cos_k, M), ("sin_k", sin_k, M)):
        if tuple(t.shape) != (rows, hd // 2):
            what = "N queries" if rows == N else "M keys"
            raise ValueError(f"{name} must have shape ({rows}, {hd // 2}) ({what}, hd/2), got {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v), ("cos_q", cos_q), ("sin_q", sin_q), ("cos_k", cos_k), ("sin_k", sin_k)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


def latent_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, cos_q: Tensor, sin_q: Tensor, cos_k: Tensor, sin_k: Tensor
) -> Tensor:
    """Fused `reference.latent_attention_ref`: softmax(rope(q) rope(k)^T / sqrt(hd)) v, no mask.

    q (B, H, N, hd), k and v (B, H, M, hd) with 1 <= M <= 64 and hd in (32, 64, 128); one dtype among
    fp32, fp16, bf16; any strides (e.g. transposed views of (B, L, H, hd)). cos_q, sin_q (N, hd/2) and
    cos_k, sin_k (M, hd/2): RoPE tables of adjacent pairs, used in fp32. On CUDA, or on CPU under
    TRITON_INTERPRET=1. Returns out with q's shape and dtype (and q's layout when q is dense).
    Differentiable in q, k, v (the tables get no gradient).
    """
    _check(q, k, v, cos_q, sin_q, cos_k, sin_k)
    cos_q, sin_q, cos_k, sin_k = (t.to(torch.float32) for t in (cos_q, sin_q, cos_k, sin_k))
    return torch.ops.ltm_triton.latent_attention(q, k, v, cos_q, sin_q, cos_k, sin_k)[0]
