"""Token files (ltm.data.prepare / TokenData) and the deterministic window sampler."""

import json

import numpy as np
import pytest
import torch

from ltm.data import DataError, TokenData, WindowSampler, encode_texts, eval_blocks, prepare
from ltm.tokenizer import Tokenizer

TOK = Tokenizer("bytes")


def make_inputs(tmp_path):
    (tmp_path / "corpus" / "sub").mkdir(parents=True, exist_ok=True)
    (tmp_path / "corpus" / "a.txt").write_text("first doc")
    (tmp_path / "corpus" / "sub" / "b.md").write_text("second")
    (tmp_path / "corpus" / "skip.bin").write_bytes(b"\xff\xfe")  # not a text suffix: ignored
    (tmp_path / "corpus" / "empty.txt").write_text("")  # empty documents are skipped
    (tmp_path / "c.jsonl").write_text('{"text": "third"}\n\n"fourth"\n')
    return [tmp_path / "corpus", tmp_path / "c.jsonl"]


def test_prepare_round_trip(tmp_path):
    meta = prepare(make_inputs(tmp_path), tmp_path / "out" / "train", encoding="bytes", progress=False)
    expected = TOK.encode_documents(["first doc", "second", "third", "fourth"])
    assert meta["n_documents"] == 4 and meta["n_tokens"] == len(expected)
    assert meta["encoding"] == "bytes" and meta["vocab_size"] == 258 and meta["dtype"] == "uint16"
    assert json.loads((tmp_path / "out" / "train.json").read_text()) == meta
    for name in ("train", "train.bin", "train.json"):
        data = TokenData(tmp_path / "out" / name, encoding="bytes")
        assert data.tokens.tolist() == expected
    assert np.array_equal(encode_texts(make_inputs(tmp_path), "bytes"), expected)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.bin", "train.json"]  # no temp files


def test_jsonl_errors_name_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 .*'text'"):
        prepare([tmp_path / "bad.jsonl"], tmp_path / "d", progress=False)
    # the field is configurable
    (tmp_path / "good.jsonl").write_text('{"body": "x"}\n')
    assert prepare([tmp_path / "good.jsonl"], tmp_path / "d", jsonl_key="body", progress=False)["n_documents"] == 1
    with pytest.raises(DataError, match="does not exist"):
        prepare([tmp_path / "missing.txt"], tmp_path / "d", progress=False)


def test_empty_input_is_refused_and_existing_data_kept(tmp_path):
    (tmp_path / "doc.txt").write_text("keep me")
    prepare([tmp_path / "doc.txt"], tmp_path / "d", progress=False)
    before = (tmp_path / "d.bin").read_bytes(), (tmp_path / "d.json").read_text()
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no non-empty documents"):
        prepare([tmp_path / "empty.txt"], tmp_path / "d", progress=False)
    assert ((tmp_path / "d.bin").read_bytes(), (tmp_path / "d.json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.json", "doc.txt", "empty.txt"]


def test_empty_truncated_or_foreign_data_files_give_clear_errors(tmp_path):
    (tmp_path / "doc.txt").write_text("some text here")
    prepare([tmp_path / "doc.txt"], tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match="'bytes'.*'gpt2'|'gpt2'.*'bytes'"):
        TokenData(tmp_path / "d", encoding="gpt2")
    bin_path = tmp_path / "d.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        TokenData(tmp_path / "d")
    bin_path.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        TokenData(tmp_path / "d")
    with pytest.raises(DataError, match="metadata"):
        TokenData(tmp_path / "nothing")
    with pytest.raises(DataError, match="empty"):
        WindowSampler(np.array([], dtype=np.uint16), 4, 2)


def test_sampler_is_deterministic_and_split_over_ranks():
    tokens = np.arange(1000, dtype=np.uint16)
    one = WindowSampler(tokens, seq_len=16, batch_size=6, seed=3)
    x, y, index = one.batch(step=5)
    assert x.dtype == torch.int64 and x.shape == y.shape == (6, 16)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))  # windows of consecutive ids
    assert torch.equal(one.batch(5)[0], x) and not torch.equal(one.batch(6)[0], x)
    assert not torch.equal(WindowSampler(tokens, 16, 6, seed=4).batch(5)[0], x)
    # Two ranks with half the batch each see exactly the one-process batch.
    halves = [WindowSampler(tokens, 16, 3, seed=3, rank=r, world_size=2).batch(5) for r in range(2)]
    assert torch.equal(torch.cat([h[0] for h in halves]), x)
    assert np.array_equal(np.concatenate([h[2] for h in halves]), index)
    # Gradient accumulation: micro-steps also split the same global batch.
    micro = [WindowSampler(tokens, 16, 3, seed=3, grad_accum=2).batch(5, m)[0] for m in range(2)]
    assert torch.equal(torch.cat(micro), x)


def test_block_sampling_visits_every_block_once_per_epoch():
    tokens = np.arange(10 * 9, dtype=np.uint16)  # 10 blocks of seq_len + 1 = 9 tokens
    sampler = WindowSampler(tokens, seq_len=8, batch_size=5, seed=0, sampling="blocks")
    firsts = [int(x[0]) for step in range(2) for x in sampler.batch(step)[0]]
    assert sorted(firsts) == list(range(0, 90, 9))
    with pytest.raises(DataError, match="fewer than one window"):
        WindowSampler(tokens[:5], seq_len=8, batch_size=1)


def test_eval_blocks_cover_the_data():
    blocks = eval_blocks(np.arange(23), seq_len=4)
    assert [b.tolist() for b in blocks[:2]] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert blocks[-1].tolist() == [20, 21, 22] and len(blocks) == 5
    assert len(eval_blocks(np.arange(21), seq_len=4)) == 4  # a 1-token tail has nothing to score
