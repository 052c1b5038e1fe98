"""The callables that the launcher submits: one object per job, submitted and requeued as a whole.

As in DINO's run_with_submitit.py, the job object is what submitit pickles; a requeued Slurm job runs
the same object again under the same job id, and it resumes from its run folder. Unlike DINO, a
training job does not checkpoint inside a signal handler: for the whole job USR2 and SIGTERM only set
a flag (amodal.signals' handlers replace submitit's), the loop stops at a step boundary with every rank
agreeing, rank 0 saves, and train() returns. Only then does rank 0 decide what happened and who
requeues the job (amodal.outcome: wall time, preemption with or without grace time, a node failure or
a requeue by hand, scancel), record it in <run>/requeues.json (amodal.requeues), requeue the job when
that is ours to do, and every rank exits with EXIT_INTERRUPTED (75).

A signal that comes while submitit's own handler is still (or again) installed, i.e. before train() or
in an export job, goes through Job.checkpoint() and the same decision. With submitit's local executor
"requeue" is exit status 144, which its controller answers by starting the tasks again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import submitit
from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

from amodal import runlock, signals, slurm
from amodal.config import Config, ConfigError, from_dict
from amodal.fileio import write_text_atomic
from amodal.outcome import decide, look_again, slurm_requeued
from amodal.requeues import read_requeues, record_interruption, record_resume, record_start
from amodal.signals import EXIT_INTERRUPTED


def _job_environment():
    """submitit's environment of this task, or None outside a submitit job (debug: in-process)."""
    try:
        return submitit.JobEnvironment()
    except RuntimeError:
        return None


def _restart_count() -> int:
    """This run's number among the runs of its Slurm job (SLURM_RESTART_COUNT; 0 for the first)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def requeue(env) -> None:
    """Requeue this job under its own id: `scontrol requeue` on Slurm; with submitit's local executor,
    the exit status its controller answers by starting the tasks again."""
    if env.cluster == "slurm":
        slurm.scontrol_requeue(env.job_id)
    else:
        sys.exit(LOCAL_REQUEUE_RETURN_CODE)


def requeue_now(env) -> None:
    """requeue(env), and if that fails, say whether Slurm has requeued the job meanwhile (then it comes
    back all the same) rather than only that the requeue failed."""
    try:
        requeue(env)
    except (OSError, subprocess.SubprocessError) as e:
        if env.cluster == "slurm" and slurm_requeued(slurm.scontrol_job(env.job_id), _restart_count()):
            print(f"Slurm has requeued the job itself meanwhile (our scontrol requeue: {e})", flush=True)
        else:
            print(f"requeue failed: {e}", flush=True)


class Job:
    """Base of the submitted jobs: the resolved config (as a dict) and the run folder, nothing else."""

    def __init__(self, config: Config, run_dir: str | Path):
        self.config = config.to_dict()
        self.run_dir = str(run_dir)

    def __call__(self):
        from amodal.preflight import check_inputs  # here: the launcher imports this module before torch

        cfg = from_dict(self.config, f"job config of {self.run_dir}")
        check_inputs(cfg)  # again where the job runs: what was there at submission may be gone
        env = _job_environment()
        if env is not None and env.global_rank == 0:
            record_start(Path(self.run_dir), str(env.job_id), env.cluster == "slurm")
        return self.run(cfg, Path(self.run_dir))

    def run(self, cfg: Config, run_dir: Path):
        raise NotImplementedError

    def checkpoint(self):
        """Called by submitit's own USR2 handler, which is active only where ours is not (an export job,
        the first moments of a training job). The job starts again from its run folder, so nothing is
        saved here: requeue the job (ourselves, as a training job does: see slurm.command) unless Slurm
        has already, and exit; or, when the wall-time bound says no, return None: submitit then ends
        the job. (submitit's SIGTERM handler only logs, so SIGTERM does not end us meanwhile.)"""
        requeued = self.interruption(from_dict(self.config, f"job config of {self.run_dir}"), {"SIGUSR2"})
        if requeued == "job":
            requeue_now(_job_environment())
        if requeued != "no":
            sys.exit(EXIT_INTERRUPTED)
        return None

    def interruption(self, cfg: Config, signals: set[str], step: int | None = None) -> str:
        """Rank 0, after a signal (and the save of `step`, if any): record the interruption in
        requeues.json and say what happens next. Returns who requeues the job: "job" (we must, now),
        "slurm" (it did already) or "no"."""
        env = _job_environment()
        fields = slurm.scontrol_job(env.job_id) if env is not None and env.cluster == "slurm" else {}
        restart_count = _restart_count()
        if look_again(fields, restart_count):
            time.sleep(2)  # Slurm's record can lag its signals by a moment
            fields = slurm.scontrol_job(env.job_id)
        run_dir = Path(self.run_dir)
        outcome = decide(fields, restart_count, signals, read_requeues(run_dir)["counts"],
                         cfg.slurm.max_walltime_requeues, step)
        job_id = str(env.job_id) if env is not None else None
        record_interruption(run_dir, outcome.kind, job_id, signals, step, outcome.requeued)
        print(outcome.message, flush=True)
        return outcome.requeued


class TrainJob(Job):
    """Train (or resume) in the run folder; every task of the job is one rank."""

    def run(self, cfg: Config, run_dir: Path):
        from amodal.train import train

        signals.install()  # ours for the whole job: submitit's would requeue at once, mid-step
        env = _job_environment()
        on_start = (lambda step: record_resume(run_dir, step)) if env is not None else None
        result = train(cfg, run_dir, handle_signals=False, on_start=on_start)
        signals.ignore()  # the work is saved: a late wall-time or preemption signal must not fail the job
        if result.interrupted:
            self.after_interruption(cfg, set(result.signals), result.step)  # does not return
        rank, digest = (env.global_rank if env else 0), getattr(result, "weights_sha256", None)
        print(f"rank {rank}: finished at step {result.step}, weights sha256 {digest}", flush=True)
        return {"rank": rank, "run_dir": str(run_dir), "step": result.step, "best_miou": result.best_miou,
                "checkpoint": result.last_checkpoint, "weights_sha256": digest}

    def after_interruption(self, cfg: Config, signals: set[str], step: int) -> None:
        """After the loop saved `step` and returned on a signal: requeue when that is ours to do, then exit."""
        env = _job_environment()
        if env is not None and env.global_rank == 0 and self.interruption(cfg, signals, step) == "job":
            requeue_now(env)
        sys.exit(EXIT_INTERRUPTED)


class ExportJob(Job):
    """Predict the test split with a trained checkpoint, write the leaderboard file and check it.

    The shards folder and input size are the trained run's own (the model was made for them). Rank 0
    does the work; other tasks of a multi-task allocation return at once. A signal interrupts nothing
    here: submitit's handler requeues the job, which starts the export again.
    """

    def run(self, cfg: Config, run_dir: Path):
        env = _job_environment()
        if env is not None and env.global_rank != 0:
            return None
        lock = runlock.acquire(run_dir)  # one writer per run folder (amodal/runlock.py)
        try:
            return self.export(cfg, run_dir)
        finally:
            lock.release()

    def export(self, cfg: Config, run_dir: Path):
        from amodal.distributed import pick_device
        from amodal.predict import load_trained, model_from_state, predict_to_file
        from amodal.submission import check_submission, write_submission

        ckpt_path, state = load_trained(cfg.export.checkpoint or cfg.from_run)
        model = model_from_state(state, ckpt_path)
        trained, best = state["config"], state.get("best_miou")
        del state
        dataset = export_dataset(cfg, trained)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.json", cfg.dumps() + "\n")  # read by amodal.status
        predictions = predict_to_file(model, dataset, run_dir / "predictions.h5", cfg.export.batch_size,
                                      cfg.export.tta_flip, pick_device(0), checkpoint=ckpt_path)
        keys = dataset.keys()
        out = write_submission(predictions, run_dir / cfg.export.submission, test_keys=keys)
        check_submission(out, keys)
        score = f"{best:.4f}" if best is not None else "none (trained without validation)"
        print(f"checkpoint: {ckpt_path}\nvalidation mIoU: {score}\nleaderboard file: {out} "
              f"({len(keys)} test images, checked)", flush=True)
        return {"submission": str(out), "checkpoint": str(ckpt_path), "val_miou": best}


def export_dataset(cfg: Config, trained: dict):
    """The split to predict: export.split of export.shards (default: the trained run's data.root), at the
    input size the model was trained for. A folder that is not a packed set, or lacks the split, is a
    ConfigError naming the option."""
    from amodal.data.dataset import ShardDataset
    from amodal.data.format import ShardError

    root = cfg.export.shards or trained["data"]["root"]
    option = "export.shards" if cfg.export.shards else "the trained run's data.root"
    try:
        return ShardDataset(root, cfg.export.split, input_size=trained["data"]["input_size"])
    except ShardError as e:
        raise ConfigError(f"{option} = {root}, export.split = {cfg.export.split!r}: cannot export from "
                          f"there: {e}") from None


JOBS = {"train": TrainJob, "retrain_full": TrainJob, "export": ExportJob}


def make_job(cfg: Config, run_dir: str | Path) -> Job:
    """The job object for a config that went through config.job_config."""
    return JOBS[cfg.job](cfg, run_dir)
