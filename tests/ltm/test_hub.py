"""Hub-style checkpoints (ltm.hub): the flat config.json, loading from a local folder or from the Hub cache, and
push_to_hub. No test opens a network connection (the `no_network` fixture makes any attempt fail): the Hub
repo is a folder laid out as huggingface_hub's cache, and the upload is intercepted at HfApi."""

import json
import shutil
import socket
import sys

import pytest
import torch

from ltm import LTMConfig, LTMDecoder

CFG = LTMConfig.from_name("ltm-tiny")
REPO = "someone/tiny-ltm"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def hub():
    return pytest.importorskip("huggingface_hub", reason="the hub extra (huggingface_hub) is not installed")


def logits_of(model):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CFG.vocab_size, (2, 20), generator=g)
    z = torch.randn(2, CFG.n_z, CFG.d_model, generator=g)
    return model(tokens, z)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = LTMDecoder(CFG, backend="eager")
    model.save_pretrained(tmp_path / "saved")
    return model, tmp_path / "saved"


def cache_repo(cache_dir, repo_id, folder, commit="1" * 40):
    """`folder`'s files as huggingface_hub's cache holds a downloaded repo at revision main."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_config_json_is_flat(saved):
    model, folder = saved
    config = json.loads((folder / "config.json").read_text())
    assert config == {"model_type": "ltm", **CFG.to_dict()}
    loaded = LTMDecoder.from_pretrained(folder, backend="eager", encoding="bytes")
    assert loaded.cfg == CFG and torch.equal(logits_of(loaded), logits_of(model))


def test_the_nested_config_of_earlier_versions_still_loads(saved):
    model, folder = saved
    (folder / "config.json").write_text(json.dumps({"format": "ltm-kernels", "config": CFG.to_dict()}))
    loaded = LTMDecoder.from_pretrained(folder, backend="eager")
    assert loaded.cfg == CFG and torch.equal(logits_of(loaded), logits_of(model))


def test_a_config_of_another_model_or_with_unknown_fields_is_refused(saved):
    _, folder = saved
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        LTMDecoder.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "ltm", **CFG.to_dict(), "n_experts": 4}))
    with pytest.raises(ValueError, match="n_experts"):
        LTMDecoder.from_pretrained(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        LTMDecoder.from_pretrained(folder)


def test_hub_options_do_not_apply_to_a_local_folder(saved):
    with pytest.raises(ValueError, match="revision apply to Hub repos"):
        LTMDecoder.from_pretrained(saved[1], revision="v1")


def test_a_file_is_not_a_pretrained_folder(saved):
    with pytest.raises(NotADirectoryError, match="from_published_checkpoint"):
        LTMDecoder.from_pretrained(saved[1] / "model.safetensors")


def test_a_hub_repo_loads_from_the_cache_offline(hub, saved, tmp_path):
    model, folder = saved
    cache_repo(tmp_path / "cache", REPO, folder)
    loaded = LTMDecoder.from_pretrained(
        REPO, backend="eager", encoding="bytes", cache_dir=tmp_path / "cache", local_files_only=True
    )
    assert loaded.cfg == CFG and torch.equal(logits_of(loaded), logits_of(model))
    assert loaded.output.weight is loaded.tok_embeddings.weight
    with pytest.raises(ValueError, match="'bytes'.*'gpt2'|'gpt2'.*'bytes'"):  # the tokenizer guard holds here too
        LTMDecoder.from_pretrained(REPO, encoding="gpt2", cache_dir=tmp_path / "cache", local_files_only=True)


def test_a_repo_missing_from_the_cache_or_a_bad_name_gives_a_clear_error(hub, tmp_path):
    with pytest.raises(OSError, match="no Hub repo 'someone/absent' .*in the Hub cache"):
        LTMDecoder.from_pretrained("someone/absent", cache_dir=tmp_path / "cache", local_files_only=True)
    with pytest.raises(FileNotFoundError, match="not a Hub repo id either"):
        LTMDecoder.from_pretrained(str(tmp_path / "no" / "such" / "folder"))


def test_push_to_hub_uploads_a_folder_that_loads_back(hub, tmp_path, monkeypatch):
    torch.manual_seed(1)
    model = LTMDecoder(CFG, backend="eager")
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = dict(repo_id=repo_id, **kwargs)
        return hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload_folder"] = dict(repo_id=repo_id, **kwargs)
        shutil.copytree(folder_path, tmp_path / "uploaded")  # the temporary folder is gone after the call
        return "commit-url"

    monkeypatch.setattr(hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(hub.HfApi, "upload_folder", upload_folder)
    assert model.push_to_hub(REPO, private=True, commit_message="first") == "commit-url"
    assert calls["create_repo"] == dict(repo_id=REPO, private=True, exist_ok=True)
    assert calls["upload_folder"]["repo_id"] == REPO and calls["upload_folder"]["commit_message"] == "first"
    uploaded = tmp_path / "uploaded"
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (uploaded / "README.md").read_text()
    assert "library_name: ltm-kernels" in card and f'from_pretrained("{REPO}", encoding="bytes")' in card
    loaded = LTMDecoder.from_pretrained(uploaded, backend="eager", encoding="bytes")
    assert torch.equal(logits_of(loaded), logits_of(model))


def test_push_to_hub_refuses_a_bad_repo_id(hub):
    with pytest.raises(ValueError, match="repo_id"):
        LTMDecoder(CFG, backend="eager").push_to_hub("")


def test_without_huggingface_hub_local_folders_load_and_hub_calls_say_what_to_install(saved, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` now fails
    model, folder = saved
    assert torch.equal(logits_of(LTMDecoder.from_pretrained(folder, backend="eager")), logits_of(model))
    with pytest.raises(FileNotFoundError, match=r"ltm-kernels\[hub\]"):
        LTMDecoder.from_pretrained(REPO)
    with pytest.raises(ImportError, match=r"push_to_hub needs huggingface_hub: pip install 'ltm-kernels\[hub\]'"):
        model.push_to_hub(REPO)
