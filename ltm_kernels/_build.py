"""How the compiled extension `ltm_kernels._C` is built: its sources, compiler flags and CUDA arch list.

One copy for the two ways it gets built: ahead of time by setup.py (`pip install --no-build-isolation -e .`),
which loads this file by path, and at first use by `_extension.py` (a plain `pip install -e .`, whose build
environment has no torch). Nothing here imports torch: setup.py reads this file before it knows whether
torch is importable.
"""

from __future__ import annotations

import glob
import os
import sys

# CUDA architectures compiled when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset. torch would ask the
# (absent) GPU and crash (`_get_cuda_arch_flags`: IndexError); a GPU-less build host must still produce
# kernels for the GPUs this project targets: A100 (8.0) and H100/H200 (9.0) natively, and PTX of 9.0, which
# the driver compiles at load time for newer GPUs.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"

NVCC_FLAGS = ["-O3"]


def sources(root: str) -> tuple[list[str], list[str]]:
    """(C++ sources, CUDA sources) under `root`/csrc, relative to `root` (setuptools rejects absolute paths)."""
    cpp = sorted(glob.glob("csrc/*.cpp", root_dir=root))
    cuda = sorted(glob.glob("csrc/cuda/*.cu", root_dir=root))
    return cpp, cuda


def cxx_flags() -> list[str]:
    # No -std here: torch's build adds the standard its own headers need (c++20 in recent torch, whose headers
    # already use C++20 features), and nvcc rejects a second -std. The sources are C++17.
    # -fno-math-errno: lets sqrt compile to one instruction instead of a libm call (errno is never read).
    # -fno-trapping-math: FP exception flags are never read either; without it GCC will not if-convert
    # branches holding float arithmetic, which keeps loops with a clamp or select from vectorising
    # (csrc/posterior_step.cpp). Neither flag changes any computed value.
    # -ffp-contract=off: no fused multiply-add in functions compiled for AVX-512 / FMA targets (the x86-64
    # baseline has none), so that their results are bit-identical to the baseline copy's.
    flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline OpenMP loop: without -fopenmp it compiles to a serial loop. libgomp
        # resolves to the copy torch already loaded, so there is one OpenMP runtime in the process.
        flags.append("-fopenmp")
    return flags


def link_flags() -> list[str]:
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def has_nvcc(cuda_home: str | None) -> bool:
    # torch finds CUDA_HOME from $CUDA_HOME / $CUDA_PATH, then `which nvcc`, then /usr/local/cuda, and
    # compiles .cu files with CUDA_HOME/bin/nvcc: that is the nvcc that must exist.
    return cuda_home is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))


def with_cuda(torch_cuda_version: str | None, cuda_home: str | None, cuda_sources: list[str]) -> bool:
    """Build the CUDA kernels? Decided from the toolchain (torch built with CUDA, nvcc present), never from
    torch.cuda.is_available(): a build host without a GPU must still ship the CUDA kernels."""
    return bool(cuda_sources) and torch_cuda_version is not None and has_nvcc(cuda_home)


def cuda_arch_list(environ: dict[str, str], visible_gpus: int) -> str | None:
    """The TORCH_CUDA_ARCH_LIST to build with when torch cannot pick one itself (no GPU visible and the variable
    unset or "native"), else None (torch's own choice: the list given, or the visible GPUs')."""
    given = environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if visible_gpus > 0 or given not in ("", "native"):
        return None
    return DEFAULT_CUDA_ARCH_LIST
