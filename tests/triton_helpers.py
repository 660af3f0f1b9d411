"""Markers and error measures shared by the Triton kernel tests (see tests/conftest.py for TRITON_INTERPRET)."""
import pytest
import torch

from ltm_kernels import _triton

HAS_TRITON = _triton.TRITON_AVAILABLE
HAS_CUDA = torch.cuda.is_available()


def _skip_reason(need_cuda: bool) -> str:
    if not HAS_TRITON:
        return "triton is not installed: Triton kernel tests not run"
    if need_cuda and not HAS_CUDA:
        return "no CUDA device: GPU tests not run"
    if need_cuda and _triton.INTERPRET:
        return "TRITON_INTERPRET=1: the kernels would not be compiled for the GPU"
    if not need_cuda and not _triton.INTERPRET:
        return ("TRITON_INTERPRET is not set (tests/conftest.py sets it only without CUDA; with CUDA the gpu "
                "tests run these kernels natively)")
    return ""


# Kernels on CPU tensors under TRITON_INTERPRET=1 (fp32, tiny shapes).
INTERPRETER = [pytest.mark.interpreter, pytest.mark.skipif(bool(_skip_reason(False)), reason=_skip_reason(False))]

# Kernels compiled for the GPU (bf16 rule of DESIGN section 6, memory bounds, CUDA graphs).
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
        raise AssertionError(f"{name}: relative error {err:.3e} > {tol:.1e}; worst at index {idx}: "
                             f"got {got.detach().flatten()[diff.argmax()].item()!r}, "
                             f"want {want.detach().flatten()[diff.argmax()].item()!r}")
