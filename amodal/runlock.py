"""One writer per run folder: <run>/run.lock names the process that trains or exports there.

The first process that trains or exports in a run folder holds it until it ends; the lock records its
host, pid, process start time, job (Slurm job id, or submitit's local job) and command. A second writer
is refused at once, with a message naming the holder. Not second writers: the ranks of one job (only
rank 0 holds the lock) and a requeue or restart of the same job (the same job id, its old process gone:
it takes the folder back without a word).

A holder that is gone is taken over with one warning line: a Slurm job that squeue no longer lists, or
else a process of this host that no longer runs (pid and start time). A holder on another host and
outside Slurm cannot be checked from here: the folder stays held, and the message says which file to
remove once that process is known to be gone.

Shared file systems: the record is written to a file of its own and hard-linked to run.lock, which is
atomic on NFS (where O_EXCL long was not, and fcntl locks depend on the lock daemon); a link whose
reply was lost is recognised by the link count. Taking over renames the stale lock away first, so of
two processes taking over at once only one succeeds.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from amodal import slurm
from amodal.config import ConfigError

LOCK_NAME = "run.lock"


class RunFolderHeld(ConfigError):
    """Another live process trains or exports in this run folder."""


def _start_ticks(pid: int) -> int | None:
    """The start time of a process of this host in clock ticks since boot (/proc), None if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def job_id() -> str | None:
    """The job this process belongs to: its Slurm job (an array element as ARRAY_TASK, as the launcher
    names it), else the submitit local job, else None."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return env["SLURM_JOB_ID"]
    return f"local {env['SUBMITIT_LOCAL_JOB_ID']}" if env.get("SUBMITIT_LOCAL_JOB_ID") else None


def _command() -> str:
    """This process's command line as typed: `amodal-train ...` or `python -m amodal.train ...`, not the
    path of the installed script or of the module."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:
        head = f"python -m {spec.name}"
    elif sys.argv[0].endswith(".py"):
        head = f"python {sys.argv[0]}"
    else:  # a console script (setup.cfg's entry points)
        head = Path(sys.argv[0]).name
    return " ".join([head, *sys.argv[1:]])[:300]


def this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": _start_ticks(os.getpid()),
            "job": job_id(), "since": round(time.time(), 3), "command": _command()}


def describe(holder: dict) -> str:
    job = holder.get("job")
    slurm_job = job and not job.startswith("local")
    who = f"Slurm job {job}, " if slurm_job else f"submitit {job} job, " if job else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"{who}pid {holder.get('pid')} on {holder.get('host')} since {since} ({holder.get('command', '?')})"


def _process_alive(holder: dict) -> bool | None:
    """Whether the holder's process runs: None when it is on another host (cannot tell from here)."""
    if holder.get("host") != socket.gethostname():
        return None
    ticks = _start_ticks(int(holder.get("pid", -1)))
    return ticks is not None and ticks == holder.get("start_ticks")


def slurm_job_alive(job: str) -> bool | None:
    """Whether Slurm still lists a job (pending, running, completing, requeued...); None when this
    machine has no Slurm to ask."""
    if not slurm.installed():
        return None
    return slurm.squeue_row(job, "%T") is not None


def holder_state(holder: dict, me: dict) -> str:
    """"same job" (a requeue or restart of this job: its old process is gone), "alive" or "gone"."""
    job, alive = holder.get("job"), _process_alive(holder)
    if job is not None and job == me["job"] and alive is not True:
        return "same job"
    if alive is True:
        return "alive"
    if job is not None and not job.startswith("local"):
        known = slurm_job_alive(job)
        if known is not None:
            return "alive" if known else "gone"
    return "gone" if alive is False else "alive"  # another host, outside Slurm: assume it runs


def _parse(text: str) -> dict:
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        holder = None
    return holder if isinstance(holder, dict) else {"damaged": text[:100]}


def read_holder(run_dir: str | Path) -> dict | None:
    """The record in <run>/run.lock, None when there is none. A damaged record (a crash mid-write
    cannot make one, but a person can) reads as a holder that is gone."""
    try:
        return _parse((Path(run_dir) / LOCK_NAME).read_text())
    except FileNotFoundError:
        return None


def live_holder(run_dir: str | Path) -> dict | None:
    """The holder of a run folder when it is alive (the launcher's question), else None."""
    holder = read_holder(run_dir)
    if holder is None or "damaged" in holder:
        return None
    return holder if holder_state(holder, this_process()) == "alive" else None


def _link(record: dict, lock: Path) -> bool:
    """Create `lock` holding `record` atomically, also on NFS; False when it exists."""
    tmp = lock.with_name(f".{LOCK_NAME}.{record['host']}.{record['pid']}")
    tmp.write_text(json.dumps(record) + "\n")
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    except OSError:
        return os.stat(tmp).st_nlink == 2  # NFS: the link was made, its reply lost
    finally:
        tmp.unlink(missing_ok=True)


class RunLock:
    """The lock of a run folder held by this process; release() removes it if it is still ours."""

    def __init__(self, run_dir: Path, record: dict, owned: bool = True):
        self.path, self.record, self.owned = run_dir / LOCK_NAME, record, owned

    def release(self) -> None:
        if self.owned and read_holder(self.path.parent) == self.record:
            self.path.unlink(missing_ok=True)
        self.owned = False


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def acquire(run_dir: str | Path, warn=_warn) -> RunLock:
    """Hold `run_dir` (made if absent) for this process, or raise RunFolderHeld naming the live holder.
    A holder that is gone is taken over with one warning line (`warn`); the same job's, silently."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock, me = run_dir / LOCK_NAME, this_process()
    for _ in range(5):  # each turn either links, or finds a holder that another taker changed meanwhile
        if _link(me, lock):
            return RunLock(run_dir, me)
        try:
            text = lock.read_text()
        except FileNotFoundError:
            continue  # released meanwhile
        holder = _parse(text)
        if all(holder.get(k) == me[k] for k in ("host", "pid", "start_ticks")):
            return RunLock(run_dir, holder, owned=False)  # this process holds it already (an outer caller)
        state = "gone" if "damaged" in holder else holder_state(holder, me)
        if state == "alive":
            raise RunFolderHeld(f"run folder {run_dir} is held by {describe(holder)}: one writer per run folder. "
                                f"Wait for it to end, or use another run folder; if it is gone, remove {lock}")
        stale = lock.with_name(f".{LOCK_NAME}.stale.{me['host']}.{me['pid']}")
        try:
            os.rename(lock, stale)  # of two takers, one renames it
        except FileNotFoundError:
            continue
        if stale.read_text() != text:  # renamed a newer holder's lock: put it back, look again
            os.rename(stale, lock)
            continue
        stale.unlink()
        if state == "gone":
            warn(f"warning: run folder {run_dir}: taking it over from {describe(holder)}, which is gone")
    raise RunFolderHeld(f"run folder {run_dir}: could not take {lock} (other processes keep taking it)")


def hold(run_dir: str | Path, rank: int) -> RunLock | None:
    """acquire() on rank 0; with several ranks in a process group every rank hears whether it could,
    so a refusal ends them all at once (RunFolderHeld on each) rather than leaving them at a barrier."""
    import torch.distributed as dist

    lock, refusal = None, None
    if rank == 0:
        try:
            lock = acquire(run_dir)
        except RunFolderHeld as e:
            refusal = str(e)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [refusal]
        dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal:
        raise RunFolderHeld(refusal)
    return lock
