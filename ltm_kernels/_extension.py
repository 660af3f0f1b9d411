"""Loading of the compiled extension `ltm_kernels._C`.

The extension is imported once, on first use, and any failure (never built, built against another torch,
missing symbol) is recorded and reported by `extension_status()`, never raised: importing `ltm_kernels`
or `ltm` must work without it, and the dispatcher falls back to other backends.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

_status: tuple[bool, str] | None = None
_on_load: list[Callable[[], None]] = []


def extension_status() -> tuple[bool, str]:
    """(available, reason): whether `ltm_kernels._C` loaded, and if not, why. Loads it on the first call."""
    global _status
    if _status is None:
        try:
            importlib.import_module("ltm_kernels._C")
        except ModuleNotFoundError as e:
            _status = (False, f"extension not built: {e} (run `pip install --no-build-isolation -e .`)")
        except Exception as e:
            _status = (False, f"extension failed to load: {type(e).__name__}: {e}")
        else:
            _status = (True, "extension loaded")
            # Python-side registrations (fake kernels) need the C++ schemas, so they run now; if one fails
            # the ops are not safe to use (e.g. under torch.compile) and the extension counts as missing.
            try:
                for fn in _on_load:
                    fn()
            except Exception as e:
                _status = (False, f"extension registration failed: {type(e).__name__}: {e}")
    return _status


def require_extension(caller: str) -> None:
    """Raise RuntimeError, saying why, when `caller` (a public function of ltm_kernels) cannot run."""
    available, reason = extension_status()
    if not available:
        raise RuntimeError(f"ltm_kernels.{caller} needs the compiled extension: {reason}")


def on_load(fn: Callable[[], None]) -> Callable[[], None]:
    """Decorator: run `fn` once the extension has loaded (at once if it already has)."""
    if _status is None:
        _on_load.append(fn)
    elif _status[0]:
        fn()
    return fn


def has_op(name: str, device: str | torch.device = "cpu") -> bool:
    """Whether `torch.ops.ltm.<name>` has a kernel for `device` ("cpu", "cuda", "meta" for the fake)."""
    if not extension_status()[0]:
        return False
    device_type = torch.device(device).type
    key = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(device_type, device_type.upper())
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"ltm::{name}", key)
    except RuntimeError:  # no such op in this build
        return False
