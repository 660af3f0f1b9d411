"""rms_norm / add_rms_norm: RMSNorm, optionally fused with the residual add before it.

For rows x (..., D), weight w (D,), and optionally a residual branch r:

    h    = x + r                                      (add_rms_norm; rounded to x's dtype, as eager adds)
    rstd = rsqrt(mean(h^2) + eps)                     fp32 statistics
    y    = (h * rstd).to(h.dtype) * w                 the published cast order (docs/model.md, 'RMSNorm')

    backward, with n = h * rstd and dn = dy * w:
    dh   = rstd * (dn - n * mean(dn * n)) (+ the gradient arriving at the output h)
    dx = dr = dh;   dw = sum over rows of dy * n.to(h.dtype)     (only when w's gradient is wanted)

Why fuse: eager RMSNorm is ~7 elementwise kernels, each a pass over the (rows, D) activations, plus one
for the residual add; fused, the forward reads x (and r) once and writes y (and h) once, and the backward
reads h, dy (and dh) once. dw is reduced per program in fp32 and summed over programs at the end.
The eager math is `reference.rms_norm_ref` / `reference.add_rms_norm_ref`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._triton import TRITON_AVAILABLE, check_triton_tensor, grad_wanted, sm_count, tl, triton

if TRITON_AVAILABLE:

    @triton.jit
    def _rms_norm_fwd_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, rstd_ptr, D, eps,
                             BLOCK_D: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            x = (x.to(tl.float32) + tl.load(r_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32))
            x = x.to(h_ptr.dtype.element_ty)  # round the sum as the eager add does; the norm sees that value
            tl.store(h_ptr + row * D + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
        normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * D + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(h_ptr, w_ptr, rstd_ptr, dy_ptr, dh_out_ptr, dx_ptr, dw_ptr, M, D, rows_per_program,
                             BLOCK_D: tl.constexpr, HAS_DH_OUT: tl.constexpr, HAS_DW: tl.constexpr):
        """Rows [pid * rows_per_program, ...): dx per row; this program's partial dw in row pid of dw_ptr."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        start = pid.to(tl.int64) * rows_per_program  # int64 row offsets: rows * D may pass 2^31
        for row in range(start, tl.minimum(start + rows_per_program, M)):
            offs = row * D + cols
            h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            n = h * tl.load(rstd_ptr + row)
            if HAS_DW:
                dw += dy * n.to(h_ptr.dtype.element_ty).to(tl.float32)
            dn = dy * w
            dx = tl.load(rstd_ptr + row) * (dn - n * (tl.sum(dn * n, axis=0) / D))
            if HAS_DH_OUT:
                dx += tl.load(dh_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_DW:
            tl.store(dw_ptr + pid * D + cols, dw, mask=mask)


def _config(D: int) -> dict:
    block = triton.next_power_of_2(D)
    return dict(BLOCK_D=block, num_warps=min(max(block // 256, 1), 8))


def _rms_norm_fwd(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float):
    """x, residual (M, D) contiguous -> (y, h or None, rstd (M,) fp32)."""
    M, D = x.shape
    y = torch.empty(M, D, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    h = torch.empty_like(x) if residual is not None else None
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    _rms_norm_fwd_kernel[(M,)](x, residual, weight, y, h, rstd, D, eps,
                               HAS_RESIDUAL=residual is not None, **_config(D))
    return y, h, rstd


def _rms_norm_bwd(h: Tensor, weight: Tensor, rstd: Tensor, dy: Tensor, dh_out: Tensor | None, want_dw: bool):
    M, D = h.shape
    dx = torch.empty_like(h)
    # A few programs per SM, each looping over its rows, so that dw needs only `programs` partial rows.
    sms = sm_count(h.device.index) if h.is_cuda else 2
    programs = min(M, 4 * sms)
    rows_per_program = triton.cdiv(M, programs)
    programs = triton.cdiv(M, rows_per_program)
    dw = torch.empty(programs, D, dtype=torch.float32, device=h.device) if want_dw else None
    _rms_norm_bwd_kernel[(programs,)](h, weight, rstd, dy, dh_out, dx, dw, M, D, rows_per_program,
                                      HAS_DH_OUT=dh_out is not None, HAS_DW=want_dw, **_config(D))
    return dx, None if dw is None else dw.sum(0).to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps):  # tensors first: grad_wanted indexes the tensor inputs
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        r2 = None if residual is None else residual.reshape(-1, shape[-1]).contiguous()
        y, h, rstd = _rms_norm_fwd(x2, r2, weight.contiguous(), eps)
        ctx.save_for_backward(x2 if h is None else h, weight, rstd)
        ctx.has_residual, ctx.shape = residual is not None, shape
        ctx.set_materialize_grads(False)
        if h is None:
            return y.view(shape)
        return y.view(shape), h.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_out=None):
        h, weight, rstd = ctx.saved_tensors
        D = h.shape[-1]
        dy = torch.zeros_like(h) if dy is None else dy.reshape(-1, D).contiguous()
        dh_out = None if dh_out is None else dh_out.reshape(-1, D).contiguous()
        dx, dw = _rms_norm_bwd(h, weight.contiguous(), rstd, dy, dh_out, grad_wanted(ctx, 1))
        dx = dx.view(ctx.shape)
        dr = dx if ctx.has_residual and ctx.needs_input_grad[2] else None
        return dx, dw, dr, None


def _check(x, weight, eps, residual=None) -> None:
    check_triton_tensor(x, "x")
    check_triton_tensor(weight, "weight")
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty tensor (..., D), got shape {tuple(x.shape)}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must have shape ({x.shape[-1]},) (the last dim of x), got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if residual is not None:
        check_triton_tensor(residual, "residual")
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"residual must match x (shape {tuple(x.shape)}, {x.dtype}, {x.device}), got "
                             f"shape {tuple(residual.shape)}, {residual.dtype}, {residual.device}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Fused `rms_norm_ref`: x (..., D) fp32/bf16/fp16, weight (D,); differentiable in x and weight."""
    _check(x, weight, eps)
    return _RMSNorm.apply(x, weight, None, float(eps))


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Fused `add_rms_norm_ref`: returns (rms_norm(x + residual), x + residual), one pass each way."""
    _check(x, weight, eps, residual)
    return _RMSNorm.apply(x, weight, residual, float(eps))
