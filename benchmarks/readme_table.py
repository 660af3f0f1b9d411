"""Write the README's performance tables from inner-loop result files (never typed by hand).

    python benchmarks/readme_table.py benchmarks/results/inner_loop_<device>_<date>.json [more.json ...]

Replaces the text between the README markers `<!-- inner-loop-results:begin -->` and `:end -->` with
one table per file: the configuration, device, commit, and every variant's timings as the file has them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ltm.files import atomic_write_text

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- inner-loop-results:begin -->", "<!-- inner-loop-results:end -->"


def _fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def render(result: dict, source: str) -> str:
    device = result["device"]
    lines = []
    for run in result["runs"]:
        cfg = run["config"]
        lines += [
            f"**{result['preset']}**, batch {cfg['batch']} x {cfg['seq']} tokens, T_fast {cfg['steps']}, "
            f"{result['dtype']}, on {device['name']} (torch {device['torch']}, triton {device.get('triton')}), "
            f"commit `{result['commit'][:12]}`, {result['date'][:10]} — from `{source}`",
            "",
            "| variant | ms / loop | ms / step | tokens/s | model TFLOP/s | MFU (datasheet) | MFU (matmul) "
            "| peak mem GB | vs reference | vs compiled |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, row in run["variants"].items():
            if row["status"] != "ok":
                lines.append(
                    f"| {name} | {row['status']}: {row.get('reason', 'disagrees with eager')} | | | | | | | | |"
                )
                continue
            mem = row["peak_memory_bytes"] / 1e9 if row.get("peak_memory_bytes") else None
            mfu_d, mfu_m = row.get("mfu_vs_datasheet"), row.get("mfu_vs_measured_matmul")
            lines.append(
                f"| {name} | {row['ms_per_loop']:.1f} | {row['ms_per_step']:.2f} | {row['tokens_per_s']:.0f} "
                f"| {row['model_tflops_per_s']:.3f} | {_fmt(mfu_d and 100 * mfu_d, '.1f', '%')} "
                f"| {_fmt(mfu_m and 100 * mfu_m, '.1f', '%')} | {_fmt(mem, '.2f')} "
                f"| {_fmt(row.get('speedup_vs_reference'), '.2f', 'x')} "
                f"| {_fmt(row.get('speedup_vs_compiled'), '.2f', 'x')} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="JSON files written by benchmarks/inner_loop.py")
    p.add_argument("--readme", type=Path, default=README)
    args = p.parse_args(argv)
    text = args.readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{args.readme} has no {BEGIN} ... {END} section to fill")
    root = args.readme.resolve().parent
    tables = []
    for path in args.results:
        source = path.resolve().relative_to(root) if path.resolve().is_relative_to(root) else path
        tables.append(render(json.loads(path.read_text()), str(source)))
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    atomic_write_text(args.readme, f"{head}{BEGIN}\n{chr(10).join(tables)}{END}{tail}")  # a kill keeps the old
    print(f"updated {args.readme} from {len(args.results)} result file(s)")


if __name__ == "__main__":
    main()
