"""Loading of the compiled extension `ltm_kernels._C`.

The extension is imported once, on first use, and any failure (never built, built against another torch,
missing symbol) is recorded and reported by `extension_status()`, never raised: importing `ltm_kernels`
or `ltm` must work without it, and the dispatcher falls back to other backends.

Where it comes from: `pip install --no-build-isolation -e .` compiles it ahead of time. A plain
`pip install -e .` builds in an environment without torch, so nothing was compiled; then, if the sources are
next to the package (an editable install or a checkout), the first use compiles them against the torch
that is installed, with `torch.utils.cpp_extension.load` and the flags of `_build.py`, printing one line
while it does. The result is cached under torch's extension folder ($TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions), one build per checkout, Python and torch version; torch rebuilds it when a
source changes and locks the folder while building, so concurrent first uses build it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import pathlib
import shutil
import sys
from collections.abc import Callable

import torch

from . import _build

_ROOT = pathlib.Path(__file__).resolve().parents[1]  # the checkout, for an editable install

_status: tuple[bool, str] | None = None
_on_load: list[Callable[[], None]] = []


def extension_status() -> tuple[bool, str]:
    """(available, reason): whether `ltm_kernels._C` loaded, and if not, why. Loads it on the first call."""
    global _status
    if _status is None:
        try:
            importlib.import_module("ltm_kernels._C")
        except ModuleNotFoundError as e:
            _status = _build_at_first_use(f"extension not built: {e}")
        except Exception as e:
            _status = (False, f"extension failed to load: {type(e).__name__}: {e}")
        else:
            _status = (True, "extension loaded")
        if _status[0]:
            # Python-side registrations (fake kernels) need the C++ schemas, so they run now; if one fails
            # the ops are not safe to use (e.g. under torch.compile) and the extension counts as missing.
            try:
                for fn in _on_load:
                    fn()
            except Exception as e:
                _status = (False, f"extension registration failed: {type(e).__name__}: {e}")
    return _status


def _build_at_first_use(not_built: str) -> tuple[bool, str]:
    """Compile and load the extension from the checkout's csrc/ (see the module docstring)."""
    ahead_of_time = "`pip install --no-build-isolation -e .` compiles it ahead of time"
    if "ltm_kernels._C" in sys.modules:  # None there: the importer asked that it not be imported
        return False, f"{not_built} ({ahead_of_time})"
    if not (_ROOT / "csrc" / "ltm_ops.cpp").is_file():
        return False, (
            f"{not_built}, and its sources are not next to the package (a non-editable install "
            f"whose build had no torch): reinstall with `pip install --no-build-isolation .`"
        )
    from torch.utils import cpp_extension

    cpp_sources, cuda_sources = _build.sources(str(_ROOT))
    cuda = _build.with_cuda(torch.version.cuda, cpp_extension.CUDA_HOME, cuda_sources)
    tag = hashlib.sha1(str(_ROOT).encode()).hexdigest()[:8]
    build_dir = pathlib.Path(
        os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root(),
        f"ltm_kernels_{tag}_py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__}",
    )
    paths = [str(_ROOT / p) for p in cpp_sources + (cuda_sources if cuda else [])]
    built = [p.stat().st_mtime for p in build_dir.glob("ltm_kernels_C*.so")]
    if not built or max(built) < max(os.stat(p).st_mtime for p in paths):
        print(
            f"ltm_kernels: compiling the C++{'/CUDA' if cuda else ''} extension against torch "
            f"{torch.__version__} (first use only, a few minutes; cached in {build_dir})",
            file=sys.stderr,
            flush=True,
        )
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with _build_environment(cuda):
            cpp_extension.load(
                "ltm_kernels_C",
                paths,
                extra_cflags=_build.cxx_flags(),
                extra_cuda_cflags=_build.NVCC_FLAGS if cuda else None,
                extra_ldflags=_build.link_flags(),
                build_directory=str(build_dir),
                with_cuda=cuda,
            )
    except Exception as e:  # no compiler, no ninja, a compile error: report it, the other backends still run
        detail = f"{type(e).__name__}: {e}"
        return False, f"{not_built}; compiling it at first use failed: {detail[-2000:]} ({ahead_of_time})"
    return True, f"extension built at first use against torch {torch.__version__} (cached in {build_dir})"


@contextlib.contextmanager
def _build_environment(cuda: bool):
    """The process environment `cpp_extension.load` needs, restored afterwards: ninja on PATH (the `ninja`
    dependency's binary, when the venv's bin/ is not on PATH) and, for CUDA without a visible GPU, the
    default arch list (torch would otherwise ask the absent GPU and crash)."""
    saved = {k: os.environ.get(k) for k in ("PATH", "TORCH_CUDA_ARCH_LIST")}
    try:
        if shutil.which("ninja") is None:
            with contextlib.suppress(ImportError):
                import ninja

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        arch_list = _build.cuda_arch_list(dict(os.environ), torch.cuda.device_count()) if cuda else None
        if arch_list is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
