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
- `<out_dir>/metrics.jsonl`: one JSON line per logged step; a progress line on stderr.
- A non-finite loss, posterior or gradient stops the run before the bad update: the state of that step is
  checkpointed (so nothing good is lost) and `NonFiniteError` says what went wrong.

    torchrun --nproc_per_node 2 -m ltm.cli train --data data/train --out-dir runs/a --preset ltm-tiny
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ltm.config import LTMConfig
from ltm.data import SAMPLINGS, TokenData, WindowSampler
from ltm.model import LTMDecoder
from ltm.posterior import LOGVAR_INIT_MEAN, LOGVAR_INIT_STD, MU_INIT_STD, SCHEDULES
from ltm.tokenizer import check_encoding

CHECKPOINT_FORMAT = "ltm-train-checkpoint"
CHECKPOINT_NAME, METRICS_NAME = "ckpt.pt", "metrics.jsonl"
LATENT_MODES = ("posterior", "zero")


class NonFiniteError(RuntimeError):
    """The loss, the posterior or the gradient became nan/inf; the message names the checkpoint kept."""


@dataclass
class TrainConfig:
    data: str                                  # prepared token file (ltm.data.prepare), .bin/.json or stem
    out_dir: str                               # checkpoint, metrics.jsonl
    preset: str = "ltm-tiny"                   # LTMConfig preset ...
    model_overrides: dict = field(default_factory=dict)  # ... and overrides, e.g. {"n_layer": 2}
    seq_len: Optional[int] = None              # tokens per sequence; None: the model's max_seq_len
    batch_size: int = 8                        # sequences per process per micro-step
    grad_accum: int = 1                        # micro-steps per optimizer step
    max_steps: int = 1000                      # optimizer steps; the lr schedule ends here
    stop_at: Optional[int] = None              # stop (with a checkpoint) at this step; the schedule still spans max_steps
    lr: float = 4e-4
    min_lr: float = 4e-5
    warmup_steps: int = 1000
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1                  # matrices and embeddings; norm weights get 0
    grad_clip: float = 1.0                     # global grad-norm clip; 0 disables
    inner_steps: Optional[int] = None          # inner-loop steps T; None: the preset's t_fast
    inner_lr: float = 0.34
    inner_schedule: str = "cosine"
    latents: str = "posterior"                 # "zero": baseline plain causal LM (z = 0, cross-attention idle)
    sampling: str = "random"                   # WindowSampler: "random" offsets or shuffled "blocks"
    seed: int = 0
    ckpt_interval: int = 100                   # steps between checkpoints (and one at the end)
    log_interval: int = 10                     # steps between metrics lines / progress updates
    backend: str = "auto"
    device: str = "auto"                       # "auto": cuda when available (the local rank's GPU), else cpu
    resume: bool = True                        # continue from <out_dir>/ckpt.pt when it exists
    progress: bool = True

    def check(self):
        for name in ("batch_size", "grad_accum", "max_steps", "ckpt_interval", "log_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        if self.warmup_steps < 0 or (self.inner_steps is not None and self.inner_steps < 0):
            raise ValueError("TrainConfig.warmup_steps and inner_steps must be >= 0")
        if self.stop_at is not None and not 0 < self.stop_at <= self.max_steps:
            raise ValueError(f"TrainConfig.stop_at must be in [1, max_steps={self.max_steps}], got {self.stop_at}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"TrainConfig needs lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.inner_schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.inner_schedule must be one of {SCHEDULES}, got {self.inner_schedule!r}")
        if self.latents not in LATENT_MODES:
            raise ValueError(f"TrainConfig.latents must be one of {LATENT_MODES}, got {self.latents!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"TrainConfig.sampling must be one of {SAMPLINGS}, got {self.sampling!r}")


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to min_lr at max_steps (nanoGPT's schedule)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]      # matrices and the (tied) embedding
    no_decay = [p for p in model.parameters() if p.dim() < 2]    # RMSNorm weights
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)


def initial_latents(cfg: LTMConfig, seed: int, step: int, index, device) -> tuple:
    """(mu, logvar, noise) of the inner loop for the sequences at `index` of step `step`'s global batch, each
    drawn from its own generator: independent of batch size, rank and micro-step (docs/model.md, 'The inner loop')."""
    shape = (cfg.n_z, cfg.d_model)
    draws = []
    for i in index:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, int(i), 2]).generate_state(1)[0]))
        draws.append(torch.randn((3, *shape), generator=g))
    d = torch.stack(draws).to(device)  # (B, 3, n_z, d)
    return d[:, 0] * MU_INIT_STD, LOGVAR_INIT_MEAN + LOGVAR_INIT_STD * d[:, 1], d[:, 2]


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
    """torch.save to a temp file in the same folder, fsync, rename: the old file survives any failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path, encoding: Optional[str] = None) -> dict:
    """Read a training checkpoint with weights_only=True; refuse a truncated file or another tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path} with torch.load(weights_only=True): truncated, "
                         f"corrupted or not a tensors-only checkpoint ({type(err).__name__}: {err})") from err
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
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if device_name not in ("auto", "cuda", "cpu") and not device_name.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device_name!r}")
    ours = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        ours = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if device_name.startswith("cuda:"):
        device = torch.device(device_name)
    elif use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device, ours


def _config_for_checkpoint(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))  # plain values only (weights_only loading)


# ---------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    model: LTMDecoder
    step: int
    checkpoint: Path
    metrics: Path


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
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    model_cfg = LTMConfig.from_name(cfg.preset, **cfg.model_overrides)
    data = TokenData(cfg.data, encoding=model_cfg.encoding)
    seq_len = cfg.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
    sampler = WindowSampler(data, seq_len, cfg.batch_size, seed=cfg.seed, sampling=cfg.sampling, rank=rank,
                            world_size=world, grad_accum=cfg.grad_accum)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = LTMDecoder(model_cfg, backend=cfg.backend).to(device)
    optimizer = make_optimizer(model, cfg)
    step = 0
    if cfg.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, encoding=model_cfg.encoding)
        if ckpt["config"] != model_cfg.to_dict():
            raise ValueError(f"checkpoint {ckpt_path} holds a different model config than preset={cfg.preset!r} "
                             f"with overrides {cfg.model_overrides}: {ckpt['config']}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"])
        step = int(ckpt["step"])
        if rank == 0 and cfg.progress:
            print(f"resuming from {ckpt_path} at step {step}", file=sys.stderr)
    loss_module = _TrainLoss(model)
    if world > 1:
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    inner_steps = model_cfg.t_fast if cfg.inner_steps is None else cfg.inner_steps
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    end = cfg.stop_at or cfg.max_steps

    def save(at_step: int):
        if rank == 0:
            atomic_save({
                "format": CHECKPOINT_FORMAT, "version": 1, "step": at_step, "encoding": model_cfg.encoding,
                "config": model_cfg.to_dict(), "train_config": _config_for_checkpoint(cfg),
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "rng": _rng_state(),
                "data": {"step": at_step, "seed": cfg.seed, "sampling": cfg.sampling, "path": str(data.bin_path),
                         "world_size": world},
            }, ckpt_path)
        if world > 1:
            dist.barrier()

    t_start, tokens_seen, start_step = time.time(), 0, step
    while step < end:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        # [sum CE at the update, sum posterior nll, sum posterior kl, scored tokens, sequences]
        stats = torch.zeros(5, dtype=torch.float64, device=device)
        for micro in range(cfg.grad_accum):
            tokens, targets, index = sampler.batch(step, micro)
            tokens, targets = tokens.to(device), targets.to(device)
            with autocast():
                if cfg.latents == "zero":
                    z = torch.zeros(tokens.shape[0], model_cfg.n_z, model_cfg.d_model, device=device)
                    nll_post = kl_post = torch.zeros(tokens.shape[0], device=device)
                else:
                    mu, logvar, noise = initial_latents(model_cfg, cfg.seed, step, index, device)
                    post = model.infer_posterior(tokens, targets, steps=inner_steps, lr=cfg.inner_lr,
                                                 schedule=cfg.inner_schedule, mu=mu, logvar=logvar, noise=noise)
                    z, nll_post, kl_post = post.z.detach(), post.nll, post.kl
                    # A non-finite posterior would be refused by the next check_latent; zeroing it here lets
                    # every rank reach the collective below and stop together with a clear message.
                    if not bool(torch.isfinite(z).all()):
                        z = torch.zeros_like(z)
                        nll_post = torch.full_like(nll_post, float("nan"))
                n_scored = int((targets != -1).sum())
                sync = loss_module.no_sync() if world > 1 and micro < cfg.grad_accum - 1 else nullcontext()
                with sync:
                    ce_sum, _ = loss_module(tokens, targets, z)
                    # mean CE over the global batch: each micro-step holds 1 / (grad_accum) of it; DDP averages
                    # over ranks.
                    (ce_sum / n_scored / cfg.grad_accum).backward()
            stats += torch.tensor([ce_sum.item(), nll_post.sum().item(), kl_post.sum().item(), n_scored,
                                   tokens.shape[0]], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(stats)
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0
                     else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
        if not (bool(torch.isfinite(stats).all()) and math.isfinite(float(grad_norm))):
            optimizer.zero_grad(set_to_none=True)
            save(step)
            what = dict(zip(("ce", "posterior_nll", "posterior_kl"), stats[:3].tolist()), grad_norm=float(grad_norm))
            raise NonFiniteError(f"training became non-finite at step {step} ({what}); the update was not applied "
                                 f"and the model of step {step} is checkpointed at {ckpt_path}. Lower lr or "
                                 "inner_lr, or check the data, then resume.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += int(stats[3])

        if rank == 0 and (step % cfg.log_interval == 0 or step == end):
            ce, nll, kl, n_tok, n_seq = stats.tolist()
            elapsed = time.time() - t_start
            record = dict(step=step, loss=ce / n_tok, nelbo_per_token=(nll + kl) / n_tok,
                          posterior_nll_per_token=nll / n_tok, kl_per_seq=kl / n_seq,
                          lr=optimizer.param_groups[0]["lr"], grad_norm=float(grad_norm), tokens=tokens_seen,
                          tokens_per_s=tokens_seen / max(elapsed, 1e-9), elapsed_s=elapsed)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if cfg.progress:
                eta = elapsed / (step - start_step) * (end - step)
                print(f"step {step}/{end} | loss {record['loss']:.4f} | nelbo/tok {record['nelbo_per_token']:.4f} "
                      f"| kl/seq {record['kl_per_seq']:.1f} | lr {record['lr']:.2e} | "
                      f"{record['tokens_per_s']:,.0f} tok/s | {elapsed:.0f}s elapsed, eta {eta:.0f}s",
                      file=sys.stderr, flush=True)
        if step % cfg.ckpt_interval == 0 or step == end:
            save(step)
    return TrainResult(model=model, step=step, checkpoint=ckpt_path, metrics=metrics_path)


if __name__ == "__main__":
    from ltm.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
