"""Measuring helpers shared by tests and benchmarks (nothing here runs in the model)."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakMemory(TorchDispatchMode):
    """The peak of bytes held by tensors created inside the mode (forward and backward ops alike).

    Every op output's storage is counted once (views share it) from its creation until the storage is freed
    (a weakref finalizer: PyTorch keeps one Python object per live storage); storages that existed before
    the mode (inputs, weights) are not counted. The true allocator peak can only be higher by the
    temporaries inside single ATen kernels.

    Our registered ops (namespaces in `OPAQUE_NAMESPACES`) are single calls to a dispatch mode, which would
    see only their outputs: their kernels are run with the mode active again, so the tensors they create
    inside (the LM head's chunk buffer, say) are counted too."""

    OPAQUE_NAMESPACES = ("ltm", "ltm_triton", "ltm_torch")

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def _free(self, key):
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in self.OPAQUE_NAMESPACES:
            device = next(t.device for t in tree_leaves(args) if isinstance(t, torch.Tensor))
            backend = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, device.type.upper()))
            with self:  # the kernel below the mode's dispatch key, with the mode seeing its insides
                return func.redispatch(backend, *args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if storage.nbytes() and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out
