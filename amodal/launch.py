"""amodal-launch [RECIPE] [--partition P] [--hours H] ... : submit a job to Slurm or run it here.

The recipe's `job` key picks the job (train, retrain_full, export: amodal/jobs.py); a recipe with a
sweep (`sweep` grid or `points`) becomes one Slurm job array, one run folder per element. Clusters:
slurm (sbatch through submitit; the default where `sbatch` exists), local (submitit's local executor:
the same job in processes of this machine, with the same signal and requeue handling; the launcher
waits and shows the log) and debug (in this process, no submitit).

Relative paths of the recipe (data.root, run_dir, from_run, export.checkpoint, model.pretrained) are
made absolute here, against the current folder: a job may run in another one. Jobs run the code of the
checkout that launched them (PYTHONPATH is set in the batch script).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from amodal import runlock, slurm
from amodal.config import (Config, ConfigError, absolute_paths, job_config, load_config, ranks_per_node,
                           sweep_points)
from amodal.fileio import write_text_atomic
from amodal.jobs import make_job

CODE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = CODE_ROOT / "jobs" / "train.toml"
# Jobs import this checkout's code, wherever they run and whatever is installed there.
SETUP = [f"export PYTHONPATH={shlex.quote(str(CODE_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]
SLURM_FLAGS = {"partition": str, "hours": float, "nodes": int, "gpus_per_node": int, "tasks_per_node": int,
               "cpus_per_task": int, "mem": str, "account": str, "qos": str, "constraint": str, "exclude": str}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="amodal-launch", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", nargs="?", help="job recipe (default: jobs/train.toml)")
    for name, kind in SLURM_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, help=f"sets slurm.{name}")
    p.add_argument("--name", help="run name; the run folder becomes runs/<name>")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--cluster", choices=["slurm", "local", "debug"],
                   help="default: slurm where sbatch exists, else local")
    p.add_argument("--after", metavar="JOBID", help="Slurm: start once this job has completed successfully")
    p.add_argument("--dry-run", action="store_true", help="print the batch script and the config; submit nothing")
    p.add_argument("--no-wait", action="store_true", help="local: return once the job is started")
    return p


def resolve_config(args) -> Config:
    # The command line's Slurm options are overrides like --set (after it), so the recipe is checked
    # once, as it will run: an option can make a recipe valid as well as invalid.
    flags = [f"slurm.{k}={json.dumps(getattr(args, k))}" for k in SLURM_FLAGS if getattr(args, k) is not None]
    if args.name:
        flags += [f"name={json.dumps(args.name)}", 'run_dir=""']
    cfg = load_config(args.recipe or DEFAULT_RECIPE, args.set + flags)
    if not args.name and cfg.job == "export" and not cfg.run_dir and cfg.export.checkpoint:
        # An export's files go next to the model: <trained run>/export/.
        source = Path(cfg.export.checkpoint)
        if source.suffix == ".pt":
            source = source.parent.parent if source.parent.name == "checkpoints" else source.parent
        cfg = replace(cfg, run_dir=str(source / "export"))
    return absolute_paths(cfg)


def limits(cfg: Config, cluster: str) -> tuple[float, int]:
    """(time limit in minutes, signal delay in s). Slurm counts whole minutes. USR2 is asked for
    slurm.signal_delay_s before the limit, or half-way through a job shorter than twice that; Slurm's
    controller looks every 30 s, so the signal comes between delay and delay + 30 s before the limit."""
    minutes = max(1, round(cfg.slurm.hours * 60)) if cluster == "slurm" else cfg.slurm.hours * 60
    return minutes, int(min(cfg.slurm.signal_delay_s, minutes * 30))


def slurm_parameters(cfg: Config, after: str | None, array: int) -> dict:
    """sbatch options, in the names of submitit's SlurmExecutor."""
    s = cfg.slurm
    minutes, delay = limits(cfg, "slurm")
    extra = {"requeue": True}  # preempted and wall-time jobs come back under the same job id
    if after:
        extra.update(dependency=f"afterok:{after}", kill_on_invalid_dep="yes")
    params = dict(job_name=cfg.name, time=minutes, signal_delay_s=delay, nodes=s.nodes,
                  ntasks_per_node=ranks_per_node(cfg.slurm), cpus_per_task=s.cpus_per_task, stderr_to_stdout=True,
                  array_parallelism=max(1, min(s.array_parallelism, array)), additional_parameters=extra,
                  setup=SETUP)
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    for key in ("partition", "mem", "account", "qos", "constraint", "exclude"):
        if getattr(s, key):
            params[key] = getattr(s, key)
    return params


def batch_script(cfg: Config, folder: Path, after: str | None, array: int) -> str:
    """The batch script submitit would submit. submitit has no public way to render it without
    submitting; its private renderer is used here only (setup.cfg bounds submitit to the minor
    release the launcher tests check)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, map_count=array if array > 1 else None,
                               **slurm_parameters(cfg, after, array))


def make_executor(cfg: Config, cluster: str, folder: Path, after: str | None, array: int):
    import submitit

    s = cfg.slurm
    if cluster == "slurm":
        executor = submitit.SlurmExecutor(folder, max_num_timeout=s.max_walltime_requeues)
        executor.update_parameters(**slurm_parameters(cfg, after, array))
        return executor
    minutes, delay = limits(cfg, "local")
    executor = submitit.LocalExecutor(folder, max_num_timeout=s.max_walltime_requeues)
    executor.update_parameters(timeout_min=minutes, signal_delay_s=delay, tasks_per_node=ranks_per_node(cfg.slurm),
                               gpus_per_node=s.gpus_per_node, stderr_to_stdout=True, setup=SETUP)
    return executor


def announce(job, cfg: Config, cluster: str) -> None:
    """job.json in the run folder (read by amodal.status) and the lines that say how to follow the job."""
    run_dir = Path(cfg.run_dir)
    record = {"job_id": job.job_id, "cluster": cluster, "log": str(job.paths.stdout), "submitted": time.time()}
    write_text_atomic(run_dir / "job.json", json.dumps(record) + "\n")
    where = "to Slurm" if cluster == "slurm" else "on this machine (local executor)"
    print(f"submitted {cfg.job} job {job.job_id} {where}\n  run folder: {run_dir}\n"
          f"  follow it:  amodal-status {run_dir}\n  log:        {job.paths.stdout}", flush=True)


def wait_local(job) -> int:
    """Show a local job's log as it grows until the job ends; 0 when it returned a result."""
    log, seen = Path(job.paths.stdout), 0
    while True:
        done = job.done()
        if log.exists():
            with open(log, "rb") as f:
                f.seek(seen)
                data = f.read()
            seen += len(data)
            sys.stdout.write(data.decode(errors="replace"))
            sys.stdout.flush()
        if done:
            break
        time.sleep(1.0)
    try:
        job.result()
        return 0
    except Exception as e:  # the job's own error is in its log; say where
        print(f"job {job.job_id} did not finish: {str(e).strip().splitlines()[-1]}\n  log: {log}", file=sys.stderr)
        return 1


def check_one_writer(cfg: Config, after: str | None) -> None:
    """One writer per run folder: refuse while the Slurm job last launched under this name (job.json)
    is pending or running, or another process holds the folder (run.lock), unless --after chains this
    job to that one."""
    run_dir = Path(cfg.run_dir)
    try:
        record = json.loads((run_dir / "job.json").read_text())
    except (OSError, ValueError):
        record = {}
    chained = lambda job: after is not None and job is not None and after in (job, job.split("_")[0])
    job = str(record.get("job_id")) if record.get("cluster") == "slurm" else None
    row = slurm.squeue_row(job, "%T") if job and not chained(job) else None
    if row is not None:
        raise ConfigError(f"run folder {run_dir}: Slurm job {job}, launched under the name {cfg.name!r}, is "
                          f"{row[0]}: one writer per run folder. Chain this job after it with --after {job}, "
                          f"or pick another --name")
    holder = runlock.live_holder(run_dir)
    if holder is not None and not chained(holder.get("job")):
        raise ConfigError(f"run folder {run_dir} is held by {runlock.describe(holder)}: one writer per run "
                          f"folder. Wait for it to end, or pick another --name")


def launch(cfg: Config, args) -> int:
    cluster = args.cluster
    if cluster is None:
        cluster = "slurm" if shutil.which("sbatch") else "local"
        if cluster == "local":
            print("no sbatch on this machine: the job runs here, with submitit's local executor")
    if args.after and cluster != "slurm":
        raise ConfigError(f"--after {args.after}: only Slurm knows job dependencies (this is --cluster {cluster})")
    if cluster == "local" and cfg.slurm.nodes != 1:
        raise ConfigError(f"slurm.nodes = {cfg.slurm.nodes}: the local executor runs on this machine only")
    points = [absolute_paths(job_config(p)) for p in sweep_points(cfg)]
    from amodal.preflight import check_inputs  # here, not above: a config error is refused before torch loads

    for p in points:
        check_inputs(p, args.after)
        check_one_writer(p, args.after)
    folder = Path(cfg.run_dir) / "submitit"  # the sweep's folder for an array
    if args.dry_run:
        if cluster == "slurm":
            print(f"# batch script (not submitted; submitit writes it under {folder})")
            print(batch_script(cfg, folder, args.after, len(points)))
        else:
            print(f"# --cluster {cluster}: {len(points)} job(s) would run on this machine")
        for p in points:
            print(f"# config of {p.run_dir}\n{p.dumps()}")
        return 0
    if cluster == "slurm" and not shutil.which("sbatch"):
        raise ConfigError("--cluster slurm: no sbatch on this machine (use --cluster local)")
    jobs = [make_job(p, p.run_dir) for p in points]
    for p in points:
        Path(p.run_dir).mkdir(parents=True, exist_ok=True)
    if cluster == "debug":
        for job, p in zip(jobs, points):
            print(f"running {p.job} in this process: run folder {p.run_dir}", flush=True)
            print(job())
        return 0
    executor = make_executor(cfg, cluster, folder, args.after, len(points))
    if cluster == "local" and not args.no_wait:  # one after another: a laptop has few cores
        status = 0
        for job, p in zip(jobs, points):
            submitted = executor.submit(job)
            announce(submitted, p, cluster)
            status = wait_local(submitted) or status
        return status
    with executor.batch():  # several jobs: one Slurm array
        submitted = [executor.submit(job) for job in jobs]
    if len(submitted) > 1 and cluster == "slurm":
        print(f"array job {submitted[0].job_id.split('_')[0]}: {len(submitted)} elements, at most "
              f"{min(cfg.slurm.array_parallelism, len(submitted))} at once")
    for job, p in zip(submitted, points):
        announce(job, p, cluster)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    try:
        return launch(resolve_config(args), args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FailedJobError, FailedSubmissionError) as e:  # sbatch refused the job: its message says why
        print(f"error: submission failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
