"""`ltm prepare | train | eval | generate | fewshot`: --help documents every option; an end-to-end run."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ltm.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]
SMALL = json.dumps({"d_model": 32, "n_head": 2, "n_z": 4, "max_seq_len": 16, "window_size": 8})


def test_every_option_has_help():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and "train" in a.choices).choices
    assert {"prepare", "train", "eval", "generate", "fewshot"} <= set(subparsers)
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, f"ltm {name} {action.option_strings or action.dest} has no help text"


def test_python_m_ltm_is_the_cli():
    """`python -m ltm` is the `ltm` command: the same subcommands, the preset listing among them."""
    out = subprocess.run(
        [sys.executable, "-m", "ltm", "train", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "--out-dir" in out.stdout, out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "ltm", "presets"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "ltm-tiny" in out.stdout and "backend eager" in out.stdout, out.stderr


def test_no_import_cycles_among_ltm_modules():
    """Module-level and function-level imports between ltm modules form no cycle (one CLI, no shims)."""
    import ast

    graph = {}
    for path in (REPO / "ltm").glob("*.py"):
        name = "ltm." + path.stem if path.stem != "__init__" else "ltm"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ltm."):
                deps.add(node.module)
            elif isinstance(node, ast.ImportFrom) and node.module == "ltm":
                deps.update(f"ltm.{a.name}" for a in node.names if (REPO / "ltm" / f"{a.name}.py").exists())
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("ltm."))
        graph[name] = deps - {name}
    graph["ltm"] = set()  # the package's re-exports are not a dependency of its modules
    for module in graph:
        graph[module].discard("ltm")

    def visit(module, stack):
        assert module not in stack, f"import cycle: {' -> '.join(stack[stack.index(module) :] + [module])}"
        for dep in graph.get(module, ()):
            visit(dep, stack + [module])

    for module in graph:
        visit(module, [])
    kernels = [
        p.name
        for p in (REPO / "ltm").glob("*.py")
        if p.name != "backends.py"
        and any(
            line.lstrip().startswith(("import ltm_kernels", "from ltm_kernels")) for line in p.read_text().splitlines()
        )
    ]
    assert kernels == [], f"ltm/ reaches ltm_kernels only through ltm/backends.py; also imported in {kernels}"


def test_prepare_train_eval_generate_fewshot(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("the cat sat on the mat. " * 40)
    assert main(["prepare", str(tmp_path / "a.txt"), "-o", str(tmp_path / "d")]) == 0
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(tmp_path / "d"),
                "--out-dir",
                str(run),
                "--model-overrides",
                SMALL,
                "--batch-size",
                "2",
                "--max-steps",
                "2",
                "--warmup-steps",
                "1",
                "--inner-steps",
                "1",
                "--backend",
                "eager",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (run / "ckpt.pt").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) == 1
    ckpt = str(run / "ckpt.pt")
    assert (
        main(
            [
                "eval",
                ckpt,
                "--data",
                str(tmp_path / "d"),
                "--steps",
                "0",
                "2",
                "--iw-samples",
                "2",
                "--max-blocks",
                "4",
                "--out",
                str(tmp_path / "eval.json"),
                "--backend",
                "eager",
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert [r["T"] for r in results] == [0, 2] and "ppl_iw" in results[0]
    assert main(["eval", ckpt, "--text", str(tmp_path / "a.txt"), "--steps", "1", "--max-blocks", "2"]) == 0
    capsys.readouterr()
    assert (
        main(["generate", ckpt, "--prompt", "the", "--max-new-tokens", "5", "--inner-steps", "1", "--temperature", "0"])
        == 0
    )
    assert capsys.readouterr().out.endswith("\n")
    (tmp_path / "qa.jsonl").write_text('{"question": "a", "answer": "b"}\n{"question": "c", "answer": "d"}\n')
    assert (
        main(
            [
                "fewshot",
                ckpt,
                "--data",
                str(tmp_path / "qa.jsonl"),
                "--shots",
                "0",
                "--inner-steps",
                "1",
                "--max-answer-tokens",
                "2",
                "--out",
                str(tmp_path / "fs.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "fs.json").read_text())["n"] == 2


def test_user_errors_are_messages_not_tracebacks(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    assert main(["prepare", str(tmp_path / "empty.txt"), "-o", str(tmp_path / "d")]) == 1
    assert "no non-empty documents" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.pt"), "--text", str(tmp_path / "empty.txt")]) == 1
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", "x"])  # --out-dir is required: argparse says so


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("flags, shown", [([], True), (["--no-progress"], False)])
def test_progress_bars_on_a_terminal_only(tmp_path, monkeypatch, capsys, flags, shown):
    """prepare / train / eval / fewshot draw a tqdm bar on a terminal unless --no-progress; never into a pipe
    or a log."""
    (tmp_path / "a.txt").write_text("the cat sat on the mat. " * 10)
    (tmp_path / "qa.jsonl").write_text('{"question": "a", "answer": "b"}\n{"question": "c", "answer": "d"}\n')
    model_dir = tmp_path / "model"
    from ltm import LTMConfig, LTMDecoder

    LTMDecoder(LTMConfig.from_name("ltm-tiny", max_seq_len=32, window_size=8), backend="eager").save_pretrained(
        model_dir
    )
    runs = {
        "prepare": ["prepare", str(tmp_path / "a.txt"), "-o", str(tmp_path / "d")],
        "train": [
            "train",
            "--data",
            str(tmp_path / "d"),
            "--out-dir",
            str(tmp_path / "run"),
            "--model-overrides",
            SMALL,
            "--max-steps",
            "1",
            "--batch-size",
            "1",
            "--inner-steps",
            "0",
            "--backend",
            "eager",
        ],
        "eval": ["eval", str(model_dir), "--data", str(tmp_path / "d"), "--steps", "0", "--max-blocks", "1"],
        "fewshot": [
            "fewshot",
            str(model_dir),
            "--data",
            str(tmp_path / "qa.jsonl"),
            "--shots",
            "0",
            "--inner-steps",
            "0",
            "--max-answer-tokens",
            "1",
        ],
    }
    for name, argv in runs.items():
        terminal = _Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        assert main(argv + flags) == 0
        monkeypatch.undo()
        assert (f"{name}:" in terminal.getvalue()) == shown, terminal.getvalue()
        assert main(argv) == 0  # stderr captured by pytest: not a terminal, so no bar
        assert f"{name}:" not in capsys.readouterr().err
