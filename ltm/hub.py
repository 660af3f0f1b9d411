"""Hub-style checkpoints: the `save_pretrained` folder in the form the Hugging Face Hub's tools expect, and the
transport to and from the Hub.

A folder holds `model.safetensors` and a flat `config.json`: the `LTMConfig` fields at the top level plus
`"model_type": "ltm"` (`ltm.interop.save_pretrained` writes both). `LTMDecoder.from_pretrained` takes either
a local folder, which needs nothing but safetensors and never touches the network, or a Hub repo id
("user/name"), whose two files `huggingface_hub.snapshot_download` fetches into the Hub cache (or finds there:
`local_files_only=True` works offline). `LTMDecoder.push_to_hub` saves the model into a temporary folder with
a model card and uploads it. The Hub parts need the optional extra: `pip install 'ltm-kernels[hub]'`.

The tokenizer guard (`from_pretrained(..., encoding=...)`) and the safetensors format are the same for both
sources; published checkpoints load through `LTMDecoder.from_published_checkpoint` as before.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ltm.config import LTMConfig

CONFIG_FILE, SAFETENSORS_FILE, CARD_FILE = "config.json", "model.safetensors", "README.md"
MODEL_TYPE = "ltm"
_OLD_FORMAT = "ltm-kernels"  # config.json before the flat form: {"format": "ltm-kernels", "config": {...}}
HUB_EXTRA_HINT = "pip install 'ltm-kernels[hub]'"


def config_to_json(cfg: LTMConfig) -> dict:
    """The flat config.json object of a model."""
    return {"model_type": MODEL_TYPE, **cfg.to_dict()}


def config_from_json(obj) -> LTMConfig:
    """LTMConfig from a parsed config.json: the flat form, or the nested form written by earlier versions."""
    if not isinstance(obj, dict):
        raise ValueError(f"config.json must hold a JSON object, got {type(obj).__name__}")
    if obj.get("format") == _OLD_FORMAT and isinstance(obj.get("config"), dict):
        return LTMConfig.from_dict(obj["config"])
    fields = dict(obj)
    model_type = fields.pop("model_type", None)
    if model_type != MODEL_TYPE:
        raise ValueError(f"config.json has model_type {model_type!r}; an ltm-kernels model has {MODEL_TYPE!r}")
    return LTMConfig.from_dict(fields)


def _import_hub(purpose: str):
    try:
        import huggingface_hub
        import huggingface_hub.utils  # validate_repo_id; the package loads its submodules lazily
    except ImportError as err:
        raise ImportError(f"{purpose} needs huggingface_hub: {HUB_EXTRA_HINT}") from err
    return huggingface_hub


def resolve_folder(
    folder_or_repo,
    revision: str | None = None,
    cache_dir=None,
    local_files_only: bool = False,
    token=None,
    force_download: bool = False,
) -> Path:
    """The local folder to load a model from: `folder_or_repo` itself when it is a folder, else the Hub cache's
    copy of that repo's config.json and model.safetensors at `revision` (downloaded unless `local_files_only`)."""
    path = Path(folder_or_repo)
    hub_options = dict(revision=revision, cache_dir=cache_dir, token=token)
    if path.is_dir():
        given = sorted(k for k, v in hub_options.items() if v is not None)
        if given:
            raise ValueError(f"{', '.join(given)} apply to Hub repos; {path} is a local folder")
        return path
    if path.exists():
        raise NotADirectoryError(
            f"{path} is a file; from_pretrained takes a save_pretrained folder or a Hub repo "
            "id (a published checkpoint file loads with from_published_checkpoint)"
        )
    try:
        hub = _import_hub(f"{str(folder_or_repo)!r} is no local folder; loading it as a Hub repo id")
    except ImportError as err:
        raise FileNotFoundError(f"no folder {path}; to load a Hub repo id instead: {HUB_EXTRA_HINT}") from err
    repo_id = str(folder_or_repo)
    try:
        hub.utils.validate_repo_id(repo_id)
    except ValueError as err:
        raise FileNotFoundError(f"no folder {path}, and {repo_id!r} is not a Hub repo id either") from err
    try:
        local = hub.snapshot_download(
            repo_id,
            allow_patterns=[CONFIG_FILE, SAFETENSORS_FILE],
            local_files_only=local_files_only,
            force_download=force_download,
            library_name="ltm-kernels",
            **hub_options,
        )
    except (OSError, ValueError) as err:
        where = "in the Hub cache" if local_files_only else "on the Hugging Face Hub"
        raise OSError(
            f"no folder {path}, and no Hub repo {repo_id!r} (revision {revision or 'main'}) {where}: {err}"
        ) from err
    return Path(local)


def model_card(cfg: LTMConfig, repo_id: str, n_params: int) -> str:
    """README.md of a pushed model: Hub metadata, the sizes, and how to load it."""
    rows = [
        ("layers", cfg.n_layer),
        ("d_model", cfg.d_model),
        ("heads", cfg.n_head),
        ("latents n_z (total)", cfg.n_z),
        ("context", cfg.max_seq_len),
        ("window", cfg.window_size),
        ("inner-loop steps T_fast", cfg.t_fast),
        ("vocabulary", cfg.vocab_size),
        ("tokenizer", cfg.encoding),
        ("parameters", f"{n_params:,}"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""---
library_name: ltm-kernels
tags:
- latent-thought-model
---

# {repo_id.split("/")[-1]}

A Latent Thought Model (Kong et al., ICML 2025) saved by ltm-kernels: a transformer decoder whose layers
cross-attend to latent thought vectors, fitted per sequence by the inner loop.

| | |
|---|---|
{table}

```python
from ltm import LTMDecoder

model = LTMDecoder.from_pretrained("{repo_id}", encoding="{cfg.encoding}")
```
"""


def push_to_hub(
    model,
    repo_id: str,
    commit_message: str | None = None,
    private: bool | None = None,
    token=None,
    revision: str | None = None,
    create_pr: bool = False,
    card: str | None = None,
):
    """Upload `model` (save_pretrained's two files and a model card, `card` or a generated one) to the Hub
    repo `repo_id`, created if missing; returns huggingface_hub's CommitInfo (its commit URL)."""
    hub = _import_hub("push_to_hub")
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"repo_id must be a Hub repo id such as 'user/name', got {repo_id!r}")
    hub.utils.validate_repo_id(repo_id)
    api = hub.HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="ltm-push-") as folder:
        model.save_pretrained(folder)
        text = model_card(model.cfg, repo_id, model.n_params) if card is None else card
        (Path(folder) / CARD_FILE).write_text(text)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=folder,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or "Upload a Latent Thought Model (ltm-kernels)",
        )
