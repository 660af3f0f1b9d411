"""The dispatch point (ltm.backends) and the cpp backend's agreement with eager."""
import subprocess
import sys

import pytest
import torch

import ltm_kernels
from ltm import BackendUnavailableError, LTMConfig, LTMDecoder, backend_status
from ltm.backends import select_ops

CFG = LTMConfig.from_name("ltm-tiny")
EXTENSION_OK, EXTENSION_REASON = ltm_kernels.extension_status()
needs_extension = pytest.mark.skipif(not EXTENSION_OK, reason=f"C++ extension unavailable: {EXTENSION_REASON}")


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        LTMDecoder(CFG, backend="cuda")


def test_triton_backend_says_why_it_is_unavailable():
    ok, reason = backend_status()["triton"]
    assert not ok and reason
    with pytest.raises(BackendUnavailableError, match="triton backend is not available: " + reason[:20]):
        LTMDecoder(CFG, backend="triton")


def test_eager_and_auto_always_available():
    status = backend_status()
    assert status["eager"][0] and status["auto"][0]
    ops = select_ops("eager", torch.device("cpu"))
    assert dict(ops.impl) == {name: "eager" for name in dict(ops.impl)}


@needs_extension
@pytest.mark.extension
def test_auto_and_cpp_use_the_extension_on_cpu():
    for backend in ("auto", "cpp"):
        assert dict(select_ops(backend, torch.device("cpu")).impl)["posterior_step"] == "cpp"


@needs_extension
@pytest.mark.extension
def test_cpp_without_a_kernel_for_the_device_says_so():
    if ltm_kernels.has_op("posterior_step", "cuda"):
        pytest.skip("this build has a CUDA kernel for posterior_step")
    with pytest.raises(BackendUnavailableError, match="no cuda kernel for ltm::posterior_step"):
        select_ops("cpp", torch.device("cuda"))
    assert dict(select_ops("auto", torch.device("cuda")).impl)["posterior_step"] == "eager"


@needs_extension
@pytest.mark.extension
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
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
