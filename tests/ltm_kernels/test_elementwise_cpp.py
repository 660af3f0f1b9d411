"""ltm::rms_norm and ltm::swiglu (C++ CPU kernels, csrc/elementwise.cpp) against the eager float64 references,
through the public functions and autograd: outputs and every gradient."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import lower_isa_levels, run_at_isa
from ltm_kernels import add_rms_norm_cpp, extension_status, rms_norm_cpp, swiglu_cpp
from ltm_kernels.reference import add_rms_norm_ref, rms_norm_ref, swiglu_ref

F64 = torch.float64
pytestmark = pytest.mark.extension
EPS = 1e-5


@pytest.fixture(autouse=True)
def needs_extension():
    available, reason = extension_status()
    if not available:
        pytest.skip(reason)


def all_ops(fns, x, r, w, g):
    """Outputs of the three ops on (x, r, w) and the gradients of one scalar made from all of them."""
    rms, add_rms, swiglu = fns
    xs = [t.detach().requires_grad_() for t in (x, r, w)]
    y = rms(xs[0], xs[2], EPS)
    y2, h = add_rms(xs[0], xs[1], xs[2], EPS)
    s = swiglu(xs[0], xs[1])
    outs = [y, y2, h, s]
    loss = sum((o.to(F64) * g * (k + 1)).sum() for k, o in enumerate(outs))
    grads = torch.autograd.grad(loss, xs)
    return [t.detach().to(F64) for t in outs + list(grads)]


NAMES = ["rms_norm", "add_rms_norm.y", "add_rms_norm.h", "swiglu", "grad_x", "grad_residual", "grad_weight"]
FUSED = (rms_norm_cpp, add_rms_norm_cpp, swiglu_cpp)
EAGER = (rms_norm_ref, add_rms_norm_ref, swiglu_ref)
# Measured worst case |error| / (1 + |expected|) over these shapes: float64 4e-15, float32 2e-6.
TOL = {F64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def make(shape, seed=0, transpose=False):
    gen = torch.Generator().manual_seed(seed)
    x, r, g = (torch.randn(shape, generator=gen, dtype=F64) for _ in range(3))
    w = 1 + 0.1 * torch.randn(shape[-1], generator=gen, dtype=F64)
    if transpose:  # non-contiguous views of the same values
        x, r = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (x, r))
    return x, r, w, g


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape, transpose", [((3, 7, 40), False), ((2, 33, 256), True), ((1, 1, 5), False)])
def test_matches_reference(dtype, shape, transpose):
    x, r, w, g = make(shape, transpose=transpose)
    got = all_ops(FUSED, *(t.to(dtype) for t in (x, r, w)), g)
    want = all_ops(EAGER, *(t.to(dtype).to(F64) for t in (x, r, w)), g)
    for name, a, e in zip(NAMES, got, want):
        torch.testing.assert_close(a, e, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_precision_within_twice_eager_error(dtype):
    x, r, w, g = make((4, 9, 64), seed=2)
    exact = all_ops(EAGER, x, r, w, g)
    fused = all_ops(FUSED, *(t.to(dtype) for t in (x, r, w)), g)
    eager = all_ops(EAGER, *(t.to(dtype) for t in (x, r, w)), g)
    for name, f, e, ex in zip(NAMES, fused, eager, exact):
        err_f, err_e = (f - ex).abs().max().item(), (e - ex).abs().max().item()
        assert err_f <= 2 * err_e, f"{name}: fused error {err_f:.3g} > 2 x eager {err_e:.3g}"


def test_weight_gradient_only_when_wanted():
    x, r, w, _ = make((2, 5, 16))
    calls = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.ltm.rms_norm_backward.default:
                calls.append(args[5])
            return func(*args, **(kwargs or {}))

    xg, wp = x.float().requires_grad_(), torch.nn.Parameter(w.float())
    with Spy():
        torch.autograd.grad(rms_norm_cpp(xg, wp, EPS).sum(), xg)
        torch.autograd.grad(add_rms_norm_cpp(xg, r.float(), wp, EPS)[0].sum(), xg)
        rms_norm_cpp(xg, wp, EPS).sum().backward()
    assert calls == [False, False, True]


def test_opcheck():
    x, r, w, g = make((2, 5, 16))
    for dtype in (torch.float32, F64):
        xs = [t.to(dtype).clone().requires_grad_() for t in (x, r, w)]
        torch.library.opcheck(torch.ops.ltm.rms_norm.default, (xs[0], None, xs[2], EPS))
        torch.library.opcheck(torch.ops.ltm.rms_norm.default, (xs[0], xs[1], xs[2], EPS))
        torch.library.opcheck(torch.ops.ltm.swiglu.default, (xs[0], xs[1]))
        y, h, rstd = torch.ops.ltm.rms_norm(x.to(dtype), r.to(dtype), w.to(dtype), EPS)
        for grad_h in (None, g.to(dtype)):
            torch.library.opcheck(
                torch.ops.ltm.rms_norm_backward.default, (g.to(dtype), grad_h, h, w.to(dtype), rstd, True)
            )
        torch.library.opcheck(torch.ops.ltm.swiglu_backward.default, (g.to(dtype), x.to(dtype), r.to(dtype)))


def test_traces_without_graph_break():
    x, r, w, _ = make((2, 5, 16))

    def f(x, r, w):
        y, h = add_rms_norm_cpp(x, r, w, EPS)
        return swiglu_cpp(rms_norm_cpp(y, w, EPS), h).sum()

    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        xs = [t.clone().requires_grad_() for t in (x, r, w)]
        out = fn(*xs)
        results.append([out.detach()] + list(torch.autograd.grad(out, xs)))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, **TOL[F64])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, w: rms_norm_cpp(x, w[:-1], EPS), r"weight must be \(16,\)"),
        (lambda x, w: rms_norm_cpp(x, w.double(), EPS), "must have the dtype of x"),
        (lambda x, w: rms_norm_cpp(x, w, 0.0), "eps must be a finite number > 0"),
        (lambda x, w: rms_norm_cpp(x, w, float("nan")), "eps must be a finite number > 0"),
        (lambda x, w: add_rms_norm_cpp(x, x[:, :2], w, EPS), "residual must have the shape of x"),
        (lambda x, w: rms_norm_cpp(x.int(), w.int(), EPS), "x must be float32, float64, bfloat16 or float16"),
        (lambda x, w: swiglu_cpp(x, x.double()), "up .* must have the dtype of gate"),
        (lambda x, w: swiglu_cpp(x, x[:1]), "up must have the shape of gate"),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(RuntimeError, match=message):
        call(torch.randn(2, 5, 16), torch.ones(16))


def test_non_finite_input_is_not_hidden():
    x, r, w, _ = make((2, 5, 16))
    x[1, 2, 3] = float("nan")
    y = rms_norm_cpp(x.float(), w.float(), EPS)
    assert torch.isnan(y[1, 2]).all() and torch.isfinite(y[0]).all()
    assert torch.isnan(swiglu_cpp(x.float(), r.float())[1, 2, 3])


_RUN_ON_SAVED_INPUTS = """
import sys, torch
import ltm_kernels
x, r, w, g = torch.load(sys.argv[1])
xs = [t.requires_grad_() for t in (x, r, w)]
outs = [ltm_kernels.rms_norm_cpp(xs[0], xs[2], 1e-5), *ltm_kernels.add_rms_norm_cpp(xs[0], xs[1], xs[2], 1e-5),
        ltm_kernels.swiglu_cpp(xs[0], xs[1])]
loss = sum((o.double() * g * (k + 1)).sum() for k, o in enumerate(outs))
grads = torch.autograd.grad(loss, xs)
torch.save((torch.backends.cpu.get_cpu_capability(), [t.detach() for t in outs + list(grads)]), sys.argv[2])
"""


def test_every_isa_copy(tmp_path):
    """The float loops are compiled for SSE2, AVX2 and AVX-512 and picked at run time (capped by
    ATEN_CPU_CAPABILITY): every copy this CPU can run matches the float64 reference."""
    levels = lower_isa_levels()
    x, r, w, g = make((3, 11, 72), seed=4)
    torch.save([x.float(), r.float(), w.float(), g], tmp_path / "in.pt")
    want = all_ops(EAGER, *(t.float().to(F64) for t in (x, r, w)), g)
    for level in levels:
        got = run_at_isa(level, _RUN_ON_SAVED_INPUTS, tmp_path / "in.pt", tmp_path / "out.pt")
        for name, a, e in zip(NAMES, got, want):
            torch.testing.assert_close(
                a.double(), e, **TOL[torch.float32], msg=lambda m, name=name, level=level: f"{level}: {name}: {m}"
            )
