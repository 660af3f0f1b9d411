"""swiglu: the SwiGLU gate of the MLP, between the gate/up projections and the down projection.

    out = silu(g) * u = g * sigmoid(g) * u
    dg  = dout * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    du  = dout * silu(g)

Why fuse: eager runs silu and the product as two kernels forward (writing silu(g) in between) and about
five backward; fused, the forward reads g, u and writes out once, the backward reads g, u, dout and writes
dg, du once. Computed in fp32, stored in the tensors' dtype. The eager math is `reference.swiglu_ref`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._triton import TRITON_AVAILABLE, check_triton_tensor, tl, triton

BLOCK = 1024

if TRITON_AVAILABLE:

    @triton.jit
    def _swiglu_fwd_kernel(g_ptr, u_ptr, out_ptr, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(g_ptr, u_ptr, dout_ptr, dg_ptr, du_ptr, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        tl.store(dg_ptr + offs, (dout * u * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(du_ptr + offs, (dout * g * sig).to(du_ptr.dtype.element_ty), mask=mask)


def _grid(numel: int):
    return (triton.cdiv(numel, BLOCK),)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        _swiglu_fwd_kernel[_grid(gate.numel())](gate, up, out, gate.numel(), BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        _swiglu_bwd_kernel[_grid(gate.numel())](gate, up, dout, dg, du, gate.numel(), BLOCK=BLOCK, num_warps=4)
        return dg, du


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """Fused `swiglu_ref`: silu(gate) * up for gate and up of one shape and dtype (fp32/bf16/fp16)."""
    check_triton_tensor(gate, "gate")
    check_triton_tensor(up, "up")
    if up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device:
        raise ValueError(f"up must match gate (shape {tuple(gate.shape)}, {gate.dtype}, {gate.device}), got "
                         f"shape {tuple(up.shape)}, {up.dtype}, {up.device}")
    if gate.numel() == 0:
        return torch.empty_like(gate)
    return _SwiGLU.apply(gate, up)
