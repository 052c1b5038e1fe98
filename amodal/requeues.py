"""<run>/requeues.json: the record of a run folder's interruptions (docs/design.md §3).

Every interruption is one entry: written when rank 0 acts on the signal (record_interruption), or, for
a run killed before it could (a node failure, SIGKILL after KillWait), by the next run of the same job
as it starts (record_start). That next start also asks Slurm's accounting why Slurm requeued the job
(sacct -D: PREEMPTED, NODE_FAIL, REQUEUED), and records the step it resumed at and how many steps it
trains again (record_resume: the ended run's last step, from <run>/last_step, minus the checkpoint's).
Only rank 0 writes it, one write at a time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from amodal import slurm
from amodal.fileio import write_text_atomic
from amodal.outcome import KINDS, kind_at_next_start
from amodal.tracking import read_last_step

REQUEUES_FILE = "requeues.json"


def read_requeues(run_dir: str | Path) -> dict:
    """<run>/requeues.json, the run's record of its interruptions:

    - "interruptions": one entry per interruption, oldest first: "kind" (a key of KINDS), "job_id",
      "attempt" (the run of the job it ended), "signals" (seen by rank 0; none when killed outright),
      "saved_at" (the step saved on the signal, or None), "stopped_at" (the last step that run trained),
      "requeued" ("job": it requeued itself, "slurm": Slurm did, "no"), and once the job is back,
      "resumed_at" (the step of the checkpoint it resumed from) and "redone" (stopped_at - resumed_at:
      steps trained twice);
    - "counts": interruptions of each kind;
    - "attempt": the job and the number of its run (0 first) that started last in this folder.
    """
    record = {"interruptions": [], "attempt": None}
    try:
        saved = json.loads((Path(run_dir) / REQUEUES_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        saved = {}
    record.update({k: saved[k] for k in record if k in saved})
    return _counted(record)


def _counted(record: dict) -> dict:
    record["counts"] = {kind: sum(e["kind"] == kind for e in record["interruptions"]) for kind in KINDS}
    return record


def _write_requeues(run_dir: Path, record: dict) -> None:
    _counted(record)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / REQUEUES_FILE, json.dumps(record, indent=1) + "\n")


def _entry(kind: str, job_id: str | None, attempt: dict | None, signals: set[str], step: int | None,
           requeued: str) -> dict:
    """One interruption, as read_requeues describes it; `step` is the step saved on the signal."""
    return {"kind": kind, "job_id": job_id, "attempt": attempt, "signals": sorted(signals), "saved_at": step,
            "stopped_at": step, "requeued": requeued, "resumed_at": None, "redone": None, "time": round(time.time(), 3)}


def record_interruption(run_dir: Path, kind: str, job_id: str | None, signals: set[str], step: int | None,
                        requeued: str) -> None:
    """Rank 0, as it acts on a signal (and saved `step`, if any): the entry of the interruption that ends
    this run, `requeued` saying who requeues the job ("job", "slurm" or "no")."""
    record = read_requeues(run_dir)
    record["interruptions"].append(_entry(kind, job_id, record["attempt"], signals, step, requeued))
    _write_requeues(run_dir, record)


def record_start(run_dir: Path, job_id: str, on_slurm: bool) -> dict | None:
    """Rank 0, as a job's run starts: when it is the same job started again, complete the record of the
    interruption that ended its previous run, or write one if that run left none (killed before it
    could act on a signal: a node failure, a preemption past KillWait). Slurm's accounting says why
    Slurm ended the run; it is read now, when the ended run's row is final, and wins over what the run
    saw, except for our own requeues (sacct: REQUEUED). Returns that entry."""
    record = read_requeues(run_dir)
    previous = record["attempt"]
    same_job = previous is not None and previous["job_id"] == job_id
    record["attempt"] = {"job_id": job_id, "number": previous["number"] + 1 if same_job else 0}
    entry = None
    if same_job:
        last = record["interruptions"][-1] if record["interruptions"] else None
        if last is not None and last["attempt"] == previous:
            entry = last
        else:
            entry = _entry("unknown", job_id, previous, set(), None, "slurm")
            record["interruptions"].append(entry)
        sacct_state = slurm.last_ended_state(job_id) if on_slurm else None
        entry["kind"] = kind_at_next_start(entry["kind"], entry["requeued"], sacct_state)
        last_step = read_last_step(run_dir)
        if last_step is not None:
            entry["stopped_at"] = last_step
    _write_requeues(run_dir, record)
    return entry


def record_resume(run_dir: Path, step: int) -> None:
    """Rank 0, once training has restored its checkpoint: the step the interruption before this run
    resumed at, and how many steps of the ended run are trained again."""
    record = read_requeues(run_dir)
    attempt = record["attempt"]
    if not record["interruptions"] or attempt is None or attempt["number"] == 0:
        return
    entry = record["interruptions"][-1]
    if entry["attempt"] != {"job_id": attempt["job_id"], "number": attempt["number"] - 1}:
        return
    entry["resumed_at"] = step
    entry["redone"] = entry["stopped_at"] - step if entry["stopped_at"] is not None else None
    _write_requeues(run_dir, record)
    redone = f"{entry['redone']} steps trained again" if entry["redone"] is not None else "steps redone unknown"
    print(f"restart {attempt['number']} after {KINDS[entry['kind']]}: resumed at step {step}, {redone}", flush=True)
