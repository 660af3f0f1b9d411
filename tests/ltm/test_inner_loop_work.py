"""The CPU inner loop does only the work that depends on z: what it launches per step, counted through a
TorchDispatchMode on ltm-tiny with backend="cpp" (every op a C++ kernel or oneDNN)."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ltm_kernels
from ltm import LTMConfig, LTMDecoder
from ltm.engine import InnerLoop

pytestmark = pytest.mark.extension


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("ltm::"):
            flags = tuple(a for a in args if isinstance(a, bool))
            self.calls[(name, flags)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def loop():
    ok, reason = ltm_kernels.extension_status()
    if not ok:
        pytest.skip(reason)
    cfg = LTMConfig.from_name("ltm-tiny")
    torch.manual_seed(0)
    model = LTMDecoder(cfg, backend="cpp")
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    loop = InnerLoop(model, 2, 16, steps=3)
    loop.load(tokens[:, :-1], tokens[:, 1:], generator=torch.Generator().manual_seed(1))
    return model, loop


def test_per_step_work(loop):
    model, loop = loop
    T, L = loop.steps, model.cfg.n_layer
    with OpCounter() as counter:
        loop.execute()
    calls = counter.calls
    # Layer 0's self-attention (and the embedding) run once per loop, the other layers' once per step and
    # once more for the final nll; their backward only for layers >= 1.
    assert calls[("ltm::self_attention", ())] == 1 + (L - 1) * (T + 1)
    assert calls[("ltm::self_attention_backward", ())] == (L - 1) * T
    # Layer 0's cross-attention query is a constant of the loop: its gradient is not computed.
    assert calls[("ltm::latent_attention_backward", (False,))] == T
    assert calls[("ltm::latent_attention_backward", ())] == (L - 1) * T  # q_grad=True, the default: not passed
    # The LM head forms dh in every step and never the weight gradient.
    assert calls[("ltm::lm_head_nll", (True,))] == T
    assert calls[("ltm::lm_head_nll_backward", (True, False))] == T
    assert not any(name == "ltm::lm_head_nll_backward" and flags[1] for name, flags in calls)
    assert not any(name == "ltm::rms_norm_backward" and flags[0] for name, flags in calls)  # no dW of the norms
    # Nor the linear layers' (dW = dY^T X is the one aten::mm of their backward).
    with torch.profiler.profile() as prof:
        loop.execute()
    assert not [e for e in prof.events() if e.name == "aten::mm"]


def test_matches_the_eager_loop(loop):
    """The hoisted prefix changes nothing: the engine's posterior equals the eager loop's (fp32 tolerance)."""
    model, loop = loop
    eager = LTMDecoder(model.cfg, backend="eager")
    eager.load_state_dict(model.state_dict())
    loop.execute()
    got = loop.result()
    want = eager.infer_posterior(
        loop.tokens, loop.targets, steps=loop.steps, mu=loop.mu0, logvar=loop.logvar0, noise=loop.noise
    )
    for name in ("mu", "logvar", "z", "nll", "kl"):
        torch.testing.assert_close(
            getattr(got, name), getattr(want, name), rtol=2e-5, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_final_nll_is_the_only_work_it_skips(loop):
    """final_nll=False drops exactly the forward at the fitted z: one LM head and one pass of layers >= 1."""
    model, full = loop
    T, L = full.steps, model.cfg.n_layer
    lean = InnerLoop(model, 2, 16, steps=T, final_nll=False)
    lean.load(full.tokens, full.targets, full.mu0, full.logvar0, full.noise)
    counts = {}
    for name, engine in (("full", full), ("lean", lean)):
        with OpCounter() as counter:
            engine.execute()
        counts[name] = counter.calls
    assert counts["full"][("ltm::lm_head_nll", (False,))] == 1
    assert counts["lean"][("ltm::lm_head_nll", (False,))] == 0
    assert counts["lean"][("ltm::self_attention", ())] == 1 + (L - 1) * T
    skipped = counts["full"] - counts["lean"]
    # ... and only forward ops (no gradient, no posterior step, none of the loop's steps).
    assert skipped and not any(name.endswith("_backward") or "posterior_step" in name for name, _ in skipped), skipped
    assert not counts["lean"] - counts["full"]
    assert lean.result().nll is None
    torch.testing.assert_close(lean.result().mu, full.result().mu, rtol=0, atol=0)
