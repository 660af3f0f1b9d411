"""pytest options of the micro-benchmarks (benchmarks/test_micro_benchmarks.py).

`--op-size tiny` picks shapes small enough to check that every benchmark runs (with --benchmark-disable:
each once, untimed; pytest-benchmark refuses it together with --benchmark-only). Without pytest-benchmark's
`--benchmark-only` or `--benchmark-disable` the benchmarks are skipped, saying how to run them: collecting
this folder by accident never starts a long timing run.
"""

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--op-size",
        choices=("default", "tiny"),
        default="default",
        help="micro-benchmark shapes: this device's default sizes, or tiny ones (a quick check)",
    )


def pytest_collection_modifyitems(config, items):
    try:
        wanted = config.getoption("benchmark_only") or config.getoption("benchmark_disable")
    except ValueError:  # pytest-benchmark is not installed: its fixture is missing too
        wanted = False
    if wanted:
        return
    skip = pytest.mark.skip(
        reason="micro-benchmark: run `pytest benchmarks --benchmark-only` (needs the "
        "pytest-benchmark of the test extra; --benchmark-disable runs each once)"
    )
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
