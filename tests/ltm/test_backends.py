"""The dispatch point (ltm.backends) and the cpp backend's agreement with eager."""

import collections
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ltm_kernels
from ltm import BackendUnavailableError, LTMConfig, LTMDecoder, backend_status
from ltm.backends import decode_attention, select_ops
from triton_helpers import assert_close, interpreter

CFG = LTMConfig.from_name("ltm-tiny")
EXTENSION_OK, EXTENSION_REASON = ltm_kernels.extension_status()
needs_extension = pytest.mark.skipif(not EXTENSION_OK, reason=f"C++ extension unavailable: {EXTENSION_REASON}")


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        LTMDecoder(CFG, backend="cuda")


def _run(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the triton backend is available")
def test_triton_backend_without_cuda_or_interpreter_says_why():
    code = (
        "import ltm\n"
        "ok, reason = ltm.backend_status()['triton']\n"
        "assert not ok and ('TRITON_INTERPRET' in reason or 'not installed' in reason), reason\n"
        "try:\n"
        "    ltm.LTMDecoder(ltm.LTMConfig.from_name('ltm-tiny'), backend='triton')\n"
        "except ltm.BackendUnavailableError as err:\n"
        "    assert reason[:30] in str(err), err\n"
        "else:\n"
        "    raise AssertionError('triton backend accepted without CUDA or the interpreter')\n"
    )
    result = _run(code, TRITON_INTERPRET=None)
    assert result.returncode == 0, result.stderr


def test_import_ltm_without_triton():
    """A missing triton never breaks `import ltm`: the triton backend is reported unavailable, others work."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import ltm, torch\n"
        "ok, reason = ltm.backend_status()['triton']\n"
        "assert not ok and 'triton is not installed' in reason, reason\n"
        "m = ltm.LTMDecoder(ltm.LTMConfig.from_name('ltm-tiny'), backend='auto')\n"
        "t = torch.randint(0, 258, (2, 9))\n"
        "m.elbo_terms(t, t, *torch.zeros(3, 2, 8, 64))\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr


@interpreter
def test_triton_backend_uses_its_kernels_and_eager_for_the_rest():
    impl = dict(select_ops("triton", torch.device("cpu")).impl)
    # The linear layers are torch's own GEMM (cuBLAS on CUDA) under triton; every other op is a Triton kernel.
    assert impl == {name: "eager" if name == "linear" else "triton" for name in impl}, impl
    # `auto` never picks the interpreter on CPU
    assert "triton" not in dict(select_ops("auto", torch.device("cpu")).impl).values()


@interpreter
@pytest.mark.parametrize("window", [16, 4])
def test_triton_model_equals_eager_under_the_interpreter(window):
    """LTMDecoder(backend="triton") on CPU tensors (TRITON_INTERPRET=1), every op a Triton kernel: logits, ELBO
    terms and a short inner loop equal the eager model's (fp32), with a window covering the 13 tokens and one
    shorter than them."""
    cfg = LTMConfig.from_name("ltm-tiny", window_size=window)
    torch.manual_seed(0)
    eager = LTMDecoder(cfg, backend="eager")
    fused = LTMDecoder(cfg, backend="triton")
    assert {name for name, impl in fused.ops.impl if impl != "triton"} == {"linear"}
    fused.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 13), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (2, 13), generator=g)
    targets[0, 3] = -1
    mu, noise = (torch.randn(2, cfg.n_z, cfg.d_model, generator=g) for _ in range(2))
    logvar = -2 + 0.1 * torch.randn(2, cfg.n_z, cfg.d_model, generator=g)
    assert_close(fused(tokens, mu), eager(tokens, mu), 1e-5, "logits")
    for name, got, want in zip(
        ("nll", "kl"),
        fused.elbo_terms(tokens, targets, mu, logvar, noise),
        eager.elbo_terms(tokens, targets, mu, logvar, noise),
    ):
        assert_close(got, want, 1e-5, name)
    kw = dict(steps=2, mu=mu, logvar=logvar, noise=noise)
    a, b = eager.infer_posterior(tokens, targets, **kw), fused.infer_posterior(tokens, targets, **kw)
    for name in ("mu", "logvar", "nll"):
        assert_close(getattr(b, name), getattr(a, name), 1e-4, name)


@interpreter
def test_decoding_over_more_cached_keys_than_the_triton_kernel_takes_runs_eagerly():
    ops = select_ops("triton", torch.device("cpu"))
    assert decode_attention(ops, ltm_kernels.MAX_LATENTS) is ops.latent_attention
    assert decode_attention(ops, ltm_kernels.MAX_LATENTS + 1) is ltm_kernels.reference.latent_attention_ref


def test_eager_and_auto_always_available():
    status = backend_status()
    assert status["eager"][0] and status["auto"][0]
    ops = select_ops("eager", torch.device("cpu"))
    assert dict(ops.impl) == {name: "eager" for name in dict(ops.impl)}


@needs_extension
@pytest.mark.extension
def test_auto_and_cpp_use_the_extension_on_cpu():
    for backend in ("auto", "cpp"):
        impl = dict(select_ops(backend, torch.device("cpu")).impl)
        # Every op on CPU: the extension's kernels, and oneDNN for the linear layers (auto: float32 through
        # the linked BLAS where it is the faster, MKL on Intel).
        linear = "blas+onednn" if backend == "auto" and ltm_kernels.blas_outruns_onednn() else "onednn"
        assert impl == {name: linear if name == "linear" else "cpp" for name in impl}, impl


class LinearCalls(TorchDispatchMode):
    """Counts the oneDNN linear op (`ltm::linear`) and the BLAS GEMMs (`aten::mm` / `addmm`) by dtype."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name() in ("ltm::linear", "aten::mm", "aten::addmm"):
            self.calls[(func.name(), args[0].dtype)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("blas_faster", [True, False])
def test_auto_takes_the_blas_for_float32_linears_only_where_it_is_faster(monkeypatch, blas_faster):
    if not ltm_kernels.linear_onednn_status()[0]:
        pytest.skip(ltm_kernels.linear_onednn_status()[1])
    monkeypatch.setattr(ltm_kernels, "blas_outruns_onednn", lambda: blas_faster)
    select_ops.cache_clear()
    try:
        linear = select_ops("auto", torch.device("cpu")).linear
        x, w = torch.randn(3, 5, 8), torch.randn(4, 8)
        for dtype in (torch.float32, torch.bfloat16):
            with LinearCalls() as counter:
                y = linear(x.to(dtype), w.to(dtype))
            tol = 1e-5 if dtype == torch.float32 else 5e-2
            torch.testing.assert_close(y.float(), torch.nn.functional.linear(x, w), rtol=tol, atol=tol)
            onednn = dtype == torch.bfloat16 or not blas_faster
            assert counter.calls[("ltm::linear", dtype)] == int(onednn), counter.calls
            assert (counter.calls[("aten::mm", dtype)] + counter.calls[("aten::addmm", dtype)] > 0) == (not onednn)
    finally:
        select_ops.cache_clear()


def test_the_blas_is_taken_for_mkl_on_intel_only(monkeypatch):
    module = sys.modules["ltm_kernels.linear_onednn"]  # the attribute of that name is the function

    for vendor, expected in (
        ("GenuineIntel", torch.backends.mkl.is_available()),
        ("AuthenticAMD", False),
        (None, False),
    ):
        monkeypatch.setattr(module, "cpuinfo_value", lambda key, vendor=vendor: vendor if key == "vendor_id" else None)
        module.blas_outruns_onednn.cache_clear()
        assert module.blas_outruns_onednn() == expected, vendor
    module.blas_outruns_onednn.cache_clear()


@needs_extension
@pytest.mark.extension
def test_cpp_without_a_kernel_for_the_device_says_so():
    if ltm_kernels.has_op("posterior_step", "cuda"):
        pytest.skip("this build has a CUDA kernel for posterior_step")
    with pytest.raises(BackendUnavailableError, match="no cuda kernel for ltm::posterior_step"):
        select_ops("cpp", torch.device("cuda"))
    # `auto` then falls back to the Triton posterior step where Triton is installed, else to eager.
    fallback = "triton" if ltm_kernels.triton_device_ok(torch.device("cuda")) else "eager"
    assert dict(select_ops("auto", torch.device("cuda")).impl)["posterior_step"] == fallback


@needs_extension
@pytest.mark.extension
# fp64 shows the math is the same. fp32: the C++ attention rounds differently from SDPA (both ~1e-8 absolute
# in dL/dz), and Adam's first steps move by ~lr * sign(g) whatever |g| is, so an element whose gradient is
# ~1e-6 (ltm-tiny has some) ends up ~1e-4 apart after six steps at lr 0.34 (measured against fp64: cpp fp32
# 5e-4 relative in logvar at such an element, eager fp32 1.4e-5; their dL/dz errors are alike).
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-3)])
@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_cpp_inner_loop_equals_eager(dtype, rtol, schedule):
    torch.manual_seed(0)
    eager = LTMDecoder(CFG, backend="eager").to(dtype)
    cpp = LTMDecoder(CFG, backend="cpp").to(dtype)
    cpp.load_state_dict(eager.state_dict())
    tokens = torch.randint(0, CFG.vocab_size, (3, 30))
    targets = torch.randint(0, CFG.vocab_size, (3, 30))
    a = eager.infer_posterior(tokens, targets, steps=6, schedule=schedule, generator=torch.Generator().manual_seed(1))
    b = cpp.infer_posterior(tokens, targets, steps=6, schedule=schedule, generator=torch.Generator().manual_seed(1))
    for name in ("mu", "logvar", "z", "nll", "kl"):
        want, got = getattr(a, name), getattr(b, name)
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"


def test_import_ltm_without_the_extension():
    """A missing extension never breaks `import ltm`: cpp is reported unavailable with the reason."""
    code = (
        "import sys; sys.modules['ltm_kernels._C'] = None\n"
        "import ltm\n"
        "ok, reason = ltm.backend_status()['cpp']\n"
        "assert not ok and 'extension not built' in reason, reason\n"
        "m = ltm.LTMDecoder(ltm.LTMConfig.from_name('ltm-tiny'), backend='auto')\n"
        "assert dict(m.ops.impl)['posterior_step'] == 'eager'\n"
        "try:\n"
        "    ltm.LTMDecoder(ltm.LTMConfig.from_name('ltm-tiny'), backend='cpp')\n"
        "except ltm.BackendUnavailableError as err:\n"
        "    assert 'extension not built' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('cpp backend accepted without the extension')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
