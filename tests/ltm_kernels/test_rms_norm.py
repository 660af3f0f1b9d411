"""rms_norm_triton / add_rms_norm_triton against rms_norm_ref / add_rms_norm_ref in float64: outputs, dx, the
residual's gradient and dw; odd widths and row counts, non-contiguous inputs; the bf16 rule on a GPU."""

import pytest
import torch

from ltm_kernels import add_rms_norm_triton, rms_norm_triton
from ltm_kernels.reference import add_rms_norm_ref, rms_norm_ref
from triton_helpers import assert_close, gpu, interpreter, rel_err

F64, EPS = torch.float64, 1e-5


def make_inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=F64) * 3
    r = torch.randn(shape, generator=g, dtype=F64)
    w = 1 + 0.3 * torch.randn(shape[-1], generator=g, dtype=F64)
    dy = torch.randn(shape, generator=g, dtype=F64)
    dh = torch.randn(shape, generator=g, dtype=F64)
    return x, r, w, dy, dh


def run(fn, residual, x, r, w, dy, dh, dtype, device="cpu"):
    """Outputs and gradients of fn; with a residual, both outputs (normed, h) get an upstream gradient."""
    leaves = [t.to(device, dtype, copy=True).requires_grad_(True) for t in ((x, r, w) if residual else (x, w))]
    out = fn(*leaves, EPS)
    outs = out if residual else (out,)
    torch.autograd.backward(outs, [g.to(device, o.dtype) for g, o in zip((dy, dh), outs)])
    return [*outs, *(t.grad for t in leaves)]


SHAPES = [(3, 5, 64), (7, 33), (1, 130)]


@interpreter
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_equals_float64_reference(shape, residual):
    inputs = make_inputs(shape)
    want = run(add_rms_norm_ref if residual else rms_norm_ref, residual, *inputs, F64)
    got = run(add_rms_norm_triton if residual else rms_norm_triton, residual, *inputs, torch.float32)
    names = ("y", "h", "dx", "dr", "dw") if residual else ("y", "dx", "dw")
    assert len(got) == len(names)
    for name, g, w in zip(names, got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        assert_close(g, w, 2e-6, name)


@interpreter
def test_non_contiguous_input_and_no_weight_grad():
    x, r, w, dy, _ = make_inputs((4, 6, 32))
    xt = x.float().transpose(0, 1).requires_grad_(True)  # (6, 4, 32) view, not contiguous
    y = rms_norm_triton(xt, w.float(), EPS)  # weight does not require grad: no dw
    y.backward(dy.float().transpose(0, 1))
    x64 = x.transpose(0, 1).clone().requires_grad_(True)
    rms_norm_ref(x64, w, EPS).backward(dy.transpose(0, 1))
    assert_close(y, rms_norm_ref(x.transpose(0, 1), w, EPS), 2e-6, "y")
    assert_close(xt.grad, x64.grad, 2e-6, "dx")


@interpreter
def test_bad_inputs_name_the_argument():
    x, r, w, *_ = make_inputs((2, 16))
    x, r, w = x.float(), r.float(), w.float()
    with pytest.raises(ValueError, match="weight"):
        rms_norm_triton(x, w[:8], EPS)
    with pytest.raises(TypeError, match="x must have dtype"):
        rms_norm_triton(x.double(), w, EPS)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm_triton(x, r[:1], w, EPS)
    with pytest.raises(ValueError, match="eps"):
        rms_norm_triton(x, w, 0.0)


@interpreter
def test_opcheck():
    """The four registered ops: schema, fake kernels, autograd (with and without dw), under AOTAutograd."""
    x, r, w, dy, dh = (t.float() for t in make_inputs((3, 5, 48)))
    for weight_grad in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in (x, r)] + [w.clone().requires_grad_(weight_grad)]
        torch.library.opcheck(torch.ops.ltm_triton.rms_norm.default, (leaves[0], leaves[2], EPS))
        torch.library.opcheck(torch.ops.ltm_triton.add_rms_norm.default, (*leaves, EPS))
    xt = x.transpose(0, 1)  # not contiguous
    _, rstd = torch.ops.ltm_triton.rms_norm(xt, w, EPS)
    _, h, h_rstd = torch.ops.ltm_triton.add_rms_norm(x, r, w, EPS)
    for compute_dw in (True, False):
        torch.library.opcheck(
            torch.ops.ltm_triton.rms_norm_backward.default, (dy.float().transpose(0, 1), xt, w, rstd, compute_dw)
        )
        for grad_h in (dh, None):
            torch.library.opcheck(
                torch.ops.ltm_triton.add_rms_norm_backward.default, (dy, grad_h, h, w, h_rstd, compute_dw)
            )


@interpreter
@pytest.mark.parametrize("residual", [False, True])
def test_torch_compile_fullgraph(residual):
    """torch.compile traces the registered ops without a graph break (aot_eager: no C++ compiler needed)."""
    inputs = make_inputs((2, 3, 32))

    def fn(*args):
        out = (add_rms_norm_triton if residual else rms_norm_triton)(*args)
        return tuple(o * 2 for o in out) if residual else out * 2

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for g, w in zip(run(compiled, residual, *inputs, torch.float32), run(fn, residual, *inputs, torch.float32)):
        assert_close(g, w, 1e-6, "compiled")


@gpu
@pytest.mark.parametrize("shape", [(4, 1023, 512), (3, 77, 200)])
@pytest.mark.parametrize("residual", [False, True])
def test_gpu_bf16_within_twice_eager_error(shape, residual):
    inputs = make_inputs(shape)
    ref_fn, fused_fn = (add_rms_norm_ref, add_rms_norm_triton) if residual else (rms_norm_ref, rms_norm_triton)
    want = run(ref_fn, residual, *inputs, F64)
    eager = run(ref_fn, residual, *inputs, torch.bfloat16, "cuda")
    fused = run(fused_fn, residual, *inputs, torch.bfloat16, "cuda")
    fp32 = run(fused_fn, residual, *inputs, torch.float32, "cuda")
    for i, (e, f, x, ref) in enumerate(zip(eager, fused, fp32, want)):
        assert_close(x, ref, 1e-5, f"output/grad {i} fp32")
        assert rel_err(f, ref) <= 2 * rel_err(e, ref) + 1e-6, (i, rel_err(f, ref), rel_err(e, ref))
