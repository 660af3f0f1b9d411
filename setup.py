"""Builds ltm-kernels and, when torch is importable here, its compiled extension `ltm_kernels._C`.

- `pip install --no-build-isolation -e .`: the build sees the installed torch and compiles the extension
  now, against it.
- Plain `pip install -e .`: pip builds in an isolated environment, which has no torch (pyproject.toml does not
  ask for it: pip would fetch another torch, often a multi-GB CUDA build, and the extension would be linked
  against it instead of the installed one). No extension is compiled then; `ltm_kernels` compiles it at
  first use against the torch that is installed (ltm_kernels/_extension.py), once, cached.

Sources, flags and the CUDA rule live in ltm_kernels/_build.py, shared with that first-use build: CPU kernels
(csrc/*.cpp) always, CUDA kernels (csrc/cuda/*.cu) when torch has CUDA and nvcc is present, for the GPUs
visible or, with none visible, for `_build.DEFAULT_CUDA_ARCH_LIST`.
"""

import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_config():
    # By path: importing the package `ltm_kernels` here would import torch and everything else.
    spec = importlib.util.spec_from_file_location("_ltm_build", os.path.join(ROOT, "ltm_kernels", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "ltm-kernels: torch is not importable in this build environment (pip's build isolation), so the "
            "C++ extension is not compiled now; ltm_kernels compiles it against the installed torch at first "
            "use (or install with `pip install --no-build-isolation -e .` to compile it now)",
            file=sys.stderr,
        )
        return [], {}

    build = _load_build_config()
    cpp_sources, cuda_sources = build.sources(ROOT)
    cxx, link = build.cxx_flags(), build.link_flags()
    if not build.with_cuda(torch.version.cuda, CUDA_HOME, cuda_sources):
        ext = CppExtension("ltm_kernels._C", cpp_sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
        return [ext], {"build_ext": BuildExtension}

    arch_list = build.cuda_arch_list(dict(os.environ), torch.cuda.device_count())
    if arch_list is not None:
        # torch reads the variable when it compiles, later in this process.
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        print(
            f"ltm-kernels: no GPU visible and TORCH_CUDA_ARCH_LIST unset: building the CUDA kernels for "
            f"TORCH_CUDA_ARCH_LIST={arch_list!r}",
            file=sys.stderr,
        )
    ext = CUDAExtension(
        "ltm_kernels._C",
        cpp_sources + cuda_sources,
        extra_compile_args={"cxx": cxx, "nvcc": build.NVCC_FLAGS},
        extra_link_args=link,
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
