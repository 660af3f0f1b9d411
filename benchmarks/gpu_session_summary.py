"""SUMMARY.md of a `benchmarks/gpu_session.sh` run: the steps, the GPU tests' result, the short result tables.

    python benchmarks/gpu_session_summary.py RAW_DIR [--dry-run 0|1] > SUMMARY.md

RAW_DIR is the session's folder of logs and JSON (steps.tsv: name, budget s, seconds taken, result). A
benchmark whose JSON is missing or has an unexpected shape is reported as such, never guessed at; the
inner-loop table is `readme_table.render`'s, the one the README shows.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_table import render


def _num(value, spec: str) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:{spec}}"


def _steps(raw: Path) -> list[str]:
    lines = ["| step | budget s | took s | result |", "|---|---|---|---|"]
    path = raw / "steps.tsv"
    for row in path.read_text().splitlines() if path.exists() else []:
        name, budget, took, result = row.split("\t")
        lines.append(f"| {name} | {budget} | {took} | {result} |")
    return lines


def _pytest_line(raw: Path) -> str:
    log = raw / "pytest-gpu.log"
    if not log.exists():
        return "pytest -m gpu: not run"
    # the final summary line: "=== 12 passed, 3 skipped in 40.1s ===", or with -q --collect-only "12 tests collected"
    found = [
        line.strip(" =")
        for line in log.read_text().splitlines()
        if re.search(r"\b(passed|failed|errors?|skipped|deselected|collected|no tests ran)\b", line)
    ]
    return f"pytest -m gpu: {found[-1]}" if found else "pytest -m gpu: no summary line (see pytest-gpu.log)"


def _status(row: dict) -> str:
    status = str(row.get("status"))
    reason = row.get("reason")
    return f"{status}: {str(reason)[:120]}" if reason and status != "ok" else status


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _inner_loop(raw: Path) -> list[str]:
    result = _load(raw / "inner_loop.json")
    if result is None:
        return ["inner loop: no result file (see inner-loop.log)"]
    try:
        return [render(result, "inner_loop.json")]
    except (KeyError, TypeError) as e:
        return [f"inner loop: inner_loop.json has an unexpected shape ({type(e).__name__}: {e})"]


def _attention(raw: Path) -> list[str]:
    result = _load(raw / "attention.json")
    if result is None:
        return ["attention: no result file (see attention.log)"]
    lines = []
    for section, unit in (("self_attention", "tflops"), ("latent_attention", "gbps")):
        rows = result.get(section)
        if not isinstance(rows, dict):
            lines.append(f"attention: no `{section}` in attention.json")
            continue
        label = "TFLOP/s" if unit == "tflops" else "GB/s"
        lines += [
            f"**{section}**",
            "",
            f"| variant | status | fwd ms | bwd ms | fwd {label} | bwd {label} |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in rows.items():
            lines.append(
                f"| {name} | {_status(row)} | {_num(row.get('forward_ms'), '.3f')} "
                f"| {_num(row.get('backward_ms'), '.3f')} | {_num(row.get('forward_' + unit), '.1f')} "
                f"| {_num(row.get('backward_' + unit), '.1f')} |"
            )
        lines.append("")
    return lines


def _lm_head(raw: Path) -> list[str]:
    result = _load(raw / "lm_head.json")
    if result is None:
        return ["LM head: no result file (see lm-head.log)"]
    runs = result.get("runs")
    if not isinstance(runs, dict):
        return ["LM head: no `runs` in lm_head.json"]
    lines = ["| mode | variant | status | median ms | TFLOP/s | peak GB | vs eager |", "|---|---|---|---|---|---|---|"]
    for mode, rows in runs.items():
        for name, row in rows.items():
            peak = row.get("peak_bytes")
            lines.append(
                f"| {mode} | {name} | {_status(row)} | {_num(row.get('median_ms'), '.2f')} "
                f"| {_num(row.get('tflops'), '.1f')} | {_num(peak and peak / 1e9, '.2f')} "
                f"| {_num(row.get('speedup_vs_eager'), '.2f')} |"
            )
    return lines


def summary(raw: Path, dry_run: bool) -> str:
    commit = (raw / "commit.txt").read_text().strip() if (raw / "commit.txt").exists() else "unknown"
    smi = (raw / "nvidia-smi.txt").read_text() if (raw / "nvidia-smi.txt").exists() else ""
    gpu = re.search(r"^GPU 0: (.+?) \(UUID", smi, re.M)  # `nvidia-smi -L`
    device = "dry run on CPU, tiny sizes: no GPU result" if dry_run else (gpu[1] if gpu else "GPU not identified")
    parts = [
        f"# GPU session — {device}",
        "",
        f"commit `{commit}`",
        "",
        *_steps(raw),
        "",
        _pytest_line(raw),
        "",
        "## Inner loop",
        "",
        *_inner_loop(raw),
        "",
        "## Attention",
        "",
        *_attention(raw),
        "",
        "## LM head + cross-entropy",
        "",
        *_lm_head(raw),
        "",
    ]
    return "\n".join(parts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("raw", type=Path, help="the session's folder of logs and JSON")
    p.add_argument("--dry-run", type=int, choices=(0, 1), default=0)
    args = p.parse_args(argv)
    if not args.raw.is_dir():
        p.error(f"raw: {args.raw} is not a folder")
    sys.stdout.write(summary(args.raw, bool(args.dry_run)))


if __name__ == "__main__":
    main()
