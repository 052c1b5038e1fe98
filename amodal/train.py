"""Training: shards and a model in, checkpoints and metrics out.

    amodal-train RECIPE [--run-dir DIR] [--set key=value ...]

trains in the current process group (alone, or one process per rank under torchrun / srun /
submitit) and resumes when the run folder already holds a checkpoint. The run folder gets
config.json (the resolved config), log.txt, metrics.jsonl (one JSON object per event),
checkpoints/ and, when tracking, wandb/.

`Trainer` holds one rank's training: built in __init__, made ready for `fit()` by `set_up()` (which
calls `restore()` from the newest checkpoint, `wrap_model()`, `start_tracking()`, `write_config()` and
`build_loaders()` in that order), `train_step(batch)` (amodal/step.py's step, which the benchmarks
time too), `validate()`, `save()`, and `fit()`, the loop. `train()` wraps it for a process:
signal handlers, the process group, and the data made ready by rank 0 before any rank reads it, then
staged to the node's disk (amodal/data/stage.py) unless data.stage says otherwise.

The contracts it keeps (docs/design.md §3):
- Randomness is a function of (seed, step) or (seed, epoch, index): the sampler picks the global
  batch of step k from (seed, k), augmentation from (seed, epoch, index), and the torch generator is
  re-seeded from (seed, step, rank) before every step. A checkpoint needs no RNG state, and a run
  resumed at step k on any number of ranks sees the same samples in the same global batches; on the
  same number of ranks and on CPU it ends with bitwise the same weights.
- USR2 and SIGTERM only set a flag (amodal/signals.py). After the backward pass of every step the ranks
  agree with one all_reduce (MAX) on [stop requested, loss not finite], so all stop after the same
  step; rank 0 saves, "interrupted at step k" is printed, train() returns interrupted=True and the
  command line exits with EXIT_INTERRUPTED (75).
- A non-finite loss (or gradient) stops training before the optimizer step, with an error naming the
  step: weights never become non-finite, so no checkpoint ever holds them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from amodal import checkpoint as ckpt
from amodal import runlock, signals
from amodal.config import Config, ConfigError, job_config, load_config, training_splits
from amodal.data.dataset import ShardDataset
from amodal.data.device_augment import augment_batch, resolve_on
from amodal.data.format import ShardError
from amodal.data.pack import ensure_synthetic
from amodal.data.sampler import build_eval_loader, build_train_loader, per_rank_batch
from amodal.data.stage import stage_data
from amodal.distributed import DistInfo, barrier, cleanup, init_distributed
from amodal.fileio import write_text_atomic
from amodal.metrics import evaluate
from amodal.optim import apply_recipe, make_ema, make_scheduler
from amodal.signals import EXIT_INTERRUPTED
from amodal.step import build_step
from amodal.tracking import RunLog, start_tracking


def _process_start_time() -> float:
    """Wall-clock time at which this process started (Linux /proc), else the time of this import.
    Recorded with the first step, so a requeued job's restart cost can be read from metrics.jsonl."""
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


class TrainingError(RuntimeError):
    pass


class NonFiniteLossError(TrainingError):
    pass


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


def cpu_threads() -> int | None:
    """Intra-op threads for training on the CPU: every CPU this process may use, shared among the ranks
    of this node. Loader workers get no core of their own: at CPU training rates (tens of images/s) one
    worker, which reads thousands of augmented samples/s, is idle nearly all the time, while a core
    taken from the math costs a third of the speed (tools/bench_train.py --workers measures both
    rules). None when the user chose with OMP_NUM_THREADS."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or 1)
    return max(1, cpus // max(1, local_ranks))


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)


def _all_finite(tensors) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Trainer:
    """One rank's training run in `run_dir` (see the module note)."""

    def __init__(self, cfg: Config, run_dir: Path, info: DistInfo, log: RunLog, data_root: str | Path | None = None):
        """data_root: where to read the shards (a staged copy); default data.root, which the run's
        config and checkpoints keep in any case."""
        t = cfg.train
        if t.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {t.steps}")
        self.cfg, self.run_dir, self.log = cfg, run_dir, log
        self.rank, self.world, self.device = info.rank, info.world_size, info.device
        self.per_rank = per_rank_batch(t.global_batch, self.world)
        self.cuda = self.device.type == "cuda"
        if not self.cuda:  # the CUDA settings come with the step (amodal/step.py: use_cuda_math)
            torch.use_deterministic_algorithms(True, warn_only=True)
            threads = cpu_threads()
            if threads is not None:
                torch.set_num_threads(threads)

        data = cfg.data
        root = data_root or data.root
        self.train_ds = ShardDataset(root, data.train_splits, data.input_size, augment=cfg.augment, seed=t.seed,
                                     on_device=resolve_on(cfg.augment.on, self.device) == "device")
        if not self.train_ds.has_labels:
            raise ConfigError(f"data.train_splits = {data.train_splits}: no labels in {data.root}")
        self.val_ds = None
        if t.val_every > 0:
            self.val_ds = ShardDataset(root, data.val_split, data.input_size, augment=None)
            if not self.val_ds.has_labels:
                raise ConfigError(f"data.val_split = {data.val_split!r} has no labels in {data.root}")

        # Every rank builds the same initial weights from train.seed.
        self.training_step = build_step(cfg, self.device)
        self.model = self.training_step.model
        self.optimizer, self.scaler = self.training_step.optimizer, self.training_step.scaler
        # validation and the logs use the step's precision and layout
        self.amp_dtype, self.use_scaler = self.training_step.amp_dtype, self.training_step.use_scaler
        self.channels_last = self.training_step.channels_last
        self.scheduler = make_scheduler(self.optimizer, cfg.optim, t.steps)
        self.step, self.best_miou, self.wandb_id, self.last_path = 0, None, None, None
        # set_up() fills these
        self.ema = self.eval_model = None
        self.tracker = None
        self.loader = self.val_loader = None

    # ---------------------------------------------------------------------------------------------
    # State

    def set_up(self) -> None:
        """Make the trainer ready for fit(), in this order: the newest checkpoint restored, the model
        wrapped for the step, tracking started, config.json written, the loaders built at the step
        reached."""
        self.restore()
        self.wrap_model()
        self.start_tracking()
        self.write_config()
        self.build_loaders()

    def restore(self) -> None:
        """Resume from the newest checkpoint that loads, if it was made on the same data and global
        batch: weights, optimizer, schedule, scaler, the step and the moving average of the weights
        (a fresh average without a checkpoint)."""
        cfg, t = self.cfg, self.cfg.train
        saved_ema = None
        found = ckpt.load_latest(self.run_dir)
        if found is not None:
            path, state = found
            ckpt.check_compatible(
                state, fingerprint=self.train_ds.fingerprint, global_batch=t.global_batch, source=str(path),
                allow_mismatch=cfg.checkpoint.allow_mismatch,
                extra={"data.train_splits": (state.get("train_splits", list(cfg.data.train_splits)),
                                             list(cfg.data.train_splits))})
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            apply_recipe(self.optimizer, self.scheduler, cfg.optim)
            saved_ema = state["ema"]
            self.step, self.best_miou, self.wandb_id = int(state["step"]), state["best_miou"], state["wandb_run_id"]
            self.last_path = str(path)
            del state  # the tensors now live in the model and optimizer
        self.ema = make_ema(self.model, t.ema, saved_ema)

    def wrap_model(self) -> None:
        """What the step calls: the model in DDP across ranks, compiled when train.compile; validation
        scores the moving average, or the model itself, never DDP (the ranks' shares are uneven)."""
        ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device.index] if self.cuda else None) \
            if self.world > 1 else self.model
        self.training_step.net = torch.compile(ddp) if self.cfg.train.compile else ddp
        self.eval_model = self.ema.module if self.ema is not None else self.model

    def start_tracking(self) -> None:
        """wandb (or none, per tracking.*), resuming the checkpoint's wandb run."""
        self.tracker = start_tracking(self.cfg, self.run_dir, self.wandb_id, self.rank == 0)

    def write_config(self) -> None:
        """Rank 0: the resolved config as config.json in the run folder."""
        if self.rank == 0:
            write_text_atomic(self.run_dir / "config.json", self.cfg.dumps() + "\n")

    def build_loaders(self) -> None:
        """The training loader from the step reached (its samples are a function of the step), and
        the validation loader."""
        t, workers = self.cfg.train, self.cfg.data.num_workers
        self.loader = build_train_loader(self.train_ds, t.global_batch, self.rank, self.world, t.seed, workers,
                                         start_step=self.step, pin_memory=self.cuda)
        if self.val_ds is not None:
            self.val_loader = build_eval_loader(self.val_ds, self.per_rank, self.rank, self.world, workers,
                                                pin_memory=self.cuda)

    def state_dict(self) -> dict:
        t = self.cfg.train
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "step": self.step,
            "epoch": self.step // self.loader.sampler.steps_per_epoch,
            "samples_seen": self.step * t.global_batch,
            "global_batch": t.global_batch,
            "fingerprint": self.train_ds.fingerprint,
            "config": self.cfg.to_dict(),
            "wandb_run_id": self.tracker.run_id or self.wandb_id,
            "best_miou": self.best_miou,
            "train_splits": list(self.cfg.data.train_splits),
            "world_size": self.world,
        }

    def save(self, is_best: bool) -> None:
        """Rank 0: a checkpoint of the current step (best.pt too when is_best)."""
        if not _all_finite(self.model.state_dict().values()):  # the loop stops first; never store it anyway
            raise NonFiniteLossError(f"non-finite weights at step {self.step}; not saved over {self.last_path}")
        began = time.monotonic()
        path = ckpt.save_checkpoint(self.state_dict(), self.run_dir, self.cfg.checkpoint.keep_last, is_best)
        self.last_path = str(path)
        self.log.event("checkpoint", step=self.step, path=str(path), best=is_best,
                       seconds=round(time.monotonic() - began, 3))

    # ---------------------------------------------------------------------------------------------
    # One step, one validation

    def train_step(self, batch: dict) -> tuple[torch.Tensor, bool]:
        """Forward, backward and (unless a rank's loss is not finite) the update; returns the loss and
        whether any rank was asked to stop. All ranks decide with one all_reduce."""
        step = self.training_step
        images, target = step.to_device(batch["image"], batch["target"])
        torch.manual_seed(step_seed(self.cfg.train.seed, self.step, self.rank))  # random ops: f(seed, step)
        loss = step.loss(step.forward(images), target)
        step.backward(loss)
        grad_norm = step.clip()

        bad = ~torch.isfinite(loss.detach())
        if grad_norm is not None and not self.use_scaler:  # with fp16 an inf gradient is the scaler's job
            bad = bad | ~torch.isfinite(grad_norm)
        flags = torch.stack([bad.float(), torch.tensor(float(signals.stop_requested()), device=self.device)])
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad_any, stop_any = flags.tolist()
        if bad_any:
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {self.step + 1} (loss {loss.item():.4g} on rank "
                f"{self.rank}); stopped before updating the weights; last checkpoint: {self.last_path or 'none'}")
        step.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        if self.cfg.train.log_samples:
            self._log_samples(batch["index"].to(self.device))
        return loss.detach(), bool(stop_any)

    def validate(self) -> bool:
        """Score the (EMA) model on the validation split; log it; whether it is the best so far."""
        began = time.monotonic()
        t = self.cfg.train
        scores = evaluate(self.eval_model, self.val_loader, self.device, self.amp_dtype, self.channels_last,
                          t.tta_flip)
        miou, occluded = scores["miou"], scores["occluded_miou"]
        improved = miou is not None and (self.best_miou is None or miou > self.best_miou)
        if improved:
            self.best_miou = miou
        seconds = time.monotonic() - began
        self.log.event("val", step=self.step, miou=miou, occluded_miou=occluded, count=scores["count"],
                       best_miou=self.best_miou, ema=self.ema is not None, seconds=round(seconds, 3),
                       part_iou=scores["part_iou"])
        self.tracker.log({"val/miou": miou, "val/occluded_miou": occluded, "val/best_miou": self.best_miou},
                         step=self.step)
        self.log.info(f"val step {self.step}: mIoU {_fmt(miou)}"
                      + (f"  occluded {occluded:.4f}" if occluded is not None else "")
                      + f"  best {_fmt(self.best_miou)}  ({seconds:.1f} s)")
        return improved

    def _log_samples(self, indices: torch.Tensor) -> None:
        if self.world > 1:
            parts = [torch.empty_like(indices) for _ in range(self.world)]
            dist.all_gather(parts, indices)
            indices = torch.cat(parts)
        self.log.event("samples", step=self.step, indices=indices.tolist())

    def _log_train(self, window: _Window) -> None:
        t = self.cfg.train
        mean_loss, seconds = window.mean_loss(self.world), window.seconds()
        img_s = window.steps * t.global_batch / max(seconds, 1e-9)
        lr = self.optimizer.param_groups[0]["lr"]
        self.log.event("train", step=self.step, epoch=self.step // self.loader.sampler.steps_per_epoch,
                       loss=mean_loss, lr=lr, img_per_s=round(img_s, 2), seconds=round(seconds, 3))
        self.tracker.log({"train/loss": mean_loss, "train/lr": lr, "train/img_per_s": img_s}, step=self.step)
        if self.log.bar is not None:
            self.log.bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{img_s:.1f}", refresh=False)
        else:
            eta = (t.steps - self.step) * seconds / window.steps
            self.log.info(f"step {self.step}/{t.steps}  loss {mean_loss:.4f}  lr {lr:.3g}  {img_s:.1f} img/s  "
                          f"eta {_format_duration(eta)}")

    def _log_start(self) -> None:
        t, cuda = self.cfg.train, self.cuda
        n_params = sum(p.numel() for p in self.model.parameters())
        precision = str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32"
        self.log.info(f"{'resuming from ' + self.last_path if self.last_path else 'starting'} at step "
                      f"{self.step}/{t.steps}: {self.cfg.model.name} ({n_params / 1e6:.2f} M parameters), "
                      f"{self.world} process(es) on {self.device.type}, batch {self.per_rank}/rank "
                      f"({t.global_batch} global), precision {precision}"
                      + (f", {torch.get_num_threads()} CPU threads" if not cuda else "") + f", run {self.run_dir}")
        self.log.event("start", step=self.step, resumed_from=self.last_path, world_size=self.world,
                       device=str(self.device), cpu_threads=torch.get_num_threads(),
                       augment_on_device=self.train_ds.on_device,
                       precision=str(self.amp_dtype) if self.amp_dtype else "fp32", wandb=self.tracker.mode,
                       wandb_run_id=self.tracker.run_id)

    # ---------------------------------------------------------------------------------------------
    # The loop

    def fit(self) -> TrainResult:
        if self.loader is None:
            raise RuntimeError("Trainer.fit() before Trainer.set_up(): the trainer has no checkpoint restored, "
                               "no wrapped model, no tracking and no loaders yet")
        t, ck = self.cfg.train, self.cfg.checkpoint
        self._log_start()
        start_step = self.step
        last_saved_step = self.step if self.last_path else None
        last_save_time = time.monotonic()
        window = _Window(self.device)
        self.log.start_bar(t.steps, self.step)
        self.model.train()
        batches = iter(self.loader)
        stop = False
        while self.step < t.steps and not stop:
            batch = next(batches)
            if self.train_ds.on_device:  # augment.on = "device": the workers sent crops to warp here
                batch = augment_batch(batch, self.device, self.cfg.data.input_size)
            loss, stop = self.train_step(batch)
            self.log.step_done(self.step)
            window.add(loss)
            if self.log.bar is not None:
                self.log.bar.update(1)
            if self.step == start_step + 1:
                self.log.event("first_step", step=self.step, resumed=start_step > 0,
                               seconds_since_process_start=round(time.time() - PROCESS_START, 3))
            if stop:
                break  # save first (below); the tracker hears of it after
            if self.step % t.log_every == 0 or self.step == t.steps:
                self._log_train(window)
                window.reset()

            improved = False
            if self.val_loader is not None and (self.step % t.val_every == 0 or self.step == t.steps):
                with window.paused():  # validation time is not training speed
                    improved = self.validate()
            due = (self.step == t.steps or improved
                   or (ck.every_steps > 0 and self.step % ck.every_steps == 0)
                   or (ck.every_minutes > 0 and time.monotonic() - last_save_time >= ck.every_minutes * 60))
            if self.rank == 0 and due:
                with window.paused():
                    self.save(improved)
                last_saved_step, last_save_time = self.step, time.monotonic()
        self.log.close_bar()

        if stop:
            if self.rank == 0 and last_saved_step != self.step:
                self.save(False)
            barrier()  # no rank leaves before the checkpoint is on disk
            self._log_train(window)
            names = signals.received()
            self.log.info(f"interrupted at step {self.step} ({', '.join(names) or 'signal on another rank'}); "
                          f"checkpoint {self.last_path}")
            self.log.event("interrupted", step=self.step, signals=names, checkpoint=self.last_path)
            self.tracker.finish(exit_code=EXIT_INTERRUPTED)
            return TrainResult(self.step, True, self.best_miou, self.last_path, names)

        barrier()
        digest = weights_sha256(self.model)
        self.log.info(f"finished at step {self.step}; best val mIoU {self.best_miou}; checkpoint {self.last_path}")
        self.log.event("done", step=self.step, best_miou=self.best_miou, checkpoint=self.last_path,
                       weights_sha256=digest)
        self.tracker.finish()
        return TrainResult(self.step, False, self.best_miou, self.last_path, signals.received(), digest)

    def close(self, failed: bool = False) -> None:
        if failed and self.tracker is not None:
            self.tracker.finish(exit_code=1)
        if self.loader is not None:
            self.loader.close()


class _Window:
    """Mean loss and speed over the steps since the last train log line (pauses excluded)."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.steps, self.start = 0, time.monotonic()

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.steps += 1

    def mean_loss(self, world: int) -> float:
        if world > 1:
            dist.all_reduce(self.loss, op=dist.ReduceOp.SUM)
            self.loss /= world
        return self.loss.item() / self.steps

    def seconds(self) -> float:
        return time.monotonic() - self.start

    @contextlib.contextmanager
    def paused(self):
        began = time.monotonic()
        yield
        self.start += time.monotonic() - began


def _fmt(value: float | None) -> str:
    return "None" if value is None else f"{value:.4f}"


def train(cfg: Config, run_dir: str | Path, handle_signals: bool = True,
          on_start: Callable[[int], None] | None = None) -> TrainResult:
    """Train (or resume) `cfg` in `run_dir` in this process group; see the module note. `on_start(step)` is
    called on rank 0 once the run is set up (its newest checkpoint restored), with the step it resumes at (the
    job layer records it in requeues.json)."""
    run_dir = Path(run_dir)
    previous = None
    if handle_signals and threading.current_thread() is threading.main_thread():
        previous = signals.install()
    owns_group = not dist.is_initialized()
    info = init_distributed(cfg.train.device)
    lock = None
    try:
        lock = runlock.hold(run_dir, info.rank)  # one writer per run folder (amodal/runlock.py)
        # Rank 0 makes the built-in synthetic shards when the recipe asks for them and they are not there.
        if info.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            ensure_synthetic(cfg.data)
        barrier()
        log = RunLog(run_dir, info.rank == 0)
        trainer = None
        try:
            staged = stage_data(cfg.data, training_splits(cfg), warn=info.local_rank == 0)
            log.info(staged.note, echo=bool(staged.copied))  # a fall-back has warned on stderr already
            trainer = Trainer(cfg, run_dir, info, log, staged.root)
            trainer.set_up()
            if on_start is not None and info.rank == 0:
                on_start(trainer.step)
            result = trainer.fit()
            trainer.close()
            return result
        except BaseException as e:
            log.info(f"error: {type(e).__name__}: {e}", echo=False)  # the caller reports it
            log.event("error", error=f"{type(e).__name__}: {e}")
            if trainer is not None:
                trainer.close(failed=True)
            raise
        finally:
            log.close()
    finally:
        if lock is not None:
            lock.release()
        if previous is not None:
            signals.restore(previous)
        if owns_group:
            cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="amodal-train",
        description="Train (or resume) in the current process group; run it again on the same run "
                    f"folder to resume. Exit status {EXIT_INTERRUPTED}: stopped by USR2/SIGTERM after saving.")
    parser.add_argument("recipe", nargs="?", help="job recipe (TOML), e.g. jobs/train.toml; defaults without")
    parser.add_argument("--run-dir", help="run folder (default: the recipe's run_dir, else runs/<name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=100 (repeatable)")
    args = parser.parse_args(argv)
    previous = signals.install()  # as early as possible: a USR2 during start-up must not kill us
    try:
        cfg = load_config(args.recipe, args.overrides)
        if cfg.job not in ("train", "retrain_full"):
            raise ConfigError(f"job = {cfg.job!r}: amodal-train runs training jobs; "
                              "use amodal-launch for the others")
        cfg = job_config(cfg)
        ckpt.check_finished_source(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        signals.restore(previous)
        return 2
    run_dir = Path(args.run_dir or cfg.run_dir or Path("runs") / cfg.name)
    try:
        result = train(cfg, run_dir, handle_signals=False)
    except (ConfigError, ckpt.CheckpointError, ShardError, TrainingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        signals.restore(previous)
    return EXIT_INTERRUPTED if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
