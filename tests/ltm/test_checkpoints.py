"""Our checkpoint format (safetensors + JSON) and safe reading of published checkpoint files."""

import json
import pickle

import pytest
import torch

from ltm import LTMConfig, LTMDecoder

CFG = LTMConfig.from_name("ltm-tiny")


def logits_of(model):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CFG.vocab_size, (2, 20), generator=g)
    z = torch.randn(2, CFG.n_z, CFG.d_model, generator=g)
    return model(tokens, z)


def test_save_and_load_pretrained(tmp_path):
    torch.manual_seed(0)
    model = LTMDecoder(CFG, backend="eager")
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())  # flat, as the Hub tools expect
    assert config["encoding"] == "bytes" and config["n_z"] == CFG.n_z
    loaded = LTMDecoder.from_pretrained(tmp_path / "ckpt", backend="eager", encoding="bytes")
    assert loaded.cfg == model.cfg
    assert torch.equal(logits_of(loaded), logits_of(model))
    assert loaded.output.weight is loaded.tok_embeddings.weight, "tied weights must stay tied after loading"


def test_wrong_tokenizer_is_refused(tmp_path):
    LTMDecoder(CFG, backend="eager").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'bytes'.*'gpt2'|'gpt2'.*'bytes'"):
        LTMDecoder.from_pretrained(tmp_path, encoding="gpt2")


def test_truncated_or_missing_files_give_clear_errors(tmp_path):
    LTMDecoder(CFG, backend="eager").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated"):
        LTMDecoder.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LTMDecoder.from_pretrained(tmp_path)


def test_published_checkpoint_files_never_execute_code(tmp_path):
    """torch.load(weights_only=True): a pickle that would run code is refused, not executed."""
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil(), "model_args": {}}, f, protocol=2)
    with pytest.raises(ValueError, match="weights_only"):
        LTMDecoder.from_published_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        LTMDecoder.from_published_checkpoint(tmp_path / "missing.pt")


def test_bare_state_dict_needs_or_infers_the_latent_count():
    torch.manual_seed(0)
    model = LTMDecoder(CFG, backend="eager")
    # A bare state dict whose shapes match a preset takes that preset's latent count and window.
    loaded = LTMDecoder.from_published_checkpoint(model.state_dict(), backend="eager")  # bitwise: same kernels
    assert torch.equal(logits_of(loaded), logits_of(model))
    odd_cfg = LTMConfig.from_name("ltm-tiny", n_layer=1)
    odd = LTMDecoder(odd_cfg, backend="eager")
    with pytest.raises(ValueError, match="n_z"):
        LTMDecoder.from_published_checkpoint(odd.state_dict())
    loaded = LTMDecoder.from_published_checkpoint(
        odd.state_dict(), backend="eager", n_z=8, n_head=2, max_seq_len=64, window_size=16
    )
    assert torch.equal(logits_of(loaded), logits_of(odd))
    # Published checkpoints carry no tokenizer name; a vocabulary of exactly 258 ids is the byte tokenizer.
    assert loaded.cfg.encoding == "bytes"
