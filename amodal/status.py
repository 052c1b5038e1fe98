"""amodal-status RUN_DIR: state, requeues, last checkpoint and latest metrics of a run.

Reads the run folder (job.json written by amodal.launch, requeues.json, config.json, checkpoints/,
metrics.jsonl) and, for Slurm jobs, asks squeue, scontrol and sacct.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from amodal import slurm
from amodal.outcome import KINDS
from amodal.requeues import read_requeues
from amodal.tracking import METRICS_FILE, MetricsError, read_metrics


def slurm_lines(job_id: str) -> list[str]:
    """State (squeue while the job is queued or running, else sacct), runs and restarts of a Slurm job."""
    if not slurm.installed():
        return [f"job        {job_id} on Slurm: no Slurm commands on this machine"]
    queued = slurm.squeue_row(job_id, "%T|%r|%N")
    if queued:
        state, reason, nodes = queued
        state += f" on {nodes}" if state == "RUNNING" else f" ({reason})"
    else:
        final = slurm.sacct_rows(job_id, "State,ExitCode")
        state = ", exit ".join(final[-1]) if final else "unknown (not in squeue or sacct yet)"
    lines = [f"job        {job_id} on Slurm: {state}"]
    runs = slurm.run_states(job_id)
    if runs:
        lines.append(f"runs       {' -> '.join(runs)} (sacct -D: one entry per start)")
    restarts = slurm.scontrol_job(job_id).get("Restarts")
    if restarts:
        lines.append(f"restarts   {restarts} (scontrol)")
    return lines


def local_lines(job: dict) -> list[str]:
    pid = int(job["job_id"]) if str(job["job_id"]).isdigit() else None
    try:
        alive = pid is not None and (os.kill(pid, 0) is None)
    except OSError:
        alive = False
    return [f"job        {job['job_id']} ({job['cluster']}): {'running' if alive else 'not running'}"]


def latest_events(path: Path) -> dict:
    """The newest metrics.jsonl record of each event kind (train, val, checkpoint, done, ...)."""
    return {record["event"]: record for record in read_metrics(path) if "event" in record}


def _ago(record: dict) -> str:
    return f" ({time.time() - record['time']:.0f} s ago)" if isinstance(record.get("time"), (int, float)) else ""


def requeue_lines(record: dict) -> list[str]:
    """The interruptions of requeues.json: a count of each kind, then one line each (the steps only
    for training jobs)."""
    counts, now = record["counts"], record["attempt"]
    shown = [k for k in KINDS if k != "unknown" or counts[k]]
    lines = [f"requeues   {', '.join(f'{KINDS[k]} {counts[k]}' for k in shown)} (requeues.json)"]
    for i, e in enumerate(record["interruptions"], 1):
        steps = []
        if e["stopped_at"] is not None:
            steps.append(f"stopped at step {e['stopped_at']}")
        if e["saved_at"] is not None:
            steps.append(f"saved at step {e['saved_at']}")
        elif steps:
            steps.append("nothing saved on a signal")
        back = (now is not None and e["attempt"] is not None and now["job_id"] == e["attempt"]["job_id"]
                and now["number"] > e["attempt"]["number"])
        if e["requeued"] == "no":
            after = "not requeued"
        elif e["resumed_at"] is not None:
            after = f"resumed at step {e['resumed_at']}, {'?' if e['redone'] is None else e['redone']} steps redone"
        elif back:
            after = "started again"
        else:
            after = f"requeued by {'the job' if e['requeued'] == 'job' else 'Slurm'}, not started again yet"
        signals = ", ".join(e["signals"]) or "no signal"
        lines.append(f"  {i}. {KINDS[e['kind']]} ({signals}): " + (", ".join(steps) + "; " if steps else "") + after)
    return lines


def describe(run_dir: Path) -> str:
    from amodal.checkpoint import list_checkpoints

    if not any((run_dir / name).exists() for name in ("job.json", "config.json", "metrics.jsonl")):
        raise FileNotFoundError(f"{run_dir}: not a run folder (no job.json, config.json or metrics.jsonl)")
    lines = [f"run        {run_dir}"]
    job = json.loads((run_dir / "job.json").read_text()) if (run_dir / "job.json").exists() else None
    if job is not None:
        lines += slurm_lines(job["job_id"]) if job["cluster"] == "slurm" else local_lines(job)
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    if config.get("job") == "export":
        lines.append(f"model      {config['export']['checkpoint'] or config.get('from_run')}")
        for name in ("predictions.h5", config["export"]["submission"]):
            path = run_dir / name
            made = f"{path.stat().st_size} bytes, {time.time() - path.stat().st_mtime:.0f} s ago" if path.exists() else ""
            lines.append(f"output     {path}: {made or 'not yet'}")
        lines += requeue_lines(read_requeues(run_dir))
        if job is not None:
            lines.append(f"log        {job['log']}")
        return "\n".join(lines)
    lines += requeue_lines(read_requeues(run_dir))
    steps = config.get("train", {}).get("steps")
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        step, path = checkpoints[-1]
        lines.append(f"checkpoint step {step}{f' of {steps}' if steps else ''}: {path}")
    else:
        lines.append("checkpoint none yet")
    try:
        events = latest_events(run_dir / METRICS_FILE)
    except MetricsError as e:  # the state, requeues and checkpoint above still tell the user where the run is
        lines.append(f"metrics    unreadable: {e}")
        events = {}
    if "train" in events:
        e = events["train"]
        lines.append(f"train      step {e['step']}: loss {e['loss']:.4f}, lr {e['lr']:.3g}, "
                     f"{e.get('img_per_s', 0):.1f} img/s{_ago(e)}")
    if "val" in events:
        e = events["val"]
        miou = "none" if e.get("miou") is None else f"{e['miou']:.4f}"
        best = "none" if e.get("best_miou") is None else f"{e['best_miou']:.4f}"
        lines.append(f"val        step {e['step']}: mIoU {miou} (best {best}){_ago(e)}")
    last = max((e for k, e in events.items() if k in ("start", "interrupted", "done", "error")),
               key=lambda e: e.get("time", 0), default=None)
    if last is not None:
        detail = last.get("error") or ", ".join(last.get("signals", [])) or ""
        at = f" at step {last['step']}" if "step" in last else ""
        lines.append(f"last       {last['event']}{at}" + (f": {detail}" if detail else "") + _ago(last))
    if job is not None:
        lines.append(f"log        {job['log']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="amodal-status", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder, e.g. runs/smoke")
    args = parser.parse_args(argv)
    try:
        print(describe(args.run_dir.resolve()))
    except (FileNotFoundError, MetricsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
