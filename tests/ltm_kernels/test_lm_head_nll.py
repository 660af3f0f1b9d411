"""lm_head_nll_triton (Triton row kernels) and lm_head_nll_chunked (PyTorch) against the float64
reference lm_head_nll_ref: loss, dH and dW, odd token counts, ignored targets, V = 17 and 50258, chunks that
do not divide the rows; the chunked path's peak memory; input errors; the bf16 rule on a GPU."""

import importlib

import pytest
import torch

from ltm_kernels import lm_head_nll_chunked, lm_head_nll_triton
from ltm_kernels.reference import lm_head_nll_ref
from ltm_kernels.testing import PeakMemory
from triton_helpers import INTERPRETER, assert_close, gpu, interpreter, rel_err

lce = importlib.import_module("ltm_kernels.lm_head_nll")
F64 = torch.float64
# (B, N, d, V, chunk_size): odd token counts, chunks that do not divide B*N, one chunk, V = 50258 on few rows.
SHAPES = [(3, 5, 16, 17, 4), (2, 7, 32, 17, None), (1, 3, 16, 50258, 2), (2, 1, 24, 50258, None)]


def make_inputs(B, N, d, V, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, N, d, generator=g, dtype=F64)
    weight = torch.randn(V, d, generator=g, dtype=F64) / d**0.25  # logits of std ~4: a peaked softmax
    targets = torch.randint(0, V, (B, N), generator=g)
    if ignore:
        targets.view(-1)[::3] = -1  # every third target ignored, whole sequences too when N = 1
    grad = torch.randn(B, generator=g, dtype=F64)  # per-sequence upstream gradient, not all equal
    return hidden, weight, targets, grad


def reference_grads(hidden, weight, targets, grad):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = lm_head_nll_ref(h, w, targets)
    loss.backward(grad)
    return loss.detach(), h.grad, w.grad


def check_against_reference(fn, B, N, d, V, chunk, dtype, tol):
    hidden, weight, targets, grad = make_inputs(B, N, d, V)
    want = reference_grads(hidden, weight, targets, grad)
    h, w = hidden.to(dtype).requires_grad_(True), weight.to(dtype).requires_grad_(True)
    loss = fn(h, w, targets, chunk_size=chunk)
    assert loss.shape == (B,) and loss.dtype == torch.promote_types(dtype, torch.float32)
    loss.backward(grad.to(loss.dtype))
    for name, got, ref in zip(("nll", "dH", "dW"), (loss, h.grad, w.grad), want):
        assert got.dtype == (loss.dtype if name == "nll" else dtype)
        assert_close(got, ref, tol, name)


@pytest.mark.parametrize("B, N, d, V, chunk", SHAPES)
def test_chunked_torch_equals_reference(B, N, d, V, chunk):
    check_against_reference(lm_head_nll_chunked, B, N, d, V, chunk, F64, 1e-12)
    check_against_reference(lm_head_nll_chunked, B, N, d, V, chunk, torch.float32, 1e-5)


@interpreter
@pytest.mark.parametrize("B, N, d, V, chunk", SHAPES)
def test_triton_equals_reference(B, N, d, V, chunk):
    check_against_reference(lm_head_nll_triton, B, N, d, V, chunk, torch.float32, 1e-5)


IMPLS = [lm_head_nll_chunked, pytest.param(lm_head_nll_triton, marks=INTERPRETER)]


@pytest.mark.parametrize("fn", IMPLS)
def test_no_grad_and_non_contiguous_inputs(fn):
    hidden, weight, targets, _ = make_inputs(3, 5, 16, 17)
    want = lm_head_nll_ref(hidden, weight, targets)
    h = hidden.float().transpose(0, 1).contiguous().transpose(0, 1)  # (B, N, d) view with permuted strides
    w = weight.float().t().contiguous().t()
    with torch.no_grad():
        assert_close(fn(h, w, targets, chunk_size=4), want, 1e-5, "nll (no grad)")
    assert_close(fn(h, w, targets[:, :], chunk_size=3), want, 1e-5, "nll (non-contiguous)")


@pytest.mark.parametrize("fn", IMPLS)
def test_all_targets_ignored(fn):
    hidden, weight, targets, _ = make_inputs(2, 3, 16, 17)
    h, w = hidden.float().requires_grad_(True), weight.float().requires_grad_(True)
    loss = fn(h, w, torch.full_like(targets, -1))
    loss.sum().backward()
    assert loss.eq(0).all() and h.grad.eq(0).all() and w.grad.eq(0).all()


@pytest.mark.parametrize("fn", IMPLS)
def test_weight_gradient_only_when_wanted(fn, monkeypatch):
    """The inner loop asks autograd for dL/dz only: the weight (a Parameter) must not get its dW computed."""
    hidden, weight, targets, _ = make_inputs(2, 5, 16, 17)
    z = hidden.float().requires_grad_(True)
    w = torch.nn.Parameter(weight.float())
    loss = fn(z * 1.0, w, targets)

    def fail(*args, **kwargs):
        raise AssertionError("dW computed although only dL/dz was asked for")

    monkeypatch.setattr(lce, "_weight_grad", fail)
    (grad_z,) = torch.autograd.grad(loss.sum(), z)
    h64 = hidden.clone().requires_grad_(True)
    lm_head_nll_ref(h64, weight, targets).sum().backward()
    assert_close(grad_z, h64.grad, 1e-5, "dH")


def test_default_chunk_rows():
    assert lce.default_chunk_rows(65536, 512, 50258) == 1024  # benchmark shape: logits chunk ~ size of hidden
    assert lce.default_chunk_rows(2048, 256, 50258) == 128  # CPU inner loop: at least 2^22 logits a chunk
    assert lce.default_chunk_rows(13, 16, 17) == 13  # small problems: one chunk


# ---------------------------------------------------------------------------------------------- memory


def peak_bytes(fn, B, N, d=16, V=50258, chunk_size=None):
    hidden, weight, targets, _ = make_inputs(B, N, d, V, ignore=False)
    h, w = hidden.float().requires_grad_(True), weight.float().requires_grad_(True)
    with PeakMemory() as mem:
        loss = fn(h, w, targets, **({} if chunk_size is None else dict(chunk_size=chunk_size)))
        loss.sum().backward()  # dH and dW: both passes over the chunks
        del loss
    return mem.peak


def test_chunked_peak_memory_is_bounded_by_the_chunk():
    chunk, V, d = 32, 50258, 16
    chunk_bytes, full_bytes = chunk * V * 4, 512 * V * 4
    # The measurement sees full logits where they exist: the reference holds several (rows, V) tensors.
    assert peak_bytes(lambda h, w, t: lm_head_nll_ref(h, w, t), 2, 256) >= 2 * full_bytes
    small = peak_bytes(lm_head_nll_chunked, 2, 256, chunk_size=chunk)
    large = peak_bytes(lm_head_nll_chunked, 4, 256, chunk_size=chunk)
    assert small >= chunk_bytes  # the chunk buffer inside the registered op is seen
    # A few chunk-sized buffers plus tensors the size of the weight (dW in fp32) and of the hidden states.
    bound = 4 * chunk_bytes + 3 * V * d * 4 + 4 * 1024 * d * 4
    assert small <= bound and large <= bound, (small, large, bound)
    # Doubling the tokens adds only token-sized tensors (dH, lse, loss), nothing of size V per token.
    assert large - small <= 512 * (4 * d + 8) * 4, (small, large)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("fn", IMPLS)
def test_bad_inputs_name_the_argument(fn):
    hidden, weight, targets, _ = make_inputs(2, 3, 16, 17)
    h, w = hidden.float(), weight.float()
    cases = [
        (dict(hidden=h[0]), ValueError, "hidden"),
        (dict(weight=w[:, :8]), ValueError, "weight"),
        (dict(targets=targets[:, :2]), ValueError, "targets"),
        (dict(targets=targets.int()), TypeError, "targets"),
        (dict(weight=w.double()), TypeError, "weight"),
        (dict(targets=torch.full_like(targets, 17)), ValueError, "targets contains id 17"),
        (dict(targets=torch.full_like(targets, -100)), ValueError, "targets contains id -100"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
    ]
    for override, error, word in cases:
        args = dict(hidden=h, weight=w, targets=targets) | override
        with pytest.raises(error, match=word):
            fn(**args)


# ------------------------------------------------------------------------------------ registered ops
OPS = [
    pytest.param("ltm_torch", "lm_head_nll_chunked", id="chunked"),
    pytest.param("ltm_triton", "lm_head_nll", id="triton", marks=INTERPRETER),
]


@pytest.mark.parametrize("namespace, name", OPS)
def test_opcheck(namespace, name):
    """Both ops of each implementation: schema, fake kernels, autograd (dH, dW, or both) under AOTAutograd."""
    forward = getattr(getattr(torch.ops, namespace), name)
    backward = getattr(getattr(torch.ops, namespace), f"{name}_backward")
    hidden, weight, targets, grad = (t.float() if t.is_floating_point() else t for t in make_inputs(2, 5, 16, 17))
    for grad_h, grad_w in ((True, True), (True, False), (False, True)):
        h, w = hidden.clone().requires_grad_(grad_h), weight.clone().requires_grad_(grad_w)
        torch.library.opcheck(forward.default, (h, w, targets, 4, grad_h))
    torch.library.opcheck(forward.default, (hidden, weight, targets, 3, False))
    _, lse, _ = forward(hidden, weight, targets, 4, False)
    torch.library.opcheck(backward.default, (grad, hidden, weight, targets, lse, 4))


@pytest.mark.parametrize("fn", IMPLS)
def test_torch_compile_fullgraph_no_graph_break(fn):
    """The LM head traces into one graph (fullgraph=True raises on a break) and gives the eager results; with
    the weight frozen, as in the inner loop, the compiled backward computes no dW."""
    hidden, weight, targets, grad = make_inputs(2, 5, 16, 17)
    h, w = hidden.float(), weight.float()

    def head(h, w, t):
        return fn(h * 1.0, w, t, chunk_size=4)

    torch._dynamo.reset()
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    for weight_grad in (True, False):
        got, want = [], []
        for f, out in ((compiled, got), (head, want)):
            hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(weight_grad)
            loss = f(hh, ww, targets)
            loss.backward(grad.float())
            out += [loss.detach(), hh.grad] + ([ww.grad] if weight_grad else [])
        for name, g, e in zip(("nll", "dH", "dW"), got, want):
            assert_close(g, e, 1e-6, name)


def test_chunked_graph_has_the_op_and_no_break():
    hidden, weight, targets, _ = make_inputs(2, 3, 16, 17)
    explanation = torch._dynamo.explain(lm_head_nll_chunked)(hidden, weight, targets)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    ops = [str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert "ltm_torch.lm_head_nll_chunked" in ops, ops


@interpreter
def test_triton_refuses_float64():
    hidden, weight, targets, _ = make_inputs(2, 3, 16, 17)
    with pytest.raises(TypeError, match="hidden must have dtype"):
        lm_head_nll_triton(hidden, weight, targets)


# --------------------------------------------------------------------------------------------------- GPU
@gpu
@pytest.mark.parametrize("B, N, d, V, chunk", [(2, 301, 128, 50258, 128), (3, 77, 64, 17, None)])
def test_gpu_bf16_within_twice_eager_error(B, N, d, V, chunk):
    """docs/kernels.md, 'The 2x rule': the fused bf16 error <= 2x the eager bf16 error, both against float64."""
    hidden, weight, targets, grad = make_inputs(B, N, d, V)
    want = reference_grads(hidden, weight, targets, grad)

    def run(fn, dtype, **kw):
        h = hidden.to("cuda", dtype).requires_grad_(True)
        w = weight.to("cuda", dtype).requires_grad_(True)
        loss = fn(h, w, targets.cuda(), **kw)
        loss.backward(grad.to("cuda", loss.dtype))
        return loss, h.grad, w.grad

    eager = run(lm_head_nll_ref, torch.bfloat16)
    fused = run(lm_head_nll_triton, torch.bfloat16, chunk_size=chunk)
    fp32 = run(lm_head_nll_triton, torch.float32, chunk_size=chunk)
    for name, e, f, x, ref in zip(("nll", "dH", "dW"), eager, fused, fp32, want):
        assert_close(x, ref, 1e-4, f"{name} fp32")
        assert rel_err(f, ref) <= 2 * rel_err(e, ref) + 1e-6, (name, rel_err(f, ref), rel_err(e, ref))


@gpu
def test_gpu_peak_memory():
    """Inner-loop mode (dH only) at 16k tokens: peak extra memory ~ a chunk, and <= 1/10 of eager's."""
    B, N, d, V = 16, 1024, 512, 50258
    hidden, weight, targets, _ = make_inputs(B, N, d, V, ignore=False)
    h = hidden.to("cuda", torch.bfloat16).requires_grad_(True)
    w = weight.to("cuda", torch.bfloat16)
    t = targets.cuda()

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        (grad,) = torch.autograd.grad(fn(h, w, t).sum(), h)
        del grad
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    fused, eager = peak(lm_head_nll_triton), peak(lm_head_nll_ref)
    chunk = lce.default_chunk_rows(B * N, d, V)
    assert fused <= 2 * chunk * V * 2 + 4 * h.numel() * 2, (fused, chunk)
    assert fused * 10 <= eager, (fused, eager)


@gpu
def test_gpu_cuda_graph_replay():
    """No host sync inside: the op (forward and dH) captures in a CUDA graph and replays to the same values."""
    hidden, weight, targets, _ = make_inputs(2, 33, 64, 50258)
    h = hidden.to("cuda", torch.bfloat16).requires_grad_(True)
    w, t = weight.to("cuda", torch.bfloat16), targets.cuda()
    expect_loss = lm_head_nll_triton(h, w, t)
    (expect_grad,) = torch.autograd.grad(expect_loss.sum(), h)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as CUDA-graph capture requires
        lm_head_nll_triton(h, w, t)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = lm_head_nll_triton(h, w, t)
        (grad,) = torch.autograd.grad(loss.sum(), h)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(loss, expect_loss) and torch.equal(grad, expect_grad)
