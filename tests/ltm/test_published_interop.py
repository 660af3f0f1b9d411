"""Loading weights in the naming of the published LTM code (docs/model.md, 'Published checkpoints').

Public API only: `load_published_state_dict`, `LTMDecoder.from_published_checkpoint`, `model(tokens, z)`.
Also the parameter counts of the paper's presets (docs/model.md, 'Presets'), derived here from the architecture.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import random_published_sd as shared_random_published_sd
from ltm import LTMConfig, LTMDecoder


def random_published_sd(cfg: LTMConfig, seed: int) -> dict:
    """Canonical published naming (gate/up/down MLP names, output.weight present and equal), fp32."""
    return shared_random_published_sd(cfg, seed, dtype=torch.float32)


# ---- naming variants ---------------------------------------------------------------------------
_W_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def w_names(sd):
    out = {}
    for k, v in sd.items():
        for new_old, new in _W_NAMES.items():
            k = k.replace(f".feed_forward.{new_old}.", f".feed_forward.{new}.")
        out[k] = v
    return out


def prefix_orig_mod(sd):
    return {"_orig_mod." + k: v for k, v in sd.items()}


def inner_orig_mod(sd):
    """layers.{i}.attention.wq.weight -> layers.{i}.attention._orig_mod.wq.weight (compiled submodules)."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "layers" and parts[2] in ("attention", "cross_attention", "feed_forward"):
            parts.insert(3, "_orig_mod")
        out[".".join(parts)] = v
    return out


def no_output(sd):
    return {k: v for k, v in sd.items() if k != "output.weight"}


VARIANTS = {
    "w1w3w2": w_names,
    "prefix-_orig_mod": prefix_orig_mod,
    "inner-_orig_mod": inner_orig_mod,
    "prefix-and-inner-_orig_mod": lambda sd: prefix_orig_mod(inner_orig_mod(sd)),
    "w1w3w2-inner-_orig_mod": lambda sd: inner_orig_mod(w_names(sd)),
    "no-output.weight": no_output,
    "w1w3w2-prefix-no-output": lambda sd: prefix_orig_mod(no_output(w_names(sd))),
}

TINY3 = dict(n_layer=3, n_z=12, window_size=8)


def inputs(cfg, B=2, N=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, cfg.vocab_size, (B, N), generator=g), torch.randn(B, cfg.n_z, cfg.d_model, generator=g))


def logits_of(model, tokens, z):
    with torch.no_grad():
        return model(tokens, z)


def fresh_model(cfg, seed):
    torch.manual_seed(seed)
    return LTMDecoder(cfg, backend="eager").eval()


@pytest.fixture(scope="module")
def canonical():
    cfg = LTMConfig.from_name("ltm-tiny", **TINY3)
    sd = random_published_sd(cfg, 1)
    model = fresh_model(cfg, 100)
    model.load_published_state_dict(sd)
    tokens, z = inputs(cfg)
    return cfg, sd, tokens, z, logits_of(model, tokens, z)


def test_canonical_load_changes_the_model(canonical):
    cfg, sd, tokens, z, want = canonical
    before = logits_of(fresh_model(cfg, 100), tokens, z)
    assert not torch.allclose(before, want), "loading the state dict did not change the logits"


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_naming_variants_give_identical_logits(canonical, variant):
    cfg, sd, tokens, z, want = canonical
    vsd = VARIANTS[variant](sd)
    assert set(vsd) != set(sd)
    keys_before = list(vsd)
    model = fresh_model(cfg, 200)  # different init: leftovers would show
    before = logits_of(model, tokens, z)
    model.load_published_state_dict(vsd)
    got = logits_of(model, tokens, z)
    assert list(vsd) == keys_before, "load_published_state_dict mutated its argument"
    assert not torch.allclose(before, want)
    assert torch.equal(got, want), (
        f"{variant}: max diff {(got - want).abs().max().item():.3g}, first at "
        f"{((got - want).abs() > 0).nonzero()[0].tolist()}"
    )


def test_w1_is_gate_and_w3_is_up(canonical):
    """Swapping w1 and w3 must change the logits (SwiGLU is not symmetric), so the mapping is checked."""
    cfg, sd, tokens, z, want = canonical
    swapped = {}
    for k, v in sd.items():
        k = k.replace("gate_proj", "w3").replace("up_proj", "w1").replace("down_proj", "w2")
        swapped[k] = v
    model = fresh_model(cfg, 300)
    model.load_published_state_dict(swapped)
    assert not torch.allclose(logits_of(model, tokens, z), want)


# ---- checkpoints -----------------------------------------------------------------------------
def model_args_for(cfg):
    """As the published code saves them (extra keys the loader must ignore included)."""
    return dict(
        dim=cfg.d_model,
        n_layers=cfg.n_layer,
        n_heads=cfg.n_head,
        vocab_size=cfg.vocab_size,
        max_seq_len=cfg.max_seq_len,
        window_size=cfg.window_size,
        max_z_len=cfg.n_z,
        n_kv_heads=None,
        hidden_dim=None,
        multiple_of=32,
        norm_eps=1e-5,
        dropout=0.0,
        n_prior_layers=None,
        n_cls_tokens=None,
        use_liger=True,
        use_z_pos_emb=True,
        padding=False,
    )


def config_of(model):
    found = [v for v in vars(model).values() if isinstance(v, LTMConfig)]
    assert len(found) == 1, f"expected exactly one LTMConfig attribute on the model, found {len(found)}"
    return found[0]


def check_ckpt_model(model, cfg, sd, tokens, z):
    got_cfg = config_of(model)
    for field in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len", "window_size", "n_z", "d_ff"):
        assert getattr(got_cfg, field) == getattr(cfg, field), (
            f"{field}: checkpoint model has {getattr(got_cfg, field)}, expected {getattr(cfg, field)}"
        )
    ref = LTMDecoder(cfg)
    ref.load_published_state_dict(sd)
    want = logits_of(ref.eval(), tokens, z)
    got = logits_of(model.eval(), tokens, z)
    # same weights and config; a different default backend may round differently, hence a tiny tolerance
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
    return got


# window 8 (preset default 16), 3 layers and 12 latents (preset 2 and 8): a wrong config shows in the logits
CKPT_CFG = dict(n_layer=3, n_z=12, window_size=8, max_seq_len=48)


def _ckpt_setup():
    cfg = LTMConfig.from_name("ltm-tiny", **CKPT_CFG)
    sd = random_published_sd(cfg, 7)
    tokens, z = inputs(cfg, B=2, N=33, seed=7)
    return cfg, sd, tokens, z


def test_wrong_config_would_be_visible():
    """Guard: loading the same weights under the preset's window / latent positions gives other logits."""
    cfg, sd, tokens, z = _ckpt_setup()
    right = LTMDecoder(cfg, backend="eager")
    right.load_published_state_dict(sd)
    for wrong_over in (dict(CKPT_CFG, window_size=16), dict(CKPT_CFG, max_seq_len=64)):
        wrong = LTMDecoder(LTMConfig.from_name("ltm-tiny", **wrong_over), backend="eager")
        wrong.load_published_state_dict(sd)
        assert not torch.allclose(logits_of(right, tokens, z), logits_of(wrong, tokens, z), atol=1e-4)


@pytest.mark.parametrize("naming", ["canonical", "w1w3w2-prefix-and-inner-_orig_mod"])
def test_from_published_checkpoint_dict(naming):
    cfg, sd, tokens, z = _ckpt_setup()
    stored = sd if naming == "canonical" else prefix_orig_mod(inner_orig_mod(w_names(sd)))
    model = LTMDecoder.from_published_checkpoint({"model": stored, "model_args": model_args_for(cfg)})
    check_ckpt_model(model, cfg, sd, tokens, z)


@pytest.mark.parametrize("as_str", [True, False])
def test_from_published_checkpoint_path(tmp_path, as_str):
    cfg, sd, tokens, z = _ckpt_setup()
    path = tmp_path / "ckpt.pt"
    torch.save(
        {"model": prefix_orig_mod(sd), "model_args": model_args_for(cfg), "iter_num": 1234, "best_val_loss": 3.21}, path
    )
    model = LTMDecoder.from_published_checkpoint(str(path) if as_str else path)
    check_ckpt_model(model, cfg, sd, tokens, z)


# ---- malformed state dicts -------------------------------------------------------------------
def _malformed():
    cfg = LTMConfig.from_name("ltm-tiny")
    sd = random_published_sd(cfg, 9)
    cases = []

    missing = dict(sd)
    del missing["layers.1.cross_attention.wk.weight"]
    cases.append(("missing", missing, ["layers.1.cross_attention.wk.weight"]))

    missing_w3 = w_names(sd)
    del missing_w3["layers.0.feed_forward.w3.weight"]
    cases.append(
        ("missing-w3", missing_w3, ["layers.0.feed_forward.w3.weight", "layers.0.feed_forward.up_proj.weight"])
    )

    extra = dict(sd)
    extra["layers.0.attention.wq.bias"] = torch.zeros(cfg.d_model)
    cases.append(("unexpected-bias", extra, ["layers.0.attention.wq.bias"]))

    extra_layer = dict(sd)
    extra_layer["layers.2.attention.wq.weight"] = torch.zeros(cfg.d_model, cfg.d_model)
    cases.append(("unexpected-layer", extra_layer, ["layers.2.attention.wq.weight"]))

    shape = dict(sd)
    shape["layers.0.feed_forward.up_proj.weight"] = sd["layers.0.feed_forward.up_proj.weight"].T.contiguous()
    cases.append(("wrong-shape", shape, ["layers.0.feed_forward.up_proj.weight"]))

    vocab = dict(sd)
    vocab["tok_embeddings.weight"] = torch.zeros(cfg.vocab_size + 1, cfg.d_model)
    vocab["output.weight"] = vocab["tok_embeddings.weight"].clone()
    cases.append(("wrong-vocab", vocab, ["tok_embeddings.weight", "output.weight"]))

    norm = dict(sd)
    norm["norm.weight"] = torch.ones(cfg.d_model + 2)
    cases.append(("wrong-norm-shape", norm, ["norm.weight"]))

    untied = dict(sd)
    untied["output.weight"] = sd["output.weight"] + 0.01
    cases.append(("untied", untied, ["output.weight", "tok_embeddings.weight"]))
    return cfg, cases


MALFORMED_CFG, MALFORMED = _malformed()


@pytest.mark.parametrize("name,bad,names", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_state_dict_raises_naming_the_key(name, bad, names):
    model = fresh_model(MALFORMED_CFG, 5)
    with pytest.raises(ValueError) as info:
        model.load_published_state_dict(bad)
    msg = str(info.value)
    print(f"{name}: {msg}")
    assert any(n in msg for n in names), f"{name}: message names none of {names}: {msg!r}"


@pytest.mark.parametrize("name,bad,names", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_checkpoint_raises_naming_the_key(name, bad, names):
    cfg = MALFORMED_CFG
    with pytest.raises(ValueError) as info:
        LTMDecoder.from_published_checkpoint({"model": bad, "model_args": model_args_for(cfg)})
    msg = str(info.value)
    assert any(n in msg for n in names), f"{name}: message names none of {names}: {msg!r}"


@pytest.mark.parametrize("name,bad,names", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_failed_load_leaves_model_unchanged(name, bad, names):
    """A rejected state dict must not leave a half-loaded model behind (a silent wrong answer)."""
    model = fresh_model(MALFORMED_CFG, 5)
    tokens, z = inputs(MALFORMED_CFG)
    before = logits_of(model, tokens, z)
    with pytest.raises(ValueError):
        model.load_published_state_dict(bad)
    assert torch.equal(logits_of(model, tokens, z), before), f"{name}: model was partially modified"


# ---- parameter counts ------------------------------------------------------------------------
def count_from_architecture(cfg: LTMConfig) -> int:
    d, f = cfg.d_model, 32 * math.ceil(int(8 * cfg.d_model / 3) / 32)
    per_layer = 8 * d * d + 3 * d * f + 3 * d  # self+cross attention q,k,v,o; SwiGLU; three norms
    return cfg.vocab_size * d + cfg.n_layer * per_layer + d  # tied embedding/output, final norm


PUBLISHED_COUNTS = {"ltm-s": 38_369_280, "ltm-m": 51_005_952, "ltm-l": 76_279_296}
PAPER_MILLIONS = {"ltm-s": 38.37, "ltm-m": 51.01, "ltm-l": 76.28}


def build_cheaply(cfg):
    try:
        with torch.device("meta"):
            return LTMDecoder(cfg, backend="eager")
    except Exception as exc:  # meta construction unsupported: build for real (ltm-l ~300 MB fp32)
        print(f"meta construction failed ({type(exc).__name__}: {exc}); building on CPU")
        return LTMDecoder(cfg, backend="eager")


@pytest.mark.parametrize("name", list(PUBLISHED_COUNTS))
def test_parameter_counts_of_published_presets(name):
    cfg = LTMConfig.from_name(name)
    expected = count_from_architecture(cfg)
    assert cfg.d_ff == 1376
    assert expected == PUBLISHED_COUNTS[name], f"{name}: architecture gives {expected}"
    assert round(expected / 1e6, 2) == PAPER_MILLIONS[name]
    model = build_cheaply(cfg)
    got = sum(p.numel() for p in model.parameters())
    print(f"{name}: model {got:,} parameters, expected {expected:,} ({expected / 1e6:.2f}M)")
    assert got == expected, f"{name}: model has {got:,} parameters, expected {expected:,} (diff {got - expected:+,})"


def test_parameter_count_tiny():
    cfg = LTMConfig.from_name("ltm-tiny", **TINY3)
    model = LTMDecoder(cfg, backend="eager")
    got = sum(p.numel() for p in model.parameters())
    assert got == count_from_architecture(cfg), (got, count_from_architecture(cfg))
