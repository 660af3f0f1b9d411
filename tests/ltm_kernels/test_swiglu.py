"""swiglu_triton (Triton) against swiglu_ref in float64: output, dgate, dup; odd sizes; the bf16 rule on a GPU."""

import pytest
import torch

from ltm_kernels import swiglu_triton
from ltm_kernels.reference import swiglu_ref
from triton_helpers import assert_close, gpu, interpreter, rel_err

F64 = torch.float64


def run(fn, gate, up, dout, dtype, device="cpu"):
    g, u = (t.to(device, dtype, copy=True).requires_grad_(True) for t in (gate, up))
    out = fn(g, u)
    out.backward(dout.to(device, dtype))
    return out, g.grad, u.grad


def make_inputs(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=F64) * 3 for _ in range(3)]


@interpreter
@pytest.mark.parametrize("shape", [(3, 5, 96), (2051,), (1, 7, 1376)])
def test_equals_float64_reference(shape):
    inputs = make_inputs(shape)
    for name, got, want in zip(
        ("out", "dgate", "dup"), run(swiglu_triton, *inputs, torch.float32), run(swiglu_ref, *inputs, F64)
    ):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert_close(got, want, 1e-6, name)


@interpreter
def test_non_contiguous_and_bad_inputs():
    gate, up, _ = make_inputs((6, 8))
    g, u = gate.float().t(), up.float().t()
    assert_close(swiglu_triton(g, u), swiglu_ref(gate.t(), up.t()), 1e-6, "out")
    with pytest.raises(ValueError, match="up must match gate"):
        swiglu_triton(g, u[:2])
    with pytest.raises(TypeError, match="gate must have dtype"):
        swiglu_triton(gate, up)


@interpreter
def test_opcheck_and_torch_compile_fullgraph():
    gate, up, dout = (t.float() for t in make_inputs((3, 5, 40)))
    torch.library.opcheck(
        torch.ops.ltm_triton.swiglu.default, (gate.mT.requires_grad_(True), up.mT.requires_grad_(True))
    )
    torch.library.opcheck(torch.ops.ltm_triton.swiglu_backward.default, (dout, gate, up))
    torch.library.opcheck(torch.ops.ltm_triton.swiglu_backward.default, (dout.mT, gate.mT, up.mT))
    torch._dynamo.reset()
    compiled = torch.compile(lambda g, u: swiglu_triton(g * 2, u), fullgraph=True, backend="aot_eager")
    got = run(compiled, gate, up, dout, torch.float32)
    want = run(lambda g, u: swiglu_triton(g * 2, u), gate, up, dout, torch.float32)
    for name, g, w in zip(("out", "dgate", "dup"), got, want):
        assert_close(g, w, 1e-6, name)


@gpu
@pytest.mark.parametrize("shape", [(4, 1023, 1376), (3, 77, 200)])
def test_gpu_bf16_within_twice_eager_error(shape):
    inputs = make_inputs(shape)
    want = run(swiglu_ref, *inputs, F64)
    eager = run(swiglu_ref, *inputs, torch.bfloat16, "cuda")
    fused = run(swiglu_triton, *inputs, torch.bfloat16, "cuda")
    for name, e, f, ref in zip(("out", "dgate", "dup"), eager, fused, want):
        assert rel_err(f, ref) <= 2 * rel_err(e, ref) + 1e-6, (name, rel_err(f, ref), rel_err(e, ref))
