"""ltm::lm_head_nll (C++ CPU kernel, csrc/lm_head.cpp) against the eager float64 reference
`reference.lm_head_nll_ref`, through the public function and autograd: nll, d/dhidden and d/dweight."""

import platform

import pytest
import torch
from common import cpu_info
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import lower_isa_levels, run_at_isa, run_in_child
from ltm_kernels import extension_status, lm_head_nll_cpp
from ltm_kernels.reference import lm_head_nll_ref

F64 = torch.float64
pytestmark = pytest.mark.extension


@pytest.fixture(autouse=True)
def needs_extension():
    available, reason = extension_status()
    if not available:
        pytest.skip(reason)


def make_inputs(B, N, d, V, seed=0, ignore=()):
    """hidden, weight at a scale where the softmax is far from uniform; targets with some rows ignored."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, N, d, generator=g, dtype=F64)
    weight = torch.randn(V, d, generator=g, dtype=F64) * (2.0 / d**0.5)
    targets = torch.randint(0, V, (B, N), generator=g)
    for b, n in ignore:
        targets[b, n] = -1
    return hidden, weight, targets


def run(fn, hidden, weight, targets, dtype, grad):
    """nll and the gradients of <nll, grad> for hidden and weight, with fn on inputs rounded to dtype."""
    h = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    nll = fn(h, w, targets)
    gh, gw = torch.autograd.grad(nll, (h, w), grad.to(nll.dtype))
    return [x.detach().to(F64) for x in (nll, gh, gw)]


def reference(hidden, weight, targets, dtype, grad):
    """The float64 reference on the same rounded values that the op under test sees."""
    return run(lm_head_nll_ref, hidden.to(dtype).to(F64), weight.to(dtype).to(F64), targets, F64, grad)


# Measured worst case over these shapes, |error| / (1 + |expected|): float64 3e-15, float32 2e-6.
TOL = {F64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}
SHAPES = [  # (B, N, d, V, ignored rows)
    (2, 37, 24, 1000, [(0, 0), (1, 36)]),  # d not a multiple of 16, N not of 32, V not of the vocab block
    (3, 50, 256, 5003, [(2, 7)]),  # the model's d, several vocabulary blocks and tasks
    (1, 1, 16, 7, []),  # one row, V smaller than one tile
    (2, 70, 40, 333, [(1, n) for n in range(70)]),  # a sequence whose targets are all ignored: nll 0, no grad
    (2, 300, 64, 700, [(0, 5), (1, 299)]),  # tasks of several 32-row panels (and a short last one) on 1-2 threads
]


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B, N, d, V, ignore", SHAPES)
def test_matches_reference(dtype, B, N, d, V, ignore):
    hidden, weight, targets = make_inputs(B, N, d, V, ignore=ignore)
    grad = torch.linspace(0.5, 1.5, B, dtype=F64)
    got = run(lm_head_nll_cpp, hidden, weight, targets, dtype, grad)
    want = reference(hidden, weight, targets, dtype, grad)
    assert lm_head_nll_cpp(hidden.to(dtype), weight.to(dtype), targets).dtype == dtype
    for name, a, e in zip(("nll", "grad_hidden", "grad_weight"), got, want):
        torch.testing.assert_close(a, e, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")
    if all(b == 1 for b, _ in ignore) and ignore and len(ignore) == N:
        assert got[0][1] == 0 and got[1][1].abs().max() == 0


HALF_SHAPES = [  # (B, N, d, V, ignored rows); d a multiple of 32 runs the AMX engine on CPUs that have it
    (2, 40, 64, 700, [(0, 5)]),
    (2, 37, 32, 300, [(1, 36)]),  # rows not a multiple of 32, V not of the 256-row block
    (3, 50, 256, 5003, [(2, 7)]),  # the model's d, several blocks and tasks
    (2, 33, 32, 17, []),  # V smaller than one tile
    (2, 70, 40, 333, [(1, n) for n in range(70)]),  # d not a multiple of 32: converted to float32
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("B, N, d, V, ignore", HALF_SHAPES)
def test_half_precision_within_twice_eager_error(dtype, B, N, d, V, ignore):
    """float16, and bfloat16 without AMX or with d not a multiple of 32, are computed in float32; bfloat16 on an
    AMX CPU runs on the tile unit with fp32 accumulation. Either way the error against float64 is at most 2x the
    eager op's in the same dtype (docs/kernels.md, 'The 2x rule'), for the output and both gradients."""
    hidden, weight, targets = make_inputs(B, N, d, V, seed=3, ignore=ignore)
    grad = torch.linspace(1.0, 0.7, B, dtype=F64)
    exact = run(lm_head_nll_ref, hidden, weight, targets, F64, grad)
    fused = run(lm_head_nll_cpp, hidden, weight, targets, dtype, grad)
    eager = run(lm_head_nll_ref, hidden, weight, targets, dtype, grad)
    for name, f, e, x in zip(("nll", "grad_hidden", "grad_weight"), fused, eager, exact):
        err_fused, err_eager = (f - x).abs().max().item(), (e - x).abs().max().item()
        assert err_fused <= 2 * err_eager, f"{name}: fused error {err_fused:.3g} > 2 x eager {err_eager:.3g}"


def test_weight_gradient_skipped_when_not_wanted():
    """The inner loop differentiates for hidden only, with the weight a Parameter: the backward must not form dW
    (it costs as much as the forward), and must form it when asked."""
    hidden, weight, targets = make_inputs(2, 9, 16, 50)
    w = torch.nn.Parameter(weight.float())
    h = hidden.float().requires_grad_()
    calls = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.ltm.lm_head_nll_backward.default:
                calls.append((args[6], args[7]))
            return func(*args, **(kwargs or {}))

    with Spy():
        torch.autograd.grad(lm_head_nll_cpp(h, w, targets).sum(), h)
        lm_head_nll_cpp(h, w, targets).sum().backward()
    assert calls == [(True, False), (True, True)]
    torch.testing.assert_close(
        w.grad.double(),
        reference(hidden, weight, targets, torch.float32, torch.ones(2, dtype=F64))[2],
        **TOL[torch.float32],
    )


def test_no_dh_without_grad():
    hidden, weight, targets = make_inputs(2, 5, 16, 30)
    nll, lse, dh = torch.ops.ltm.lm_head_nll(hidden, weight, targets, False)
    assert dh.numel() == 0 and lse.shape == (10,)
    with torch.no_grad():
        torch.testing.assert_close(
            lm_head_nll_cpp(hidden.requires_grad_(), weight, targets),
            lm_head_nll_ref(hidden, weight, targets),
            **TOL[F64],
        )


@pytest.mark.parametrize("dtype, d", [(torch.float32, 16), (torch.bfloat16, 32)], ids=["f32", "bf16"])
def test_non_finite_input_is_not_hidden(dtype, d):
    """A NaN in one sequence's hidden gives that sequence a NaN and leaves the other finite (bf16 at d = 32 runs
    the AMX engine where there is one)."""
    hidden, weight, targets = make_inputs(2, 5, d, 30)
    hidden[1, 2, 3] = float("nan")
    nll = lm_head_nll_cpp(hidden.to(dtype), weight.to(dtype), targets)
    assert torch.isfinite(nll[0]) and torch.isnan(nll[1])


def test_opcheck():
    hidden, weight, targets = make_inputs(2, 7, 16, 40, ignore=[(0, 1)])
    for compute_grad in (False, True):  # without dh, only the weight may be differentiated
        args = (hidden.float().requires_grad_(compute_grad), weight.float().requires_grad_(), targets, compute_grad)
        torch.library.opcheck(torch.ops.ltm.lm_head_nll.default, args)
    nll, lse, dh = torch.ops.ltm.lm_head_nll(hidden, weight, targets, True)
    for flags in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(
            torch.ops.ltm.lm_head_nll_backward.default,
            (torch.ones(2, dtype=F64), hidden, weight, targets, lse, dh, *flags),
        )


def test_traces_without_graph_break():
    """torch.compile(fullgraph=True) traces the op and its autograd (the fake kernels), and the compiled
    forward and backward give the eager op's results."""
    hidden, weight, targets = make_inputs(2, 7, 16, 40)
    results = []
    for fn in (lm_head_nll_cpp, torch.compile(lm_head_nll_cpp, fullgraph=True, backend="aot_eager")):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        nll = fn(h, w, targets)
        nll.sum().backward()
        results.append((nll.detach(), h.grad, w.grad))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, **TOL[F64])


@pytest.mark.parametrize(
    "case, message",
    [
        (dict(hidden=torch.zeros(4, 16)), "hidden must be (B, N, d)"),
        (dict(weight=torch.zeros(30, 8)), "weight is (V, 8) but hidden has d = 16"),
        (dict(weight=torch.zeros(30, 16, dtype=F64)), "must have one dtype"),
        (
            dict(hidden=torch.zeros(2, 5, 16, dtype=torch.int32), weight=torch.zeros(30, 16, dtype=torch.int32)),
            "hidden must be float32, float64, bfloat16 or float16",
        ),
        (dict(targets=torch.zeros(2, 5, dtype=torch.int32)), "targets must be int64"),
        (dict(targets=torch.zeros(2, 4, dtype=torch.long)), "targets must be (B, N) = (2, 5)"),
        (dict(targets=torch.full((2, 5), 30)), "targets must be in [0, V = 30) or -1"),
        (dict(targets=torch.full((2, 5), -2)), "targets must be in [0, V = 30) or -1"),
        (dict(weight=torch.zeros(0, 16)), "at least one row"),
    ],
)
def test_bad_input_names_the_argument(case, message):
    args = dict(hidden=torch.zeros(2, 5, 16), weight=torch.zeros(30, 16), targets=torch.zeros(2, 5, dtype=torch.long))
    args.update(case)
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        lm_head_nll_cpp(**args)


_RUN_ON_SAVED_INPUTS = """
import sys, torch
import ltm_kernels
hidden, weight, targets = torch.load(sys.argv[1])
h, w = hidden.requires_grad_(), weight.requires_grad_()
nll = ltm_kernels.lm_head_nll_cpp(h, w, targets)
gh, gw = torch.autograd.grad(nll.sum(), (h, w))
torch.save((torch.backends.cpu.get_cpu_capability(), [nll, gh, gw]), sys.argv[2])
"""


def test_every_engine(tmp_path):
    """float32 runs the AVX-512 engine where ATen's capability is AVX512 and the BLAS engine below it
    (ATEN_CPU_CAPABILITY lowers it): each engine this CPU can run matches the float64 reference."""
    levels = lower_isa_levels()
    hidden, weight, targets = make_inputs(3, 45, 40, 613, seed=5, ignore=[(1, 3)])
    torch.save((hidden.float(), weight.float(), targets), tmp_path / "in.pt")
    want = reference(hidden, weight, targets, torch.float32, torch.ones(3, dtype=F64))
    for level in levels:  # the host's own engine runs in every other test
        got = run_at_isa(level, _RUN_ON_SAVED_INPUTS, tmp_path / "in.pt", tmp_path / "out.pt")
        for name, a, e in zip(("nll", "grad_hidden", "grad_weight"), got, want):
            torch.testing.assert_close(
                a.double(), e, **TOL[torch.float32], msg=lambda m, name=name, level=level: f"{level}: {name}: {m}"
            )


def test_bf16_lowered_isa_within_twice_eager_error(tmp_path):
    """bfloat16 below AVX-512 (ATEN_CPU_CAPABILITY lowered) is converted to float32 and runs the lower levels'
    float engines: within the 2x rule of the float64 reference on each level this CPU can lower to."""
    levels = lower_isa_levels()
    hidden, weight, targets = make_inputs(3, 45, 64, 613, seed=5, ignore=[(1, 3)])
    bf = torch.bfloat16
    torch.save((hidden.to(bf), weight.to(bf), targets), tmp_path / "in.pt")
    ones = torch.ones(3, dtype=F64)
    exact = run(lm_head_nll_ref, hidden, weight, targets, F64, ones)
    eager = run(lm_head_nll_ref, hidden, weight, targets, bf, ones)
    for level in levels:
        got = run_at_isa(level, _RUN_ON_SAVED_INPUTS, tmp_path / "in.pt", tmp_path / "out.pt")
        for name, f, e, x in zip(("nll", "grad_hidden", "grad_weight"), got, eager, exact):
            err_fused, err_eager = (f.double() - x).abs().max().item(), (e - x).abs().max().item()
            assert err_fused <= 2 * err_eager, f"{level}: {name}: error {err_fused:.3g} > 2 x eager {err_eager:.3g}"


# Cases for each bfloat16 engine: rows not a multiple of 32, V odd and not a multiple of the blocks, several
# blocks and tasks, d a multiple of 32 (AMX applies) and not (d 40, 34: only vdpbf16ps and float apply).
BF16_ENGINE_CASES = [
    (2, 37, 32, 301, [(1, 36)]),
    (3, 50, 256, 5003, [(2, 7)]),
    (2, 70, 40, 333, [(1, 5)]),
    (1, 7, 34, 33, []),
    (2, 300, 64, 700, [(0, 5)]),
]
BF16_ENGINE_FLAG = {"amx": "amx_bf16", "dot": "avx512_bf16"}  # the /proc/cpuinfo flag each engine needs

_RUN_OP_ON_SAVED_CASES = """
import sys, torch
import ltm_kernels
out = []
for hidden, weight, targets in torch.load(sys.argv[1]):
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    nll = ltm_kernels.lm_head_nll_cpp(h, w, targets)
    gh, gw = torch.autograd.grad(nll.sum(), (h, w))
    out.append(([nll, gh, gw], torch.ops.ltm.lm_head_nll(hidden, weight, targets, True)[2]))
torch.save((torch.backends.cpu.get_cpu_capability(), out), sys.argv[2])
"""


@pytest.mark.parametrize("engine", ["amx", "dot"])
def test_bf16_engine_within_twice_eager_error(engine, tmp_path):
    """Each bfloat16 engine, chosen with LTM_CPU_BF16_ENGINE (amx: the tile unit; dot: vdpbf16ps, which `auto`
    takes only where it is faster than fp32 FMA), meets the 2x rule against float64 for nll and both
    gradients, and is a different computation from the float conversion (its fp32 dh differs: P is rounded
    to bf16), so the test sees the engine ran."""
    flag = BF16_ENGINE_FLAG[engine]
    if flag not in cpu_info()["cpu_isa"]:
        pytest.skip(f"this CPU lacks {flag}: the {engine} engine cannot run here")
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("ATen's capability is below AVX512: the bf16 engines are off")
    bf = torch.bfloat16
    cases = [make_inputs(*shape, seed=7, ignore=ignore) for *shape, ignore in BF16_ENGINE_CASES]
    torch.save([(h.to(bf), w.to(bf), t) for h, w, t in cases], tmp_path / "in.pt")
    results = {}
    for name in (engine, "float"):
        env = {"LTM_CPU_BF16_ENGINE": name}
        results[name] = run_in_child(_RUN_OP_ON_SAVED_CASES, tmp_path / "in.pt", tmp_path / "out.pt", env)[1]
    for (B, _, d, _, _), (hidden, weight, targets), (got, dh), (_, dh_float) in zip(
        BF16_ENGINE_CASES, cases, results[engine], results["float"]
    ):
        ones = torch.ones(B, dtype=F64)
        exact = run(lm_head_nll_ref, hidden, weight, targets, F64, ones)
        eager = run(lm_head_nll_ref, hidden, weight, targets, bf, ones)
        for name, f, e, x in zip(("nll", "grad_hidden", "grad_weight"), got, eager, exact):
            err_fused, err_eager = (f.double() - x).abs().max().item(), (e - x).abs().max().item()
            assert err_fused <= 2 * err_eager, f"d {d}: {name}: error {err_fused:.3g} > 2 x eager {err_eager:.3g}"
        ran = not torch.equal(dh, dh_float)
        assert ran == (engine == "dot" or d % 32 == 0), f"d {d}: the {engine} engine ran: {ran}"


_BAD_ENGINE_CALL = """
import sys, torch
import ltm_kernels
hidden, weight, targets = torch.ones(1, 2, 4).bfloat16(), torch.ones(3, 4).bfloat16(), torch.zeros(1, 2).long()
ltm_kernels.lm_head_nll_cpp(hidden, weight, targets)
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the bf16 engines are x86 only")
def test_bf16_engine_setting_is_checked(tmp_path):
    env = {"LTM_CPU_BF16_ENGINE": "fastest"}
    with pytest.raises(AssertionError, match="LTM_CPU_BF16_ENGINE must be auto, amx, dot or float, got 'fastest'"):
        run_in_child(_BAD_ENGINE_CALL, tmp_path / "in.pt", tmp_path / "out.pt", env)
