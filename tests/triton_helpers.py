"""Markers and error measures shared by the Triton kernel tests (see tests/conftest.py for TRITON_INTERPRET)."""

import pytest
import torch

from ltm_kernels import _triton

HAS_TRITON = _triton.TRITON_AVAILABLE
HAS_CUDA = torch.cuda.is_available()


def _interpreter_loop_failure() -> str:
    """Why Triton's interpreter cannot run a kernel with a loop in this environment, or "" when it can.

    Some triton / numpy pairs cannot: triton 3.6's interpreter passes 1-element arrays where numpy >= 2.3
    wants Python scalars, and every loop fails with "only 0-dimensional arrays can be converted to Python
    scalars". Probed with a one-loop kernel rather than by version numbers, so a fixed or newly broken pair is
    judged by what it does; only that known failure is turned into a skip, any other error fails the tests.
    """
    if not (HAS_TRITON and _triton.INTERPRET):
        return ""
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def _sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        tl.store(out_ptr, tl.sum(acc, axis=0))

    x, out = torch.ones(10), torch.zeros(1)
    try:
        _sum_kernel[(1,)](x, out, x.numel(), BLOCK=4)
    except Exception as e:  # the interpreter wraps the TypeError: InterpreterError("TypeError('only ...')")
        if "only 0-dimensional arrays can be converted to Python scalars" not in str(e):
            raise
        return (
            f"triton {triton.__version__}'s interpreter cannot run loops with numpy {numpy.__version__} "
            f"({e}): an incompatibility of that pair, not of our kernels; use numpy < 2.3 with triton 3.6"
        )
    assert out.item() == 10.0, f"the interpreter probe summed 10 ones to {out.item()}"
    return ""


INTERPRETER_BROKEN = _interpreter_loop_failure()


def _skip_reason(need_cuda: bool) -> str:
    if not HAS_TRITON:
        return "triton is not installed: Triton kernel tests not run"
    if not need_cuda and INTERPRETER_BROKEN:
        return INTERPRETER_BROKEN
    if need_cuda and not HAS_CUDA:
        return "no CUDA device: GPU tests not run"
    if need_cuda and _triton.INTERPRET:
        return "TRITON_INTERPRET=1: the kernels would not be compiled for the GPU"
    if not need_cuda and not _triton.INTERPRET:
        return (
            "TRITON_INTERPRET is not set (tests/conftest.py sets it only without CUDA; with CUDA the gpu "
            "tests run these kernels natively)"
        )
    return ""


# Kernels on CPU tensors under TRITON_INTERPRET=1 (fp32, tiny shapes).
INTERPRETER = [pytest.mark.interpreter, pytest.mark.skipif(bool(_skip_reason(False)), reason=_skip_reason(False))]

# Kernels compiled for the GPU (bf16 rule of docs/kernels.md, memory bounds, CUDA graphs).
GPU = [pytest.mark.gpu, pytest.mark.skipif(bool(_skip_reason(True)), reason=_skip_reason(True))]


def _apply(marks, fn):
    for mark in reversed(marks):
        fn = mark(fn)
    return fn


def interpreter(fn):
    """Decorator: an `interpreter` test (use INTERPRETER as `pytest.param(..., marks=INTERPRETER)`)."""
    return _apply(INTERPRETER, fn)


def gpu(fn):
    """Decorator: a `gpu` test of the compiled kernels."""
    return _apply(GPU, fn)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in float64 on the CPU."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def assert_close(got, want, tol: float, name: str) -> None:
    err = rel_err(got, want)
    if not err <= tol:
        diff = (got.detach().double().cpu() - want.detach().double().cpu()).abs()
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{name}: relative error {err:.3e} > {tol:.1e}; worst at index {idx}: "
            f"got {got.detach().flatten()[diff.argmax()].item()!r}, "
            f"want {want.detach().flatten()[diff.argmax()].item()!r}"
        )


# Ahead-of-time compilation for an H100 (sm_90) down to a cubin, on any machine: the test files give the body
# of a script (which kernels, with which signatures and constexprs) and `compile_for_sm90` runs it after
# this prelude, in a subprocess without TRITON_INTERPRET (the kernels must be decorated for the compiler).
AOT_PRELUDE = r"""
import importlib, inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
    print("SKIP: this triton's ASTSource has no `constexprs` (API before 3.3)"); sys.exit(0)

def compile_(fn, sig, constexprs, num_warps, num_stages=3):
    sig = dict(sig, **{name: "constexpr" for name in constexprs})
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    assert kernel.asm["cubin"], fn
    print("compiled", fn.__name__, constexprs, num_warps, flush=True)
"""


def compile_for_sm90(body: str, timeout: int = 600) -> None:
    """Run AOT_PRELUDE + body in a subprocess; it must print ALL OK. Skips (saying why) on a triton without
    the API or without its bundled ptxas."""
    import os
    import subprocess
    import sys

    if not HAS_TRITON:
        pytest.skip("triton is not installed: Triton kernel tests not run")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice about a future default
    result = subprocess.run(
        [sys.executable, "-c", AOT_PRELUDE + body],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=timeout,
    )
    out = result.stdout + result.stderr
    if "SKIP:" in result.stdout:
        pytest.skip(result.stdout.split("SKIP:", 1)[1].strip())
    if result.returncode != 0 and ("ptxas" in out and "not found" in out.lower()):
        pytest.skip("triton's bundled ptxas is missing: cannot compile to a cubin here")
    assert result.returncode == 0 and "ALL OK" in result.stdout, out[-4000:]
