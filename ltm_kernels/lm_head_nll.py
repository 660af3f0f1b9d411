"""lm_head_nll_triton / lm_head_nll_chunked: the tied LM head and the cross-entropy, chunked over tokens.

For hidden states h (B, N, d), the output weight W (V, d) and targets t (B, N) (t = -1: ignored):

    logits = h @ W.T                                   # never formed whole: (B*N, V) is 6.6 GB in bf16
    nll[b] = sum_n  logsumexp(logits[b, n]) - logits[b, n, t[b, n]]              (B,), fp32 statistics
    dnll/dlogits[b, n] = softmax(logits[b, n]) - onehot(t[b, n])
    dH = dlogits @ W,   dW = dlogits.T @ h

Why chunk: at 64 x 1024 tokens and V = 50258 the logits are the largest tensor of the inner step, and
eager PyTorch writes and reads them (plus fp32 copies, softmax, and their gradients) several times. Here
the rows are processed `chunk_rows` at a time: one (chunk_rows, V) buffer holds a chunk's logits, which a
row kernel turns, in place, into its gradient; the GEMMs stay in cuBLAS. Extra memory is that buffer,
about the size of h by default, instead of (B*N, V).

Why the gradient is computed in the forward (as Liger-Kernel does): the loss is a sum, so dlogits does
not depend on the upstream gradient except for a per-sequence factor g[b]. The forward therefore
computes dH for g = 1 while the chunk's logits are at hand, and the backward only scales it:
dH = g[b] * dH|g=1. The inner loop thus costs two GEMMs (logits, dH), not three. dW needs g inside
the sum over rows, so it is computed in the backward, only when wanted (the decoder update, not the inner
loop), recomputing each chunk's logits from the saved logsumexp.

Two row implementations share the chunk loop: Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1:
`lm_head_nll_triton`, ops `ltm_triton::lm_head_nll*`) and plain PyTorch (any device and dtype:
`lm_head_nll_chunked`, ops `ltm_torch::lm_head_nll_chunked*`, the eager backend's LM head). Both are
registered ops, so torch.compile(fullgraph=True) traces through them without a graph break. The unchunked
math is `reference.lm_head_nll_ref`.

No host synchronisation: everything stays on the device, so the op can be captured in a CUDA graph.
Target ids are checked on CPU (free there); on CUDA, where a check would stall the host, a target outside
[-1, V) makes its sequence's loss and gradients NaN instead (callers validate once, as LTMDecoder does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton import TRITON_AVAILABLE, check_triton_tensor, grad_wanted, tl, triton

# ----------------------------------------------------------------------------------------------- kernels
if TRITON_AVAILABLE:

    @triton.jit
    def _row_scale(target, V, scale):
        # Ignored rows (-1) contribute nothing; a target outside [-1, V) poisons its row with NaN.
        valid = (target >= 0) & (target < V)
        return tl.where(target == -1, 0.0, tl.where(valid, scale, float("nan")))

    @triton.jit
    def _write_dlogits(row_ptr, target, lse, scale, V, BLOCK_V: tl.constexpr):
        """row <- scale * (softmax(row) - onehot(target)), in place, in the row's dtype."""
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(row_ptr + cols, (g * scale).to(row_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _lce_fwd_kernel(
        logits_ptr, stride_row, targets_ptr, loss_ptr, lse_ptr, V, BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr
    ):
        """One row of a chunk: logsumexp by an online max/sum over V in blocks, the loss, and (when the
        inputs need gradients) the row's dlogits for g = 1, written over its logits."""
        row = tl.program_id(0)
        row_ptr = logits_ptr + row.to(tl.int64) * stride_row
        target = tl.load(targets_ptr + row)
        m = float("-inf")  # running max and sum of exp(x - m), in fp32 whatever the logits' dtype
        s = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        valid = (target >= 0) & (target < V)
        x_target = tl.load(row_ptr + tl.where(valid, target, 0)).to(tl.float32)
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, (lse - x_target) * _row_scale(target, V, 1.0))
        if WRITE_GRAD:
            _write_dlogits(row_ptr, target, lse, _row_scale(target, V, 1.0), V, BLOCK_V)

    @triton.jit
    def _lce_bwd_kernel(logits_ptr, stride_row, targets_ptr, lse_ptr, scale_ptr, V, BLOCK_V: tl.constexpr):
        """One row of a recomputed chunk: dlogits scaled by its sequence's upstream gradient (for dW)."""
        row = tl.program_id(0)
        target = tl.load(targets_ptr + row)
        scale = _row_scale(target, V, tl.load(scale_ptr + row))
        _write_dlogits(logits_ptr + row.to(tl.int64) * stride_row, target, tl.load(lse_ptr + row), scale, V, BLOCK_V)


# --------------------------------------------------------------------------------------------- launchers
def _launch_config(V: int) -> dict:
    # Up to 8192 logits per block (32 KB of fp32 over 16 warps: 16 per thread), fewer warps for small V.
    block = min(triton.next_power_of_2(V), 8192)
    return dict(BLOCK_V=block, num_warps=16 if block >= 4096 else 4)


def _rows_fwd_triton(logits: Tensor, targets: Tensor, loss: Tensor, lse: Tensor, write_grad: bool) -> None:
    n, V = logits.shape
    _lce_fwd_kernel[(n,)](logits, logits.stride(0), targets, loss, lse, V, WRITE_GRAD=write_grad, **_launch_config(V))


def _rows_bwd_triton(logits: Tensor, targets: Tensor, lse: Tensor, scale: Tensor) -> None:
    n, V = logits.shape
    _lce_bwd_kernel[(n,)](logits, logits.stride(0), targets, lse, scale, V, **_launch_config(V))


def _row_scale_torch(targets: Tensor, V: int, scale: Tensor) -> Tensor:
    valid = (targets >= 0) & (targets < V)
    return torch.where(targets == -1, 0.0, torch.where(valid, scale, float("nan")))


def _dlogits_torch(logits: Tensor, x: Tensor, targets: Tensor, lse: Tensor, scale: Tensor) -> None:
    """logits <- scale * (softmax - onehot); x is logits in the statistics dtype (the same tensor for fp32)."""
    V = x.shape[1]
    x.sub_(lse[:, None]).exp_()
    valid = ((targets >= 0) & (targets < V))[:, None].to(x.dtype)
    x.scatter_add_(1, targets.clamp(0, V - 1)[:, None], -valid)
    x.mul_(_row_scale_torch(targets, V, scale)[:, None])
    if x.data_ptr() != logits.data_ptr():
        logits.copy_(x)


def _rows_fwd_torch(logits: Tensor, targets: Tensor, loss: Tensor, lse: Tensor, write_grad: bool) -> None:
    V = logits.shape[1]
    x = logits.to(lse.dtype)  # fp32 copy of a half chunk; the chunk itself otherwise
    torch.logsumexp(x, dim=-1, out=lse)
    x_target = x.gather(1, targets.clamp(0, V - 1)[:, None])[:, 0]
    one = torch.ones((), dtype=lse.dtype, device=lse.device)
    loss.copy_((lse - x_target) * _row_scale_torch(targets, V, one))
    if write_grad:
        _dlogits_torch(logits, x, targets, lse, one)


def _rows_bwd_torch(logits: Tensor, targets: Tensor, lse: Tensor, scale: Tensor) -> None:
    _dlogits_torch(logits, logits.to(lse.dtype), targets, lse, scale)


_ROWS = {"triton": (_rows_fwd_triton, _rows_bwd_triton), "torch": (_rows_fwd_torch, _rows_bwd_torch)}


def default_chunk_rows(n_rows: int, d: int, V: int) -> int:
    """Rows per chunk: a power of two whose logits (rows x V) are about the size of the hidden states
    (n_rows x d), and at least 2^22 elements so that small problems run as one chunk and GEMMs stay large."""
    rows = max(n_rows * d, 1 << 22) // V
    return min(n_rows, 1 << max(rows - 1, 0).bit_length())


def _forward(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int, impl: str, want_dh: bool):
    """(nll (B,), lse (B*N,), dH for g = 1 (B, N, d) or None): the chunk loop."""
    B, N, d = hidden.shape
    V, M = weight.shape[0], B * N
    h, t = hidden.reshape(M, d), targets.reshape(M)
    stats = torch.promote_types(hidden.dtype, torch.float32)
    loss = torch.empty(M, dtype=stats, device=hidden.device)
    lse = torch.empty(M, dtype=stats, device=hidden.device)
    dh = torch.empty(M, d, dtype=hidden.dtype, device=hidden.device) if want_dh else None
    buf = torch.empty(min(chunk_rows, M), V, dtype=hidden.dtype, device=hidden.device)  # the only (., V) tensor
    rows_fwd = _ROWS[impl][0]
    for start in range(0, M, chunk_rows):
        end = min(start + chunk_rows, M)
        logits = torch.mm(h[start:end], weight.t(), out=buf[: end - start])
        rows_fwd(logits, t[start:end], loss[start:end], lse[start:end], want_dh)
        if want_dh:
            torch.mm(logits, weight, out=dh[start:end])
    return loss.view(B, N).sum(-1), lse, None if dh is None else dh.view(B, N, d)


def _weight_grad(
    hidden: Tensor, weight: Tensor, targets: Tensor, lse: Tensor, grad: Tensor, chunk_rows: int, impl: str
) -> Tensor:
    """dW = sum over chunks of (g * dlogits).T @ h, logits recomputed; accumulated in fp32 (or fp64)."""
    B, N, d = hidden.shape
    V, M = weight.shape[0], B * N
    h, t = hidden.reshape(M, d), targets.reshape(M)
    scale = grad.to(lse.dtype).repeat_interleave(N)  # (M,), contiguous: the kernel indexes it by row
    dw = torch.zeros(V, d, dtype=lse.dtype, device=weight.device)
    buf = torch.empty(min(chunk_rows, M), V, dtype=hidden.dtype, device=hidden.device)
    rows_bwd = _ROWS[impl][1]
    for start in range(0, M, chunk_rows):
        end = min(start + chunk_rows, M)
        logits = torch.mm(h[start:end], weight.t(), out=buf[: end - start])
        rows_bwd(logits, t[start:end], lse[start:end], scale[start:end])
        if dw.dtype == logits.dtype:
            dw.addmm_(logits.t(), h[start:end])
        else:  # half inputs: a (V, d) half product per chunk, summed in fp32 so chunking adds no rounding
            dw.add_(torch.mm(logits.t(), h[start:end]))
    return dw.to(weight.dtype)


# ------------------------------------------------------------------------------------------ registration
# Two implementations (Triton row kernels, plain PyTorch rows), each two opaque ops for torch.compile and
# CUDA graphs, autograd from Python:
#   ltm_triton::lm_head_nll(hidden, weight, targets, chunk_rows, compute_grad_hidden) -> (nll, lse, grad_hidden)
#   ltm_triton::lm_head_nll_backward(grad, hidden, weight, targets, lse, chunk_rows) -> grad_weight
# and the same schemas as ltm_torch::lm_head_nll_chunked / ltm_torch::lm_head_nll_chunked_backward.
# nll (B,) and lse (B*N,) in the statistics dtype (fp32, fp64 for fp64); grad_hidden is dnll.sum()/dhidden
# (g = 1, see the module docstring) when compute_grad_hidden, else empty (0,): the autograd backward scales it
# by the upstream gradient. grad_weight is computed in the backward, only when wanted. Inputs as
# `_check_inputs` validates them; the target range is checked inside the op on CPU (a data-dependent check
# that would otherwise break a torch.compile graph).
_OPS = {"triton": "ltm_triton::lm_head_nll", "torch": "ltm_torch::lm_head_nll_chunked"}


def _check_targets(targets: Tensor, V: int) -> None:
    if targets.device.type == "cpu":  # free on CPU; on CUDA it would sync the host (see the module docstring)
        bad = targets[(targets < -1) | (targets >= V)]
        if bad.numel():
            raise ValueError(f"targets contains id {int(bad[0])}, outside [-1, {V}) (-1 = ignored)")


def _define(impl: str):
    name = _OPS[impl]

    @torch.library.custom_op(name, mutates_args=())
    def forward_op(
        hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int, compute_grad_hidden: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        _check_targets(targets, weight.shape[0])
        nll, lse, dh = _forward(hidden, weight, targets.contiguous(), chunk_rows, impl, compute_grad_hidden)
        return nll, lse, hidden.new_empty(0) if dh is None else dh

    @torch.library.register_fake(name)
    def _(hidden, weight, targets, chunk_rows, compute_grad_hidden):
        B, N, d = hidden.shape
        stats = torch.promote_types(hidden.dtype, torch.float32)
        dh_shape = (B, N, d) if compute_grad_hidden else (0,)
        return (hidden.new_empty(B, dtype=stats), hidden.new_empty(B * N, dtype=stats), hidden.new_empty(dh_shape))

    @torch.library.custom_op(f"{name}_backward", mutates_args=())
    def backward_op(
        grad: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor, lse: Tensor, chunk_rows: int
    ) -> Tensor:
        return _weight_grad(hidden, weight, targets.contiguous(), lse, grad, chunk_rows, impl)

    @torch.library.register_fake(f"{name}_backward")
    def _(grad, hidden, weight, targets, lse, chunk_rows):
        return torch.empty_like(weight, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        hidden, weight, targets, chunk_rows, _ = inputs
        _, lse, dh = output
        ctx.save_for_backward(hidden, weight, targets, lse, dh)
        ctx.chunk_rows = chunk_rows
        ctx.mark_non_differentiable(lse, dh)

    def backward(ctx, grad, _grad_lse, _grad_dh):
        hidden, weight, targets, lse, dh = ctx.saved_tensors
        grad_h = grad_w = None
        if grad_wanted(ctx, 0):
            if dh.numel() == 0 and hidden.numel() != 0:
                raise RuntimeError(
                    f"{name}: the gradient of hidden is wanted, but the forward was called with "
                    "compute_grad_hidden=False"
                )
            grad_h = (dh * grad[:, None, None]).to(hidden.dtype)
        if grad_wanted(ctx, 1):  # not in the inner loop: the decoder weight is a Parameter nobody asks about
            grad_w = backward_op(grad, hidden, weight, targets, lse, ctx.chunk_rows)
        return grad_h, grad_w, None, None, None

    torch.library.register_autograd(name, backward, setup_context=setup_context)


for _impl in _OPS:
    _define(_impl)


# ------------------------------------------------------------------------------------------- functional
def _check_inputs(hidden, weight, targets, chunk_size) -> int:
    """Validate the arguments (naming the bad one); returns the rows per chunk."""
    for name, x in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if hidden.dim() != 3 or 0 in hidden.shape:
        raise ValueError(f"hidden must have shape (B, N, d), non-empty, got {tuple(hidden.shape)}")
    B, N, d = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != d or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (V, d={d}), got {tuple(weight.shape)}")
    if tuple(targets.shape) != (B, N):
        raise ValueError(f"targets must have shape (B, N) = {(B, N)}, got {tuple(targets.shape)}")
    if not hidden.dtype.is_floating_point:
        raise TypeError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be an int64 tensor of token ids, got {targets.dtype}")
    for name, x in (("weight", weight), ("targets", targets)):
        if x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but hidden is on {hidden.device}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size or default_chunk_rows(B * N, d, weight.shape[0])


def _apply(op, hidden, weight, targets, chunk_size) -> Tensor:
    chunk_rows = _check_inputs(hidden, weight, targets, chunk_size)
    compute_grad_hidden = torch.is_grad_enabled() and hidden.requires_grad
    return op(hidden, weight, targets, chunk_rows, compute_grad_hidden)[0]


def lm_head_nll_triton(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int | None = None) -> Tensor:
    """Per-sequence summed NLL (B,) of logits = hidden @ weight.T, with the Triton row kernels.

    hidden (B, N, d) and weight (V, d): fp32, bf16 or fp16, on CUDA (or CPU under TRITON_INTERPRET=1);
    targets (B, N) int64, -1 = ignored. The result is fp32. `chunk_size`: rows per chunk (default
    `default_chunk_rows`); extra memory is one (chunk_size, V) buffer. Differentiable in hidden and weight.
    """
    check_triton_tensor(hidden, "hidden")
    return _apply(torch.ops.ltm_triton.lm_head_nll, hidden, weight, targets, chunk_size)


def lm_head_nll_chunked(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int | None = None) -> Tensor:
    """`lm_head_nll_triton` in plain PyTorch: any device, any floating dtype (fp64 stays fp64)."""
    return _apply(torch.ops.ltm_torch.lm_head_nll_chunked, hidden, weight, targets, chunk_size)
