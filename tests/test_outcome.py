"""What ended a run and who requeues the job (amodal.outcome), case by case, from Slurm's record as
`scontrol show job` gives it and the signals rank 0 saw. The jobs that live these cases on the real
cluster are in tests/test_slurm_jobs.py."""

import pytest

from amodal.outcome import KINDS, decide, kind_at_next_start, look_again

IDLE = {"JobState": "RUNNING", "Restarts": "0", "PreemptTime": "None"}  # nothing from Slurm yet
REQUEUED = dict(IDLE, Restarts="1")  # Slurm has requeued the job: Restarts past this run's count
PREEMPTING = dict(IDLE, PreemptTime="2026-12-06T05:00:00")  # preempted with a grace time
NONE = dict.fromkeys(KINDS, 0)
USR2, TERM, BOTH = {"SIGUSR2"}, {"SIGTERM"}, {"SIGUSR2", "SIGTERM"}

# name: (scontrol fields, SLURM_RESTART_COUNT, signals, recorded counts, max_walltime_requeues, kind,
# requeued, what the job says)
CASES = {
    "wall time": (IDLE, 0, USR2, NONE, 10, "walltime", "job", "requeueing after the wall-time signal (walltime 1)"),
    "wall time, last requeue allowed": (
        IDLE, 0, USR2, dict(NONE, walltime=1), 2, "walltime", "job", "(walltime 2)"),
    "wall time past max_walltime_requeues": (
        IDLE, 0, USR2, dict(NONE, walltime=2), 2, "walltime", "no",
        "wall-time signal 3 times (slurm.max_walltime_requeues = 2): not requeued"),
    "wall time, max_walltime_requeues 0": (
        IDLE, 0, USR2, NONE, 0, "walltime", "no", "wall-time signal 1 times (slurm.max_walltime_requeues = 0)"),
    "wall time off Slurm (local executor: no record)": (
        {}, 0, USR2, NONE, 10, "walltime", "job", "requeueing after the wall-time signal"),
    "wall time in a requeued run (Restarts equal to its count)": (
        REQUEUED, 1, USR2, dict(NONE, preemption=1), 10, "walltime", "job", "(walltime 1)"),
    "preemption with grace time": (
        PREEMPTING, 0, USR2, NONE, 10, "preemption", "job", "requeueing after preemption (preemption 1)"),
    "preemption with grace time is not bounded": (
        PREEMPTING, 0, USR2, dict(NONE, preemption=12, walltime=10), 10, "preemption", "job", "(preemption 13)"),
    "preemption with grace time, SIGTERM too (KillWait)": (
        PREEMPTING, 0, BOTH, NONE, 10, "preemption", "job", "requeueing after preemption"),
    "preemption without grace time": (
        REQUEUED, 0, BOTH, NONE, 10, "preemption", "slurm",
        "Slurm is requeuing the job itself (preempted; SIGTERM, SIGUSR2): it comes back under the same job id "
        "and resumes at step 40"),
    "preemption past the grace time, already requeued": (
        dict(REQUEUED, PreemptTime="2026-12-06T05:00:00"), 0, BOTH, NONE, 10, "preemption", "slurm", "(preempted;"),
    "node failure or scontrol requeue": (
        REQUEUED, 0, TERM, NONE, 10, "requeue", "slurm",
        "Slurm is requeuing the job itself (requeued by hand or a node failure; SIGTERM)"),
    "node failure in a requeued run": (dict(IDLE, Restarts="3"), 2, TERM, NONE, 10, "requeue", "slurm", "SIGTERM"),
    "scancel": (IDLE, 0, TERM, NONE, 10, "cancel", "no", "stopped by SIGTERM (scancel): not requeued"),
    "scancel off Slurm": ({}, 0, TERM, NONE, 10, "cancel", "no", "stopped by SIGTERM (scancel)"),
    "scancel with both signals": (IDLE, 0, BOTH, NONE, 10, "cancel", "no", "(scancel)"),
    "Restarts unknown: not requeued": (
        dict(IDLE, Restarts="Unknown"), 0, TERM, NONE, 10, "cancel", "no", "(scancel)"),
    "PreemptTime Unknown: not preempting": (
        dict(IDLE, PreemptTime="Unknown"), 0, USR2, NONE, 10, "walltime", "job", "wall-time signal"),
}


@pytest.mark.parametrize("case", CASES)
def test_decide(case):
    fields, restart_count, signals, counts, limit, kind, requeued, says = CASES[case]
    outcome = decide(fields, restart_count, signals, counts, limit, step=40)
    assert (outcome.kind, outcome.requeued) == (kind, requeued)
    assert says in outcome.message, outcome.message


def test_decide_without_a_saved_step():
    assert decide(REQUEUED, 0, TERM, NONE, 10).message.endswith("it comes back under the same job id")


# Read Slurm's record again (after 2 s) only when it answered and says neither requeued nor preempting.
@pytest.mark.parametrize("fields, restart_count, again", [
    (IDLE, 0, True), (REQUEUED, 1, True), ({}, 0, False), (REQUEUED, 0, False), (PREEMPTING, 0, False),
])
def test_look_again(fields, restart_count, again):
    assert look_again(fields, restart_count) is again


# At the next start of the job, sacct's state of the ended run (sacct -D) settles the kind.
@pytest.mark.parametrize("kind, requeued, sacct_state, settled", [
    ("walltime", "job", "PREEMPTED", "preemption"),  # the run took it for wall time; Slurm knows better
    ("requeue", "slurm", "NODE_FAIL", "node_failure"),
    ("requeue", "slurm", "REQUEUED", "requeue"),  # scontrol requeue by hand
    ("unknown", "slurm", "PREEMPTED", "preemption"),  # killed past KillWait: no entry of its own
    ("unknown", "slurm", "NODE_FAIL", "node_failure"),
    ("walltime", "job", "REQUEUED", "walltime"),  # our own requeue: REQUEUED says nothing new
    ("preemption", "job", "REQUEUED", "preemption"),
    ("cancel", "no", "REQUEUED", "requeue"),  # requeued by hand after a scancel signal
    ("walltime", "job", "TIMEOUT", "walltime"),
    ("unknown", "slurm", "TIMEOUT", "walltime"),
    ("walltime", "job", "CANCELLED", "walltime"),  # not a state of a requeue: no change
    ("walltime", "job", "COMPLETED", "walltime"),
    ("unknown", "slurm", None, "unknown"),  # accounting does not answer, or not a Slurm job
])
def test_kind_at_next_start(kind, requeued, sacct_state, settled):
    assert kind_at_next_start(kind, requeued, sacct_state) == settled
