"""rms_norm_cpp / add_rms_norm_cpp / swiglu_cpp: the model's elementwise ops as C++ CPU kernels.

    h = x (+ residual),  rstd = 1 / sqrt(mean(h^2) + eps),  y = (h rstd) w           (rms_norm, add_rms_norm)
    out = silu(g) u                                                                  (swiglu)

Why: on CPU the eager references run RMSNorm as six ATen kernels forward and about ten backward, and SwiGLU
as two and five, each a pass over the activations in memory; in the inner loop that was a fifth of a step.
The C++ kernels (csrc/elementwise.cpp) make one pass forward and one backward. The eager math is
`reference.rms_norm_ref`, `add_rms_norm_ref` and `swiglu_ref`.

Ops (schemas in csrc/ltm_ops.cpp), CPU kernels only:
    torch.ops.ltm.rms_norm(x, residual, weight, eps) -> (y, h, rstd)      h empty without a residual
    torch.ops.ltm.rms_norm_backward(grad_y, grad_h, h, weight, rstd, weight_grad) -> (grad_x, grad_weight)
    torch.ops.ltm.swiglu(gate, up) -> out
    torch.ops.ltm.swiglu_backward(grad, gate, up) -> (grad_gate, grad_up)
Dtypes: float32, float64, bfloat16, float16 (computed in float32, float64 for float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._extension import has_op, on_load, require_extension
from ._triton import grad_wanted


def _rms_norm_fake(x, residual, weight, eps):
    h = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    rstd_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.empty_like(x), h, x.new_empty(x.shape[:-1], dtype=rstd_dtype)


def _rms_norm_backward_fake(grad_y, grad_h, h, weight, rstd, weight_grad):
    return torch.empty_like(h), torch.empty_like(weight) if weight_grad else weight.new_empty((0,))


def _rms_norm_setup_context(ctx, inputs, output):
    x, residual, weight, eps = inputs
    _, h, rstd = output
    ctx.save_for_backward(h if residual is not None else x, weight, rstd)
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(rstd)


def _rms_norm_backward(ctx, grad_y, grad_h, grad_rstd):
    h, weight, rstd = ctx.saved_tensors
    # Inputs: x, residual, weight, eps; the autograd node's edges skip a residual of None.
    want_w = grad_wanted(ctx, 2, node_index=2 if ctx.has_residual else 1)
    if not ctx.has_residual:
        grad_h = None  # h is x itself: nothing flows into it separately
    grad_x, grad_w = torch.ops.ltm.rms_norm_backward(grad_y, grad_h, h, weight, rstd, want_w)
    grad_w = grad_w if want_w else None
    return grad_x, (grad_x if ctx.has_residual else None), grad_w, None


def _swiglu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, grad):
    gate, up = ctx.saved_tensors
    return torch.ops.ltm.swiglu_backward(grad, gate, up)


def _swiglu_backward_fake(grad, gate, up):
    return torch.empty_like(gate), torch.empty_like(up)


@on_load
def _register() -> None:
    if has_op("rms_norm", "meta"):
        return
    torch.library.register_fake("ltm::rms_norm")(_rms_norm_fake)
    torch.library.register_fake("ltm::rms_norm_backward")(_rms_norm_backward_fake)
    torch.library.register_fake("ltm::swiglu")(lambda gate, up: torch.empty_like(gate))
    torch.library.register_fake("ltm::swiglu_backward")(_swiglu_backward_fake)
    torch.library.register_autograd("ltm::rms_norm", _rms_norm_backward, setup_context=_rms_norm_setup_context)
    torch.library.register_autograd("ltm::swiglu", _swiglu_backward, setup_context=_swiglu_setup_context)


def rms_norm_cpp(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`reference.rms_norm_ref` through the C++ CPU kernel: x (..., d), weight (d,), eps > 0; one dtype among
    float32, float64, bfloat16, float16. Differentiable in x and weight."""
    require_extension("rms_norm_cpp")
    return torch.ops.ltm.rms_norm(x, None, weight, eps)[0]


def add_rms_norm_cpp(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """`reference.add_rms_norm_ref` through the C++ CPU kernel: (rms_norm(x + residual), x + residual)."""
    require_extension("add_rms_norm_cpp")
    y, h, _ = torch.ops.ltm.rms_norm(x, residual, weight, eps)
    return y, h


def swiglu_cpp(gate: Tensor, up: Tensor) -> Tensor:
    """`reference.swiglu_ref` through the C++ CPU kernel: silu(gate) * up, gate and up of one shape and
    dtype. Differentiable in both."""
    require_extension("swiglu_cpp")
    return torch.ops.ltm.swiglu(gate, up)
