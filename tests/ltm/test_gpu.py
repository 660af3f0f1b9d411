"""The eager model and inner loop on a CUDA device (run by `pytest -m gpu` on a GPU machine)."""

import pytest
import torch

from ltm import LTMConfig, LTMDecoder

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU tests not run"),
]

CFG = LTMConfig.from_name("ltm-tiny")


def batch(device, n=48, b=3):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CFG.vocab_size, (b, n + 1), generator=g)
    shape = (b, CFG.n_z, CFG.d_model)
    latents = [
        0.3 * torch.randn(shape, generator=g),
        -2 + 0.1 * torch.randn(shape, generator=g),
        torch.randn(shape, generator=g),
    ]
    return [t.to(device) for t in (tokens[:, :-1], tokens[:, 1:], *latents)]


def rel_err(got, want):
    return ((got.double().cpu() - want.double().cpu()).abs().max() / want.double().abs().max()).item()


@pytest.mark.parametrize("backend", ["eager", "auto", "triton"])
def test_cuda_matches_cpu_float64(backend):
    torch.manual_seed(0)
    ref = LTMDecoder(CFG, backend="eager").double()
    gpu = LTMDecoder(CFG, backend=backend).cuda()
    gpu.load_state_dict(ref.state_dict())
    tokens, targets, mu, logvar, noise = batch("cpu")
    want = ref.infer_posterior(tokens, targets, steps=4, mu=mu.double(), logvar=logvar.double(), noise=noise.double())
    got = gpu.infer_posterior(*(t.cuda() for t in (tokens, targets, mu, logvar, noise)), steps=4)
    for name in ("mu", "logvar", "z", "nll", "kl"):
        assert rel_err(getattr(got, name), getattr(want, name)) < 1e-3, name


def test_bf16_model_runs_close_to_fp64():
    """Smoke test of a bf16 model on the GPU (the 2x-of-eager rule is checked per kernel, in the kernel tests)."""
    torch.manual_seed(0)
    ref = LTMDecoder(CFG, backend="eager").double()
    tokens, _, mu, _, _ = batch("cpu")
    want = ref(tokens, mu.double())
    fp32 = LTMDecoder(CFG, backend="eager").cuda()
    fp32.load_state_dict(ref.state_dict())
    bf16 = LTMDecoder(CFG, backend="auto").cuda().to(torch.bfloat16)
    bf16.load_state_dict(ref.state_dict())
    err32 = rel_err(fp32(tokens.cuda(), mu.cuda()), want)
    err16 = rel_err(bf16(tokens.cuda(), mu.cuda()), want)
    assert err32 < 1e-4 and err16 < 5e-2, (err32, err16)
