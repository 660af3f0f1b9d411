"""Where one inner loop's time goes: torch.profiler over timed loops of one variant of benchmarks/inner_loop.py.

    python benchmarks/profile_inner_loop.py [--variant fused] [--steps 8] [--top 25]

Prints the ops by self time and writes them, with the machine and the commit, to
benchmarks/results/profile_<variant>_<cpu>_<date>.json. Shares (not seconds) are what to read: the profiler
adds a little time per op. Start each optimisation from the largest share (benchmarks/NOTES.md). A custom op's
forward may be charged to its autograd node (the LM head's is): time such an op by itself before acting.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import add_inner_loop_arguments, environment, slug, write_result
from inner_loop import DTYPES, VARIANTS, build_variant, make_inputs, make_runner

from ltm import LTMConfig, LTMDecoder
from ltm.backends import backend_status
from ltm.config import PRESETS


def profile_variant(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    cfg = LTMConfig.from_name(args.preset)
    torch.manual_seed(args.seed)
    base = LTMDecoder(cfg, backend="eager").to(device=device, dtype=dtype)
    model = build_variant(args.variant, base, backend_status())
    inputs = make_inputs(cfg, args.batch, args.seq, device, dtype, args.seed)
    run = make_runner(args.variant, model, inputs, args, args.steps)
    run()  # warm-up: first-call allocations, compilation
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.loops):
            run()
        wall = (time.perf_counter() - start) / args.loops
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(
        (
            dict(
                op=e.key,
                calls_per_loop=e.count / args.loops,
                self_ms_per_loop=e.self_cpu_time_total / 1e3 / args.loops,
                share=e.self_cpu_time_total / total,
            )
            for e in events
        ),
        key=lambda r: -r["share"],
    )
    print(f"{args.variant}: {1e3 * wall:.0f} ms per loop under the profiler ({args.loops} loops)")
    print(f"{'op':58s} {'calls':>7s} {'ms/loop':>9s} {'share':>6s}")
    for r in rows[: args.top]:
        print(f"{r['op'][:58]:58s} {r['calls_per_loop']:7.0f} {r['self_ms_per_loop']:9.1f} {100 * r['share']:5.1f}%")
    config = dict(
        variant=args.variant, preset=args.preset, batch=args.batch, seq=args.seq, steps=args.steps, dtype=args.dtype
    )
    return dict(benchmark="profile", **environment(device), config=config, ms_per_loop=1e3 * wall, ops=rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--variant", choices=VARIANTS, default="fused", help="a variant of benchmarks/inner_loop.py")
    p.add_argument("--preset", choices=sorted(PRESETS), default="ltm-cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--loops", type=int, default=1, help="profiled loops (after one warm-up loop)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--top", type=int, default=25, help="ops printed")
    add_inner_loop_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<name>.json)")
    args = p.parse_args(argv)
    for name in ("batch", "seq", "steps", "loops", "top"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = profile_variant(args)
    write_result(result, f"profile_{slug(args.variant)}", args.out)
    return result


if __name__ == "__main__":
    main()
