"""`ltm prepare | train | eval | generate | fewshot | presets`: the LTM workflow from the command line
(`python -m ltm` is the same command).

    ltm prepare corpus/ -o data/train                      # text / folders / JSONL -> token file + metadata
    ltm train --data data/train --out-dir runs/tiny --max-steps 2000 --warmup-steps 100
    torchrun --nproc_per_node 2 -m ltm train ...           # data parallel (gloo on CPU, NCCL on GPU)
    ltm eval runs/tiny/ckpt.pt --data data/val --steps 0 4 16 64 --iw-samples 8 --out eval.json --plot curve.png
    ltm generate runs/tiny/ckpt.pt --prompt "Once upon" --max-new-tokens 100 --top-p 0.9
    ltm fewshot runs/tiny/ckpt.pt --data qa.jsonl --shots 3
    ltm presets                                            # presets, exact parameter counts, backends here
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from pathlib import Path

from ltm.config import PRESETS
from ltm.files import atomic_write_text
from ltm.latents import INNER_LOOP, SCHEDULES
from ltm.validation import COUNT, NON_NEGATIVE, SEED, STEPS, Range, check_output, resolve_device

_PROGRESS_HELP = "a progress bar on stderr when it is a terminal (--no-progress: never)"
_TRAIN_HELP = {
    "data": "prepared token data (from `ltm prepare`): the .bin, the .json or their common stem",
    "out_dir": "folder for ckpt.pt and metrics.jsonl; an existing ckpt.pt there is resumed",
    "preset": f"model preset: {', '.join(PRESETS)}",
    "model_overrides": 'JSON object of LTMConfig overrides, e.g. \'{"n_layer": 2, "window_size": 32}\'',
    "seq_len": "tokens per training sequence, at most the model's max_seq_len (default: max_seq_len)",
    "batch_size": "sequences per process per micro-step",
    "grad_accum": "micro-steps accumulated per optimizer step (global batch = batch_size x processes x grad_accum)",
    "max_steps": "optimizer steps; the learning-rate schedule ends here",
    "stop_at": "stop at this step with a checkpoint (the schedule still spans --max-steps); resume later",
    "lr": "peak decoder learning rate (published: 4e-4)",
    "min_lr": "final learning rate of the cosine decay (published: 4e-5)",
    "warmup_steps": "linear warmup steps (published: 1000)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2 (published: 0.95)",
    "weight_decay": "AdamW weight decay of matrices and embeddings (norm weights: 0)",
    "grad_clip": "global gradient-norm clip (0: off)",
    "inner_steps": "inner-loop steps T per batch (default: the preset's t_fast)",
    "inner_lr": "inner-loop learning rate (published)",
    "inner_schedule": f"inner-loop lr schedule: {', '.join(SCHEDULES)}",
    "latents": "posterior: the LTM; zero: baseline plain causal LM with the same architecture (z = 0)",
    "sampling": "random: windows at random offsets; blocks: consecutive windows, shuffled per epoch",
    "seed": "seed of data order, inner-loop noise and initial weights",
    "ckpt_interval": "steps between checkpoints (one is also written at the end)",
    "log_interval": "steps between metrics lines (and progress-bar statistics)",
    "backend": "kernels: auto, eager, cpp or triton",
    "device": "auto (cuda when available), cpu, cuda or cuda:N",
    "resume": "resume from <out-dir>/ckpt.pt when it exists (--no-resume starts over, overwriting it; the old "
    "metrics.jsonl is kept as metrics-<n>.jsonl)",
    "force": "resume even when settings differ from the checkpoint's (refused otherwise, listing the changes)",
    "progress": _PROGRESS_HELP,
}


def _json_object(text: str) -> dict:
    """--model-overrides: a JSON object (its fields are checked by LTMConfig)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"must be a JSON object, e.g. '{{\"n_layer\": 2}}': {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"must be a JSON object of LTMConfig fields, e.g. '{{\"n_layer\": 2}}', got {type(value).__name__} {text!r}"
        )
    return value


def _number(p, flag: str, allowed: Range, default, help_text: str, **kw) -> None:
    """An option parsed and range-checked by `allowed`; the range is part of its help."""
    p.add_argument(
        flag,
        type=allowed.parse,
        default=default,
        metavar=allowed.kind.__name__.upper(),
        help=f"{help_text} [{allowed.describe(none_too=False)}]",
        **kw,
    )


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from ltm.train import RANGES, TrainConfig

    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is dataclasses.MISSING else f.default
        help_text = _TRAIN_HELP[f.name] + ("" if default is None else f" (default: {default})")
        if f.name == "model_overrides":
            p.add_argument(flag, type=_json_object, default={}, help=_TRAIN_HELP[f.name])
        elif f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=_TRAIN_HELP[f.name])
        elif f.name in RANGES:
            _number(p, flag, RANGES[f.name], default, help_text)
        else:
            choices = {
                "inner_schedule": SCHEDULES,
                "latents": ("posterior", "zero"),
                "sampling": ("random", "blocks"),
                "preset": tuple(PRESETS),
            }.get(f.name)
            p.add_argument(
                flag,
                default=default,
                required=default is None and f.name in ("data", "out_dir"),
                choices=choices,
                help=help_text,
            )


def load_model(path, backend: str = "auto", device: str = "cpu"):
    """A model from a training checkpoint (ckpt.pt), a save_pretrained folder, or a published checkpoint."""
    from ltm.interop import read_checkpoint
    from ltm.model import LTMDecoder
    from ltm.tokenizer import check_vocab
    from ltm.train import CHECKPOINT_FORMAT, check_training_checkpoint, model_from_checkpoint

    path = Path(path)
    device = resolve_device(device)
    if path.is_dir():
        model = LTMDecoder.from_pretrained(path, backend=backend)
    else:
        obj = read_checkpoint(path)
        if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
            model = model_from_checkpoint(check_training_checkpoint(obj, path), backend=backend)
        else:
            model = LTMDecoder.from_published_checkpoint(obj, backend=backend)
    check_vocab(model.cfg, f"checkpoint {path}")
    return model.to(device).eval()


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="training checkpoint (ckpt.pt), save_pretrained folder, or published checkpoint")
    p.add_argument("--backend", default="auto", help="kernels: auto, eager, cpp or triton (default: auto)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    _number(p, "--seed", SEED, 0, "seed of the inner loop's initialisation and of sampling")


def _add_inner_args(p: argparse.ArgumentParser, what: str) -> None:
    _number(
        p,
        "--inner-lr",
        NON_NEGATIVE,
        INNER_LOOP.lr,
        f"inner-loop learning rate for {what} (default: "
        f"{INNER_LOOP.lr}, published; "
        "with logvar starting at -5 a short cosine loop leaves a large KL, raise it or use --inner-schedule "
        "constant/linear)",
    )
    p.add_argument(
        "--inner-schedule",
        choices=SCHEDULES,
        default=INNER_LOOP.schedule,
        help=f"inner-loop lr schedule (default: {INNER_LOOP.schedule})",
    )


def _add_progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help=_PROGRESS_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ltm",
        description="Latent Thought Models: prepare data, train, evaluate, generate, few-shot prompting.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{prepare,train,eval,generate,fewshot,presets}")

    p = sub.add_parser("prepare", help="tokenize text files / folders / JSONL into a token file + metadata")
    p.add_argument(
        "inputs",
        nargs="+",
        help="text files (one document each), folders (their .txt/.md/.jsonl files), "
        "JSONL files (one document per line)",
    )
    p.add_argument("-o", "--output", required=True, help="output stem: writes <output>.bin and <output>.json")
    p.add_argument(
        "--encoding",
        default="bytes",
        choices=("bytes", "gpt2"),
        help="tokenizer: bytes (offline, 258 ids) or gpt2 (GPT-2 BPE + BOS, 50258 ids) (default: bytes)",
    )
    p.add_argument("--jsonl-key", default="text", help="field of JSONL objects holding the text (default: text)")
    _add_progress_arg(p)

    p = sub.add_parser("train", help="train an LTM (Algorithm 1: inner loop, then decoder update)")
    _add_train_args(p)

    p = sub.add_parser("eval", help="ELBO perplexity bounds at several inner-loop lengths T")
    _add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="prepared token data (from `ltm prepare`)")
    src.add_argument("--text", nargs="+", help="text files / folders / JSONL, tokenized on the fly")
    _number(
        p,
        "--steps",
        STEPS,
        None,
        "inner-loop lengths T to evaluate, e.g. 0 4 16 64 (default: 0 and the model's t_fast)",
        nargs="+",
    )
    _number(p, "--seq-len", COUNT, None, "tokens per scored window, at most max_seq_len (default: max_seq_len)")
    _number(p, "--batch-size", COUNT, 8, "windows per batch")
    _number(p, "--iw-samples", STEPS, 0, "K of the importance-weighted bound (0: skip)")
    _number(p, "--max-blocks", COUNT, None, "score at most this many windows (default: all)")
    _add_inner_args(p, "evaluation")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG of the scaling curve here (needs matplotlib)")
    _add_progress_arg(p)

    p = sub.add_parser("generate", help="sample text, streamed to stdout")
    _add_model_args(p)
    p.add_argument("--prompt", default="", help="text to continue (default: none, unconditional)")
    _number(p, "--max-new-tokens", STEPS, 100, "tokens to generate at most")
    p.add_argument(
        "--unconditional",
        action="store_true",
        help="draw z from the prior even with a prompt (default: fit q(z | prompt) when a prompt is given)",
    )
    _number(p, "--prior-scale", NON_NEGATIVE, 1.0, "z ~ N(0, scale^2 I) when unconditional")
    _number(p, "--inner-steps", STEPS, None, "inner-loop steps on the prompt (default: t_fast)")
    _add_inner_args(p, "fitting the prompt")
    _number(p, "--temperature", NON_NEGATIVE, 1.0, "sampling temperature; 0 = greedy")
    _number(p, "--top-k", COUNT, None, "sample among the k most likely tokens")
    _number(
        p,
        "--top-p",
        Range(float, 0, 1, low_open=True),
        None,
        "sample from the smallest set holding this much probability",
    )

    p = sub.add_parser("fewshot", help="few-shot QA exact match, posterior fitted on each prompt")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="JSONL file of question/answer objects")
    _number(p, "--shots", STEPS, 3, "solved examples in each prompt (fewer than the examples)")
    p.add_argument("--question-key", default="question", help="JSONL field of the question")
    p.add_argument("--answer-key", default="answer", help="JSONL field of the answer")
    _number(p, "--inner-steps", STEPS, None, "inner-loop steps on the prompt (default: t_fast)")
    _add_inner_args(p, "fitting the prompt")
    _number(p, "--max-answer-tokens", COUNT, 16, "tokens decoded per answer at most")
    _number(p, "--limit", COUNT, None, "score only the first N questions (default: all)")
    p.add_argument("--out", default=None, help="write per-question records and the accuracy as JSON here")
    _add_progress_arg(p)

    sub.add_parser("presets", help="the model presets with their exact parameter counts, and which backends run here")
    return parser


def print_presets() -> None:
    import torch

    from ltm import PRESETS, LTMConfig, LTMDecoder, backend_status

    print(f"{'preset':<10} {'layers':>6} {'d':>5} {'n_z':>4} {'T_fast':>6} {'vocab':>6} {'params':>12}")
    for name in PRESETS:
        cfg = LTMConfig.from_name(name)
        with torch.device("meta"):  # counts only: no memory, no init
            n_params = LTMDecoder(cfg, backend="eager").n_params
        print(
            f"{name:<10} {cfg.n_layer:>6} {cfg.d_model:>5} {cfg.n_z:>4} {cfg.t_fast:>6} {cfg.vocab_size:>6} "
            f"{n_params:>12,} ({n_params / 1e6:.2f}M)"
        )
    print()
    for backend, (ok, reason) in backend_status().items():
        print(f"backend {backend:<7} {'available' if ok else 'unavailable'}: {reason}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, OSError, RuntimeError) as err:  # user errors: the message, not a traceback
        print(f"ltm {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside the training loop, which checkpoints and returns instead
        print(f"ltm {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def _run(args) -> int:
    if args.command == "presets":
        print_presets()
    elif args.command == "prepare":
        from ltm.data import prepare

        meta = prepare(
            args.inputs, args.output, encoding=args.encoding, jsonl_key=args.jsonl_key, progress=args.progress
        )
        print(
            f"wrote {meta['n_tokens']:,} tokens of {meta['n_documents']:,} documents ({meta['encoding']}, "
            f"{meta['dtype']}) to {Path(args.output).with_suffix('.bin')} + .json"
        )
    elif args.command == "train":
        from ltm.train import TrainConfig, train

        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
        result = train(TrainConfig(**values))
        if result.interrupted:
            print(
                f"stopped by {result.interrupted} at step {result.step}; checkpoint {result.checkpoint} (run the "
                f"same command to resume), metrics {result.metrics}"
            )
            return 128 + int(getattr(signal, result.interrupted, signal.SIGINT))
        print(f"trained to step {result.step}; checkpoint {result.checkpoint}, metrics {result.metrics}")
    elif args.command == "eval":
        from ltm.data import TokenData, data_paths, encode_texts
        from ltm.evaluate import elbo_eval, format_table, plot_scaling, write_results

        inputs = [("checkpoint", args.checkpoint), *(("--text", t) for t in args.text or ())]
        if args.data:
            inputs += [("--data", p) for p in data_paths(args.data)]
        for name in ("out", "plot"):
            if getattr(args, name):
                check_output(f"--{name}", getattr(args, name), inputs)
        if args.out and args.plot:
            check_output("--plot", args.plot, [("--out", args.out)])
        model = load_model(args.checkpoint, args.backend, args.device)
        data = (
            TokenData(args.data, encoding=model.cfg.encoding)
            if args.data
            else encode_texts(args.text, model.cfg.encoding)
        )
        steps = args.steps if args.steps is not None else sorted({0, model.cfg.t_fast})
        results = elbo_eval(
            model,
            data,
            steps=steps,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            lr=args.inner_lr,
            schedule=args.inner_schedule,
            iw_samples=args.iw_samples,
            max_blocks=args.max_blocks,
            seed=args.seed,
            progress=args.progress,
        )
        print(format_table(results))
        if args.out:
            write_results(
                results,
                args.out,
                meta=dict(
                    checkpoint=str(args.checkpoint),
                    data=args.data or args.text,
                    inner_lr=args.inner_lr,
                    inner_schedule=args.inner_schedule,
                ),
            )
            print(f"wrote {args.out}")
        if args.plot:
            print(
                f"wrote {args.plot}"
                if plot_scaling(results, args.plot)
                else "--plot skipped: matplotlib is not installed (pip install matplotlib)"
            )
    elif args.command == "generate":
        from ltm.generate import generate_text

        model = load_model(args.checkpoint, args.backend, args.device)
        generate_text(
            model,
            args.prompt,
            args.max_new_tokens,
            conditional=not args.unconditional,
            prior_scale=args.prior_scale,
            steps=args.inner_steps,
            lr=args.inner_lr,
            schedule=args.inner_schedule,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stream=sys.stdout,
        )
        print()
    elif args.command == "fewshot":
        from ltm.fewshot import fewshot_eval, read_qa

        if args.out:
            check_output("--out", args.out, [("checkpoint", args.checkpoint), ("--data", args.data)])
        model = load_model(args.checkpoint, args.backend, args.device)
        examples = read_qa(args.data, args.question_key, args.answer_key)
        result = fewshot_eval(
            model,
            examples,
            shots=args.shots,
            steps=args.inner_steps,
            lr=args.inner_lr,
            schedule=args.inner_schedule,
            max_answer_tokens=args.max_answer_tokens,
            seed=args.seed,
            limit=args.limit,
            progress=args.progress,
        )
        print(f"exact match: {result['accuracy']:.4f} ({result['n']} questions, {result['shots']} shots)")
        if args.out:
            atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
            print(f"wrote {args.out}")
    return 0
