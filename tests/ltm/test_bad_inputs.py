"""Every bad or extreme input of issue 13 (model API, config, files, CLI): a clear error that names the
argument and its range, or the documented behaviour. One table for the API, one for the CLI."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ltm import LTMConfig, LTMDecoder
from ltm.cli import main
from ltm.data import DataError, prepare
from ltm.evaluate import elbo_eval
from ltm.fewshot import fewshot_eval, read_qa
from ltm.train import TrainConfig, train

SMALL = {"d_model": 32, "n_head": 2, "n_z": 4, "max_seq_len": 16, "window_size": 8}
TINY = LTMConfig.from_name("ltm-tiny")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A prepared dataset, a one-step checkpoint, a few-shot file and a binary file."""
    root = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(0)
    (root / "a.txt").write_text(" ".join("".join(rng.choice(list("abcdefgh"), 5)) for _ in range(60)))
    prepare([root / "a.txt"], root / "d", progress=False)
    result = train(
        TrainConfig(
            data=str(root / "d"),
            out_dir=str(root / "run"),
            model_overrides=SMALL,
            seq_len=8,
            batch_size=2,
            max_steps=1,
            warmup_steps=1,
            inner_steps=1,
            backend="eager",
            device="cpu",
            progress=False,
        )
    )
    (root / "qa.jsonl").write_text(
        "".join(
            json.dumps({"question": q, "answer": a}) + "\n"
            for q, a in [("a", "b"), ("c", "d"), ("e", "f"), ("g", "h"), ("i", "j")]
        )
    )
    (root / "qa.bin").write_bytes(bytes([0xFF, 0xFE, 0x00, 0x80]) * 8)
    (root / "folder").mkdir()
    (root / "a_file").write_text("x")
    tiny_model().save_pretrained(root / "tiny")
    return dict(
        root=root,
        data=str(root / "d"),
        ckpt=str(result.checkpoint),
        tiny=str(root / "tiny"),
        qa=str(root / "qa.jsonl"),
        binary=str(root / "qa.bin"),
        folder=str(root / "folder"),
        file=str(root / "a_file"),
    )


def tiny_model():
    torch.manual_seed(0)
    return LTMDecoder(TINY, backend="eager")


def batch(cfg=TINY, b=2, n=12):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (b, n + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


LATENT = (2, TINY.n_z, TINY.d_model)


def _train_cfg(files, **kw):
    values = dict(
        data=files["data"],
        out_dir=str(files["root"] / "other_run"),
        model_overrides=SMALL,
        seq_len=8,
        batch_size=2,
        max_steps=1,
        warmup_steps=1,
        inner_steps=1,
        backend="eager",
        device="cpu",
        progress=False,
    )
    return TrainConfig(**{**values, **kw})


# (id, call(files), exception, message pattern)
API_CASES = [
    (
        "config-norm-eps-zero",
        lambda f: LTMConfig.from_name("ltm-tiny", norm_eps=0.0),
        ValueError,
        r"LTMConfig.norm_eps must be a finite number in \(0, 1\], got 0.0",
    ),
    (
        "config-norm-eps-nan",
        lambda f: LTMConfig.from_name("ltm-tiny", norm_eps=float("nan")),
        ValueError,
        r"LTMConfig.norm_eps must be",
    ),
    (
        "config-rope-theta-negative",
        lambda f: LTMConfig.from_name("ltm-tiny", rope_theta=-1.0),
        ValueError,
        r"LTMConfig.rope_theta must be a finite number > 0",
    ),
    (
        "config-rope-theta-nan",
        lambda f: LTMConfig.from_name("ltm-tiny", rope_theta=float("nan")),
        ValueError,
        r"LTMConfig.rope_theta must be",
    ),
    (
        "config-encoding",
        lambda f: LTMConfig.from_name("ltm-tiny", encoding="foo"),
        ValueError,
        r"LTMConfig.encoding must be one of 'gpt2', 'bytes', got 'foo'",
    ),
    (
        "config-unknown-field",
        lambda f: LTMConfig.from_name("ltm-tiny", foo=1),
        ValueError,
        r"unknown LTMConfig fields \['foo'\]; the fields are vocab_size, ",
    ),
    (
        "train-vocab-below-tokenizer",
        lambda f: train(_train_cfg(f, model_overrides={**SMALL, "vocab_size": 100})),
        ValueError,
        r"vocab_size=100, smaller than the 258 ids of its tokenizer 'bytes'",
    ),
    (
        "train-weight-decay",
        lambda f: train(_train_cfg(f, weight_decay=-1.0)),
        ValueError,
        r"TrainConfig.weight_decay must be a finite number >= 0, got -1.0",
    ),
    (
        "train-grad-clip",
        lambda f: train(_train_cfg(f, grad_clip=-1.0)),
        ValueError,
        r"TrainConfig.grad_clip must be a finite number >= 0, got -1.0",
    ),
    (
        "train-seq-len-zero",
        lambda f: train(_train_cfg(f, seq_len=0)),
        ValueError,
        r"TrainConfig.seq_len must be an int >= 1 or None, got 0",
    ),
    (
        "train-seq-len-too-long",
        lambda f: train(_train_cfg(f, seq_len=17)),
        ValueError,
        r"seq_len must be in \[1, max_seq_len=16\], got 17",
    ),
    (
        "train-out-dir-is-a-file",
        lambda f: train(_train_cfg(f, out_dir=f["file"])),
        ValueError,
        r"out_dir .*a_file exists and is not a folder",
    ),
    (
        "train-seed-negative",
        lambda f: train(_train_cfg(f, seed=-1)),
        ValueError,
        r"TrainConfig.seed must be an int in \[0, 9223372036854775807\], got -1",
    ),
    (
        "elbo-noise-none",
        lambda f: tiny_model().elbo_terms(*batch(), torch.zeros(LATENT), torch.zeros(LATENT), None),
        ValueError,
        r"elbo_terms: noise is required",
    ),
    (
        "kv-cache-scalar-z",
        lambda f: tiny_model().init_kv_cache(torch.tensor(1.0), 10),
        ValueError,
        r"z must be a tensor of shape \(B, 8, 64\) or \(B, 2, 4, 64\), got \(\)",
    ),
    (
        "save-pretrained-onto-a-file",
        lambda f: tiny_model().save_pretrained(f["file"]),
        ValueError,
        r"save_pretrained: .*a_file exists and is not a folder",
    ),
    (
        "prepare-over-its-input",
        lambda f: _prepare_notes(f),
        DataError,
        r"output .*notes.json is the input input .*notes.json: refusing to write over an input",
    ),
    (
        "eval-max-blocks-negative",
        lambda f: elbo_eval(tiny_model(), np.arange(100) % 258, max_blocks=-1),
        ValueError,
        r"max_blocks must be an int >= 1 or None, got -1",
    ),
    (
        "eval-max-blocks-zero",
        lambda f: elbo_eval(tiny_model(), np.arange(100) % 258, max_blocks=0),
        ValueError,
        r"max_blocks must be an int >= 1 or None, got 0",
    ),
    (
        "eval-batch-size-zero",
        lambda f: elbo_eval(tiny_model(), np.arange(100) % 258, batch_size=0),
        ValueError,
        r"batch_size must be an int >= 1, got 0",
    ),
    (
        "eval-seq-len-zero",
        lambda f: elbo_eval(tiny_model(), np.arange(100) % 258, seq_len=0),
        ValueError,
        r"seq_len must be an int in \[1, 64\] or None, got 0",
    ),
    (
        "fewshot-limit-negative",
        lambda f: fewshot_eval(tiny_model(), read_qa(f["qa"]), shots=1, limit=-1),
        ValueError,
        r"limit must be an int >= 1 or None, got -1",
    ),
    (
        "fewshot-limit-zero",
        lambda f: fewshot_eval(tiny_model(), read_qa(f["qa"]), shots=1, limit=0),
        ValueError,
        r"limit must be an int >= 1 or None, got 0",
    ),
    (
        "fewshot-max-answer-tokens",
        lambda f: fewshot_eval(tiny_model(), read_qa(f["qa"]), max_answer_tokens=-1),
        ValueError,
        r"max_answer_tokens must be an int in \[1, 63\], got -1",
    ),
    ("fewshot-binary-data", lambda f: read_qa(f["binary"]), ValueError, r"few-shot data file .*qa.bin is not UTF-8"),
]


def _prepare_notes(files):
    notes = files["root"] / "notes.json"
    notes.write_text('{"my": "notes"}\n')
    try:
        prepare([notes], files["root"] / "notes", progress=False)
    finally:
        assert notes.read_text() == '{"my": "notes"}\n'  # the input is untouched


@pytest.mark.parametrize("case, call, error, message", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_refuses_bad_input(files, case, call, error, message):
    with pytest.raises(error, match=message):
        call(files)


def test_published_checkpoint_of_a_byte_model_keeps_its_tokenizer():
    model = tiny_model()
    loaded = LTMDecoder.from_published_checkpoint({"model": model.state_dict(), "model_args": {}}, backend="eager")
    assert loaded.cfg.encoding == "bytes"


def test_infer_posterior_under_inference_mode_is_the_same_as_outside():
    model = tiny_model()
    tokens, targets = batch()
    want = model.infer_posterior(tokens, targets, steps=2, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = model.infer_posterior(tokens, targets, steps=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got.mu, want.mu) and torch.equal(got.nll, want.nll)


def test_eval_seq_len_one_reports_an_infinite_bound(files):
    """One scored token per window carries the whole KL: the bound exceeds float64 and is inf, not an error."""
    results = elbo_eval(tiny_model(), np.arange(20) % 258, steps=[0], seq_len=1, max_blocks=2)
    assert results[0]["ppl_bound"] == math.inf and math.isfinite(results[0]["nelbo_per_token"])


# (id, argv(files), exit code, what stderr says); exit code 2: argparse refused the option's value.
CLI_CASES = [
    (
        "eval-max-blocks-negative",
        lambda f: ["eval", f["ckpt"], "--data", f["data"], "--max-blocks", "-1"],
        2,
        r"argument --max-blocks: must be an int >= 1, got '-1'",
    ),
    (
        "eval-max-blocks-zero",
        lambda f: ["eval", f["ckpt"], "--data", f["data"], "--max-blocks", "0"],
        2,
        r"argument --max-blocks: must be an int >= 1, got '0'",
    ),
    (
        "eval-batch-size-zero",
        lambda f: ["eval", f["ckpt"], "--data", f["data"], "--batch-size", "0"],
        2,
        r"argument --batch-size: must be an int >= 1",
    ),
    (
        "eval-seq-len-zero",
        lambda f: ["eval", f["ckpt"], "--data", f["data"], "--seq-len", "0"],
        2,
        r"argument --seq-len: must be an int >= 1",
    ),
    (
        "eval-seq-len-too-long",
        lambda f: ["eval", f["ckpt"], "--data", f["data"], "--seq-len", "17"],
        1,
        r"seq_len must be an int in \[1, 16\] or None, got 17",
    ),
    (
        "eval-out-is-a-folder",
        lambda f: ["eval", f["ckpt"], "--data", f["data"], "--out", f["folder"]],
        1,
        r"--out .*folder is a folder",
    ),
    (
        "eval-out-is-the-data",
        lambda f: ["eval", f["ckpt"], "--data", f["data"], "--out", f["data"] + ".json"],
        1,
        r"--out .*d.json is the input --data .*: refusing to write over an input",
    ),
    (
        "eval-out-is-the-checkpoint",
        lambda f: ["eval", f["ckpt"], "--data", f["data"], "--out", f["ckpt"]],
        1,
        r"is the input checkpoint",
    ),
    (
        "eval-device-missing",
        lambda f: ["eval", f["ckpt"], "--data", f["data"], "--device", "cuda:99"],
        1,
        r"device 'cuda:99'",
    ),
    (
        "eval-device-unknown",
        lambda f: ["eval", f["ckpt"], "--data", f["data"], "--device", "gpu"],
        1,
        r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'",
    ),
    (
        "fewshot-limit-negative",
        lambda f: ["fewshot", f["ckpt"], "--data", f["qa"], "--limit", "-1"],
        2,
        r"argument --limit: must be an int >= 1, got '-1'",
    ),
    (
        "fewshot-limit-zero",
        lambda f: ["fewshot", f["ckpt"], "--data", f["qa"], "--limit", "0"],
        2,
        r"argument --limit: must be an int >= 1, got '0'",
    ),
    (
        "fewshot-max-answer-tokens",
        lambda f: ["fewshot", f["ckpt"], "--data", f["qa"], "--max-answer-tokens", "-1"],
        2,
        r"argument --max-answer-tokens: must be an int >= 1, got '-1'",
    ),
    ("fewshot-binary-data", lambda f: ["fewshot", f["ckpt"], "--data", f["binary"]], 1, r"qa.bin is not UTF-8"),
    (
        "fewshot-out-is-the-data",
        lambda f: ["fewshot", f["ckpt"], "--data", f["qa"], "--out", f["qa"]],
        1,
        r"--out .*qa.jsonl is the input --data",
    ),
    (
        "train-weight-decay",
        lambda f: ["train", "--data", f["data"], "--out-dir", "x", "--weight-decay", "-1"],
        2,
        r"argument --weight-decay: must be a finite number >= 0, got '-1'",
    ),
    (
        "train-grad-clip",
        lambda f: ["train", "--data", f["data"], "--out-dir", "x", "--grad-clip", "-1"],
        2,
        r"argument --grad-clip: must be a finite number >= 0",
    ),
    (
        "train-seq-len-zero",
        lambda f: ["train", "--data", f["data"], "--out-dir", "x", "--seq-len", "0"],
        2,
        r"argument --seq-len: must be an int >= 1",
    ),
    (
        "train-lr-nan",
        lambda f: ["train", "--data", f["data"], "--out-dir", "x", "--lr", "nan"],
        2,
        r"argument --lr: must be a finite number > 0, got 'nan'",
    ),
    (
        "train-out-dir-is-a-file",
        lambda f: ["train", "--data", f["data"], "--out-dir", f["file"]],
        1,
        r"out_dir .*a_file exists and is not a folder",
    ),
    (
        "train-overrides-unknown-field",
        lambda f: ["train", "--data", f["data"], "--out-dir", "x", "--model-overrides", '{"foo": 1}'],
        1,
        r"unknown LTMConfig fields \['foo'\]",
    ),
    (
        "train-overrides-not-an-object",
        lambda f: ["train", "--data", f["data"], "--out-dir", "x", "--model-overrides", "[1, 2]"],
        2,
        r"argument --model-overrides: must be a JSON object of LTMConfig fields",
    ),
    (
        "train-overrides-bad-norm-eps",
        lambda f: ["train", "--data", f["data"], "--out-dir", "x", "--model-overrides", '{"norm_eps": -1}'],
        1,
        r"LTMConfig.norm_eps must be a finite number in \(0, 1\], got -1",
    ),
    (
        "generate-top-p",
        lambda f: ["generate", f["ckpt"], "--top-p", "1.5"],
        2,
        r"argument --top-p: must be a finite number in \(0, 1\]",
    ),
    (
        "generate-diverging-inner-loop",
        lambda f: [
            "generate",
            f["ckpt"],
            "--prompt",
            "abc",
            "--inner-lr",
            "1e9",
            "--inner-schedule",
            "constant",
            "--inner-steps",
            "2",
        ],
        1,
        r"the inner loop diverged",
    ),
]


@pytest.mark.parametrize("case, argv, code, message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_bad_input(files, capsys, monkeypatch, case, argv, code, message):
    monkeypatch.chdir(files["root"])
    try:
        got = main(argv(files))
    except SystemExit as exit_:
        got = exit_.code
    out, err = capsys.readouterr()
    assert got == code, err
    assert "Traceback" not in err
    assert re.search(message, err), err
    if case.startswith("eval-out"):
        assert out == ""  # refused before any work


def test_cli_eval_seq_len_one_prints_inf_and_writes_json(files, capsys, tmp_path):
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                files["tiny"],
                "--data",
                files["data"],
                "--seq-len",
                "1",
                "--steps",
                "0",
                "--max-blocks",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "inf" in capsys.readouterr().out
    assert json.loads(out.read_text())["results"][0]["ppl_bound"] is None  # standard JSON: inf as null
    assert Path(files["root"] / "x").exists() is False  # the refused train runs above made no folder
