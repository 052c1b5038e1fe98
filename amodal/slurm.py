"""Slurm's commands, asked in one way: scontrol, sacct and squeue, run by command() and read here.

Every query answers something when Slurm does not (not installed, a timeout, an error): "" or an
empty record, which the callers read as "Slurm does not know". Only a requeue raises when it fails.
"""

from __future__ import annotations

import shutil
import subprocess


def command(*args: str, check: bool = False, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a Slurm command so that it ignores SIGTERM (`trap '' TERM` survives the exec): Slurm sends
    SIGTERM to every process of a job it requeues or preempts, and a command started then, or the
    `scontrol requeue` that causes it, would be killed before it answers."""
    return subprocess.run(["sh", "-c", 'trap "" TERM; exec "$@"', "sh", *args], capture_output=True, text=True,
                          timeout=timeout, check=check)


def answer(*args: str) -> str:
    """A Slurm command's output, "" when Slurm does not answer."""
    try:
        return command(*args).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def installed() -> bool:
    """Whether this machine has Slurm's commands."""
    return shutil.which("squeue") is not None


def scontrol_job(job_id: str) -> dict:
    """`scontrol show job` as a dict of its fields ({} when Slurm does not answer)."""
    out = answer("scontrol", "-o", "show", "job", str(job_id))
    return dict(token.split("=", 1) for token in out.split() if "=" in token)


def scontrol_requeue(job_id: str) -> None:
    """`scontrol requeue JOB`: Slurm ends the job's run and starts it again under the same id. Raises
    OSError or subprocess.SubprocessError when the requeue fails."""
    command("scontrol", "requeue", str(job_id), check=True)


def hostnames(nodelist: str) -> list[str]:
    """A Slurm node list ('n[1-3],gpu7') expanded by `scontrol show hostnames`, which knows every
    syntax; [] where scontrol is not installed. Raises when scontrol fails."""
    if not shutil.which("scontrol"):
        return []
    return command("scontrol", "show", "hostnames", nodelist, check=True, timeout=60).stdout.split()


def squeue_row(job_id: str, fields: str) -> list[str] | None:
    """`squeue -o FIELDS` of a job that is queued or running (fields such as "%T|%r|%N", split at |);
    None once it has left the queue or when Slurm does not answer."""
    out = answer("squeue", "-h", "-j", str(job_id), "-o", fields)
    return out.splitlines()[0].split("|") if out else None


def sacct_rows(job_id: str, fields: str, every_run: bool = False) -> list[list[str]]:
    """Slurm's accounting of a job's allocation (sacct -X, not its steps): one row (FIELDS, e.g.
    "State,ExitCode", split at |) per job, or with every_run (sacct -D) one row per start of the job,
    oldest first; [] when accounting does not answer."""
    args = ["sacct", "-n", *(["-D"] if every_run else []), "-X", "-P", "-j", str(job_id), "-o", fields]
    return [line.split("|") for line in answer(*args).splitlines() if line.strip()]


def run_states(job_id: str) -> list[str]:
    """The state of each start of a job, oldest first (sacct -D), e.g. REQUEUED, PREEMPTED, RUNNING."""
    return [row[0] for row in sacct_rows(job_id, "State", every_run=True)]


def last_ended_state(job_id: str) -> str | None:
    """The state of the newest ended run of a job (its first word: CANCELLED for "CANCELLED by 0"); None
    when accounting does not answer or lists no ended run."""
    ended = [s.split()[0] for s in run_states(job_id) if s.split() and s.split()[0] not in ("RUNNING", "PENDING")]
    return ended[-1] if ended else None
