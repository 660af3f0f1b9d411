"""Checkpoints: the published LTM format (torch.save'd dicts) and our safetensors + JSON format.

Published state dicts use our module names already, up to three variants, normalised here:
`_orig_mod.` segments left by torch.compile (anywhere in a name), a `module.` prefix left by DDP, and the
MLP named `w1/w3/w2` (= gate/up/down). `output.weight` is tied to `tok_embeddings.weight`: when both are
present they must be equal. Files are read with `weights_only=True`: loading never executes code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ltm.config import PRESETS, LTMConfig
from ltm.files import atomic_write_bytes, atomic_write_text
from ltm.hub import CONFIG_FILE, SAFETENSORS_FILE, config_from_json, config_to_json, resolve_folder
from ltm.tokenizer import VOCAB_SIZES

_MLP_ALIASES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_TIED_KEY, _EMBED_KEY = "output.weight", "tok_embeddings.weight"


def canonical_name(name: str) -> str:
    name = name.replace("_orig_mod.", "")
    if name.startswith("module."):
        name = name[len("module.") :]
    return re.sub(r"\.feed_forward\.(w1|w2|w3)\.", lambda m: f".feed_forward.{_MLP_ALIASES[m.group(1)]}.", name)


def canonical_state_dict(state_dict) -> dict:
    """Published-naming state dict -> our names, with the tied output weight checked and dropped."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    out, sources = {}, {}
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state_dict[{name!r}] is a {type(value).__name__}, not a tensor")
        key = canonical_name(name)
        if key in out:
            raise ValueError(f"state_dict keys {sources[key]!r} and {name!r} name the same parameter {key!r}")
        out[key], sources[key] = value, name
    if _TIED_KEY in out:
        tied = out.pop(_TIED_KEY)
        embed = out.get(_EMBED_KEY)
        if embed is not None and (tied.shape != embed.shape or not torch.equal(tied, embed)):
            raise ValueError(
                f"{sources[_TIED_KEY]!r} differs from {sources.get(_EMBED_KEY)!r}; the output "
                "projection is tied to the token embedding and must be equal to it"
            )
        if embed is None:
            out[_EMBED_KEY] = tied
    return out


def load_published_state_dict(model, state_dict) -> None:
    """Copy a published-naming state dict into `model`; refuse, listing every problem, if it does not fit."""
    incoming = canonical_state_dict(state_dict)
    expected = {k: v for k, v in model.state_dict().items() if k != _TIED_KEY}
    missing = sorted(set(expected) - set(incoming))
    unexpected = sorted(set(incoming) - set(expected))
    wrong_shape = [
        f"{k}: got {tuple(incoming[k].shape)}, expected {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(incoming))
        if incoming[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    if wrong_shape:
        problems.append(f"wrong shapes: {wrong_shape}")
    if problems:
        raise ValueError("state dict does not fit this LTMConfig; " + "; ".join(problems))
    non_finite = [k for k, v in incoming.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if non_finite:
        raise ValueError(f"state dict has non-finite values in {non_finite}")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(incoming[key])


def _config_from_published(state_dict: dict, model_args: dict, overrides: dict) -> LTMConfig:
    """Published `model_args` (dim, n_layers, n_heads, vocab_size, max_seq_len, window_size, max_z_len, ...),
    completed from the weight shapes; a bare state dict falls back on the published preset of its depth."""
    embed = state_dict.get(_EMBED_KEY)
    if embed is None:
        raise ValueError(f"checkpoint has no {_EMBED_KEY!r} (nor a tied {_TIED_KEY!r})")
    layer_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"layers\.(\d+)\.", k))}
    gate = state_dict.get("layers.0.feed_forward.gate_proj.weight")
    from_shapes = dict(vocab_size=embed.shape[0], d_model=embed.shape[1], n_layer=len(layer_ids))
    if gate is not None:
        from_shapes["d_ff"] = gate.shape[0]
    renamed = {
        "dim": "d_model",
        "n_layers": "n_layer",
        "n_heads": "n_head",
        "vocab_size": "vocab_size",
        "max_seq_len": "max_seq_len",
        "window_size": "window_size",
        "max_z_len": "n_z",
        "norm_eps": "norm_eps",
        "rope_theta": "rope_theta",
    }
    from_args = {ours: model_args[theirs] for theirs, ours in renamed.items() if model_args.get(theirs) is not None}
    preset = next(
        (
            p
            for p in PRESETS.values()
            if p["n_layer"] == from_shapes["n_layer"]
            and p["d_model"] == from_shapes["d_model"]
            and p["vocab_size"] == from_shapes["vocab_size"]
        ),
        {},
    )
    # model_args win over shapes: weights that disagree are then reported key by key by the loader.
    # Published checkpoints carry no tokenizer name: theirs is GPT-2, but a vocabulary of exactly the byte
    # tokenizer's size can only be ours (a published-format save of a byte-level model).
    encoding = model_args.get("encoding") or ("bytes" if from_shapes["vocab_size"] == VOCAB_SIZES["bytes"] else "gpt2")
    values = {
        "n_head": from_shapes["d_model"] // 64,
        **preset,
        **from_shapes,
        **from_args,
        "encoding": encoding,
        **overrides,
    }
    if "n_z" not in values:
        raise ValueError(
            "cannot tell the number of latents from a bare state dict: pass n_z=... "
            "(the total count, e.g. from the published model_args max_z_len)"
        )
    return LTMConfig(**{k: v for k, v in values.items() if k in LTMConfig.__dataclass_fields__})


def read_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"cannot read checkpoint {path} with torch.load(weights_only=True) "
            f"(truncated, or not a tensors-only checkpoint): {err}"
        ) from err


def from_published_checkpoint(cls, path_or_dict, backend: str = "auto", **config_overrides):
    obj = read_checkpoint(path_or_dict) if isinstance(path_or_dict, (str, os.PathLike)) else path_or_dict
    if not isinstance(obj, dict):
        raise TypeError(f"path_or_dict must be a path, a checkpoint dict or a state dict, got {type(obj).__name__}")
    if "model" in obj:
        state_dict, model_args = obj["model"], obj.get("model_args") or {}
        if not isinstance(model_args, dict):
            raise ValueError(f"checkpoint['model_args'] must be a dict, got {type(model_args).__name__}")
    else:
        state_dict, model_args = obj, {}
    state_dict = canonical_state_dict(state_dict)
    model = cls(_config_from_published(state_dict, model_args, config_overrides), backend=backend)
    model.load_published_state_dict(state_dict)
    return model


def save_pretrained(model, directory) -> None:
    """`model.safetensors` (tied output weight stored once) + `config.json` (LTMConfig, including encoding)."""
    from safetensors.torch import save

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_pretrained: {directory} exists and is not a folder; give a folder name")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != _TIED_KEY}
    atomic_write_bytes(directory / SAFETENSORS_FILE, save(tensors, metadata={"format": "pt"}))
    config = json.dumps(config_to_json(model.cfg), indent=2)
    atomic_write_text(directory / CONFIG_FILE, config + "\n")


def from_pretrained(cls, directory, backend: str = "auto", encoding=None, **hub_options):
    from safetensors.torch import load_file

    from ltm.tokenizer import check_encoding

    directory = resolve_folder(directory, **hub_options)  # a local folder, or a Hub repo id (ltm.hub)
    for name in (CONFIG_FILE, SAFETENSORS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} has no {name} (written by LTMDecoder.save_pretrained)")
    try:
        cfg = config_from_json(json.loads((directory / CONFIG_FILE).read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{directory / CONFIG_FILE} is not a valid ltm-kernels config: {err}") from err
    if encoding is not None:
        check_encoding(cfg.encoding, encoding, f"checkpoint {directory}")
    try:
        state_dict = load_file(directory / SAFETENSORS_FILE)
    except Exception as err:
        raise ValueError(f"cannot read {directory / SAFETENSORS_FILE} (truncated or not safetensors): {err}") from err
    model = cls(cfg, backend=backend)
    model.load_published_state_dict(state_dict)
    return model
