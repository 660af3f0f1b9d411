"""ltm::linear (oneDNN on CPU, ltm_kernels/linear_onednn.py) against F.linear in float64: output, dx and dW."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ltm_kernels import linear_onednn, linear_onednn_status

F64 = torch.float64


@pytest.fixture(autouse=True)
def needs_onednn():
    available, reason = linear_onednn_status()
    if not available:
        pytest.skip(reason)


def run(fn, x, w, g, dtype):
    xs, ws = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    y = fn(xs, ws)
    return [t.detach().to(F64) for t in (y, *torch.autograd.grad(y, (xs, ws), g.to(dtype)))]


def make(shape, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=F64)
    w = torch.randn(n, shape[-1], generator=gen, dtype=F64) / shape[-1] ** 0.5
    return x, w, torch.randn(*shape[:-1], n, generator=gen, dtype=F64)


@pytest.mark.parametrize("shape, n", [((2, 37, 24), 40), ((300, 64), 192), ((1, 1, 8), 3)])
def test_float32_matches_float64(shape, n):
    x, w, g = make(shape, n)
    got = run(linear_onednn, x, w, g, torch.float32)
    want = run(F.linear, x.float().double(), w.float().double(), g.float().double(), F64)
    for name, a, e in zip(("y", "grad_x", "grad_weight"), got, want):
        # fp32 sums of up to 300 products of O(1) terms: atol 1e-4 is ~30 roundings of the largest sums
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_bfloat16_within_twice_eager_error():
    x, w, g = make((4, 33, 64), 96, seed=1)
    exact = run(F.linear, x, w, g, F64)
    fused = run(linear_onednn, x, w, g, torch.bfloat16)
    eager = run(F.linear, x, w, g, torch.bfloat16)
    for name, f, e, ex in zip(("y", "grad_x", "grad_weight"), fused, eager, exact):
        err_f, err_e = (f - ex).abs().max().item(), (e - ex).abs().max().item()
        assert err_f <= 2 * err_e, f"{name}: fused error {err_f:.3g} > 2 x eager {err_e:.3g}"


def test_weight_gradient_only_when_wanted():
    x, w, _ = make((3, 16), 8)
    xs, wp = x.float().requires_grad_(), torch.nn.Parameter(w.float())
    mms = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default,):
                mms.append(func)
            return func(*args, **(kwargs or {}))

    with Spy():
        torch.autograd.grad(linear_onednn(xs, wp).sum(), xs)
        assert mms == []  # dW = dY^T X is the one mm of the backward
        linear_onednn(xs, wp).sum().backward()
    assert len(mms) == 1
    torch.testing.assert_close(wp.grad, torch.ones(3, 8).t() @ xs.detach())


def test_opcheck():
    x, w, _ = make((2, 5, 16), 8)
    torch.library.opcheck(torch.ops.ltm.linear.default, (x.float().requires_grad_(), w.float().requires_grad_()))


@pytest.mark.parametrize(
    "x, w, message",
    [
        (torch.zeros(2, 4), torch.zeros(3, 5), r"weight must be \(n, k\) with k = x.shape\[-1\] = 4"),
        (torch.zeros(2, 4), torch.zeros(3, 4, dtype=torch.bfloat16), "must have one dtype"),
        (torch.zeros(2, 4, dtype=F64), torch.zeros(3, 4, dtype=F64), "x must be float32 or bfloat16"),
        ([1.0], torch.zeros(3, 4), "x must be a torch.Tensor"),
    ],
)
def test_bad_input_names_the_argument(x, w, message):
    with pytest.raises((TypeError, ValueError), match=message):
        linear_onednn(x, w)
