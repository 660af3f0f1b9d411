"""Training (Algorithm 1 of Kong et al. 2025; docs/model.md, 'Training'): per batch, fit q(z | x) with the inner loop
(decoder frozen), detach z, then one AdamW step of the decoder on mean CE(x | z).

- AdamW lr 4e-4, betas (0.9, 0.95), weight decay 0.1 on matrices and embeddings, 0 on norm weights; linear
  warmup, cosine decay to 4e-5 at `max_steps`; global grad-norm clip 1.0; bf16 autocast on GPU only.
- Gradient accumulation over `grad_accum` micro-batches; data parallel over `torchrun` processes (DDP; NCCL
  on GPU, gloo on CPU). Batches and the inner loop's initial (mu, logvar, noise) are pure functions of
  (seed, step, index of the sequence in the global batch), so W processes compute what one process computes
  on the W times larger batch, and a resumed run continues with exactly the numbers of an uninterrupted one.
- Checkpoints (`<out_dir>/ckpt.pt`, written to a temp file and renamed; readable with
  `torch.load(weights_only=True)`): model, optimizer, step, RNG states, data position, configs, encoding.
- `<out_dir>/metrics.jsonl`: one JSON line per logged step; a progress bar on stderr (a terminal only).
- A non-finite loss, posterior or gradient stops the run before the bad update: the state of that step is
  checkpointed (so nothing good is lost) and `NonFiniteError` says what went wrong.
- The run directory belongs to one run: an exclusive lock (`<out_dir>/.lock`) refuses a second one. Resuming
  with other settings than the checkpoint's is refused unless `force`; a fresh start (`resume=False`, or no
  checkpoint yet) moves an old metrics.jsonl aside to metrics-<n>.jsonl; a resumed run drops the metrics
  lines past its checkpoint, so no step is ever logged twice; temporary files of a killed save are removed.
- SIGINT / SIGTERM: the step in progress completes, a checkpoint is written, and `train` returns with
  `TrainResult.interrupted` set (the CLI exits with 128 + the signal number); resuming continues exactly.
  A second signal stops at once, without a checkpoint.

    torchrun --nproc_per_node 2 -m ltm train --data data/train --out-dir runs/a --preset ltm-tiny
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ltm.config import LTMConfig
from ltm.data import SAMPLINGS, TokenData, WindowSampler
from ltm.files import DirectoryLock, atomic_open, atomic_write_text, remove_stale_temps
from ltm.interop import read_checkpoint
from ltm.latents import INNER_LOOP, SCHEDULES, NonFiniteError, seeded_latents
from ltm.model import LTMDecoder
from ltm.posterior import infer_posterior
from ltm.progress import note, progress_bar
from ltm.tokenizer import check_encoding, check_vocab
from ltm.validation import COUNT, NON_NEGATIVE, POSITIVE, SEED, STEPS, Range, check_choice, resolve_device

CHECKPOINT_FORMAT = "ltm-train-checkpoint"
CHECKPOINT_NAME, METRICS_NAME = "ckpt.pt", "metrics.jsonl"
LATENT_MODES = ("posterior", "zero")
__all__ = ["NonFiniteError", "TrainConfig", "TrainResult", "train"]  # NonFiniteError: ltm.latents's


@dataclass
class TrainConfig:
    data: str  # prepared token file (ltm.data.prepare), .bin/.json or stem
    out_dir: str  # checkpoint, metrics.jsonl
    preset: str = "ltm-tiny"  # LTMConfig preset ...
    model_overrides: dict = field(default_factory=dict)  # ... and overrides, e.g. {"n_layer": 2}
    seq_len: int | None = None  # tokens per sequence; None: the model's max_seq_len
    batch_size: int = 8  # sequences per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 1000  # optimizer steps; the lr schedule ends here
    stop_at: int | None = None  # stop (with a checkpoint) at this step; the schedule still spans max_steps
    lr: float = 4e-4
    min_lr: float = 4e-5
    warmup_steps: int = 1000
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1  # matrices and embeddings; norm weights get 0
    grad_clip: float = 1.0  # global grad-norm clip; 0 disables
    inner_steps: int | None = None  # inner-loop steps T; None: the preset's t_fast
    inner_lr: float = INNER_LOOP.lr
    inner_schedule: str = INNER_LOOP.schedule
    latents: str = "posterior"  # "zero": baseline plain causal LM (z = 0, cross-attention idle)
    sampling: str = "random"  # WindowSampler: "random" offsets or shuffled "blocks"
    seed: int = 0
    ckpt_interval: int = 100  # steps between checkpoints (and one at the end)
    log_interval: int = 10  # steps between metrics lines / progress updates
    backend: str = "auto"
    device: str = "auto"  # "auto": cuda when available (the local rank's GPU), else cpu
    resume: bool = True  # continue from <out_dir>/ckpt.pt when it exists
    force: bool = False  # resume even if the settings differ from the checkpoint's
    progress: bool = True

    def check(self):
        for name, allowed in RANGES.items():
            allowed.check(f"TrainConfig.{name}", getattr(self, name))
        if self.stop_at is not None and self.stop_at > self.max_steps:
            raise ValueError(f"TrainConfig.stop_at must be in [1, max_steps={self.max_steps}], got {self.stop_at}")
        if self.min_lr > self.lr:
            raise ValueError(f"TrainConfig.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        for name, choices in (("inner_schedule", SCHEDULES), ("latents", LATENT_MODES), ("sampling", SAMPLINGS)):
            check_choice(f"TrainConfig.{name}", getattr(self, name), choices)
        if not isinstance(self.model_overrides, dict):
            raise ValueError(
                f"TrainConfig.model_overrides must be a dict of LTMConfig fields, got "
                f"{type(self.model_overrides).__name__}"
            )


_BETA = Range(float, 0, 1, high_open=True)
# The range of every number of TrainConfig (the CLI parses its options with the same ranges).
RANGES = dict(
    seq_len=Range(int, 1, optional=True),
    batch_size=COUNT,
    grad_accum=COUNT,
    max_steps=COUNT,
    stop_at=Range(int, 1, optional=True),
    lr=POSITIVE,
    min_lr=NON_NEGATIVE,
    warmup_steps=STEPS,
    beta1=_BETA,
    beta2=_BETA,
    weight_decay=NON_NEGATIVE,
    grad_clip=NON_NEGATIVE,
    inner_steps=Range(int, 0, optional=True),
    inner_lr=NON_NEGATIVE,
    seed=SEED,
    ckpt_interval=COUNT,
    log_interval=COUNT,
)
# Settings a resumed run may change: they decide when and where it runs, not what it computes.
RESUMABLE_CHANGES = ("stop_at", "ckpt_interval", "log_interval", "backend", "device", "resume", "force", "progress")


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to min_lr at max_steps (nanoGPT's schedule)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and the (tied) embedding
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # RMSNorm weights
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        foreach=False,
    )


def initial_latents(cfg: LTMConfig, seed: int, step: int, index, device) -> tuple:
    """(mu, logvar, noise) of the inner loop for the sequences at `index` of step `step`'s global batch, each
    drawn from its own generator: independent of batch size, rank and micro-step (docs/model.md, 'The inner loop')."""
    return seeded_latents(cfg, [(seed, step, int(i), 2) for i in index], device)


class _TrainLoss(nn.Module):
    """The decoder update's loss as a module, so DDP sees a forward (and syncs gradients on backward)."""

    def __init__(self, model: LTMDecoder):
        super().__init__()
        self.model = model

    def forward(self, tokens, targets, z):
        nll = self.model.sequence_nll(tokens, targets, z)
        return nll.sum(), nll


# ---------------------------------------------------------------- checkpoints
def atomic_save(obj, path) -> None:
    """torch.save through ltm.files.atomic_open: the old file survives any failure."""
    with atomic_open(path) as f:
        torch.save(obj, f)


def load_checkpoint(path, encoding: str | None = None) -> dict:
    """Read a training checkpoint (ltm.interop.read_checkpoint: weights_only=True); refuse a truncated file
    or another tokenizer."""
    return check_training_checkpoint(read_checkpoint(path), path, encoding)


def check_training_checkpoint(ckpt, path, encoding: str | None = None) -> dict:
    """`ckpt` (read from `path`) if it is an ltm training checkpoint, made with `encoding` when given."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an ltm training checkpoint (format {CHECKPOINT_FORMAT!r})")
    if encoding is not None:
        check_encoding(ckpt["encoding"], encoding, f"checkpoint {path}")
    return ckpt


def model_from_checkpoint(ckpt: dict, backend: str = "auto", device="cpu") -> LTMDecoder:
    model = LTMDecoder(LTMConfig.from_dict(ckpt["config"]), backend=backend)
    model.load_state_dict(ckpt["model"])
    return model.to(device)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack([s for s in torch.cuda.get_rng_state_all()])
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ---------------------------------------------------------------- distributed
def _setup_distributed(device_name: str):
    """(rank, world_size, device, we_initialised): from torchrun's env, or an already initialised group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    ours = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        ours = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device, ours


def _all_agree(ok: bool, world: int, device: torch.device) -> bool:
    """Whether every rank is `ok` (a failure on one rank must stop them all, not leave them waiting)."""
    if world == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _config_for_checkpoint(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))  # plain values only (weights_only loading)


# ---------------------------------------------------------------- run directory
def _changed_settings(ckpt: dict, cfg: TrainConfig, data: TokenData, world: int) -> list[str]:
    """What differs between the checkpoint's run and this one, among the settings that decide the result
    (the model config is compared on its own, so preset / model_overrides are left to it)."""
    saved, now = ckpt.get("train_config", {}), _config_for_checkpoint(cfg)
    changes = []
    for name, value in now.items():
        if name in RESUMABLE_CHANGES or name in ("preset", "model_overrides", "data") or name not in saved:
            continue
        if saved[name] != value:
            changes.append(f"{name} {saved[name]!r} -> {value!r}")
    saved_data = Path(ckpt.get("data", {}).get("path", data.bin_path))
    same = (
        os.path.samefile(saved_data, data.bin_path)
        if saved_data.exists()
        else saved_data.resolve() == data.bin_path.resolve()
    )
    if not same:
        changes.append(f"data {str(saved_data)!r} -> {str(data.bin_path)!r}")
    saved_world = ckpt.get("data", {}).get("world_size", world)
    if saved_world != world:
        changes.append(f"processes {saved_world} -> {world} (the global batch and data order change)")
    return changes


def _rotate_metrics(path: Path) -> Path | None:
    """Move an old metrics file aside (metrics-<n>.jsonl, n the next free number) so a fresh run starts its own."""
    if not path.exists():
        return None
    n = 1
    while path.with_name(f"{path.stem}-{n}{path.suffix}").exists():
        n += 1
    kept = path.with_name(f"{path.stem}-{n}{path.suffix}")
    os.replace(path, kept)
    return kept


def _truncate_metrics(path: Path, step: int) -> int:
    """Drop the lines logged after the checkpoint of `step` (the resumed run logs those steps again) and a
    partial last line; returns how many were dropped."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line)
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in keep))
    return len(lines) - len(keep)


class _StopSignals:
    """SIGINT / SIGTERM set `signum` (the loop checkpoints and stops at the next step boundary); a second one
    raises KeyboardInterrupt at once. Handlers are installed only in the main thread, and restored after."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, say):
        self.signum, self._say, self._previous = None, say, {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            self.restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopped without a checkpoint")
        self.signum = signum
        self._say(
            f"{signal.Signals(signum).name} received: stopping after this step with a checkpoint "
            "(send it again to stop at once, without one)"
        )

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self.restore()


# ---------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    model: LTMDecoder
    step: int
    checkpoint: Path
    metrics: Path
    interrupted: str | None = None  # "SIGINT" / "SIGTERM" when a signal stopped the run (checkpointed)


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; see the module docstring."""
    cfg.check()
    rank, world, device, own_group = _setup_distributed(cfg.device)
    try:
        return _train(cfg, rank, world, device)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> TrainResult:
    out_dir = Path(cfg.out_dir)
    ckpt_path, metrics_path = out_dir / CHECKPOINT_NAME, out_dir / METRICS_NAME
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a folder")
    model_cfg = LTMConfig.from_name(cfg.preset, **cfg.model_overrides)
    check_vocab(model_cfg, f"the model (preset={cfg.preset!r}, model_overrides={cfg.model_overrides})")
    data = TokenData(cfg.data, encoding=model_cfg.encoding)
    for output in (ckpt_path, metrics_path):
        if any(output.exists() and os.path.samefile(output, p) for p in (data.bin_path, data.meta_path)):
            raise ValueError(f"data {cfg.data} is the run's own {output}: refusing to write over an input")
    seq_len = model_cfg.max_seq_len if cfg.seq_len is None else cfg.seq_len
    if seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len must be in [1, max_seq_len={model_cfg.max_seq_len}], got {seq_len}")
    sampler = WindowSampler(
        data,
        seq_len,
        cfg.batch_size,
        seed=cfg.seed,
        sampling=cfg.sampling,
        rank=rank,
        world_size=world,
        grad_accum=cfg.grad_accum,
    )
    lock, lock_error = DirectoryLock(out_dir, "ltm train"), None
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire()
        except RuntimeError as err:
            lock_error = err
    if not _all_agree(lock_error is None, world, device):
        raise lock_error or RuntimeError(f"rank 0 could not lock {out_dir}; see its error")
    try:
        with _StopSignals(lambda msg: note(f"ltm train: {msg}")) as stop:
            return _train_locked(cfg, rank, world, device, model_cfg, data, sampler, stop)
    finally:
        lock.release()


def _train_locked(cfg, rank, world, device, model_cfg, data, sampler, stop) -> TrainResult:
    out_dir = Path(cfg.out_dir)
    ckpt_path, metrics_path = out_dir / CHECKPOINT_NAME, out_dir / METRICS_NAME

    def say(msg):
        if rank == 0 and cfg.progress:
            note(msg)

    if rank == 0:
        for stale in remove_stale_temps(out_dir, CHECKPOINT_NAME) + remove_stale_temps(out_dir, METRICS_NAME):
            say(f"removed {stale}, left by a save that was interrupted")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = LTMDecoder(model_cfg, backend=cfg.backend).to(device)
    optimizer = make_optimizer(model, cfg)
    step = tokens_total = 0
    if cfg.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, encoding=model_cfg.encoding)
        if ckpt["config"] != model_cfg.to_dict():
            raise ValueError(
                f"checkpoint {ckpt_path} holds a different model config than preset={cfg.preset!r} "
                f"with overrides {cfg.model_overrides}: {ckpt['config']}"
            )
        changes = _changed_settings(ckpt, cfg, data, world)
        if changes and not cfg.force:
            raise ValueError(
                f"{ckpt_path} was trained with other settings: {'; '.join(changes)}. Resume with "
                "the same ones, start over with --no-resume (resume=False), use another --out-dir, "
                "or pass --force (force=True) to continue with the new ones"
            )
        if changes:
            say(f"resuming with changed settings (force): {'; '.join(changes)}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"])
        step, tokens_total = int(ckpt["step"]), int(ckpt.get("tokens", 0))
        if rank == 0 and _truncate_metrics(metrics_path, step):
            say(f"dropped the lines of {metrics_path} logged after step {step} (they are recomputed)")
        say(f"resuming from {ckpt_path} at step {step}")
    elif rank == 0:
        kept = _rotate_metrics(metrics_path)
        if kept is not None:
            say(f"starting a new run in {out_dir}: the previous metrics are kept as {kept}")
    loss_module = _TrainLoss(model)
    if world > 1:
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    inner_steps = model_cfg.t_fast if cfg.inner_steps is None else cfg.inner_steps
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    end = cfg.stop_at or cfg.max_steps

    def save(at_step: int):
        if rank == 0:
            atomic_save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "version": 1,
                    "step": at_step,
                    "encoding": model_cfg.encoding,
                    "config": model_cfg.to_dict(),
                    "train_config": _config_for_checkpoint(cfg),
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizer": optimizer.state_dict(),
                    "rng": _rng_state(),
                    "tokens": tokens_total,
                    "data": {
                        "step": at_step,
                        "seed": cfg.seed,
                        "sampling": cfg.sampling,
                        "path": str(data.bin_path),
                        "world_size": world,
                    },
                },
                ckpt_path,
            )
        if world > 1:
            dist.barrier()

    t_start, tokens_seen = time.time(), 0
    with progress_bar(rank == 0 and cfg.progress, total=end, initial=step, desc="train", unit=" step") as bar:
        while step < end:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg)
            # [sum CE at the update, sum posterior nll, sum posterior kl, scored tokens, sequences, stop requested]
            stats = torch.zeros(6, dtype=torch.float64, device=device)
            for micro in range(cfg.grad_accum):
                tokens, targets, index = sampler.batch(step, micro)
                tokens, targets = tokens.to(device), targets.to(device)
                with autocast():
                    if cfg.latents == "zero":
                        z = torch.zeros(tokens.shape[0], model_cfg.n_z, model_cfg.d_model, device=device)
                        kl_post, posterior = torch.zeros(tokens.shape[0], device=device), "none"
                    else:
                        mu, logvar, noise = initial_latents(model_cfg, cfg.seed, step, index, device)
                        # check_finite=False: a non-finite posterior is handled below, together on every rank.
                        # final_nll=False: the posterior's nll at z is the CE of the decoder update below (the
                        # same z, weights and autocast), so that forward runs once, there.
                        post = infer_posterior(
                            model,
                            tokens,
                            targets,
                            steps=inner_steps,
                            lr=cfg.inner_lr,
                            schedule=cfg.inner_schedule,
                            mu=mu,
                            logvar=logvar,
                            noise=noise,
                            check_finite=False,
                            final_nll=False,
                        )
                        z, kl_post, posterior = post.z.detach(), post.kl, "fitted"
                        # A non-finite posterior would be refused by the next check_latent; zeroing it here lets
                        # every rank reach the collective below and stop together with a clear message.
                        if not bool(torch.isfinite(z).all()):
                            z, posterior = torch.zeros_like(z), "diverged"
                    n_scored = int((targets != -1).sum())
                    sync = loss_module.no_sync() if world > 1 and micro < cfg.grad_accum - 1 else nullcontext()
                    with sync:
                        ce_sum, _ = loss_module(tokens, targets, z)
                        # mean CE over the global batch: each micro-step holds 1 / (grad_accum) of it; DDP averages
                        # over ranks.
                        (ce_sum / n_scored / cfg.grad_accum).backward()
                ce = ce_sum.item()
                nll_post = {"none": 0.0, "fitted": ce, "diverged": math.nan}[posterior]
                stats[:5] += torch.tensor(
                    [ce, nll_post, kl_post.sum().item(), n_scored, tokens.shape[0]],
                    dtype=torch.float64,
                    device=device,
                )
            stats[5] = float(stop.signum is not None)  # reduced with the stats: every rank stops at the same step
            if world > 1:
                dist.all_reduce(stats)
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                if cfg.grad_clip > 0
                else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
            )
            if not (bool(torch.isfinite(stats).all()) and math.isfinite(float(grad_norm))):
                optimizer.zero_grad(set_to_none=True)
                save(step)
                what = dict(
                    zip(("ce", "posterior_nll", "posterior_kl"), stats[:3].tolist()), grad_norm=float(grad_norm)
                )
                raise NonFiniteError(
                    f"training became non-finite at step {step} ({what}); the update was not applied "
                    f"and the model of step {step} is checkpointed at {ckpt_path}. Lower lr or "
                    "inner_lr, or check the data, then resume."
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += int(stats[3])
            tokens_total += int(stats[3])
            stopping = bool(stats[5] > 0)
            bar.update(1)

            if rank == 0 and (step % cfg.log_interval == 0 or step == end or stopping):
                ce, nll, kl, n_tok, n_seq, _ = stats.tolist()
                elapsed = time.time() - t_start
                record = dict(
                    step=step,
                    loss=ce / n_tok,
                    nelbo_per_token=(nll + kl) / n_tok,
                    posterior_nll_per_token=nll / n_tok,
                    kl_per_seq=kl / n_seq,
                    lr=optimizer.param_groups[0]["lr"],
                    grad_norm=float(grad_norm),
                    tokens=tokens_total,
                    tokens_per_s=tokens_seen / max(elapsed, 1e-9),
                    elapsed_s=elapsed,
                )
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    nelbo_tok=f"{record['nelbo_per_token']:.4f}",
                    kl_seq=f"{record['kl_per_seq']:.1f}",
                    lr=f"{record['lr']:.2e}",
                    tok_s=f"{record['tokens_per_s']:,.0f}",
                    refresh=False,
                )
            if step % cfg.ckpt_interval == 0 or step == end or stopping:
                save(step)
            if stopping and step < end:
                name = signal.Signals(stop.signum).name if stop.signum is not None else "a signal on another rank"
                say(f"stopped by {name} at step {step}; checkpoint {ckpt_path}; run the same command to resume")
                return TrainResult(model=model, step=step, checkpoint=ckpt_path, metrics=metrics_path, interrupted=name)
        return TrainResult(model=model, step=step, checkpoint=ckpt_path, metrics=metrics_path)
