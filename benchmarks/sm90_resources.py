"""sm_90 resources of every Triton kernel config that `backend="auto"` launches at the reference GPU shapes (ltm-l,
batch 64 x 1024 tokens, bf16), from the ahead-of-time compile for an H100/H200: no GPU needed.

    python benchmarks/sm90_resources.py                  # markdown table on stdout (benchmarks/NOTES.md)
    python benchmarks/sm90_resources.py --json out.json  # also every row as JSON

A performance proxy while no GPU is at hand: per config, registers per thread, spill stores / loads (bytes per
thread, ptxas' own count from the compile Triton ran), shared memory per program (Triton's launch size; an
H100/H200 program may have at most 227 KB), and whether the PTX has wgmma (Hopper's warpgroup tensor-core
MMA) and TMA (`cp.async.bulk.tensor`) instructions. The configs come from the launchers themselves
(`_fwd_config`, `_launch_config`, the autotuners' candidate lists...), so the report follows any change to
them; for the autotuned attention kernels every candidate is listed, since the GPU picks among them at run
time. Exit status 1 if any config spills or needs more than 227 KB (tests/test_sm90_resources.py).

Caveat: the compile gives integer arguments no value specialisation (the JIT also specialises arguments equal
to 1 and marks multiples of 16 at launch), so a kernel's memory accesses may be vectorised less here than on
the GPU, and its register count may differ slightly.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
    sys.exit("sm90_resources.py: unset TRITON_INTERPRET (the kernels must be decorated for the compiler)")

# A fresh cache: a cached kernel would not run ptxas, whose log is what this report reads.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="sm90_resources_")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ltm import LTMConfig
from ltm.files import atomic_write_text
from ltm.posterior import ADAM_BETAS

# the kernel modules (ltm_kernels' attributes of the same names are the public functions)
la, lce, pst, rms, sa, swi = (
    importlib.import_module(f"ltm_kernels.{name}")
    for name in ("latent_attention", "lm_head_nll", "posterior_step_triton", "rms_norm", "self_attention", "swiglu")
)

SMEM_LIMIT = 227 * 1024  # bytes of shared memory one program (thread block) may use on sm_90
SMS = 132  # H100 SXM / H200: the SM count the launchers size grids with (sm_count)
PRESET, BATCH, SEQ, DTYPE = "ltm-l", 64, 1024, "bf16"

# ptxas' -v log of each compile, captured from the ptxas run Triton makes (its flags, its output)
_ptxas_logs: list[str] = []
_run = subprocess.run


def _capturing_run(cmd, *args, **kwargs):
    result = _run(cmd, *args, **kwargs)
    err = kwargs.get("stderr")
    if isinstance(cmd, (list, tuple)) and Path(str(cmd[0])).name.startswith("ptxas") and hasattr(err, "name"):
        _ptxas_logs.append(Path(err.name).read_text())
    return result


subprocess.run = _capturing_run


def _parse_ptxas(log: str) -> dict:
    import re

    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not (regs and spill):
        raise RuntimeError(f"unexpected ptxas log:\n{log}")
    return dict(registers=int(regs[1]), spill_stores=int(spill[1]), spill_loads=int(spill[2]))


def _signature(fn, overrides: dict[str, str]) -> dict[str, str]:
    """bf16 pointers, fp32 for tables / statistics, int64 for ids, i32 for the other integers."""
    fp32 = {
        "cos_ptr",
        "sin_ptr",
        "cq_ptr",
        "sq_ptr",
        "ck_ptr",
        "sk_ptr",
        "lse_ptr",
        "rstd_ptr",
        "delta_ptr",
        "loss_ptr",
        "dw_ptr",
        "scale_ptr",
    }
    sig = {}
    constexprs = {p.name for p in fn.params if p.is_constexpr}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in overrides:
            sig[name] = overrides[name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in fp32 else "*i64" if name in ("targets_ptr", "step_ptr") else "*" + DTYPE
        elif name in ("qk_scale", "sm_scale", "eps"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def configs() -> list[dict]:
    """Every (op, kernel, constexprs, warps, stages) that `auto` launches on an H100/H200 at the GPU shapes."""
    cfg = LTMConfig.from_name(PRESET)
    hd, M, d, V = cfg.d_model // cfg.n_head, cfg.n_z // cfg.n_layer, cfg.d_model, cfg.vocab_size
    bf16 = torch.bfloat16
    rows = []

    def add(op, kernel, constexprs, warps, stages=3, when="inner loop", overrides=None):
        rows.append(
            dict(
                op=op,
                kernel=kernel,
                constexprs=constexprs,
                num_warps=warps,
                num_stages=stages,
                when=when,
                overrides=overrides or {},
            )
        )

    for kernel, candidates in (
        (sa._self_attention_fwd_kernel, sa._FWD_CONFIGS),
        (sa._self_attention_bwd_dq_kernel, sa._DQ_CONFIGS),
        (sa._self_attention_bwd_dkdv_kernel, sa._DKDV_CONFIGS),
    ):
        for m, n, w, s in candidates:
            add(
                "self_attention",
                kernel,
                dict(HD=hd, BLOCK_M=m, BLOCK_N=n, IEEE=False),
                w,
                s,
                when="inner loop (autotune candidate)",
            )

    fwd = la._fwd_config(SEQ, hd, bf16)
    add(
        "latent_attention",
        la._latent_attn_fwd_kernel,
        dict(HEAD_DIM=hd, BLOCK_M=la._block_m(M), PRECISION=la._precision(bf16), BLOCK_N=fwd["BLOCK_N"]),
        fwd["num_warps"],
    )
    bwd = la._bwd_config(SEQ, M, hd, bf16)
    n_chunks, _ = la._num_chunks(triton.cdiv(SEQ, bwd["BLOCK_N"]), BATCH * cfg.n_head, SMS)
    grad = "*" + DTYPE if n_chunks == 1 else "*fp32"  # one chunk: dk, dv written directly; else fp32 partials
    add(
        "latent_attention",
        la._latent_attn_bwd_kernel,
        dict(HEAD_DIM=hd, BLOCK_M=la._block_m(M), PRECISION=la._precision(bf16), BLOCK_N=bwd["BLOCK_N"]),
        bwd["num_warps"],
        bwd["num_stages"],
        overrides=dict(dk_ptr=grad, dv_ptr=grad),
    )

    head = lce._launch_config(V)
    block_v, warps = head["BLOCK_V"], head["num_warps"]
    add("linear_cross_entropy", lce._lce_fwd_kernel, dict(BLOCK_V=block_v, WRITE_GRAD=True), warps)
    add(
        "linear_cross_entropy",
        lce._lce_fwd_kernel,
        dict(BLOCK_V=block_v, WRITE_GRAD=False),
        warps,
        when="no-grad evaluation",
    )
    add("linear_cross_entropy", lce._lce_bwd_kernel, dict(BLOCK_V=block_v), warps, when="training (dW)")

    norm = rms._config(d)
    for residual in (False, True):
        add(
            "rms_norm" if not residual else "add_rms_norm",
            rms._rms_norm_fwd_kernel,
            dict(BLOCK_D=norm["BLOCK_D"], HAS_RESIDUAL=residual),
            norm["num_warps"],
        )
    for dh_out in (False, True):
        for dw in (False, True):
            add(
                "rms_norm backward",
                rms._rms_norm_bwd_kernel,
                dict(BLOCK_D=norm["BLOCK_D"], HAS_DH_OUT=dh_out, HAS_DW=dw),
                norm["num_warps"],
                when="training (dW)" if dw else "inner loop",
            )

    add("swiglu", swi._swiglu_fwd_kernel, dict(BLOCK=swi.BLOCK), 4)  # num_warps=4 in swiglu's launchers
    add("swiglu", swi._swiglu_bwd_kernel, dict(BLOCK=swi.BLOCK), 4)

    lerp_from_m = bool(np.float32(1 - ADAM_BETAS[0]) < 0.5)  # as posterior_step_triton decides it
    fp64 = {name: "fp64" for name in ("lr", "beta1", "beta2", "eps", "weight_decay")}
    add(
        "posterior_step",
        pst._posterior_step_kernel,
        dict(SCHEDULE=0, LERP_FROM_M=lerp_from_m, BLOCK=pst._BLOCK),
        4,
        when="only without the CUDA extension (auto prefers its C++ kernel)",
        overrides=fp64,
    )
    return rows


def compile_row(row: dict) -> dict:
    fn = row["kernel"]
    src = ASTSource(fn=fn, signature=_signature(fn, row["overrides"]), constexprs=row["constexprs"])
    before = len(_ptxas_logs)
    kernel = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=row["num_warps"], num_stages=row["num_stages"])
    )
    if len(_ptxas_logs) != before + 1:
        raise RuntimeError(f"{fn.__name__}: could not capture ptxas' log (triton {triton.__version__})")
    ptx = kernel.asm["ptx"]
    return dict(
        op=row["op"],
        kernel=fn.__name__,
        when=row["when"],
        constexprs={k: v for k, v in row["constexprs"].items()},
        num_warps=row["num_warps"],
        num_stages=row["num_stages"],
        **_parse_ptxas(_ptxas_logs[-1]),
        shared_bytes=kernel.metadata.shared,
        wgmma="wgmma.mma_async" in ptx,
        tma="cp.async.bulk.tensor" in ptx,
    )


def problems(result: dict) -> list[str]:
    out = []
    if result["spill_stores"] or result["spill_loads"]:
        out.append(f"spills {result['spill_stores']} / {result['spill_loads']} bytes (stores / loads)")
    if result["shared_bytes"] > SMEM_LIMIT:
        out.append(f"needs {result['shared_bytes']} bytes of shared memory > {SMEM_LIMIT}")
    return out


def markdown(results: list[dict]) -> str:
    lines = [
        f"triton {triton.__version__}, torch {torch.__version__}; {PRESET}, batch {BATCH} x {SEQ} tokens, "
        f"{DTYPE}; target sm_90 (`python benchmarks/sm90_resources.py`)",
        "",
        "| op | kernel | config | warps | stages | regs | spill st / ld B | smem KB | wgmma | TMA | launched |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        config = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        lines.append(
            f"| {r['op']} | `{r['kernel']}` | {config} | {r['num_warps']} | {r['num_stages']} "
            f"| {r['registers']} | {r['spill_stores']} / {r['spill_loads']} | {r['shared_bytes'] / 1024:.1f} "
            f"| {'yes' if r['wgmma'] else 'no'} | {'yes' if r['tma'] else 'no'} | {r['when']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="also write every row to this JSON file")
    args = p.parse_args(argv)
    results = [compile_row(row) for row in configs()]
    sys.stdout.write(markdown(results))
    if args.json:
        atomic_write_text(
            args.json,
            json.dumps(
                dict(
                    triton=triton.__version__,
                    torch=torch.__version__,
                    preset=PRESET,
                    batch=BATCH,
                    seq=SEQ,
                    dtype=DTYPE,
                    smem_limit=SMEM_LIMIT,
                    results=results,
                ),
                indent=1,
            )
            + "\n",
        )
    bad = [
        f"{r['kernel']} {r['constexprs']} warps {r['num_warps']}: {'; '.join(problems(r))}"
        for r in results
        if problems(r)
    ]
    for line in bad:
        print("PROBLEM:", line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
