"""/proc/cpuinfo, read once: the one parser of it, for the CPU GEMM-library choice (`linear_onednn`) and the
benchmarks' record of the machine."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpuinfo() -> tuple[tuple[str, str], ...]:
    """(key, value) of every line of /proc/cpuinfo, in order; empty where it cannot be read (not Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ()
    return tuple((key.strip(), value.strip()) for key, _, value in (line.partition(":") for line in lines))


def cpuinfo_value(*keys: str) -> str | None:
    """The first value under any of `keys` ("vendor_id", "model name", ...); None if there is none."""
    return next((value for key, value in cpuinfo() if key in keys), None)
