"""The main benchmark: the LTM inner loop (posterior inference), timed side by side.

Variants, on the same weights, tokens and initial (mu, logvar, noise):
  reference      the published recipe: eager model, dense-mask SDPA, full logits into F.cross_entropy,
                 `loss.backward()` through the whole model (decoder weight gradients included),
                 `torch.optim.AdamW` on (mu, logvar); bf16 / fp16 as fp32 weights under torch.autocast
  eager          our model, `backend="eager"`: gradients to (mu, logvar) only
  compiled       `eager` with the decoder's forward under `torch.compile` (backward compiled by AOTAutograd;
                 decoder weights frozen so no weight gradient is compiled in)
  compiled-max   the same with mode="max-autotune-no-cudagraphs" (CUDA only)
  cpp, triton    one backend for every op it implements (eager for the rest)
  fused          `backend="auto"` ops on the static-buffer engine (ltm.engine.InnerLoop), no graph
  fused+graph    the same engine with all T steps captured in one CUDA graph (CUDA only)
Every variant times the same work: T steps that produce the fitted (mu, logvar), which is all the published
recipe computes. The other variants run with `final_nll=False`, so they skip the extra forward for
Posterior.nll at the fitted z (the training loop skips it too; see `ltm.train`).
Each variant is first checked over a few steps against `eager`: one that disagrees is reported as wrong
and not timed; one that cannot run here is reported with the reason. Results: a table on stdout and a
JSON file under benchmarks/results/ (device, versions, commit, configuration, every raw timing).

    python benchmarks/inner_loop.py                         # defaults for this device (docs/targets.md)
    python benchmarks/inner_loop.py --preset ltm-tiny --batch 2 --seq 32 --steps 4
    python benchmarks/inner_loop.py --sweep steps --plot    # cost vs T_fast, with a PNG
    python benchmarks/inner_loop.py --train                 # inner loop + decoder update per iteration

Model FLOPs per inner step (forward + activation-only backward, exact sliding window, LM head included)
come from `inner_step_flops`; utilisation is reported against the datasheet peak (CUDA) and a matmul peak
measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import (
    DTYPES,
    Unavailable,
    add_inner_loop_arguments,
    device_info,
    git_commit,
    max_rel_error,
    synchronize,
    write_result,
)

import ltm_kernels
from ltm import LTMConfig, LTMDecoder, backend_status
from ltm.engine import InnerLoop
from ltm.latents import latents_from_normals
from ltm.posterior import ADAM_BETAS, ADAM_EPS, scheduled_lr
from ltm_kernels import reference

VARIANTS = ("reference", "eager", "compiled", "compiled-max", "cpp", "triton", "fused", "fused+graph")
DEFAULT_VARIANTS = {
    "cpu": ("reference", "eager", "compiled", "cpp", "fused"),
    "cuda": ("reference", "eager", "compiled", "compiled-max", "fused", "fused+graph"),
}
# Dense bf16/fp16 tensor-core peaks from the vendor datasheets (SXM parts), TFLOP/s.
DATASHEET_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
# Published per-iteration times (Kong et al. 2025), 8 x H100 at 64 sequences x 1024 tokens per GPU.
PUBLISHED_TRAIN_MS = {("ltm-m", 16): 2209.76, ("ltm-l", 64): 13190.58}
SWEEPS = {"steps": (1, 2, 4, 8, 16, 32, 64), "latents": (1, 2, 4, 8), "seq": (128, 256, 512, 1024)}


# ---------------------------------------------------------------- FLOPs
def inner_step_flops(cfg: LTMConfig, batch: int, seq: int) -> float:
    """Model FLOPs of one inner step: forward + activation-only backward (no weight gradients).

    Matmuls count 2 FLOPs per multiply-add; a linear layer's activation backward costs what its forward
    does; attention's backward (dV, dP, dQ, dK) costs twice its forward (QK^T, PV). Self-attention uses the
    exact number of keys each token sees (min(n + 1, W)), not padded tiles."""
    d, d_ff, vocab, m = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_z_per_layer
    keys = sum(min(n + 1, cfg.window_size) for n in range(seq))  # per sequence, all tokens
    per_layer_linear = seq * (2 * 4 * d * d + 2 * 2 * d * d + 2 * 3 * d * d_ff) + m * 2 * 2 * d * d
    per_layer_attention = 4 * d * keys + 4 * d * m * seq
    head = 2 * seq * d * vocab
    forward = cfg.n_layer * (per_layer_linear + per_layer_attention) + head
    backward = cfg.n_layer * (per_layer_linear + 2 * per_layer_attention) + head
    return float(batch * (forward + backward))


def datasheet_peak_tflops(device_name: str):
    return next((v for k, v in DATASHEET_TFLOPS.items() if k in device_name), None)


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype) -> dict:
    """Best of a few square matmuls in the benchmark's dtype: the peak this machine reaches in practice.
    On CPU both GEMM libraries torch ships are timed (`torch.mm`, i.e. the linked BLAS, and oneDNN), since
    they differ by up to 2x by vendor; `best` is the higher, the peak utilisation is reported against."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    candidates = {"torch.mm": lambda: a @ b}
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and ltm_kernels.linear_onednn_status()[0]:
        bt = b.t().contiguous()
        candidates["onednn"] = lambda: ltm_kernels.linear_onednn(a, bt)
    rates = {}
    for name, fn in candidates.items():
        best = math.inf
        for _ in range(6):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(4):
                fn()
            synchronize(device)
            best = min(best, (time.perf_counter() - start) / 4)
        rates[name] = 2 * n**3 / best / 1e12
    return {**rates, "best": max(rates.values())}


# ---------------------------------------------------------------- variants
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


def build_variant(variant: str, base: LTMDecoder, status: dict) -> LTMDecoder:
    """A model for `variant` with `base`'s weights; raises Unavailable saying why it cannot run here."""
    device = base.tok_embeddings.weight.device
    if variant == "reference":
        # The published head: full logits through F.linear + F.cross_entropy (the eager backend's is chunked).
        # Half precision as the published code runs it: fp32 weights (the same values) under autocast.
        model = copy.deepcopy(base)
        if base.tok_embeddings.weight.dtype in (torch.bfloat16, torch.float16):
            model = model.float()
        impl = tuple((name, "full logits" if name == "lm_head_nll" else how) for name, how in model.ops.impl)
        model._ops = dataclasses.replace(model.ops, lm_head_nll=reference.lm_head_nll_ref, impl=impl)
        return model
    if variant == "fused+graph" and device.type != "cuda":
        raise Unavailable("CUDA graphs need a CUDA device")
    if variant == "compiled-max" and device.type != "cuda":
        raise Unavailable("max-autotune-no-cudagraphs is benchmarked on CUDA only")
    backend = {"fused": "auto", "fused+graph": "auto", "compiled": "eager", "compiled-max": "eager"}.get(
        variant, variant
    )
    ok, reason = status[backend]
    if not ok:
        raise Unavailable(reason)
    model = copy.deepcopy(base)
    model.backend = backend
    if variant.startswith("compiled"):
        model.requires_grad_(False)  # frozen decoder: AOTAutograd then compiles no weight gradients
        _ = model.ops  # resolved now, so that the compiled graph sees it as a constant
        mode = "max-autotune-no-cudagraphs" if variant == "compiled-max" else None
        model.sequence_nll = torch.compile(model.sequence_nll, mode=mode)
    return model


def make_runner(variant, model, inputs, args, steps):
    tokens, targets, mu, logvar, noise = inputs
    if variant == "reference":
        half = DTYPES[args.dtype] if DTYPES[args.dtype] in (torch.bfloat16, torch.float16) else None

        def run_reference():
            with torch.autocast(tokens.device.type, dtype=half, enabled=half is not None):
                return reference_inner_loop(
                    model, tokens, targets, steps, args.lr, args.schedule, args.weight_decay, mu, logvar, noise
                )

        return run_reference
    if variant in ("fused", "fused+graph"):
        # The static-buffer engine: inputs loaded and the graph captured here, outside the timed region;
        # a timed run is `execute` alone (one graph replay per loop for fused+graph).
        loop = InnerLoop(
            model,
            tokens.shape[0],
            tokens.shape[1],
            steps=steps,
            lr=args.lr,
            schedule=args.schedule,
            weight_decay=args.weight_decay,
            graph=variant == "fused+graph",
            final_nll=False,
        )
        loop.load(tokens, targets, mu, logvar, noise)
        loop.capture()

        def run_engine():
            loop.execute()
            return loop.mu, loop.logvar

        return run_engine

    def run():
        post = model.infer_posterior(
            tokens,
            targets,
            steps=steps,
            lr=args.lr,
            schedule=args.schedule,
            weight_decay=args.weight_decay,
            mu=mu,
            logvar=logvar,
            noise=noise,
            final_nll=False,
        )
        return post.mu, post.logvar

    return run


def make_train_runner(variant, model, inputs, args, steps):
    """One training iteration (Algorithm 1): the variant's inner loop, then a decoder AdamW step on mean CE.
    It trains a copy, so the other variants still start from the shared weights."""
    if variant.startswith("compiled"):
        raise Unavailable("training mode times the reference, eager and kernel variants only")
    tokens, targets, mu, logvar, noise = inputs
    trainable = copy.deepcopy(model).requires_grad_(True)
    inner = make_runner(variant, trainable, inputs, args, steps)
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=4e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def run():
        mu_fit, logvar_fit = inner()
        z = (mu_fit + noise * torch.exp(0.5 * logvar_fit)).detach()
        loss = trainable.sequence_nll(tokens, targets, z).sum() / targets.numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable.parameters(), 1.0)
        optimizer.step()
        return mu_fit, logvar_fit

    return run


def rel_l2_error(got, want) -> float:
    """||got - want|| / ||want||. The low-precision check uses it instead of the max: after two AdamW steps an
    element whose two gradients nearly cancel lands on either side of zero for a 1% change of its gradient (a
    whole lr away), so the max compares rounding luck, not accuracy."""
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def time_runs(run, device, repeats, faults=None):
    """Wall times of `repeats` runs; `faults` (a list) also gets each run's (minor page faults, system s)."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        if faults is not None:
            faults.append((after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime))
    return times


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# ---------------------------------------------------------------- one configuration
def make_inputs(cfg, batch, seq, device, dtype, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, cfg.n_z, cfg.d_model)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device, generator=gen)
    pdtype = torch.promote_types(dtype, torch.float32)  # the variational parameters stay >= fp32
    normals = [torch.randn(shape, device=device, dtype=pdtype, generator=gen) for _ in range(3)]
    return (tokens[:, :-1], tokens[:, 1:], *latents_from_normals(*normals))


def run_configuration(args, cfg, batch, seq, steps, device, dtype, status, peaks, wrong_variant=None) -> dict:
    """Check and time every requested variant on one (cfg, batch, seq, steps); returns the rows."""
    torch.manual_seed(args.seed)
    base = LTMDecoder(cfg, backend="eager").to(device=device, dtype=dtype)
    inputs = make_inputs(cfg, batch, seq, device, dtype, args.seed + 1)
    check_steps = max(1, min(args.check_steps, steps))
    rtol = args.check_rtol or {torch.float64: 1e-9, torch.float32: 2e-3}.get(dtype)
    runner = make_train_runner if args.train else make_runner
    flops = inner_step_flops(cfg, batch, seq) * steps
    print(
        f"{args.preset}: batch {batch} x {seq} tokens, T {steps}, {args.dtype}, {device}"
        f"{' (training iterations)' if args.train else ''}; {flops / 1e12:.3f} model TFLOP per inner loop",
        flush=True,
    )

    print("  eager: correctness baseline ...", flush=True)
    half = dtype in (torch.bfloat16, torch.float16)
    if half:
        # docs/kernels.md, "The 2x rule": against the fp32 posterior (the same weights in fp32), a variant's
        # error may be at most 2x the eager model's in the same dtype.
        baseline = make_runner("eager", copy.deepcopy(base).float(), inputs, args, check_steps)()
        eager_half = make_runner("eager", base, inputs, args, check_steps)()
        eager_error = max(rel_l2_error(eager_half[0], baseline[0]), rel_l2_error(eager_half[1], baseline[1]))
        rtol = args.check_rtol or 2 * eager_error
        print(f"  eager {args.dtype} vs fp32: relative L2 error {eager_error:.3g}; the bar is {rtol:.3g}", flush=True)
    else:
        baseline = make_runner("eager", base, inputs, args, check_steps)()
    cuda = device.type == "cuda"
    # On CPU the timed runs go round-robin over the variants (the first one of each in the loop below, the
    # rest after it): the speed of a shared CPU drifts over the minutes a run takes (clocks, other jobs), and
    # interleaving spreads the drift over every variant instead of favouring the ones timed first. On CUDA
    # each variant is timed alone and then released: at the GPU target sizes they cannot all hold their memory
    # (graph pools, logits) at once, and each one's peak memory must be its own.
    interleave = not cuda
    rows, times, kept, faults = {}, {}, {}, {}

    def record_out_of_memory(variant, err):
        if not is_out_of_memory(err):
            raise err
        rows[variant] = {"status": "out of memory", "reason": str(err).splitlines()[0]}
        times.pop(variant, None)
        kept.pop(variant, None)
        print(f"  {variant}: out of memory at batch {batch} x {seq}; continuing with the others", flush=True)
        if cuda:
            torch.cuda.empty_cache()

    for variant in args.variants:
        try:
            model = build_variant(variant, base, status)
            print(f"  {variant}: checking {check_steps} step(s) against eager ...", flush=True)
            mu, logvar = make_runner(variant, model, inputs, args, check_steps)()  # also the warm-up
            if variant == wrong_variant:
                mu = mu + 1.0
            error = rel_l2_error if half else max_rel_error
            errors = {"mu": error(mu, baseline[0]), "logvar": error(logvar, baseline[1])}
            if max(errors.values()) > rtol:
                rows[variant] = {"status": "wrong", "max_rel_error": errors, "rtol": rtol}
                print(f"  {variant}: WRONG (max relative error {errors} > {rtol}); not timed", flush=True)
                continue
            print(f"  {variant}: timing {args.repeats} run(s){' (interleaved)' if interleave else ''} ...", flush=True)
            run = runner(variant, model, inputs, args, steps)
            if args.train:
                run()  # warm-up of the decoder update
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            faults[variant] = []
            times[variant] = time_runs(run, device, 1 if interleave else args.repeats, faults[variant])
        except Unavailable as err:
            rows[variant] = {"status": "unavailable", "reason": str(err)}
            print(f"  {variant}: unavailable ({err})", flush=True)
            continue
        except (RuntimeError, torch.OutOfMemoryError) as err:
            record_out_of_memory(variant, err)
            continue
        rows[variant] = {
            "status": "ok",
            "ops": dict(model.ops.impl),  # which implementation each op ran (ltm.backends)
            "max_rel_error": errors,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        }
        if interleave:
            kept[variant] = (model, run)  # the engine refers to its model weakly: keep both
        del model, run  # on CUDA: released before the next variant is built
    for _ in range(args.repeats - 1 if interleave else 0):
        for variant, (_, run) in list(kept.items()):
            try:
                times[variant] += time_runs(run, device, 1, faults[variant])
            except (RuntimeError, torch.OutOfMemoryError) as err:
                record_out_of_memory(variant, err)
    for variant, variant_times in times.items():
        median = statistics.median(variant_times)
        row = rows[variant]
        row.update(
            {
                "times_s": variant_times,
                "median_s": median,
                "ms_per_loop": 1e3 * median,
                "minor_faults_per_loop": statistics.median(f for f, _ in faults[variant]),
                "system_s_per_loop": statistics.median(t for _, t in faults[variant]),
                "ms_per_step": 1e3 * median / steps,
                "tokens_per_s": batch * seq * steps / median,
                "model_tflops_per_s": flops / median / 1e12,
            }
        )
        for key, peak in peaks.items():
            if peak and not args.train:  # a training iteration also does the decoder update: not counted
                row[f"mfu_vs_{key}"] = row["model_tflops_per_s"] / peak
    if not cuda and args.memory:
        for variant in times:
            rows[variant]["peak_memory_bytes"] = child_peak_rss(args, variant, batch, seq, steps)
            print(
                f"  {variant}: peak resident memory {rows[variant]['peak_memory_bytes'] / 1e9:.2f} GB (own process)",
                flush=True,
            )
    for ref_name in ("reference", "compiled"):
        ref = rows.get(ref_name, {})
        for row in rows.values():
            if row["status"] == "ok" and ref.get("status") == "ok":
                row[f"speedup_vs_{ref_name}"] = ref["median_s"] / row["median_s"]
                if ref.get("peak_memory_bytes") and row.get("peak_memory_bytes"):
                    row[f"memory_vs_{ref_name}"] = row["peak_memory_bytes"] / ref["peak_memory_bytes"]
    return {
        "config": {
            "batch": batch,
            "seq": seq,
            "steps": steps,
            "check_steps": check_steps,
            "check_rtol": rtol,
            "final_nll": False,  # no variant computes the nll at the fitted z (the reference never does)
            "model_flops_per_loop": flops,
            **cfg.to_dict(),
        },
        "variants": rows,
    }


def child_peak_rss(args, variant: str, batch: int, seq: int, steps: int) -> int:
    """Peak resident memory (bytes) of one inner loop of `variant` in a process of its own, so that variants
    do not share a high-water mark: the base model, the inputs, the variant's model and one loop."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        *args.argv,
        "--preset",
        args.preset,
        "--batch",
        str(batch),
        "--seq",
        str(seq),
        "--steps",
        str(steps),
        "--dtype",
        args.dtype,
        "--variants",
        variant,
        "--memory-child",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("PEAK_RSS ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"memory measurement of {variant} failed: {out.stderr[-2000:]}")
    return int(lines[-1].split()[1])


def memory_child(args) -> None:
    """--memory-child: build the one variant, run its inner loop once, print its peak RSS in bytes."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = LTMConfig.from_name(args.preset)
    torch.manual_seed(args.seed)
    base = LTMDecoder(cfg, backend="eager").to(device=device, dtype=dtype)
    inputs = make_inputs(cfg, args.batch, args.seq, device, dtype, args.seed + 1)
    variant = args.variants[0]
    model = build_variant(variant, base, backend_status())
    make_runner(variant, model, inputs, args, args.steps)()
    print(f"PEAK_RSS {own_peak_rss()}", flush=True)


def own_peak_rss() -> int:
    """This process's peak resident memory in bytes. Linux: VmHWM, the high-water mark of this process's own
    address space, which starts afresh at exec; getrusage's ru_maxrss would not do in a child process, as it
    starts from the parent's resident size at fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


# ---------------------------------------------------------------- reporting
def print_table(rows: dict):
    header = (
        f"{'variant':<13} {'ms/loop':>10} {'ms/step':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
        f"{'mem GB':>7} {'vs ref':>7} {'vs comp':>7}  note"
    )
    print(header)
    print("-" * len(header))
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for name, row in rows.items():
        if row["status"] != "ok":
            print(
                f"{name:<13} {'-':>10} {'-':>9} {'-':>10} {'-':>8} {'-':>6} {'-':>7} {'-':>7} {'-':>7}  "
                f"{row['status']}: {row.get('reason') or row.get('max_rel_error')}"
            )
            continue
        mfu = row.get("mfu_vs_datasheet", row.get("mfu_vs_measured_matmul"))
        mem = row["peak_memory_bytes"] / 1e9 if row["peak_memory_bytes"] else None
        speedups = [row.get(f"speedup_vs_{r}") for r in ("reference", "compiled")]
        print(
            f"{name:<13} {row['ms_per_loop']:>10.1f} {row['ms_per_step']:>9.2f} {row['tokens_per_s']:>10.0f} "
            f"{row['model_tflops_per_s']:>8.3f} {fmt(mfu and 100 * mfu, '5.1f'):>5}% {fmt(mem, '7.2f'):>7} "
            f"{fmt(speedups[0], '.2f') + 'x':>7} {fmt(speedups[1], '.2f') + 'x':>7}".replace("-x", "- ")
        )


def write_plot(result: dict, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit(f"--plot needs matplotlib ({err}); `pip install matplotlib`") from err
    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(7, 4))
    sweep = result["sweep"]
    if sweep:
        xs = [run["config"][sweep["field"]] for run in runs]
        for variant in result["variants_requested"]:
            ys = [run["variants"].get(variant, {}).get("ms_per_loop") for run in runs]
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=variant)
        ax.set_xlabel(sweep["label"])
        ax.set_ylabel("ms per inner loop")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    else:
        rows = {k: v for k, v in runs[0]["variants"].items() if v["status"] == "ok"}
        ax.bar(list(rows), [r["ms_per_step"] for r in rows.values()])
        ax.set_ylabel("ms per inner step")
    ax.set_title(f"LTM inner loop, {result['preset']}, {result['device']['name']}", fontsize=9)
    ax.legend() if sweep else None
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# ---------------------------------------------------------------- environment
# ---------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default=None, help="LTMConfig preset (default: ltm-cpu on CPU, ltm-l on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="sequences per inner loop (default 4 CPU / 64 CUDA)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 512 CPU / 1024 CUDA)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="inner-loop steps T_fast (default: the preset's on CUDA, 8 on CPU to finish in ~2 min)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per variant (the median is reported)")
    p.add_argument(
        "--check-steps",
        type=int,
        default=2,
        help="inner-loop steps of the correctness check against eager (also the warm-up)",
    )
    p.add_argument(
        "--check-rtol",
        type=float,
        default=None,
        help="max relative error vs eager for a variant to count as correct (default by dtype)",
    )
    p.add_argument(
        "--sweep",
        choices=sorted(SWEEPS),
        default=None,
        help="scan T_fast (steps), latents per layer (latents) or tokens per sequence (seq)",
    )
    p.add_argument("--sweep-values", default=None, help="comma-separated values for --sweep")
    p.add_argument(
        "--train", action="store_true", help="time training iterations: inner loop + decoder update (Algorithm 1)"
    )
    add_inner_loop_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", action="store_true", help="also write a PNG next to the JSON (needs matplotlib)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<name>.json)")
    p.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        help="CPU: skip the peak-memory pass (one child process per variant, one loop each)",
    )
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = [
        a for a in (sys.argv[1:] if argv is None else argv) if a not in ("--memory-child",)
    ]  # for the child processes: the same settings
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    args.preset = args.preset or ("ltm-l" if cuda else "ltm-cpu")
    args.batch = args.batch or (64 if cuda else 4)
    args.seq = args.seq or (1024 if cuda else 512)
    args.steps = args.steps if args.steps is not None else (None if cuda else 8)
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.variants = (
        [v.strip() for v in args.variants.split(",") if v.strip()]
        if args.variants
        else list(DEFAULT_VARIANTS["cuda" if cuda else "cpu"])
    )
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    for name in ("batch", "seq", "repeats", "check_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    if args.sweep_values and not args.sweep:
        p.error("--sweep-values needs --sweep")
    return args


def sweep_points(args, cfg):
    """(cfg, seq, steps) per point of the sweep; the single configuration when there is no sweep."""
    if not args.sweep:
        return [(cfg, args.seq, args.steps)]
    values = [int(v) for v in args.sweep_values.split(",")] if args.sweep_values else SWEEPS[args.sweep]
    points = []
    for v in values:
        if args.sweep == "steps":
            points.append((cfg, args.seq, v))
        elif args.sweep == "latents":  # latents per layer; n_z is the total
            points.append((LTMConfig.from_name(args.preset, n_z=v * cfg.n_layer), args.seq, args.steps))
        elif v <= cfg.max_seq_len:
            points.append((cfg, v, args.steps))
    return points


def main(argv=None, wrong_variant=None) -> dict:
    """Run the benchmark; `wrong_variant` (tests only) perturbs one variant's result to exercise the gate."""
    args = parse_args(argv)
    if args.memory_child:
        cfg = LTMConfig.from_name(args.preset)
        args.steps = cfg.t_fast if args.steps is None else args.steps
        memory_child(args)
        return {}
    commit = git_commit()  # before the run: edits made while it runs do not belong to these numbers
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = LTMConfig.from_name(args.preset)
    args.steps = cfg.t_fast if args.steps is None else args.steps
    if args.seq > cfg.max_seq_len:
        raise SystemExit(f"--seq {args.seq} is longer than {args.preset}'s context ({cfg.max_seq_len})")
    info = device_info(device)
    status = backend_status()
    print(f"inner-loop benchmark on {info['name']} ({device}), torch {info['torch']}, commit {commit}", flush=True)
    matmul = measured_matmul_tflops(device, dtype)
    peaks = {
        "datasheet": datasheet_peak_tflops(info["name"]) if device.type == "cuda" else None,
        "measured_matmul": matmul["best"],
    }
    print(
        f"peak TFLOP/s: datasheet {peaks['datasheet'] or 'n/a'}, measured matmul {matmul['best']:.3f} "
        f"({args.dtype}; " + ", ".join(f"{k} {v:.3f}" for k, v in matmul.items() if k != "best") + ")",
        flush=True,
    )
    if device.type == "cpu" and dtype == torch.bfloat16 and not info["bf16_dot"]:
        print(
            "note: this CPU has no native bf16 dot product (avx512_bf16 / amx_bf16): bf16 runs convert to "
            "fp32 for every product and are not expected to beat fp32",
            flush=True,
        )

    runs = []
    for point_cfg, seq, steps in sweep_points(args, cfg):
        run = run_configuration(args, point_cfg, args.batch, seq, steps, device, dtype, status, peaks, wrong_variant)
        print_table(run["variants"])
        runs.append(run)
    if args.train:
        published = PUBLISHED_TRAIN_MS.get((args.preset, args.steps))
        if published:
            print(
                f"published per-iteration time ({args.preset}, T {args.steps}, 8 x H100, 64 x 1024 tokens per GPU):"
                f" {published} ms"
            )

    label = {"steps": "T_fast", "latents": "latents per layer", "seq": "tokens per sequence"}
    field = {"steps": "steps", "latents": "n_z", "seq": "seq"}
    result = {
        "benchmark": "inner_loop" + ("_train" if args.train else ""),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "commit": commit,
        "device": info,
        "backends": status,
        "peak_tflops": peaks,
        "matmul_tflops": matmul,
        "preset": args.preset,
        "dtype": args.dtype,
        "variants_requested": args.variants,
        "repeats": args.repeats,
        "seed": args.seed,
        "lr": args.lr,
        "schedule": args.schedule,
        "weight_decay": args.weight_decay,
        "sweep": {"name": args.sweep, "field": field[args.sweep], "label": label[args.sweep]} if args.sweep else None,
        "published_train_ms": PUBLISHED_TRAIN_MS.get((args.preset, args.steps)) if args.train else None,
        "runs": runs,
    }
    # write_result adds the device and the date, and _2, _3, ... so that a second run on a day keeps the first.
    kind = "_".join(
        filter(None, ["inner_loop", "train" if args.train else None, f"sweep-{args.sweep}" if args.sweep else None])
    )
    out = write_result(result, kind, args.out)
    if args.plot:
        write_plot(result, out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
