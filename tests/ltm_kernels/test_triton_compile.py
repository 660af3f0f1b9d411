"""The LM-head, RMSNorm, SwiGLU and posterior-step Triton kernels compile for an H100 (sm_90) down to a cubin,
without a GPU (the attention kernels' test files do the same for theirs, with the same helper).

The interpreter tests run the kernels' math on CPU but do not type-check them the way the compiler does
(loop-carried types, constexpr use, pointer dtypes). Triton's ahead-of-time path (`triton.compile` with an
explicit target, and the ptxas shipped in the wheel) does, so GPU-only compile errors show up on any machine.
Run in a subprocess: the kernels must be decorated without TRITON_INTERPRET (tests/conftest.py may set it).
"""

from triton_helpers import compile_for_sm90

SCRIPT = r"""
lce = importlib.import_module("ltm_kernels.lm_head_nll")
rms = importlib.import_module("ltm_kernels.rms_norm")
swi = importlib.import_module("ltm_kernels.swiglu")
pst = importlib.import_module("ltm_kernels.posterior_step_triton")

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
    latents = {name: "*" + dt for name in ("mu_ptr", "lv_ptr", "m_mu_ptr", "v_mu_ptr", "m_lv_ptr", "v_lv_ptr",
                                           "z_ptr", "g_ptr", "e_ptr")}
    for schedule in (0, 1, 2):
        compile_(pst._posterior_step_kernel, dict(latents, step_ptr="*i64", n="i32", total_steps="i32", lr="fp64",
                 beta1="fp64", beta2="fp64", eps="fp64", weight_decay="fp64"),
                 dict(SCHEDULE=schedule, LERP_FROM_M=True, BLOCK=pst._BLOCK), 4)
print("ALL OK")
"""


def test_kernels_compile_for_sm90():
    compile_for_sm90(SCRIPT)
