"""Attention kernels: sliding-window self-attention (TFLOP/s) and latent cross-attention (GB/s), forward and
backward, against the PyTorch paths they replace.

Self-attention variants (q, k, v (B, H, N, hd), RoPE on q and k, causal window W):
  sdpa-dense-mask   the published path (`reference.self_attention_ref`): RoPE in eager ops, SDPA with a dense
                    (N, N) boolean window mask
  sdpa-causal       RoPE in eager ops, SDPA `is_causal=True` (no window: more work, the fastest SDPA kernels)
  flex-window       RoPE in eager ops, `torch.compile`d FlexAttention with a sliding-window block mask
  triton            `ltm_kernels.self_attention_triton` (CUDA; RoPE inside the kernel, tiles outside the window skipped)
  cpp               `ltm_kernels.self_attention_cpp` (CPU; blocked window)
Cross-attention variants (q (B, H, N, hd), k, v (B, H, M, hd), no mask):
  sdpa              the published path (`reference.latent_attention_ref`)
  triton, cpp       `ltm_kernels.latent_attention_triton`, `ltm_kernels.latent_attention_cpp`

FLOPs (self-attention) count the exact window: each query n sees min(n + 1, W) keys; forward = 4 hd keys
per (batch, head) (QK^T and PV), backward = twice that (dV, dP, dQ, dK; the recomputation of P is not
counted), the same count for every variant, so a variant that computes more (dense mask, plain causal)
shows a lower rate. Bytes (cross-attention) are the compulsory traffic: forward reads q, k, v and writes the
output; backward reads q, k, v, the output and its gradient and writes dq, dk, dv. They are compared with a
device-to-device copy bandwidth measured in the same run.
Every variant is checked against `sdpa-dense-mask` / `sdpa` (output and gradients) before it is timed
(`sdpa-causal` against the dense-mask path with the window set to N, the function it computes).

    python benchmarks/bench_attention.py                  # CUDA: 64 x 8 heads x 1024 tokens, hd 64, W 256, bf16
    python benchmarks/bench_attention.py --device cpu     # CPU: 4 x 4 x 512, W 128, M 4, fp32 (ltm-cpu)
Writes benchmarks/results/attention_<device>_<date>.json (device, versions, commit, config, raw times); timing,
environment and the result file are benchmarks/common.py's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from common import DTYPES, Unavailable, environment, max_rel_error, median, time_runs, write_result

import ltm_kernels
from ltm_kernels import reference

SELF_VARIANTS = ("sdpa-dense-mask", "sdpa-causal", "flex-window", "triton", "cpp")
CROSS_VARIANTS = ("sdpa", "triton", "cpp")


# ---------------------------------------------------------------- variants
def _rope(q, k, cos, sin):
    return reference.apply_rope_ref(q, cos, sin), reference.apply_rope_ref(k, cos, sin)


def _flex_window(n_tokens: int, window: int, device):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:
        raise Unavailable(f"FlexAttention is not in this torch ({err})") from err
    if device.type != "cuda":
        raise Unavailable("FlexAttention is benchmarked on CUDA only")

    def in_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    block_mask = create_block_mask(in_window, None, None, n_tokens, n_tokens, device=device)
    compiled = torch.compile(flex_attention)

    def run(q, k, v, cos, sin, window_):
        return compiled(*_rope(q, k, cos, sin), v, block_mask=block_mask)

    return run


def self_attention_variant(name: str, n_tokens: int, window: int, device: torch.device):
    if name == "sdpa-dense-mask":
        return reference.self_attention_ref
    if name == "sdpa-causal":
        return lambda q, k, v, cos, sin, w: F.scaled_dot_product_attention(*_rope(q, k, cos, sin), v, is_causal=True)
    if name == "flex-window":
        return _flex_window(n_tokens, window, device)
    return _kernel(name, "self_attention", device)


def latent_attention_variant(name: str, device: torch.device):
    if name == "sdpa":
        return reference.latent_attention_ref
    return _kernel(name, "latent_attention", device)


def _kernel(name: str, op: str, device: torch.device):
    if name == "triton":
        if device.type != "cuda" or not ltm_kernels.triton_device_ok(device):
            raise Unavailable("the Triton kernels are benchmarked on CUDA only (the interpreter is for tests)")
        return getattr(ltm_kernels, f"{op}_triton")
    if name == "cpp":
        if not ltm_kernels.has_op(op, device.type):
            raise Unavailable(
                f"the extension has no {device.type} kernel for ltm::{op} ({ltm_kernels.extension_status()[1]})"
            )
        return getattr(ltm_kernels, f"{op}_cpp")
    raise ValueError(f"unknown variant {name!r}")


# ---------------------------------------------------------------- measures
def window_keys(n_tokens: int, window: int) -> int:
    """Keys summed over queries: query n sees min(n + 1, W) of them."""
    return sum(min(n + 1, window) for n in range(n_tokens))


def self_attention_flops(batch, heads, n_tokens, head_dim, window) -> tuple[float, float]:
    fwd = 4.0 * batch * heads * head_dim * window_keys(n_tokens, window)
    return fwd, 2 * fwd


def latent_attention_bytes(batch, heads, n_tokens, n_latents, head_dim, itemsize) -> tuple[float, float]:
    q_like = batch * heads * n_tokens * head_dim * itemsize  # q, the output, their gradients
    kv_like = batch * heads * n_latents * head_dim * itemsize
    return 2 * q_like + 2 * kv_like, 4 * q_like + 4 * kv_like


def copy_bandwidth(device, numel=None) -> float:
    """Bytes per second of a device copy (read + write), best of a few: the bandwidth this machine reaches."""
    numel = numel or (1 << 28 if device.type == "cuda" else 1 << 24)
    src = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = min(time_runs(lambda: dst.copy_(src), device, repeats=8, warmup=1))
    return 2 * src.numel() * src.element_size() / best


def check_and_time(fn, inputs, want, args, device):
    """Errors of fn's output and input gradients vs `want` (output, *grads), then forward / backward times."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs[:3]]
    out = fn(*leaves, *inputs[3:])
    grad_out = want[-1]
    out.backward(grad_out)
    errors = {
        name: max_rel_error(g, w)
        for name, g, w in zip(("out", "dq", "dk", "dv"), (out, *(t.grad for t in leaves)), want[:4])
    }

    def forward():
        with torch.no_grad():
            fn(*inputs[:3], *inputs[3:])

    fwd = time_runs(forward, device, args.repeats, args.warmup)
    out = fn(*leaves, *inputs[3:])
    bwd = time_runs(
        lambda: torch.autograd.grad(out, leaves, grad_out, retain_graph=True), device, args.repeats, args.warmup
    )
    return errors, fwd, bwd


def reference_results(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs[:3]]
    out = fn(*leaves, *inputs[3:])
    out.backward(grad_out)
    return (out.detach(), *(t.grad for t in leaves), grad_out)


def run_variants(kind, names, make_fn, inputs, grad_out, work, unit, args, device, dtype, checked_as=None):
    """Rows for every variant of one op; `work` = (forward, backward) FLOPs or bytes, `unit` names it.
    Each variant is checked against the first (the baseline) run on the same inputs, or on
    `checked_as[name]` for a variant that computes another function (sdpa-causal has no window)."""
    rows = {}
    baseline = make_fn(names[0])
    want = reference_results(baseline, inputs, grad_out)
    tol = args.check_rtol or (1e-4 if dtype in (torch.float32, torch.float64) else 5e-2)
    for name in names:
        try:
            fn = make_fn(name)
            print(f"  {kind} {name}: checking and timing ...", flush=True)
            check_inputs = (checked_as or {}).get(name)
            expected = want if check_inputs is None else reference_results(baseline, check_inputs, grad_out)
            errors, fwd, bwd = check_and_time(fn, inputs, expected, args, device)
        except Unavailable as err:
            rows[name] = {"status": "unavailable", "reason": str(err)}
            print(f"  {kind} {name}: unavailable ({err})", flush=True)
            continue
        except torch.OutOfMemoryError as err:
            rows[name] = {"status": "out of memory", "reason": str(err).splitlines()[0]}
            torch.cuda.empty_cache()
            continue
        if max(errors.values()) > tol:
            rows[name] = {"status": "wrong", "max_rel_error": errors, "rtol": tol}
            print(f"  {kind} {name}: WRONG {errors}", flush=True)
            continue
        row = {
            "status": "ok",
            "max_rel_error": errors,
            "forward_times_s": fwd,
            "backward_times_s": bwd,
            "forward_ms": 1e3 * median(fwd),
            "backward_ms": 1e3 * median(bwd),
        }
        for phase, amount in zip(("forward", "backward"), work):
            row[f"{phase}_{unit}"] = amount / (row[f"{phase}_ms"] / 1e3) / (1e12 if unit == "tflops" else 1e9)
        rows[name] = row
    base = rows.get(names[0], {})
    for row in rows.values():
        if row["status"] == "ok" and base.get("status") == "ok":
            for phase in ("forward", "backward"):
                row[f"{phase}_speedup_vs_{names[0]}"] = base[f"{phase}_ms"] / row[f"{phase}_ms"]
    return rows


def print_table(title, rows, unit, unit_label, fmt):
    print(f"\n{title}")
    print(f"{'variant':<16} {'fwd ms':>9} {'fwd ' + unit_label:>9} {'bwd ms':>9} {'bwd ' + unit_label:>9}  note")
    for name, row in rows.items():
        if row["status"] == "ok":
            print(
                f"{name:<16} {row['forward_ms']:>9.3f} {row['forward_' + unit]:>9{fmt}} "
                f"{row['backward_ms']:>9.3f} {row['backward_' + unit]:>9{fmt}}"
            )
        else:
            print(
                f"{name:<16} {'-':>9} {'-':>9} {'-':>9} {'-':>9}  {row['status']}: "
                f"{row.get('reason') or row.get('max_rel_error')}"
            )


# ---------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=int, default=None, help="default 64 CUDA / 4 CPU")
    p.add_argument("--heads", type=int, default=None, help="default 8 CUDA / 4 CPU")
    p.add_argument("--seq", type=int, default=None, help="tokens; default 1024 CUDA / 512 CPU")
    p.add_argument("--window", type=int, default=None, help="default 256 CUDA / 128 CPU")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--latents", type=int, default=None, help="latents per layer M; default 8 CUDA / 4 CPU")
    p.add_argument("--self-variants", default=None, help=f"comma-separated subset of {SELF_VARIANTS}")
    p.add_argument("--cross-variants", default=None, help=f"comma-separated subset of {CROSS_VARIANTS}")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="CPU: timed runs per phase (default 5); CUDA: do_bench times as many as fit in 100 ms",
    )
    p.add_argument("--warmup", type=int, default=2, help="CPU: untimed runs first (CUDA: do_bench's 25 ms)")
    p.add_argument("--check-rtol", type=float, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    defaults = (
        dict(dtype="bf16", batch=64, heads=8, seq=1024, window=256, latents=8, repeats=20)
        if cuda
        else dict(dtype="fp32", batch=4, heads=4, seq=512, window=128, latents=4, repeats=5)
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch", "heads", "seq", "window", "head_dim", "latents", "repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.head_dim % 2:
        p.error("--head-dim must be even (RoPE rotates pairs)")
    for option, allowed in (("self_variants", SELF_VARIANTS), ("cross_variants", CROSS_VARIANTS)):
        value = getattr(args, option)
        chosen = [v.strip() for v in value.split(",") if v.strip()] if value else list(allowed)
        unknown = [v for v in chosen if v not in allowed]
        if unknown:
            p.error(f"unknown --{option.replace('_', '-')} {unknown}; choose from {allowed}")
        if chosen[0] != allowed[0]:
            chosen.insert(0, allowed[0])  # the baseline every variant is checked and compared against
        setattr(args, option, chosen)
    return args


def rope_tables(positions, head_dim, device):
    """fp32 tables on `device`, computed in float64 as the model's fp32 path reads them."""
    cos, sin = reference.rope_tables(positions, head_dim, 10000.0, torch.float64)
    return cos.float().to(device), sin.float().to(device)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    env = environment(device)
    info, commit = env["device"], env["commit"]
    B, H, N, hd, W, M = args.batch, args.heads, args.seq, args.head_dim, args.window, args.latents
    print(
        f"attention benchmark on {info['name']} ({device}), torch {info['torch']}, commit {commit}: "
        f"{B} x {H} heads x {N} tokens, hd {hd}, window {W}, {M} latents, {args.dtype}",
        flush=True,
    )
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    cos, sin = rope_tables(torch.arange(N), hd, device)
    cos_k, sin_k = rope_tables(torch.arange(M) * max(1, N // M), hd, device)
    bandwidth = copy_bandwidth(device)
    print(f"measured copy bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)

    self_inputs = (rand(B, H, N, hd), rand(B, H, N, hd), rand(B, H, N, hd), cos, sin, W)
    self_rows = run_variants(
        "self-attention",
        args.self_variants,
        lambda name: self_attention_variant(name, N, W, device),
        self_inputs,
        rand(B, H, N, hd),
        self_attention_flops(B, H, N, hd, W),
        "tflops",
        args,
        device,
        dtype,
        checked_as={"sdpa-causal": (*self_inputs[:5], N)},
    )
    cross_inputs = (rand(B, H, N, hd), rand(B, H, M, hd), rand(B, H, M, hd), cos, sin, cos_k, sin_k)
    cross_bytes = latent_attention_bytes(B, H, N, M, hd, torch.empty((), dtype=dtype).element_size())
    cross_rows = run_variants(
        "cross-attention",
        args.cross_variants,
        lambda name: latent_attention_variant(name, device),
        cross_inputs,
        rand(B, H, N, hd),
        cross_bytes,
        "gbps",
        args,
        device,
        dtype,
    )
    for row in cross_rows.values():
        if row["status"] == "ok":
            for phase in ("forward", "backward"):
                row[f"{phase}_fraction_of_copy_bandwidth"] = row[f"{phase}_gbps"] * 1e9 / bandwidth

    print_table(
        f"self-attention, exact-window TFLOP/s (forward {self_attention_flops(B, H, N, hd, W)[0] / 1e9:.2f} GFLOP)",
        self_rows,
        "tflops",
        "TF/s",
        ".2f",
    )
    print_table(
        f"cross-attention, GB/s of compulsory traffic (copy bandwidth {bandwidth / 1e9:.1f} GB/s)",
        cross_rows,
        "gbps",
        "GB/s",
        ".1f",
    )

    result = {
        "benchmark": "attention",
        **env,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "config": {
            "batch": B,
            "heads": H,
            "seq": N,
            "head_dim": hd,
            "window": W,
            "latents": M,
            "self_attention_flops": dict(zip(("forward", "backward"), self_attention_flops(B, H, N, hd, W))),
            "latent_attention_bytes": dict(zip(("forward", "backward"), cross_bytes)),
        },
        "copy_bandwidth_bytes_per_s": bandwidth,
        "self_attention": self_rows,
        "latent_attention": cross_rows,
    }
    write_result(result, "attention", args.out)
    return result


if __name__ == "__main__":
    main()
