"""posterior_step on the GPU path: the Triton kernel (CPU under TRITON_INTERPRET=1, and CUDA) and the C++ CUDA
kernel, against the reference, over several steps of the device-side step counter."""

import importlib.util
import os

import pytest
import torch

import ltm_kernels
from ltm_kernels import posterior_step_cpp, posterior_step_ref, posterior_step_triton
from triton_helpers import gpu, interpreter

# The CPU test file's helpers (same state, tolerances and loop), loaded by path: the test folders are not packages.
_spec = importlib.util.spec_from_file_location(
    "_posterior_step_cpu_tests", os.path.join(os.path.dirname(__file__), "test_posterior_step.py")
)
_cpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cpu)
make_state, run_steps, assert_state_close, counter, NAMES = (
    _cpu.make_state,
    _cpu.run_steps,
    _cpu.assert_state_close,
    _cpu.counter,
    _cpu.NAMES,
)

HAS_CUDA_OP = ltm_kernels.has_op("posterior_step", "cuda")
needs_cuda_op = pytest.mark.skipif(
    not HAS_CUDA_OP,
    reason="the extension has no CUDA kernel for ltm::posterior_step "
    "(built only when torch has CUDA and nvcc is present)",
)


def inputs(shape, dtype, steps, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=gen).to(dtype)
    grads = [torch.randn(shape, generator=gen).to(dtype) for _ in range(steps)]
    return noise.to(device), [g.to(device) for g in grads]


def run(step_fn, shape, dtype, schedule, steps=5, device="cpu"):
    noise, grads = inputs(shape, dtype, steps, device)
    state = [t.to(device) for t in make_state(shape, dtype)]
    run_steps(step_fn, state, noise, grads, steps, schedule)
    return state


# ------------------------------------------------------------------------- Triton under the interpreter (CPU)
@interpreter
@pytest.mark.parametrize("schedule", [0, 1, 2], ids=["cosine", "linear", "constant"])
@pytest.mark.parametrize("shape", [(3, 5, 7), (4, 16, 1000)])  # one program; 63 programs (the counter's tickets)
def test_triton_matches_reference_interpreted(shape, schedule):
    """fp32, 5 steps: the same tolerance as the C++ kernel's (both differ from the reference only in rounding)."""
    got = run(posterior_step_triton, shape, torch.float32, schedule)
    want = run(posterior_step_ref, shape, torch.float32, schedule)
    assert_state_close(got, want, **_cpu.TOLERANCES[torch.float32])


@interpreter
def test_triton_opcheck():
    """ltm_triton::posterior_step declares its mutations (schema check), and its fake traces (AOTAutograd)."""
    shape = (2, 3, 5)
    noise, (grad,) = inputs(shape, torch.float32, 1)
    for schedule in range(3):
        args = (*make_state(shape, torch.float32), grad, noise, counter(1), 0.34, 4, schedule, 0.9, 0.999, 1e-8, 0.01)
        torch.library.opcheck(torch.ops.ltm_triton.posterior_step.default, args)


@interpreter
def test_triton_counter_survives_many_programs_and_resumes():
    """The ticket scheme leaves the counter at exactly t + 1 after each launch, from any starting t."""
    shape = (2, 8, 1000)  # 16 programs
    noise, (grad,) = inputs(shape, torch.float32, 1)
    for start in (0, 5, 2**31 + 3):
        state, step = make_state(shape, torch.float32), counter(start)
        posterior_step_triton(*state, grad, noise, step, 0.34, 10, 0)
        assert step.item() == start + 1


@interpreter
def test_triton_bad_input_names_the_argument():
    shape = (2, 3, 4)
    state = make_state(shape, torch.float32)
    noise, (grad,) = inputs(shape, torch.float32, 1)
    with pytest.raises(ValueError, match="noise must match mu"):
        posterior_step_triton(*state, grad, noise[..., :-1], counter(), 0.34, 4)
    with pytest.raises(ValueError, match="step must be a one-element int64 tensor"):
        posterior_step_triton(*state, grad, noise, counter().int(), 0.34, 4)
    with pytest.raises(ValueError, match="schedule"):
        posterior_step_triton(*state, grad, noise, counter(), 0.34, 4, 3)
    with pytest.raises(TypeError, match="mu must have dtype"):
        posterior_step_triton(*make_state(shape, torch.float64), grad.double(), noise.double(), counter(), 0.34, 4)


# ------------------------------------------------------------------------------------------------ GPU
@gpu
@needs_cuda_op
@pytest.mark.parametrize("schedule", [0, 1, 2], ids=["cosine", "linear", "constant"])
@pytest.mark.parametrize("shape", [(3, 5, 7), (4, 16, 1000), (64, 96, 512)])
def test_cuda_op_matches_reference(shape, schedule):
    """fp64 and fp32 against the CPU reference (same inputs); odd sizes take the element-wise tail."""
    for dtype in (torch.float64, torch.float32):
        got = run(posterior_step_cpp, shape, dtype, schedule, device="cuda")
        want = run(posterior_step_ref, shape, dtype, schedule)
        assert_state_close([t.cpu() for t in got], want, **_cpu.TOLERANCES[dtype])


@gpu
@needs_cuda_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_op_low_precision_error(dtype):
    """docs/kernels.md, 'The 2x rule': the CUDA op's error is at most 2x the eager op's in the same dtype (both on GPU),
    against the fp64 reference."""
    shape = (2, 24, 64)
    fused = run(posterior_step_cpp, shape, dtype, 0, device="cuda")
    eager = run(posterior_step_ref, shape, dtype, 0, device="cuda")
    noise, grads = inputs(shape, dtype, 5)
    exact = [t.double() for t in make_state(shape, dtype)]
    run_steps(posterior_step_ref, exact, noise.double(), [g.double() for g in grads], 5)
    for name, f, e, x in zip(NAMES, fused, eager, exact):
        fused_err = (f.double().cpu() - x).abs().max().item()
        eager_err = (e.double().cpu() - x).abs().max().item()
        floor = torch.finfo(dtype).eps * x.abs().max().item()
        assert fused_err <= 2 * eager_err + floor, f"{name}: fused {fused_err:.3g} vs eager {eager_err:.3g}"


@gpu
@needs_cuda_op
def test_cuda_opcheck():
    shape = (2, 3, 5)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        state = [t.cuda() for t in make_state(shape, dtype)]
        noise, (grad,) = inputs(shape, dtype, 1, "cuda")
        for schedule in range(3):
            args = (*state, grad, noise, counter(1, "cuda"), 0.34, 4, schedule, 0.9, 0.999, 1e-8, 0.01)
            torch.library.opcheck(torch.ops.ltm.posterior_step.default, args)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_matches_reference_on_cuda(dtype):
    """Triton against the CUDA op where built (bit-level agreement not expected: different exp), else against
    the reference; fp32 to the CPU tolerance, half types to two ulps of the largest value."""
    shape = (64, 96, 512)
    got = run(posterior_step_triton, shape, dtype, 0, device="cuda")
    want = run(posterior_step_cpp if HAS_CUDA_OP else posterior_step_ref, shape, dtype, 0, device="cuda")
    if dtype == torch.float32:
        assert_state_close(got, want, **_cpu.TOLERANCES[dtype])
    else:
        for name, a, b in zip(NAMES, got, want):
            bound = 2 * torch.finfo(dtype).eps * b.float().abs().max().item()
            assert (a.float() - b.float()).abs().max().item() <= bound, name


@gpu
@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_op_replays_in_a_cuda_graph(impl):
    """T steps captured once: the counter advances on the device and each replayed step uses its own lr, so
    one replay equals T eager calls, bit for bit."""
    if impl == "cuda" and not HAS_CUDA_OP:
        pytest.skip("no CUDA kernel for ltm::posterior_step in this build")
    fn = posterior_step_cpp if impl == "cuda" else posterior_step_triton
    shape, steps = (8, 24, 512), 6
    noise, grads = inputs(shape, torch.float32, steps, "cuda")
    eager = [t.cuda() for t in make_state(shape, torch.float32)]
    run_steps(fn, eager, noise, grads, steps)
    state = [t.cuda() for t in make_state(shape, torch.float32)]
    step = counter(device="cuda")
    fn(*[t.clone() for t in state], grads[0], noise, step.clone(), 0.34, steps, 0)  # warm-up (Triton compiles)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for t in range(steps):
            fn(*state, grads[t], noise, step, 0.34, steps, 0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph.replay()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert step.item() == steps
    for name, a, b in zip(NAMES, state, eager):
        assert torch.equal(a, b), name
