"""Training (ltm.train): exact resume, DDP equivalence, checkpoints, non-finite handling, optimizer setup."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ltm.train as train_mod
from ltm.data import prepare
from ltm.train import NonFiniteError, TrainConfig, learning_rate, load_checkpoint, make_optimizer, train

REPO = Path(__file__).resolve().parents[2]
SMALL = {"d_model": 32, "n_head": 2, "n_z": 4, "max_seq_len": 16, "window_size": 8}


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "docs.txt").write_text(" ".join("".join(rng.choice(list("abcdefgh"), 5)) for _ in range(300)))
    prepare([tmp_path / "docs.txt"], tmp_path / "train", progress=False)
    return str(tmp_path / "train")


def config(data, out_dir, **kw):
    values = dict(
        data=data,
        out_dir=str(out_dir),
        model_overrides=SMALL,
        batch_size=4,
        max_steps=6,
        warmup_steps=2,
        lr=1e-2,
        min_lr=1e-3,
        inner_steps=2,
        log_interval=1,
        ckpt_interval=100,
        backend="eager",
        device="cpu",
        progress=False,
    )
    return TrainConfig(**{**values, **kw})


def state_of(path):
    return load_checkpoint(path)["model"]


def test_resume_is_exact(data, tmp_path):
    """Stop after k steps, resume, continue to 2k: bit-identical to an uninterrupted 2k-step run."""
    full = train(config(data, tmp_path / "full", grad_accum=2))
    train(config(data, tmp_path / "split", grad_accum=2, stop_at=3))
    assert load_checkpoint(tmp_path / "split" / "ckpt.pt")["step"] == 3
    resumed = train(config(data, tmp_path / "split", grad_accum=2))
    assert full.step == resumed.step == 6
    a, b = state_of(full.checkpoint), state_of(resumed.checkpoint)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming"
    opt_a, opt_b = (load_checkpoint(p)["optimizer"]["state"] for p in (full.checkpoint, resumed.checkpoint))
    for i in opt_a:
        assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for k in opt_a[i])
    lines = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) and r["tokens"] > 0 for r in lines)
    split = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in split] == [r["loss"] for r in lines]


def test_checkpoint_is_tensors_only_and_records_the_tokenizer(data, tmp_path):
    result = train(config(data, tmp_path / "run", max_steps=1))
    ckpt = torch.load(result.checkpoint, weights_only=True)
    assert ckpt["encoding"] == "bytes" and ckpt["step"] == 1 and ckpt["data"]["step"] == 1
    assert isinstance(ckpt["rng"]["torch"], torch.Tensor)
    with pytest.raises(ValueError, match="'bytes'.*'gpt2'|'gpt2'.*'bytes'"):
        load_checkpoint(result.checkpoint, encoding="gpt2")


def test_truncated_checkpoint_gives_clear_error_and_is_not_overwritten(data, tmp_path):
    result = train(config(data, tmp_path / "run", max_steps=2))
    raw = result.checkpoint.read_bytes()
    result.checkpoint.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated"):
        train(config(data, tmp_path / "run", max_steps=4))
    assert result.checkpoint.read_bytes() == raw[: len(raw) // 2]  # left for the user to inspect
    assert list(result.checkpoint.parent.glob(".ckpt.pt.*")) == []  # no temp files


def test_non_finite_posterior_stops_with_a_checkpoint(data, tmp_path, monkeypatch):
    """At step 2 the posterior blows up: the run stops before the bad update and keeps the step-2 state."""
    reference = train(config(data, tmp_path / "ok", max_steps=4, stop_at=2))
    good_init = train_mod.initial_latents

    def exploding(cfg, seed, step, index, device):
        mu, logvar, noise = good_init(cfg, seed, step, index, device)
        return mu, (logvar + 2000.0 if step == 2 else logvar), noise

    monkeypatch.setattr(train_mod, "initial_latents", exploding)
    with pytest.raises(NonFiniteError, match=r"step 2 .*checkpointed at"):
        train(config(data, tmp_path / "bad", max_steps=4))
    kept = load_checkpoint(tmp_path / "bad" / "ckpt.pt")
    assert kept["step"] == 2
    want = state_of(reference.checkpoint)
    assert all(torch.equal(kept["model"][k], want[k]) for k in want)


def test_posterior_nll_is_logged_without_a_second_forward(data, tmp_path, monkeypatch):
    """Training fits the posterior with final_nll=False and logs the decoder update's CE as the posterior nll:
    it equals the nll the posterior itself would report at the fitted z."""
    real = train_mod.infer_posterior
    seen = []

    def reporting(model, tokens, targets, **kw):
        assert kw.pop("final_nll") is False
        post = real(model, tokens, targets, final_nll=True, **kw)
        seen.append(post.nll.sum().item() / int((targets != -1).sum()))
        return post

    monkeypatch.setattr(train_mod, "infer_posterior", reporting)
    train(config(data, tmp_path / "run", max_steps=3))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(seen) == len(lines) == 3
    for want, record in zip(seen, lines):
        assert math.isclose(record["posterior_nll_per_token"], want, rel_tol=1e-5), (record, want)
        assert record["posterior_nll_per_token"] == record["loss"]


def test_optimizer_groups_and_schedule(data, tmp_path):
    from ltm import LTMConfig, LTMDecoder

    cfg = config(data, tmp_path, warmup_steps=10, max_steps=110, lr=4e-4, min_lr=4e-5)
    model = LTMDecoder(LTMConfig.from_name("ltm-tiny"), backend="eager")
    decay, no_decay = make_optimizer(model, cfg).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0 and decay["betas"] == (0.9, 0.95)
    assert all(p.dim() == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 3 * 2 + 1  # norm weights
    assert learning_rate(0, cfg) == pytest.approx(4e-5) and learning_rate(9, cfg) == pytest.approx(4e-4)
    assert learning_rate(60, cfg) == pytest.approx(2.2e-4) and learning_rate(110, cfg) == pytest.approx(4e-5)
    with pytest.raises(ValueError, match="stop_at"):
        config(data, tmp_path, stop_at=50, max_steps=10).check()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_on_the_combined_batch(data, tmp_path):
    """torchrun with 2 gloo processes on 127.0.0.1, batch b each == 1 process with batch 2b (fp32 tolerance)."""
    k = 3
    single = train(config(data, tmp_path / "single", batch_size=4, max_steps=k))
    args = [
        "--data",
        data,
        "--out-dir",
        str(tmp_path / "ddp"),
        "--model-overrides",
        json.dumps(SMALL),
        "--batch-size",
        "2",
        "--max-steps",
        str(k),
        "--warmup-steps",
        "2",
        "--lr",
        "1e-2",
        "--min-lr",
        "1e-3",
        "--inner-steps",
        "2",
        "--backend",
        "eager",
        "--device",
        "cpu",
        "--no-progress",
    ]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            "ltm",
            "train",
            *args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = load_checkpoint(tmp_path / "ddp" / "ckpt.pt")
    assert ddp["step"] == k and ddp["data"]["world_size"] == 2
    want = state_of(single.checkpoint)
    for name, value in ddp["model"].items():
        torch.testing.assert_close(value, want[name], rtol=1e-4, atol=1e-5, msg=f"{name} differs")
