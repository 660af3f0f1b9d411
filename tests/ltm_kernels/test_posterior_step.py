"""ltm::posterior_step (C++ CPU kernel) against posterior_step_ref, and the reference against autograd +
torch.optim.AdamW, which proves the op is AdamW on the right gradients."""

import math
import os
import subprocess
import sys

import pytest
import torch

import ltm_kernels
from ltm_kernels import extension_status, kl_ref, posterior_step_cpp, posterior_step_ref

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = ["mu", "logvar", "exp_avg_mu", "exp_avg_sq_mu", "exp_avg_logvar", "exp_avg_sq_logvar", "z"]


@pytest.fixture
def needs_extension():
    available, reason = extension_status()
    if not available:
        pytest.skip(reason)


def make_state(shape, dtype, seed=0):
    """The seven in-place tensors as the inner loop initialises them (docs/model.md, 'The inner loop')."""
    g = torch.Generator().manual_seed(seed)
    mu = 0.01 * torch.randn(shape, generator=g, dtype=torch.float64)
    logvar = -5 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    moments = [torch.zeros(shape, dtype=torch.float64) for _ in range(4)]
    z = torch.zeros(shape, dtype=torch.float64)
    return [t.to(dtype) for t in (mu, logvar, *moments, z)]


def cosine_lr(t, steps, lr=0.34):
    return lr / 10 + 0.5 * (1 + math.cos(math.pi * t / steps)) * (lr - lr / 10)


def counter(done=0, device="cpu"):
    """The op's step counter: a one-element int64 tensor holding the number of updates done."""
    return torch.tensor([done], dtype=torch.int64, device=device)


def assert_state_close(actual, expected, **tol):
    for name, a, e in zip(NAMES, actual, expected):
        torch.testing.assert_close(a, e, **tol, msg=lambda m, name=name: f"{name}: {m}")


def run_steps(step_fn, state, noise, grads, steps, schedule=0):
    """`steps` updates with the op's scheduled lr (cosine by default) read off its device step counter."""
    step = counter(device=noise.device)
    for t in range(steps):
        step_fn(*state, grads[t], noise, step, 0.34, steps, schedule)
    assert step.item() == steps


# Both sides differ only in rounding (libm vs Sleef exp, FMA contraction in torch's vectorised lerp/addcmul,
# exp(logvar) taken as sigma^2 in the kernel): an ulp or two per gradient. When a moment nearly cancels
# (m_t = 0.9 m + 0.1 g ~ 0) that relative error grows by the cancellation factor before lr * m / denom
# reaches the parameters. Measured worst case over these shapes and seeds 0-2 after 5 steps: float32
# 2.6e-6 absolute on mu and z (values ~0.3), the moments within 1e-6 relative + 5e-7; float64 7e-16.
TOLERANCES = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=1e-6, atol=1e-5)}


@pytest.mark.extension
@pytest.mark.parametrize("schedule", [0, 1, 2], ids=["cosine", "linear", "constant"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 24, 64), (4, 16, 1000)])  # the last spans many threads' chunks
def test_matches_reference(needs_extension, shape, dtype, schedule):
    steps = 5
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(shape, generator=gen, dtype=dtype)
    grads = [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(steps)]
    fused, ref = make_state(shape, dtype), make_state(shape, dtype)
    run_steps(posterior_step_cpp, fused, noise, grads, steps, schedule)
    run_steps(posterior_step_ref, ref, noise, grads, steps, schedule)
    assert_state_close(fused, ref, **TOLERANCES[dtype])


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_reference_reads_the_counter_and_schedules_on_the_device(schedule):
    """posterior_step_ref with the counter at t is the old host-scalar step (lr_t, 1-based t + 1), for every
    t and schedule: the lr and bias corrections really come from the counter."""
    shape, total = (2, 3, 4), 7
    gen = torch.Generator().manual_seed(9)
    grad_z, noise = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    for t in (0, 3, 6):
        state = make_state(shape, torch.float64)
        state[2:6] = [0.1 * torch.rand(shape, generator=gen, dtype=torch.float64) for _ in range(4)]
        expected = [x.clone() for x in state]
        step = counter(t)
        posterior_step_ref(*state, grad_z, noise, step, 0.34, total, ltm_kernels.SCHEDULES.index(schedule))
        assert step.item() == t + 1
        lr = ltm_kernels.scheduled_lr(t, total, 0.34, schedule)
        mu, lv, m_mu, v_mu, m_lv, v_lv, z = expected
        sigma = torch.exp(0.5 * lv)
        grads = (grad_z + mu, 0.5 * grad_z * noise * sigma + 0.5 * (torch.exp(lv) - 1))
        for p, g, m, v in ((mu, grads[0], m_mu, v_mu), (lv, grads[1], m_lv, v_lv)):
            p.mul_(1 - lr * 0.01)
            m.lerp_(g, 0.1)
            v.mul_(0.999).addcmul_(g, g, value=0.001)
            denom = (v.sqrt() / (1 - 0.999 ** (t + 1)) ** 0.5).add_(1e-8)
            p.addcdiv_(m, denom, value=-lr / (1 - 0.9 ** (t + 1)))
        z.copy_(mu + noise * torch.exp(0.5 * lv))
        assert_state_close(state, expected, rtol=1e-13, atol=1e-15)


def run_low_precision(dtype, seed=2, shape=(2, 24, 64), steps=5):
    """(fused, eager, exact): 5 steps of the op and of the reference in `dtype`, and of the reference in
    float64 from the same rounded inputs."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=gen).to(dtype)
    grads = [torch.randn(shape, generator=gen).to(dtype) for _ in range(steps)]
    fused, eager = make_state(shape, dtype), make_state(shape, dtype)
    exact = [t.double() for t in make_state(shape, dtype)]
    run_steps(posterior_step_cpp, fused, noise, grads, steps)
    run_steps(posterior_step_ref, eager, noise, grads, steps)
    run_steps(posterior_step_ref, exact, noise.double(), [g.double() for g in grads], steps)
    return fused, eager, exact


@pytest.mark.extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_error(needs_extension, dtype):
    """docs/kernels.md, 'The 2x rule': the fused error is at most 2x the error of the eager math in the same dtype,
    both against the float64 reference."""
    for name, f, e, x in zip(NAMES, *run_low_precision(dtype)):
        fused_err = (f.double() - x).abs().max().item()
        eager_err = (e.double() - x).abs().max().item()
        # The floor keeps an exactly-rounded eager result (error 0) from demanding an exact fused one.
        floor = torch.finfo(dtype).eps * x.abs().max().item()
        assert fused_err <= 2 * eager_err + floor, f"{name}: fused {fused_err:.3g} vs eager {eager_err:.3g}"


@pytest.mark.extension
def test_float16_stays_finite(needs_extension):
    """No 2x bar here: eager AdamW in float16 turns NaN on these inputs (eps = 1e-8 rounds to 0 in fp16,
    exp_avg_sq underflows), while the fused op computes in float32 and only stores fp16."""
    fused, _, exact = run_low_precision(torch.float16)
    for name, f, x in zip(NAMES, fused, exact):
        assert f.isfinite().all(), name
        # Measured: <= 4 fp16 ulps of the largest value after 5 steps.
        bound = 8 * torch.finfo(torch.float16).eps * x.abs().max().item()
        assert (f.double() - x).abs().max().item() <= bound, name


def test_reference_is_adamw_on_the_elbo_gradients():
    """posterior_step_ref == autograd of CE-proxy + KL followed by torch.optim.AdamW, with a changing lr."""
    shape, steps = (3, 5, 7), 6
    gen = torch.Generator().manual_seed(3)
    state = make_state(shape, torch.float64)
    # Start logvar near 0 so both terms of its gradient matter, not only the KL.
    state[1] = 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    mu = state[0].clone().requires_grad_()
    logvar = state[1].clone().requires_grad_()
    opt = torch.optim.AdamW([mu, logvar], lr=0.34, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, foreach=False)
    step_counter = counter()
    for step in range(1, steps + 1):
        lr = cosine_lr(step - 1, steps)
        grad_z = torch.randn(shape, generator=gen, dtype=torch.float64)  # stands in for dCE/dz
        z = mu + noise * torch.exp(logvar / 2)
        loss = (grad_z * z).sum() + kl_ref(mu, logvar).sum()
        opt.zero_grad()
        loss.backward()
        opt.param_groups[0]["lr"] = lr
        opt.step()
        posterior_step_ref(*state, grad_z, noise, step_counter, 0.34, steps, 0)
        assert step_counter.item() == step

        expected = [mu, logvar]
        expected += [opt.state[p][k] for p in (mu, logvar) for k in ("exp_avg", "exp_avg_sq")]
        expected.append(mu + noise * torch.exp(logvar / 2))
        assert_state_close(state, [t.detach() for t in expected], rtol=1e-12, atol=1e-15)


@pytest.mark.extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(needs_extension, dtype):
    shape = (2, 3, 5)
    gen = torch.Generator().manual_seed(4)
    state = make_state(shape, dtype)
    grad_z = torch.randn(shape, generator=gen, dtype=dtype)
    noise = torch.randn(shape, generator=gen, dtype=dtype)
    for schedule in range(3):
        args = (*state, grad_z, noise, counter(1), 0.34, 4, schedule, 0.9, 0.999, 1e-8, 0.01)
        torch.library.opcheck(torch.ops.ltm.posterior_step.default, args)


@pytest.mark.extension
def test_non_contiguous_inputs(needs_extension):
    shape = (3, 5, 7)
    gen = torch.Generator().manual_seed(5)
    grad_z = torch.randn(shape[::-1], generator=gen, dtype=torch.float64).transpose(0, 2)
    noise = torch.randn(shape[::-1], generator=gen, dtype=torch.float64).transpose(0, 2)
    assert not grad_z.is_contiguous() and not noise.is_contiguous()
    strided, dense = make_state(shape, torch.float64), make_state(shape, torch.float64)
    posterior_step_cpp(*strided, grad_z, noise, counter(), 0.34, 1)
    posterior_step_cpp(*dense, grad_z.contiguous(), noise.contiguous(), counter(), 0.34, 1)
    assert_state_close(strided, dense, rtol=0, atol=0)


@pytest.mark.extension
def test_independent_of_thread_count(needs_extension):
    shape = (4, 16, 1000)
    gen = torch.Generator().manual_seed(6)
    grad_z = torch.randn(shape, generator=gen)
    noise = torch.randn(shape, generator=gen)
    threaded, serial = make_state(shape, torch.float32), make_state(shape, torch.float32)
    posterior_step_cpp(*threaded, grad_z, noise, counter(), 0.34, 1)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        posterior_step_cpp(*serial, grad_z, noise, counter(), 0.34, 1)
    finally:
        torch.set_num_threads(n)
    assert_state_close(threaded, serial, rtol=0, atol=0)


def _bad_shape(args):
    args[8] = args[8][..., :-1]


def _bad_dtype(args):
    args[7] = args[7].float()


def _bad_contiguity(args):
    args[0] = args[0].transpose(0, 2).contiguous().transpose(0, 2)


def _bad_step(args):
    args[9] = counter(-1)


def _bad_step_dtype(args):
    args[9] = args[9].int()


def _bad_schedule(args):
    args[12] = 3


def _aliased(args):
    args[4] = args[2]


@pytest.mark.extension
@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_bad_shape, "noise must have the shape of mu"),
        (_bad_dtype, "grad_z must have the dtype of mu"),
        (_bad_contiguity, "mu must be contiguous"),
        (_bad_step, "step must hold the number of updates done"),
        (_bad_step_dtype, "step must be an int64 tensor with one element"),
        (_bad_schedule, "schedule must be 0"),
        (_aliased, "exp_avg_mu and exp_avg_logvar must not share memory"),
    ],
    ids=["shape", "dtype", "contiguity", "step", "step-dtype", "schedule", "aliasing"],
)
def test_bad_input_names_the_argument(needs_extension, corrupt, message):
    shape = (3, 5, 7)
    args = [
        *make_state(shape, torch.float64),
        torch.randn(shape, dtype=torch.float64),
        torch.randn(shape, dtype=torch.float64),
        counter(),
        0.34,
        1,
        0,
        0.9,
        0.999,
        1e-8,
        0.01,
    ]
    corrupt(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ltm.posterior_step(*args)


_BROKEN_IMPORT = """
import importlib.abc, sys
class Broken(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "ltm_kernels._C":
            raise OSError("undefined symbol: _ZN3c104impl")
sys.meta_path.insert(0, Broken())
"""


@pytest.mark.parametrize(
    "setup, expected",
    [
        ("import sys; sys.modules['ltm_kernels._C'] = None", "extension not built"),
        (_BROKEN_IMPORT, "extension failed to load: OSError: undefined symbol"),
    ],
    ids=["missing", "broken"],
)
def test_import_without_extension(setup, expected):
    """A missing or broken _C (and no Triton) must not break `import ltm_kernels`; it is reported instead."""
    code = (
        setup
        + """
import sys
sys.modules["triton"] = None
import ltm_kernels
available, reason = ltm_kernels.extension_status()
assert not available, reason
print(reason)
try:
    ltm_kernels.posterior_step_cpp(*[None] * 10, lr=0.1, total_steps=1)
except RuntimeError as e:
    assert reason in str(e), e
else:
    raise AssertionError("posterior_step_cpp without the extension must raise")
"""
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert expected in out.stdout, out.stdout


def test_public_api():
    for name in ("extension_status", "posterior_step_cpp", "posterior_step_ref", "kl_ref"):
        assert hasattr(ltm_kernels, name)


def _exp_through_op(logvar):
    """The kernel's exp(logvar / 2), read off z: with mu = grad_z = 0, noise = 1 and lr = 0 the op leaves
    mu = 0 and logvar unchanged and writes z = 0 + 1 * exp(logvar / 2), the same exp as in the gradient."""
    zeros = [torch.zeros_like(logvar) for _ in range(6)]
    mu, moments, z = zeros[0], zeros[1:5], zeros[5]
    lv = logvar.clone()
    posterior_step_cpp(
        mu, lv, *moments, z, torch.zeros_like(logvar), torch.ones_like(logvar), counter(), lr=0.0, total_steps=1
    )
    torch.testing.assert_close(lv, logvar, rtol=0, atol=0, equal_nan=True)
    return z


@pytest.mark.extension
def test_float32_exp_accuracy(needs_extension):
    """The float path's polynomial exp (csrc/posterior_step.cpp) against float64 exp: within 1 ulp (measured
    over all 2^32 float inputs: 0.99) on logvar in [-30, 30], and further out into the denormals."""
    dense = torch.linspace(-30, 30, 600_001, dtype=torch.float64)
    # Up to 88 only: the KL gradient holds exp(logvar), and lr = 0 leaves logvar unchanged only while it is finite.
    wide = torch.linspace(-320, 88, 40_001, dtype=torch.float64)
    logvar = torch.cat([dense, wide]).float()
    got = _exp_through_op(logvar).double()
    exact = torch.exp(0.5 * logvar.double())
    tiny = torch.finfo(torch.float32).tiny
    normal = exact >= tiny
    # ulp of the exact value in float32: 2^(e - 24) for exact = m 2^e, m in [0.5, 1).
    ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - 24)
    ulp_err = ((got - exact).abs() / ulp)[normal]
    worst = ulp_err.argmax()
    assert ulp_err[worst].item() <= 1.0, f"{ulp_err[worst].item():.3f} ulp at logvar {logvar[normal][worst]}"
    # Below the normal range: gradual underflow, within one denormal step (2^-149), then exact zeros.
    assert (got - exact)[~normal].abs().max().item() <= 2.0**-149
    assert (got[logvar < -210] == 0).all()
    special = _exp_through_op(torch.tensor([float("-inf"), float("nan"), 0.0]))
    assert special[0] == 0 and special[1].isnan() and special[2] == 1


_RUN_ON_SAVED_INPUTS = """
import sys, torch, ltm_kernels
assert ltm_kernels.extension_status()[0], ltm_kernels.extension_status()
out = []
for state, grad_z, noise, beta1 in torch.load(sys.argv[1]):
    step = torch.zeros(1, dtype=torch.int64)
    for _ in range(3):
        torch.ops.ltm.posterior_step(*state, grad_z, noise, step, 0.1, 3, 2, beta1, 0.999, 1e-8, 0.01)
    out.append(state)
torch.save((torch.backends.cpu.get_cpu_capability(), out), sys.argv[2])
"""


@pytest.mark.extension
def test_isa_copies_are_bit_identical(needs_extension, tmp_path):
    """The float loop is compiled for SSE2, AVX2 and AVX-512 and picked at run time, capped by
    ATEN_CPU_CAPABILITY: every copy this CPU can run gives the same bits (no FMA contraction, the same exp),
    for float32, bfloat16 and float16, both lerp branches (beta1 0.9 and 0.3) and lengths with remainders."""
    host = torch.backends.cpu.get_cpu_capability()
    levels = ["DEFAULT", "AVX2", "AVX512"]
    if host not in levels or host == "DEFAULT":
        pytest.skip(f"one loop copy only on this CPU (ATen capability {host})")
    gen = torch.Generator().manual_seed(7)
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape, beta1 in (((4, 16, 1000), 0.9), ((3, 5, 7), 0.3), ((1, 1, 37), 0.9)):
            state = make_state(shape, dtype)
            state[1] = (-5 + 3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
            grad_z, noise = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
            cases.append((state, grad_z, noise, beta1))
    torch.save(cases, tmp_path / "in.pt")
    results = {}
    for level in levels[: levels.index(host) + 1]:
        out_file = tmp_path / f"{level}.pt"
        env = {**os.environ, "ATEN_CPU_CAPABILITY": level.lower()}
        run = subprocess.run(
            [sys.executable, "-c", _RUN_ON_SAVED_INPUTS, str(tmp_path / "in.pt"), str(out_file)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr
        capability, results[level] = torch.load(out_file)
        assert capability == level
    base = results["DEFAULT"]
    for level, outs in results.items():
        for case, (o, b) in enumerate(zip(outs, base)):
            for name, x, y in zip(NAMES, o, b):
                bits = torch.int32 if x.element_size() == 4 else torch.int16
                assert torch.equal(x.view(bits), y.view(bits)), f"{level} vs DEFAULT, case {case}, {name}"


@pytest.mark.extension
def test_inputs_aliasing_outputs(needs_extension):
    """grad_z / noise may be the very tensor of an output (each element is read before it is written, as in
    the reference), but not a shifted view of its memory, which the SIMD loop would read after writing."""
    shape = (3, 5, 7)
    gen = torch.Generator().manual_seed(8)
    aliased, copied = make_state(shape, torch.float32), make_state(shape, torch.float32)
    for state in (aliased, copied):
        state[6].copy_(torch.randn(shape, generator=torch.Generator().manual_seed(9)))  # z, used as grad_z
    noise = torch.randn(shape, generator=gen)
    posterior_step_cpp(*copied, copied[6].clone(), noise, counter(), 0.34, 1)
    posterior_step_cpp(*aliased, aliased[6], noise, counter(), 0.34, 1)
    assert_state_close(aliased, copied, rtol=0, atol=0)

    buf = torch.zeros(3 * 5 * 7 + 1)
    state = make_state(shape, torch.float32)
    state[6] = buf[:-1].view(shape)
    with pytest.raises(RuntimeError, match="grad_z must not partially overlap z"):
        torch.ops.ltm.posterior_step(*state, buf[1:].view(shape), noise, counter(), 0.34, 1, 0, 0.9, 0.999, 1e-8, 0.01)


# ------------------------------------------------------------------------------ scalar arguments, every wrapper
def _implementations():
    from triton_helpers import INTERPRETER

    needs_ext = pytest.mark.skipif(not extension_status()[0], reason=f"C++ op: {extension_status()[1]}")
    return [
        pytest.param(posterior_step_ref, id="ref"),
        pytest.param(posterior_step_cpp, id="cpp", marks=[pytest.mark.extension, needs_ext]),
        pytest.param(ltm_kernels.posterior_step_triton, id="triton", marks=INTERPRETER),
    ]


BAD_SCALARS = [  # (keyword, value, message): inf / NaN / out of range, each naming the argument and its range
    ("lr", math.inf, "lr must be a finite number >= 0"),
    ("lr", math.nan, "lr must be a finite number >= 0"),
    ("lr", -0.1, "lr must be a finite number >= 0"),
    ("weight_decay", math.inf, "weight_decay must be a finite number >= 0"),
    ("weight_decay", math.nan, "weight_decay must be a finite number >= 0"),
    ("weight_decay", -1.0, "weight_decay must be a finite number >= 0"),
    ("eps", math.inf, "eps must be a finite number > 0"),
    ("eps", 0.0, "eps must be a finite number > 0"),
    ("eps", math.nan, "eps must be a finite number > 0"),
    ("beta1", 1.0, r"beta1 must be a finite number in \[0, 1\)"),
    ("beta2", math.nan, r"beta2 must be a finite number in \[0, 1\)"),
    ("total_steps", 0, "total_steps must be an int >= 1"),
    ("total_steps", 2.5, "total_steps must be an int >= 1"),
    ("schedule", "cosin", r"schedule must be one of \('cosine', 'linear', 'constant'\) or its index"),
    ("schedule", 3, "schedule must be one of"),
    ("schedule", True, "schedule must be one of"),
]


def _step_args(dtype=torch.float32):
    shape = (2, 3, 4)
    gen = torch.Generator().manual_seed(9)
    return [
        *make_state(shape, dtype),
        torch.randn(shape, generator=gen, dtype=dtype),
        torch.randn(shape, generator=gen, dtype=dtype),
        counter(),
    ]


@pytest.mark.parametrize("impl", _implementations())
@pytest.mark.parametrize("keyword, value, message", BAD_SCALARS, ids=[f"{k}={v!r}" for k, v, _ in BAD_SCALARS])
def test_bad_scalars_name_the_argument_and_range(impl, keyword, value, message):
    args = _step_args()
    before = [t.clone() for t in args]
    scalars = dict(lr=0.34, total_steps=4, schedule=0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    with pytest.raises(ValueError, match=message):
        impl(*args, **(scalars | {keyword: value}))
    for a, b in zip(args, before):  # refused before anything was written
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", _implementations())
@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_schedule_by_name_equals_its_index(impl, name):
    by_name, by_index = _step_args(), _step_args()
    impl(*by_name, lr=0.34, total_steps=4, schedule=name)
    impl(*by_index, lr=0.34, total_steps=4, schedule=("cosine", "linear", "constant").index(name))
    assert_state_close(by_name, by_index, rtol=0, atol=0)


@pytest.mark.extension
@pytest.mark.parametrize(
    "keyword, index, value",
    [("lr", 10, math.inf), ("eps", 15, math.inf), ("weight_decay", 16, math.inf), ("lr", 10, math.nan)],
)
def test_op_refuses_non_finite_scalars(needs_extension, keyword, index, value):
    """The C++ op itself (called without the wrapper) refuses them too, naming the argument."""
    args = [*_step_args(torch.float64), 0.34, 4, 0, 0.9, 0.999, 1e-8, 0.01]
    args[index] = value
    with pytest.raises(RuntimeError, match=f"{keyword} must be a finite number"):
        torch.ops.ltm.posterior_step(*args)


def test_ops_exist_right_after_import():
    """`torch.ops.ltm.*` is there after `import ltm_kernels` alone (a fresh interpreter); without a build,
    the import still works and extension_status() says why."""
    code = (
        "import torch, ltm_kernels\n"
        "ok, reason = ltm_kernels.extension_status()\n"
        "assert hasattr(torch.ops.ltm, 'posterior_step') == ok, reason\n"
        "assert hasattr(torch.ops.ltm, 'self_attention') == ok, reason\n"
        "print(ok)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(extension_status()[0])
