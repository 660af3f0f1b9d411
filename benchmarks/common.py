"""What every benchmark script shares: timing, the record of the machine and code measured, the result file.

Timing (`time_runs`): on CUDA `triton.testing.do_bench` (CUDA events, the L2 cache flushed before every run,
as many runs as fit its time budget after a warm-up); on CPU `torch.utils.benchmark.Timer` (this process's
thread count, one call per sample, after untimed warm-up calls). Both return the seconds of every timed
run, so result files keep the raw samples; `median` summarises them.

Environment (`environment`): device (GPU name, memory, SMs, clocks; CPU model, ISA flags, threads),
versions (python, torch, CUDA, triton) and the git commit, `-dirty` when tracked code differs from it.

Results (`write_result`): one JSON file per run under `RESULTS_DIR`, named after the benchmark, the device
and the date unless a path is given.

Scripts run from anywhere as `python benchmarks/<script>.py` (Python puts this folder on sys.path) and are
imported by the tests through pytest's `pythonpath` setting.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

from ltm.files import atomic_write_text
from ltm_kernels.cpuinfo import cpuinfo, cpuinfo_value

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
# ISA extensions that decide which CPU kernels and dtypes run fast (as /proc/cpuinfo spells them).
CPU_ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
    "sve2",
    "bf16",
)


class Unavailable(Exception):
    """This variant cannot run here; the message says why."""


# ---------------------------------------------------------------------------------------------- timing
def add_inner_loop_arguments(parser: argparse.ArgumentParser) -> None:
    """--lr, --schedule and --weight-decay, defaulting to the published settings (ltm.InnerLoopConfig)."""
    from ltm.latents import InnerLoopConfig

    defaults = InnerLoopConfig()
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak lr of AdamW on (mu, logvar)")
    parser.add_argument("--schedule", default=defaults.schedule)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(
    fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1, cuda_budget_ms: float = 100.0
) -> list[float]:
    """Seconds of each timed run of `fn()`.

    CPU: `warmup` untimed calls, then `repeats` calls each timed by torch.utils.benchmark.Timer with the
    current thread count (Timer would otherwise pin one thread). CUDA: triton.testing.do_bench with
    return_mode="all": L2 flushed before each run, CUDA events; it warms up for 25 ms and times as many runs
    as fit in `cuda_budget_ms` (`repeats` and `warmup` do not apply)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if device.type == "cuda":
        import triton.testing

        with torch.cuda.device(device):
            return [ms / 1e3 for ms in triton.testing.do_bench(fn, warmup=25, rep=cuda_budget_ms, return_mode="all")]
    from torch.utils import benchmark

    for _ in range(warmup):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    # Timer.timeit runs two untimed calls of its own first; the samples are its timed calls only.
    return [timer.timeit(number=1).times[0] for _ in range(repeats)]


def median(times: list[float]) -> float:
    return statistics.median(times)


# ---------------------------------------------------------------------------------------- environment
def git_commit() -> str:
    """HEAD of the checkout, `-dirty` when tracked files differ (result files rewritten by earlier runs do
    not count: they do not change the measured code); "unknown" outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=here)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(exclude,top)benchmarks/results"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=here,
        ).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "") if head.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_info() -> dict:
    """CPU model and the ISA flags of CPU_ISA_FLAGS it has (Linux /proc/cpuinfo; elsewhere the model only)."""
    have = set((cpuinfo_value("flags", "Features") or "").split())
    name = cpuinfo_value("model name", "Model") or platform.processor() or platform.machine()
    count = sum(key == "processor" for key, _ in cpuinfo())
    return {"cpu": name, "cpu_isa": [f for f in CPU_ISA_FLAGS if f in have], "cpu_count": count}


def library_versions() -> dict:
    """The BLAS and oneDNN builds torch links (they pick different kernels by CPU vendor), from
    torch.__config__.show()."""
    versions = {"blas": None, "onednn": None}
    for line in torch.__config__.show().splitlines():
        line = line.strip(" -")
        if "Math Kernel Library Version" in line or "OpenBLAS" in line:
            versions["blas"] = line
        elif "MKL-DNN" in line or "oneDNN" in line:
            versions["onednn"] = line
    return versions


def _nvidia_smi():
    """Clocks and power limit, when nvidia-smi is there to ask."""
    fields = "clocks.sm,clocks.max.sm,clocks.mem,power.limit,power.max_limit,driver_version"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return dict(zip(fields.split(","), (v.strip() for v in out.stdout.splitlines()[0].split(","))))


def device_info(device: torch.device) -> dict:
    """The device measured, the host's CPU and the versions: `name` is the GPU's, or the CPU model."""
    info = {
        "type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        **cpu_info(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            cuda=torch.version.cuda,
            memory_bytes=props.total_memory,
            sm_count=props.multi_processor_count,
            nvidia_smi=_nvidia_smi(),
        )
    else:
        info.update(
            name=info["cpu"],
            bf16_dot=bool({"avx512_bf16", "amx_bf16"} & set(info["cpu_isa"])),
            aten_cpu_capability=torch.backends.cpu.get_cpu_capability(),
            # the LM head's bfloat16 engine setting (csrc/lm_head.cpp): auto, or the engine it names
            cpu_bf16_engine=os.environ.get("LTM_CPU_BF16_ENGINE", "auto"),
            **library_versions(),
        )
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # not installed, or broken: recorded as absent
        info["triton"] = None
    return info


def environment(device: torch.device) -> dict:
    """The record every result file starts with: when, which code, which machine."""
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": device_info(device),
    }


# -------------------------------------------------------------------------------------------- results
def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()[:48] or "device"


def write_result(result: dict, benchmark: str, out: Path | None = None) -> Path:
    """Write `result` (with its `device` record) as JSON to `out`, or to
    RESULTS_DIR/<benchmark>_<device name>_<date>.json, with _2, _3, ... added where that file exists, so
    a second run on a day keeps the first; returns the path. Written atomically: a kill leaves no half file."""
    if out is None:
        name = result.get("device", {}).get("name") or result.get("device", {}).get("type", "device")
        stem = f"{benchmark}_{slug(name)}_{dt.date.today()}"
        out, n = RESULTS_DIR / f"{stem}.json", 1
        while out.exists():
            n += 1
            out = RESULTS_DIR / f"{stem}_{n}.json"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out


def max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in float64: one number per output for the correctness gates."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
