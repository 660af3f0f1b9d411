"""Builds ltm-kernels and its compiled extension `ltm_kernels._C`.

Install with `pip install --no-build-isolation -e .`: the extension must be compiled against the torch
that is already installed (build isolation would fetch another torch and mis-link).

CPU kernels (csrc/*.cpp) are always built. CUDA kernels (csrc/cuda/*.cu) are built when torch has CUDA
and nvcc is present, decided from the toolchain and not from torch.cuda.is_available(): a build host
without a GPU must still ship the CUDA kernels.
"""

import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    # Relative to the project root: setuptools rejects absolute source paths in some versions.
    return sorted(glob.glob(pattern, root_dir=ROOT))


def _has_nvcc() -> bool:
    # torch finds CUDA_HOME from $CUDA_HOME / $CUDA_PATH, then `which nvcc`, then /usr/local/cuda, and
    # compiles .cu files with CUDA_HOME/bin/nvcc: that is the nvcc that must exist.
    return CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


def _extension():
    cpp_sources = _sources("csrc/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu")
    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and _has_nvcc()

    # No -std here: torch's BuildExtension adds the standard its own headers need (c++20 in recent torch,
    # whose headers already use C++20 features), and nvcc rejects a second -std. The sources are C++17.
    # -fno-math-errno: lets sqrt compile to one instruction instead of a libm call (errno is never read).
    # -fno-trapping-math: FP exception flags are never read either; without it GCC will not if-convert
    # branches holding float arithmetic, which keeps loops with a clamp or select from vectorising
    # (csrc/posterior_step.cpp). Neither flag changes any computed value.
    # -ffp-contract=off: no fused multiply-add in functions compiled for AVX-512 / FMA targets (the x86-64
    # baseline has none), so that their results are bit-identical to the baseline copy's.
    cxx_flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline OpenMP loop: without -fopenmp it compiles to a serial loop. libgomp
        # resolves to the copy torch already loaded, so there is one OpenMP runtime in the process.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")

    if with_cuda:
        return CUDAExtension(
            "ltm_kernels._C",
            cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )
    return CppExtension(
        "ltm_kernels._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
    )


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})
