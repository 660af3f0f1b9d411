"""The Triton kernel configs that `backend="auto"` launches at the reference GPU shapes (ltm-l, 64 x 1024, bf16) fit an
H100/H200 (sm_90): at most 227 KB of shared memory per program, and no register spills. Compiled ahead of time
by benchmarks/sm90_resources.py (no GPU needed), which also writes the table in benchmarks/NOTES.md."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from triton_helpers import HAS_TRITON

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMEM_LIMIT = 227 * 1024

# Known spills, measured by the report (benchmarks/NOTES.md, "sm_90 resources at the reference GPU shapes"): most
# self-attention autotune candidates (forward 2-3 of 5, dQ and dK/dV 3-4 of 4, by triton version) and, under
# triton 3.6 only, the latent-attention backward (16 bytes). Not fixed here: the kernels' owner chooses the
# tiles (ltm_kernels/self_attention.py _*_CONFIGS, latent_attention._bwd_config), and which tile is fastest
# needs a GPU to tell. An XPASS means a fix landed: remove the entry.
_TRITON_36 = HAS_TRITON and __import__("triton").__version__.startswith("3.6.")
KNOWN_SPILLS = {
    "_self_attention_fwd_kernel": (True, "forward autotune candidates (128x64, 4 warps), (128x128) spill on sm_90"),
    "_self_attention_bwd_dq_kernel": (True, "dQ autotune candidates spill on sm_90 (all 4 under triton 3.9)"),
    "_self_attention_bwd_dkdv_kernel": (True, "dK/dV autotune candidates spill on sm_90 (all 4 under triton 3.9)"),
    "_latent_attn_bwd_kernel": (_TRITON_36, "triton 3.6's ptxas spills 16 bytes of the backward (3.9: none)"),
}
KERNELS = [
    "_self_attention_fwd_kernel",
    "_self_attention_bwd_dq_kernel",
    "_self_attention_bwd_dkdv_kernel",
    "_latent_attn_fwd_kernel",
    "_latent_attn_bwd_kernel",
    "_lce_fwd_kernel",
    "_lce_bwd_kernel",
    "_rms_norm_fwd_kernel",
    "_rms_norm_bwd_kernel",
    "_swiglu_fwd_kernel",
    "_swiglu_bwd_kernel",
    "_posterior_step_kernel",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not HAS_TRITON:
        pytest.skip("triton is not installed: Triton kernel tests not run")
    import inspect

    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        pytest.skip("this triton's ASTSource has no `constexprs` (API before 3.3)")
    out = tmp_path_factory.mktemp("sm90") / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice about a future default
    result = subprocess.run(
        [sys.executable, "benchmarks/sm90_resources.py", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode not in (0, 1) or not out.exists():  # 1: some config spills or overflows (tested below)
        if "ptxas" in result.stderr and "not found" in result.stderr.lower():
            pytest.skip("triton's bundled ptxas is missing: cannot compile to a cubin here")
        raise AssertionError(result.stdout[-2000:] + result.stderr[-4000:])
    return json.loads(out.read_text())["results"]


def _describe(row):
    return f"{row['kernel']} {row['constexprs']} warps {row['num_warps']} stages {row['num_stages']}"


@pytest.mark.slow
def test_every_kernel_is_reported(report):
    assert sorted({row["kernel"] for row in report}) == sorted(KERNELS)


@pytest.mark.slow
def test_shared_memory_fits(report):
    over = [f"{_describe(r)}: {r['shared_bytes']} B" for r in report if r["shared_bytes"] > SMEM_LIMIT]
    assert not over, f"more than {SMEM_LIMIT} bytes of shared memory: {over}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "kernel",
    [
        pytest.param(k, marks=pytest.mark.xfail(KNOWN_SPILLS[k][0], reason=KNOWN_SPILLS[k][1], strict=False))
        if k in KNOWN_SPILLS
        else k
        for k in KERNELS
    ],
)
def test_no_spills(report, kernel):
    rows = [r for r in report if r["kernel"] == kernel]
    spilling = [
        f"{_describe(r)}: {r['spill_stores']} / {r['spill_loads']} B"
        for r in rows
        if r["spill_stores"] or r["spill_loads"]
    ]
    assert rows and not spilling, f"register spills (stores / loads per thread): {spilling}"
