"""Fault injection: a concurrent run, SIGINT / SIGTERM mid-run and during a save, SIGKILL during a save, a
diverging inner loop. After each fault the run resumes to exactly the weights of an uninterrupted run, and
metrics.jsonl holds every step once."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ltm import LTMConfig, LTMDecoder
from ltm.data import prepare
from ltm.files import DirectoryInUseError
from ltm.posterior import NonFiniteError
from ltm.train import TrainConfig, load_checkpoint, train

REPO = Path(__file__).resolve().parents[2]
SMALL = {"d_model": 32, "n_head": 2, "n_z": 4, "max_seq_len": 16, "window_size": 8}
MAX_STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    (folder / "docs.txt").write_text(" ".join("".join(rng.choice(list("abcdefgh"), 5)) for _ in range(200)))
    prepare([folder / "docs.txt"], folder / "train", progress=False)
    return str(folder / "train")


def settings(data, out_dir, **kw):
    values = dict(
        data=data,
        out_dir=str(out_dir),
        model_overrides=SMALL,
        seq_len=8,
        batch_size=2,
        max_steps=MAX_STEPS,
        warmup_steps=2,
        lr=1e-2,
        min_lr=1e-3,
        inner_steps=1,
        log_interval=1,
        ckpt_interval=2,
        backend="eager",
        device="cpu",
        progress=False,
    )
    return {**values, **kw}


def cli_args(values: dict) -> list:
    args = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return args


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    return load_checkpoint(train(TrainConfig(**settings(data, tmp_path_factory.mktemp("full")))).checkpoint)


def assert_same_run(ckpt, want):
    assert ckpt["step"] == want["step"]
    for name, value in want["model"].items():
        assert torch.equal(ckpt["model"][name], value), f"{name} differs from the uninterrupted run"
    for i, state in want["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(ckpt["optimizer"]["state"][i][key], value), f"optimizer state {i}.{key} differs"


def metric_steps(run) -> list:
    return [json.loads(line)["step"] for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


# A training run in a subprocess that sends itself `signame` at a chosen point: at the start of step
# `at` ("step"), or halfway through writing the checkpoint of step `at` ("save").
_FAULTY_TRAIN = textwrap.dedent("""
    import os, signal, sys
    import torch
    import ltm.train
    from ltm.cli import main

    signame, where, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sig = getattr(signal, signame)
    learning_rate, save = ltm.train.learning_rate, torch.save

    fired = []

    def faulty_learning_rate(step, cfg):  # called once per parameter group: signal once
        if where == "step" and step == at and not fired:
            fired.append(step)
            os.kill(os.getpid(), sig)
        return learning_rate(step, cfg)

    def faulty_save(obj, f, *args, **kw):
        if where == "save" and isinstance(obj, dict) and obj.get("step") == at:
            if sig == signal.SIGKILL:  # the process dies here, leaving its partial temporary file
                f.write(b"half a checkpoint")
                f.flush()
            os.kill(os.getpid(), sig)
        return save(obj, f, *args, **kw)

    ltm.train.learning_rate, torch.save = faulty_learning_rate, faulty_save
    sys.exit(main(["train", *sys.argv[4:]]))
""")


def run_faulty(signame, where, at, values):
    return subprocess.run(
        [sys.executable, "-c", _FAULTY_TRAIN, signame, where, str(at), *cli_args(values)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "signame, where, at, stopped_at",
    [
        ("SIGINT", "step", 2, 3),  # the step in progress completes, then a checkpoint
        ("SIGTERM", "save", 2, 3),  # the save completes; the run stops after the next step
    ],
)
def test_signal_saves_a_checkpoint_and_resume_is_bit_identical(
    data, tmp_path, uninterrupted, signame, where, at, stopped_at
):
    values = settings(data, tmp_path / "run")
    proc = run_faulty(signame, where, at, values)
    signum = getattr(signal, signame)
    assert proc.returncode == 128 + signum, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"stopped by {signame} at step {stopped_at}" in proc.stdout
    assert load_checkpoint(tmp_path / "run" / "ckpt.pt")["step"] == stopped_at
    assert metric_steps(tmp_path / "run") == list(range(1, stopped_at + 1))
    assert list((tmp_path / "run").glob(".ckpt.pt.*")) == []
    result = train(TrainConfig(**values))
    assert result.interrupted is None and result.step == MAX_STEPS
    assert_same_run(load_checkpoint(result.checkpoint), uninterrupted)
    assert metric_steps(tmp_path / "run") == list(range(1, MAX_STEPS + 1))  # each step once


def test_kill_during_save_keeps_the_old_checkpoint_and_resume_cleans_up(data, tmp_path, uninterrupted):
    values = settings(data, tmp_path / "run")
    proc = run_faulty("SIGKILL", "save", 4, values)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = tmp_path / "run"
    assert load_checkpoint(run / "ckpt.pt")["step"] == 2  # the checkpoint before the killed save, intact
    assert len(list(run.glob(".ckpt.pt.*"))) == 1  # the killed save's partial file
    assert metric_steps(run) == [1, 2, 3, 4]  # steps 3, 4 were logged but not checkpointed
    result = train(TrainConfig(**values))
    assert list(run.glob(".ckpt.pt.*")) == []
    assert_same_run(load_checkpoint(result.checkpoint), uninterrupted)
    assert metric_steps(run) == list(range(1, MAX_STEPS + 1))


_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from ltm.files import DirectoryLock
    with DirectoryLock(sys.argv[1], "ltm train"):
        print("locked", flush=True)
        sys.stdin.readline()
""")


def test_a_second_run_on_the_same_directory_is_refused(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DirectoryInUseError, match=rf"in use by another ltm train \(pid {holder.pid} "):
            train(TrainConfig(**settings(data, run, max_steps=1)))
        assert not (run / "ckpt.pt").exists() and not (run / "metrics.jsonl").exists()
    finally:
        holder.communicate("\n", timeout=60)
    assert train(TrainConfig(**settings(data, run, max_steps=1))).step == 1  # the lock went with its process


def test_no_resume_keeps_the_old_metrics_apart(data, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(**settings(data, run, max_steps=2)))
    train(TrainConfig(**settings(data, run, max_steps=3, resume=False)))
    assert metric_steps(run) == [1, 2, 3]
    assert [json.loads(line)["step"] for line in (run / "metrics-1.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_with_changed_settings_is_refused_unless_forced(data, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(**settings(data, run, max_steps=4, stop_at=1)))
    with pytest.raises(ValueError, match=r"other settings: lr 0.01 -> 0.02; seed 0 -> 1\..*--force"):
        train(TrainConfig(**settings(data, run, max_steps=4, seed=1, lr=2e-2)))
    with pytest.raises(ValueError, match=r"batch_size 2 -> 3"):
        train(TrainConfig(**settings(data, run, max_steps=4, batch_size=3)))
    other = Path(data).parent / "other"
    prepare([Path(data).parent / "docs.txt"], other, progress=False)
    with pytest.raises(ValueError, match=r"data .*train.bin' -> .*other.bin'"):
        train(TrainConfig(**settings(str(other), run, max_steps=4)))
    assert load_checkpoint(run / "ckpt.pt")["step"] == 1  # refused before touching anything
    # Settings of when and where (stop_at, intervals, backend, progress) may change freely.
    assert train(TrainConfig(**settings(data, run, max_steps=4, stop_at=2, ckpt_interval=1))).step == 2
    result = train(TrainConfig(**settings(data, run, max_steps=4, lr=2e-2, force=True)))
    assert result.step == 4 and load_checkpoint(result.checkpoint)["train_config"]["lr"] == 2e-2


def test_files_follow_the_umask(data, tmp_path):
    old = os.umask(0o027)
    try:
        prepare([Path(data).parent / "docs.txt"], tmp_path / "d", progress=False)
        result = train(TrainConfig(**settings(data, tmp_path / "run", max_steps=1)))
        model = LTMDecoder(LTMConfig.from_name("ltm-tiny"), backend="eager")
        model.save_pretrained(tmp_path / "pretrained")
    finally:
        os.umask(old)
    written = [
        tmp_path / "d.bin",
        tmp_path / "d.json",
        result.checkpoint,
        result.metrics,
        tmp_path / "pretrained" / "model.safetensors",
        tmp_path / "pretrained" / "config.json",
    ]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: "0o640" for p in written}


# ---------------------------------------------------------------- a diverging inner loop
def _batch(cfg, batch=2, n=12):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, n + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


@pytest.mark.parametrize("backend", ["eager", "auto"])  # auto: the engine (ltm.engine), C++ ops where built
@pytest.mark.parametrize(
    "case, kwargs, message",
    [
        ("lr", dict(lr=1e6, schedule="constant", steps=3), r"diverged: after 3 steps .*smaller lr \(given: lr=1e\+06"),
        ("logvar", dict(logvar=100.0, steps=0), r"logvar in \[-30, 30\] \(given: \[100, 100\]\)"),
        ("mu", dict(mu=1e20, steps=2), r"\|mu\| <= 10000 \(given: up to 1e\+20\)"),
    ],
)
def test_diverging_inner_loop_is_an_error_naming_the_cause(backend, case, kwargs, message):
    torch.manual_seed(0)
    model = LTMDecoder(LTMConfig.from_name("ltm-tiny"), backend=backend)
    tokens, targets = _batch(model.cfg)
    shape = (2, model.cfg.n_z, model.cfg.d_model)
    for name in ("mu", "logvar"):
        if name in kwargs:
            kwargs = {**kwargs, name: torch.full(shape, kwargs[name])}
    with pytest.raises(NonFiniteError, match=message):
        model.infer_posterior(tokens, targets, **kwargs)
    post = model.infer_posterior(tokens, targets, check_finite=False, **kwargs)  # the opt-out: values as they are
    assert not all(bool(torch.isfinite(t).all()) for t in (post.nll, post.kl, post.z))
    if case != "lr":
        z_noise = torch.zeros(shape)
        with pytest.raises(NonFiniteError, match="elbo_terms: "):
            model.elbo_terms(
                tokens,
                targets,
                kwargs.get("mu", torch.zeros(shape)),
                kwargs.get("logvar", torch.zeros(shape)),
                z_noise + 1.0,
            )


def test_generate_names_the_diverged_inner_loop(data, tmp_path, capsys):
    from ltm.cli import main

    ckpt = train(TrainConfig(**settings(data, tmp_path / "run", max_steps=1))).checkpoint
    assert (
        main(
            [
                "generate",
                str(ckpt),
                "--prompt",
                "abc",
                "--inner-lr",
                "1e9",
                "--inner-schedule",
                "constant",
                "--inner-steps",
                "2",
                "--max-new-tokens",
                "2",
                "--backend",
                "eager",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "inner loop diverged" in err and "smaller lr" in err
