"""ltm::self_attention and ltm::latent_attention (C++ CPU kernels, csrc/attention.cpp) against the eager
references in float64, through the public functions and autograd: outputs and dq, dk, dv."""

import pytest
import torch

from helpers import lower_isa_levels, run_at_isa
from ltm_kernels import _extension, extension_status, reference
from ltm_kernels.attention_cpp import latent_attention_cpp, self_attention_cpp
from ltm_kernels.reference import latent_attention_ref, self_attention_ref

F64 = torch.float64


@pytest.fixture
def needs_extension():
    available, reason = extension_status()
    if not available:
        pytest.skip(reason)


def rope_tables(positions, hd, dtype=F64):
    """cos, sin (len(positions), hd/2) at theta 10000, computed in float64, cast to dtype."""
    cos, sin = reference.rope_tables(torch.as_tensor(positions), hd, 10000.0, F64)
    return cos.to(dtype), sin.to(dtype)


def heads(gen, B, H, L, hd, dtype=F64):
    """(B, H, L, hd) as the model passes it: the transposed view of a (B, L, H, hd) projection."""
    return torch.randn(B, L, H, hd, generator=gen, dtype=F64).to(dtype).transpose(1, 2)


# Measured worst case over these shapes, |error| / (1 + |expected|): float64 1.3e-14, float32 6.9e-6 (unit-normal
# q, k, v and grad_out; the float32 error stays within 35% of this tolerance).
TOL = {F64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=2e-5)}


def check_against_reference(fused_fn, ref_fn, inputs, tables, dtype, tol):
    """Run fused_fn on `inputs` cast to dtype and ref_fn in float64 on the same rounded values; compare out
    and the gradients of <out, g> with respect to q, k, v."""
    exact = [x.to(dtype).to(F64).requires_grad_() for x in inputs]
    fused_in = [x.detach().to(dtype).requires_grad_() for x in exact]
    ref = ref_fn(*exact, *[t.to(F64) for t in tables])
    out = fused_fn(*fused_in, *[t.to(dtype) for t in tables])
    assert out.shape == ref.shape and out.dtype == dtype
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(99), dtype=F64)
    ref.backward(grad)
    out.backward(grad.to(dtype))
    for name, a, e in [("out", out, ref)] + [(n, x.grad, y.grad) for n, x, y in zip("qkv", fused_in, exact)]:
        assert a is not None, f"no gradient reached {name}"
        torch.testing.assert_close(a.detach().to(F64), e.detach(), **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.extension
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("N, hd", [(37, 32), (130, 64)])  # not multiples of the 64-row query block
@pytest.mark.parametrize("window", [1, 3, 16, 64, 200])  # 200 >= N: plain causal
def test_self_attention_matches_reference(needs_extension, N, hd, window, dtype):
    gen = torch.Generator().manual_seed(N + window)
    q, k, v = (heads(gen, 2, 3, N, hd) for _ in range(3))
    cos, sin = rope_tables(range(N), hd)
    check_against_reference(
        lambda q, k, v, c, s: self_attention_cpp(q, k, v, c, s, window),
        lambda q, k, v, c, s: self_attention_ref(q, k, v, c, s, window),
        (q, k, v),
        (cos, sin),
        dtype,
        TOL[dtype],
    )


@pytest.mark.extension
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("N, hd", [(37, 32), (130, 64), (1, 64)])  # N = 1: a KV-cache decoding step
@pytest.mark.parametrize("M", [1, 3, 8, 64, 200])
def test_latent_attention_matches_reference(needs_extension, N, M, hd, dtype):
    gen = torch.Generator().manual_seed(N + M)
    q = heads(gen, 2, 3, N, hd)
    k, v = (heads(gen, 2, 3, M, hd) for _ in range(2))
    cos_q, sin_q = rope_tables(range(N), hd)
    cos_k, sin_k = rope_tables([7 * j for j in range(M)], hd)  # latent positions: a stride, as in the model
    check_against_reference(
        latent_attention_cpp, latent_attention_ref, (q, k, v), (cos_q, sin_q, cos_k, sin_k), dtype, TOL[dtype]
    )


@pytest.mark.extension
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("op", ["self", "latent"])
def test_low_precision_error(needs_extension, op, dtype):
    """docs/kernels.md, 'The 2x rule': the kernel's error (float32 inside) is at most 2x that of the eager reference
    run in the same dtype, both against float64, for out and every gradient."""
    gen = torch.Generator().manual_seed(5)
    N, M, hd = 130, 40, 64
    q = heads(gen, 2, 2, N, hd)
    k, v = (heads(gen, 2, 2, N if op == "self" else M, hd) for _ in range(2))
    grad = torch.randn(2, 2, N, hd, generator=gen, dtype=F64).to(dtype)
    tables = rope_tables(range(N), hd)
    if op == "self":
        fused_fn = lambda *a: self_attention_cpp(*a, 16)  # noqa: E731
        ref_fn = lambda *a: self_attention_ref(*a, 16)  # noqa: E731
    else:
        tables += rope_tables([7 * j for j in range(M)], hd)
        fused_fn, ref_fn = latent_attention_cpp, latent_attention_ref
    tables = [t.float() for t in tables]  # the model's tables are float32 for 16-bit models

    def run(fn, in_dtype):
        xs = [x.detach().to(in_dtype).requires_grad_() for x in (q, k, v)]
        out = fn(*xs, *[t.to(F64) if in_dtype == F64 else t for t in tables])
        out.backward(grad.to(in_dtype))
        return [out.detach().to(F64)] + [x.grad.to(F64) for x in xs]

    exact = run(ref_fn, F64)
    fused, eager = run(fused_fn, dtype), run(ref_fn, dtype)
    for name, f, e, x in zip(["out", "dq", "dk", "dv"], fused, eager, exact):
        fused_err, eager_err = (f - x).abs().max().item(), (e - x).abs().max().item()
        floor = torch.finfo(dtype).eps * x.abs().max().item()
        assert fused_err <= 2 * eager_err + floor, f"{name}: fused {fused_err:.3g} vs eager {eager_err:.3g}"


@pytest.mark.extension
@pytest.mark.parametrize("op", ["self", "latent"])
def test_any_strides(needs_extension, op):
    """Inputs with a strided last dim, permuted layouts and a grad_out view give the very bits of contiguous
    inputs; the gradients of dense inputs take their layout."""
    gen = torch.Generator().manual_seed(11)
    B, H, N, M, hd = 2, 3, 70, 9, 32
    L = N if op == "self" else M
    dense = [torch.randn(B, H, n, hd, generator=gen) for n in (N, L, L)]
    strided = [
        torch.randn(B, H, N, 2 * hd, generator=gen)[..., ::2].copy_(dense[0]),  # last-dim stride 2
        dense[1].permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2),  # (L, B, hd, H) memory
        dense[2].transpose(1, 2).contiguous().transpose(1, 2),  # (B, L, H, hd) memory
    ]
    tables = rope_tables(range(N), hd, torch.float32)
    if op == "self":
        fn = lambda *a: self_attention_cpp(*a, 20)  # noqa: E731
    else:
        tables += rope_tables(range(0, 3 * M, 3), hd, torch.float32)
        fn = latent_attention_cpp
    grad = torch.randn(B, N, H, hd, generator=gen).transpose(1, 2)
    results = []
    for xs in (dense, strided):
        xs = [x.detach().requires_grad_() for x in xs]
        out = fn(*xs, *tables)
        out.backward(grad)
        results.append([out.detach()] + [x.grad for x in xs])
        assert out.is_contiguous()  # q's layout for a contiguous q; contiguous for q with a gap in its last dim
    for name, a, b in zip(["out", "dq", "dk", "dv"], *results):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    for x, g in zip(strided[1:], results[1][2:]):
        assert g.stride() == x.stride()  # gradients in the layout of their (dense) input


@pytest.mark.extension
def test_model_layout_output_is_a_view_of_merged_heads(needs_extension):
    """For the model's q (a transposed view of (B, N, H, hd)) out has the same layout, so merging the heads
    (out.transpose(1, 2).reshape(B, N, H * hd)) is a view, not a copy."""
    gen = torch.Generator().manual_seed(12)
    q, k, v = (heads(gen, 2, 4, 33, 16, torch.float32) for _ in range(3))
    out = self_attention_cpp(q, k, v, *rope_tables(range(33), 16, torch.float32), 8)
    assert out.transpose(1, 2).is_contiguous()


def _opcheck_inputs(op, requires_grad):
    gen = torch.Generator().manual_seed(13)
    N, M, hd = 70, 5, 16
    q = heads(gen, 2, 2, N, hd, torch.float32)
    k, v = (heads(gen, 2, 2, N if op == "self_attention" else M, hd, torch.float32) for _ in range(2))
    if requires_grad:
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    tables = list(rope_tables(range(N), hd, torch.float32))
    if op == "latent_attention":
        tables += rope_tables(range(M), hd, torch.float32)
        return [q, k, v, *tables], []
    return [q, k, v, *tables], [20]


@pytest.mark.extension
@pytest.mark.parametrize("op", ["self_attention", "latent_attention"])
def test_opcheck(needs_extension, op):
    forward = getattr(torch.ops.ltm, op).default
    for requires_grad in (False, True):  # with grads: checks the autograd registration too
        tensors, scalars = _opcheck_inputs(op, requires_grad)
        torch.library.opcheck(forward, (*tensors, *scalars))
    tensors, scalars = _opcheck_inputs(op, False)
    out, lse = forward(*tensors, *scalars)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(getattr(torch.ops.ltm, f"{op}_backward").default, (grad_out, *tensors, out, lse, *scalars))


def _self_args():
    gen = torch.Generator().manual_seed(14)
    q, k, v = (heads(gen, 1, 2, 6, 8) for _ in range(3))
    return dict(q=q, k=k, v=v, cos=rope_tables(range(6), 8)[0], sin=rope_tables(range(6), 8)[1], window=3)


def _latent_args():
    gen = torch.Generator().manual_seed(15)
    q = heads(gen, 1, 2, 6, 8)
    k, v = (heads(gen, 1, 2, 4, 8) for _ in range(2))
    (cq, sq), (ck, sk) = rope_tables(range(6), 8), rope_tables(range(4), 8)
    return dict(q=q, k=k, v=v, cos_q=cq, sin_q=sq, cos_k=ck, sin_k=sk)


@pytest.mark.extension
@pytest.mark.parametrize(
    "op, change, message",
    [
        ("self", dict(q=lambda a: a["q"][0]), "q must be 4-D"),
        ("self", dict(k=lambda a: a["k"][:, :, :5], v=lambda a: a["v"][:, :, :5]), "k must have as many positions"),
        ("self", dict(v=lambda a: a["v"][..., :6]), "v must have the shape of k"),
        ("self", dict(k=lambda a: a["k"].float()), "k must have the dtype of q"),
        ("self", dict(q=lambda a: a["q"].int()), "q must be float32, float64, bfloat16 or float16"),
        (
            "self",
            dict(q=lambda a: a["q"][..., :7], k=lambda a: a["k"][..., :7], v=lambda a: a["v"][..., :7]),
            "head_dim .* must be even",
        ),
        ("self", dict(cos=lambda a: a["cos"][:5]), r"cos must have shape \(6, 4\)"),
        ("self", dict(sin=lambda a: a["sin"].float()), "sin must have the dtype of cos"),
        ("self", dict(window=lambda a: 0), "window must be >= 1"),
        ("latent", dict(k=lambda a: a["k"][:, :1], v=lambda a: a["v"][:, :1]), "k must have the batch, heads and"),
        ("latent", dict(k=lambda a: a["k"][:, :, :0], v=lambda a: a["v"][:, :, :0]), "k must hold at least one"),
        ("latent", dict(cos_k=lambda a: a["cos_q"]), r"cos_k must have shape \(4, 4\)"),
        ("latent", dict(sin_q=lambda a: a["sin_q"].int()), "sin_q must be floating point"),
    ],
)
def test_bad_input_names_the_argument(needs_extension, op, change, message):
    args = _self_args() if op == "self" else _latent_args()
    args.update({name: f(args) for name, f in change.items()})
    fn = self_attention_cpp if op == "self" else latent_attention_cpp
    with pytest.raises(RuntimeError, match=message):
        fn(**args)


@pytest.mark.extension
@pytest.mark.parametrize("op", ["self", "latent"])
def test_backward_checks_its_extra_inputs(needs_extension, op):
    args = list((_self_args() if op == "self" else _latent_args()).values())
    name = "self_attention" if op == "self" else "latent_attention"
    tensors, scalars = (args[:5], args[5:]) if op == "self" else (args, [])
    out, lse = getattr(torch.ops.ltm, name)(*tensors, *scalars)
    backward = getattr(torch.ops.ltm, f"{name}_backward")
    with pytest.raises(RuntimeError, match="grad_out must have the shape of q"):
        backward(out[..., :1, :], *tensors, out, lse, *scalars)
    with pytest.raises(RuntimeError, match="lse must be Double"):
        backward(out, *tensors, out, lse.float(), *scalars)


def test_without_extension_raises_with_the_reason(monkeypatch):
    monkeypatch.setattr(_extension, "extension_status", lambda: (False, "extension not built: test"))
    for fn, nargs in ((self_attention_cpp, 6), (latent_attention_cpp, 7)):
        with pytest.raises(RuntimeError, match="needs the compiled extension: extension not built: test"):
            fn(*[None] * nargs)


_RUN_ON_SAVED_INPUTS = """
import sys, torch
from ltm_kernels import extension_status
from ltm_kernels.attention_cpp import latent_attention_cpp, self_attention_cpp
assert extension_status()[0], extension_status()
out = []
for op, inputs, tables, grad in torch.load(sys.argv[1]):
    xs = [x.requires_grad_() for x in inputs]
    y = self_attention_cpp(*xs, *tables, 16) if op == "self" else latent_attention_cpp(*xs, *tables)
    y.backward(grad)
    out.append([y.detach()] + [x.grad for x in xs])
torch.save((torch.backends.cpu.get_cpu_capability(), out), sys.argv[2])
"""


@pytest.mark.extension
def test_every_isa_copy(needs_extension, tmp_path):
    """The float softmax loops are compiled for SSE2, AVX2 and AVX-512 and picked at run time, capped by
    ATEN_CPU_CAPABILITY: every copy this CPU can run matches the float64 reference (self-attention, and
    latent attention with short rows (M = 4, the flat-tile path) and long ones (M = 40))."""
    levels = lower_isa_levels()
    gen = torch.Generator().manual_seed(16)
    cases = []
    for op, M in (("self", 130), ("latent", 4), ("latent", 40)):
        inputs = [heads(gen, 2, 2, 130, 64)] + [heads(gen, 2, 2, M, 64) for _ in range(2)]
        tables = rope_tables(range(130), 64) + (rope_tables(range(0, 9 * M, 9), 64) if op == "latent" else ())
        cases.append((op, inputs, tables, torch.randn(2, 2, 130, 64, generator=gen, dtype=F64)))
    torch.save(
        [(op, [x.float() for x in xs], [t.float() for t in ts], g.float()) for op, xs, ts, g in cases],
        tmp_path / "in.pt",
    )
    for level in levels:
        results = run_at_isa(level, _RUN_ON_SAVED_INPUTS, tmp_path / "in.pt", tmp_path / "out.pt")
        for (op, inputs, tables, grad), got in zip(cases, results):
            xs = [x.float().double().requires_grad_() for x in inputs]
            ts = [t.float().double() for t in tables]
            ref = self_attention_ref(*xs, *ts, 16) if op == "self" else latent_attention_ref(*xs, *ts)
            ref.backward(grad.float().double())
            for name, a, e in zip(["out", "dq", "dk", "dv"], got, [ref.detach()] + [x.grad for x in xs]):
                torch.testing.assert_close(
                    a.double(),
                    e,
                    **TOL[torch.float32],
                    msg=lambda m, name=name, op=op, level=level: f"{level} {op}: {name}: {m}",
                )


@pytest.mark.parametrize("window", [0, -3])
def test_reference_refuses_a_window_below_one_as_the_ops_do(window):
    """self_attention_ref used to return zeros for window <= 0; it now raises, naming the argument, as the
    C++ op does (and the Triton functional)."""
    q = torch.randn(1, 1, 4, 8, dtype=F64)
    cos, sin = rope_tables(range(4), 8)
    with pytest.raises(ValueError, match=r"window must be an int >= 1 \(query i sees keys"):
        reference.self_attention_ref(q, q, q, cos, sin, window)
    if extension_status()[0]:
        with pytest.raises(RuntimeError, match="window must be >= 1"):
            self_attention_cpp(q, q, q, cos, sin, window)
