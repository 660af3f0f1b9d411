"""Helpers shared by the test files (on sys.path through pytest's `pythonpath` setting)."""

import torch

from ltm import LTMConfig

F64 = torch.float64


def random_published_sd(cfg: LTMConfig, seed: int, std: float = 0.2, emb_std: float = 0.5, dtype=F64) -> dict:
    """All weights random (std large enough that attention is far from uniform), norms ~ 1 + 0.1 N(0,1)."""
    g = torch.Generator().manual_seed(seed)
    d, f, V = cfg.d_model, cfg.d_ff, cfg.vocab_size

    def rnd(*shape, s=std):
        return (torch.randn(*shape, generator=g, dtype=F64) * s).to(dtype)

    def norm_w():
        return (1.0 + 0.1 * torch.randn(d, generator=g, dtype=F64)).to(dtype)

    E = rnd(V, d, s=emb_std)
    sd = {"tok_embeddings.weight": E, "output.weight": E.clone(), "norm.weight": norm_w()}
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        for mod in ("attention", "cross_attention"):
            for w in ("wq", "wk", "wv", "wo"):
                sd[f"{p}{mod}.{w}.weight"] = rnd(d, d)
        for nrm in ("attention_norm", "cross_attention_norm", "ffn_norm"):
            sd[f"{p}{nrm}.weight"] = norm_w()
        sd[f"{p}feed_forward.gate_proj.weight"] = rnd(f, d)
        sd[f"{p}feed_forward.up_proj.weight"] = rnd(f, d)
        sd[f"{p}feed_forward.down_proj.weight"] = rnd(d, f)
    return sd


ISA_LEVELS = ["DEFAULT", "AVX2", "AVX512"]  # ATEN_CPU_CAPABILITY values, lowest first


def lower_isa_levels() -> list:
    """The ATen capabilities below this CPU's own (whose code paths every other test runs); skips, saying why,
    when there are none."""
    import pytest

    host = torch.backends.cpu.get_cpu_capability()
    if host not in ISA_LEVELS or host == "DEFAULT":
        pytest.skip(f"one loop copy only on this CPU (ATen capability {host})")
    return ISA_LEVELS[: ISA_LEVELS.index(host)]


def run_in_child(code: str, inputs_path, outputs_path, env: dict):
    """Run `code` (which torch.saves (capability, results) to argv[2] from the inputs in argv[1]) in a fresh
    interpreter with `env` added to the environment (settings the C++ kernels read once per process);
    returns (capability, results)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(
        [sys.executable, "-c", code, str(inputs_path), str(outputs_path)],
        cwd=root,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    return torch.load(outputs_path)


def run_at_isa(level: str, code: str, inputs_path, outputs_path):
    """run_in_child with ATEN_CPU_CAPABILITY=level, so the C++ kernels pick that level's copy; returns results."""
    capability, results = run_in_child(code, inputs_path, outputs_path, {"ATEN_CPU_CAPABILITY": level.lower()})
    assert capability == level
    return results
