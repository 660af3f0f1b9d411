"""self_attention_triton: causal sliding-window attention with RoPE applied inside the kernel (FlashAttention-2 style).

For q, k, v (B, H, N, hd), RoPE tables cos, sin (N, hd/2) and a window W, per (batch, head):

    rot(x)[n, 2c]   = x[n, 2c] cos[n, c] - x[n, 2c+1] sin[n, c]       adjacent pairs (2c, 2c+1) rotated
    rot(x)[n, 2c+1] = x[n, 2c] sin[n, c] + x[n, 2c+1] cos[n, c]
    s[i, j] = rot(q)[i] . rot(k)[j] / sqrt(hd)         kept where i - W < j <= i   (W >= N: plain causal)
    p = softmax_j(s),   out[i] = sum_j p[i, j] v[j],   lse[i] = log sum_j exp(s[i, j])   (natural log, fp32)

    backward (dO = dL/dout), with delta[i] = sum_d dO[i, d] out[i, d]:
    dv[j] = sum_i p[i, j] dO[i];   ds[i, j] = p[i, j] (dO[i] . v[j] - delta[i])
    d rot(q)[i] = sum_j ds[i, j] rot(k)[j] / sqrt(hd);   d rot(k)[j] = sum_i ds[i, j] rot(q)[i] / sqrt(hd)
    and RoPE is undone on those (a rotation's transpose): dx[2c] = d[2c] cos + d[2c+1] sin,
                                                          dx[2c+1] = -d[2c] sin + d[2c+1] cos

Why fuse: eager is RoPE on q and k (casts, an unflatten/stack: each a read and write of q and k) and then
SDPA with a dense (N, N) window mask, which computes and reads all N^2 scores although only ~N*W are
visible. Here q, k are rotated in registers as they are loaded, and each program touches only the key (or
query) tiles that intersect the window: work and traffic scale with N*W, and no (N, N) tensor exists.
Rotated q/k are rounded to the input dtype before the matmuls, as the eager RoPE rounds them; scores,
softmax statistics and every accumulator are fp32. Only tiles on the window's edges or the diagonal are
masked; tiles entirely inside the window go through the same loop body compiled without the mask.

Kernels: the forward (grid: query blocks x B*H) stores out and lse. The backward is two kernels, no atomics
(deterministic): dQ over query blocks, which also computes and stores delta (it reads dO and out anyway,
so no separate preprocessing pass), then dK/dV over key blocks, looping over the query tiles that can
see the block (rows j .. j + W - 1). q, k, v and dO may have any strides (the model passes transposed
views of (B, N, H, hd)); out, dq, dk, dv take q's layout where q is dense (so merging the heads after it,
and the projections' backward, need no copy), contiguous (B, H, N, hd) otherwise.

On CUDA each kernel is autotuned over a few tile configs, keyed on (power-of-two buckets of N and of the
window, hd, dtypes): only the first call with a new key benchmarks (and synchronises); later calls with that
key look the config up on the host, so warm up before capturing a CUDA graph. Under TRITON_INTERPRET=1 one
small fixed config is used.

Registered as `torch.ops.ltm_triton.self_attention` (-> out, lse) and `...self_attention_backward`
(-> dq, dk, dv) with fake implementations and autograd, so `torch.compile` and CUDA graphs see two opaque
ops. The eager math is `reference.self_attention_ref`.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ._triton import INTERPRET, TRITON_AVAILABLE, check_triton_tensor, fp32_tables, tl, triton

HEAD_DIMS = (32, 64, 128)  # tl.dot needs K = hd / 2 >= 16, and power-of-two tiles
_LOG2E = math.log2(math.e)

if TRITON_AVAILABLE:

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        """acc + a @ b; fp32 inputs in full fp32 (as torch's fp32 matmuls), not TF32."""
        if IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _load_rotated(
        x_ptr, rows, N, stride_n, stride_d, cos_ptr, sin_ptr, ROWS: tl.constexpr, HD: tl.constexpr, BOUNDS: tl.constexpr
    ):
        """RoPE'd rows of x as (even, odd) halves (ROWS, HD / 2), fp32; rows >= N read as 0 when BOUNDS."""
        HALF: tl.constexpr = HD // 2
        d = tl.arange(0, HD)
        c = tl.arange(0, HALF)
        x_ptrs = x_ptr + rows[:, None] * stride_n + d[None, :] * stride_d
        cs_offs = rows[:, None] * HALF + c[None, :]
        if BOUNDS:
            x = tl.load(x_ptrs, mask=(rows < N)[:, None], other=0.0)
            cos = tl.load(cos_ptr + cs_offs, mask=(rows < N)[:, None], other=0.0)
            sin = tl.load(sin_ptr + cs_offs, mask=(rows < N)[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs)
            cos = tl.load(cos_ptr + cs_offs)
            sin = tl.load(sin_ptr + cs_offs)
        # one contiguous (ROWS, HD) load, split into the pair members: column 2c -> even[c], 2c+1 -> odd[c]
        even, odd = tl.split(tl.reshape(x.to(tl.float32), (ROWS, HALF, 2)))
        return even * cos - odd * sin, even * sin + odd * cos

    @triton.jit
    def _store_unrotated(
        x_ptr, rows, N, stride_n, stride_d, d_even, d_odd, cos_ptr, sin_ptr, ROWS: tl.constexpr, HD: tl.constexpr
    ):
        """Undo RoPE on the gradient (d_even, d_odd) of rotated rows and store them into the (N, HD) rows of x."""
        HALF: tl.constexpr = HD // 2
        c = tl.arange(0, HALF)
        cs_offs = rows[:, None] * HALF + c[None, :]
        cos = tl.load(cos_ptr + cs_offs, mask=(rows < N)[:, None], other=0.0)
        sin = tl.load(sin_ptr + cs_offs, mask=(rows < N)[:, None], other=0.0)
        x = tl.reshape(tl.join(d_even * cos + d_odd * sin, d_odd * cos - d_even * sin), (ROWS, HD))
        d = tl.arange(0, HD)
        tl.store(
            x_ptr + rows[:, None] * stride_n + d[None, :] * stride_d,
            x.to(x_ptr.dtype.element_ty),
            mask=(rows < N)[:, None],
        )

    @triton.jit
    def _key_tile_ranges(i0, N, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Key tiles (starts, multiples of BLOCK_N) that query rows [i0, i0 + BLOCK_M) can see, in three
        runs: masked [lo, a), unmasked [a, b) (every row sees every key), masked [b, hi)."""
        hi = tl.minimum(i0 + BLOCK_M, N)  # keys j <= i < hi
        lo = tl.maximum(i0 - window + 1, 0) // BLOCK_N * BLOCK_N  # first key of the first row: i0 - W + 1
        full_lo = (tl.maximum(i0 + BLOCK_M - window, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N  # in the last row's window
        full_hi = (i0 + 1) // BLOCK_N * BLOCK_N  # tile ends <= i0 + 1: causal for the first row
        a = tl.minimum(full_lo, hi)
        b = tl.maximum(a, full_hi)
        return lo, a, b, hi

    @triton.jit
    def _query_tile_ranges(j0, N, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Query tiles (starts, multiples of BLOCK_M) that can see keys [j0, j0 + BLOCK_N), in three runs:
        masked [lo, a), unmasked [a, b) (every row sees every key, rows < N), masked [b, hi)."""
        hi = tl.minimum(j0 + BLOCK_N - 1 + window, N)  # rows i < j + W of the last key
        lo = j0 // BLOCK_M * BLOCK_M  # rows i >= j0
        full_lo = (j0 + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # rows >= the last key
        full_hi = tl.minimum(j0 + window, N) // BLOCK_M * BLOCK_M  # rows < j0 + W (the first key's window), < N
        a = tl.minimum(full_lo, hi)
        b = tl.maximum(a, full_hi)
        return lo, a, b, hi

    @triton.jit
    def _fwd_tiles(
        acc,
        m_i,
        l_i,
        q_e,
        q_o,
        offs_m,
        k_ptr,
        v_ptr,
        cos_ptr,
        sin_ptr,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        N,
        window,
        qk_scale,
        start,
        end,
        BLOCK_N: tl.constexpr,
        HD: tl.constexpr,
        MASKED: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """Online-softmax update of (acc, m_i, l_i) with key tiles [start, end); scores in log2 units."""
        d = tl.arange(0, HD)
        for j0 in range(start, end, BLOCK_N):
            offs_n = j0 + tl.arange(0, BLOCK_N)
            k_e, k_o = _load_rotated(k_ptr, offs_n, N, stride_kn, stride_kd, cos_ptr, sin_ptr, BLOCK_N, HD, MASKED)
            s = _dot(q_e, tl.trans(k_e.to(q_e.dtype)), tl.zeros([q_e.shape[0], BLOCK_N], tl.float32), IEEE)
            s = _dot(q_o, tl.trans(k_o.to(q_o.dtype)), s, IEEE) * qk_scale
            v_ptrs = v_ptr + offs_n[:, None] * stride_vn + d[None, :] * stride_vd
            if MASKED:  # rows see i - W < j <= i; keys j >= N only for rows >= N, which are not stored
                keep = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] > offs_m[:, None] - window)
                s = tl.where(keep, s, float("-inf"))
                v = tl.load(v_ptrs, mask=(offs_n < N)[:, None], other=0.0)
            else:
                v = tl.load(v_ptrs)
            m_new = tl.maximum(m_i, tl.max(s, 1))  # m_i starts finite: a row masked so far keeps alpha = 1
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit(do_not_specialize=["window", "N_KEY", "WINDOW_KEY"])  # window = 1 needs no variant of its own
    def _self_attention_fwd_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        cos_ptr,
        sin_ptr,
        out_ptr,
        lse_ptr,
        stride_qb,
        stride_qh,
        stride_qn,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_yb,
        stride_yh,
        stride_yn,
        stride_yd,
        H,
        N,
        window,
        qk_scale,
        N_KEY,
        WINDOW_KEY,  # *_KEY: only autotuning keys (buckets of N and window)
        HD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        i0 = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        q_ptr += b * stride_qb + h * stride_qh
        k_ptr += b * stride_kb + h * stride_kh
        v_ptr += b * stride_vb + h * stride_vh
        offs_m = i0 + tl.arange(0, BLOCK_M)
        q_e, q_o = _load_rotated(q_ptr, offs_m, N, stride_qn, stride_qd, cos_ptr, sin_ptr, BLOCK_M, HD, True)
        q_e, q_o = q_e.to(q_ptr.dtype.element_ty), q_o.to(q_ptr.dtype.element_ty)

        acc = tl.zeros([BLOCK_M, HD], tl.float32)
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        lo, a, b_, hi = _key_tile_ranges(i0, N, window, BLOCK_M, BLOCK_N)
        args = (k_ptr, v_ptr, cos_ptr, sin_ptr, stride_kn, stride_kd, stride_vn, stride_vd, N, window, qk_scale)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q_e, q_o, offs_m, *args, lo, a, BLOCK_N, HD, True, IEEE)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q_e, q_o, offs_m, *args, a, b_, BLOCK_N, HD, False, IEEE)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q_e, q_o, offs_m, *args, b_, hi, BLOCK_N, HD, True, IEEE)

        row_ok = offs_m < N  # every stored row saw at least its own key: l_i >= 1
        l_i = tl.where(row_ok, l_i, 1.0)  # rows >= N may have seen no key: no 0 / 0 in rows never stored
        tl.store(lse_ptr + bh * N + offs_m, (m_i + tl.math.log2(l_i)) / 1.4426950408889634, mask=row_ok)
        d = tl.arange(0, HD)
        out_ptrs = out_ptr + b * stride_yb + h * stride_yh + offs_m[:, None] * stride_yn + d[None, :] * stride_yd
        tl.store(out_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _dq_tiles(
        dq_e,
        dq_o,
        q_e,
        q_o,
        do,
        lse2,
        delta,
        offs_m,
        k_ptr,
        v_ptr,
        cos_ptr,
        sin_ptr,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        N,
        window,
        qk_scale,
        start,
        end,
        BLOCK_N: tl.constexpr,
        HD: tl.constexpr,
        MASKED: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        d = tl.arange(0, HD)
        for j0 in range(start, end, BLOCK_N):
            offs_n = j0 + tl.arange(0, BLOCK_N)
            k_e, k_o = _load_rotated(k_ptr, offs_n, N, stride_kn, stride_kd, cos_ptr, sin_ptr, BLOCK_N, HD, MASKED)
            k_e, k_o = k_e.to(q_e.dtype), k_o.to(q_e.dtype)
            s = _dot(q_e, tl.trans(k_e), tl.zeros([q_e.shape[0], BLOCK_N], tl.float32), IEEE)
            s = _dot(q_o, tl.trans(k_o), s, IEEE) * qk_scale - lse2[:, None]
            v_ptrs = v_ptr + offs_n[:, None] * stride_vn + d[None, :] * stride_vd
            if MASKED:
                keep = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] > offs_m[:, None] - window)
                s = tl.where(keep, s, float("-inf"))
                v = tl.load(v_ptrs, mask=(offs_n < N)[:, None], other=0.0)
            else:
                v = tl.load(v_ptrs)
            p = tl.math.exp2(s)
            dp = _dot(do, tl.trans(v), tl.zeros([q_e.shape[0], BLOCK_N], tl.float32), IEEE)
            ds = (p * (dp - delta[:, None])).to(k_e.dtype)
            dq_e = _dot(ds, k_e, dq_e, IEEE)
            dq_o = _dot(ds, k_o, dq_o, IEEE)
        return dq_e, dq_o

    @triton.jit(do_not_specialize=["window", "N_KEY", "WINDOW_KEY"])  # window = 1 needs no variant of its own
    def _self_attention_bwd_dq_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        cos_ptr,
        sin_ptr,
        out_ptr,
        do_ptr,
        lse_ptr,
        delta_ptr,
        dq_ptr,
        stride_qb,
        stride_qh,
        stride_qn,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_ob,
        stride_oh,
        stride_on,
        stride_od,
        stride_yb,
        stride_yh,
        stride_yn,
        stride_yd,
        H,
        N,
        window,
        qk_scale,
        sm_scale,
        N_KEY,
        WINDOW_KEY,
        HD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """dq of query rows [i0, i0 + BLOCK_M); also delta = rowsum(dO * out) of those rows (for dK/dV)."""
        i0 = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        q_ptr += b * stride_qb + h * stride_qh
        k_ptr += b * stride_kb + h * stride_kh
        v_ptr += b * stride_vb + h * stride_vh
        offs_m = i0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        d = tl.arange(0, HD)
        do = tl.load(
            do_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + d[None, :] * stride_od,
            mask=row_ok[:, None],
            other=0.0,
        )
        y_offs = b * stride_yb + h * stride_yh  # out and dq: the outputs' layout
        out = tl.load(
            out_ptr + y_offs + offs_m[:, None] * stride_yn + d[None, :] * stride_yd, mask=row_ok[:, None], other=0.0
        )
        delta = tl.sum(do.to(tl.float32) * out.to(tl.float32), 1)
        tl.store(delta_ptr + bh * N + offs_m, delta, mask=row_ok)
        lse2 = tl.load(lse_ptr + bh * N + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
        q_e, q_o = _load_rotated(q_ptr, offs_m, N, stride_qn, stride_qd, cos_ptr, sin_ptr, BLOCK_M, HD, True)
        q_e, q_o = q_e.to(q_ptr.dtype.element_ty), q_o.to(q_ptr.dtype.element_ty)

        dq_e = tl.zeros([BLOCK_M, HD // 2], tl.float32)
        dq_o = tl.zeros([BLOCK_M, HD // 2], tl.float32)
        lo, a, b_, hi = _key_tile_ranges(i0, N, window, BLOCK_M, BLOCK_N)
        args = (k_ptr, v_ptr, cos_ptr, sin_ptr, stride_kn, stride_kd, stride_vn, stride_vd, N, window, qk_scale)
        dq_e, dq_o = _dq_tiles(dq_e, dq_o, q_e, q_o, do, lse2, delta, offs_m, *args, lo, a, BLOCK_N, HD, True, IEEE)
        dq_e, dq_o = _dq_tiles(dq_e, dq_o, q_e, q_o, do, lse2, delta, offs_m, *args, a, b_, BLOCK_N, HD, False, IEEE)
        dq_e, dq_o = _dq_tiles(dq_e, dq_o, q_e, q_o, do, lse2, delta, offs_m, *args, b_, hi, BLOCK_N, HD, True, IEEE)
        _store_unrotated(
            dq_ptr + y_offs,
            offs_m,
            N,
            stride_yn,
            stride_yd,
            dq_e * sm_scale,
            dq_o * sm_scale,
            cos_ptr,
            sin_ptr,
            BLOCK_M,
            HD,
        )

    @triton.jit
    def _dkdv_tiles(
        dk_e,
        dk_o,
        dv,
        k_e,
        k_o,
        v,
        offs_n,
        q_ptr,
        do_ptr,
        lse_ptr,
        delta_ptr,
        cos_ptr,
        sin_ptr,
        stride_qn,
        stride_qd,
        stride_on,
        stride_od,
        N,
        window,
        qk_scale,
        start,
        end,
        BLOCK_M: tl.constexpr,
        HD: tl.constexpr,
        MASKED: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """Accumulate dk (rotated halves) and dv of keys offs_n over query tiles [start, end); all transposed:
        (keys, queries) score tiles, so no operand needs a transpose but the one fed to the dot."""
        d = tl.arange(0, HD)
        for i0 in range(start, end, BLOCK_M):
            offs_m = i0 + tl.arange(0, BLOCK_M)
            q_e, q_o = _load_rotated(q_ptr, offs_m, N, stride_qn, stride_qd, cos_ptr, sin_ptr, BLOCK_M, HD, MASKED)
            q_e, q_o = q_e.to(k_e.dtype), q_o.to(k_e.dtype)
            do_ptrs = do_ptr + offs_m[:, None] * stride_on + d[None, :] * stride_od
            if MASKED:
                do = tl.load(do_ptrs, mask=(offs_m < N)[:, None], other=0.0)
                lse2 = tl.load(lse_ptr + offs_m, mask=offs_m < N, other=0.0) * 1.4426950408889634
                delta = tl.load(delta_ptr + offs_m, mask=offs_m < N, other=0.0)
            else:
                do = tl.load(do_ptrs)
                lse2 = tl.load(lse_ptr + offs_m) * 1.4426950408889634
                delta = tl.load(delta_ptr + offs_m)
            s_t = _dot(k_e, tl.trans(q_e), tl.zeros([k_e.shape[0], BLOCK_M], tl.float32), IEEE)
            s_t = _dot(k_o, tl.trans(q_o), s_t, IEEE) * qk_scale - lse2[None, :]
            if MASKED:  # rows i >= N read q = dO = lse = delta = 0 and contribute exactly 0
                keep = (offs_n[:, None] <= offs_m[None, :]) & (offs_m[None, :] < offs_n[:, None] + window)
                s_t = tl.where(keep, s_t, float("-inf"))
            p_t = tl.math.exp2(s_t)
            dv = _dot(p_t.to(do.dtype), do, dv, IEEE)
            dp_t = _dot(v, tl.trans(do), tl.zeros([k_e.shape[0], BLOCK_M], tl.float32), IEEE)
            ds_t = (p_t * (dp_t - delta[None, :])).to(q_e.dtype)
            dk_e = _dot(ds_t, q_e, dk_e, IEEE)
            dk_o = _dot(ds_t, q_o, dk_o, IEEE)
        return dk_e, dk_o, dv

    @triton.jit(do_not_specialize=["window", "N_KEY", "WINDOW_KEY"])  # window = 1 needs no variant of its own
    def _self_attention_bwd_dkdv_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        cos_ptr,
        sin_ptr,
        do_ptr,
        lse_ptr,
        delta_ptr,
        dk_ptr,
        dv_ptr,
        stride_qb,
        stride_qh,
        stride_qn,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_ob,
        stride_oh,
        stride_on,
        stride_od,
        stride_yb,
        stride_yh,
        stride_yn,
        stride_yd,
        H,
        N,
        window,
        qk_scale,
        sm_scale,
        N_KEY,
        WINDOW_KEY,
        HD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """dk, dv of keys [j0, j0 + BLOCK_N), from the query rows j .. j + W - 1 that see them."""
        j0 = tl.program_id(0) * BLOCK_N
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        q_ptr += b * stride_qb + h * stride_qh
        k_ptr += b * stride_kb + h * stride_kh
        v_ptr += b * stride_vb + h * stride_vh
        do_ptr += b * stride_ob + h * stride_oh
        lse_ptr += bh * N
        delta_ptr += bh * N
        offs_n = j0 + tl.arange(0, BLOCK_N)
        d = tl.arange(0, HD)
        k_e, k_o = _load_rotated(k_ptr, offs_n, N, stride_kn, stride_kd, cos_ptr, sin_ptr, BLOCK_N, HD, True)
        k_e, k_o = k_e.to(k_ptr.dtype.element_ty), k_o.to(k_ptr.dtype.element_ty)
        v = tl.load(v_ptr + offs_n[:, None] * stride_vn + d[None, :] * stride_vd, mask=(offs_n < N)[:, None], other=0.0)

        dk_e = tl.zeros([BLOCK_N, HD // 2], tl.float32)
        dk_o = tl.zeros([BLOCK_N, HD // 2], tl.float32)
        dv = tl.zeros([BLOCK_N, HD], tl.float32)
        lo, a, b_, hi = _query_tile_ranges(j0, N, window, BLOCK_M, BLOCK_N)
        args = (
            q_ptr,
            do_ptr,
            lse_ptr,
            delta_ptr,
            cos_ptr,
            sin_ptr,
            stride_qn,
            stride_qd,
            stride_on,
            stride_od,
            N,
            window,
            qk_scale,
        )
        dk_e, dk_o, dv = _dkdv_tiles(dk_e, dk_o, dv, k_e, k_o, v, offs_n, *args, lo, a, BLOCK_M, HD, True, IEEE)
        dk_e, dk_o, dv = _dkdv_tiles(dk_e, dk_o, dv, k_e, k_o, v, offs_n, *args, a, b_, BLOCK_M, HD, False, IEEE)
        dk_e, dk_o, dv = _dkdv_tiles(dk_e, dk_o, dv, k_e, k_o, v, offs_n, *args, b_, hi, BLOCK_M, HD, True, IEEE)
        y_offs = b * stride_yb + h * stride_yh  # dk, dv: the outputs' layout
        _store_unrotated(
            dk_ptr + y_offs,
            offs_n,
            N,
            stride_yn,
            stride_yd,
            dk_e * sm_scale,
            dk_o * sm_scale,
            cos_ptr,
            sin_ptr,
            BLOCK_N,
            HD,
        )
        tl.store(
            dv_ptr + y_offs + offs_n[:, None] * stride_yn + d[None, :] * stride_yd,
            dv.to(dv_ptr.dtype.element_ty),
            mask=(offs_n < N)[:, None],
        )

    _KEY = ["N_KEY", "HD", "WINDOW_KEY"]  # the autotuner adds the tensors' dtypes

    def _configs(pairs):
        return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s) for m, n, w, s in pairs]

    # (BLOCK_M, BLOCK_N, num_warps, num_stages). Forward and dQ: BLOCK_M queries stay, BLOCK_N keys stream;
    # dK/dV: BLOCK_N keys stay, BLOCK_M queries stream.
    _FWD_CONFIGS = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)]
    _DQ_CONFIGS = [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2)]
    _DKDV_CONFIGS = [(64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 2)]
    _INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16)  # small: the interpreter's cost grows with the tiles

    if INTERPRET:
        _fwd_kernel, _dq_kernel, _dkdv_kernel = (
            _self_attention_fwd_kernel,
            _self_attention_bwd_dq_kernel,
            _self_attention_bwd_dkdv_kernel,
        )
        _FIXED = _INTERPRETER_CONFIG
    else:
        _fwd_kernel = triton.autotune(_configs(_FWD_CONFIGS), key=_KEY)(_self_attention_fwd_kernel)
        _dq_kernel = triton.autotune(_configs(_DQ_CONFIGS), key=_KEY)(_self_attention_bwd_dq_kernel)
        _dkdv_kernel = triton.autotune(_configs(_DKDV_CONFIGS), key=_KEY)(_self_attention_bwd_dkdv_kernel)
        _FIXED = {}


def _tune_keys(N: int, window: int) -> tuple[int, int]:
    """Autotuning buckets of N and the (clamped) window, powers of two: a new sequence length (generation
    prompts) or window reuses the config tuned for its bucket instead of benchmarking every config again."""
    return triton.next_power_of_2(N), triton.next_power_of_2(min(window, N))


def _strides(x: Tensor) -> tuple[int, ...]:
    return tuple(x.stride())


def _self_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, window: int):
    """Launch the forward: -> out (B, H, N, hd) in q's dtype and layout, lse (B, H, N) fp32 (natural log)."""
    B, H, N, hd = q.shape
    window = min(window, N)  # W >= N is plain causal
    cos, sin = fp32_tables(cos, sin)
    out = torch.empty_like(q)  # q's layout where q is dense: the model's head merge after it is then free
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    sm_scale = 1.0 / math.sqrt(hd)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]), B * H)

    _fwd_kernel[grid](
        q,
        k,
        v,
        cos,
        sin,
        out,
        lse,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(out),
        H,
        N,
        window,
        sm_scale * _LOG2E,
        *_tune_keys(N, window),
        HD=hd,
        IEEE=q.dtype == torch.float32,
        **_FIXED,
    )
    return out, lse


def _self_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, out: Tensor, lse: Tensor, window: int
):
    """Launch the backward (dQ + delta, then dK/dV): -> dq, dk, dv in q's dtype and layout."""
    B, H, N, hd = q.shape
    window = min(window, N)
    cos, sin = fp32_tables(cos, sin)
    dout = dout.to(q.dtype)
    # dq, dk, dv in q's layout where q is dense (the model's q, k, v are views of one (B, N, H, hd) layout, which
    # is what the projections' backward wants); out is read with the same strides.
    dq, dk, dv = (torch.empty_like(q) for _ in range(3))
    if out.stride() != dq.stride():
        out = torch.empty_like(dq).copy_(out)
    lse = lse.contiguous()
    if dq.numel() == 0:
        return dq, dk, dv
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    sm_scale = 1.0 / math.sqrt(hd)
    common = dict(HD=hd, IEEE=q.dtype == torch.float32, **_FIXED)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq))
    scalars = (H, N, window, sm_scale * _LOG2E, sm_scale, *_tune_keys(N, window))
    _dq_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, v, cos, sin, out, dout, lse, delta, dq, *strides, *scalars, **common
    )
    _dkdv_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)](
        q, k, v, cos, sin, dout, lse, delta, dk, dv, *strides, *scalars, **common
    )
    return dq, dk, dv


# ------------------------------------------------------------------------------------------ registration
# ltm_triton::self_attention(q, k, v, cos, sin, window) -> (out, lse) and
# ltm_triton::self_attention_backward(grad_out, q, k, v, cos, sin, out, lse, window) -> (dq, dk, dv): two
# opaque ops for torch.compile and CUDA graphs, autograd from Python. Inputs as `self_attention_triton` checks.
@torch.library.custom_op("ltm_triton::self_attention", mutates_args=())
def _self_attention_op(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, window: int) -> tuple[Tensor, Tensor]:
    return _self_attention_fwd(q, k, v, cos, sin, window)


@torch.library.register_fake("ltm_triton::self_attention")
def _(q, k, v, cos, sin, window):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("ltm_triton::self_attention_backward", mutates_args=())
def _self_attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, out: Tensor, lse: Tensor, window: int
) -> tuple[Tensor, Tensor, Tensor]:
    return _self_attention_bwd(grad_out, q, k, v, cos, sin, out, lse, window)


@torch.library.register_fake("ltm_triton::self_attention_backward")
def _(grad_out, q, k, v, cos, sin, out, lse, window):
    return torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)


def _setup_context(ctx, inputs, output):
    q, k, v, cos, sin, window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, cos, sin, out, lse)
    ctx.window = window
    ctx.mark_non_differentiable(lse)  # a statistic for the backward: self_attention_triton returns only out


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, cos, sin, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.ltm_triton.self_attention_backward(grad_out, q, k, v, cos, sin, out, lse, ctx.window)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("ltm_triton::self_attention", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------- functional
def _check(q, k, v, cos, sin, window) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_triton_tensor(t, name)
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D (B, H, N, hd), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(
                f"{name} must match q (shape {tuple(q.shape)}, {q.dtype}, {q.device}), got shape "
                f"{tuple(t.shape)}, {t.dtype}, {t.device}"
            )
    N, hd = q.shape[-2:]
    if hd not in HEAD_DIMS:
        raise ValueError(f"head dim hd = q.shape[-1] must be one of {HEAD_DIMS}, got {hd}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (it is used in fp32), got {t.dtype}")
        if t.shape != (N, hd // 2):
            raise ValueError(f"{name} must have shape (N, hd / 2) = ({N}, {hd // 2}), got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if isinstance(window, bool) or not isinstance(window, numbers.Integral):
        raise TypeError(f"window must be an int (keys i - window < j <= i are visible), got {window!r}")
    if window < 1:
        raise ValueError(f"window must be >= 1 (a query always sees itself), got {window}")


def self_attention_triton(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, window: int) -> Tensor:
    """Fused `self_attention_ref`: RoPE (adjacent pairs) on q, k, then causal attention over the last `window`
    keys (query i sees i - window < j <= i), scale 1/sqrt(hd).

    q, k, v: (B, H, N, hd), hd in (32, 64, 128), one dtype (fp32 / bf16 / fp16) and device, any strides.
    cos, sin: (N, hd / 2), used in fp32. Returns (B, H, N, hd) in q's dtype and layout (`empty_like(q)`);
    differentiable in q, k, v.
    """
    _check(q, k, v, cos, sin, window)
    return torch.ops.ltm_triton.self_attention(q, k, v, cos, sin, int(window))[0]
