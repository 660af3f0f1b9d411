"""benchmarks/gpu_session.sh: its dry run on this CPU machine runs every step and leaves what the GPU machine
can send back (at most 8 files, names of letters, digits, '.', '_', '-', at most 2 folders down), with the
summary printed last; a used output folder is refused; a deadline too short skips steps instead of overrunning."""

import os
import pathlib
import re
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
STEPS = ["build", "extension", "pytest-gpu", "inner-loop", "attention", "lm-head"]


def _run(out: pathlib.Path, *args: str, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GPU_SESSION_BUDGET_S")}
    environ.update(OUT=str(out), PYTHON=sys.executable, **env)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=timeout
    )


def _returned_files(out: pathlib.Path) -> list[pathlib.Path]:
    """What the device tool would send back, asserting each entry meets its limits."""
    files = []
    for path in out.rglob("*"):
        rel = path.relative_to(out)
        assert re.fullmatch(r"[A-Za-z0-9._-]+", path.name), f"name not allowed: {rel}"
        assert not path.is_symlink(), f"link: {rel}"
        if path.is_file():
            assert len(rel.parts) <= 3, f"more than 2 folders down: {rel}"
            assert path.stat().st_size <= 16 * 2**20, f"over 16 MiB: {rel}"
            files.append(rel)
    return files


@pytest.mark.slow
def test_dry_run(tmp_path):
    out = tmp_path / "out"
    result = _run(out, "--dry-run")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    files = _returned_files(out)
    assert len(files) <= 8, files
    assert {"SUMMARY.md", "gpu_session.tar.gz"} <= {str(f) for f in files}, files
    summary = (out / "SUMMARY.md").read_text()
    assert result.stdout.rstrip().endswith(summary.rstrip()), "SUMMARY.md is not what is printed last"
    for step in STEPS:
        assert re.search(rf"^\| {step} \| \d+ \| \d+ \| ok \|$", summary, re.M), (step, summary)
    assert "tests collected" in summary and "| eager |" in summary, summary
    with tarfile.open(out / "gpu_session.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"raw/{step}.log" for step in STEPS} | {"raw/steps.tsv", "raw/inner_loop.json"} <= names, names


def test_refuses_a_used_output_folder(tmp_path):
    (tmp_path / "earlier.txt").write_text("another run's file")
    result = _run(tmp_path, "--dry-run", timeout=60)
    assert result.returncode == 2 and "is not empty" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier.txt"]


def test_rejects_an_unknown_argument(tmp_path):
    result = _run(tmp_path / "out", "--fast", timeout=60)
    assert result.returncode == 2 and "unknown argument '--fast'" in result.stderr, result.stderr


def test_steps_past_the_deadline_are_skipped_and_fail_the_run(tmp_path):
    # 20 s in all leaves less than a step's 10-s minimum after the 15 s kept for bundling: nothing runs.
    out = tmp_path / "out"
    result = _run(out, "--dry-run", timeout=120, GPU_SESSION_BUDGET_S="20")
    assert result.returncode == 1, result.stdout + result.stderr
    summary = (out / "SUMMARY.md").read_text()
    for step in STEPS:
        assert f"| {step} | 0 | 0 | skipped |" in summary, summary
    assert len(_returned_files(out)) <= 8
