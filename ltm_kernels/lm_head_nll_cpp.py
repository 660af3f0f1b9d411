"""lm_head_nll_cpp: the LM head and its cross-entropy as one C++ CPU kernel, without (rows x V) logits.

For hidden (B, N, d), weight (V, d) and targets (B, N) (-1 = ignored):

    l = h W^T (per row),   nll_b = sum_n [lse(l_bn) - l_bn[t_bn]],   lse = logsumexp over the vocabulary
    d nll_b / d h_bn = softmax(l_bn) W - W[t_bn]            (dh, 0 for ignored rows)
    d nll_b / d W    = sum_n (softmax(l_bn) - onehot(t_bn))^T h_bn

Why: the inner loop evaluates this at every step for B * N = 2048 rows and V = 50258, and it is ~3/4 of the
loop's FLOPs. The eager chunked loss (`lm_head_nll_chunked`) writes each chunk's logits to memory, reads them
back for the softmax and again for dh, and its GEMMs run at what torch.mm reaches for these shapes. The
kernel (csrc/lm_head.cpp) makes the forward and dh in one pass over the vocabulary, consuming each block of
logits in cache with an online softmax; dh costs one more GEMM per block, and dW (decoder updates only) is
computed in the backward from the saved lse, and only when the engine will use it (`grad_wanted`): the
inner loop's `autograd.grad(loss, z)` never pays for it.

Ops (schemas in csrc/ltm_ops.cpp), CPU kernels only:
    torch.ops.ltm.lm_head_nll(hidden, weight, targets, compute_grad) -> (nll, lse, dh)
    torch.ops.ltm.lm_head_nll_backward(grad, hidden, weight, targets, lse, dh, hidden_grad, weight_grad)
        -> (grad_hidden, grad_weight)
nll, lse and dh are float32 (float64 for float64 inputs); bfloat16 / float16 inputs are computed in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._extension import has_op, on_load, require_extension
from ._triton import grad_wanted


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _forward_fake(hidden, weight, targets, compute_grad):
    B, N, d = hidden.shape
    ct = _compute_dtype(hidden)
    dh = hidden.new_empty((B, N, d) if compute_grad else (0,), dtype=ct)
    return hidden.new_empty((B,), dtype=ct), hidden.new_empty((B * N,), dtype=ct), dh


def _backward_fake(grad, hidden, weight, targets, lse, dh, hidden_grad, weight_grad):
    return (
        torch.empty_like(hidden) if hidden_grad else hidden.new_empty((0,)),
        torch.empty_like(weight) if weight_grad else weight.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, compute_grad = inputs
    _, lse, dh = output
    ctx.save_for_backward(hidden, weight, targets, lse, dh)
    ctx.compute_grad = compute_grad
    ctx.mark_non_differentiable(lse, dh)


def _backward(ctx, grad, grad_lse, grad_dh):
    hidden, weight, targets, lse, dh = ctx.saved_tensors
    want_h = ctx.compute_grad and grad_wanted(ctx, 0)
    want_w = grad_wanted(ctx, 1)
    if ctx.needs_input_grad[0] and not ctx.compute_grad:
        raise RuntimeError(
            "lm_head_nll: the forward ran with compute_grad=False, so there is no gradient for "
            "hidden; call it with compute_grad=True (lm_head_nll_cpp does so under autograd)"
        )
    grad_h, grad_w = torch.ops.ltm.lm_head_nll_backward(grad, hidden, weight, targets, lse, dh, want_h, want_w)
    return (grad_h if want_h else None), (grad_w if want_w else None), None, None


@on_load
def _register() -> None:
    if has_op("lm_head_nll", "meta"):
        return
    torch.library.register_fake("ltm::lm_head_nll")(_forward_fake)
    torch.library.register_fake("ltm::lm_head_nll_backward")(_backward_fake)
    torch.library.register_autograd("ltm::lm_head_nll", _backward, setup_context=_setup_context)


def lm_head_nll_cpp(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """`reference.lm_head_nll_ref` through the C++ CPU kernel: per-sequence summed NLL (B,) of
    logits = hidden @ weight.T, targets == -1 ignored.

    hidden (B, N, d) and weight (V, d) of one dtype among float32, float64, bfloat16, float16; targets (B, N)
    int64 in [0, V) or -1. CPU tensors. The result is float32 (float64 for float64 inputs). Differentiable in
    hidden and weight; dh is made in the forward only when hidden requires grad. Raises RuntimeError if the
    extension is not built, and on bad input (naming the argument).
    """
    require_extension("lm_head_nll_cpp")
    compute_grad = torch.is_grad_enabled() and hidden.requires_grad
    return torch.ops.ltm.lm_head_nll(hidden, weight, targets, compute_grad)[0]
