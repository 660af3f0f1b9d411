"""benchmarks/test_micro_benchmarks.py runs: every op and implementation once at tiny shapes
(--benchmark-disable: no timing), and without the benchmark flags the folder is skipped, not timed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("pytest_benchmark", reason="pytest-benchmark (the test extra) is not installed")


def run_pytest(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # benchmarks never use the interpreter
    return subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "-rs", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_every_micro_benchmark_runs_at_tiny_sizes():
    out = run_pytest("--benchmark-disable", "--op-size", "tiny")  # every test there is a benchmark
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    summary = out.stdout.strip().splitlines()[-1]
    # ref and chunked run everywhere: 6 differentiable ops x 2 modes + the chunked LM head x 2 + posterior step
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 6 * 2 + 2 + 1, out.stdout[-4000:]
    assert "failed" not in summary and "error" not in summary, summary


def test_without_the_benchmark_flags_nothing_is_timed():
    out = run_pytest("--op-size", "tiny")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "passed" not in out.stdout.strip().splitlines()[-1] and "pytest benchmarks --benchmark-only" in out.stdout
