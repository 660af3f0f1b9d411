"""Micro-benchmarks of every op and every implementation, under pytest-benchmark:

    pytest benchmarks --benchmark-only                      # this device's sizes (CUDA: ltm-l-like, CPU: small)
    pytest benchmarks --benchmark-only --op-size tiny       # tiny shapes, timed
    pytest benchmarks --benchmark-disable --op-size tiny    # each once, untimed: checks that every one runs
    pytest benchmarks --benchmark-only --benchmark-json=out.json

Ops (`ltm_kernels.<op>_<impl>`): rms_norm, add_rms_norm, swiglu, self_attention, latent_attention, lm_head_nll,
posterior_step; implementations ref (eager PyTorch), triton (CUDA only: the interpreter is for tests), cpp
(where the extension has a kernel for the device) and, for the LM head, chunked. An implementation that cannot
run here is skipped with the reason. Differentiable ops are timed forward and forward + backward (the
activation gradients the inner loop takes; weights frozen), the posterior step as one in-place update. On CUDA
each timed call ends with a synchronisation, so the time is the kernels', not the launch's.
A plain `pytest` (testpaths = tests) does not collect this folder; tests/benchmarks runs it once with
--op-size tiny --benchmark-disable (each once, untimed).
"""

from __future__ import annotations

import pytest
import torch

import ltm_kernels
from ltm.latents import InnerLoopConfig
from ltm_kernels import reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
# B batch, N tokens, d width, H heads of hd, W window, M latents per layer, V vocabulary, d_ff SwiGLU width.
SIZES = {
    "tiny": dict(B=1, N=32, d=64, H=2, hd=32, W=8, M=4, V=257, d_ff=96, n_z=8),
    "default-cpu": dict(B=2, N=256, d=256, H=4, hd=64, W=64, M=4, V=50258, d_ff=704, n_z=16),
    "default-cuda": dict(B=16, N=1024, d=512, H=8, hd=64, W=256, M=8, V=50258, d_ff=1376, n_z=96),
}
IMPLEMENTATIONS = {
    "rms_norm": ("ref", "triton"),
    "add_rms_norm": ("ref", "triton"),
    "swiglu": ("ref", "triton"),
    "self_attention": ("ref", "triton", "cpp"),
    "latent_attention": ("ref", "triton", "cpp"),
    "lm_head_nll": ("ref", "chunked", "triton", "cpp"),
    "posterior_step": ("ref", "triton", "cpp"),
}
CASES = [(op, impl) for op, impls in IMPLEMENTATIONS.items() for impl in impls]


@pytest.fixture
def size(request) -> dict:
    name = request.config.getoption("--op-size")
    return SIZES["tiny" if name == "tiny" else f"default-{DEVICE.type}"]


def implementation(op: str, impl: str):
    """ltm_kernels' functional, or pytest.skip saying why it cannot run on DEVICE."""
    if impl == "triton" and not (DEVICE.type == "cuda" and ltm_kernels.triton_device_ok(DEVICE)):
        pytest.skip(
            "the Triton kernels are benchmarked on CUDA only (the interpreter is for tests): "
            + ltm_kernels.triton_status()[1]
        )
    if impl == "cpp" and not ltm_kernels.has_op(op, DEVICE.type):
        pytest.skip(f"the extension has no {DEVICE.type} kernel for ltm::{op} ({ltm_kernels.extension_status()[1]})")
    fn = getattr(ltm_kernels, f"{op}_{impl}", None)
    if fn is None:
        pytest.skip(f"ltm_kernels has no {op}_{impl} in this version")
    return fn


def randn(*shape, requires_grad=False, scale=1.0):
    return (scale * torch.randn(*shape, device=DEVICE)).to(DTYPE).requires_grad_(requires_grad)


def rope(positions, hd):
    return reference.rope_tables(positions.to(DEVICE), hd, 10000.0, torch.float32)


def op_inputs(op: str, s: dict, grad: bool):
    """(args, the tensors gradients are taken of) for one call of `op` at sizes `s`."""
    B, N, d, H, hd = s["B"], s["N"], s["d"], s["H"], s["hd"]
    if op == "rms_norm":
        x = randn(B, N, d, requires_grad=grad)
        return (x, randn(d), 1e-5), [x]
    if op == "add_rms_norm":
        x, r = randn(B, N, d, requires_grad=grad), randn(B, N, d, requires_grad=grad)
        return (x, r, randn(d), 1e-5), [x, r]
    if op == "swiglu":
        g, u = randn(B, N, s["d_ff"], requires_grad=grad), randn(B, N, s["d_ff"], requires_grad=grad)
        return (g, u), [g, u]
    if op == "self_attention":
        q, k, v = (randn(B, N, H, hd).transpose(1, 2).requires_grad_(grad) for _ in range(3))  # the model's layout
        return (q, k, v, *rope(torch.arange(N), hd), s["W"]), [q, k, v]
    if op == "latent_attention":
        q = randn(B, N, H, hd).transpose(1, 2).requires_grad_(grad)
        k, v = (randn(B, H, s["M"], hd, requires_grad=grad) for _ in range(2))
        return (q, k, v, *rope(torch.arange(N), hd), *rope(torch.arange(s["M"]) * (N // s["M"]), hd)), [q, k, v]
    if op == "lm_head_nll":
        hidden = randn(B, N, d, requires_grad=grad)
        targets = torch.randint(0, s["V"], (B, N), device=DEVICE)
        return (hidden, randn(s["V"], d, scale=d**-0.5), targets), [hidden]
    raise ValueError(op)


def synchronized(fn):
    if DEVICE.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(DEVICE)
        return out

    return run


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("op, impl", [c for c in CASES if c[0] != "posterior_step"])
def test_op(benchmark, size, op, impl, mode):
    fn = implementation(op, impl)
    args, leaves = op_inputs(op, size, grad=mode != "forward")
    benchmark.group = f"{op} {mode}"
    if mode == "forward":

        def run():
            with torch.no_grad():
                return fn(*args)
    else:

        def run():
            out = fn(*args)
            outs = out if isinstance(out, tuple) else (out,)
            return torch.autograd.grad([o.sum() for o in outs], leaves)

    result = benchmark(synchronized(run))
    assert all(torch.isfinite(t).all() for t in (result if isinstance(result, tuple) else (result,)))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS["posterior_step"])
def test_posterior_step(benchmark, size, impl):
    fn = implementation("posterior_step", impl)
    shape = (size["B"], size["n_z"], size["d"])
    mu, grad_z, noise = (0.01 * randn(*shape), randn(*shape), randn(*shape))
    state = [mu, -5 + 0.1 * randn(*shape), *(torch.zeros_like(mu) for _ in range(4)), torch.zeros_like(mu)]
    step = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    benchmark.group = "posterior_step"
    # constant schedule: the counter passes total_steps over the benchmark's many rounds, which it then allows
    benchmark(synchronized(lambda: fn(*state, grad_z, noise, step, InnerLoopConfig().lr, 16, "constant")))
    assert step.item() >= 1 and all(torch.isfinite(t).all() for t in state)
