"""The training loop: shards and a model in, checkpoints and metrics out. Read it top to bottom.

    python -m amodal.train RECIPE [--run-dir DIR] [--set key=value ...]

trains in the current process group (alone, or one process per rank under torchrun / srun /
submitit) and resumes when the run folder already holds a checkpoint. The run folder gets
config.json (the resolved config), log.txt, metrics.jsonl (one JSON object per event),
checkpoints/ and, when tracking, wandb/.

The contracts it keeps (docs/design.md §3):
- Randomness is a function of (seed, step) or (seed, epoch, index): the sampler picks the global
  batch of step k from (seed, k), augmentation from (seed, epoch, index), and the torch generator is
  re-seeded from (seed, step, rank) before every step. A checkpoint needs no RNG state, and a run
  resumed at step k on any number of ranks sees the same samples in the same global batches; on the
  same number of ranks and on CPU it ends with bitwise the same weights.
- USR2 and SIGTERM only set a flag. After the backward pass of every step the ranks agree with one
  all_reduce (MAX) on [stop requested, loss not finite], so all stop after the same step; rank 0
  saves, "interrupted at step k" is printed, train() returns interrupted=True and the command line
  exits with EXIT_INTERRUPTED (75).
- A non-finite loss (or gradient) stops training before the optimizer step, with an error naming the
  step: weights never become non-finite, so no checkpoint ever holds them.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from amodal import checkpoint as ckpt
from amodal.config import Config, ConfigError, load_config
from amodal.distributed import DistInfo, barrier, cleanup, init_distributed
from amodal.fileio import write_text_atomic
from amodal.labels import swap_logits

EXIT_INTERRUPTED = 75  # the job layer requeues on this status (amodal/jobs.py)


def _process_start_time() -> float:
    """Wall-clock time at which this process started (Linux /proc), else the time of this import."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


PROCESS_START = _process_start_time()


@dataclass
class TrainResult:
    step: int  # optimizer steps done
    interrupted: bool  # stopped by USR2/SIGTERM after saving
    best_miou: float | None
    last_checkpoint: str | None
    signals: list[str] = field(default_factory=list)  # names of the signals this rank received
    weights_sha256: str | None = None  # this rank's final weights (set when finished): DDP ranks agree


def weights_sha256(model: nn.Module) -> str:
    """A digest of the model's parameters (names, dtypes, shapes, bytes). Buffers are left out: after the
    last step each DDP rank holds the BatchNorm running statistics of its own share of the batch (DDP
    copies rank 0's at the start of every forward pass), and rank 0's are the ones saved."""
    h = hashlib.sha256()
    for name, t in model.named_parameters():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TrainingError(RuntimeError):
    pass


class NonFiniteLossError(TrainingError):
    pass


# --------------------------------------------------------------------------------------------------
# Signals: the handler only records the signal; the loop looks at the record at step boundaries.

_received: list[int] = []
_HANDLED = (signal.SIGUSR2, signal.SIGTERM)


def _on_signal(signum, _frame) -> None:
    _received.append(signum)  # nothing else: no I/O, no locks, no collectives in a handler


def install_signal_handlers() -> dict:
    """Make USR2 and SIGTERM set the stop flag (cleared here); returns the previous handlers."""
    _received.clear()
    previous = {}
    for sig in _HANDLED:
        previous[sig] = signal.signal(sig, _on_signal)
    return previous


def restore_signal_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def stop_requested() -> bool:
    return bool(_received)


# --------------------------------------------------------------------------------------------------
# Pieces of the loop


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """lr factor of optimizer step s (0-based): linear warm-up, then cosine down to min_ratio at the end.
    A closure, not an object: LambdaLR would store an object's fields in the checkpoint and bring an
    old step count back on resume."""

    def factor(s: int) -> float:
        if warmup > 0 and s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, max(0.0, (s - warmup) / max(1, total - warmup)))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_optimizer(model: nn.Module, cfg, fused: bool) -> torch.optim.AdamW:
    # No weight decay on biases and normalisation weights (1-d tensors), as usual for AdamW.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a grad scaler is needed)."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16, False
        return None, False
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.precision = 'fp16' needs a GPU (use bf16 or fp32 on the CPU)")
        return torch.float16, True
    raise ConfigError(f"train.precision: {precision!r} is not one of auto, fp32, bf16, fp16")


class EMA:
    """Exponential moving average of the weights (and a copy of the buffers), kept in its own module
    so that validation can run it as is."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        ours, theirs = self.module.state_dict(), model.state_dict()
        self._float = [(ours[k], theirs[k]) for k in ours if ours[k].is_floating_point()]
        self._other = [(ours[k], theirs[k]) for k in ours if not ours[k].is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        if self._float:
            mine, live = zip(*self._float)
            torch._foreach_lerp_(list(mine), list(live), 1.0 - self.decay)
        for mine, live in self._other:
            mine.copy_(live)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


def per_rank_batch(global_batch: int, world: int) -> int:
    """The recipe fixes the global batch; each of the `world` ranks takes an equal share of it."""
    if global_batch < 1 or global_batch % world:
        raise ConfigError(f"train.global_batch = {global_batch} is not divisible by the number of "
                          f"processes ({world}); the per-rank batch is global_batch / world size")
    return global_batch // world


def cpu_threads(num_workers: int) -> int | None:
    """Intra-op threads for training on the CPU: the CPUs this process may use, shared among the ranks
    of this node, less one per loader worker (workers that compete with the math threads for cores
    slow both down a lot). None when the user chose with OMP_NUM_THREADS."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or 1)
    return max(1, cpus // max(1, local_ranks) - num_workers)


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype, channels_last: bool,
             tta_flip: bool) -> dict:
    """Leaderboard mIoU over the loader (each rank its share), combined over ranks with one all_reduce."""
    from amodal.metrics import MIoUAccumulator, predict_labels

    was_training = model.training
    model.eval()
    acc = MIoUAccumulator(device)
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images).float()
            if tta_flip:
                # The flipped image's logits, flipped back, with the hands swapped (left <-> right).
                logits = logits + swap_logits(model(images.flip(-1)).float().flip(-1))
        front = batch.get("front")
        acc.update(predict_labels(logits), batch["target"].to(device),
                   front.to(device) if front is not None else None)
    acc.all_reduce()
    model.train(was_training)
    return acc.compute()


class RunLog:
    """log.txt, metrics.jsonl and the terminal, written by rank 0 only. A progress bar on a terminal,
    plain lines elsewhere (Slurm logs)."""

    def __init__(self, run_dir: Path, main: bool):
        self.main = main
        self.bar = None
        if main:
            self._log = open(run_dir / "log.txt", "a", buffering=1)
            self._metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)

    def info(self, message: str, echo: bool = True) -> None:
        if not self.main:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        self._log.write(line + "\n")
        if not echo:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def event(self, kind: str, **fields) -> None:
        if self.main:
            self._metrics.write(json.dumps({"event": kind, "time": round(time.time(), 3), **fields}) + "\n")

    def close(self) -> None:
        if self.main:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            self._log.close()
            self._metrics.close()


def _format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _all_finite(tensors) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


# --------------------------------------------------------------------------------------------------
# The loop


def train(cfg: Config, run_dir: str | Path, handle_signals: bool = True) -> TrainResult:
    """Train (or resume) `cfg` in `run_dir` in this process group; see the module note."""
    run_dir = Path(run_dir)
    previous = None
    if handle_signals and threading.current_thread() is threading.main_thread():
        previous = install_signal_handlers()
    owns_group = not dist.is_initialized()
    info = init_distributed(cfg.train.device)
    try:
        return _train(cfg, run_dir, info)
    finally:
        if previous is not None:
            restore_signal_handlers(previous)
        if owns_group:
            cleanup()


def _train(cfg: Config, run_dir: Path, info: DistInfo) -> TrainResult:
    from amodal.data.dataset import ShardDataset
    from amodal.data.sampler import build_eval_loader, build_train_loader
    from amodal.data.shards import ensure_synthetic
    from amodal.losses import build_loss
    from amodal.models import build_model
    from amodal.tracking import start_tracking

    rank, world, device = info.rank, info.world_size, info.device
    rank0 = rank == 0
    t = cfg.train
    if t.steps < 1:
        raise ConfigError(f"train.steps must be >= 1, got {t.steps}")
    per_rank = per_rank_batch(t.global_batch, world)
    amp_dtype, use_scaler = resolve_precision(t.precision, device)
    cuda = device.type == "cuda"
    channels_last = t.channels_last and cuda  # a layout for tensor cores; nothing to gain on the CPU
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)
        threads = cpu_threads(cfg.data.num_workers)
        if threads is not None:
            torch.set_num_threads(threads)

    # Run folder and data: rank 0 makes the synthetic shards when the recipe asks for them.
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        ensure_synthetic(cfg.data)
    barrier()
    log = RunLog(run_dir, rank0)
    tracker = None
    loader = None
    try:
        train_ds = ShardDataset(cfg.data.root, cfg.data.train_splits, cfg.data.input_size,
                                augment=cfg.augment, seed=t.seed)
        if not train_ds.has_labels:
            raise ConfigError(f"data.train_splits = {cfg.data.train_splits}: no labels in {cfg.data.root}")
        val_ds = None
        if t.val_every > 0:
            val_ds = ShardDataset(cfg.data.root, cfg.data.val_split, cfg.data.input_size, augment=None)
            if not val_ds.has_labels:
                raise ConfigError(f"data.val_split = {cfg.data.val_split!r} has no labels in {cfg.data.root}")

        # Resume: the newest checkpoint that loads, if it was made on the same data and global batch.
        found = ckpt.load_latest(run_dir)
        state = None
        if found is not None:
            resume_path, state = found
            ckpt.check_compatible(
                state, fingerprint=train_ds.fingerprint, global_batch=t.global_batch, source=str(resume_path),
                allow_mismatch=cfg.checkpoint.allow_mismatch,
                extra={"data.train_splits": (state.get("train_splits", list(cfg.data.train_splits)),
                                             list(cfg.data.train_splits))})

        # Model, loss, optimizer. Every rank builds the same initial weights from train.seed.
        torch.manual_seed(t.seed)
        model = build_model(cfg.model).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        loss_fn = build_loss(cfg.loss).to(device)
        optimizer = make_optimizer(model, cfg.optim, fused=cuda)
        lr_factor = warmup_cosine(cfg.optim.warmup_steps, t.steps, cfg.optim.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        step, best_miou, wandb_id, last_path, saved_ema = 0, None, None, None, None
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            saved_ema = state["ema"]
            step, best_miou, wandb_id = int(state["step"]), state["best_miou"], state["wandb_run_id"]
            last_path = str(resume_path)
            # The recipe's optimizer settings win over the saved ones (a resumed job may change lr);
            # unchanged settings give exactly the saved values, so an exact resume stays exact.
            scheduler.base_lrs = [cfg.optim.lr for _ in optimizer.param_groups]
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                group["initial_lr"] = base
                group["lr"] = base * lr_factor(scheduler.last_epoch)
                group["betas"] = (cfg.optim.beta1, cfg.optim.beta2)
            optimizer.param_groups[0]["weight_decay"] = cfg.optim.weight_decay
            del state  # the tensors now live in the model and optimizer
        # The EMA starts from the current weights (a run that turns EMA on when resumed starts it there).
        ema = EMA(model, t.ema) if t.ema > 0 else None
        if ema is not None and saved_ema is not None:
            ema.load_state_dict(saved_ema)
        del saved_ema
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None) \
            if world > 1 else model
        step_model = torch.compile(ddp) if t.compile else ddp
        eval_model = ema.module if ema is not None else model  # never the DDP wrapper (uneven shares)

        tracker = start_tracking(cfg, run_dir, wandb_id, rank0)
        if rank0:
            write_text_atomic(run_dir / "config.json", cfg.dumps() + "\n")

        loader = build_train_loader(train_ds, t.global_batch, rank, world, t.seed, cfg.data.num_workers,
                                    start_step=step, pin_memory=cuda)
        steps_per_epoch = loader.sampler.steps_per_epoch
        val_loader = None
        if val_ds is not None:
            val_loader = build_eval_loader(val_ds, per_rank, rank, world, cfg.data.num_workers, pin_memory=cuda)

        def save(is_best: bool) -> str:
            params = list(model.state_dict().values())
            if not _all_finite(params):  # cannot happen (the loop stops first); never store it anyway
                raise NonFiniteLossError(f"non-finite weights at step {step}; not saved over {last_path}")
            began = time.monotonic()
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "step": step,
                "epoch": step // steps_per_epoch,
                "samples_seen": step * t.global_batch,
                "global_batch": t.global_batch,
                "fingerprint": train_ds.fingerprint,
                "config": cfg.to_dict(),
                "wandb_run_id": tracker.run_id or wandb_id,
                "best_miou": best_miou,
                "train_splits": list(cfg.data.train_splits),
                "world_size": world,
            }
            path = ckpt.save_checkpoint(state, run_dir, cfg.checkpoint.keep_last, is_best)
            seconds = time.monotonic() - began
            log.event("checkpoint", step=step, path=str(path), best=is_best, seconds=round(seconds, 3))
            return str(path)

        n_params = sum(p.numel() for p in model.parameters())
        log.info(f"{'resuming from ' + last_path if last_path else 'starting'} at step {step}/{t.steps}: "
                 f"{cfg.model.name} ({n_params / 1e6:.2f} M parameters), {world} process(es) on "
                 f"{device.type}, batch {per_rank}/rank ({t.global_batch} global), "
                 f"precision {str(amp_dtype).replace('torch.', '') if amp_dtype else 'fp32'}"
                 + (f", {torch.get_num_threads()} CPU threads" if not cuda else "") + f", run {run_dir}")
        log.event("start", step=step, resumed_from=last_path, world_size=world, device=str(device),
                  cpu_threads=torch.get_num_threads(),
                  precision=str(amp_dtype) if amp_dtype else "fp32", wandb=tracker.mode,
                  wandb_run_id=tracker.run_id)

        start_step = step
        last_saved_step = step if last_path else None
        last_save_time = time.monotonic()
        window_loss = torch.zeros((), device=device)
        window_steps, window_start = 0, time.monotonic()
        if rank0 and sys.stdout.isatty() and step < t.steps:
            from tqdm import tqdm

            log.bar = tqdm(total=t.steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stdout)
        model.train()
        batches = iter(loader)
        interrupted = False
        while step < t.steps:
            batch = next(batches)
            images = batch["image"].to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            target = batch["target"].to(device, non_blocking=True)
            torch.manual_seed(step_seed(t.seed, step, rank))  # any random op in the model: f(seed, step)

            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = loss_fn(step_model(images), target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            grad_norm = None
            if cfg.optim.grad_clip > 0:
                scaler.unscale_(optimizer)
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)

            # The step boundary: all ranks agree on [loss not finite, stop requested] with one all_reduce.
            bad = ~torch.isfinite(loss.detach())
            if grad_norm is not None and not use_scaler:  # with fp16 an inf gradient is the scaler's job
                bad = bad | ~torch.isfinite(grad_norm)
            flags = torch.stack([bad.float(), torch.tensor(float(stop_requested()), device=device)])
            if world > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            bad_any, stop_any = flags.tolist()
            if bad_any:
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at step {step + 1} (loss {loss.item():.4g} on rank {rank}); "
                    f"stopped before updating the weights; last checkpoint: {last_path or 'none'}")
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update()
            step += 1
            window_loss += loss.detach()
            window_steps += 1
            if log.bar is not None:
                log.bar.update(1)

            if t.log_samples:
                indices = batch["index"].to(device)
                if world > 1:
                    parts = [torch.empty_like(indices) for _ in range(world)]
                    dist.all_gather(parts, indices)
                    indices = torch.cat(parts)
                log.event("samples", step=step, indices=indices.tolist())
            if step == start_step + 1:
                log.event("first_step", step=step, resumed=start_step > 0,
                          seconds_since_process_start=round(time.time() - PROCESS_START, 3))

            if step % t.log_every == 0 or step == t.steps or stop_any:
                if world > 1:
                    dist.all_reduce(window_loss, op=dist.ReduceOp.SUM)
                    window_loss /= world
                elapsed = time.monotonic() - window_start
                mean_loss = window_loss.item() / window_steps
                img_s = window_steps * t.global_batch / max(elapsed, 1e-9)
                lr = optimizer.param_groups[0]["lr"]
                eta = (t.steps - step) * elapsed / window_steps
                log.event("train", step=step, epoch=step // steps_per_epoch, loss=mean_loss, lr=lr,
                          img_per_s=round(img_s, 2), seconds=round(elapsed, 3))
                tracker.log({"train/loss": mean_loss, "train/lr": lr, "train/img_per_s": img_s}, step=step)
                if log.bar is not None:
                    log.bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{img_s:.1f}", refresh=False)
                else:
                    log.info(f"step {step}/{t.steps}  loss {mean_loss:.4f}  lr {lr:.3g}  {img_s:.1f} img/s  "
                             f"eta {_format_duration(eta)}")
                window_loss.zero_()
                window_steps, window_start = 0, time.monotonic()

            if stop_any:
                interrupted = True
                break

            improved = False
            if val_loader is not None and (step % t.val_every == 0 or step == t.steps):
                began = time.monotonic()
                scores = evaluate(eval_model, val_loader, device, amp_dtype, channels_last, t.tta_flip)
                miou = scores["miou"]
                improved = miou is not None and (best_miou is None or miou > best_miou)
                if improved:
                    best_miou = miou
                seconds = time.monotonic() - began
                log.event("val", step=step, miou=miou, occluded_miou=scores["occluded_miou"],
                          count=scores["count"], best_miou=best_miou, ema=ema is not None,
                          seconds=round(seconds, 3), part_iou=scores["part_iou"])
                tracker.log({"val/miou": miou, "val/occluded_miou": scores["occluded_miou"],
                             "val/best_miou": best_miou}, step=step)
                occluded = scores["occluded_miou"]
                log.info(f"val step {step}: mIoU {miou if miou is None else f'{miou:.4f}'}"
                         + (f"  occluded {occluded:.4f}" if occluded is not None else "")
                         + f"  best {best_miou if best_miou is None else f'{best_miou:.4f}'}  ({seconds:.1f} s)")
                window_start += time.monotonic() - began  # validation time is not training speed

            due = (step == t.steps or improved
                   or (cfg.checkpoint.every_steps > 0 and step % cfg.checkpoint.every_steps == 0)
                   or (cfg.checkpoint.every_minutes > 0
                       and time.monotonic() - last_save_time >= cfg.checkpoint.every_minutes * 60))
            if rank0 and due:
                began = time.monotonic()
                last_path = save(improved)
                last_saved_step, last_save_time = step, time.monotonic()
                window_start += last_save_time - began

        if log.bar is not None:
            log.bar.close()
            log.bar = None
        if interrupted:
            if rank0 and last_saved_step != step:
                last_path = save(False)
            barrier()  # no rank leaves before the checkpoint is on disk
            names = sorted({signal.Signals(s).name for s in _received})
            log.info(f"interrupted at step {step} ({', '.join(names) or 'signal on another rank'}); "
                     f"checkpoint {last_path}")
            log.event("interrupted", step=step, signals=names, checkpoint=last_path)
            tracker.finish(exit_code=EXIT_INTERRUPTED)
            return TrainResult(step, True, best_miou, last_path, names)

        barrier()
        digest = weights_sha256(model)
        log.info(f"finished at step {step}; best val mIoU {best_miou}; checkpoint {last_path}")
        log.event("done", step=step, best_miou=best_miou, checkpoint=last_path, weights_sha256=digest)
        tracker.finish()
        return TrainResult(step, False, best_miou, last_path, sorted({signal.Signals(s).name for s in _received}),
                           digest)
    except BaseException as e:
        log.info(f"error: {type(e).__name__}: {e}", echo=False)  # the caller reports it
        log.event("error", error=f"{type(e).__name__}: {e}")
        if tracker is not None:
            tracker.finish(exit_code=1)
        raise
    finally:
        if loader is not None:
            loader.close()
        log.close()


# --------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m amodal.train",
        description="Train (or resume) in the current process group; run it again on the same run "
                    f"folder to resume. Exit status {EXIT_INTERRUPTED}: stopped by USR2/SIGTERM after saving.")
    parser.add_argument("recipe", nargs="?", help="job recipe (TOML), e.g. jobs/train.toml; defaults without")
    parser.add_argument("--run-dir", help="run folder (default: the recipe's run_dir, else runs/<name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=100 (repeatable)")
    args = parser.parse_args(argv)
    previous = install_signal_handlers()  # as early as possible: a USR2 during start-up must not kill us
    try:
        cfg = load_config(args.recipe, args.overrides)
        if cfg.job == "retrain_full":
            from amodal.jobs import resolve_retrain

            cfg = resolve_retrain(cfg)
        elif cfg.job != "train":
            raise ConfigError(f"job = {cfg.job!r}: python -m amodal.train runs training jobs; "
                              "use python -m amodal.launch for the others")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir or cfg.run_dir or Path("runs") / cfg.name)
    from amodal.data.shards import ShardError

    try:
        result = train(cfg, run_dir, handle_signals=False)
    except (ConfigError, ckpt.CheckpointError, ShardError, TrainingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        restore_signal_handlers(previous)
    return EXIT_INTERRUPTED if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
