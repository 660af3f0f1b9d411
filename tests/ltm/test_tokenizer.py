"""Tokenizer tests. They never touch the network: "gpt2" is tested only from tiktoken's local cache."""

import os
import pickle

import numpy as np
import pytest
import requests
import torch

from ltm.tokenizer import BOS_TOKEN, ENCODINGS, EOS_TOKEN, Tokenizer, check_encoding, get_encoding, gpt2_is_cached


@pytest.fixture
def no_network(monkeypatch):
    """Any download attempt fails at once, as it would offline, instead of reaching the network."""

    def refuse(url, *args, **kwargs):
        raise requests.ConnectionError(f"test: network disabled ({url})")

    monkeypatch.setattr(requests, "get", refuse)


@pytest.fixture
def tok():
    return Tokenizer("bytes")


@pytest.mark.parametrize("text", ["hello, world\n", "héllo 世界 🙂", "", "\x00\t\r\n  trailing  "])
def test_bytes_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 258 for i in ids)
    assert tok.decode(ids) == text


def test_bytes_layout(tok):
    assert (ENCODINGS, BOS_TOKEN, EOS_TOKEN) == (("gpt2", "bytes"), "<|beginoftext|>", "<|endoftext|>")
    assert (tok.name, tok.vocab_size, tok.bos_id, tok.eos_id) == ("bytes", 258, 257, 256)
    assert tok.encode_document("ab") == [257, 97, 98, 256]
    assert tok.encode_document("") == [257, 256]
    assert tok.encode_documents(["a", "", "é"]) == [257, 97, 256, 257, 256, 257, 0xC3, 0xA9, 256]
    assert tok.encode_documents([]) == []
    assert tok.decode(tok.encode_document("hi")) == BOS_TOKEN + "hi" + EOS_TOKEN
    with pytest.raises(TypeError, match="single str"):
        tok.encode_documents("not a list")


def test_pickles_by_name(tok):
    data = pickle.dumps(tok)
    assert len(data) < 200
    assert pickle.loads(data) == tok


def test_special_strings_in_text_are_ordinary_text(tok):
    text = "a<|endoftext|>b" + BOS_TOKEN
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.eos_id not in ids and tok.bos_id not in ids
    assert tok.decode(ids) == text


def test_decode_accepts_tensors_and_arrays(tok):
    ids = tok.encode_document("héllo")
    expected = tok.decode(ids)
    assert tok.decode(torch.tensor(ids)) == expected
    assert tok.decode(np.array(ids, dtype=np.int32)) == expected
    assert tok.decode(tuple(ids)) == expected


@pytest.mark.parametrize("bad", [258, -1])
def test_decode_rejects_out_of_range_ids(tok, bad):
    with pytest.raises(ValueError, match=rf"ids.*{bad}"):
        tok.decode([104, bad])
    with pytest.raises(ValueError, match=rf"ids.*{bad}"):
        tok.decode(torch.tensor([bad]))


def test_decode_rejects_bad_input(tok):
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="ids"):
        tok.decode([1.5])


def test_unknown_encoding():
    with pytest.raises(ValueError, match="unknown encoding 'gpt3'.*'gpt2', 'bytes'"):
        get_encoding("gpt3")
    with pytest.raises(ValueError, match="unknown encoding"):
        Tokenizer("gpt3")


def test_check_encoding():
    check_encoding("bytes", "bytes", "checkpoint")
    with pytest.raises(ValueError, match="checkpoint.*'gpt2'.*'bytes'.*different tokenizer"):
        check_encoding("gpt2", "bytes", "checkpoint")


def test_gpt2_from_cache(no_network):
    if not gpt2_is_cached():
        print("GPT-2 BPE files not cached; tiktoken needs network to fetch them")
        pytest.skip("GPT-2 BPE files not cached; tiktoken needs network to fetch them")
    tok = Tokenizer("gpt2")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (50258, 50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]
    text = "héllo 世界 🙂 <|endoftext|> it's"
    assert tok.eos_id not in tok.encode(text)
    assert tok.decode(tok.encode_document(text)) == BOS_TOKEN + text + EOS_TOKEN


def test_gpt2_offline_raises_clear_error(no_network, monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache: the files must be fetched
    with pytest.raises(RuntimeError, match=r"(?s)network.*TIKTOKEN_CACHE_DIR.*encoding='bytes'"):
        get_encoding.__wrapped__("gpt2")  # past the lru_cache, which may hold a gpt2 loaded from a real cache
    assert os.listdir(tmp_path) == []


def test_gpt2_corrupt_download_is_not_cached(monkeypatch, tmp_path):
    class Response:
        content = b"not the GPT-2 merges"

        def raise_for_status(self):
            pass

    monkeypatch.setattr(requests, "get", lambda url, *args, **kwargs: Response())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        get_encoding.__wrapped__("gpt2")
    assert os.listdir(tmp_path) == []
