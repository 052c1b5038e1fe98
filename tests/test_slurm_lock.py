"""One writer per run folder on the project's real Slurm cluster (slurm/local-cluster.sh; issue 23): a
job launched twice under one name, and a job requeued while its lock is still in its folder (its
process killed outright, as on a node failure), which must resume rather than be refused."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amodal.checkpoint import list_checkpoints
from amodal.runlock import LOCK_NAME, read_holder
from conftest import sh, wait_until

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "jobs" / "smoke.toml")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
RESOURCES = ["--gpus-per-node", "0", "--cpus-per-task", "1"]


def tiny(shards: Path, steps: int) -> list[str]:
    sets = {"data.root": shards, "data.make_synthetic": "false", "model.base_channels": 8, "data.input_size": 32,
            "train.global_batch": 4, "data.num_workers": 0, "train.val_every": 0, "tracking.wandb": "off",
            "train.steps": steps, "checkpoint.every_steps": 25, "train.log_every": 10}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture
def launched(tmp_path):
    """Run amodal.launch in a work folder on the shared file system; cancel what the test left queued."""
    jobs = []

    def launch(*args: str) -> subprocess.CompletedProcess:
        if shutil.which("sbatch") is None or subprocess.run(["sinfo"], capture_output=True).returncode != 0:
            pytest.fail("no Slurm cluster: start it first: `bash slurm/local-cluster.sh up` (as root)")
        r = subprocess.run([sys.executable, "-m", "amodal.launch", *args], cwd=tmp_path, env=ENV, capture_output=True,
                           text=True, timeout=120)
        jobs.extend(re.findall(r"submitted \S+ job (\S+) to Slurm", r.stdout))
        return r

    launch.jobs, launch.root = jobs, tmp_path
    yield launch
    for job in jobs:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)


def squeue_state(job: str) -> str | None:
    return sh("squeue", "-h", "-j", job, "-o", "%T", check=False).strip() or None


def test_a_second_launch_under_a_running_name_is_refused_and_after_chains_it(launched, synthetic_shards):
    args = [SMOKE, "--name", "twice", *RESOURCES, *tiny(synthetic_shards, 3000)]
    first = launched(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    (job,) = launched.jobs
    run = launched.root / "runs" / "twice"
    for dry in ([], ["--dry-run"]):
        started = time.monotonic()
        second = launched(*args, *dry)
        seconds = time.monotonic() - started
        state = squeue_state(job)
        assert second.returncode == 2 and second.stdout == "", second.stdout + second.stderr
        assert re.search(rf"run folder {run}: Slurm job {job}, launched under the name 'twice', is (PENDING|RUNNING|"
                         rf"CONFIGURING): one writer per run folder. Chain this job after it with --after {job}",
                         second.stderr), (state, second.stderr)
        print(f"second launch{' --dry-run' if dry else ''} refused in {seconds:.2f} s (whole process)")
    assert len(launched.jobs) == 1 and json.loads((run / "job.json").read_text())["job_id"] == job
    chained = launched(*args, "--after", job)
    assert chained.returncode == 0 and len(launched.jobs) == 2, chained.stdout + chained.stderr
    assert "Dependency" in sh("squeue", "-h", "-j", launched.jobs[1], "-o", "%r") or squeue_state(launched.jobs[1])


def test_a_job_requeued_while_its_lock_is_in_its_folder_resumes(launched, synthetic_shards):
    """The job's process is killed outright (SIGKILL: no handler runs, the lock stays), then the job is
    requeued: it comes back under the same job id, takes its folder back silently and resumes."""
    steps = 300
    r = launched(SMOKE, "--name", "requeued", *RESOURCES, *tiny(synthetic_shards, steps))
    assert r.returncode == 0, r.stdout + r.stderr
    (job,) = launched.jobs
    run = launched.root / "runs" / "requeued"
    log = Path(json.loads((run / "job.json").read_text())["log"])
    holder = wait_until("the job to hold its folder and save a checkpoint",
                        lambda: list_checkpoints(run) and read_holder(run), 240, log=log)
    assert holder["job"] == job, holder
    os.kill(holder["pid"], signal.SIGKILL)  # on this machine: the cluster's nodes run here
    wait_until("the killed job to leave the queue", lambda: squeue_state(job) is None, 120, log=log)
    assert read_holder(run) == holder, "the killed process cannot have released its lock"
    saved = list_checkpoints(run)[-1][0]
    sh("scontrol", "requeue", job)
    final = wait_until(f"job {job} to finish after the requeue",
                       lambda: squeue_state(job) is None and sh("sacct", "-n", "-X", "-P", "-j", job, "-o", "State")
                       .strip().split() and sh("sacct", "-n", "-X", "-P", "-j", job, "-o", "State").split()[0]
                       in ("COMPLETED", "FAILED", "CANCELLED"), 400, every=2, log=log)
    text = log.read_text()
    assert sh("sacct", "-n", "-X", "-P", "-j", job, "-o", "State").split()[0] == "COMPLETED", (final, text[-3000:])
    assert "is held by" not in text and "taking it over" not in text, text[-3000:]
    assert f"resuming from {run}/checkpoints/step-" in text, text[-3000:]
    starts = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("event") == "start"]
    assert [s["step"] for s in starts][0] == 0 and starts[-1]["step"] >= saved > 0, starts
    assert list_checkpoints(run)[-1][0] == steps
    assert not (run / LOCK_NAME).exists(), "released when the job ended"
