"""swiglu_triton: the SwiGLU gate of the MLP, between the gate/up projections and the down projection.

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


def _swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    _swiglu_fwd_kernel[_grid(gate.numel())](gate, up, out, gate.numel(), BLOCK=BLOCK, num_warps=4)
    return out


def _swiglu_bwd(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    gate, up, dout = gate.contiguous(), up.contiguous(), dout.contiguous()
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    _swiglu_bwd_kernel[_grid(gate.numel())](gate, up, dout, dg, du, gate.numel(), BLOCK=BLOCK, num_warps=4)
    return dg, du


# ------------------------------------------------------------------------------------------ registration
# ltm_triton::swiglu(gate, up) -> out and ltm_triton::swiglu_backward(grad_out, gate, up) -> (grad_gate, grad_up),
# opaque ops for torch.compile and CUDA graphs; outputs contiguous, in gate's dtype.
@torch.library.custom_op("ltm_triton::swiglu", mutates_args=())
def _swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    return _swiglu_fwd(gate, up)


@torch.library.register_fake("ltm_triton::swiglu")
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("ltm_triton::swiglu_backward", mutates_args=())
def _swiglu_backward_op(grad_out: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return _swiglu_bwd(grad_out, gate, up)


@torch.library.register_fake("ltm_triton::swiglu_backward")
def _(grad_out, gate, up):
    return (
        torch.empty_like(gate, memory_format=torch.contiguous_format),
        torch.empty_like(up, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    return torch.ops.ltm_triton.swiglu_backward(grad_out, gate, up)


torch.library.register_autograd("ltm_triton::swiglu", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------- functional
def swiglu_triton(gate: Tensor, up: Tensor) -> Tensor:
    """Fused `swiglu_ref`: silu(gate) * up for gate and up of one shape and dtype (fp32/bf16/fp16)."""
    check_triton_tensor(gate, "gate")
    check_triton_tensor(up, "up")
    if up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device:
        raise ValueError(
            f"up must match gate (shape {tuple(gate.shape)}, {gate.dtype}, {gate.device}), got "
            f"shape {tuple(up.shape)}, {up.dtype}, {up.device}"
        )
    if gate.numel() == 0:
        return torch.empty_like(gate)
    return torch.ops.ltm_triton.swiglu(gate, up)
