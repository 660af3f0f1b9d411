"""Every Triton kernel compiles for an H100 (sm_90) down to a cubin, without a GPU.

The interpreter tests run the kernels' math on CPU but do not type-check them the way the compiler does
(loop-carried types, constexpr use, pointer dtypes). Triton's ahead-of-time path (`triton.compile` with an
explicit target, and the ptxas shipped in the wheel) does, so GPU-only compile errors show up on any machine.
Run in a subprocess: the kernels must be decorated without TRITON_INTERPRET (tests/conftest.py may set it).
"""
import os
import subprocess
import sys

import pytest
from triton_helpers import HAS_TRITON

SCRIPT = r'''
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
    print("SKIP: this triton's ASTSource has no `constexprs` (API before 3.3)"); sys.exit(0)
import importlib
lce = importlib.import_module("ltm_kernels.linear_cross_entropy")
rms = importlib.import_module("ltm_kernels.rms_norm")
swi = importlib.import_module("ltm_kernels.swiglu")

def compile_(fn, sig, constexprs, num_warps):
    sig = dict(sig, **{name: "constexpr" for name in constexprs})
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    assert kernel.asm["cubin"], fn
    print("compiled", fn.__name__, constexprs)

for dt in ("bf16", "fp32"):
    for write_grad in (True, False):
        compile_(lce._lce_fwd_kernel, dict(logits_ptr="*" + dt, stride_row="i32", targets_ptr="*i64",
                 loss_ptr="*fp32", lse_ptr="*fp32", V="i32"), dict(BLOCK_V=8192, WRITE_GRAD=write_grad), 16)
    compile_(lce._lce_bwd_kernel, dict(logits_ptr="*" + dt, stride_row="i32", targets_ptr="*i64",
             lse_ptr="*fp32", scale_ptr="*fp32", V="i32"), dict(BLOCK_V=8192), 16)
    for res in (True, False):
        compile_(rms._rms_norm_fwd_kernel, dict(x_ptr="*" + dt, r_ptr="*" + dt, w_ptr="*" + dt, y_ptr="*" + dt,
                 h_ptr="*" + dt, rstd_ptr="*fp32", D="i32", eps="fp32"), dict(BLOCK_D=512, HAS_RESIDUAL=res), 2)
        compile_(rms._rms_norm_bwd_kernel, dict(h_ptr="*" + dt, w_ptr="*" + dt, rstd_ptr="*fp32", dy_ptr="*" + dt,
                 dh_out_ptr="*" + dt, dx_ptr="*" + dt, dw_ptr="*fp32", M="i32", D="i32", rows_per_program="i32"),
                 dict(BLOCK_D=512, HAS_DH_OUT=res, HAS_DW=res), 2)
    compile_(swi._swiglu_fwd_kernel, dict(g_ptr="*" + dt, u_ptr="*" + dt, out_ptr="*" + dt, numel="i32"),
             dict(BLOCK=1024), 4)
    compile_(swi._swiglu_bwd_kernel, dict(g_ptr="*" + dt, u_ptr="*" + dt, dout_ptr="*" + dt, dg_ptr="*" + dt,
             du_ptr="*" + dt, numel="i32"), dict(BLOCK=1024), 4)
print("ALL OK")
'''


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: Triton kernel tests not run")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice about a future default
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    out = result.stdout + result.stderr
    if "SKIP:" in result.stdout:
        pytest.skip(result.stdout.split("SKIP:", 1)[1].strip())
    if result.returncode != 0 and ("ptxas" in out and "not found" in out.lower()):
        pytest.skip("triton's bundled ptxas is missing: cannot compile to a cubin here")
    assert result.returncode == 0 and "ALL OK" in result.stdout, out[-4000:]
