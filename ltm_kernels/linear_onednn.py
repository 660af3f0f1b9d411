"""linear_onednn: y = x W^T on CPU through oneDNN, with an activation-only backward when that is all that is
needed.

Why: on CPU, `F.linear` runs the BLAS that torch links (MKL in the x86 wheels). On AMD EPYC (Zen 4/5) MKL
takes its AVX2 code path and reaches ~200 GFLOP/s on 2 cores at the model's shapes (2048 rows x 256..1408
columns), while oneDNN, which torch also ships, runs AVX-512 kernels there at ~400-460 GFLOP/s
(benchmarks/NOTES.md, "Linear layers"). The backward's dX = dY W is the same GEMM with W^T as the weight;
dW = dY^T X is formed only when the engine will use it (`grad_wanted`): the inner loop never does.

The op is `ltm::linear` (a torch.library custom op; it needs no compiled extension, only a torch built
with oneDNN, which `linear_onednn_status()` reports). Float32 and bfloat16; any leading dimensions.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ._triton import grad_wanted
from .cpuinfo import cpuinfo_value

_DTYPES = (torch.float32, torch.bfloat16)


def linear_onednn_status() -> tuple[bool, str]:
    """(available, reason) for `linear_onednn` on this torch."""
    if not torch.backends.mkldnn.is_available():
        return False, "this torch is built without oneDNN (torch.backends.mkldnn.is_available() is False)"
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False, "this torch has no torch.ops.mkldnn._linear_pointwise"
    return True, "oneDNN linear"


@functools.cache
def blas_outruns_onednn() -> bool:
    """Whether float32 linears run faster through the BLAS torch links than through oneDNN on this CPU: true
    for MKL on an Intel CPU. MKL picks its kernels by CPU vendor. On Intel it runs AVX-512, and it measured ~10%
    ahead of oneDNN over the model's forward and backward shapes; on AMD EPYC it takes its AVX2 path and oneDNN
    is ~2x faster (benchmarks/NOTES.md). Any other CPU or BLAS keeps oneDNN."""
    return torch.backends.mkl.is_available() and cpuinfo_value("vendor_id") == "GenuineIntel"


def _onednn(x: Tensor, weight: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@torch.library.custom_op("ltm::linear", mutates_args=(), device_types="cpu")
def _linear(x: Tensor, weight: Tensor) -> Tensor:
    return _onednn(x, weight)


@_linear.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = _onednn(grad, weight.t().contiguous())
    if grad_wanted(ctx, 1):
        grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    return grad_x, grad_w


_linear.register_autograd(_backward, setup_context=_setup_context)


def linear_onednn(x: Tensor, weight: Tensor) -> Tensor:
    """`F.linear(x, weight)` (no bias) through oneDNN: x (..., k), weight (n, k), CPU, float32 or bfloat16,
    one dtype. Differentiable in both. Raises ValueError / TypeError naming the bad argument."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"linear_onednn: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"linear_onednn: {name} must be a CPU tensor, got one on {t.device}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"linear_onednn: {name} must be float32 or bfloat16, got {t.dtype}")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_onednn: weight must be (n, k) with k = x.shape[-1] = "
            f"{x.shape[-1] if x.dim() else None}, got {tuple(weight.shape)}"
        )
    if x.dtype != weight.dtype:
        raise TypeError(f"linear_onednn: x ({x.dtype}) and weight ({weight.dtype}) must have one dtype")
    return _linear(x, weight)
