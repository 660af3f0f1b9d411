"""What the Triton kernel files share: the guarded `import triton`, where the kernels may run, and the
autograd helper that skips weight gradients nobody asked for.

Importing this module never fails: without Triton (or with a broken install) `TRITON_AVAILABLE` is False
and `triton_status()` says why; the kernel files then define no kernels and their functionals refuse to run.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except Exception as _err:  # a broken triton install must not break `import ltm_kernels`
    triton, tl = None, None
    TRITON_AVAILABLE, _IMPORT_ERROR = False, f"{type(_err).__name__}: {_err}"
else:
    TRITON_AVAILABLE, _IMPORT_ERROR = True, ""

# `@triton.jit` reads TRITON_INTERPRET when a kernel is *decorated* (at import of the kernel files), so
# this is read once here, next to that import: setting the variable later changes nothing for our kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_status() -> tuple[bool, str]:
    """(available, reason) for the Triton kernels on this machine (device types: `triton_device_ok`)."""
    if not TRITON_AVAILABLE:
        return False, f"triton is not installed or failed to import ({_IMPORT_ERROR})"
    if INTERPRET:
        return True, f"triton {triton.__version__} under TRITON_INTERPRET=1 (CPU tensors, slow, fp32 only)"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on CUDA"
    return False, (
        f"triton {triton.__version__} is installed but there is no CUDA device; set "
        "TRITON_INTERPRET=1 before importing ltm to run its kernels on CPU tensors (slow, for tests)"
    )


def triton_device_ok(device: torch.device) -> bool:
    """Whether our Triton kernels can run on tensors of `device`: CUDA, or CPU under the interpreter."""
    cuda = device.type == "cuda" and torch.cuda.is_available()
    return TRITON_AVAILABLE and (cuda or (device.type == "cpu" and INTERPRET))


def check_triton_tensor(t: torch.Tensor, name: str, dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """Refuse, naming the argument, a tensor the kernels cannot take (type, device, dtype)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not TRITON_AVAILABLE:
        raise RuntimeError(f"{name}: the Triton kernels need triton ({_IMPORT_ERROR})")
    if not (t.is_cuda or (t.device.type == "cpu" and INTERPRET)):  # a CUDA tensor implies a CUDA device
        raise ValueError(
            f"{name} is on {t.device}: the Triton kernels run on CUDA tensors, or on CPU tensors "
            "when TRITON_INTERPRET=1 was set before ltm_kernels was imported"
        )
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


@functools.cache
def sm_count(index) -> int:
    """Streaming multiprocessors of CUDA device `index` (grid sizing of the kernels that loop over rows)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def fp32_tables(*tables: torch.Tensor) -> list[torch.Tensor]:
    """RoPE tables as the attention kernels read them: fp32, contiguous (the model passes fp64 ones for fp64
    models, and any float dtype is accepted)."""
    return [t.to(torch.float32).contiguous() for t in tables]


def grad_wanted(ctx, index: int, node_index: int | None = None) -> bool:
    """Inside an autograd Function's backward: is the gradient of input `index` going to be used?

    `ctx.needs_input_grad` only says the input requires grad. The inner loop calls
    `torch.autograd.grad(loss, z)` on a model whose weights are Parameters: their gradients are not wanted,
    and built-in ops skip them. Asking the engine whether it will run the input's grad node lets us skip
    them too (the LM head's dW costs two extra (rows x V x d) matmuls).
    `index` counts the Function's tensor inputs only (`ctx.next_functions` skips the others): keep the
    tensor arguments of `forward` first, optional ones (None) last. For a torch.library op, whose
    `needs_input_grad` counts every argument, `node_index` is the input's place among the tensors passed.
    """
    if not ctx.needs_input_grad[index]:
        return False
    node = ctx.next_functions[index if node_index is None else node_index][0]
    try:
        return node is None or torch._C._will_engine_execute_node(node)
    except RuntimeError:
        # Raised for a leaf that `autograd.grad(..., inputs)` captures, i.e. exactly when the gradient is wanted
        # (torch: "A leaf node was passed to _will_engine_execute_node ..."); any other doubt: compute it.
        return True
