"""The callables that the launcher submits: one object per job, submitted and requeued as a whole.

As in DINO's run_with_submitit.py, the job object is what submitit pickles; a requeued Slurm job runs
the same object again under the same job id, and it resumes from its run folder. Unlike DINO, a
training job does not checkpoint inside a signal handler: for the whole job USR2 and SIGTERM only set
a flag (amodal.signals' handlers replace submitit's), the loop stops at a step boundary with every rank
agreeing, rank 0 saves, and train() returns. Only then does rank 0 decide what happened (docs/design.md §3):

- Slurm is preempting the job: `scontrol show job` has a PreemptTime while a grace time runs, and
  once Slurm has requeued the job its Restarts count is past this run's SLURM_RESTART_COUNT.
  * only USR2 so far (GraceTime > 0): requeue now with `scontrol requeue`. A job that exits during
    its grace time is otherwise recorded as FAILED and never comes back;
  * SIGTERM too (GraceTime=0, or the grace time is over): Slurm requeues the job itself.
  Preemption requeues are not bounded.
- USR2 without preemption: our `--signal=USR2@delay` before the wall-time limit. Requeue, at most
  `slurm.max_walltime_requeues` times (counted in <run>/requeues.json).
- SIGTERM without preemption: scancel. Never requeue: a cancelled job stays cancelled.
Then every rank exits with EXIT_INTERRUPTED (75).

The time left cannot tell wall time from preemption: Slurm moves the EndTime of a preempted job to
the end of its grace time. A signal that comes while submitit's own handler is still (or again)
installed, i.e. before train() or in an export job, goes through Job.checkpoint() and the same
decision. With submitit's local executor "requeue" is exit status 144, which its controller answers
by starting the tasks again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import submitit
from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

from amodal import signals
from amodal.config import Config, ConfigError, from_dict
from amodal.fileio import write_text_atomic
from amodal.signals import EXIT_INTERRUPTED


def read_requeues(run_dir: str | Path) -> dict:
    """{"walltime": n, "preemption": n, "cancel": n}: interruptions seen by the job's rank 0."""
    counts = {"walltime": 0, "preemption": 0, "cancel": 0}
    try:
        counts.update(json.loads((Path(run_dir) / "requeues.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    return counts


def _count(run_dir: Path, kind: str) -> int:
    counts = read_requeues(run_dir)
    counts[kind] += 1
    write_text_atomic(run_dir / "requeues.json", json.dumps(counts) + "\n")
    return counts[kind]


def _job_environment():
    """submitit's environment of this task, or None outside a submitit job (debug: in-process)."""
    try:
        return submitit.JobEnvironment()
    except RuntimeError:
        return None


def scontrol_job(job_id: str) -> dict:
    """`scontrol show job` as a dict of its fields ({} when Slurm does not answer)."""
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(token.split("=", 1) for token in out.split() if "=" in token)


def slurm_preempted(job_id: str) -> bool:
    """Whether Slurm is preempting this job: while a grace time runs the job has a PreemptTime; once Slurm
    has requeued it (no grace time left) its Restarts count is past this run's SLURM_RESTART_COUNT.
    A cancelled job has neither."""
    fields = scontrol_job(job_id)
    if fields.get("PreemptTime", "None") not in ("None", "Unknown"):
        return True
    restarts = fields.get("Restarts", "0")
    return restarts.isdigit() and int(restarts) > int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def requeue(env) -> None:
    """Requeue this job under its own id: `scontrol requeue` on Slurm; with submitit's local executor,
    the exit status its controller answers by starting the tasks again."""
    if env.cluster == "slurm":
        subprocess.run(["scontrol", "requeue", str(env.job_id)], check=True, timeout=60)
    else:
        sys.exit(LOCAL_REQUEUE_RETURN_CODE)


class Job:
    """Base of the submitted jobs: the resolved config (as a dict) and the run folder, nothing else."""

    def __init__(self, config: Config, run_dir: str | Path):
        self.config = config.to_dict()
        self.run_dir = str(run_dir)

    def __call__(self):
        return self.run(from_dict(self.config, f"job config of {self.run_dir}"), Path(self.run_dir))

    def run(self, cfg: Config, run_dir: Path):
        raise NotImplementedError

    def checkpoint(self):
        """Called by submitit's own USR2 handler, which is active only where ours is not (an export job,
        the first moments of a training job): requeue this same object, which starts again from its run
        folder, unless the wall-time bound says no (None: submitit then ends the job)."""
        cfg = from_dict(self.config, f"job config of {self.run_dir}")
        return submitit.helpers.DelayedSubmission(self) if self.interruption(cfg, {"SIGUSR2"}) else None

    def interruption(self, cfg: Config, signals: set[str]) -> bool:
        """Rank 0, after a signal: record what it was in requeues.json; whether to requeue ourselves."""
        env = _job_environment()
        if env is not None and env.cluster == "slurm" and slurm_preempted(env.job_id):
            kind = "preemption"
        elif "SIGTERM" in signals:
            kind = "cancel"
        else:
            kind = "walltime"
        count = _count(Path(self.run_dir), kind)
        limit = cfg.slurm.max_walltime_requeues
        if kind == "cancel":
            print("stopped by SIGTERM (scancel): not requeued", flush=True)
        elif kind == "preemption" and "SIGTERM" in signals:
            print(f"preempted, SIGTERM already here (no grace time left): Slurm requeues the job (preemption "
                  f"{count})", flush=True)
        elif kind == "walltime" and count > limit:
            print(f"wall-time signal {count} times (slurm.max_walltime_requeues = {limit}): not requeued", flush=True)
        else:
            print(f"requeueing after {'the wall-time signal' if kind == 'walltime' else 'preemption'} "
                  f"({kind} {count})", flush=True)
            return True
        return False


class TrainJob(Job):
    """Train (or resume) in the run folder; every task of the job is one rank."""

    def run(self, cfg: Config, run_dir: Path):
        from amodal.train import train

        signals.install()  # ours for the whole job: submitit's would requeue at once, mid-step
        result = train(cfg, run_dir, handle_signals=False)
        signals.ignore()  # the work is saved: a late wall-time or preemption signal must not fail the job
        if result.interrupted:
            self.after_interruption(cfg, set(result.signals))  # does not return
        env = _job_environment()
        rank, digest = (env.global_rank if env else 0), getattr(result, "weights_sha256", None)
        print(f"rank {rank}: finished at step {result.step}, weights sha256 {digest}", flush=True)
        return {"rank": rank, "run_dir": str(run_dir), "step": result.step, "best_miou": result.best_miou,
                "checkpoint": result.last_checkpoint, "weights_sha256": digest}

    def after_interruption(self, cfg: Config, signals: set[str]) -> None:
        """After the loop saved and returned on a signal: requeue when that is ours to do, then exit."""
        env = _job_environment()
        if env is not None and env.global_rank == 0 and self.interruption(cfg, signals):
            try:
                requeue(env)
            except (OSError, subprocess.SubprocessError) as e:
                print(f"requeue failed: {e}", flush=True)
        sys.exit(EXIT_INTERRUPTED)


class ExportJob(Job):
    """Predict the test split with a trained checkpoint, write the leaderboard file and check it.

    The shards folder and input size are the trained run's own (the model was made for them). Rank 0
    does the work; other tasks of a multi-task allocation return at once. A signal interrupts nothing
    here: submitit's handler requeues the job, which starts the export again.
    """

    def run(self, cfg: Config, run_dir: Path):
        from amodal.distributed import pick_device
        from amodal.predict import load_trained, model_from_state, predict_to_file
        from amodal.submission import check_submission, write_submission

        env = _job_environment()
        if env is not None and env.global_rank != 0:
            return None
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
