"""Session-wide test setup.

Triton's interpreter: `@triton.jit` reads TRITON_INTERPRET when a kernel is decorated, i.e. when
`ltm_kernels` is first imported, so it must be set before any test module imports it; pytest imports this
file first. Without a CUDA device we set it (unless the caller chose a value), so that the Triton kernels
run on CPU tensors in the `interpreter` tests; with CUDA we leave it alone, and the same kernels are tested
natively by the `gpu` tests (the interpreter tests then skip, saying so). The variable only affects Triton:
every other test runs the same either way, and subprocesses started by tests inherit it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
