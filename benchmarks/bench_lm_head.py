"""LM head + cross-entropy: time and peak memory of the chunked / fused implementations against eager.

Variants, each computing the per-sequence summed NLL of logits = hidden @ W.T and its gradients:
  eager    `F.linear` + `F.cross_entropy` (`reference.lm_head_nll_ref`): full (tokens, V) logits
  chunked  `lm_head_nll_chunked`: PyTorch, chunked over tokens (the eager/cpp backends' LM head)
  cpp      `lm_head_nll_cpp`: the C++ CPU kernel (csrc/lm_head.cpp; bf16 on AMX, or on vdpbf16ps where it outruns FMA)
  triton   `lm_head_nll_triton`: the same chunk loop with the Triton row kernels (CUDA only here)
  liger    Liger-Kernel's `LigerFusedLinearCrossEntropyLoss(reduction="sum")`, if importable (CUDA only;
           a scalar loss, so its time includes one loss for the whole batch rather than per sequence)
Modes: `inner` (dH only: the inner loop, decoder frozen) and `train` (dH and dW: the decoder update).
Every variant is first checked against `eager` (loss and gradients); a wrong one is reported, not timed.
Peak memory on CPU counts tensor storages only, so the C++ kernel's kept workspace (its packed weight and
per-thread buffers) is not in it; `benchmarks/inner_loop.py` records each variant's whole-process peak RSS.

FLOPs: 2 * tokens * d * V per GEMM; `inner` needs 2 GEMMs (logits, dH), `train` 3 (+ dW). The chunked
variants spend one more GEMM in `train` (logits recomputed for dW); TFLOP/s below count the minimum.

    python benchmarks/bench_lm_head.py                    # CUDA: 65536 tokens, d 512, V 50258, bf16
    python benchmarks/bench_lm_head.py --device cpu       # CPU: 1024 tokens, d 256, fp32 (< 1 minute)
Writes benchmarks/results/lm_head_<device>_<date>.json with the device, versions, commit, config, raw times;
timing, environment and the result file are benchmarks/common.py's.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch
from common import DTYPES, Unavailable, environment, max_rel_error, median, synchronize, time_runs, write_result

from ltm_kernels import extension_status, lm_head_nll_chunked, lm_head_nll_cpp, lm_head_nll_triton, triton_device_ok
from ltm_kernels.lm_head_nll import default_chunk_rows
from ltm_kernels.reference import lm_head_nll_ref
from ltm_kernels.testing import PeakMemory

VARIANTS = ("eager", "chunked", "cpp", "triton", "liger")


def liger_loss():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as err:
        raise Unavailable(f"liger-kernel not importable ({type(err).__name__}: {err})") from err
    module = LigerFusedLinearCrossEntropyLoss(ignore_index=-1, reduction="sum")
    return lambda h, w, t, chunk_size=None: module(w, h.flatten(0, 1), t.flatten()).reshape(1)


def variant_fn(name: str, device: torch.device):
    if name == "eager":
        return lambda h, w, t, chunk_size=None: lm_head_nll_ref(h, w, t)
    if name == "chunked":
        return lm_head_nll_chunked
    if name == "cpp":
        available, reason = extension_status()
        if device.type != "cpu" or not available:
            raise Unavailable("the C++ LM head is a CPU kernel" if available else reason)
        return lambda h, w, t, chunk_size=None: lm_head_nll_cpp(h, w, t)
    if name == "triton":
        if device.type != "cuda" or not triton_device_ok(device):
            raise Unavailable("the Triton kernels are benchmarked on CUDA only (the interpreter is for tests)")
        return lm_head_nll_triton
    if name == "liger":
        if device.type != "cuda":
            raise Unavailable("Liger-Kernel runs on CUDA only")
        return liger_loss()
    raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")


def make_inputs(args, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(args.batch, args.tokens // args.batch, args.d, generator=g)
    weight = torch.randn(args.vocab, args.d, generator=g) / args.d**0.5  # logits of std ~1
    targets = torch.randint(0, args.vocab, hidden.shape[:2], generator=g)
    targets[:, -1] = -1  # one ignored target per sequence, as at a document's end
    return hidden.to(device, dtype), weight.to(device, dtype), targets.to(device)


def step(fn, hidden, weight, targets, mode, chunk_size):
    """One forward + backward: returns (loss, dH, dW or None)."""
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(mode == "train")
    loss = fn(h, w, targets, chunk_size=chunk_size)
    grads = torch.autograd.grad(loss.sum(), [h, w] if mode == "train" else [h])
    return loss.detach(), grads[0], grads[1] if mode == "train" else None


def peak_bytes(run, device) -> int:
    """Peak memory allocated by one run beyond what was allocated before it. On CPU that is the peak of tensor
    storages (`PeakMemory`): the C++ kernel's own workspace (the packed weight, per-thread buffers, which it
    allocates once and keeps across calls) is not a tensor and is not counted."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with PeakMemory() as mem:
        run()
    return mem.peak


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=None, help="B*N (default 65536 on CUDA, 1024 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="B (default 64 on CUDA, 2 on CPU)")
    p.add_argument("--d", type=int, default=None, help="hidden width (default 512 on CUDA, 256 on CPU)")
    p.add_argument("--vocab", type=int, default=50258)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: default_chunk_rows)")
    p.add_argument("--modes", default="inner,train")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="CPU: timed runs (default 3); CUDA: do_bench times as many as fit in 100 ms",
    )
    p.add_argument("--warmup", type=int, default=None, help="CPU: untimed runs first (default 1; CUDA: 25 ms)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    for name, on_cuda, on_cpu in (
        ("tokens", 65536, 1024),
        ("batch", 64, 2),
        ("d", 512, 256),
        ("dtype", "bf16", "fp32"),
        ("repeats", 20, 3),
        ("warmup", 3, 1),
    ):
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)
    if args.tokens % args.batch:
        p.error(f"--tokens {args.tokens} is not a multiple of --batch {args.batch}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    env = environment(device)
    hidden, weight, targets = make_inputs(args, device, dtype)
    chunk = args.chunk_size or default_chunk_rows(args.tokens, args.d, args.vocab)
    gemm_flops = 2 * args.tokens * args.d * args.vocab
    config = dict(
        tokens=args.tokens,
        batch=args.batch,
        d=args.d,
        vocab=args.vocab,
        dtype=args.dtype,
        chunk_rows=chunk,
        repeats=args.repeats,
        warmup=args.warmup,
        gemm_flops=gemm_flops,
        logits_bytes_full=args.tokens * args.vocab * dtype.itemsize,
    )
    print(
        f"LM head + CE on {env['device']['name']}: tokens {args.tokens} (B {args.batch}), d {args.d}, "
        f"V {args.vocab}, {args.dtype}, chunk {chunk} rows; full logits would be "
        f"{config['logits_bytes_full'] / 2**30:.2f} GiB"
    )
    runs = {}
    for mode in args.modes.split(","):
        rows, want = {}, None
        flops = gemm_flops * (2 if mode == "inner" else 3)
        for name in args.variants.split(","):
            row = rows.setdefault(name, {})
            try:
                fn = variant_fn(name, device)
                run = lambda fn=fn, mode=mode: step(fn, hidden, weight, targets, mode, chunk)  # noqa: E731
                got = run()
                if want is None and name == "eager":
                    want = got
                if want is not None and name not in ("eager", "liger"):  # liger: one scalar loss
                    errors = {
                        k: max_rel_error(a, b) for k, a, b in zip(("nll", "dH", "dW"), got, want) if a is not None
                    }
                    row["max_rel_error_vs_eager"] = errors
                    limit = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
                    if max(errors.values()) > limit:
                        raise Unavailable(f"WRONG: differs from eager by {errors} (limit {limit})")
                del got
                row["peak_bytes"] = peak_bytes(run, device)
                row["times_ms"] = [1e3 * t for t in time_runs(run, device, args.repeats, args.warmup)]
                row["median_ms"] = median(row["times_ms"])
                row["tflops"] = flops / row["median_ms"] / 1e9
                row["status"] = "ok"
            except Unavailable as err:
                row.update(status="unavailable" if not str(err).startswith("WRONG") else "wrong", reason=str(err))
            except torch.OutOfMemoryError as err:
                row.update(status="out of memory", reason=str(err).splitlines()[0])
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        base = rows.get("eager", {})
        for row in rows.values():
            if row.get("status") == "ok" and base.get("status") == "ok":
                row["speedup_vs_eager"] = base["median_ms"] / row["median_ms"]
                row["memory_ratio_vs_eager"] = base["peak_bytes"] / max(row["peak_bytes"], 1)
        runs[mode] = rows
        print(f"\nmode {mode} ({'dH only' if mode == 'inner' else 'dH and dW'}; {flops / 1e12:.3f} TFLOP minimum)")
        print(f"{'variant':10s} {'median ms':>10s} {'TFLOP/s':>8s} {'peak MiB':>9s} {'speedup':>8s} {'mem /':>7s}")
        for name, row in rows.items():
            if row.get("status") != "ok":
                print(f"{name:10s} {row['status']}: {row.get('reason', '')}")
                continue
            # Ratios only where eager was timed in this run.
            speedup = f"{row['speedup_vs_eager']:7.2f}x" if "speedup_vs_eager" in row else f"{'-':>8s}"
            memory = f"{row['memory_ratio_vs_eager']:6.1f}x" if "memory_ratio_vs_eager" in row else f"{'-':>7s}"
            print(
                f"{name:10s} {row['median_ms']:10.2f} {row['tflops']:8.2f} {row['peak_bytes'] / 2**20:9.1f} "
                f"{speedup} {memory}"
            )
    result = dict(benchmark="lm_head", **env, config=config, runs=runs)
    write_result(result, "lm_head", args.out)
    return result


if __name__ == "__main__":
    main()
