"""CI (`.ci/run`) installs exactly as README.md's "Run the tests" command says, and runs its test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_test_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"Run the tests:\s*```bash\n(.*?)\n```", readme, re.S)
    assert match, "README.md has no 'Run the tests:' bash block"
    return [c.strip() for c in match.group(1).split("&&")]


def _ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_ci_runs_the_readme_test_command():
    readme = _readme_test_commands()
    assert readme[:2] == ["python3 -m venv .venv", ". .venv/bin/activate"], readme
    ci = _ci_commands()
    positions = []
    for command in readme:
        assert command in ci, f"README command {command!r} is not a line of .ci/run:\n" + "\n".join(ci)
        positions.append(ci.index(command))
    assert positions == sorted(positions), f".ci/run runs the README's commands out of order: {readme}"


def test_no_command_needs_download_pytorch_org():
    # download.pytorch.org is unreachable from CI: pip would retry for minutes before failing.
    ci = (ROOT / ".ci" / "run").read_text()
    assert "download.pytorch.org" not in ci
    for command in _readme_test_commands():
        assert "download.pytorch.org" not in command, command
