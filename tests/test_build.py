"""The build (setup.py, ltm_kernels/_build.py): what is compiled with and without torch in the build
environment, and the CUDA arch list on a build host without a GPU."""

import pathlib
import subprocess
import sys

import pytest
from torch.utils import cpp_extension

from ltm_kernels import _build

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs setup.py with setuptools.setup replaced by a printer of what it was given.
_RUN_SETUP = """
import runpy, sys, setuptools
{block}
setuptools.setup = lambda **kw: print("EXT", [(e.name, sorted(e.sources)) for e in kw["ext_modules"]])
runpy.run_path("setup.py", run_name="__main__")
"""


def _run_setup(block: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", _RUN_SETUP.format(block=block)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result


def test_build_requirements_do_not_pull_torch():
    # An isolated build would install another torch (often the CUDA build) and link the extension against it.
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert not [r for r in requires if r.split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip() == "torch"]


def test_setup_without_torch_builds_no_extension_and_says_so():
    result = _run_setup("sys.modules['torch'] = None  # pip's isolated build environment")
    assert "EXT []" in result.stdout, result.stdout
    assert "compiles it against the installed torch at first use" in result.stderr, result.stderr


def test_setup_with_torch_builds_the_extension_ahead_of_time():
    result = _run_setup("")
    cpp, _ = _build.sources(str(ROOT))
    assert cpp and f"EXT [('ltm_kernels._C', {sorted(cpp)!r}" in result.stdout, result.stdout


@pytest.mark.parametrize(
    "environ, gpus, expected",
    [
        ({}, 0, _build.DEFAULT_CUDA_ARCH_LIST),
        ({"TORCH_CUDA_ARCH_LIST": "native"}, 0, _build.DEFAULT_CUDA_ARCH_LIST),
        ({"TORCH_CUDA_ARCH_LIST": "9.0"}, 0, None),
        ({}, 1, None),
    ],
)
def test_cuda_arch_list(environ, gpus, expected):
    assert _build.cuda_arch_list(environ, gpus) == expected


def test_default_arch_list_is_valid_for_torch_and_covers_sm90(monkeypatch):
    # torch turns a given list into nvcc flags without asking a GPU; unset, it asks the visible GPUs and, with
    # none, crashes (torch 2.13: IndexError in _get_cuda_arch_flags), which the default avoids.
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", _build.DEFAULT_CUDA_ARCH_LIST)
    flags = cpp_extension._get_cuda_arch_flags()
    assert "-gencode=arch=compute_90,code=sm_90" in flags, flags
    archs = [a.split("+")[0] for a in _build.DEFAULT_CUDA_ARCH_LIST.split(";")]
    assert max(tuple(map(int, a.split("."))) for a in archs) >= (9, 0)
