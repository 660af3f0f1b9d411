"""The main benchmark: the LTM inner loop (posterior inference), timed side by side.

Variants, on the same weights, tokens and initial (mu, logvar, noise):
  reference  the published recipe: eager model, dense-mask SDPA, `loss.backward()` through the whole model
             (decoder weight gradients included), `torch.optim.AdamW` on (mu, logvar)
  eager      our model, `backend="eager"`: gradients to (mu, logvar) only
  cpp        `backend="cpp"`: the compiled extension's ops (skipped, with the reason, if not built)
  auto       `backend="auto"`: the fastest available per op
Every variant is first checked to give the same posterior as `eager`; a variant that does not is reported
as wrong and not timed. Results: a table on stdout and a JSON file under benchmarks/results/.

    python benchmarks/inner_loop.py                      # CPU configuration of DESIGN section 5
    python benchmarks/inner_loop.py --preset ltm-tiny --batch 2 --seq 32 --steps 4
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ltm import LTMConfig, LTMDecoder, backend_status
from ltm.posterior import ADAM_BETAS, ADAM_EPS, scheduled_lr

RESULTS_DIR = Path(__file__).resolve().parent / "results"
VARIANTS = ("reference", "eager", "cpp", "auto")
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


def reference_inner_loop(model, tokens, targets, steps, lr, schedule, weight_decay, mu, logvar, noise):
    """The published recipe: full backward (decoder grads accumulate too) and torch.optim.AdamW."""
    mu, logvar = mu.clone().requires_grad_(True), logvar.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([mu, logvar], lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay)
    for t in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = scheduled_lr(t, steps, lr, schedule)
        optimizer.zero_grad(set_to_none=True)
        nll, kl = model.elbo_terms(tokens, targets, mu, logvar, noise)
        (nll.sum() + kl.sum()).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return mu.detach(), logvar.detach()


def make_runner(variant, model, backend_models, inputs, args, steps):
    tokens, targets, mu, logvar, noise = inputs
    if variant == "reference":
        return lambda: reference_inner_loop(model, tokens, targets, steps, args.lr, args.schedule,
                                            args.weight_decay, mu, logvar, noise)
    m = backend_models[variant]

    def run():
        post = m.infer_posterior(tokens, targets, steps=steps, lr=args.lr, schedule=args.schedule,
                                 weight_decay=args.weight_decay, mu=mu, logvar=logvar, noise=noise)
        return post.mu, post.logvar
    return run


def max_rel_error(got, want) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(run, device, repeats):
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_info(device) -> dict:
    info = {"type": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, cuda=torch.version.cuda, memory_bytes=props.total_memory)
    else:
        info["name"] = _cpu_name()
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default=None, help="LTMConfig preset (default: ltm-cpu on CPU, ltm-l on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="sequences per inner loop (default 4 CPU / 64 CUDA)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 512 CPU / 1024 CUDA)")
    p.add_argument("--steps", type=int, default=None, help="inner-loop steps T_fast (default: the preset's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per variant (median reported)")
    p.add_argument("--check-steps", type=int, default=2,
                   help="inner-loop steps of the correctness check against eager (also the warm-up)")
    p.add_argument("--lr", type=float, default=0.34)
    p.add_argument("--schedule", default="cosine")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-rtol", type=float, default=None,
                   help="max relative error vs eager for a variant to count as correct (default by dtype)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<device>_<date>)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.preset = args.preset or ("ltm-l" if cuda else "ltm-cpu")
    args.batch = args.batch or (64 if cuda else 4)
    args.seq = args.seq or (1024 if cuda else 512)
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv=None, wrong_variant=None) -> dict:
    """Run the benchmark; `wrong_variant` (tests only) perturbs one variant's result to exercise the gate."""
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = LTMConfig.from_name(args.preset)
    args.steps = cfg.t_fast if args.steps is None else args.steps
    if args.seq > cfg.max_seq_len:
        raise SystemExit(f"--seq {args.seq} is longer than {args.preset}'s context ({cfg.max_seq_len})")
    check_steps = max(1, min(args.check_steps, args.steps))
    rtol = args.check_rtol or {torch.float64: 1e-9, torch.float32: 2e-3}.get(dtype, 5e-2)
    print(f"inner loop: {args.preset} ({cfg.n_layer} layers, d {cfg.d_model}, n_z {cfg.n_z}, "
          f"vocab {cfg.vocab_size}), batch {args.batch} x {args.seq} tokens, T {args.steps}, {args.dtype}, "
          f"{device}", flush=True)

    commit = git_commit()  # before the run: edits made while it runs do not belong to these numbers
    torch.manual_seed(args.seed)
    status = backend_status()
    model = LTMDecoder(cfg, backend="eager").to(device=device, dtype=dtype)
    backend_models, skipped = {}, {}
    for variant in args.variants:
        if variant == "reference":
            continue
        ok, reason = status[variant]
        if ok:
            backend_models[variant] = LTMDecoder(cfg, backend=variant).to(device=device, dtype=dtype)
            backend_models[variant].load_state_dict(model.state_dict())
        else:
            skipped[variant] = reason
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    shape = (args.batch, cfg.n_z, cfg.d_model)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device, generator=gen)
    pdtype = torch.promote_types(dtype, torch.float32)
    inputs = (tokens[:, :-1], tokens[:, 1:],
              0.01 * torch.randn(shape, device=device, dtype=pdtype, generator=gen),
              -5 + 0.1 * torch.randn(shape, device=device, dtype=pdtype, generator=gen),
              torch.randn(shape, device=device, dtype=pdtype, generator=gen))

    baseline = None
    if "eager" in backend_models:
        print("  eager: correctness baseline run ...", flush=True)
        baseline = make_runner("eager", model, backend_models, inputs, args, check_steps)()

    rows = {}
    for variant in args.variants:
        if variant in skipped:
            rows[variant] = {"status": "unavailable", "reason": skipped[variant]}
            print(f"  {variant}: unavailable ({skipped[variant]})", flush=True)
            continue
        print(f"  {variant}: checking {check_steps} step(s) against eager ...", flush=True)
        mu, logvar = make_runner(variant, model, backend_models, inputs, args, check_steps)()  # also the warm-up
        if variant == wrong_variant:
            mu = mu + 1.0
        errors = None if baseline is None else {"mu": max_rel_error(mu, baseline[0]),
                                                "logvar": max_rel_error(logvar, baseline[1])}
        if errors is not None and max(errors.values()) > rtol:
            rows[variant] = {"status": "wrong", "max_rel_error": errors, "rtol": rtol}
            print(f"  {variant}: WRONG (max relative error {errors} > {rtol}); not timed", flush=True)
            continue
        print(f"  {variant}: timing {args.repeats} run(s) ...", flush=True)
        times = time_runs(make_runner(variant, model, backend_models, inputs, args, args.steps), device,
                          args.repeats)
        median = statistics.median(times)
        rows[variant] = {"status": "ok", "max_rel_error": errors, "times_s": times, "median_s": median,
                         "ms_per_loop": 1e3 * median, "ms_per_step": 1e3 * median / max(args.steps, 1),
                         "tokens_per_s": args.batch * args.seq * args.steps / median}

    ref = rows.get("reference", {}).get("median_s")
    for row in rows.values():
        if row["status"] == "ok" and ref:
            row["speedup_vs_reference"] = ref / row["median_s"]
    print_table(rows)

    result = {"benchmark": "inner_loop", "date": dt.datetime.now().isoformat(timespec="seconds"),
              "commit": commit, "device": device_info(device), "backends": status,
              "config": {"preset": args.preset, **cfg.to_dict(), "batch": args.batch, "seq": args.seq,
                         "steps": args.steps, "dtype": args.dtype, "lr": args.lr, "schedule": args.schedule,
                         "weight_decay": args.weight_decay, "repeats": args.repeats, "seed": args.seed,
                         "check_steps": check_steps, "check_rtol": rtol},
              "variants": rows}
    out = args.out or RESULTS_DIR / f"inner_loop_{_slug(result['device']['name'])}_{dt.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()[:48] or "device"


def print_table(rows: dict):
    header = f"{'variant':<10} {'ms/loop':>10} {'ms/step':>9} {'tokens/s':>10} {'vs ref':>7}  note"
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        if row["status"] != "ok":
            print(f"{name:<10} {'-':>10} {'-':>9} {'-':>10} {'-':>7}  {row['status']}: "
                  f"{row.get('reason') or row.get('max_rel_error')}")
            continue
        speedup = row.get("speedup_vs_reference")
        print(f"{name:<10} {row['ms_per_loop']:>10.1f} {row['ms_per_step']:>9.1f} {row['tokens_per_s']:>10.0f} "
              f"{(f'{speedup:.2f}x' if speedup else '-'):>7}")


if __name__ == "__main__":
    main()
    sys.exit(0)
