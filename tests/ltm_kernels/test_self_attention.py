"""self_attention_triton (Triton: RoPE + causal sliding-window attention) against self_attention_ref in float64:
output, lse and dq, dk, dv; windows 1, small, larger than a tile, >= N; N not a multiple of the tile;
head dims 32, 64, 128; non-contiguous inputs; argument errors; opcheck of the registered op; the kernels
compile for sm_90; on a GPU the low-precision rule of docs/kernels.md, CUDA graphs and torch.compile."""

import importlib

import pytest
import torch

from ltm_kernels import reference, self_attention_triton
from ltm_kernels.reference import self_attention_ref, sliding_window_mask
from triton_helpers import assert_close, compile_for_sm90, gpu, interpreter, rel_err

F64 = torch.float64


def rope_tables(n: int, hd: int, theta: float = 10000.0, dtype=torch.float32, device="cpu"):
    cos, sin = reference.rope_tables(torch.arange(n), hd, theta, F64)  # (N, hd/2), computed in float64
    return cos.to(device, dtype), sin.to(device, dtype)


def make_inputs(B, H, N, hd, seed=0, layout="bhnd"):
    """q, k, v, dout in float64; layout "bnhd": (B, N, H, hd) tensors seen as (B, H, N, hd) views."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, N, H, hd) if layout == "bnhd" else (B, H, N, hd)
    ts = [torch.randn(shape, generator=g, dtype=F64) for _ in range(4)]
    return [t.transpose(1, 2) if layout == "bnhd" else t for t in ts]


def run(fn, q, k, v, dout, cos, sin, window, dtype, device="cpu"):
    """[out, dq, dk, dv] of fn with leaves cast to dtype (keeping their strides)."""
    leaves = [t.to(device, dtype).requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves, cos, sin, window)
    dq, dk, dv = torch.autograd.grad(out, leaves, dout.to(device, dtype))
    return [out, dq, dk, dv]


def scaled_err(got, want, floor: float) -> float:
    """max |got - want| / max(max |want|, floor): a relative error that stays meaningful when the true
    gradient is ~0 (window 1: softmax over one key has no gradient with respect to the scores)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return ((got - want).abs().max() / max(want.abs().max().item(), floor)).item()


NAMES = ("out", "dq", "dk", "dv")

# (B, H, N, hd, window). With the interpreter's 16 x 16 tiles: N = 37 leaves a partial last tile; windows
# 18, 20, 31, 33 cut tiles on the window's edge and leave whole tiles inside it (the unmasked path; 31 puts an
# unmasked tile right against the window's edge); 1000 >= N is plain causal; hd 128 at a small N.
CASES = [
    (1, 2, 37, 64, 1),
    (1, 2, 37, 64, 3),
    (1, 2, 37, 64, 16),
    (1, 2, 37, 64, 20),
    (1, 2, 37, 64, 37),
    (1, 2, 37, 64, 1000),
    (1, 2, 40, 32, 18),
    (1, 1, 64, 32, 31),
    (2, 1, 64, 32, 33),
    (1, 1, 20, 128, 5),
    (1, 1, 20, 128, 1000),
]


@interpreter
@pytest.mark.parametrize("B,H,N,hd,window", CASES)
def test_equals_float64_reference(B, H, N, hd, window):
    q, k, v, dout = make_inputs(B, H, N, hd)
    cos, sin = rope_tables(N, hd)
    want = run(self_attention_ref, q, k, v, dout, cos.double(), sin.double(), window, F64)
    got = run(self_attention_triton, q, k, v, dout, cos, sin, window, torch.float32)
    floor = want[3].abs().max().item()  # dv's scale: the size of a gradient that is not ~0
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        err = scaled_err(g, w, floor)
        assert err <= 2e-6, f"{name}: error {err:.2e} (plain relative {rel_err(g, w):.2e})"


@interpreter
@pytest.mark.parametrize("block_m,block_n", [(32, 16), (16, 32)])
@pytest.mark.parametrize("window", [7, 40])
def test_unequal_tiles(monkeypatch, block_m, block_n, window):
    """The GPU configs have BLOCK_M != BLOCK_N: the tile ranges must hold for either being the larger."""
    sa = importlib.import_module("ltm_kernels.self_attention")  # the module, not the exported function

    monkeypatch.setattr(sa, "_FIXED", dict(BLOCK_M=block_m, BLOCK_N=block_n))
    q, k, v, dout = make_inputs(1, 1, 50, 32, seed=3)
    cos, sin = rope_tables(50, 32)
    want = run(self_attention_ref, q, k, v, dout, cos.double(), sin.double(), window, F64)
    got = run(self_attention_triton, q, k, v, dout, cos, sin, window, torch.float32)
    for name, g, w in zip(NAMES, got, want):
        assert_close(g, w, 2e-6, name)


@interpreter
def test_non_contiguous_inputs_and_float64_tables():
    """q, k, v, dout as (B, N, H, hd) tensors transposed to (B, H, N, hd), as the model passes them."""
    B, H, N, hd, window = 2, 2, 37, 64, 16
    q, k, v, dout = make_inputs(B, H, N, hd, seed=1, layout="bnhd")
    assert not q.is_contiguous()
    cos, sin = rope_tables(N, hd, dtype=F64)  # any float dtype; cast to fp32 inside
    want = run(self_attention_ref, q, k, v, dout, cos, sin, window, F64)
    got = run(self_attention_triton, q, k, v, dout, cos, sin, window, torch.float32)
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == (B, H, N, hd) and g.stride() == q.stride(), (name, g.stride())  # no copy to merge heads
        assert_close(g, w, 2e-6, name)
    # not dense (the first N - 3 rows of float32 buffers): the output is a fresh dense tensor (empty_like)
    q, k, v = (t.float()[:, :, : N - 3] for t in (q, k, v))
    got = self_attention_triton(q, k, v, cos[: N - 3], sin[: N - 3], window)
    assert_close(
        got, self_attention_ref(q.double(), k.double(), v.double(), cos[: N - 3], sin[: N - 3], window), 2e-6, "out"
    )


@interpreter
def test_lse_is_the_log_sum_exp_of_the_visible_scores():
    from ltm_kernels.reference import apply_rope_ref

    B, H, N, hd, window = 1, 2, 37, 32, 5
    q, k, v, _ = make_inputs(B, H, N, hd, seed=2)
    cos, sin = rope_tables(N, hd)
    out, lse = torch.ops.ltm_triton.self_attention(q.float(), k.float(), v.float(), cos, sin, window)
    s = apply_rope_ref(q, cos.double(), sin.double()) @ apply_rope_ref(k, cos.double(), sin.double()).mT / hd**0.5
    s = s.masked_fill(~sliding_window_mask(N, window), float("-inf"))
    assert lse.shape == (B, H, N) and lse.dtype == torch.float32 and out.is_contiguous()
    assert_close(lse, torch.logsumexp(s, -1), 1e-6, "lse")


@interpreter
def test_bad_inputs_name_the_argument():
    B, H, N, hd = 1, 2, 8, 32
    q, k, v, _ = (t.float() for t in make_inputs(B, H, N, hd))
    cos, sin = rope_tables(N, hd)
    with pytest.raises(ValueError, match="hd"):
        x = torch.zeros(B, H, N, 48)
        self_attention_triton(x, x, x, *rope_tables(N, 48), 4)
    with pytest.raises(ValueError, match="k must match q"):
        self_attention_triton(q, k[:, :, :4], v, cos, sin, 4)
    with pytest.raises(ValueError, match="v must match q"):
        self_attention_triton(q, k, v.half(), cos, sin, 4)
    with pytest.raises(ValueError, match="q must be 4-D"):
        self_attention_triton(q[0], k[0], v[0], cos, sin, 4)
    with pytest.raises(TypeError, match="q must have dtype"):
        self_attention_triton(q.double(), k.double(), v.double(), cos, sin, 4)
    with pytest.raises(TypeError, match="q must have dtype"):
        self_attention_triton(q.int(), k.int(), v.int(), cos, sin, 4)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        self_attention_triton(q, None, v, cos, sin, 4)
    with pytest.raises(ValueError, match="window"):
        self_attention_triton(q, k, v, cos, sin, 0)
    with pytest.raises(TypeError, match="window"):
        self_attention_triton(q, k, v, cos, sin, 2.0)
    with pytest.raises(TypeError, match="window"):
        self_attention_triton(q, k, v, cos, sin, True)
    with pytest.raises(ValueError, match="cos"):
        self_attention_triton(q, k, v, cos[:4], sin, 4)
    with pytest.raises(ValueError, match="sin"):
        self_attention_triton(q, k, v, cos, torch.zeros(N, hd), 4)
    with pytest.raises(TypeError, match="cos"):
        self_attention_triton(q, k, v, cos.int(), sin, 4)


@interpreter
def test_opcheck():
    B, H, N, hd, window = 1, 1, 5, 32, 3
    q, k, v, dout = (t.float().requires_grad_(True) for t in make_inputs(B, H, N, hd))
    cos, sin = rope_tables(N, hd)
    torch.library.opcheck(torch.ops.ltm_triton.self_attention.default, (q, k, v, cos, sin, window))
    q, k, v, dout = (t.detach() for t in (q, k, v, dout))
    out, lse = torch.ops.ltm_triton.self_attention(q, k, v, cos, sin, window)
    torch.library.opcheck(
        torch.ops.ltm_triton.self_attention_backward.default, (dout, q, k, v, cos, sin, out, lse, window)
    )


@interpreter
def test_torch_compile_fullgraph_traces_the_ops():
    """torch.compile sees the two registered ops (fake shapes, autograd) without a graph break; aot_eager:
    the tracing path without Inductor's code generation (the GPU test below runs Inductor)."""
    B, H, N, hd, window = 1, 2, 20, 32, 6
    q, k, v, dout = make_inputs(B, H, N, hd, layout="bnhd")
    cos, sin = rope_tables(N, hd)

    def fn(q, k, v, cos, sin, window):
        return self_attention_triton(q * 1.5, k, v, cos, sin, window) + 1.0

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    want = run(fn, q, k, v, dout, cos, sin, window, torch.float32)
    got = run(compiled, q, k, v, dout, cos, sin, window, torch.float32)
    for name, g, w in zip(NAMES, got, want):
        assert_close(g, w, 1e-6, name)


# ---- GPU: the compiled kernels ----


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [1, 256, 1000])
def test_gpu_low_precision_within_twice_eager_error(dtype, window):
    B, H, N, hd = 2, 4, 1000, 64  # N not a multiple of any tile
    q, k, v, dout = make_inputs(B, H, N, hd, layout="bnhd")
    cos, sin = rope_tables(N, hd, device="cuda")
    want = run(self_attention_ref, q, k, v, dout, cos.double(), sin.double(), window, F64, "cuda")
    eager = run(self_attention_ref, q, k, v, dout, cos, sin, window, dtype, "cuda")
    fused = run(self_attention_triton, q, k, v, dout, cos, sin, window, dtype, "cuda")
    fp32 = run(self_attention_triton, q, k, v, dout, cos, sin, window, torch.float32, "cuda")
    floor = want[3].abs().max().item()
    for name, e, f, x, w in zip(NAMES, eager, fused, fp32, want):
        assert f.dtype == dtype and f.shape == w.shape
        assert scaled_err(x, w, floor) <= 1e-5, (name, "fp32", scaled_err(x, w, floor))
        err_f, err_e = scaled_err(f, w, floor), scaled_err(e, w, floor)
        # the small absolute slack covers window 1's dq, dk: ~0 in exact math, rounding noise in both
        assert err_f <= 2 * err_e + 1e-4, (name, err_f, err_e)


@gpu
def test_gpu_cuda_graph_replay_equals_eager():
    B, H, N, hd, window = 2, 4, 1000, 64, 256
    cos, sin = rope_tables(N, hd, device="cuda")
    q, k, v, dout = (t.to("cuda", torch.bfloat16) for t in make_inputs(B, H, N, hd, layout="bnhd"))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]

    def step():
        out = self_attention_triton(*leaves, cos, sin, window)
        return (out, *torch.autograd.grad(out, leaves, dout))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles and autotunes, so that capture sees no host sync
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()

    new = [t.to("cuda", torch.bfloat16) for t in make_inputs(B, H, N, hd, seed=5)]
    with torch.no_grad():
        for leaf, t in zip(leaves, new[:3]):
            leaf.copy_(t)
        dout.copy_(new[3])
    graph.replay()
    eager = step()
    for name, s, e in zip(NAMES, static, eager):
        assert torch.equal(s, e), name  # same kernels and configs, no atomics: bitwise equal


@gpu
def test_gpu_torch_compile_fullgraph():
    B, H, N, hd, window = 2, 4, 200, 64, 64
    cos, sin = rope_tables(N, hd, device="cuda")
    q, k, v, dout = make_inputs(B, H, N, hd, layout="bnhd")

    def fn(q, k, v, cos, sin):
        return self_attention_triton(q * 1.5, k, v, cos, sin, window) + 1.0

    compiled = torch.compile(fn, fullgraph=True)
    want = run(lambda q, k, v, c, s, w: fn(q, k, v, c, s), q, k, v, dout, cos, sin, window, torch.bfloat16, "cuda")
    got = run(lambda q, k, v, c, s, w: compiled(q, k, v, c, s), q, k, v, dout, cos, sin, window, torch.bfloat16, "cuda")
    for name, g, w in zip(NAMES, got, want):
        assert_close(g, w, 1e-2, name)  # the elementwise ops around it may fuse and round differently


@gpu
def test_gpu_opcheck():
    B, H, N, hd, window = 1, 2, 100, 64, 16
    q, k, v, _ = (t.to("cuda", torch.bfloat16).requires_grad_(True) for t in make_inputs(B, H, N, hd))
    cos, sin = rope_tables(N, hd, device="cuda")
    torch.library.opcheck(torch.ops.ltm_triton.self_attention.default, (q, k, v, cos, sin, window))


# ---- every kernel compiles for an H100 (sm_90), on any machine ----

COMPILE_SCRIPT = r"""
sa = importlib.import_module("ltm_kernels.self_attention")

def strides(*names):
    return {f"stride_{n}{d}": "i32" for n in names for d in "bhnd"}

scalars = dict(H="i32", N="i32", window="i32", qk_scale="fp32")
for dt in ("bf16", "fp32"):
    P = "*" + dt
    # the base jit functions (under the autotuner) with one config each; fp32 takes smaller tiles
    fwd = dict(HD=64, BLOCK_M=128, BLOCK_N=64, IEEE=False)
    if dt == "fp32":
        fwd = dict(HD=64, BLOCK_M=64, BLOCK_N=32, IEEE=True)
    dkdv = dict(fwd, BLOCK_M=64, BLOCK_N=128) if dt == "bf16" else dict(fwd, BLOCK_M=32, BLOCK_N=64)
    compile_(sa._self_attention_fwd_kernel, dict(q_ptr=P, k_ptr=P, v_ptr=P, cos_ptr="*fp32", sin_ptr="*fp32",
             out_ptr=P, lse_ptr="*fp32", **strides("q", "k", "v", "y"), **scalars, N_KEY="i32", WINDOW_KEY="i32"),
             fwd, 4, 3)
    compile_(sa._self_attention_bwd_dq_kernel, dict(q_ptr=P, k_ptr=P, v_ptr=P, cos_ptr="*fp32", sin_ptr="*fp32",
             out_ptr=P, do_ptr=P, lse_ptr="*fp32", delta_ptr="*fp32", dq_ptr=P, **strides("q", "k", "v", "o", "y"),
             **scalars, sm_scale="fp32", N_KEY="i32", WINDOW_KEY="i32"), fwd, 8 if dt == "bf16" else 4, 3)
    compile_(sa._self_attention_bwd_dkdv_kernel, dict(q_ptr=P, k_ptr=P, v_ptr=P, cos_ptr="*fp32", sin_ptr="*fp32",
             do_ptr=P, lse_ptr="*fp32", delta_ptr="*fp32", dk_ptr=P, dv_ptr=P, **strides("q", "k", "v", "o", "y"),
             **scalars, sm_scale="fp32", N_KEY="i32", WINDOW_KEY="i32"), dkdv, 8 if dt == "bf16" else 4, 3)
print("ALL OK")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    compile_for_sm90(COMPILE_SCRIPT)
