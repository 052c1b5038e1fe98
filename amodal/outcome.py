"""What ended a run of a job, and who requeues it: pure functions of Slurm's record and the signals seen.

A training job's rank 0 decides after the loop saved and returned on a signal (docs/design.md §3); an
export job, or a training job before train() installed our handlers, decides in Job.checkpoint.
`fields` is `scontrol show job` of the job ({} off Slurm, or when Slurm does not answer) and
`restart_count` this run's SLURM_RESTART_COUNT (0 for the first run):

- Slurm has already requeued the job: its Restarts count is past this run's. That is a preemption
  without grace time (USR2 and SIGTERM together) or past it, a requeue by hand or a node failure
  (SIGTERM alone); the job leaves the requeue to Slurm.
- Slurm is preempting the job with a grace time: the job has a PreemptTime and only USR2 came. The job
  requeues itself now (`scontrol requeue`): one that exits during its grace time is otherwise recorded
  as FAILED and never comes back. Preemption requeues are not bounded.
- USR2 otherwise: our `--signal=USR2@delay` before the wall-time limit. The job requeues itself, at
  most `slurm.max_walltime_requeues` times.
- SIGTERM otherwise: scancel. Never requeued: a cancelled job stays cancelled.

The time left cannot tell wall time from preemption: Slurm moves the EndTime of a preempted job to the
end of its grace time. Slurm's record can lag its signals by a moment, so a caller reads it again
(look_again) before it calls a signal the wall-time signal or scancel. At the next start of the same
job, Slurm's accounting of the ended run says why Slurm requeued it (kind_at_next_start).
"""

from __future__ import annotations

from dataclasses import dataclass

# What ended a run of a job, as requeues.json and amodal.status name it.
KINDS = {"walltime": "wall time", "preemption": "preemption", "node_failure": "node failure",
         "requeue": "requeue by hand", "cancel": "scancel", "unknown": "unknown"}
# sacct's state of a run that Slurm ended and requeued (sacct -D: one row per start of a job).
SACCT_KINDS = {"PREEMPTED": "preemption", "NODE_FAIL": "node_failure", "REQUEUED": "requeue", "TIMEOUT": "walltime"}


@dataclass(frozen=True)
class Outcome:
    kind: str  # a key of KINDS
    requeued: str  # who requeues the job: "job" (it must, now), "slurm" (did already) or "no"
    message: str  # the line the job prints


def slurm_requeued(fields: dict, restart_count: int) -> bool:
    """Whether Slurm has already ended this run and requeued the job: its Restarts count is past this
    run's. So it is after a preemption without grace time (or past it), a requeue by hand and a node
    failure; the SIGTERM that ends the run comes after."""
    restarts = fields.get("Restarts", "0")
    return restarts.isdigit() and int(restarts) > restart_count


def slurm_preempting(fields: dict) -> bool:
    """Whether Slurm is preempting this job with a grace time: the job has a PreemptTime."""
    return fields.get("PreemptTime", "None") not in ("None", "Unknown")


def look_again(fields: dict, restart_count: int) -> bool:
    """Whether to read Slurm's record once more before deciding: it answered, and says neither requeued
    nor preempting, which a moment later it may (seen with GraceTime 0 in an export job, which reads it
    at once)."""
    return bool(fields) and not slurm_requeued(fields, restart_count) and not slurm_preempting(fields)


def decide(fields: dict, restart_count: int, signals: set[str], counts: dict, walltime_limit: int,
           step: int | None = None) -> Outcome:
    """What ended this run and who requeues the job, given Slurm's record, the signals rank 0 saw, the
    interruptions of each kind recorded before (requeues.json's counts), slurm.max_walltime_requeues
    and the step saved on the signal (None when nothing was)."""
    by_slurm = slurm_requeued(fields, restart_count)
    if by_slurm:
        # Which of the three sacct tells at the next start; USR2 with the SIGTERM means preemption.
        kind = "preemption" if "SIGUSR2" in signals else "requeue"
    elif slurm_preempting(fields):
        kind = "preemption"
    elif "SIGTERM" in signals:
        kind = "cancel"
    else:
        kind = "walltime"
    count = counts.get(kind, 0) + 1
    ourselves = not by_slurm and (kind == "preemption" or (kind == "walltime" and count <= walltime_limit))
    requeued = "job" if ourselves else "slurm" if by_slurm else "no"
    if by_slurm:
        why = "preempted" if kind == "preemption" else "requeued by hand or a node failure"
        message = (f"Slurm is requeuing the job itself ({why}; {', '.join(sorted(signals))}): it comes back under "
                   f"the same job id" + (f" and resumes at step {step}" if step is not None else ""))
    elif kind == "cancel":
        message = "stopped by SIGTERM (scancel): not requeued"
    elif not ourselves:
        message = f"wall-time signal {count} times (slurm.max_walltime_requeues = {walltime_limit}): not requeued"
    else:
        message = (f"requeueing after {'the wall-time signal' if kind == 'walltime' else 'preemption'} "
                   f"({kind} {count})")
    return Outcome(kind, requeued, message)


def kind_at_next_start(kind: str, requeued: str, sacct_state: str | None) -> str:
    """The kind of the interruption that ended a job's previous run, settled as the job starts again:
    sacct's state of that run (read now, when it is final) wins over what the run saw, except REQUEUED
    after our own requeue (requeued "job"); a state that is none of SACCT_KINDS, or no answer (None),
    changes nothing."""
    slurm_kind = SACCT_KINDS.get(sacct_state)
    if slurm_kind is None or (slurm_kind == "requeue" and requeued == "job"):
        return kind
    return slurm_kind
