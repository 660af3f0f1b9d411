"""rms_norm_triton / add_rms_norm_triton: RMSNorm, optionally fused with the residual add before it.

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

from ._triton import TRITON_AVAILABLE, check_triton_tensor, grad_wanted, sm_count, tl, triton

if TRITON_AVAILABLE:

    @triton.jit
    def _rms_norm_fwd_kernel(
        x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, rstd_ptr, D, eps, BLOCK_D: tl.constexpr, HAS_RESIDUAL: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            x = x.to(tl.float32) + tl.load(r_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            x = x.to(h_ptr.dtype.element_ty)  # round the sum as the eager add does; the norm sees that value
            tl.store(h_ptr + row * D + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
        normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * D + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(
        h_ptr,
        w_ptr,
        rstd_ptr,
        dy_ptr,
        dh_out_ptr,
        dx_ptr,
        dw_ptr,
        M,
        D,
        rows_per_program,
        BLOCK_D: tl.constexpr,
        HAS_DH_OUT: tl.constexpr,
        HAS_DW: tl.constexpr,
    ):
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
    _rms_norm_fwd_kernel[(M,)](x, residual, weight, y, h, rstd, D, eps, HAS_RESIDUAL=residual is not None, **_config(D))
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
    _rms_norm_bwd_kernel[(programs,)](
        h,
        weight,
        rstd,
        dy,
        dh_out,
        dx,
        dw,
        M,
        D,
        rows_per_program,
        HAS_DH_OUT=dh_out is not None,
        HAS_DW=want_dw,
        **_config(D),
    )
    return dx, None if dw is None else dw.sum(0).to(weight.dtype)


# ------------------------------------------------------------------------------------------ registration
# Four opaque ops for torch.compile and CUDA graphs, autograd from Python:
#   ltm_triton::rms_norm(x, weight, eps) -> (y, rstd)
#   ltm_triton::rms_norm_backward(grad_y, x, weight, rstd, compute_grad_weight) -> (grad_x, grad_weight)
#   ltm_triton::add_rms_norm(x, residual, weight, eps) -> (y, h, rstd)
#   ltm_triton::add_rms_norm_backward(grad_y, grad_h, h, weight, rstd, compute_grad_weight) -> (grad_h, grad_weight)
# x (..., D) any strides; rstd x.shape[:-1] fp32. grad_weight is empty (0,) when not computed; grad_h of the
# add is the gradient of x and of residual alike (and includes the gradient arriving at the output h).
def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


@torch.library.custom_op("ltm_triton::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    y, _, rstd = _rms_norm_fwd(_rows(x), None, weight.contiguous(), eps)
    return y.view(x.shape), rstd.view(x.shape[:-1])


@torch.library.register_fake("ltm_triton::rms_norm")
def _(x, weight, eps):
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    return y, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("ltm_triton::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, compute_grad_weight: bool
) -> tuple[Tensor, Tensor]:
    dx, dw = _rms_norm_bwd(
        _rows(x), weight.contiguous(), rstd.reshape(-1).contiguous(), _rows(grad_y), None, compute_grad_weight
    )
    return dx.view(x.shape), weight.new_empty(0) if dw is None else dw


@torch.library.register_fake("ltm_triton::rms_norm_backward")
def _(grad_y, x, weight, rstd, compute_grad_weight):
    return torch.empty_like(x, memory_format=torch.contiguous_format), weight.new_empty(
        weight.shape if compute_grad_weight else (0,)
    )


@torch.library.custom_op("ltm_triton::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    y, h, rstd = _rms_norm_fwd(_rows(x), _rows(residual), weight.contiguous(), eps)
    return y.view(x.shape), h.view(x.shape), rstd.view(x.shape[:-1])


@torch.library.register_fake("ltm_triton::add_rms_norm")
def _(x, residual, weight, eps):
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    return y, x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("ltm_triton::add_rms_norm_backward", mutates_args=())
def _add_rms_norm_backward_op(
    grad_y: Tensor, grad_h: Tensor | None, h: Tensor, weight: Tensor, rstd: Tensor, compute_grad_weight: bool
) -> tuple[Tensor, Tensor]:
    dh_out = None if grad_h is None else _rows(grad_h)
    dx, dw = _rms_norm_bwd(
        _rows(h), weight.contiguous(), rstd.reshape(-1).contiguous(), _rows(grad_y), dh_out, compute_grad_weight
    )
    return dx.view(h.shape), weight.new_empty(0) if dw is None else dw


@torch.library.register_fake("ltm_triton::add_rms_norm_backward")
def _(grad_y, grad_h, h, weight, rstd, compute_grad_weight):
    return torch.empty_like(h, memory_format=torch.contiguous_format), weight.new_empty(
        weight.shape if compute_grad_weight else (0,)
    )


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _rms_norm_backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    # grad_wanted, not needs_input_grad: the inner loop's norm weights are Parameters nobody asks a gradient of.
    want_dw = grad_wanted(ctx, 1)
    dx, dw = torch.ops.ltm_triton.rms_norm_backward(grad_y, x, weight, rstd, want_dw)
    return dx, dw if want_dw else None, None


def _add_rms_norm_setup_context(ctx, inputs, output):
    _, _, weight, _ = inputs
    _, h, rstd = output
    ctx.save_for_backward(h, weight, rstd)
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)  # y or h may get no gradient: no zeros to read then


def _add_rms_norm_backward(ctx, grad_y, grad_h, _grad_rstd):
    h, weight, rstd = ctx.saved_tensors
    want_dw = grad_wanted(ctx, 2)  # tensor inputs: x, residual, weight
    if grad_y is None:
        grad_y = torch.zeros_like(h)
    dh, dw = torch.ops.ltm_triton.add_rms_norm_backward(grad_y, grad_h, h, weight, rstd, want_dw)
    return dh, dh, dw if want_dw else None, None


torch.library.register_autograd("ltm_triton::rms_norm", _rms_norm_backward, setup_context=_rms_norm_setup_context)
torch.library.register_autograd(
    "ltm_triton::add_rms_norm", _add_rms_norm_backward, setup_context=_add_rms_norm_setup_context
)


# ------------------------------------------------------------------------------------------- functional
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
            raise ValueError(
                f"residual must match x (shape {tuple(x.shape)}, {x.dtype}, {x.device}), got "
                f"shape {tuple(residual.shape)}, {residual.dtype}, {residual.device}"
            )
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Fused `rms_norm_ref`: x (..., D) fp32/bf16/fp16, weight (D,); differentiable in x and weight."""
    _check(x, weight, eps)
    return torch.ops.ltm_triton.rms_norm(x, weight, float(eps))[0]


def add_rms_norm_triton(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Fused `add_rms_norm_ref`: returns (rms_norm(x + residual), x + residual), one pass each way."""
    _check(x, weight, eps, residual)
    y, h, _ = torch.ops.ltm_triton.add_rms_norm(x, residual, weight, float(eps))
    return y, h
