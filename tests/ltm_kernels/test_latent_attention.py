"""latent_attention_triton against latent_attention_ref in float64: out, dq, dk, dv for a random upstream
gradient; M from 1 to 64 latents, N not a multiple of the query block and N = 1 (decoding), head dims 32, 64,
128, strided q/k/v as the model passes them; argument errors; the registered ops under opcheck and
torch.compile; on a GPU the fp16/bf16 rule of docs/kernels.md, determinism, CUDA graphs; and an sm_90
compile of both kernels without a GPU."""

import importlib
import math

import pytest
import torch

from ltm_kernels import latent_attention_triton, reference
from ltm_kernels.reference import latent_attention_ref
from triton_helpers import assert_close, compile_for_sm90, gpu, interpreter, rel_err

# the module, not the function of the same name that `ltm_kernels` exports
la = importlib.import_module("ltm_kernels.latent_attention")

F64 = torch.float64
NAMES = ("out", "dq", "dk", "dv")


def rope_tables(positions, hd, theta=10000.0):
    """(len, hd/2) cos and sin of the published RoPE at `positions`, float64."""
    return reference.rope_tables(torch.as_tensor(positions), hd, theta, F64)


def make_inputs(B, H, N, M, hd, seed=0, start=0):
    """float64 q, k, v, the four tables (query positions start.., latent positions 0, 42, 84, ...), dO."""
    g = torch.Generator().manual_seed(seed)
    q, dy = (torch.randn(B, H, N, hd, generator=g, dtype=F64) for _ in range(2))
    k, v = (torch.randn(B, H, M, hd, generator=g, dtype=F64) for _ in range(2))
    cos_q, sin_q = rope_tables(torch.arange(start, start + N), hd)
    cos_k, sin_k = rope_tables(42 * torch.arange(M), hd)
    return (q, k, v, cos_q, sin_q, cos_k, sin_k), dy


def as_layout(x, strided):
    """x (B, H, L, hd) as a new leaf: contiguous, or the model's layout (a transposed view of (B, L, H, hd)
    sliced out of a wider buffer, so neither contiguous nor dense)."""
    if not strided:
        return x.clone()
    B, H, L, hd = x.shape
    buf = torch.zeros(B, L, 2, H, hd, dtype=x.dtype, device=x.device)
    view = buf[:, :, 1].transpose(1, 2)
    view.copy_(x)
    return view


def run(fn, inputs, dy, dtype, device="cpu", strided=False, table_dtype=None):
    """(out, dq, dk, dv) of fn with q, k, v in `dtype` (and the layout), tables in `table_dtype` (default:
    fp32, or fp64 for the float64 reference)."""
    q, k, v, *tables = inputs
    table_dtype = table_dtype or (F64 if dtype == F64 else torch.float32)
    leaves = [as_layout(t.to(device, dtype), strided).requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves, *(t.to(device, table_dtype) for t in tables))
    grads = torch.autograd.grad(out, leaves, dy.to(device, dtype))
    return [out.detach(), *grads]


def check_against_reference(got, want, tol, M):
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape, (name, g.shape, w.shape)
        if name in ("dq", "dk") and M == 1:  # one key: the softmax is constant, dq and dk are zero
            assert g.abs().max() <= tol, (name, g.abs().max())  # (unit-scale inputs: absolute = relative)
        else:
            assert_close(g, w, tol, name)


# ------------------------------------------------------------------------- interpreter (CPU, fp32, tiny)
@interpreter
@pytest.mark.parametrize("hd", [32, 64])
@pytest.mark.parametrize("N", [37, 1])  # 37: three query blocks of 16, the last partial; 1: decoding
@pytest.mark.parametrize("M", [1, 3, 8, 64])
def test_equals_float64_reference(M, N, hd):
    inputs, dy = make_inputs(2, 2, N, M, hd, seed=M + N + hd)
    want = run(latent_attention_ref, inputs, dy, F64)
    got = run(latent_attention_triton, inputs, dy, torch.float32)
    assert all(g.dtype == torch.float32 for g in got)
    check_against_reference(got, want, 1e-5, M)


@interpreter
@pytest.mark.parametrize("B,H,N,M,hd", [(1, 2, 40, 8, 64), (2, 1, 19, 64, 32), (1, 2, 5, 3, 128)])
def test_strided_inputs_and_output_layout(B, H, N, M, hd):
    """q, k, v as strided views (the model's transposed (B, L, H, hd) layout, inside a wider buffer)."""
    inputs, dy = make_inputs(B, H, N, M, hd, seed=7, start=100)
    want = run(latent_attention_ref, inputs, dy, F64)
    got = run(latent_attention_triton, inputs, dy, torch.float32, strided=True)
    check_against_reference(got, want, 1e-5, M)


@interpreter
def test_out_keeps_the_layout_of_a_dense_q():
    """A transposed view of a contiguous (B, N, H, hd) q gives out in the same layout, so the model's
    `out.transpose(1, 2).reshape(B, N, H * hd)` is free."""
    (q, k, v, *tables), _ = make_inputs(1, 2, 5, 3, 32)
    qt = q.float().transpose(1, 2).contiguous().transpose(1, 2)
    out = latent_attention_triton(qt, k.float(), v.float(), *(t.float() for t in tables))
    assert out.stride() == qt.stride()
    assert_close(out, latent_attention_ref(q, k, v, *tables), 1e-5, "out")


@interpreter
def test_tables_of_other_float_dtypes_are_used_in_fp32():
    inputs, dy = make_inputs(1, 2, 9, 5, 32)
    want = run(latent_attention_triton, inputs, dy, torch.float32)
    got = run(latent_attention_triton, inputs, dy, torch.float32, table_dtype=F64)
    for name, g, w in zip(NAMES, got, want):
        assert torch.equal(g, w), name


@interpreter
@pytest.mark.parametrize("n_chunks", [2, 3])
def test_chunked_dk_dv_reduction_matches_one_chunk(monkeypatch, n_chunks):
    """The backward's partial-sum path (several chunks per (batch, head)) against the direct one."""
    inputs, dy = make_inputs(1, 2, 40, 8, 32, seed=3)  # 3 query blocks of 16
    monkeypatch.setattr(la, "_num_chunks", lambda n_blocks, bh, sms: (1, n_blocks))
    one = run(latent_attention_triton, inputs, dy, torch.float32)
    monkeypatch.setattr(la, "_num_chunks", lambda n_blocks, bh, sms: (n_chunks, math.ceil(n_blocks / n_chunks)))
    several = run(latent_attention_triton, inputs, dy, torch.float32)
    for name, g, w in zip(NAMES, several, one):
        assert_close(g, w, 1e-6, name)
    want = run(latent_attention_ref, inputs, dy, F64)
    check_against_reference(several, want, 1e-5, 8)


def test_backward_chunks_fill_an_h100():
    """The deterministic dK/dV reduction keeps ~2 programs per SM (132 on an H100) at both ends of B*H."""
    sms = 132
    for bh, N in ((512, 1024), (8, 1024), (32, 1000), (8, 64), (512, 1)):
        blocks = math.ceil(N / 64)
        n_chunks, per_chunk = la._num_chunks(blocks, bh, sms)
        assert (n_chunks - 1) * per_chunk < blocks <= n_chunks * per_chunk  # no empty chunk, all covered
        assert bh * n_chunks >= min(sms, bh * blocks)  # the GPU is filled when there are blocks enough
        assert bh * n_chunks <= max(4 * sms, bh)  # and not over-split (each chunk writes an M x hd partial)
    assert la._num_chunks(16, 512, sms) == (1, 16)  # ltm-l at batch 64: dk, dv written directly


@interpreter
def test_bad_inputs_name_the_argument():
    (q, k, v, cq, sq, ck, sk), _ = make_inputs(1, 2, 4, 3, 32)
    q, k, v, cq, sq, ck, sk = (t.float() for t in (q, k, v, cq, sq, ck, sk))
    kb, vb = torch.randn(1, 2, 65, 32), torch.randn(1, 2, 65, 32)
    cb, sb = torch.randn(65, 16), torch.randn(65, 16)
    with pytest.raises(ValueError, match="M = 65.*at most 64"):
        latent_attention_triton(q, kb, vb, cq, sq, cb, sb)
    with pytest.raises(ValueError, match="at least one latent"):
        latent_attention_triton(q, k[:, :, :0], v[:, :, :0], cq, sq, ck[:0], sk[:0])
    q48 = torch.randn(1, 2, 4, 48)
    with pytest.raises(ValueError, match="head dim hd.*got 48"):
        latent_attention_triton(q48, torch.randn(1, 2, 3, 48), torch.randn(1, 2, 3, 48), cq[:, :24], sq, ck, sk)
    with pytest.raises(ValueError, match="k must have shape"):
        latent_attention_triton(q, k[:1, :1], v[:1, :1], cq, sq, ck, sk)
    with pytest.raises(ValueError, match="v must have the shape of k"):
        latent_attention_triton(q, k, v[:, :, :2], cq, sq, ck, sk)
    with pytest.raises(ValueError, match="q must be 4-D"):
        latent_attention_triton(q[0], k, v, cq, sq, ck, sk)
    with pytest.raises(TypeError, match="q must have dtype"):
        latent_attention_triton(q.double(), k.double(), v.double(), cq, sq, ck, sk)
    with pytest.raises(TypeError, match="v must have the dtype of q"):
        latent_attention_triton(q, k, v.half(), cq, sq, ck, sk)
    with pytest.raises(TypeError, match="sin_k must have dtype"):
        latent_attention_triton(q, k, v, cq, sq, ck, sk.int())
    with pytest.raises(ValueError, match=r"cos_q must have shape \(4, 16\)"):
        latent_attention_triton(q, k, v, cq[:3], sq, ck, sk)
    with pytest.raises(ValueError, match=r"sin_k must have shape \(3, 16\)"):
        latent_attention_triton(q, k, v, cq, sq, ck, sk.t())
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        latent_attention_triton(q, k.tolist(), v, cq, sq, ck, sk)
    with pytest.raises(ValueError, match="q must be non-empty"):
        latent_attention_triton(q[:, :, :0], k, v, cq[:0], sq[:0], ck, sk)


@interpreter
def test_opcheck():
    (q, k, v, *tables), dy = make_inputs(1, 2, 5, 3, 32)
    q = q.float().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    k, v = (t.float().requires_grad_(True) for t in (k, v))
    tables = [t.float() for t in tables]
    torch.library.opcheck(torch.ops.ltm_triton.latent_attention.default, (q, k, v, *tables))
    out, lse = torch.ops.ltm_triton.latent_attention(q.detach(), k.detach(), v.detach(), *tables)
    torch.library.opcheck(
        torch.ops.ltm_triton.latent_attention_backward.default,
        (dy.float(), q.detach(), k.detach(), v.detach(), *tables, out, lse),
    )


@interpreter
def test_traces_in_one_graph():
    """torch.compile(fullgraph=True) traces through the custom ops (aot_eager: no C++ compiler needed)."""
    inputs, dy = make_inputs(1, 2, 7, 3, 32)
    compiled = torch.compile(latent_attention_triton, fullgraph=True, backend="aot_eager")
    got = run(compiled, inputs, dy, torch.float32, strided=True)
    want = run(latent_attention_triton, inputs, dy, torch.float32, strided=True)
    for name, g, w in zip(NAMES, got, want):
        assert torch.equal(g, w), name


# ------------------------------------------------------------------------------------------------ GPU
@gpu
@pytest.mark.parametrize("M", [3, 8, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_low_precision_within_twice_eager_error(dtype, M):
    """docs/kernels.md, 'The 2x rule': against float64, the fused op's error is <= 2x the eager op's in the same dtype,
    for out and every gradient; fp32 fused matches float64 to 1e-5."""
    inputs, dy = make_inputs(4, 8, 1000, M, 64, seed=M)
    want = run(latent_attention_ref, inputs, dy, F64, "cuda")
    eager = run(latent_attention_ref, inputs, dy, dtype, "cuda", strided=True)
    fused = run(latent_attention_triton, inputs, dy, dtype, "cuda", strided=True)
    fp32 = run(latent_attention_triton, inputs, dy, torch.float32, "cuda", strided=True)
    check_against_reference(fp32, want, 1e-5, M)
    for name, e, f, ref in zip(NAMES, eager, fused, want):
        assert f.dtype == dtype and torch.isfinite(f).all(), name
        assert rel_err(f, ref) <= 2 * rel_err(e, ref) + 1e-6, (name, rel_err(f, ref), rel_err(e, ref))


@gpu
@pytest.mark.parametrize(
    "B,H,N,M,hd,strided",
    [(2, 3, 37, 1, 32, False), (1, 8, 1, 8, 64, True), (3, 2, 129, 64, 128, True), (64, 8, 16, 5, 64, False)],
)
def test_gpu_fp32_odd_shapes(B, H, N, M, hd, strided):
    inputs, dy = make_inputs(B, H, N, M, hd, seed=N)
    want = run(latent_attention_ref, inputs, dy, F64, "cuda")
    got = run(latent_attention_triton, inputs, dy, torch.float32, "cuda", strided=strided)
    check_against_reference(got, want, 1e-5, M)


@gpu
@pytest.mark.parametrize("B", [1, 64])  # B*H = 8: several chunks per (batch, head); 512: one
def test_gpu_backward_is_deterministic(B):
    inputs, dy = make_inputs(B, 8, 1000, 8, 64)
    first = run(latent_attention_triton, inputs, dy, torch.bfloat16, "cuda", strided=True)
    second = run(latent_attention_triton, inputs, dy, torch.bfloat16, "cuda", strided=True)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def _leaves(inputs, dtype):
    q, k, v, *tables = inputs
    leaves = [as_layout(t.to("cuda", dtype), True).requires_grad_(True) for t in (q, k, v)]
    return leaves, [t.to("cuda", torch.float32) for t in tables]


@gpu
def test_gpu_cuda_graph_replay_equals_eager():
    """Forward and backward captured in one CUDA graph (as the inner loop is), replayed on new inputs."""
    inputs, dy = make_inputs(2, 8, 300, 8, 64)
    (q, k, v), tables = _leaves(inputs, torch.bfloat16)
    g = dy.to("cuda", torch.bfloat16)

    def step():
        out = latent_attention_triton(q, k, v, *tables)
        return (out, *torch.autograd.grad(out, (q, k, v), g))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as CUDA-graph capture requires
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    new_inputs, _ = make_inputs(2, 8, 300, 8, 64, seed=1)
    with torch.no_grad():
        for leaf, t in zip((q, k, v), new_inputs):
            leaf.copy_(t)
    graph.replay()
    torch.cuda.synchronize()
    expect = step()
    for name, c, e in zip(NAMES, captured, expect):
        assert torch.equal(c, e), name


@gpu
def test_gpu_torch_compile_fullgraph_equals_eager():
    inputs, dy = make_inputs(2, 8, 300, 8, 64)
    compiled = torch.compile(latent_attention_triton, fullgraph=True)
    got = run(compiled, inputs, dy, torch.bfloat16, "cuda", strided=True)
    want = run(latent_attention_triton, inputs, dy, torch.bfloat16, "cuda", strided=True)
    for name, g, w in zip(NAMES, got, want):
        assert torch.equal(g, w), name


# ------------------------------------------------------------------------- sm_90 compile, no GPU needed
SCRIPT = r'''
la = importlib.import_module("ltm_kernels.latent_attention")

def signature(fn, dt, grad_dt):
    """Pointers in the inputs' dtype, fp32 for the tables and lse, grad_dt for dk/dv; ints for the rest."""
    sig = {}
    constexprs = {p.name for p in fn.params if p.is_constexpr}
    for name in fn.arg_names:
        if name in constexprs:
            continue
        if name in ("cq_ptr", "sq_ptr", "ck_ptr", "sk_ptr", "lse_ptr"):
            sig[name] = "*fp32"
        elif name in ("dk_ptr", "dv_ptr"):
            sig[name] = "*" + grad_dt
        elif name.endswith("_ptr"):
            sig[name] = "*" + dt
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig

torch_dtype = {"bf16": la.torch.bfloat16, "fp32": la.torch.float32}
for dt in ("bf16", "fp32"):
    prec = la._precision(torch_dtype[dt])
    for M in (8, 64):
        for N in (1000, 1):  # the training config and the decoding one (N = 1)
            cfg = la._fwd_config(N, 64, torch_dtype[dt])
            warps = cfg.pop("num_warps")
            compile_(la._latent_attn_fwd_kernel, signature(la._latent_attn_fwd_kernel, dt, dt),
                     dict(HEAD_DIM=64, BLOCK_M=la._block_m(M), PRECISION=prec, **cfg), warps)
        for grad_dt in (dt, "fp32"):  # one chunk (dk, dv written directly) / several (fp32 partials)
            cfg = la._bwd_config(1000, M, 64, torch_dtype[dt])
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            compile_(la._latent_attn_bwd_kernel, signature(la._latent_attn_bwd_kernel, dt, grad_dt),
                     dict(HEAD_DIM=64, BLOCK_M=la._block_m(M), PRECISION=prec, **cfg), warps, stages)
print("ALL OK")
'''


def test_kernels_compile_for_sm90():
    compile_for_sm90(SCRIPT)
